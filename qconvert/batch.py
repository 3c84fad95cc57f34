"""Batch conversion: many sources x recipes from one TOML file, each job in its own process.

    # jobs.toml: paths are relative to this file
    [defaults]                      # optional: for every job
    output_dir = "out"              # a job without `output` writes <output_dir>/<source name>-<recipe name>
    calib = "calib.txt"             # calibration text for recipes with calibrated quantizers

    [[jobs]]
    source = "models/smollm2-135m"
    recipe = "configs/int4-g64.toml"
    output = "out/smollm2-int4"     # optional

    [[jobs]]
    source = "models/all-minilm-l6-v2"
    settings = { bits = 8, group_size = 0, symmetric = true }   # instead of a recipe

    [matrix]                        # optional: every source with every recipe
    sources = ["models/smollm2-135m"]
    recipes = ["configs/int8-channel.toml", "configs/int3-g64.toml"]

A job runs in a fresh process (`qconvert.worker`, given the job as JSON), so its seconds and peak RSS
are its own and one job's crash cannot take the batch down. A job whose output already exists with a manifest recording
the same source checksums, the same recipe (by content hash) or settings, and the same qconvert
version is skipped; an interrupted batch therefore resumes where it stopped (and an interrupted
calibrated job resumes from its last finished block).
"""

import json
import os
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from qconvert import __version__
from qconvert.errors import QConvertError, SchemeError, SourceError
from qconvert.io.writing import write_json
from qconvert.manifest import SCHEMA_VERSION, read_manifest
from qconvert.worker import run_in_process

# What a job's `settings` may set: Settings fields, and two calibration fields under their flags' names.
SETTING_KEYS = (
    *("quantizer", "grid", "bits", "group_size", "symmetric", "scale_dtype", "activations", "smooth"),
    *("target_bpw", "target_size", "budget_grids", "layout"),
)
CALIBRATION_KEYS = {"calib_samples": "samples", "calib_seqlen": "seqlen"}
JOB_KEYS = {"source", "recipe", "settings", "output", "calib"}


@dataclass
class Job:
    source: str
    output: Path
    recipe: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    calib: Path | None = None
    batch_file: Path | None = None  # recorded as the manifest's command: `qconvert batch FILE` made it

    @property
    def label(self) -> str:
        return f"{self.source} -> {self.output}"

    def worker_job(self, force: bool) -> dict:
        """This job as `qconvert.worker` takes it."""
        options = {k: v for k, v in self.settings.items() if k in SETTING_KEYS}
        calibration = {CALIBRATION_KEYS[k]: v for k, v in self.settings.items() if k in CALIBRATION_KEYS}
        return {
            "task": "convert",
            "source": self.source,
            "output": str(self.output),
            "recipe": str(self.recipe) if self.recipe else None,
            "options": options,
            "calibration": {**calibration, "text": str(self.calib) if self.calib else None},
            "force": force,
            "command": ["qconvert", "batch", str(self.batch_file)] if self.batch_file else None,
        }


@dataclass
class JobResult:
    source: str
    output: str
    recipe: str | None
    status: str  # "converted", "skipped", "failed" or "not run"
    seconds: float | None = None
    peak_rss_bytes: int | None = None
    quantized_bits_per_weight: float | None = None
    bits_per_weight: float | None = None
    size_bytes: int | None = None
    exit_code: int | None = None
    error: str | None = None
    placement: dict | None = None  # on a cluster: the Ray node it ran on, and when it began and ended


def load_jobs(path: Path) -> list[Job]:
    """The jobs of a batch file, matrix expanded, in order.

    Raises:
        SchemeError: the file is not valid TOML or a job is malformed.
    """
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SchemeError(f"{path}: not valid TOML: {exc}.") from exc
    unknown = set(data) - {"defaults", "jobs", "matrix"}
    if unknown:
        raise SchemeError(
            f"{path}: unknown section [{sorted(unknown)[0]}]; a batch file has [defaults], [[jobs]] and [matrix]."
        )
    base = path.parent
    defaults = data.get("defaults", {})
    entries = list(data.get("jobs", []))
    matrix = data.get("matrix")
    if matrix:
        entries += [{"source": s, "recipe": r} for s in matrix.get("sources", []) for r in matrix.get("recipes", [])]
    if not entries:
        raise SchemeError(f"{path} lists no jobs: add [[jobs]] entries or a [matrix].")
    return [_job(entry, index, defaults, base, path) for index, entry in enumerate(entries)]


def _name_part(key: str, value) -> str:
    """A setting in an output folder's name: a name stands for itself ("nf4", "int8-dynamic"), a number
    says whose it is ("bits4")."""
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return value if isinstance(value, str) else f"{key}{value}"


