"""Output layouts: how quantized weights are named and laid out in the safetensors file."""

from qconvert.errors import SchemeError
from qconvert.formats.base import Layout
from qconvert.formats.compressed_tensors import CompressedTensorsLayout
from qconvert.formats.native import NativeLayout

LAYOUTS: dict[str, type[Layout]] = {"compressed-tensors": CompressedTensorsLayout, "native": NativeLayout}
LAYOUT_CHOICES = ("auto", *LAYOUTS)


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise SchemeError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUT_CHOICES)}.")
    return LAYOUTS[name]()


def choose_layout(
    requested: str, quantized: list[tuple[str, tuple[int, ...], object]], roles: dict[str, str] | None = None
) -> Layout:
    """The layout to write: the requested one, or for "auto" compressed-tensors when it can hold
    every quantized tensor (so transformers loads the output with no qconvert code), else native.
    `roles` are the tensors' roles in the model the runtime builds (`io/skeleton.py`), where known.

    Raises:
        SchemeError: an explicitly requested layout cannot hold one of the tensors.
    """
    layout = CompressedTensorsLayout() if requested == "auto" else get_layout(requested)
    reasons = [
        layout.unsupported_reason(name, shape, config, (roles or {}).get(name)) for name, shape, config in quantized
    ]
    reasons.append(layout.unsupported_mix_reason([config for _, _, config in quantized]))
    reason = next((r for r in reasons if r), None)
    if reason and requested == "auto":
        return NativeLayout()
    if reason:
        raise SchemeError(f"--layout {requested} cannot store this model: {reason}; use --layout native or auto.")
    return layout
