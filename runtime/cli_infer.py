"""heartseg-infer: segment the left atrium in 3D cardiac MRI (NIfTI, DICOM, NRRD, MetaImage) with a heartseg model."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from .cli_common import (
    DEVICE_HELP,
    EXIT_CODES_HELP,
    Device,
    check_report_path,
    ensure_output_folder,
    error,
    final_exit_code,
    fmt,
    guarded,
    new_app,
    out_console,
    progress_bar,
    report_target,
    stdout_for_reports,
    say,
    version_option,
    warn,
    write_json,
    write_report,
)
from .cohort import MergedReport, expand_inputs, merge_records, parse_shard, select_shard
from .contract import CONTRACT_KEY, VARIANT_KEY, VARIANT_METRICS_KEY, ModelContract
from .errors import InputError
from .formats import discover_sources
from .model_digest import DIGEST_KEY
from .outputs import check_outputs
from .pipeline import (
    BUSY,
    RECORDS_FOLDER,
    OutputOptions,
    ScanJob,
    ScanResult,
    check_options,
    output_folders,
    plan_jobs,
    record_path,
    run_jobs,
)
from .segmenter import VARIANTS, Segmenter, resolve_model
from .session import model_identity, read_contract
from .statistics import AtriumStatistics

app = new_app()


def _json_or_none(text: str | None):
    """Parsed JSON, or None for text that is absent or not JSON."""
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _variant_metrics(model: Path, meta: dict[str, str], variant: str) -> dict | None:
    """A variant's accuracy measured at export: from its own metadata, else from the variants report beside it."""
    recorded = _json_or_none(meta.get(VARIANT_METRICS_KEY))
    if isinstance(recorded, dict):
        return recorded
    report = model.with_name(model.name.replace(f".{variant}.onnx", ".variants.json"))
    try:
        entries = json.loads(report.read_text()) if report != model else None
    except (OSError, ValueError):
        return None
    found = [e for e in entries if isinstance(e, dict) and e.get("variant") == variant] \
        if isinstance(entries, list) else []
    return found[0] if found else None


