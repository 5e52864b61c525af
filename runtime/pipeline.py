"""The per-scan file pipeline every command shares: plan the jobs, read, segment, write atomically, report.

heartseg-infer, heartseg-bench and the Python API all go through process(), so a scan is read,
timed, written and described one way only. Stage seconds: read, preprocess, network, postprocess,
write (and statistics, when asked for).

A scan is finished when its outputs are written (each atomically, the mask last) and then its
record: one small JSON file per scan, RECORDS_FOLDER/<mask file name>.json beside the mask, also
written atomically. run_job() is the one per-scan function of every run, local, --shard or Ray:
it reports a finished scan from its record instead of segmenting it again, so a run that was
stopped, or a worker retried after it died, never produces a scan twice or leaves a partial one.

A record is tied to what it describes: the scan's fingerprint (size, modification time to the second
and a digest of the first bytes of each of its files: a header and its detached data file; a DICOM
zip's member list; a DICOM folder's files' names, sizes and times), the model's identity (a digest of
the model file as the run opened it, and test-time flips) and the mask it wrote (size and time). A
record that disagrees with any of them, or an older record without them, does not make a scan
finished. Whether a scan is done depends on its mask (and its record) only: the other outputs
are written first, so a probability map or overlay without its mask is what a stopped run left.

While run_job works on a scan it holds a lock file beside the mask (hidden, removed afterwards): a
second run that reaches the same scan meanwhile leaves it to the first and reports it skipped, so
two runs writing one folder never undo each other's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import zipfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import exclusive_lock, remove_if_unchanged, tracking_replacements, write_text_atomic
from .errors import EXIT_FAILED, HeartsegError, InputError
from .formats import WRITERS, ScanImage, ScanSource, discover_sources, read_scan, scan_geometry, writer
from .formats import metaimage, nrrd
from .formats.base import optional_import
from .formats.dicom import container_members
from .formats.nifti import is_nifti_path, load_mask, save_volume, strip_nifti_suffix
from .image import Volume, require_regular_file, same_grid, voxel_volume_mm3
from .mesh import MESH_FORMATS, surface_mesh, write_mesh
from .metrics import compute_metrics
from .naming import find_label, label_key
from .outputs import find_collision
from .qc import QCReport
from .segmenter import Prediction, Segmenter
from .statistics import atrium_statistics
from .strict_json import json_ready

# Hidden folder beside the masks that holds one record per finished (or failed) scan.
RECORDS_FOLDER = ".heartseg-records"
# 2: records carry the scan's fingerprint, the model's identity and the mask's size and time.
RECORD_VERSION = 2
FINISHED = ("ok", "flagged")
# How much of each file of a scan its fingerprint digests: NIfTI's header and most NRRD and MetaImage headers
# lie within it, and a change to voxels beyond it shows in the size or time. A zip's directory lies at its end:
# a DICOM zip's member list is fingerprinted on its own.
FINGERPRINT_HEAD_BYTES = 64 * 1024
# The files a scan is made of, by format, where a header may name a data file of its own.
SCAN_FILES = {"nrrd": nrrd.files_of, "mha": metaimage.files_of}
# What heartseg-infer writes beside a mask: not part of a DICOM folder's series even when written inside it.
OUTPUT_ENDINGS = (*(w.suffix for w in WRITERS.values()), "_prob.nii.gz", "_overlay.png", "_mesh.stl", "_mesh.vtk")


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
    reason: str | None = None  # why a skipped scan was not segmented

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
            "reason": self.reason,
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
    if label is not None:
        require_regular_file(label, f"--label {label}")
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
    collision = find_collision([p for job in jobs for p in (job.source.path, job.label)],
                               [(job.source, out) for job in jobs for out in job.outputs()])
    if collision is None:
        return
    if collision.input is not None:
        raise InputError(f"{collision.path}: the output would overwrite the input {collision.input}; "
                         "choose another output folder")
    raise InputError(f"{collision.earlier} and {collision.owner}: two scans with the same name would write "
                     f"to the same output {collision.path}")


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
        optional_import("skimage.measure", "--statistics, --mesh and --csv")
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
    """Write the job's files (the mask last, each atomically); on any failure remove those this call wrote.

    A file that cannot be written raises atomic.WriteError, which names it.
    """
    start = time.perf_counter()
    # Who wrote a file is told by its inode, taken as it is renamed into place: another run may replace it
    # before a rollback here, and a stop may come between the rename and anything this function does next.
    with tracking_replacements() as written:
        try:
            if job.prob_path is not None and prediction.prob is not None:
                save_volume(prediction.prob.astype(np.float32), scan.volume.affine, job.prob_path,
                            overwrite=options.overwrite)
            if job.overlay_path is not None:
                _save_overlay(job.overlay_path, scan.volume, prediction.mask, reference,
                              overlay_title(job.name, prediction.report))
            if job.mesh_path is not None and options.mesh is not None:
                write_mesh(surface_mesh(prediction.mask, scan.volume.affine), job.mesh_path, options.mesh,
                           options.mesh_space, overwrite=options.overwrite)
            # The mask goes last: its presence is what marks a scan as done for the next run.
            writer(options.output_format).write(scan, prediction.mask.astype(np.uint8), job.mask_path,
                                                options.overwrite)
        except BaseException:
            for path, identity in written:  # no partial set of outputs for a scan that failed
                remove_if_unchanged(path, identity)
            raise
    return time.perf_counter() - start


def check_writable(scan: ScanImage, options: OutputOptions) -> None:
    """Fail before segmenting when the output format cannot be written for this scan (a DICOM SEG's needs)."""
    check = getattr(writer(options.output_format), "check", None)
    if check is not None:
        check(scan)


def process(segmenter: Segmenter, job: ScanJob, options: OutputOptions, benchmark: int | None = None,
            write: bool = True) -> ScanResult:
    """Read, check, segment (benchmark: N more timed times), write, measure and score one scan."""
    start = time.perf_counter()
    if (geometry := scan_geometry(job.source)) is not None:  # from the header, before any voxel is read
        segmenter.check_header(geometry, str(job.source))
    scan = read_scan(job.source)
    if write:
        check_writable(scan, options)
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


def lock_path(job: ScanJob) -> Path:
    """The lock file a run holds while it works on the job: hidden, beside the mask."""
    return job.mask_path.parent / f".{job.mask_path.name}.lock"


def keeps_records(options: OutputOptions) -> bool:
    """True when the run writes per-scan records (--resume, --shard, Ray)."""
    return options.records or options.resume


def _stamp(path: Path) -> dict[str, int]:
    """A file's size and modification time, in whole seconds (copies and some file systems keep no more)."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime": stat.st_mtime_ns // 10**9}


def _file_print(path: Path) -> dict[str, Any]:
    """A file's stamp and a digest of its first bytes."""
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(FINGERPRINT_HEAD_BYTES)).hexdigest()
    return {**_stamp(path), "head_sha256": head}


