"""A linear layer that keeps its weight quantized in memory.

It picks the fastest path torch offers on CPU for its scheme, keeping one copy of the weight:

- W8A8 int8 (`int8-dynamic`, `int8-static`): the input is quantized per token or with its static
  scale (`quantizers/activations.py`) and the int8 × int8 product accumulates exactly in int32
  (`torch._int_mm`, which runs on the CPU's VNNI int8 instructions), then both scales apply: what
  compressed-tensors computes for the same file, without its dequantized float weight. W8A8 FP8
  quantizes the input the same way and multiplies the FP8 values in float32 (torch has no FP8
  matmul on CPU).
- int8 per output channel: int8 codes and a per-row scale. A few rows of input (decoding) go
  through `aten._weight_int8pack_mm`; a long prompt dequantizes the weight for one float32 matmul,
  which is exact and, on a long input, faster. An asymmetric zero point becomes a per-row
  correction, `(x · 1) × (128 - zero) × scale`.
- int4 in whole groups of 32-256: `aten._weight_int4pack_mm_for_cpu`, whose weight is
  `(q - 8) × scale + zero` per group; ours is `(q - z) × scale`, so its `zero` is `(8 - z) × scale`.
  Its layout is private to torch, so this path has no exact float32 fallback.
- anything else, table grids included (nf4, fp8, mxfp4, ...): qconvert's packed codes, unpacked and
  dequantized on every call (the weight never stays resident in float).

On AVX2 CPUs torch 2.13 vectorizes these kernels only for bfloat16 activations (its float32
path is scalar: 50x slower than a float32 matmul, measured), so the kernels get bfloat16 inputs and
their outputs are cast back: the kernel paths match the float32 dequantized model to bfloat16
rounding, the unpack and long-input int8 paths exactly. `use_kernels=False` takes the exact path
everywhere.
"""

import torch
from torch import nn

from qconvert.packing import pack_codes, unpack_codes
from qconvert.quantizers.activations import fake_quantize, quantize_input
from qconvert.quantizers.base import QuantizedTensor, dequantize


class QuantizedLinear(nn.Module):
    """`y = x Ŵᵀ + b` with Ŵ held as packed integer codes; see the module docstring for the kernels."""

    KERNEL_DTYPE = torch.bfloat16
    SMALL_INPUT_ROWS = 16  # up to this many rows, int8 uses the kernel; more, a float32 matmul

    def __init__(
        self,
        q: QuantizedTensor,
        has_bias: bool,
        dtype: torch.dtype = torch.float32,
        use_kernels: bool = True,
    ) -> None:
        super().__init__()
        self.activations, self.input_scale = q.activations, q.input_scale
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size, self.dtype = q.bits, q.group_size, dtype
        self.use_kernels = use_kernels
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device="meta")) if has_bias else None
        self.kernel = "unpack"
        self.grid, self.global_scale = q.grid, q.global_scale
        if q.grid == "int" and q.bits == 8 and q.group_size == self.in_features:
            self._init_int8(q)
        elif q.grid == "int" and q.bits == 4 and use_kernels and self._int4_kernel_accepts(q):
            self._init_int4(q)
        else:
            self._init_unpack(q)

    def _init_int8(self, q: QuantizedTensor) -> None:
        self.kernel = "int8"
        self.register_buffer("weight_int8", (q.codes.to(torch.int16) - 128).to(torch.int8))
        scales = q.scales.float().view(-1)
        self.register_buffer("scales", scales)
        offset = None if q.zeros is None else (128 - q.zeros.float().view(-1)) * scales
        self.register_buffer("row_offset", offset)

    def _int4_kernel_accepts(self, q: QuantizedTensor) -> bool:
        # The kernel wants whole groups of a size it was built for, and an even number of columns.
        return self.in_features % q.group_size == 0 and q.group_size in (32, 64, 128, 256) and self.in_features % 2 == 0

    def _init_int4(self, q: QuantizedTensor) -> None:
        self.kernel = "int4"
        self.register_buffer(
            "weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 2)
        )
        scales = q.scales.float()
        zeros = torch.zeros_like(scales) if q.zeros is None else (8 - q.zeros.float()) * scales
        self.register_buffer(
            "scales_and_zeros", torch.stack([scales.T, zeros.T], dim=-1).contiguous().to(self.KERNEL_DTYPE)
        )

    def _init_unpack(self, q: QuantizedTensor) -> None:
        self.register_buffer("packed", pack_codes(q.codes, q.bits))
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", None if q.zeros is None else pack_codes(q.zeros, q.bits))

    def quantized(self) -> QuantizedTensor:
        """The QuantizedTensor this layer computes with (rebuilt from the unpack path's buffers)."""
        if self.kernel != "unpack":
            raise NotImplementedError("only the unpack path keeps qconvert's own layout")
        zeros = None if self.zeros is None else unpack_codes(self.zeros, self.bits, self.scales.shape[1])
        return QuantizedTensor(
            codes=unpack_codes(self.packed, self.bits, self.in_features),
            scales=self.scales,
            zeros=zeros,
            bits=self.bits,
            group_size=self.group_size,
            shape=(self.out_features, self.in_features),
            dtype=self.dtype,
            grid=self.grid,
            global_scale=self.global_scale,
            activations=self.activations,
            input_scale=self.input_scale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).to(self.dtype)
        if self.kernel == "int8" and self.activations:
            codes, scales = quantize_input(x, self.activations, self.input_scale)
            y = torch._int_mm(codes, self.weight_int8.T).float().mul_(scales).mul_(self.scales).to(self.dtype)
        elif self.kernel == "int8":
            if self.use_kernels and x.shape[0] <= self.SMALL_INPUT_ROWS:
                k = self.KERNEL_DTYPE
                y = torch.ops.aten._weight_int8pack_mm(x.to(k), self.weight_int8, self.scales.to(k)).to(self.dtype)
            else:
                y = x @ (self.weight_int8.to(self.dtype) * self.scales.to(self.dtype)[:, None]).T
            if self.row_offset is not None:
                y = y + x.sum(-1, keepdim=True) * self.row_offset.to(self.dtype)
        elif self.kernel == "int4":
            k = self.KERNEL_DTYPE
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(k), self.weight_int4, self.group_size, self.scales_and_zeros
            ).to(self.dtype)
        else:
            x = x if self.activations is None else fake_quantize(x, self.activations, self.input_scale)
            y = x @ dequantize(self.quantized(), self.dtype).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kernel={self.kernel}"
        )
