"""heartseg-infer: segment the left atrium in NIfTI scans with a heartseg ONNX model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from .cli_common import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    Device,
    case_key,
    check_report_path,
    discover_scans,
    ensure_output_folder,
    error,
    final_exit_code,
    fmt,
    guarded,
    index_by_key,
    new_app,
    nifti_files,
    out_console,
    progress_bar,
    say,
    scan_name,
    warn,
    write_json,
)
from .atomic import write_text_atomic
from .contract import CONTRACT_KEY
from .errors import HeartsegError, InputError
from .image import Volume, load_mask, load_volume, same_grid, save_volume
from .metrics import compute_metrics
from .overlay import require_pyplot, save_overlay
from .preprocess import to_canonical
from .qc import QCReport
from .segmenter import Segmenter, default_model_path
from .session import read_contract

app = new_app()


@dataclass
class ScanJob:
    """One scan to segment and where its outputs go."""

    scan: Path
    mask_path: Path
    prob_path: Path | None
    label: Path | None = None


@dataclass
class ScanResult:
    """What happened to one scan."""

    job: ScanJob
    status: str  # ok | flagged | skipped | failed
    seconds: float | None = None
    device: str | None = None
    volume_ml: float | None = None
    qc: str | None = None
    report: QCReport | None = None
    metrics: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of this scan."""
        record: dict[str, Any] = {
            "scan": str(self.job.scan),
            "name": scan_name(self.job.scan),
            "status": self.status,
            "mask": str(self.job.mask_path) if self.status in ("ok", "flagged", "skipped") else None,
            "prob": str(self.job.prob_path) if self.job.prob_path and self.status in ("ok", "flagged") else None,
            "label": str(self.job.label) if self.job.label else None,
            "seconds": self.seconds,
            "device": self.device,
            "volume_ml": self.volume_ml,
            "qc": self.report.summary() if self.report is not None else None,
            "verdict": self.report.verdict if self.report is not None else None,
            "estimated_dice": self.report.estimated_dice if self.report is not None else None,
            "dice_interval": list(self.report.dice_interval) if self.report and self.report.dice_interval else None,
            "qc_report": self.report.to_dict() if self.report is not None else None,
            "metrics": self.metrics,
            "timings": self.timings or None,
            "error": self.error,
        }
        if self.runs:
            record["benchmark"] = {
                "runs": len(self.runs),
                "median_s": float(np.median(self.runs)),
                "p95_s": float(np.percentile(self.runs, 95)),
                "seconds": self.runs,
            }
        return record


def _describe(path: Path, exc: BaseException) -> str:
    """'name: message' for a failed scan, without repeating the path when the message has it."""
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, HeartsegError):
        message = f"{type(exc).__name__}: {message}"
    if str(path) in message:
        return message
    return f"{path.name}: {message}"


def _plan(scans: list[Path], outdir: Path, save_prob: bool, label: Path | None, labels: Path | None) -> list[ScanJob]:
    """Output paths and labels for every scan; refuses collisions with inputs and with each other."""
    if label is not None and labels is not None:
        raise InputError("give either --label (one scan) or --labels (a folder), not both")
    if label is not None and len(scans) != 1:
        raise InputError(f"--label pairs with exactly one scan, got {len(scans)} scans; use --labels DIR")
    if label is not None and not label.is_file():
        raise InputError(f"--label {label}: no such file")
    label_index: dict[str, Path] = {}
    if labels is not None:
        if not labels.is_dir():
            raise InputError(f"--labels {labels}: not a folder")
        label_index = index_by_key(nifti_files(labels), what="label")
    jobs = []
    for scan in scans:
        name = scan_name(scan)
        scan_label = label
        if labels is not None:
            scan_label = label_index.get(case_key(scan))
            if scan_label is None:
                raise InputError(f"--labels {labels}: no label named like {scan.name} for scan {scan}")
        jobs.append(ScanJob(scan, outdir / f"{name}_mask.nii.gz", outdir / f"{name}_prob.nii.gz" if save_prob else None,
                            scan_label))
    inputs = {p.resolve(): p for job in jobs for p in (job.scan, job.label) if p is not None}
    outputs: dict[Path, Path] = {}
    for job in jobs:
        for out in (job.mask_path, job.prob_path):
            if out is None:
                continue
            resolved = out.resolve()
            if resolved in inputs:
                raise InputError(f"{out}: the output would overwrite the input file {inputs[resolved]}; "
                                 "choose another output folder")
            if resolved in outputs:
                raise InputError(f"{outputs[resolved]} and {job.scan}: two scans with the same name would write "
                                 f"to the same output {out}")
            outputs[resolved] = job.scan
    return jobs


