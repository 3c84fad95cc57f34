"""One batch or sweep job in its own process, given as JSON on stdin: `python -m qconvert.worker`.

A job is a serialized request, not command-line flags:

    {"task": "convert", "source": "...", "output": "...", "recipe": "r.toml" | null,
     "options": {"bits": 4, "target_size": "90MB", ...}, "calibration": {"text": "...", "samples": 64},
     "force": false, "command": ["qconvert", "batch", "jobs.toml"]}
    {"task": "evaluate", "model": "...", "text": "..." | null, "dataset": null, "tokenizer": "...",
     "settings": {"ctx": 512, "max_tokens": 20480, "decode_tokens": 32, "use_kernels": true}}

`options` are `Settings` fields (a recipe's defaults beneath them), `calibration` is
`CalibrationSettings` fields. On success the worker prints one JSON line on stdout (the conversion's
totals and peak RSS, or the evaluation's result); on failure one sentence on stderr and the exit code
`qconvert` itself would give, so the parent reports a job exactly as if it had run the command.
Running each job in a fresh process keeps its peak memory its own, and a crash cannot take the
batch down.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from qconvert.errors import SchemeError
from qconvert.events import maxrss_bytes


def run(job: dict) -> dict:
    """Do one job and return what the parent reports about it.

    Raises:
        SchemeError: an unknown task.
        QConvertError: whatever the conversion or evaluation raises.
    """
    if job.get("task") == "convert":
        return _convert(job)
    if job.get("task") == "evaluate":
        return _evaluate(job)
    raise SchemeError(f"unknown worker task {job.get('task')!r}; tasks are convert and evaluate.")


def _convert(job: dict) -> dict:
    from qconvert.conversion import convert
    from qconvert.events import peak_rss
    from qconvert.settings import settings_from_options

    settings = settings_from_options(job.get("recipe"), job.get("options") or {}, job.get("calibration") or {})
    force = job.get("force", False)
    result = convert(
        job["source"], job["output"], settings, force=force, command=job.get("command"), check_resources=not force
    )
    return {"output": str(result.output), "totals": result.manifest.totals, "peak_rss_bytes": peak_rss()}


def _evaluate(job: dict) -> dict:
    from qconvert.evaluate.evaluation import EvalSettings, evaluate
    from qconvert.io.text import read_text

    text = read_text(Path(job["text"]) if job.get("text") else None, job.get("dataset"))
    tokenizer = Path(job["tokenizer"]) if job.get("tokenizer") else None
    return evaluate(Path(job["model"]), text, EvalSettings(**job.get("settings", {})), None, tokenizer).to_dict()


def run_in_process(job: dict) -> tuple[int, str, str, int]:
    """Run one job in a fresh `qconvert.worker` process: (exit code, stdout, stderr, peak RSS in bytes);
    wait4 gives this child's own peak."""
    command = [sys.executable, "-m", "qconvert.worker"]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdin.write(json.dumps(job))
    process.stdin.close()
    output: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda name=name, pipe=pipe: output.__setitem__(name, pipe.read()))
        for name, pipe in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for reader in readers:
        reader.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:  # interrupted (Ctrl-C, a cancelled Ray task): stop the job as SIGTERM stops qconvert
        process.terminate()
        process.wait()
        raise
    for reader in readers:
        reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return process.returncode, output.get("stdout", ""), output.get("stderr", ""), maxrss_bytes(usage.ru_maxrss)


def main() -> None:
    import typer

    from qconvert.cli.common import exit_now, run_command

    def action() -> None:
        try:
            job = json.loads(sys.stdin.read())
        except json.JSONDecodeError as exc:
            raise SchemeError(f"the worker's job is not JSON: {exc}.") from exc
        if job.get("task") == "convert":  # batch jobs share the cores; evaluations time decoding, so spin
            from qconvert.io.threads import idle_threads_sleep

            idle_threads_sleep()  # before torch is imported
        print(json.dumps(run(job), sort_keys=True))

    try:
        run_command(action)  # the command line's one mapping of errors to a sentence and an exit code
    except typer.Exit as exc:
        exit_now(exc.exit_code)
    exit_now(0)


if __name__ == "__main__":
    main()
