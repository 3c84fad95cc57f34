"""Batch jobs and one model's shards on a Ray cluster; the only module that imports Ray.

Ray (`pip install 'qconvert[cluster]'`) schedules; qconvert does not. `qconvert batch JOBS.toml
--cluster ADDRESS|auto|local` turns each job into a Ray task that asks for one CPU and the peak
memory `qconvert plan` predicts for it, so the scheduler never puts more jobs on a node than its
memory holds. The task runs the job exactly as a local batch does (a fresh `qconvert.worker`
process, its threads limited to the task's CPUs); outputs are written to paths every node sees (a
shared folder), through a staging name and an atomic rename as always. The driver checks which
outputs are current before submitting anything, writes the report after every finished job and
stops submitting at the first failure unless `--keep-going`; killed and restarted, it skips the
jobs that finished.

`convert_across_cluster` converts one model's output shards (`--max-shard-size`) as separate tasks,
each writing its shard's tensors; the driver then writes the one manifest into every shard's header,
the index and the sidecars, and publishes. The output is byte-identical to a single-machine
conversion. Calibrated quantizers are refused there: each block's calibration needs the previous
block's quantized outputs, so their work is a chain, not a set of independent parts.
"""

import os
import time
from pathlib import Path
from typing import Callable

from qconvert.batch import Job, JobResult, finish_report, is_current, job_result, run_job, write_report
from qconvert.errors import QConvertError, SchemeError

GB = 1e9
DEFAULT_JOB_MEMORY = 1 * GB  # a job whose prediction fails still asks for this much (it then reports its error)


