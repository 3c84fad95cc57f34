"""Activation quantization: what a W8A8 layer does to its input before the integer matmul.

`int8` is dynamic per token: each row of the input (one token) gets its own scale from its absolute
maximum, codes are round(x / scale) clamped to [-128, 127], and the matmul runs on integers. The scale
is absmax / 127.5, compressed-tensors' convention for symmetric int8 (its range [-128, 127] is 255
steps wide), which transformers runs: qconvert's runtime then computes exactly what transformers
computes for the same file (checked by `check --forward`). vLLM's dynamic int8 kernel divides by 127
instead, a difference of 1/255 in the scale.
"""

import torch

ACTIVATION_SCHEMES = ("int8",)
INT8_STEPS = 127.5  # (127 - (-128)) / 2


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (..., n), scales float32 (..., 1)) of `x` (..., n), one scale per token (row)."""
    scales = x.abs().amax(-1, keepdim=True).float() / INT8_STEPS
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero token: codes 0
    codes = torch.round(x.float() / safe).clamp_(-128, 127).to(torch.int8)
    return codes, safe


def fake_quantize(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """`x` quantized and dequantized (in its dtype): what the quantized layer sees of its input."""
    codes, scales = int8_per_token(x)
    return (codes.float() * scales).to(x.dtype)