def _job(entry: dict, index: int, defaults: dict, base: Path, path: Path) -> Job:
    where = f"{path}, job {index + 1}"
    unknown = set(entry) - JOB_KEYS
    if unknown:
        raise SchemeError(f"{where}: unknown key `{sorted(unknown)[0]}`; a job has {', '.join(sorted(JOB_KEYS))}.")
    if "source" not in entry:
        raise SchemeError(f"{where}: no `source`.")
    if "recipe" in entry and "settings" in entry:
        raise SchemeError(f"{where}: give a `recipe` or `settings`, not both.")
    settings = entry.get("settings", {})
    bad = set(settings) - set(SETTING_KEYS) - set(CALIBRATION_KEYS)
    if bad:
        raise SchemeError(
            f"{where}: unknown setting `{sorted(bad)[0]}`; settings take "
            f"{', '.join(sorted([*SETTING_KEYS, *CALIBRATION_KEYS]))}."
        )
    source = _resolve(entry["source"], base)
    recipe = Path(_resolve(entry["recipe"], base)) if "recipe" in entry else None
    # Outputs are always paths relative to this file: "out/int4" is a folder to create, never a hub id.
    if "output" in entry:
        output = base / entry["output"]
    else:
        name = recipe.stem if recipe else "-".join(_name_part(k, v) for k, v in sorted(settings.items())) or "default"
        output = base / defaults.get("output_dir", ".") / f"{Path(source).name}-{name}"
    calib = entry.get("calib", defaults.get("calib"))
    return Job(
        source=source,
        output=output,
        recipe=recipe,
        settings=settings,
        calib=Path(_resolve(calib, base)) if calib else None,
        batch_file=path.resolve(),
    )


def _resolve(value: str, base: Path) -> str:
    """Relative paths are relative to the batch file; a hub id (org/name, not on disk) stays as it is."""
    candidate = base / value
    if Path(value).is_absolute() or candidate.exists() or not _looks_like_hub_id(value):
        return str(candidate if not Path(value).is_absolute() else Path(value))
    return value


def _looks_like_hub_id(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/")) and not Path(value).suffix


def is_current(job: Job) -> bool:
    """The job's output exists and records this source (by checksum), recipe or settings, and qconvert version."""
    if not (job.output / "qconvert.json").is_file():
        return False
    try:
        manifest = read_manifest(job.output)
        from qconvert.io.sources import open_checkpoint

        checkpoint = open_checkpoint(job.source)
    except QConvertError:
        return False
    if manifest.qconvert_version != __version__ or manifest.schema_version != SCHEMA_VERSION:
        return False
    recorded = manifest.settings.get("recipe") or {}
    if job.recipe is not None:
        import hashlib

        if recorded.get("sha256") != hashlib.sha256(job.recipe.read_bytes()).hexdigest():
            return False
    elif recorded or any(manifest.settings.get(k) != v for k, v in job.settings.items() if k in manifest.settings):
        return False
    base = checkpoint.folder or checkpoint.files[0].parent
    current = {str(f.relative_to(base)): checkpoint.sha256(f) for f in checkpoint.files + checkpoint.auxiliary_files()}
    return manifest.source.get("sha256") == current


def job_result(job: Job, status: str, **fields) -> JobResult:
    """A result row for `job` with `status` (and any other JobResult fields)."""
    recipe = str(job.recipe) if job.recipe else None
    return JobResult(source=job.source, output=str(job.output), recipe=recipe, status=status, **fields)


def finish_report(report: Path, jobs: list[Job], results: list[JobResult | None]) -> list[JobResult]:
    """Every job's result, "not run" for those that never ran, also written to `report`."""
    final = [r or job_result(j, "not run") for j, r in zip(jobs, results)]
    write_report(report, jobs, final)
    return final


def run_job(job: Job, force: bool) -> JobResult:
    result = job_result(job, "failed")
    if not force and is_current(job):
        result.status = "skipped"
        _fill_from_output(result, job.output)
        return result
    started = time.monotonic()
    code, stdout, stderr, peak = run_in_process(job.worker_job(force=force or job.output.exists()))
    result.seconds = round(time.monotonic() - started, 2)
    result.peak_rss_bytes = peak
    result.exit_code = code
    if code == 0:
        result.status = "converted"
        result.peak_rss_bytes = _reported_peak(stdout) or peak
        _fill_from_output(result, job.output)
    else:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        result.error = (lines[-1] if lines else f"exit code {code}").removeprefix("error: ")
    return result


def _reported_peak(stdout: str) -> int | None:
    """The job's own peak RSS from its JSON summary: wait4's figure also counts the memory of the
    process it was forked from, so it is only the fallback."""
    try:
        return json.loads(stdout.strip().splitlines()[-1]).get("peak_rss_bytes")
    except (ValueError, IndexError, AttributeError):
        return None


def _fill_from_output(result: JobResult, output: Path) -> None:
    totals = read_manifest(output).totals
    result.quantized_bits_per_weight = totals.get("quantized_bits_per_weight")
    result.bits_per_weight = totals.get("bits_per_weight")
    result.size_bytes = totals.get("stored_bytes")


def run_batch(
    jobs: list[Job],
    report: Path,
    force: bool = False,
    keep_going: bool = False,
    workers: int = 1,
    on_result: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Run every job, writing `report` after each; stop at the first failure unless `keep_going`."""
    results: list[JobResult | None] = [None] * len(jobs)
    stop = False

    def one(index: int) -> None:
        nonlocal stop
        if stop:
            return
        results[index] = run_job(jobs[index], force)
        if results[index].status == "failed" and not keep_going:
            stop = True
        write_report(report, jobs, results)
        if on_result:
            on_result(results[index])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, range(len(jobs))))
    return finish_report(report, jobs, results)


def write_report(report: Path, jobs: list[Job], results: list) -> None:
    """The batch report, replaced atomically: every job's result so far, "pending" for the others."""
    rows = [
        asdict(r) if r else {"source": j.source, "output": str(j.output), "status": "pending"}
        for j, r in zip(jobs, results)
    ]
    staging = report.with_name(f".{report.name}.partial")
    write_json(staging, {"qconvert_version": __version__, "jobs": rows})
    os.replace(staging, report)