def connect(address: str) -> None:
    """Connect to a running Ray cluster (`auto`: the one this machine belongs to; `local`: start a new one
    here, whatever RAY_ADDRESS says). A process already connected keeps its connection.

    Raises:
        SchemeError: Ray is not installed, or no cluster answers at `address`.
    """
    try:
        import ray
    except ImportError as exc:
        raise SchemeError(
            "--cluster runs jobs on a Ray cluster, and Ray is not installed: pip install 'qconvert[cluster]'."
        ) from exc
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SchemeError(f"cannot reach a Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from exc


def job_memory(job: Job) -> int:
    """The peak RSS `qconvert plan` predicts for `job`, in bytes (DEFAULT_JOB_MEMORY if it cannot say)."""
    from qconvert.settings import settings_from_options

    worker = job.worker_job(force=False)
    try:
        settings = settings_from_options(worker["recipe"], worker["options"], worker["calibration"])
    except QConvertError:
        return int(DEFAULT_JOB_MEMORY)
    return _settings_memory(job.source, settings, job.output)


def _run_on_node(job: Job, force: bool, cpus: int) -> tuple[JobResult, dict]:
    """A job inside a Ray task: run as a local batch runs it, with where and when it ran."""
    import ray

    os.environ["OMP_NUM_THREADS"] = str(cpus)  # the job's process inherits it: threads for the CPUs it asked
    began = time.time()
    result = run_job(job, force)
    return result, {"node": ray.get_runtime_context().get_node_id(), "began": began, "ended": time.time()}


def run_batch_on_cluster(
    jobs: list[Job],
    report: Path,
    address: str,
    force: bool = False,
    keep_going: bool = False,
    on_result: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """`batch.run_batch` with every job a Ray task sized by its predicted memory; the report gains each
    job's node and start and end times (seconds since the epoch), in `placement`.

    Raises:
        SchemeError: see `connect`.
    """
    connect(address)  # first: it refuses in one sentence where Ray is missing
    import ray

    remote = ray.remote(_run_on_node)
    largest = _largest_node_memory()
    # At most one job per CPU of the cluster is submitted at a time, so that after a failure (without
    # --keep-going) the jobs not yet started are simply never submitted, and the running ones finish.
    window = max(1, int(ray.cluster_resources().get("CPU", 1)))
    results: list[JobResult | None] = [None] * len(jobs)
    waiting = list(range(len(jobs)))
    pending: dict = {}
    stopped = False
    while (waiting and not stopped) or pending:
        while waiting and not stopped and len(pending) < window:
            index = waiting.pop(0)
            job = jobs[index]
            if not force and is_current(job):
                results[index] = run_job(job, force)  # reports it skipped, with its output's figures
                if on_result:
                    on_result(results[index])
                continue
            memory = job_memory(job)
            if largest is not None and memory > largest:  # Ray would keep it pending for ever
                needs = f"it needs about {memory / GB:.2f} GB and the largest node has {largest / GB:.2f} GB"
                results[index] = job_result(job, "failed", error=needs)
                if on_result:
                    on_result(results[index])
                stopped = not keep_going
                continue
            pending[remote.options(num_cpus=1, memory=memory, max_retries=0).remote(job, force, 1)] = index
        write_report(report, jobs, results)
        if not pending:
            continue
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        try:
            result, placement = ray.get(done[0])
            result.placement = placement
        except ray.exceptions.RayError as exc:  # the task itself failed: its node died, out of memory...
            result = job_result(
                jobs[index], "failed", error=f"Ray could not run it: {str(exc).strip().splitlines()[0]}"
            )
        results[index] = result
        write_report(report, jobs, results)
        if on_result:
            on_result(result)
        stopped = stopped or (result.status == "failed" and not keep_going)
    return finish_report(report, jobs, results)


def _largest_node_memory() -> int | None:
    """The most `memory` any live node offers Ray, in bytes (None when Ray does not say)."""
    import ray

    sizes = [n.get("Resources", {}).get("memory") for n in ray.nodes() if n.get("Alive")]
    sizes = [s for s in sizes if s]
    return int(max(sizes)) if sizes else None


def convert_across_cluster(
    source: str | Path,
    output: str | Path,
    settings,
    address: str,
    *,
    force: bool = False,
    command: list[str] | None = None,
    check_runtime: bool = True,
):
    """`conversion.convert_in_parts` with each output shard converted by its own Ray task (one CPU, the
    memory `qconvert plan` predicts for the whole conversion, an upper bound for one shard's).

    Raises:
        SchemeError: see `connect` and `convert_in_parts`.
    """
    from qconvert.conversion import convert_in_parts, convert_part

    connect(address)  # first: it refuses in one sentence where Ray is missing
    import ray

    remote = ray.remote(convert_part)
    memory = _settings_memory(source, settings, output)

    def run_parts(calls: list) -> list[dict]:
        tasks = [remote.options(num_cpus=1, memory=memory, max_retries=0).remote(*call) for call in calls]
        try:
            return ray.get(tasks)
        except BaseException as exc:  # stop the other parts before the staging folder goes
            for task in tasks:
                ray.cancel(task, force=True)
            ray.wait(tasks, num_returns=len(tasks), timeout=60)
            cause = getattr(exc, "cause", None)  # a part's own error, in one sentence, rather than Ray's wrapper
            if isinstance(cause, QConvertError):
                raise cause from None
            raise

    return convert_in_parts(
        source, output, settings, run_parts, force=force, command=command, check_runtime=check_runtime
    )


def sweep_mapper(address: str) -> Callable:
    """For `evaluate.sweep.run_sweep`: each setting's conversion and evaluation as one Ray task (one CPU,
    the predicted memory of its conversion). Speeds are then measured on whichever node ran the row.

    Raises:
        SchemeError: see `connect`.
    """
    connect(address)  # first: it refuses in one sentence where Ray is missing
    import ray

    def map_settings(setting_row: Callable, arguments: list[tuple]) -> list:
        remote = ray.remote(setting_row)
        tasks = [
            remote.options(num_cpus=1, memory=_settings_memory(source, settings, path), max_retries=0).remote(
                source, settings, path, evaluation
            )
            for source, settings, path, evaluation in arguments
        ]
        return ray.get(tasks)

    return map_settings


def _settings_memory(source, settings, output) -> int:
    from qconvert.io.sources import open_checkpoint
    from qconvert.plan.planning import plan_conversion
    from qconvert.plan.prediction import predict

    try:
        checkpoint = open_checkpoint(source)
        return predict(checkpoint, plan_conversion(checkpoint, settings), settings, Path(output)).peak_rss_bytes
    except QConvertError:
        return int(DEFAULT_JOB_MEMORY)