def _print_info(model: Path) -> None:
    """Print the model's contract and every metadata key."""
    contract, meta = read_contract(model)
    say(f"model: {model}")
    say(f"kind: {'two-stage cascade' if contract.is_cascade else 'single stage'}")
    for stage in contract.stages:
        say(
            f"stage {stage.name}: spacing {' x '.join(f'{s:g}' for s in stage.spacing)} mm, "
            f"patch {' x '.join(map(str, stage.patch_size))}, divisor {stage.divisor}, threshold {stage.threshold:g}, "
            f"crop margin {stage.crop_margin_mm:g} mm, input {stage.input_name!r}, outputs {stage.prob_name!r} "
            f"(probabilities), {stage.mask_name!r} (mask)")
    for key in ("orientation", "normalization", "largest_component", "plausibility", "max_foreground_fraction",
                "bytes_per_voxel",
                "format_version", "score_calibration"):
        say(f"{key}: {getattr(contract, key)}")
    for key, value in sorted(contract.info.items()):
        say(f"info.{key}: {value}")
    say("metadata:")
    for key in sorted(meta):
        value = meta[key]
        if key == CONTRACT_KEY:
            say(f"  {key}:")
            for line in value.splitlines():
                say(f"    {line}")
        else:
            say(f"  {key}: {value}")


def _save_overlay(job: ScanJob, volume: Volume, mask: np.ndarray, reference: Volume | None,
                  report: QCReport | None = None) -> Path:
    """OUTDIR/X_overlay.png: three orthogonal slices in RAS orientation, the QC verdict in the title."""
    canonical = to_canonical(volume)
    flip = lambda data: to_canonical(Volume(data, volume.affine)).data  # noqa: E731
    label = flip(reference.data) if reference is not None else None
    path = job.mask_path.with_name(scan_name(job.scan) + "_overlay.png")
    title = scan_name(job.scan)
    if report is not None:
        title += f"   QC {report.verdict.upper()}" + (f", est. Dice {report.dice_text()}"
                                                     if report.estimated_dice is not None else "")
        reasons = "; ".join(report.reasons)
        title += f": {reasons[:117]}..." if len(reasons) > 120 else f": {reasons}" if reasons else ""
    return save_overlay(path, canonical.data, flip(mask), label, title)


