"""Cohort runs without coordination: scan lists and globs, stable shards, and the merged report.

A shard is chosen by a hash of the scan's name (and DICOM series), never by its position in a
listing, so every task of a job array computes the same split from the same inputs on its own,
and a scan added to the cohort later does not move the others. The merged report gathers the
per-scan records (pipeline.record_path) of every shard and checks that each planned scan has
exactly one, written by the shard that owns it, from the scan as it is now, with the model given.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .image import require_regular_file
from .pipeline import (
    FINISHED,
    RECORDS_FOLDER,
    ScanJob,
    ScanResult,
    finished_problem,
    job_provenance,
    read_record,
    record_path,
    result_from_record,
)

GLOB_CHARS = re.compile(r"[*?\[]")
# A scan list larger than this is not a list of paths (or is /dev/zero under another name).
MAX_SCAN_LIST_BYTES = 16 << 20
MAX_SCAN_LIST_LINES = 1_000_000


@dataclass(frozen=True)
class Shard:
    """Shard index of count (0 <= index < count), as in --shard INDEX/COUNT."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, job: ScanJob) -> bool:
        """True when the job falls into this shard."""
        return shard_of(job, self.count) == self.index


def parse_shard(text: str) -> Shard:
    """A Shard from 'K/N' (K from 0 to N-1, as SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX count)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if match is None:
        raise InputError(f"--shard {text}: give K/N, e.g. 0/10 (shard K of N, K from 0 to N-1)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise InputError(f"--shard {text}: the number of shards must be at least 1")
    if index >= count:
        raise InputError(f"--shard {text}: K must be between 0 and {count - 1} (shards are numbered from 0)")
    return Shard(index, count)


def shard_key(job: ScanJob) -> str:
    """What assigns a scan to a shard: its name, and its series for a DICOM series."""
    return job.name if job.source.series is None else f"{job.name}\0{job.source.series}"


def shard_of(job: ScanJob, count: int) -> int:
    """The shard (0 to count-1) that owns the job, from a hash of its name."""
    digest = hashlib.sha256(shard_key(job).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(jobs: Sequence[ScanJob], shard: Shard | None) -> list[ScanJob]:
    """The jobs the shard owns, in their order (all of them without a shard)."""
    return list(jobs) if shard is None else [job for job in jobs if shard.owns(job)]


def _scan_list_lines(path: Path) -> list[str]:
    """The lines of a scan list: a regular file of at most MAX_SCAN_LIST_BYTES and MAX_SCAN_LIST_LINES lines."""
    what = f"--scan-list {path}"
    require_regular_file(path, what)
    too_large = f"{what}: larger than {MAX_SCAN_LIST_BYTES >> 20} MiB; a scan list holds one scan path a line"
    try:
        if path.stat().st_size > MAX_SCAN_LIST_BYTES:
            raise InputError(too_large)
        with open(path, "rb") as handle:
            raw = handle.read(MAX_SCAN_LIST_BYTES + 1)  # bounded even if the file grows meanwhile
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if len(raw) > MAX_SCAN_LIST_BYTES:
        raise InputError(too_large)
    lines = text.splitlines()
    if len(lines) > MAX_SCAN_LIST_LINES:
        raise InputError(f"{what}: more than {MAX_SCAN_LIST_LINES} lines; split the cohort into several runs")
    return lines


def read_scan_list(path: Path) -> list[Path]:
    """Scan paths from a text file, one a line ('#' comments and blank lines skipped, relative to the file)."""
    lines = _scan_list_lines(Path(path))
    folder = Path(path).parent
    items = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            item = Path(line).expanduser()
            items.append(item if item.is_absolute() else folder / item)
    if not items:
        raise InputError(f"--scan-list {path}: lists no scans")
    return items


def expand_inputs(items: Sequence[Path], scan_list: Path | None = None) -> list[Path]:
    """Command-line inputs with globs expanded (a quoted 'scans/*.nii.gz', '**' included) and a list file added."""
    expanded: list[Path] = []
    for item in items:
        text = str(item)
        if GLOB_CHARS.search(text) and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise InputError(f"{text}: the pattern matches no file or folder")
            expanded.extend(Path(m) for m in matches)
        else:
            expanded.append(Path(item))
    if scan_list is not None:
        expanded.extend(read_scan_list(scan_list))
    return expanded


@dataclass
class MergedReport:
    """Every planned scan's record gathered: results, scans without a record, and records that disagree."""

    results: list[ScanResult] = field(default_factory=list)
    missing: list[ScanJob] = field(default_factory=list)
    misassigned: list[str] = field(default_factory=list)
    stray: list[Path] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # finished records that no longer describe the scan or its mask
    models: list[str] = field(default_factory=list)  # finished records that name different models

    @property
    def complete(self) -> bool:
        """True when every scan has exactly one record, from the shard that owns it, that still holds."""
        return not self.missing and not self.misassigned and not self.stale and not self.models


