"""The per-scan file pipeline every command shares: plan the jobs, read, segment, write atomically, report.

heartseg-infer, heartseg-bench and the Python API all go through process(), so a scan is read,
timed, written and described one way only. Stage seconds: read, preprocess, network, postprocess,
write (and statistics, when asked for).

A scan is finished when its outputs are written (each atomically, the mask last) and then its
record: one small JSON file per scan, RECORDS_FOLDER/<mask file name>.json beside the mask, also
written atomically. run_job() is the one per-scan function of every run, local, --shard or Ray:
it reports a finished scan from its record instead of segmenting it again, so a run that was
stopped, or a worker retried after it died, never produces a scan twice or leaves a partial one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_text_atomic
from .errors import HeartsegError, InputError
from .formats import ScanImage, ScanSource, read_scan, writer
from .formats.base import optional_import
from .image import (
    Volume,
    is_nifti_path,
    load_mask,
    read_geometry,
    same_grid,
    save_volume,
    strip_nifti_suffix,
    voxel_volume_mm3,
)
from .mesh import MESH_FORMATS, surface_mesh, write_mesh
from .metrics import compute_metrics
from .naming import find_label, label_key
from .qc import QCReport
from .segmenter import Prediction, Segmenter
from .statistics import atrium_statistics

EXIT_FAILED = 1
# Hidden folder beside the masks that holds one record per finished (or failed) scan.
RECORDS_FOLDER = ".heartseg-records"
RECORD_VERSION = 1


@dataclass
class OutputOptions:
    """What to write and compute for every scan."""

    output_format: str = "nifti"
    save_prob: bool = False
    overlay: bool = False
    statistics: bool = False
    mesh: str | None = None
    mesh_space: str = "lps"
    overwrite: bool = False
    records: bool = False  # write a record per scan (implied by resume); finished scans are not redone
    resume: bool = False  # also redo scans whose outputs exist without a record (an interrupted run's leftovers)
    shard: str | None = None  # "K/N", kept in each record


@dataclass
class ScanJob:
    """One scan to segment and where its outputs go."""

    source: ScanSource
    mask_path: Path
    prob_path: Path | None = None
    overlay_path: Path | None = None
    mesh_path: Path | None = None
    label: Path | None = None

    @property
    def name(self) -> str:
        """The scan's name (file name without its suffix; a DICOM series: its folder's name)."""
        return self.source.name

    def outputs(self) -> list[Path]:
        """Every file this job writes, the mask last."""
        return [p for p in (self.prob_path, self.overlay_path, self.mesh_path, self.mask_path) if p is not None]


@dataclass
class ScanResult:
    """What happened to one scan."""

    job: ScanJob
    status: str  # ok | flagged | skipped | failed
    seconds: float | None = None
    device: str | None = None
    volume_ml: float | None = None
    qc: str | None = None
    metrics: dict[str, Any] | None = None
    statistics: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0
    prediction: Prediction | None = None
    scan: ScanImage | None = None
    resumed: bool = False  # reported from the record of an earlier run, not segmented again
    report: QCReport | None = None  # QC's verdict, reasons and estimated Dice (kept when prediction is dropped)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of this scan."""
        done = self.status in ("ok", "flagged")
        written = lambda path: str(path) if path is not None and done else None  # noqa: E731
        record: dict[str, Any] = {
            "scan": str(self.job.source.path),
            "series": self.job.source.series,
            "format": self.job.source.format,
            "name": self.job.name,
            "status": self.status,
            "mask": str(self.job.mask_path) if self.status in ("ok", "flagged", "skipped") else None,
            "prob": written(self.job.prob_path),
            "overlay": written(self.job.overlay_path),
            "mesh": written(self.job.mesh_path),
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
            "statistics": self.statistics,
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


def output_paths(source: ScanSource, output: Path | None, single: bool, options: OutputOptions) -> ScanJob:
    """Where one scan's outputs go: into -o's folder, to -o's file name, or beside the input."""
    out_writer = writer(options.output_format)
    mesh_suffix = f".{options.mesh}" if options.mesh else ""
    if output is not None and single and _names_a_file(output, options.output_format):
        folder = output.parent if str(output.parent) else Path(".")
        stem = _strip_output_suffix(output.name)
        mask = output
    else:
        if output is not None:
            folder = output
        elif source.format == "dicom":
            folder = source.path.parent  # beside the series' folder or zip, never inside it
        else:
            folder = source.path.parent
        stem = source.name
        mask = folder / f"{stem}{out_writer.suffix}"
    return ScanJob(
        source,
        mask,
        prob_path=folder / f"{stem}_prob.nii.gz" if options.save_prob else None,
        overlay_path=folder / f"{stem}_overlay.png" if options.overlay else None,
        mesh_path=folder / f"{stem}_mesh{mesh_suffix}" if options.mesh else None,
    )


def _names_a_file(output: Path, output_format: str) -> bool:
    name = output.name.lower()
    return is_nifti_path(output) if output_format == "nifti" else name.endswith(".dcm")


def _strip_output_suffix(name: str) -> str:
    stem = strip_nifti_suffix(name)
    return stem[:-4] if stem.lower().endswith(".dcm") else stem


def plan_jobs(sources: Sequence[ScanSource], output: Path | None, options: OutputOptions,
              label: Path | None = None, labels: Path | None = None) -> list[ScanJob]:
    """Output paths and labels for every scan; refuses collisions with inputs and with each other."""
    if options.mesh is not None and options.mesh not in MESH_FORMATS:
        raise InputError(f"--mesh {options.mesh}: choose one of {', '.join(MESH_FORMATS)}")
    writer(options.output_format)
    if output is not None and _names_a_file(output, options.output_format) and len(sources) != 1:
        raise InputError(f"-o {output} names one file, but {len(sources)} scans were given; give a folder")
    if output is not None and output.exists() and not output.is_dir() and not _names_a_file(output,
                                                                                             options.output_format):
        raise InputError(f"{output}: output folder is a file, not a folder")
    if label is not None and labels is not None:
        raise InputError("give either --label (one scan) or --labels (a folder), not both")
    if label is not None and len(sources) != 1:
        raise InputError(f"--label pairs with exactly one scan, got {len(sources)} scans; use --labels DIR")
    if label is not None and not label.is_file():
        raise InputError(f"--label {label}: no such file")
    label_index: dict[str, Path] = {}
    if labels is not None:
        if not labels.is_dir():
            raise InputError(f"--labels {labels}: not a folder")
        for path in sorted(labels.iterdir()):
            if path.name.startswith(".") or not path.is_file() or not is_nifti_path(path):
                continue
            key = strip_nifti_suffix(path.name)
            if key in label_index:
                raise InputError(f"{label_index[key]} and {path}: two labels for case {key!r}")
            label_index[key] = path
    jobs = []
    for source in sources:
        job = output_paths(source, output, len(sources) == 1, options)
        job.label = label
        if labels is not None:
            job.label = find_label(label_index, source.name)
            if job.label is None:
                also = f" (nor {label_key(source.name)}.nii.gz)" if label_key(source.name) != source.name else ""
                raise InputError(f"--labels {labels}: no label named like {source.path.name}{also} for scan {source}")
        jobs.append(job)
    _check_collisions(jobs)
    return jobs


def _check_collisions(jobs: list[ScanJob]) -> None:
    inputs = {p.resolve(): p for job in jobs for p in (job.source.path, job.label) if p is not None}
    outputs: dict[Path, ScanSource] = {}
    for job in jobs:
        for out in job.outputs():
            resolved = out.resolve()
            if resolved in inputs:
                raise InputError(f"{out}: the output would overwrite the input {inputs[resolved]}; "
                                 "choose another output folder")
            if resolved in outputs:
                raise InputError(f"{outputs[resolved]} and {job.source}: two scans with the same name would write "
                                 f"to the same output {out}")
            outputs[resolved] = job.source


def output_folders(jobs: Sequence[ScanJob]) -> list[Path]:
    """The folders the jobs write into, each once."""
    folders: dict[Path, None] = {}
    for job in jobs:
        for path in job.outputs():
            folders.setdefault(path.parent if str(path.parent) else Path("."), None)
    return list(folders)


def check_options(options: OutputOptions) -> None:
    """Fail before any work when an option needs a library that is not installed."""
    if options.statistics or options.mesh:
        optional_import("skimage.measure", "--statistics and --mesh")
    if options.output_format == "dicom-seg":
        optional_import("highdicom", "DICOM SEG output")
    if options.overlay:
        from .overlay import require_pyplot

        require_pyplot()


def _save_overlay(path: Path, volume: Volume, mask: np.ndarray, reference: Volume | None, title: str) -> Path:
    """Three orthogonal slices in RAS orientation, mask in red, label in green."""
    from .overlay import save_overlay
    from .preprocess import to_canonical

    canonical = to_canonical(volume)
    flip = lambda data: to_canonical(Volume(data, volume.affine)).data  # noqa: E731
    label = flip(reference.data) if reference is not None else None
    return save_overlay(path, canonical.data, flip(mask), label, title)


def overlay_title(name: str, report: QCReport | None) -> str:
    """The overlay's title: the scan's name, its QC verdict and estimated Dice, and the reasons."""
    if report is None:
        return name
    title = f"{name}   QC {report.verdict.upper()}"
    if report.estimated_dice is not None:
        title += f", est. Dice {report.dice_text()}"
    reasons = "; ".join(report.reasons)
    if reasons:
        title += f": {reasons[:117]}..." if len(reasons) > 120 else f": {reasons}"
    return title


def write_outputs(job: ScanJob, scan: ScanImage, prediction: Prediction, options: OutputOptions,
                  reference: Volume | None = None) -> float:
    """Write the job's files (the mask last, each atomically); on any failure remove those already written."""
    written: list[Path] = []
    start = time.perf_counter()
    try:
        if job.prob_path is not None and prediction.prob is not None:
            written.append(save_volume(prediction.prob.astype(np.float32), scan.volume.affine, job.prob_path,
                                       overwrite=options.overwrite))
        if job.overlay_path is not None:
            written.append(_save_overlay(job.overlay_path, scan.volume, prediction.mask, reference,
                                         overlay_title(job.name, prediction.report)))
        if job.mesh_path is not None and options.mesh is not None:
            written.append(write_mesh(surface_mesh(prediction.mask, scan.volume.affine), job.mesh_path, options.mesh,
                                      options.mesh_space, overwrite=options.overwrite))
        # The mask goes last: its presence is what marks a scan as done for the next run.
        written.append(writer(options.output_format).write(scan, prediction.mask.astype(np.uint8), job.mask_path,
                                                           options.overwrite))
    except BaseException:
        for path in written:  # no partial set of outputs for a scan that failed
            path.unlink(missing_ok=True)
        raise
    return time.perf_counter() - start


def process(segmenter: Segmenter, job: ScanJob, options: OutputOptions, benchmark: int | None = None,
            write: bool = True) -> ScanResult:
    """Read, check, segment (benchmark: N more timed times), write, measure and score one scan."""
    start = time.perf_counter()
    if is_nifti_path(job.source.path):  # its header tells the memory needed before any voxel is read
        segmenter.check_header(read_geometry(job.source.path), job.source.path)
    scan = read_scan(job.source)
    read_seconds = time.perf_counter() - start
    reference: Volume | None = None
    if job.label is not None:
        reference = load_mask(job.label)
        if not same_grid(scan.volume, reference):
            raise InputError(f"label {job.label} (shape {reference.shape}) is not on the grid of scan "
                             f"{job.source} (shape {scan.volume.shape}): shapes or affines differ")
    runs: list[float] = []
    keep_prob = options.save_prob
    if benchmark:
        segmenter.segment(scan.volume, keep_prob=keep_prob)  # warm-up, untimed
        for _ in range(benchmark):
            begin = time.perf_counter()
            prediction = segmenter.segment(scan.volume, keep_prob=keep_prob)
            runs.append(time.perf_counter() - begin)
    else:
        prediction = segmenter.segment(scan.volume, keep_prob=keep_prob)
    timings = {"read": read_seconds, **prediction.timings}
    timings["write"] = write_outputs(job, scan, prediction, options, reference) if write else 0.0
    statistics = None
    if options.statistics:
        begin = time.perf_counter()
        statistics = atrium_statistics(prediction.mask, scan.volume.affine).to_dict()
        timings["statistics"] = time.perf_counter() - begin
    metrics = None
    if reference is not None:
        metrics = compute_metrics(prediction.mask, reference.data, scan.volume.spacing,
                                  voxel_volume_mm3(scan.volume.affine)).to_dict()
    return ScanResult(job, "ok" if prediction.qc is None else "flagged", time.perf_counter() - start,
                      prediction.device, prediction.volume_ml, prediction.qc, metrics, statistics, timings, runs,
                      prediction=prediction, scan=scan, report=prediction.report)


def record_path(job: ScanJob) -> Path:
    """Where the record of a job goes: RECORDS_FOLDER beside its mask, named after the mask."""
    return job.mask_path.parent / RECORDS_FOLDER / f"{job.mask_path.name}.json"


def keeps_records(options: OutputOptions) -> bool:
    """True when the run writes per-scan records (--resume, --shard, Ray)."""
    return options.records or options.resume


def write_record(result: ScanResult, options: OutputOptions) -> Path:
    """Write the scan's record atomically (after its outputs): the JSON report entry plus who did it, and when."""
    from .cli_common import json_ready

    record = dict(result.to_dict(), exit_code=result.exit_code, shard=options.shard,
                  worker=f"{socket.gethostname()}:{os.getpid()}",
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), record_version=RECORD_VERSION)
    path = record_path(result.job)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(json_ready(record), indent=1, allow_nan=False) + "\n")


