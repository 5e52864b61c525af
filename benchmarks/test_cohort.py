"""Cohort throughput: a plain folder run against Ray with 1 and 2 workers, and the projection to 10,000 scans.

Every configuration segments the same folder (HEARTSEG_BENCH_COHORT_SCANS copies cycling through
the Task02 scans, default 32) into a fresh output folder, files in and files out, exactly as
heartseg-infer does. The plain runs use one process (1 and 2 ONNX Runtime threads); the Ray runs
use a local cluster with 2 CPUs and 1-thread workers. A Ray run's time includes starting its
workers (one model load each), paid once per run: a second, short run of one scan per worker
measures it, and the steady per-scan time, (long - short) / (scans - workers), is what the
overhead and the projection use. Meaningful only on an otherwise idle machine.
"""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

import benchlib
import pytest
from heartseg.runtime.formats import discover_sources
from heartseg.runtime.pipeline import OutputOptions, plan_jobs, run_jobs
from heartseg.runtime.segmenter import Segmenter

pytestmark = pytest.mark.benchmark_suite

COHORT_SCANS = 3 if benchlib.TINY else benchlib.env_int("HEARTSEG_BENCH_COHORT_SCANS", 32)
# Seconds per scan of each configuration, filled in as the benchmarks run.
PER_SCAN: dict[str, float] = {}


@pytest.fixture(scope="module")
def cohort(bench_scans: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of COHORT_SCANS copies of the benchmark scans (each name once).

    Copies, not links: scan discovery counts a file once however many links lead to it.
    """
    folder = tmp_path_factory.mktemp("cohort")
    for i, scan in zip(range(COHORT_SCANS), itertools.cycle(bench_scans)):
        shutil.copyfile(scan, folder / f"c{i:04d}_{scan.name}")
    found = len(discover_sources([folder]))
    assert found == COHORT_SCANS, f"the cohort folder holds {found} scans, not {COHORT_SCANS}"
    return folder


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster with 2 CPUs and a small object store, shut down after the module."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'heartseg[ray]')")
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def _fresh(tmp_path: Path, counter: itertools.count) -> Path:
    """A new, empty output folder: every round segments every scan."""
    folder = tmp_path / f"out{next(counter)}"
    folder.mkdir()
    return folder


def _record(name: str, seconds: list[float], benchmark) -> None:
    per_scan = benchlib.median(seconds) / COHORT_SCANS
    PER_SCAN[name] = per_scan
    benchmark.extra_info.update({"scans": COHORT_SCANS, "seconds_per_scan": per_scan,
                                 "scans_per_minute": 60.0 / per_scan})
    benchlib.report("cohort throughput", f"{name}: {per_scan:.3f} s/scan, {60.0 / per_scan:.1f} scans/min "
                                         f"({COHORT_SCANS} scans)")


@pytest.mark.parametrize("threads", [1, 2])
def test_plain_folder_run(benchmark, bench_model: Path, cohort: Path, tmp_path: Path, threads: int) -> None:
    """One process, one session, the scans in turn (heartseg-infer FOLDER -o OUT)."""
    benchmark.group = "cohort"
    segmenter = Segmenter(bench_model, device="cpu", threads=threads)
    counter = itertools.count()

    def folder() -> list:
        options = OutputOptions()
        jobs = plan_jobs(discover_sources([cohort]), _fresh(tmp_path, counter), options)
        results = run_jobs(segmenter, jobs, options)
        assert all(r.status in ("ok", "flagged") for r in results), [r.error for r in results]
        return results

    seconds, _ = benchlib.measure(benchmark, folder, benchlib.rounds(2, 1))
    _record(f"plain, {threads} thread{'s' if threads > 1 else ''}", seconds, benchmark)


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_run(benchmark, local_ray, bench_model: Path, cohort: Path, tmp_path: Path, workers: int) -> None:
    """The same folder on the local Ray cluster, workers x 1 thread (heartseg-infer FOLDER -o OUT --ray auto)."""
    from heartseg.runtime.distributed import RayConfig, run_jobs_on_ray

    benchmark.group = "cohort"
    counter = itertools.count()

    def folder(count: int = COHORT_SCANS) -> list:
        options = OutputOptions()
        jobs = plan_jobs(discover_sources([cohort]), _fresh(tmp_path, counter), options)[:count]
        results = run_jobs_on_ray(str(bench_model), jobs, options, RayConfig(workers=workers, threads=1))
        assert all(r.status in ("ok", "flagged") for r in results), [r.error for r in results]
        return results

    # No warm-up round: every run starts its own workers anyway (the plain runs warmed the file cache).
    seconds, _ = benchlib.measure(benchmark, folder, benchlib.rounds(2, 1), warmup=0)
    name = f"ray, {workers} worker{'s' if workers > 1 else ''} x 1 thread"
    _record(f"{name}, start-up included", seconds, benchmark)
    short = []
    for _ in range(0 if benchlib.TINY else benchlib.rounds(2)):
        start = time.perf_counter()
        folder(workers)
        short.append(time.perf_counter() - start)
    long_s = benchlib.median(seconds)
    short_s = benchlib.median(short) if short else 0.0
    if short and long_s > short_s and COHORT_SCANS > workers:
        steady = (long_s - short_s) / (COHORT_SCANS - workers)
    else:  # tiny mode, or too few scans to tell start-up from work: start-up included
        steady = long_s / COHORT_SCANS
    PER_SCAN[name] = steady
    benchmark.extra_info.update({"startup_run_s": short_s, "steady_seconds_per_scan": steady})
    benchlib.report("cohort throughput", f"{name}, steady: {steady:.3f} s/scan, {60.0 / steady:.1f} scans/min "
                                         f"(a run of {workers} scan(s): {short_s:.2f} s)")
    if workers == 2 and {"plain, 1 thread", "plain, 2 threads", "ray, 1 worker x 1 thread"} <= set(PER_SCAN):
        ray2 = PER_SCAN["ray, 2 workers x 1 thread"]
        best_plain = min(PER_SCAN["plain, 1 thread"], PER_SCAN["plain, 2 threads"])
        overhead_1 = PER_SCAN["ray, 1 worker x 1 thread"] / PER_SCAN["plain, 1 thread"] - 1.0
        overhead_2 = ray2 / best_plain - 1.0
        benchmark.extra_info.update({"overhead_1_worker": overhead_1, "overhead_2_workers": overhead_2})
        benchlib.report("cohort throughput", f"Ray overhead per scan: {100 * overhead_1:+.1f} % at 1 worker "
                                             f"(vs plain, 1 thread), {100 * overhead_2:+.1f} % at 2 workers "
                                             "(vs the faster plain run on the same 2 cores; goal under 10 %)")
        per_machine = 60.0 / ray2
        for machines in (1, 4, 16, 64):
            hours = 10_000 / (per_machine * machines) / 60.0
            benchlib.report("cohort throughput", f"10,000 scans on {machines} machine(s) like this one: "
                                                 f"{hours:.2f} h ({per_machine * machines:.0f} scans/min)")
