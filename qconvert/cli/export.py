"""`qconvert export`: write an output in another runtime's format, saying which tensors moved exactly."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from qconvert.cli.common import app, print_export, run_command
from qconvert.cli.options import ExportFormat


@app.command()
def export(
    output: Annotated[Path, typer.Argument(metavar="OUT", help="A qconvert output folder.")],
    to: Annotated[ExportFormat, typer.Option("--to", help="Target format.")],
    destination: Annotated[
        Optional[Path],
        typer.Option(
            "-o",
            "--output",
            help=(
                "Where to write (default: OUT.gguf, or the folder OUT-mlx, OUT-gptq, OUT-compressed-tensors "
                "beside OUT)."
            ),
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the destination if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report on stdout.")] = False,
) -> None:
    """Write a qconvert output in another runtime's format, saying which tensors moved exactly."""
    from qconvert.formats.export import export as export_output

    def action() -> None:
        report = export_output(output, to.value, destination, force)
        if as_json:
            print(json.dumps(report.to_dict(), sort_keys=True))
        else:
            print_export(report)

    run_command(action)
