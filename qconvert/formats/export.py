"""`qconvert export`: read a qconvert output and hand it to the format's exporter."""

from pathlib import Path

from qconvert.errors import SchemeError, UnsupportedModelError
from qconvert.formats import EXPORTS, HOLDS_ACTIVATIONS
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
    source = open_output(output)
    if to not in HOLDS_ACTIVATIONS and any(r.activations for r in source.manifest.tensors):
        raise UnsupportedModelError(
            f"{output} quantizes its linears' inputs (W8A8), which {to} cannot express, so the export would not "
            "compute what it does; export it to compressed-tensors, or convert without --activations."
        )
    return EXPORTERS[to](source, destination or default_destination(output, to), force)
