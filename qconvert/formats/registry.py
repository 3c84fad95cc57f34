"""Which module does what for each format: the layouts `qconvert model` writes, the readers of
checkpoints other tools quantized, the exporters, and the runtime checks. A new format is one module
in this package plus its lines here."""

from pathlib import Path
from typing import Callable

from qconvert.errors import SchemeError
from qconvert.formats import LAYOUT_CHOICES, Format, awq, compressed_tensors, gguf, gptq, mlx, native
from qconvert.formats.base import Layout, Problem, Reader
from qconvert.formats.exporting import ExportReport

LAYOUTS: dict[str, type[Layout]] = {
    Format.COMPRESSED_TENSORS: compressed_tensors.CompressedTensorsLayout,
    Format.NATIVE: native.NativeLayout,
}
READERS: dict[str, Reader] = {  # by the quant_method a checkpoint's config names
    Format.GPTQ: gptq.READER,
    Format.AWQ: awq.READER,
    Format.COMPRESSED_TENSORS: compressed_tensors.READER,
}
# export(qconvert output, destination, force) -> what moved exactly
EXPORTERS: dict[str, Callable[..., ExportReport]] = {
    Format.GGUF: gguf.export,
    Format.MLX: mlx.export,
    Format.GPTQ: gptq.export,
    Format.COMPRESSED_TENSORS: compressed_tensors.export,
}
# check(path, runtime) -> the problems that runtime would have loading a file of this format
CHECKS: dict[str, Callable[[Path, str], list[Problem]]] = {
    Format.GGUF: gguf.check,
    Format.MLX: mlx.check,
    Format.GPTQ: gptq.check,
    Format.COMPRESSED_TENSORS: compressed_tensors.check,
}


def get_layout(name: str) -> Layout:
    """The layout called `name`.

    Raises:
        SchemeError: no layout has that name.
    """
    if name not in LAYOUTS:
        raise SchemeError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUT_CHOICES)}.")
    return LAYOUTS[name]()


def choose_layout(
    requested: str, quantized: list[tuple[str, tuple[int, ...], object]], roles: dict[str, str] | None = None
) -> Layout:
    """The layout to write: the requested one, or for "auto" compressed-tensors when it can hold
    every quantized (name, shape, config) tensor (so transformers loads the output with no qconvert
    code), else native. `roles` are the tensors' roles in the model the runtime builds (`io/skeleton.py`).

    Raises:
        SchemeError: an explicitly requested layout cannot hold one of the tensors.
    """
    layout = get_layout(Format.COMPRESSED_TENSORS if requested == "auto" else requested)
    refusal = layout.refusal(quantized, roles)
    if refusal and requested == "auto":
        return native.NativeLayout()
    if refusal:
        raise SchemeError(f"--layout {requested} cannot store this model: {refusal}; use --layout native or auto.")
    return layout
