"""`qconvert batch`: many models x recipes, each in its own process."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from qconvert.cli.common import app, run_command, stderr, stdout_console
from qconvert.cli.options import ClusterOption


@app.command()
def batch(
    jobs_file: Annotated[
        Path, typer.Argument(metavar="JOBS", help="A TOML file of jobs: sources x recipes (or settings) with outputs.")
    ],
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Jobs to run at once (each is its own process; mind the memory).")
    ] = 1,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Run the remaining jobs after one fails.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo jobs whose output is already current.")] = False,
    report: Annotated[
        Optional[Path],
        typer.Option(help="Where to write the report (default: JOBS-report.json beside JOBS, e.g. jobs-report.json)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report's rows as JSON on stdout.")] = False,
    cluster: ClusterOption = None,
) -> None:
    """Convert many models x recipes; skip outputs that are already current; exit 5 if any job failed."""
    from qconvert.batch import load_jobs, run_batch

    def action() -> int:
        job_list = load_jobs(jobs_file)
        report_path = report or jobs_file.with_name(f"{jobs_file.stem}-report.json")  # one report per jobs file

        def announce(result) -> None:
            detail = (
                result.error if result.status == "failed" else f"{result.seconds or 0:.1f} s" if result.seconds else ""
            )
            stderr.print(f"{result.status}: {result.source} -> {result.output} {detail}", highlight=False)

        if cluster:  # each job a Ray task sized by its predicted memory (`cluster.py`)
            from qconvert.cluster import run_batch_on_cluster

            results = run_batch_on_cluster(
                job_list, report_path, cluster, force=force, keep_going=keep_going, on_result=announce
            )
        else:
            results = run_batch(
                job_list, report_path, force=force, keep_going=keep_going, workers=jobs, on_result=announce
            )
        if as_json:
            from dataclasses import asdict

            print(json.dumps([asdict(r) for r in results], sort_keys=True))
        else:
            table = Table("status", "source", "output", "seconds", "peak RSS GB", "bpw (quantized)", "MB", "error")
            for r in results:
                table.add_row(
                    r.status,
                    r.source,
                    r.output,
                    f"{r.seconds:.1f}" if r.seconds else "",
                    f"{r.peak_rss_bytes / 1e9:.2f}" if r.peak_rss_bytes else "",
                    str(r.quantized_bits_per_weight or ""),
                    f"{r.size_bytes / 1e6:.1f}" if r.size_bytes else "",
                    r.error or "",
                )
            stdout_console().print(table)
        stderr.print(f"wrote {report_path}", highlight=False)
        return 5 if any(r.status in ("failed", "not run") for r in results) else 0

    run_command(action)
