"""heartseg-bench: measured latency, throughput, memory and compute efficiency of heartseg on scans."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from . import __version__
from .bench import (
    FLOPS_KEY,
    STAGES,
    ScanTiming,
    flops_per_voxel,
    machine_info,
    network_flops,
    peak_rss_mb,
    sgemm_gflops,
    summarize,
    thread_env,
    time_scan,
    usable_cores,
)
from .cli_common import (
    DEVICE_HELP,
    Device,
    check_report_path,
    fmt,
    guarded,
    new_app,
    out_console,
    stdout_for_reports,
    say,
    version_option,
    write_json,
)
from .errors import HeartsegError, InputError
from .formats import ScanSource, discover_sources
from .outputs import check_outputs
from .segmenter import Segmenter, resolve_model
from .session import _ort, choose_providers, read_contract

app = new_app()


class WorkerError(HeartsegError):
    """A benchmark worker that crashed for an unexpected reason."""

    exit_code = 1


def parse_threads(text: str | None) -> list[int]:
    """'1,2' -> [1, 2]; None -> [1, all usable cores] (without duplicates)."""
    if text is None:
        return sorted({1, usable_cores()})
    counts: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise InputError(f"--threads: expected comma-separated positive integers like 1,2, got {text!r}")
        if int(part) not in counts:
            counts.append(int(part))
    return counts


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process: warm-up, then repeat x every scan, then sgemm speed."""
    model, threads, device = spec["model"], int(spec["threads"]), spec["device"]
    scans = [ScanSource(Path(s["path"]), s["format"], s["name"], s["series"]) for s in spec["scans"]]
    start = time.perf_counter()
    segmenter = Segmenter(model, device=device, threads=threads)
    model_load = time.perf_counter() - start
    baseline = peak_rss_mb()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="heartseg-bench-") as outdir:
        # One untimed warm-up run: ONNX Runtime allocates its arena and tunes kernels on the first call.
        warmup = time_scan(segmenter, scans[0], outdir).total
        loop_start = time.perf_counter()
        for repeat in range(int(spec["repeat"])):
            for scan in scans:
                record = time_scan(segmenter, scan, outdir).to_dict()
                record["repeat"] = repeat
                runs.append(record)
        wall = time.perf_counter() - loop_start
    peak = peak_rss_mb()  # before the sgemm reference, whose matrices are not heartseg's memory
    size = int(spec.get("sgemm_size", 2048))
    sgemm = sgemm_gflops(size) if size > 0 else None
    return {
        "threads": threads,
        "device": segmenter.device,
        "model_load_s": model_load,
        "warmup_s": warmup,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "wall_s": wall,
        "runs": runs,
        "flops_per_voxel": flops_per_voxel(segmenter.session.metadata),
        "sgemm_size": size,
        "sgemm_gflops": sgemm,
    }


def summarize_config(result: dict[str, Any]) -> dict[str, Any]:
    """The reported figures of one configuration, from its worker's raw runs."""
    runs = [ScanTiming(**{**r, "shape": tuple(r["shape"])}) for r in
            ({k: v for k, v in run.items() if k != "repeat"} for run in result["runs"])]
    totals = summarize([r.total for r in runs])
    per_voxel = result.get("flops_per_voxel")
    flops = [network_flops(r.voxels, per_voxel) for r in runs]
    known = all(f is not None for f in flops) and bool(flops)
    network_seconds = sum(r.network for r in runs)
    achieved = sum(flops) / network_seconds / 1e9 if known and network_seconds > 0 else None  # type: ignore[arg-type]
    sgemm = result.get("sgemm_gflops")
    efficiency = achieved / sgemm if achieved is not None and sgemm and result["device"] == "cpu" else None
    return {
        "threads": result["threads"],
        "device": result["device"],
        "runs": len(runs),
        "median_s": totals["median"],
        "p95_s": totals["p95"],
        "mean_s": totals["mean"],
        "min_s": totals["min"],
        "max_s": totals["max"],
        "scans_per_minute": 60.0 * len(runs) / result["wall_s"] if result["wall_s"] > 0 else None,
        "peak_rss_mb": result["peak_rss_mb"],
        "baseline_rss_mb": result["baseline_rss_mb"],
        "model_load_s": result["model_load_s"],
        "warmup_s": result["warmup_s"],
        "stages_median_s": {name: summarize([getattr(r, name) for r in runs])["median"] for name in STAGES},
        "network_voxels_per_scan": summarize([sum(r.voxels.values()) for r in runs])["median"],
        "network_gflop_per_scan": float(sum(flops)) / len(flops) / 1e9 if known else None,  # type: ignore[arg-type]
        "achieved_gflops": achieved,
        "sgemm_size": result.get("sgemm_size"),
        "sgemm_gflops": sgemm,
        "fraction_of_sgemm": efficiency,
    }


