"""`qconvert export`: which exporter writes which format (each in its own module of this package)."""

from pathlib import Path

from qconvert.errors import SchemeError
from qconvert.formats import compressed_tensors_export, gguf, gptq, mlx
from qconvert.formats.exporting import ExportReport

EXPORTERS = {
    "gguf": gguf.export_gguf,
    "mlx": mlx.export_mlx,
    "gptq": gptq.export_gptq,
    "compressed-tensors": compressed_tensors_export.export_compressed_tensors,
}
FORMATS = tuple(EXPORTERS)


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
    # Imported here, not at the top: each exporter reads outputs through qconvert.output, which needs the
    # layouts of this package, and pulls in its own libraries (gguf, ...).
    from qconvert.formats import compressed_tensors_export, gguf, gptq, mlx

    exporters = {
        "gguf": gguf.export_gguf,
        "mlx": mlx.export_mlx,
        "gptq": gptq.export_gptq,
        "compressed-tensors": compressed_tensors_export.export_compressed_tensors,
    }
    if to not in exporters:
        raise SchemeError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}.")
    return EXPORTERS[to](output, destination or default_destination(output, to), force)