def read_record(job: ScanJob) -> dict[str, Any] | None:
    """The job's record, or None when there is none (an unreadable record counts as none)."""
    try:
        record = json.loads(record_path(job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def finished_record(job: ScanJob) -> dict[str, Any] | None:
    """The job's record when the scan is finished: segmented (ok or flagged) and every output still there."""
    record = read_record(job)
    if record is None or record.get("status") not in ("ok", "flagged"):
        return None
    # Names, not paths: shards on different machines may mount the scans at different paths.
    if record.get("name") != job.name or record.get("series") != job.source.series:
        return None
    if not all(path.exists() for path in job.outputs()):
        return None
    return record


def result_from_record(job: ScanJob, record: dict[str, Any]) -> ScanResult:
    """The ScanResult a record describes, as the run that wrote it reported it."""
    qc = record.get("qc")
    report = record.get("qc_report")
    return ScanResult(job, record["status"], record.get("seconds"), record.get("device"), record.get("volume_ml"),
                      qc if isinstance(qc, str) and record["status"] == "flagged" else None,
                      record.get("metrics"), record.get("statistics"), record.get("timings") or {},
                      error=record.get("error"), exit_code=int(record.get("exit_code") or 0),
                      resumed=True, report=QCReport.from_dict(report) if isinstance(report, dict) else None)


def describe_failure(source: ScanSource, exc: BaseException) -> str:
    """'name: message' for a failed scan, without repeating the path when the message has it."""
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, HeartsegError):
        message = f"{type(exc).__name__}: {message}"
    if str(source.path) in message:
        return message
    return f"{source.path.name}: {message}"


def run_job(segmenter: Segmenter, job: ScanJob, options: OutputOptions, benchmark: int | None = None) -> ScanResult:
    """Segment one scan unless it is finished or its outputs exist; never raises for a bad scan.

    With records, a finished scan is reported from its record and a new record follows every
    outcome; with resume, outputs without a record are replaced (the leftovers of an interrupted run).
    """
    records = keeps_records(options)
    if records and not options.overwrite:
        record = finished_record(job)
        if record is not None:
            return result_from_record(job, record)
    if any(p.exists() for p in job.outputs()) and not options.overwrite:
        if not options.resume:
            return ScanResult(job, "skipped")
        options = replace(options, overwrite=True)
    try:
        result = process(segmenter, job, options, benchmark)
        result.prediction, result.scan = None, None  # a batch keeps no volumes in memory
    except HeartsegError as exc:
        result = ScanResult(job, "failed", error=describe_failure(job.source, exc), exit_code=exc.exit_code)
    except Exception as exc:  # a bad scan must not stop the batch
        result = ScanResult(job, "failed", error=describe_failure(job.source, exc), exit_code=EXIT_FAILED)
    if records:
        try:
            write_record(result, options)
        except OSError as exc:
            # Outputs without a record are not finished: the next --resume redoes the scan.
            result = ScanResult(job, "failed", error=describe_failure(job.source, InputError(
                f"cannot write its record {record_path(job)} ({exc.strerror or exc})")), exit_code=EXIT_FAILED)
    return result


def run_jobs(segmenter: Segmenter, jobs: Sequence[ScanJob], options: OutputOptions, benchmark: int | None = None,
             on_start: Callable[[ScanJob], None] | None = None,
             on_done: Callable[[ScanResult], None] | None = None) -> list[ScanResult]:
    """Process every job in turn (run_job): skip those done, and let no failing scan stop the batch."""
    results: list[ScanResult] = []
    for job in jobs:
        if on_start is not None:
            on_start(job)
        result = run_job(segmenter, job, options, benchmark)
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results
