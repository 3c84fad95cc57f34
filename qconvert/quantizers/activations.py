"""Activation quantization: what a W8A8 layer does to its input before the low-precision matmul.

Three schemes, each compressed-tensors' own (so transformers and vLLM compute what qconvert computes):

- `int8-dynamic`: each token (row of the input) gets its own scale, absmax / 127.5, and codes
  round(x / scale) clamped to [-128, 127]. 127.5 is compressed-tensors' convention for symmetric int8
  (its range [-128, 127] is 255 steps wide), which transformers runs; vLLM's dynamic int8 kernel
  divides by 127, a difference of 1/255 in the scale.
- `int8-static`: one scale per layer, fixed at conversion from the largest input the calibration text
  produced (absmax / 127.5); a larger input at run time is clamped, as every static-scale runtime does.
- `fp8-dynamic`: each token scaled by absmax / 448 onto FP8 E4M3 (round to nearest even), with FP8
  E4M3 weights per output channel.

Weights of W8A8 layers are 8-bit with one scale per output channel, symmetric: int8 for the int
schemes, FP8 E4M3 for fp8 (`weights_of`).
"""

from dataclasses import dataclass

import torch

from qconvert.errors import SchemeError


@dataclass(frozen=True)
class ActivationScheme:
    """How a layer's input is quantized.

    Attributes:
        name: the command line's name, e.g. "int8-dynamic".
        kind: "int" (int8 codes) or "float" (FP8 E4M3 values).
        dynamic: scales computed per token at run time; else one static scale per layer from calibration.
        weight_grid: the grid the layer's weights take (`grids.py`): "int" at 8 bits, or "fp8".
        steps: absmax / steps is the scale: half the int8 range (127.5) or FP8 E4M3's largest value (448).
    """

    name: str
    kind: str
    dynamic: bool
    weight_grid: str
    steps: float


SCHEMES = {
    s.name: s
    for s in (
        ActivationScheme("int8-dynamic", "int", True, "int", 127.5),
        ActivationScheme("int8-static", "int", False, "int", 127.5),
        ActivationScheme("fp8-dynamic", "float", True, "fp8", 448.0),
    )
}


def get_scheme(name: str) -> ActivationScheme:
    """Raises: SchemeError: no such scheme."""
    if name not in SCHEMES:
        raise SchemeError(f"--activations {name} is not supported; choose one of {', '.join(SCHEMES)}.")
    return SCHEMES[name]


def weights_of(name: str) -> dict:
    """The weight settings a scheme implies (8-bit, symmetric, per output channel, its grid)."""
    return {"grid": get_scheme(name).weight_grid, "bits": 8, "symmetric": True, "group_size": 0}


def needs_calibration(name: str, smooth: float | str | None) -> bool:
    """Whether a W8A8 layer needs calibration text: SmoothQuant measures its inputs, and a static scheme
    takes its input scale from them."""
    return smooth is not None or not get_scheme(name).dynamic


def static_scale(absmax: float, name: str) -> torch.Tensor:
    """float32 (1,): the static input scale of a layer whose calibration inputs reached `absmax`."""
    scale = absmax / get_scheme(name).steps
    return torch.tensor([scale if scale > 0 else 1.0], dtype=torch.float32)


def input_scales(x: torch.Tensor, name: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 scales of `x` (..., n): (..., 1) per token for dynamic schemes, the static (1,) otherwise.

    Raises:
        SchemeError: a static scheme without its scale.
    """
    scheme = get_scheme(name)
    if not scheme.dynamic:
        if input_scale is None:
            raise SchemeError(f"{name} activations need the input scale found at calibration; this layer has none.")
        return input_scale.float()
    scales = x.abs().amax(-1, keepdim=True).float() / scheme.steps
    return torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero token: codes 0


def quantize_input(
    x: torch.Tensor, name: str, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of `x` (..., n): int8 or float8_e4m3fn codes (..., n) and float32 scales (see `input_scales`)."""
    scales = input_scales(x, name, input_scale)
    scaled = x.float() / scales
    if get_scheme(name).kind == "int":
        return torch.round(scaled).clamp_(-128, 127).to(torch.int8), scales
    return scaled.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), scales


def fake_quantize(x: torch.Tensor, name: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`x` quantized and dequantized (in its dtype): what the quantized layer sees of its input."""
    codes, scales = quantize_input(x, name, input_scale)
    return (codes.float() * scales).to(x.dtype)