def run_config(model: Path, scans: list[ScanSource], threads: int, device: str, repeat: int,
               sgemm_size: int = 2048) -> dict[str, Any]:
    """Measure one configuration in a fresh subprocess (so its peak memory is its own); returns the raw result."""
    with tempfile.TemporaryDirectory(prefix="heartseg-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec = {"model": str(model), "scans": [{"path": str(s.path), "format": s.format, "name": s.name,
                                                "series": s.series} for s in scans],
                "threads": threads, "device": device,
                "repeat": repeat, "sgemm_size": sgemm_size, "result": str(result_path)}
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        # The worker's BLAS (the sgemm reference) gets the same thread count as ONNX Runtime.
        proc = subprocess.run([sys.executable, "-m", "heartseg.runtime.cli_bench", "--worker", str(spec_path)],
                              env=thread_env(threads), capture_output=True, text=True, check=False)
        if not result_path.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-20:]
            raise WorkerError(f"the benchmark worker ({threads} threads) exited with code {proc.returncode} "
                              "without a result" + (":\n" + "\n".join(tail) if tail else ""))
        result = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        if int(result.get("exit_code", 1)) == 2:
            raise HeartsegError(result["error"])
        raise WorkerError(f"the benchmark worker ({threads} threads) failed: {result['error']}\n"
                          + result.get("traceback", ""))
    return result


def _worker_main(spec_path: Path) -> int:
    """Worker mode: read the spec, measure, write the result file; exit 0 even on a reported error."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        result: dict[str, Any] = run_worker(spec)
    except HeartsegError as exc:
        result = {"error": str(exc), "exit_code": exc.exit_code}
    except Exception as exc:  # reported by the parent as exit 1, with the traceback
        result = {"error": f"{type(exc).__name__}: {exc}", "exit_code": 1, "traceback": traceback.format_exc()}
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _table(summaries: list[dict[str, Any]], model: Path, scans: int, repeat: int) -> Table:
    """One row per configuration."""
    table = Table(title=f"heartseg-bench  model {model.name}  {scans} scan(s) x {repeat} repeat(s), seconds per scan",
                  title_justify="left")
    for name in ("threads", "device", "median s", "p95 s", "scans/min", "peak RSS MB", "read", "preprocess",
                 "network", "postprocess", "write", "GFLOP/scan", "GFLOP/s", "sgemm GFLOP/s", "% of sgemm"):
        table.add_column(name, justify="left" if name == "device" else "right")
    for s in summaries:
        stages = s["stages_median_s"]
        fraction = s["fraction_of_sgemm"]
        table.add_row(str(s["threads"]), s["device"], fmt(s["median_s"]), fmt(s["p95_s"]),
                      fmt(s["scans_per_minute"], 1), fmt(s["peak_rss_mb"], 0), *[fmt(stages[n]) for n in STAGES],
                      fmt(s["network_gflop_per_scan"], 2),
                      fmt(s["achieved_gflops"], 1), fmt(s["sgemm_gflops"], 1),
                      fmt(None if fraction is None else 100.0 * fraction, 1))
    return table


HELP = """Benchmark heartseg end to end on scans: latency, throughput, peak memory and compute efficiency.