def _segment_one(segmenter: Segmenter, job: ScanJob, save_prob: bool, benchmark: int | None,
                 overwrite: bool, overlay: bool = False) -> ScanResult:
    """Load, check, segment (benchmark: repeatedly), write and score one scan."""
    start = time.perf_counter()
    volume = load_volume(job.scan)
    read_seconds = time.perf_counter() - start
    reference: Volume | None = None
    if job.label is not None:
        reference = load_mask(job.label)
        if not same_grid(volume, reference):
            raise InputError(f"label {job.label} (shape {reference.shape}) is not on the grid of scan {job.scan} "
                             f"(shape {volume.shape}): shapes or affines differ")
    runs: list[float] = []
    if benchmark:
        segmenter.segment(volume, keep_prob=save_prob)  # warm-up, untimed
        for _ in range(benchmark):
            t0 = time.perf_counter()
            prediction = segmenter.segment(volume, keep_prob=save_prob)
            runs.append(time.perf_counter() - t0)
    else:
        prediction = segmenter.segment(volume, keep_prob=save_prob)
    write_start = time.perf_counter()
    written: list[Path] = []
    try:
        # The mask goes last: its presence is what marks a scan as done for the next run.
        if save_prob and job.prob_path is not None and prediction.prob is not None:
            written.append(save_volume(prediction.prob.astype(np.float32), volume.affine, job.prob_path,
                                       overwrite=overwrite))
        write_seconds = time.perf_counter() - write_start
        if overlay:
            written.append(_save_overlay(job, volume, prediction.mask, reference, prediction.report))
        write_start = time.perf_counter()
        written.append(save_volume(prediction.mask.astype(np.uint8), volume.affine, job.mask_path,
                                   overwrite=overwrite))
        write_seconds += time.perf_counter() - write_start
    except BaseException:
        for path in written:  # no partial set of outputs for a scan that failed
            path.unlink(missing_ok=True)
        raise
    timings = {"read": read_seconds, **prediction.timings, "write": write_seconds}
    metrics = None
    if reference is not None:
        metrics = compute_metrics(prediction.mask, reference.data, volume.spacing).to_dict()
    seconds = time.perf_counter() - start
    return ScanResult(job, "ok" if prediction.qc is None else "flagged", seconds, prediction.device,
                      prediction.volume_ml, prediction.qc, prediction.report, metrics, timings, runs)


def _results_table(results: list[ScanResult], model: Path, device: str, with_metrics: bool,
                   benchmark: int | None) -> Table:
    """One row per scan that was segmented or skipped."""
    table = Table(title=f"heartseg-infer  model {model.name}  device {device}", title_justify="left")
    table.add_column("scan")
    table.add_column("seconds", justify="right")
    if benchmark:
        table.add_column(f"median s ({benchmark} runs)", justify="right")
        table.add_column("p95 s", justify="right")
    table.add_column("device")
    table.add_column("LA volume mL", justify="right")
    table.add_column("QC")
    with_estimate = any(r.report is not None and r.report.estimated_dice is not None for r in results)
    if with_estimate:
        table.add_column("est. Dice [interval]", justify="right")
    if with_metrics:
        table.add_column("Dice", justify="right")
        table.add_column("HD95 mm", justify="right")
    for result in results:
        name = scan_name(result.job.scan)
        if result.status == "skipped":
            row = [name, "-"] + (["-", "-"] if benchmark else []) + ["-", "-"]
            row += [Text("skipped: output exists", style="dim")] + (["-"] if with_estimate else [])
            row += ["-", "-"] if with_metrics else []
            table.add_row(*row)
            continue
        qc = _verdict_text(result.report)
        row = [name, fmt(result.seconds, 2)]
        if benchmark:
            row += [fmt(float(np.median(result.runs)), 3), fmt(float(np.percentile(result.runs, 95)), 3)]
        row += [result.device or "-", fmt(result.volume_ml, 1), qc]
        if with_estimate:
            row += [result.report.dice_text() if result.report is not None else "n/a"]
        if with_metrics:
            metrics = result.metrics or {}
            row += [fmt(metrics.get("dice"), 3), fmt(metrics.get("hd95_mm"), 2)]
        table.add_row(*row)
    return table


VERDICT_STYLES = {"ok": "green", "review": "bold yellow", "fail": "bold red"}


def _verdict_text(report: QCReport | None) -> Text:
    """The QC cell: the verdict in its colour, with its reasons."""
    if report is None:
        return Text("n/a", style="dim")
    return Text(report.summary(), style=VERDICT_STYLES.get(report.verdict, ""))


QC_CSV_COLUMNS = ("name", "status", "volume_ml", "verdict", "estimated_dice", "dice_low", "dice_high", "score",
                  "reasons", "dice")


