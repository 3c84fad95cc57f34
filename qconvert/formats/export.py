"""`qconvert export`: read a qconvert output and hand it to the format's exporter."""

from pathlib import Path

from qconvert.errors import SchemeError
from qconvert.formats import EXPORTS
from qconvert.formats.exporting import ExportReport
from qconvert.formats.registry import EXPORTERS
from qconvert.output import open_output


def default_destination(output: Path, to: str) -> Path:
    """OUT.gguf for GGUF (one file), OUT-mlx / OUT-gptq / OUT-compressed-tensors folders otherwise."""
    return output.with_suffix(".gguf") if to == "gguf" else output.with_name(f"{output.name}-{to}")


def export(output: Path, to: str, destination: Path | None = None, force: bool = False) -> ExportReport:
    """Write `output` (a qconvert output folder) in format `to` at `destination`.

    Raises:
        SourceError: `output` is not a qconvert output, or lacks a file the format needs.
        UnsupportedModelError: the format cannot describe this model.
        OutputError: `destination` exists and `force` is false.
    """
    if to not in EXPORTERS:
        raise SchemeError(f"unknown export format {to!r}; choose one of {', '.join(EXPORTS)}.")
    return EXPORTERS[to](open_output(output), destination or default_destination(output, to), force)
