"""Distributed inference on a Ray cluster (heartseg[ray]): one ONNX Runtime session per worker, one scan per task.

Ray Core actors fed through ray.util.ActorPool: each actor builds one Segmenter (the model is
loaded once per worker) and runs pipeline.run_job, the per-scan function of every local run, so
outputs, records, QC and failures are exactly those of a local run. A scan is the unit of work
and its inputs and outputs are files on a file system every node sees, so nothing but the scan's
job and its small result crosses the object store. An actor that dies (killed, out of memory,
its node lost) is restarted by Ray (max_restarts) and its scan retried (max_task_retries); the
retry goes through run_job again, which reports a scan from its record when the dead attempt had
finished it and otherwise replaces its leftovers, so no scan is done twice or left partial.

Ray is imported only when a Ray run starts: the lean runtime never imports it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import EXIT_FAILED, HeartsegError, InputError
from .pipeline import (
    OutputOptions,
    ScanJob,
    ScanResult,
    finished_record,
    job_provenance,
    record_path,
    result_from_record,
    settled,
    write_record,
)
from .segmenter import resolve_model
from .session import model_identity

# A local cluster only moves small jobs and results through its object store.
LOCAL_OBJECT_STORE_BYTES = 200 * 1024 * 1024


@dataclass
class RayConfig:
    """Where and how a Ray run segments: the cluster, the workers, and how they survive failures."""

    address: str = "auto"  # auto: the running cluster, else a local one; or HOST:PORT, ray://HOST:PORT
    workers: int | None = None  # default: the cluster's CPUs (GPUs for cuda) divided by what one worker takes
    threads: int = 1  # ONNX Runtime threads, and CPUs reserved, per worker
    device: str = "cpu"
    memory_limit_mb: float | None = None
    max_restarts: int = 3  # per worker
    max_task_retries: int = 2  # per scan, after its worker died
    local_num_cpus: int | None = None  # a local cluster's CPUs (default: all)


def require_ray() -> Any:
    """The ray module, or InputError telling how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install ray, or pip install -e '.[ray]' in heartseg's source "
                         "folder") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast, in one line, when HOST:PORT does not answer (ray.init would retry for a minute)."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(f"--ray {address}: give auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise InputError(f"--ray {address}: cannot reach a Ray cluster there ({exc.strerror or exc})") from None


def connect(config: RayConfig) -> bool:
    """Connect this process to the cluster config names; True when it started one that it must shut down."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if config.address == "auto":
        try:
            ray.init(address="auto", **quiet)
            return True
        except ConnectionError:
            ray.init(num_cpus=config.local_num_cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     include_dashboard=False, **quiet)
            return True
    _check_reachable(config.address)
    try:
        ray.init(address=config.address, **quiet)
    except Exception as exc:  # Ray raises several types for an address it cannot use
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--ray {config.address}: cannot connect to the Ray cluster ({message})") from None
    return True


class SegmentWorker:
    """A Ray actor's state: one Segmenter (one ONNX Runtime session) for every scan it is given."""

    def __init__(self, model: str | None, device: str, threads: int, memory_limit_mb: float | None) -> None:
        from .segmenter import Segmenter

        self.segmenter = Segmenter(model, device=device, threads=threads, memory_limit_mb=memory_limit_mb)

    def run(self, job: ScanJob, options: OutputOptions) -> ScanResult:
        """Segment one scan through the local pipeline's per-scan function."""
        from .pipeline import run_job

        return run_job(self.segmenter, job, options)

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()


def _default_workers(ray: Any, config: RayConfig) -> int:
    resources = ray.cluster_resources()
    if config.device == "cuda":
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1) // max(1, config.threads)))


def _absolute(job: ScanJob) -> ScanJob:
    """The job with absolute paths."""
    absolute = lambda path: None if path is None else Path(path).absolute()  # noqa: E731
    return replace(job, source=replace(job.source, path=absolute(job.source.path)), mask_path=absolute(job.mask_path),
                   prob_path=absolute(job.prob_path), overlay_path=absolute(job.overlay_path),
                   mesh_path=absolute(job.mesh_path), label=absolute(job.label))


