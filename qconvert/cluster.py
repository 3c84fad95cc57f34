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

from qconvert.batch import Job, JobResult, is_current, run_job, write_report
from qconvert.errors import QConvertError, SchemeError

GB = 1e9
DEFAULT_JOB_MEMORY = 1 * GB  # a job whose prediction fails still asks for this much (it then reports its error)


def connect(address: str) -> None:
    """Connect to a running Ray cluster (`auto`: the one this machine belongs to; `local`: start one here).

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
        ray.init(address=None if address == "local" else address, log_to_driver=False, logging_level="ERROR")
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
    results: list[JobResult | None] = [None] * len(jobs)
    pending = {}
    for index, job in enumerate(jobs):
        if not force and is_current(job):
            results[index] = run_job(job, force)  # reports it skipped, with its output's figures
            continue
        memory = job_memory(job)
        task = remote.options(num_cpus=1, memory=memory, max_retries=0).remote(job, force, 1)
        pending[task] = index
    write_report(report, jobs, results)
    stopped = False
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        try:
            result, placement = ray.get(done[0])
        except ray.exceptions.TaskCancelledError:
            continue  # never started after a failure: "not run"
        result.placement = placement
        results[index] = result
        write_report(report, jobs, results)
        if on_result:
            on_result(result)
        if result.status == "failed" and not keep_going and not stopped:
            stopped = True  # as locally: jobs not started are not run, running ones finish
            for task in pending:
                ray.cancel(task)
    final = [
        r
        or JobResult(
            source=j.source, output=str(j.output), recipe=str(j.recipe) if j.recipe else None, status="not run"
        )
        for j, r in zip(jobs, results)
    ]
    write_report(report, jobs, final)
    return final


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

    def run_parts(calls: list) -> list[dict]:
        return ray.get([remote.options(num_cpus=1, max_retries=0).remote(*call) for call in calls])

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