def _digest(value: Any) -> str:
    """SHA-256 of a value's JSON."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def _zip_members(path: Path) -> list[list[Any]]:
    """Every member of a zip as its directory (at the end of the file) lists it: name, size and CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [[i.filename, i.file_size, i.CRC] for i in archive.infolist()]
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: not a readable zip file ({exc})") from None


def _file_list(folder: Path, outputs: Sequence[Path]) -> list[list[Any]]:
    """The files the DICOM reader looks at in folder, heartseg's outputs left out: relative name, size and time."""
    own = {os.path.relpath(os.path.abspath(p), os.path.abspath(folder)) for p in outputs}
    entries = []
    for name in container_members(folder):
        if name in own or name.endswith(OUTPUT_ENDINGS):
            continue
        stamp = _stamp(folder / name)
        entries.append([name, stamp["size"], stamp["mtime"]])
    return entries


def scan_fingerprint(source: ScanSource, outputs: Sequence[Path] = ()) -> dict[str, Any]:
    """What tells one scan from another without its path (shards may mount scans at different paths).

    A file: its size, modification time and a digest of its first bytes, and so for a data file its header
    names (NRRD, MetaImage); a DICOM zip: also its member list; a DICOM folder: a digest of the name, size and
    modification time of every file the reader looks at, except heartseg's outputs (outputs: the job's own,
    whatever their names). Raises OSError or InputError when the scan cannot be read.
    """
    path = source.path
    if path.is_dir():
        listing = _file_list(path, outputs)
        return {"files": len(listing), "files_sha256": _digest(listing)}
    fingerprint = _file_print(path)
    parts = SCAN_FILES[source.format](path)[1:] if source.format in SCAN_FILES else []
    if parts:
        fingerprint["data_files"] = [_file_print(part) for part in parts]
    if source.format == "dicom":
        fingerprint["members_sha256"] = _digest(_zip_members(path))
    return fingerprint