def _qc_csv(results: list[ScanResult]) -> str:
    """One CSV row per segmented scan: volume, verdict, reasons, estimated Dice (and true Dice with labels)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(QC_CSV_COLUMNS)
    for result in results:
        if result.report is None:
            continue
        report = result.report
        low, high = report.dice_interval if report.dice_interval is not None else (None, None)
        dice = (result.metrics or {}).get("dice")
        writer.writerow([scan_name(result.job.scan), result.status, fmt(result.volume_ml, 2), report.verdict,
                         *("" if v is None else f"{v:.4f}" for v in (report.estimated_dice, low, high, report.score)),
                         "; ".join(report.reasons), "" if dice is None else f"{dice:.4f}"])
    return buffer.getvalue()


HELP = f"""Segment the left atrium in 3D cardiac MRI scans (NIfTI) with a heartseg ONNX model.

SCANS are NIfTI files (.nii / .nii.gz) or folders; a folder means every *.nii / *.nii.gz directly
inside it, sorted by name (heartseg outputs named *_mask / *_prob are skipped). Each scan X.nii.gz
gives OUTDIR/X_mask.nii.gz (uint8, 1 = left atrium) on exactly the scan's grid (same shape and
affine), and with --save-prob OUTDIR/X_prob.nii.gz (float32 probabilities in [0, 1]). Files are
written atomically. Existing outputs are skipped unless --overwrite; an output that would replace
an input file is refused.

Preprocessing, spacing, patch size, threshold and postprocessing all come from the contract stored
in the model file; nothing here can change them (see --info).

A table row per scan shows the time, device, left-atrium volume in mL and the QC verdict with its
reasons: "ok"; "review" (look at this mask: volume, extents, fragments, a mask cut by the box or the
scan edge, a voxel size or field of view the model never trained on, or a low estimated Dice); or
"fail" (empty, all foreground, far outside the plausible volume, or a very low estimated Dice).
Models with a score calibration also show the estimated Dice and its interval. Masks under review
or failed are still written. With --label/--labels it also shows Dice and HD95 (mm) against the
label.

A scan that fails is reported as "error: name: message" and the remaining scans are still
processed.