For each thread count a fresh worker process loads the model, segments the first scan once
(untimed warm-up), then segments every scan --repeat times through heartseg-infer's own pipeline,
timing per scan: read (load the scan, any format heartseg-infer reads), preprocess (reorientation),
network (the model's graph: resampling, both networks, the box, resampling back, threshold, largest
component), postprocess (QC, back to the scan's axes) and write (the mask, to a temporary folder).
Reported per thread count: median and 95th-percentile seconds per scan, scans per minute (over the
whole timed loop), the worker's peak resident memory (ru_maxrss), stage medians, the network FLOPs per
scan (the model's FLOPs per voxel, from its metadata, times the voxels its networks processed, a grown
box counted once), the GFLOP/s this gives over the network stage, and this machine's measured float32
matmul speed (numpy
2048x2048 sgemm, best of 3, with the same thread count) with the achieved fraction of it.

SCANS are what heartseg-infer takes: scan files, DICOM folders or zips, folders of scan files;
--model a file or a shipped variant (fp32, fp16, int8, ensemble). Exit codes: 0 done; 1 a worker crashed; 2 usage, model or
input error (missing or unreadable model, no scans, an unusable scan, --device cuda without CUDA).
"""


@app.command(help=HELP, no_args_is_help=True)
@guarded
def bench(
    scans: Optional[list[Path]] = typer.Argument(
        None, metavar="SCANS", help="Scan files, DICOM folders or zips, or folders of scan files.",
        show_default=False),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", metavar="M.onnx|fp32|fp16|int8|ensemble",
        help="heartseg ONNX model file, or a shipped variant's name (ensemble: the fold ensemble shipped beside it). "
             "[default: fp32, the model shipped with the package]", show_default=False),
    repeat: int = typer.Option(3, "--repeat", min=1, metavar="N", help="Timed runs of every scan."),
    threads: Optional[str] = typer.Option(
        None, "--threads", metavar="LIST",
        help="Comma-separated CPU thread counts to compare, e.g. 1,2. [default: 1 and all usable cores]",
        show_default=False),
    device: Device = typer.Option(Device.auto, "--device", help=DEVICE_HELP),
    series: Optional[str] = typer.Option(
        None, "--series", metavar="NUMBER|UID|all",
        help="The DICOM series to use when a folder or zip holds several, or 'all'. [default: the only one]",
        show_default=False),
    json_path: Optional[Path] = typer.Option(
        None, "--json", metavar="FILE", help="Also write every measurement as JSON; '-' is stdout. "
        "[default: none]", show_default=False),
    sgemm_size: int = typer.Option(2048, "--sgemm-size", min=0, hidden=True,
                                   help="Matrix size of the sgemm reference (0: skip it)."),
    worker: Optional[Path] = typer.Option(None, "--worker", hidden=True, help="Internal: run one configuration."),
    version: bool = version_option(),
) -> None:
    """Benchmark heartseg end to end on scans (see HELP)."""
    if worker is not None:
        raise typer.Exit(_worker_main(worker))
    if not scans:
        raise InputError("no scans given: heartseg-bench SCANS... [--model M.onnx]")
    model_path = resolve_model(model)
    check_report_path(json_path, "--json")
    counts = parse_threads(threads)
    found = discover_sources(scans, series)
    check_outputs([*(s.path for s in found), model_path], [("--json", json_path)])
    contract, meta = read_contract(model_path)
    choose_providers(device.provider, list(_ort().get_available_providers()))
    with stdout_for_reports(json_path):
        machine = machine_info()
        say(f"machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores; onnxruntime "
            f"{machine['onnxruntime']} ({', '.join(machine['onnxruntime_providers'])})")
        summaries, raw = [], []
        for count in counts:
            say(f"threads {count}: {len(found)} scan(s) x {repeat} repeat(s) after 1 warm-up run, in a fresh process ...")
            result = run_config(model_path, found, count, device.provider, repeat, sgemm_size)
            raw.append(result)
            summaries.append(summarize_config(result))
        out_console().print(_table(summaries, model_path, len(found), repeat))
        if any(s["network_gflop_per_scan"] is None for s in summaries):
            say(f"note: the model's metadata has no {FLOPS_KEY!r} entry for every stage, so FLOPs and GFLOP/s "
                "are not reported")
        if json_path is not None:
            shapes = {r["scan"]: r["shape"] for r in raw[0]["runs"]}
            write_json(json_path, {
                "tool": "heartseg-bench",
                "heartseg": __version__,
                "model": {"path": str(model_path), "sha256": _sha256(Path(model_path)),
                          "stages": [s.name for s in contract.stages],
                          "flops_per_voxel": flops_per_voxel(meta)},
                "scans": [{"path": str(p.path), "series": p.series, "shape": shapes.get(str(p))} for p in found],
                "repeat": repeat,
                "device_requested": device.value,
                "machine": machine,
                "configs": [{**s, "raw": r} for s, r in zip(summaries, raw)],
            })
            if str(json_path) != "-":
                say(f"wrote {json_path}")


def main() -> None:
    """Entry point of heartseg-bench."""
    app(prog_name="heartseg-bench")


if __name__ == "__main__":
    main()