@dataclass(frozen=True)
class Provenance:
    """What a record ties a scan's outputs to: the scan's fingerprint (None: unreadable) and the model's identity
    (None: any model, when a merge only checks that the records agree on one)."""

    scan: dict[str, Any] | None
    model: dict[str, Any] | None


def job_provenance(job: ScanJob, model: dict[str, Any] | None) -> Provenance:
    """The job's scan fingerprint now, with the model's identity."""
    try:
        fingerprint = scan_fingerprint(job.source, job.outputs())
    except (OSError, HeartsegError):
        fingerprint = None  # never matches: reading the scan will say what is wrong
    return Provenance(fingerprint, model)


def write_record(result: ScanResult, options: OutputOptions, provenance: Provenance | None = None) -> Path:
    """Write the scan's record atomically (after its outputs): the JSON report entry, what it was made from
    (provenance, and the mask's size and time), who did it, and when."""
    made: dict[str, Any] = {}
    if provenance is not None:
        made = {"source": provenance.scan, "model": provenance.model}
    if result.status in FINISHED:
        try:
            made["outputs"] = {"mask": _stamp(result.job.mask_path)}
        except OSError:
            pass  # without it the record never counts as finished
    record = dict(result.to_dict(), exit_code=result.exit_code, shard=options.shard, **made,
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


def record_mismatch(job: ScanJob, record: dict[str, Any], provenance: Provenance) -> str | None:
    """Why the record does not describe the job's scan as it is now, segmented by this model; None when it does."""
    if record.get("record_version") != RECORD_VERSION:
        return f"its record has format {record.get('record_version')}, not {RECORD_VERSION} (another heartseg version)"
    if "source" not in record:
        return "its record does not name the scan it was made from"
    # Names, not paths: shards on different machines may mount the scans at different paths.
    if record.get("name") != job.name or record.get("series") != job.source.series:
        return "its record is of another scan"
    if provenance.scan is None or record.get("source") != provenance.scan:
        return "the scan changed since its record was written (or it is another scan of the same name)"
    if provenance.model is not None and record.get("model") != provenance.model:
        return "its record was made with another model"
    return None


def outputs_mismatch(job: ScanJob, record: dict[str, Any]) -> str | None:
    """Why the outputs on disk are not those a finished record wrote; None when they are."""
    missing = [path.name for path in job.outputs() if not path.exists()]
    if missing:
        return f"{', '.join(missing)} missing"
    stamp = (record.get("outputs") or {}).get("mask")
    try:
        if stamp != _stamp(job.mask_path):
            return f"{job.mask_path.name} was replaced since its record was written"
    except OSError:
        return f"{job.mask_path.name} cannot be read"
    return None


def finished_problem(job: ScanJob, record: dict[str, Any], provenance: Provenance) -> str | None:
    """Why a record of a segmented scan (ok or flagged) does not make the scan finished now; None when it does."""
    return record_mismatch(job, record, provenance) or outputs_mismatch(job, record)


def finished_record(job: ScanJob, provenance: Provenance) -> dict[str, Any] | None:
    """The job's record when the scan is finished: segmented (ok or flagged) from this scan by this model,
    and every output still the one it wrote."""
    record = read_record(job)
    if record is None or record.get("status") not in FINISHED or finished_problem(job, record, provenance):
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


SKIP_HINT = "use --overwrite or --resume to replace it"
BUSY = "another run is writing its outputs now"


def settled(job: ScanJob, options: OutputOptions, provenance: Provenance) -> ScanResult | None:
    """The result of a job that needs no segmenting: finished by an earlier run (reported from its record), or
    skipped because its mask exists (without resume); None when it must be segmented.

    Only the mask (and its record) decide: other outputs without the mask are what a stopped run left.
    """
    record = read_record(job)
    problem = None
    if record is not None and record.get("status") in FINISHED:
        problem = finished_problem(job, record, provenance)
        if problem is None:
            return result_from_record(job, record)
    if options.resume or not job.mask_path.exists():
        return None
    why = f" ({problem})" if problem else ""
    return ScanResult(job, "skipped", reason=f"{job.mask_path.name} exists{why}; {SKIP_HINT}")


def describe_failure(source: ScanSource, exc: BaseException) -> str:
    """'name: message' for a failed scan, without repeating the path when the message has it."""
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, HeartsegError):
        message = f"{type(exc).__name__}: {message}"
    if str(source.path) in message:
        return message
    return f"{source.path.name}: {message}"