{EXIT_CODES_HELP}
"""


@app.command(help=HELP, no_args_is_help=True)
@guarded
def infer(
    scans: Optional[list[Path]] = typer.Argument(
        None, metavar="SCANS", help="NIfTI scans (.nii/.nii.gz) or folders of them.", show_default=False),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", metavar="OUTDIR",
        help="Output folder, created if missing (required unless --info). [default: none]", show_default=False),
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", metavar="M.onnx",
        help="heartseg ONNX model. [default: the model shipped with the package, heartseg/models/heartseg-la.onnx]",
        show_default=False),
    device: Device = typer.Option(
        Device.auto, "--device", help="auto: CUDA when ONNX Runtime offers it, else CPU; cuda: fail without it."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, metavar="N",
        help="CPU threads for ONNX Runtime. [default: ONNX Runtime's choice, all cores]", show_default=False),
    memory_limit_mb: Optional[float] = typer.Option(
        None, "--memory-limit-mb", metavar="MB",
        help="Switch to sliding-window inference when the whole volume would need more than MB megabytes "
             "(estimated from the model's bytes per voxel). [default: no limit, whole volume]",
        show_default=False),
    save_prob: bool = typer.Option(False, "--save-prob", help="Also write X_prob.nii.gz (probabilities)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs instead of skipping the scan."),
    label: Optional[Path] = typer.Option(
        None, "--label", metavar="L.nii.gz", help="Reference label of the one scan given: report Dice and HD95. "
        "[default: none]", show_default=False),
    labels: Optional[Path] = typer.Option(
        None, "--labels", metavar="DIR", help="Folder of reference labels, paired with scans by file name "
        "(X.nii.gz with DIR/X.nii.gz). [default: none]", show_default=False),
    overlay: bool = typer.Option(False, "--overlay", help="Also write X_overlay.png: three orthogonal slices with "
                                 "the mask in red (and the label in green). Needs matplotlib (heartseg[viz])."),
    info: bool = typer.Option(False, "--info", help="Print the model's contract and all its metadata, then exit 0."),
    benchmark: Optional[int] = typer.Option(
        None, "--benchmark", min=1, metavar="N",
        help="Segment each scan N more times after one warm-up run and report the median and 95th percentile "
             "seconds. [default: off]", show_default=False),
    json_path: Optional[Path] = typer.Option(
        None, "--json", metavar="FILE", help="Also write a JSON report of every scan. [default: none]",
        show_default=False),
    csv_path: Optional[Path] = typer.Option(
        None, "--csv", metavar="FILE", help="Also write one CSV row per scan: volume, QC verdict, reasons, "
        "estimated Dice and interval (and Dice with labels). [default: none]", show_default=False),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average the probabilities of the scan "
                             "and its three mirrored copies (4 inferences per scan). [default: off]"),
) -> None:
    model_path = model if model is not None else default_model_path()
    if info:
        _print_info(model_path)
        raise typer.Exit(0)
    if output is None:
        raise InputError("missing the output folder: -o OUTDIR")
    if not scans:
        raise InputError("no scans given: heartseg-infer SCANS... -o OUTDIR")
    check_report_path(json_path, "--json")
    check_report_path(csv_path, "--csv")
    if overlay:
        require_pyplot()
    found = discover_scans(scans)
    jobs = _plan(found, output, save_prob, label, labels)
    segmenter = Segmenter(model_path, device=device.value, threads=threads, memory_limit_mb=memory_limit_mb, tta=tta)
    ensure_output_folder(output)

    results: list[ScanResult] = []
    with progress_bar(len(jobs), enabled=len(jobs) > 1) as (progress, task):
        for job in jobs:
            progress.update(task, description=scan_name(job.scan))
            existing = [p for p in (job.mask_path, job.prob_path) if p is not None and p.exists()]
            if existing and not overwrite:
                results.append(ScanResult(job, "skipped"))
                say(f"{job.scan.name}: skipped, {existing[0]} exists (use --overwrite to replace it)")
            else:
                try:
                    results.append(_segment_one(segmenter, job, save_prob, benchmark, overwrite, overlay))
                except HeartsegError as exc:
                    error(_describe(job.scan, exc))
                    results.append(ScanResult(job, "failed", error=str(exc), exit_code=exc.exit_code))
                except Exception as exc:  # a bad scan must not stop the batch
                    error(_describe(job.scan, exc))
                    results.append(ScanResult(job, "failed", error=f"{type(exc).__name__}: {exc}",
                                              exit_code=EXIT_FAILED))
            progress.advance(task)

    shown = [r for r in results if r.status != "failed"]
    if shown:
        out_console().print(_results_table(shown, segmenter.session.path, segmenter.device,
                                     any(r.job.label for r in results), benchmark))
    failed = [r for r in results if r.status == "failed"]
    flagged = [r for r in results if r.status == "flagged"]
    if benchmark and any(r.runs for r in results):
        runs = [t for r in results for t in r.runs]
        say(f"benchmark: {len(runs)} timed runs, median {np.median(runs):.3f} s, "
            f"p95 {np.percentile(runs, 95):.3f} s per scan")
    if len(results) > 1 and failed:
        error(f"{len(failed)} of {len(results)} scans failed")
    for result in flagged:
        warn(f"{scan_name(result.job.scan)}: flagged by QC ({result.qc}); the mask was written, check it")
    code = final_exit_code([r.exit_code for r in failed], bool(flagged))
    if json_path is not None:
        write_json(json_path, {
            "model": str(segmenter.session.path),
            "device": segmenter.device,
            "exit_code": code,
            "scans": [r.to_dict() for r in results],
        })
    if csv_path is not None:
        write_text_atomic(csv_path, _qc_csv(results))
    raise typer.Exit(code)


def main() -> None:
    """Entry point of heartseg-infer."""
    app(prog_name="heartseg-infer")


if __name__ == "__main__":
    main()