def _lost(job: ScanJob, options: OutputOptions, reason: str, model: dict[str, Any]) -> ScanResult:
    """A scan that never came back: done after all if a try finished it, else failed and recorded."""
    provenance = job_provenance(job, model)
    record = finished_record(job, provenance)
    if record is not None:
        return result_from_record(job, record)
    result = ScanResult(job, "failed", exit_code=EXIT_FAILED, error=f"{job.source.path.name}: {reason}")
    try:
        write_record(result, options, provenance)
    except (OSError, HeartsegError):
        pass  # without a record the scan simply counts as not done
    return result


def run_jobs_on_ray(model: str | os.PathLike | None, jobs: Sequence[ScanJob], options: OutputOptions,
                    config: RayConfig, on_done: Callable[[ScanResult], None] | None = None) -> list[ScanResult]:
    """Segment jobs on the Ray cluster config names (connecting first); one ScanResult per job, in job order."""
    ray = require_ray()
    from ray.util import ActorPool

    options = replace(options, records=True)
    identity = model_identity(resolve_model(model))  # taken once, as each worker takes its own on opening the model
    results: dict[int, ScanResult] = {}
    todo: list[int] = []

    def finish(index: int, result: ScanResult) -> None:
        results[index] = result
        if on_done is not None:
            on_done(result)

    for index, job in enumerate(jobs):
        if options.overwrite:
            # This run starts afresh; from here on, a record means this run finished the scan.
            record_path(job).unlink(missing_ok=True)
            todo.append(index)
        elif (done := settled(job, options, job_provenance(job, identity))) is not None:
            finish(index, done)
        else:
            todo.append(index)
    if not todo:
        return [results[i] for i in range(len(jobs))]
    # Leftover outputs of the scans sent out can only come from a dead try of this run: replace them.
    worker_options = replace(options, resume=True, overwrite=False)
    started = connect(config)
    try:
        workers = min(config.workers or _default_workers(ray, config), len(todo))
        actor_class = ray.remote(SegmentWorker).options(
            num_cpus=config.threads, num_gpus=1 if config.device == "cuda" else 0,
            max_restarts=config.max_restarts, max_task_retries=config.max_task_retries)
        model_arg = None if model is None else str(model)

        def new_actor() -> Any:
            return actor_class.remote(model_arg, config.device, config.threads, config.memory_limit_mb)

        pool = ActorPool([new_actor() for _ in range(workers)])
        sent = {i: _absolute(jobs[i]) for i in todo}  # workers may start in another folder
        for i in todo:
            pool.submit(lambda actor, job: actor.run.remote(job, worker_options), sent[i])
        # Results come back as copies: match them to their jobs by the mask path, unique in a run.
        index_of = {job.mask_path: i for i, job in sent.items()}
        replaced = 0
        reason = f"its worker died {config.max_task_retries + 1} times while segmenting it"
        while pool.has_next():
            try:
                result = pool.get_next_unordered()
            except ray.exceptions.ActorDiedError:
                # The pool drops the dead worker and Ray does not say which scan it held: those that
                # never come back are settled by _lost below.
                if replaced < workers:
                    replaced += 1
                    pool.push(new_actor())
                continue
            except ray.exceptions.RayError as exc:
                reason = f"Ray could not run it ({str(exc).strip().splitlines()[0]})"
                continue
            index = index_of[result.job.mask_path]
            finish(index, replace(result, job=jobs[index]))
        for i in todo:
            if i not in results:
                finish(i, _lost(jobs[i], options, reason, identity))
    finally:
        if started:
            ray.shutdown()
    return [results[i] for i in range(len(jobs))]


def run(scans: Sequence[str | os.PathLike], output: str | os.PathLike | None = None, model: str | None = None,
        options: OutputOptions | None = None, config: RayConfig | None = None, series: str | None = None,
        on_done: Callable[[ScanResult], None] | None = None) -> list[ScanResult]:
    """Segment files, folders and globs on a Ray cluster, writing exactly what heartseg-infer writes."""
    from .cohort import expand_inputs
    from .formats import discover_sources
    from .pipeline import check_options, output_folders, plan_jobs
    from .session import read_contract
    from .segmenter import resolve_model

    options = options if options is not None else OutputOptions()
    config = config if config is not None else RayConfig()
    require_ray()
    check_options(options)
    read_contract(resolve_model(model))  # a bad model fails here, once, not on every worker
    jobs = plan_jobs(discover_sources(expand_inputs([Path(s) for s in scans]), series),
                     Path(output) if output is not None else None, options)
    for folder in output_folders(jobs):
        folder.mkdir(parents=True, exist_ok=True)
    return run_jobs_on_ray(model, jobs, options, config, on_done)