def run_job(segmenter: Segmenter, job: ScanJob, options: OutputOptions, benchmark: int | None = None) -> ScanResult:
    """Segment one scan unless it is finished or its mask exists; never raises for a bad scan.

    A scan finished by an earlier run (its record matches the scan, the model and the mask) is reported
    from its record; with records a new record follows every outcome; with resume, a mask without a
    matching record is replaced. A scan that another run is working on is left to it (skipped).
    """
    with exclusive_lock(lock_path(job)) as mine:
        if not mine:
            return ScanResult(job, "skipped", reason=BUSY)
        return _run_held(segmenter, job, options, benchmark, job_provenance(job, segmenter.identity))


def _run_held(segmenter: Segmenter, job: ScanJob, options: OutputOptions, benchmark: int | None,
              provenance: Provenance) -> ScanResult:
    """run_job with the scan's lock held."""
    if not options.overwrite:
        done = settled(job, options, provenance)
        if done is not None:
            return done
        if any(p.exists() for p in job.outputs()):
            options = replace(options, overwrite=True)  # a stopped run's leftovers, or with resume a stale mask
    try:
        result = process(segmenter, job, options, benchmark)
        result.prediction, result.scan = None, None  # a batch keeps no volumes in memory
    except HeartsegError as exc:
        result = ScanResult(job, "failed", error=describe_failure(job.source, exc), exit_code=exc.exit_code)
    except Exception as exc:  # a bad scan must not stop the batch
        result = ScanResult(job, "failed", error=describe_failure(job.source, exc), exit_code=EXIT_FAILED)
    if keeps_records(options):
        try:
            write_record(result, options, provenance)
        except (OSError, HeartsegError) as exc:
            # Outputs without a record are not finished: the next --resume redoes the scan.
            message = (f"its record: {exc}" if isinstance(exc, HeartsegError) else
                       f"cannot write its record {record_path(job)} ({exc.strerror or exc})")
            result = ScanResult(job, "failed", error=describe_failure(job.source, InputError(message)),
                                exit_code=EXIT_FAILED)
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


def segment_files(segmenter: Segmenter, scans: Sequence[str | os.PathLike], output: str | os.PathLike | None = None,
                  options: OutputOptions | None = None, series: str | None = None) -> list[ScanResult]:
    """Segment files and folders and write their outputs as heartseg-infer does; one ScanResult per scan."""
    options = options if options is not None else OutputOptions()
    check_options(options)
    jobs = plan_jobs(discover_sources([Path(s) for s in scans], series),
                     Path(output) if output is not None else None, options)
    for folder in output_folders(jobs):
        folder.mkdir(parents=True, exist_ok=True)
    return run_jobs(segmenter, jobs, options)