def _dice(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def _variant_accuracy(metrics: dict | None) -> str:
    """The line of a variant's held-out Dice beside the model it was made from."""
    if metrics is None:
        return "held-out Dice: not recorded"
    drop = metrics.get("max_dice_drop")
    allowed = f"the {drop:g} allowed" if isinstance(drop, (int, float)) else "the export's tolerance"
    verdict = f"within {allowed}" if metrics.get("within_tolerance") else f"drops more than {allowed}"
    change = metrics.get("dice_change")
    change = f"{change:+.4f}" if isinstance(change, (int, float)) else "?"
    return (f"held-out Dice {_dice(metrics.get('dice_variant'))} on {len(metrics.get('cases') or [])} cases "
            f"(fp32 {_dice(metrics.get('dice_fp32'))}, change {change}: {verdict})")


def _model_accuracy(meta: dict[str, str]) -> str:
    """The line of a model's own held-out Dice, from its cross-validation metrics."""
    cv = _json_or_none(meta.get("heartseg.cv_metrics"))
    mean = cv.get("mean") if isinstance(cv, dict) else None
    if not isinstance(mean, dict) or "dice" not in mean:
        return "held-out Dice: not recorded"
    return f"held-out Dice {_dice(mean['dice'])} on {len(cv.get('val_cases') or [])} cases (fold {cv.get('fold')})"


def _identity(model: Path, contract: ModelContract, meta: dict[str, str]) -> list[str]:
    """Which model a file is: its variant, its own held-out accuracy and its weights digest."""
    variant = meta.get(VARIANT_KEY)
    if variant is not None:
        lines = [f"variant: {variant} (converted from the fp32 model: heartseg.cv_metrics and "
                 "heartseg.threshold_calibration below were measured on that model)",
                 _variant_accuracy(_variant_metrics(model, meta, variant))]
    else:
        members = contract.info.get("members", "1")
        kind = f"ensemble of {members} members" if members.isdigit() and int(members) > 1 else "fp32"
        lines = [f"variant: {kind}", _model_accuracy(meta)]
    digest = meta.get(DIGEST_KEY)
    lines.append(f"weights: SHA-256 {digest} (of the networks, weights and contract, checked when the model "
                 "opens)" if digest else
                 "weights: no digest recorded (exported by an older heartseg): altered weights go undetected")
    return lines


def _print_info(model: Path) -> None:
    """Print which model this is (file, variant, own held-out accuracy, weights digest), its contract and every
    metadata key."""
    contract, meta = read_contract(model)
    say(f"model: {model}")
    for line in _identity(model, contract, meta):
        say(line)
    say(f"kind: {'two-stage cascade' if contract.is_cascade else 'single stage'}")
    for stage in contract.stages:
        say(
            f"stage {stage.name}: spacing {' x '.join(f'{s:g}' for s in stage.spacing)} mm, "
            f"patch {' x '.join(map(str, stage.patch_size))}, divisor {stage.divisor}, threshold {stage.threshold:g}, "
            f"crop margin {stage.crop_margin_mm:g} mm ({stage.context} up to the patch), input {stage.input_name!r}, "
            f"outputs {stage.prob_name!r} (probabilities), {stage.mask_name!r} (mask)")
    for key in ("orientation", "normalization", "largest_component", "plausibility", "max_foreground_fraction",
                "bytes_per_voxel", "score_calibration", "tta_score_calibration", "format_version"):
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


STATISTICS_COLUMNS = tuple(AtriumStatistics.__dataclass_fields__)


class OutputFormat(str, Enum):
    """The mask's file format."""

    nifti = "nifti"
    dicom_seg = "dicom-seg"


class MeshFormat(str, Enum):
    """The surface mesh's file format."""

    stl = "stl"
    vtk = "vtk"


class MeshSpace(str, Enum):
    """The coordinates of the mesh's vertices."""

    lps = "lps"
    ras = "ras"


def _results_table(results: list[ScanResult], model: Path, device: str, with_metrics: bool,
                   benchmark: int | None, with_statistics: bool) -> Table:
    """One row per scan that was segmented or skipped (names shown as text, never as markup)."""
    table = Table(title=Text(f"heartseg-infer  model {model.name}  device {device}"), title_justify="left")
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
    if with_statistics:
        for name in ("area cm2", "sphericity", "AP mm", "SI mm", "ML mm"):
            table.add_column(name, justify="right")
    extra = (1 if with_estimate else 0) + (2 if with_metrics else 0) + (5 if with_statistics else 0)
    for result in results:
        name = Text(result.job.name)
        if result.status == "skipped":
            row = [name, "-"] + (["-", "-"] if benchmark else []) + ["-", "-"]
            row += [Text(f"skipped: {result.reason or 'output exists'}", style="dim")] + ["-"] * extra
            table.add_row(*row)
            continue
        qc = _verdict_text(result)
        row = [name, fmt(result.seconds, 2)]
        if benchmark:
            row += [fmt(float(np.median(result.runs)), 3), fmt(float(np.percentile(result.runs, 95)), 3)]
        row += [result.device or "-", fmt(result.volume_ml, 1), qc]
        if with_estimate:
            row += [result.report.dice_text() if result.report is not None else "n/a"]
        if with_metrics:
            metrics = result.metrics or {}
            row += [fmt(metrics.get("dice"), 3), fmt(metrics.get("hd95_mm"), 2)]
        if with_statistics:
            stats = result.statistics or {}
            row += [fmt(stats.get("surface_area_cm2"), 1), fmt(stats.get("sphericity"), 3),
                    fmt(stats.get("ap_diameter_mm"), 1), fmt(stats.get("si_diameter_mm"), 1),
                    fmt(stats.get("ml_diameter_mm"), 1)]
        table.add_row(*row)
    return table


VERDICT_STYLES = {"ok": "green", "review": "bold yellow", "fail": "bold red"}
QC_COLUMNS = ("verdict", "estimated_dice", "dice_low", "dice_high", "qc_score", "dice")


def _verdict_text(result: ScanResult) -> Text:
    """The QC cell: the verdict in its colour, with its reasons."""
    report = result.report
    if report is None:
        return Text(f"FLAG: {result.qc}" if result.qc else "ok", style="bold red" if result.qc else "green")
    return Text(report.summary(), style=VERDICT_STYLES.get(report.verdict, ""))


def _qc_cells(result: ScanResult) -> list[str]:
    """The QC columns of the cohort CSV: verdict, estimated Dice and interval, score, and the true Dice with labels."""
    report = result.report
    if report is None:
        return [""] * len(QC_COLUMNS)
    low, high = report.dice_interval if report.dice_interval is not None else (None, None)
    dice = (result.metrics or {}).get("dice")
    return [report.verdict, *("" if v is None else f"{v:.4f}" for v in (report.estimated_dice, low, high, report.score,
                                                                         dice))]


def cohort_csv(results: list[ScanResult]) -> str:
    """One row per scan: where it came from, its mask, QC (verdict, reasons, estimated Dice), its statistics, and why
    it was skipped or failed."""
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(["name", "scan", "series", "status", "mask", "qc", *STATISTICS_COLUMNS, *QC_COLUMNS, "reason"])
    for result in results:
        record = result.to_dict()
        stats = result.statistics or {}
        out.writerow([record["name"], record["scan"], record["series"] or "", record["status"], record["mask"] or "",
                      record["qc"] or "", *("" if stats.get(k) is None else repr(stats[k]) for k in STATISTICS_COLUMNS),
                      *_qc_cells(result), result.reason or result.error or ""])
    return buffer.getvalue()


HELP = f"""Segment the left atrium in 3D cardiac MRI scans with a heartseg ONNX model.

SCANS are scan files (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, MetaImage .mha/.mhd), DICOM series (a
folder of slices, or a .zip of one), or folders of scan files (every scan file directly inside,
sorted by name; heartseg outputs named *_mask / *_prob are skipped). A folder or zip holding several
DICOM series lists them: choose one with --series (its SeriesNumber or SeriesInstanceUID), or
--series all for each in turn. Reading DICOM needs heartseg[dicom], NRRD heartseg[nrrd], MetaImage
heartseg[itk].

Outputs: scan X gives X_mask.nii.gz (uint8, 1 = left atrium) on exactly the scan's grid (same shape
and affine), or with --output-format dicom-seg (DICOM input only) X_seg.dcm, a DICOM SEG that
references the source series (opens in 3D Slicer and OHIF). They go into -o OUTDIR, or to -o's file
name when it ends in .nii/.nii.gz (.dcm for DICOM SEG) and there is one scan, or without -o beside
the input (beside a DICOM folder or zip, not inside it). --save-prob adds X_prob.nii.gz (float32
probabilities), --overlay X_overlay.png, --mesh X_mesh.stl or X_mesh.vtk: the atrium's surface in
scanner coordinates (LPS unless --mesh-space ras). Files are written atomically, the mask last; a
scan whose mask exists is skipped unless --overwrite (the table, --json and --csv say why), while
outputs without their mask (left by a stopped run) are replaced; an output that would replace an
input file is refused. A scan that another run is writing into the same folder is left to it
(skipped). SIGTERM, like Ctrl-C, removes the outputs of the scan being written (exit 143).

--model takes a file or the name of a shipped variant: fp32 (the default), fp16, int8 or ensemble
(the fold ensemble, also --ensemble).
Preprocessing, spacing, patch size, threshold and postprocessing all come from the contract stored
in the model file; nothing here can change them (see --info).

A table row per scan shows the time, device, left-atrium volume in mL and the QC verdict with its
reasons: "ok"; "review" (look at this mask: volume, extents, fragments, a mask cut by the box or the
scan edge, a voxel size or field of view the model never trained on, or a low estimated Dice); or
"fail" (empty, all foreground, far outside the plausible volume, or a very low estimated Dice).
Models with a score calibration also show the estimated Dice and its interval; the verdict is in
--json, --csv and the overlay's title too. Masks under review or failed are still written, and
listed after the table in the order to check them: fails, then reviews, lowest estimated Dice
first. With --label/--labels it also shows Dice and HD95 (mm) against the label; with
--statistics the atrium's surface area (cm2), sphericity and maximal anteroposterior, superoinferior
and mediolateral diameters (mm, along the axes of the scan's affine). --json FILE and --csv FILE
(a cohort table of the statistics) write reports; FILE '-' is stdout.

A scan that fails is reported as "error: name: message" and the remaining scans are still
processed.

Cohorts: SCANS may also be quoted globs ('scans/**/*.nii.gz') and --scan-list FILE adds one path a
line. --resume, --shard and --ray keep a record per scan (OUT/{RECORDS_FOLDER}/, written atomically
after the scan's outputs): a scan with a record is finished and is reported from it (by any later
run), never segmented twice. A record holds only while it matches the scan (size, modification time
and a digest of its header, and of a data file it names; a DICOM zip's member list, a DICOM folder's
file list), the model file the run opened (its digest; --tta) and the mask it wrote: otherwise
--resume segments the scan again, as it does scans whose mask exists without a record (left by an
interrupted run). A failed scan is tried again. --shard K/N segments only the scans that shard K of N
owns (by a hash of the scan's name: every task of a SLURM array or Kubernetes indexed job computes
the same split alone); --merge-reports, given the same SCANS and -o,
gathers every shard's records into one report (table, --json, --csv, exit code) and exits 1 when a
scan has no record or its record no longer matches its scan or its mask; given the shards' --model
(and --tta), also when a record was made with another model, and without --model when the records
do not agree on one. --ray
auto|ADDRESS spreads the scans over a Ray cluster (heartseg[ray]): one worker per CPU (--workers),
each with one ONNX Runtime session; outputs, records, report and exit codes are those of a local
run. A worker that dies is restarted and its scan retried. The scans, the model and OUT must be
on a file system every node sees.

{EXIT_CODES_HELP}
"""


@app.command(help=HELP, no_args_is_help=True)
@guarded
def infer(
    scans: Optional[list[Path]] = typer.Argument(
        None, metavar="SCANS", help="Scan files, DICOM folders or zips, or folders of scan files.",
        show_default=False),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", metavar="OUT",
        help="Output folder (created if missing), or the mask's file name for a single scan. "
             "[default: beside each input]", show_default=False),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", metavar="M.onnx|fp32|fp16|int8|ensemble",
        help="heartseg ONNX model file, or a shipped variant's name (ensemble: the fold ensemble, see --ensemble). "
             "[default: fp32, the model shipped with the package]", show_default=False),
    device: Device = typer.Option(Device.auto, "--device", help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, metavar="N",
        help="CPU threads for ONNX Runtime. [default: ONNX Runtime's choice, all cores]", show_default=False),
    memory_limit_mb: Optional[float] = typer.Option(
        None, "--memory-limit-mb", metavar="MB",
        help="Memory budget of the whole process in megabytes: each scan's needs (read, resampling, network, "
             "postprocessing) are estimated from its header before any voxel is read; the network runs on sliding "
             "windows when the whole volume does not fit, and a scan that does not fit at all is refused (exit 2). "
             "[default: 80 % of physical memory]",
        show_default=False),
    output_format: OutputFormat = typer.Option(
        OutputFormat.nifti, "--output-format", help="The mask's format: NIfTI, or DICOM SEG (DICOM input only)."),
    series: Optional[str] = typer.Option(
        None, "--series", metavar="NUMBER|UID|all",
        help="The DICOM series to segment when a folder or zip holds several, or 'all'. [default: the only one]",
        show_default=False),
    save_prob: bool = typer.Option(False, "--save-prob", help="Also write X_prob.nii.gz (probabilities)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs instead of skipping the scan."),
    label: Optional[Path] = typer.Option(
        None, "--label", metavar="L.nii.gz", help="Reference label of the one scan given: report Dice and HD95. "
        "[default: none]", show_default=False),
    labels: Optional[Path] = typer.Option(
        None, "--labels", metavar="DIR", help="Folder of reference labels, paired with scans by name "
        "(X.nii.gz with DIR/X.nii.gz; nnU-Net's X_0000.nii.gz with DIR/X.nii.gz). [default: none]",
        show_default=False),
    overlay: bool = typer.Option(False, "--overlay", help="Also write X_overlay.png: three orthogonal slices with "
                                 "the mask in red (and the label in green). Needs matplotlib (heartseg[viz])."),
    statistics: bool = typer.Option(
        False, "--statistics", help="Also measure the atrium: surface area, sphericity, maximal AP/SI/ML diameters "
        "(table, JSON, --csv). Needs scikit-image (heartseg[mesh])."),
    csv_path: Optional[Path] = typer.Option(
        None, "--csv", metavar="FILE", help="Write a cohort CSV, one row per scan with its QC verdict, estimated "
        "Dice and statistics (implies --statistics); '-' is stdout. [default: none]", show_default=False),
    ensemble: bool = typer.Option(
        False, "--ensemble", help="Segment with the shipped fold ensemble (heartseg-la.ensemble.onnx, the same as "
        "--model ensemble): the mean probability of its member networks, with its own threshold and QC calibration "
        "(each member's network time; measured cost and gain in the README). [default: off]"),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average the probabilities of the scan "
                             "and its three mirrored copies (4 inferences per scan; the copies count in the memory "
                             "budget). [default: off]"),
    mesh: Optional[MeshFormat] = typer.Option(
        None, "--mesh", help="Also write the atrium's surface, X_mesh.stl or X_mesh.vtk (marching cubes, in "
        "scanner coordinates). Needs scikit-image (heartseg[mesh]). [default: none]", show_default=False),
    mesh_space: MeshSpace = typer.Option(
        MeshSpace.lps, "--mesh-space", help="The mesh's coordinates: LPS (DICOM patient coordinates, what 3D Slicer "
        "assumes) or RAS (NIfTI world coordinates)."),
    info: bool = typer.Option(False, "--info", help="Print the model's contract and all its metadata, then exit 0."),
    benchmark: Optional[int] = typer.Option(
        None, "--benchmark", min=1, metavar="N",
        help="Segment each scan N more times after one warm-up run and report the median and 95th percentile "
             "seconds. [default: off]", show_default=False),
    json_path: Optional[Path] = typer.Option(
        None, "--json", metavar="FILE", help="Also write a JSON report of every scan; '-' is stdout. "
        "[default: none]", show_default=False),
    scan_list: Optional[Path] = typer.Option(
        None, "--scan-list", metavar="FILE", help="A text file of scans, one path a line (relative to the file; "
        "'#' comments), added to SCANS. [default: none]", show_default=False),
    resume: bool = typer.Option(
        False, "--resume", help="Keep a record per scan; skip the scans a record says are finished and redo the "
        "others, replacing what an interrupted run left."),
    shard: Optional[str] = typer.Option(
        None, "--shard", metavar="K/N", help="Segment only shard K of N (K from 0 to N-1, e.g. "
        "$SLURM_ARRAY_TASK_ID/N), chosen by a hash of each scan's name. [default: every scan]", show_default=False),
    merge_reports: bool = typer.Option(
        False, "--merge-reports", help="Segment nothing: gather the records of every scan of SCANS (all shards) "
        "into one report; exit 1 when a scan has none, or one that no longer holds. Give it the shards' --model "
        "and --tta to check the records against them; without --model the records must agree on one model."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray", metavar="auto|ADDRESS", help="Segment on a Ray cluster (heartseg[ray]): auto is the running "
        "cluster or else a local one; ADDRESS is HOST:PORT or ray://HOST:PORT. [default: this process]",
        show_default=False),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, metavar="N", help="Ray workers, each one ONNX Runtime session using --threads "
        "threads (default 1). [default: the cluster's CPUs / threads]", show_default=False),
    version: bool = version_option(),
) -> None:
    if ensemble:
        if model is not None:
            raise InputError("--ensemble is the shipped fold ensemble: give it without --model (an ensemble of your "
                             "own is a model file: --model ENSEMBLE.onnx)")
        model = "ensemble"
    model_path = resolve_model(model)
    if info:
        _print_info(model_path)
        raise typer.Exit(0)
    if not scans and scan_list is None:
        raise InputError("no scans given: heartseg-infer SCANS... [-o OUT]")
    if report_target(json_path) and report_target(csv_path):
        raise InputError("--json - and --csv - both ask for stdout; give one of them a file name")
    check_report_path(json_path, "--json")
    check_report_path(csv_path, "--csv")
    the_shard = parse_shard(shard) if shard is not None else None
    if merge_reports and (ray_address or the_shard or benchmark):
        raise InputError("--merge-reports only reads records: give it without --ray, --shard and --benchmark")
    if ray_address is not None and benchmark:
        raise InputError("--benchmark times scans in this process: give it without --ray")
    if workers is not None and ray_address is None:
        raise InputError("--workers sets the number of Ray workers: give it with --ray")
    options = OutputOptions(output_format.value, save_prob, overlay, statistics or csv_path is not None,
                            mesh.value if mesh else None, mesh_space.value, overwrite,
                            records=bool(resume or the_shard or ray_address), resume=resume,
                            shard=str(the_shard) if the_shard else None)
    check_options(options)
    if ray_address is not None:
        from .distributed import require_ray

        require_ray()
    sources = discover_sources(expand_inputs(scans or [], scan_list), series)
    # Every shard plans every scan, so outputs that would collide across shards are refused in each.
    jobs = plan_jobs(sources, output, options, label, labels)
    check_outputs([model_path, *(p for job in jobs for p in (job.source.path, job.label))],
                  [("--json", json_path), ("--csv", csv_path), *(("output", p) for job in jobs for p in job.outputs())])
    _check_reports_outside_records(jobs, [("--json", json_path), ("--csv", csv_path)])
    if merge_reports:
        identity = model_identity(model_path, tta) if model is not None else None
        with stdout_for_reports(json_path, csv_path):
            code = _merge(jobs, model_path, options, json_path, csv_path, identity)
        raise typer.Exit(code)
    jobs = select_shard(jobs, the_shard)
    if not jobs:
        say(f"shard {the_shard}: none of the {len(sources)} scans falls into this shard")
        raise typer.Exit(0)
    if ray_address is not None:
        if tta:
            raise InputError("--tta is not available with --ray: run the cohort without test-time flips")
        from .distributed import RayConfig, run_jobs_on_ray

        read_contract(model_path)  # a bad model fails here, once, not on every worker
        config = RayConfig(ray_address, workers, threads or 1, device.provider, memory_limit_mb)
        model_name = model if model in VARIANTS or model is None else str(model_path.absolute())

        def runner(on_start: Callable[[ScanJob], None], on_done: Callable[[ScanResult], None]) -> list[ScanResult]:
            return run_jobs_on_ray(model_name, jobs, options, config, on_done)

        where, device_name = model_path, f"ray ({ray_address})"
    else:
        segmenter = Segmenter(model_path, device=device.provider, threads=threads, memory_limit_mb=memory_limit_mb,
                              tta=tta)

        def runner(on_start: Callable[[ScanJob], None], on_done: Callable[[ScanResult], None]) -> list[ScanResult]:
            return run_jobs(segmenter, jobs, options, benchmark, on_start=on_start, on_done=on_done)

        where, device_name = segmenter.session.path, segmenter.device
    for folder in output_folders(jobs):
        ensure_output_folder(folder)
    with stdout_for_reports(json_path, csv_path):
        code = _run(runner, jobs, where, device_name, options, benchmark, json_path, csv_path)
    raise typer.Exit(code)