def _model_text(identity: Any) -> str:
    """A model identity (session.model_identity) as a short phrase."""
    if not isinstance(identity, dict):
        return "no model"
    digest = str(identity.get("sha256") or "?")[:12]
    return f"model {digest} (--tta {'on' if identity.get('tta') else 'off'})"


def _mixed_models(names_by_model: dict[str, list[str]]) -> list[str]:
    """One problem when the finished records name more than one model; none when they agree."""
    if len(names_by_model) < 2:
        return []
    parts = [f"{_model_text(json.loads(key))}: {len(names)} scans ({', '.join(names[:3])}"
             f"{', ...' if len(names) > 3 else ''})" for key, names in names_by_model.items()]
    return [f"the records name {len(names_by_model)} models: {'; '.join(parts)}; give --merge-reports the shards' "
            "--model (and --tta) to find the records to redo"]


def merge_records(jobs: Sequence[ScanJob], model: dict[str, Any] | None) -> MergedReport:
    """Gather the records of jobs (all the shards' scans) and check that each was done exactly once, from the
    scan as it is now, by the model (session.model_identity) given; with None, by one model, whichever it is."""
    report = MergedReport()
    names_by_model: dict[str, list[str]] = {}
    counts: set[int] = set()
    expected: set[Path] = set()
    for job in jobs:
        path = record_path(job)
        expected.add(path.resolve())
        record = read_record(job)
        if record is None or record.get("name") != job.name or record.get("series") != job.source.series:
            report.missing.append(job)
            continue
        report.results.append(result_from_record(job, record))
        if record.get("status") in FINISHED:
            problem = finished_problem(job, record, job_provenance(job, model))
            if problem is not None:
                report.stale.append(f"{job.name}: {problem}")
            names_by_model.setdefault(json.dumps(record.get("model"), sort_keys=True), []).append(job.name)
        shard = record.get("shard")
        if shard:
            try:
                owner = parse_shard(shard)
            except InputError:
                report.misassigned.append(f"{job.name}: its record names shard {shard!r}")
                continue
            counts.add(owner.count)
            if not owner.owns(job):
                report.misassigned.append(f"{job.name}: done by shard {owner}, but shard "
                                          f"{shard_of(job, owner.count)}/{owner.count} owns it")
    if model is None:  # otherwise each record that names another model is stale already
        report.models = _mixed_models(names_by_model)
    if len(counts) > 1:
        report.misassigned.append(f"records of runs split into {', '.join(map(str, sorted(counts)))} shards are mixed")
    folders = {record_path(job).parent for job in jobs}
    for folder in sorted(folders):
        if folder.is_dir():
            report.stray += [p for p in sorted(folder.glob("*.json")) if p.resolve() not in expected]
    return report


__all__ = ["RECORDS_FOLDER", "MergedReport", "Shard", "expand_inputs", "merge_records", "parse_shard",
           "read_scan_list", "select_shard", "shard_of"]