def _run(runner: Callable[..., list[ScanResult]], jobs: list[ScanJob], model: Path, device: str,
         options: OutputOptions, benchmark: int | None, json_path: Path | None, csv_path: Path | None) -> int:
    """Segment every job with a progress bar, print the table and messages, write the reports; the exit code."""
    with progress_bar(len(jobs), enabled=len(jobs) > 1) as (progress, task):
        def done(result: ScanResult) -> None:
            if result.status == "failed":
                error(result.error or "failed")
            elif result.status == "skipped":
                say(f"{result.job.name}: skipped, {result.reason or 'output exists'}")
            progress.advance(task)

        results = runner(lambda job: progress.update(task, description=job.name), done)
    return _report(results, model, device, options, benchmark, json_path, csv_path)


def in_check_order(results: list[ScanResult]) -> list[ScanResult]:
    """The results in the order to check their masks (QCReport.check_order: fails, then reviews, each lowest
    estimated Dice first); a result without a QC report first."""
    return sorted(results, key=lambda r: r.report.check_order if r.report is not None else (-1, 0.0))


def _report(results: list[ScanResult], model: Path, device: str, options: OutputOptions, benchmark: int | None,
            json_path: Path | None, csv_path: Path | None, extra: dict | None = None, code: int | None = None) -> int:
    """Print the table and messages and write the reports of a run's results; the exit code."""
    resumed = sum(r.resumed for r in results)
    if resumed:
        say(f"{resumed} of {len(results)} scans were finished by an earlier run: reported from their records")
    shown = [r for r in results if r.status != "failed"]
    if shown:
        out_console().print(_results_table(shown, model, device, any(r.job.label for r in results), benchmark,
                                           options.statistics))
    failed = [r for r in results if r.status == "failed"]
    flagged = [r for r in results if r.status == "flagged"]
    if benchmark and any(r.runs for r in results):
        runs = [t for r in results for t in r.runs]
        say(f"benchmark: {len(runs)} timed runs, median {np.median(runs):.3f} s, "
            f"p95 {np.percentile(runs, 95):.3f} s per scan")
    if len(results) > 1 and failed:
        error(f"{len(failed)} of {len(results)} scans failed")
    for result in in_check_order(flagged):
        warn(f"{result.job.name}: flagged by QC ({result.qc}); the mask was written, check it")
    busy = sum(r.status == "skipped" and r.reason == BUSY for r in results)
    if busy:
        warn(f"{busy} {'scan was' if busy == 1 else 'scans were'} left to another run that is writing them; check "
             "them later with --resume or --merge-reports")
    code = final_exit_code([r.exit_code for r in failed] + ([code] if code else []), bool(flagged))
    if csv_path is not None:
        write_report(csv_path, cohort_csv(results))
    if json_path is not None:
        write_json(json_path, {
            "model": str(model),
            "device": device,
            "exit_code": code,
            **(extra or {}),
            "scans": [r.to_dict() for r in results],
        })
    return code


def _merge(jobs: list[ScanJob], model: Path, options: OutputOptions, json_path: Path | None,
           csv_path: Path | None, identity: dict | None = None) -> int:
    """Report every scan from its record, as one run over all shards would have; exit 1 when one has none, or
    when a record no longer matches its scan, its mask or the model (identity; None: the records must agree)."""
    merged: MergedReport = merge_records(jobs, identity)
    devices = sorted({r.device for r in merged.results if r.device})
    for path in merged.stray:
        warn(f"{path}: a record of a scan that is not among SCANS")
    for problem in merged.misassigned:
        error(problem)
    for problem in merged.stale:
        error(f"{problem}; run its shard again with --resume (or give --merge-reports the shards' --model and "
              "--tta)")
    for problem in merged.models:
        error(problem)
    if merged.missing:
        names = ", ".join(job.name for job in merged.missing[:10]) + (", ..." if len(merged.missing) > 10 else "")
        error(f"{len(merged.missing)} of {len(jobs)} scans have no record (not run, still running, or skipped): "
              f"{names}; run their shards again with --resume")
    extra = {"complete": merged.complete, "missing": [str(job.source) for job in merged.missing],
             "problems": merged.misassigned + merged.stale + merged.models}
    for result in merged.results:
        result.resumed = False  # every result of a merge comes from a record; no need to say so per scan
    return _report(merged.results, model, ", ".join(devices) or "-", options, None, json_path, csv_path, extra,
                   code=1 if not merged.complete else None)


def _check_reports_outside_records(jobs: list[ScanJob], reports: list[tuple[str, Path | None]]) -> None:
    """Refuse a report file (--json, --csv) inside a records folder of the outputs: records are the runs' own."""
    folders = {Path(os.path.realpath(record_path(job).parent)) for job in jobs}
    for option, path in reports:
        if path is None or str(path) == "-":
            continue
        where = Path(os.path.realpath(path)).parent  # a link into the records folder is inside it too
        inside = next((f for f in folders if where == f or f in where.parents), None)
        if inside is not None:
            raise InputError(f"{option} {path}: is inside {inside}, the {RECORDS_FOLDER} folder where runs keep their "
                             "records; choose another file")


# 128 + the signal's number, as a shell reports a process that SIGTERM ended.
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised where the run stands so that the scan being written is rolled back as on Ctrl-C.

    A BaseException, like KeyboardInterrupt: a bad scan's `except Exception` must not swallow it.
    """


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the rollback short
    raise Terminated()


def main() -> None:
    """Entry point of heartseg-infer."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app(prog_name="heartseg-infer")
    except Terminated:
        error("terminated by SIGTERM: the outputs of the scan being written were removed; run the same command "
              "again to finish")
        raise SystemExit(EXIT_TERMINATED) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
