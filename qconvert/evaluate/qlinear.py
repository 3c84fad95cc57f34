"""A linear layer that keeps its weight quantized in memory.

It picks the fastest path torch offers on CPU for its scheme, keeping one copy of the weight:

- W8A8 int8 (`int8-dynamic`, `int8-static`): the input is quantized per token or with its static
  scale (`quantizers/activations.py`) and the int8 × int8 product accumulates exactly in int32
  (`torch._int_mm`, which runs on the CPU's VNNI int8 instructions), then both scales apply: what
  compressed-tensors computes for the same file, without its dequantized float weight. W8A8 FP8
  quantizes the input the same way and multiplies the FP8 values in float32 (torch has no FP8
  matmul on CPU).
- int codes of 5-8 bits per output channel: int8 codes `q - z` and a per-row scale. A few rows of
  input (decoding) go through `aten._weight_int8pack_mm`; a long prompt dequantizes the weight for
  one float32 matmul, which is exact and, on a long input, faster. An asymmetric 8-bit zero point,
  which `q - z` cannot hold in int8, becomes a per-row correction, `(x · 1) × (128 - zero) × scale`.
- int codes of 2-4 bits in groups of any multiple of 32 (per channel included), in layers of a
  multiple of 16 rows:
  `aten._weight_int4pack_mm_for_cpu`, whose weight is `(c - 8) × scale + zero` per group of
  32-256; a group that is a multiple of the kernel's repeats its scale. Codes under 4 bits use 4
  of them, so int2 and int3 decode as fast as int4 and take 4 bits of memory.
- int codes of 5-8 bits in such groups: two int4 kernel calls, high and low nibble (8 bits of
  memory), where the high nibble's zero point re-centres exactly (5-7 bits, and symmetric 8).
- everything else, on qconvert's codes split into bit planes (`kernels.py`; the file's bits exactly):
  for one row of input, where AVX2 and a C compiler are there, a C GEMV (`c_kernels.py`) for 4-bit
  tables (nf4, iq4nl, mxfp4, nvfp4: `c-table`), FP8 E4M3 (fp8, mxfp8, fp8-block: `c-e4m3`) and int
  codes in planes (`c-int`); otherwise Inductor's compiled fused kernel (`fused`). A prompt
  dequantizes the weight (C lookups for tables, the compiled code otherwise) for one float32 matmul.

On AVX2 CPUs torch 2.13 vectorizes these kernels only for bfloat16 activations (its float32
path is scalar: 50x slower than a float32 matmul, measured), so the kernels get bfloat16 inputs and
their outputs are cast back: the torch kernel paths match the float32 dequantized model to bfloat16
rounding, the C, fused and long-input int8 paths to float32 rounding. `use_kernels=False`
unpacks and dequantizes qconvert's codes on every call, exactly, everywhere.
"""

import torch
from torch import nn

from qconvert.evaluate import c_kernels, kernels
from qconvert.packing import pack_codes, unpack_codes
from qconvert.quantizers.activations import fake_quantize, quantize_input
from qconvert.quantizers.base import QuantizedTensor, dequantize, zero_points
from qconvert.quantizers.grids import get_grid


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
        self.grid, self.global_scale = q.grid, q.global_scale
        self.kernel = self._choose_kernel(q)

    def _choose_kernel(self, q: QuantizedTensor) -> str:
        """Set up the first path of the module docstring's list that takes `q`; return its name."""
        per_channel = q.group_size == self.in_features
        if q.grid == "int" and per_channel and (q.bits == 8 or (self.use_kernels and q.bits >= 5)):
            return self._init_int8(q)
        size = self._int4_kernel_group(q) if self.use_kernels and q.grid == "int" else None
        if size and q.bits <= 4:
            return self._init_int4(q, size)
        if size and q.activations is None and self._high_nibbles_centre(q):
            return self._init_int4_pair(q, size)
        spec = kernels.spec_for(q) if self.use_kernels else None
        if spec is not None:
            return self._init_packed(q, spec)
        return self._init_unpack(q)

    def _init_int8(self, q: QuantizedTensor) -> None:
        """Codes of 5-8 bits, one scale per row, as int8 `q - z` where that fits (up to 7 bits, and
        symmetric 8); otherwise (asymmetric 8 bits) as `q - 128` with a per-row correction
        `(x · 1) × (128 - z) × scale`."""
        scales, zeros = q.scales.float().view(-1), zero_points(q).view(-1)
        centred = q.codes.to(torch.int16) - zeros.to(torch.int16)[:, None]
        fits = bool(centred.min() >= -128) and bool(centred.max() <= 127)
        codes = centred if fits else q.codes.to(torch.int16) - 128
        self.register_buffer("weight_int8", codes.to(torch.int8))
        self.register_buffer("scales", scales)
        self.register_buffer("row_offset", None if fits else (128 - zeros) * scales)
        return "int8"

    def _int4_kernel_group(self, q: QuantizedTensor) -> int | None:
        """The int4 kernel's group size that serves `q`'s groups (repeating their scales), or None.

        The kernel takes groups of 32-256 columns that tile the row, and rows in multiples of 16.
        A group of g columns (per channel: the whole row) is served by the largest of those sizes
        that divides both g and the row, so a partial last group is served too.
        """
        if self.out_features % 16:
            return None
        group = q.group_size or self.in_features
        return next((size for size in (256, 128, 64, 32) if group % size == 0 and self.in_features % size == 0), None)

    def _int4_operand(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, q: QuantizedTensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One operand of the int4 kernel, whose weight is `(c - 8) × scale + zero` per kernel group,
        for the weight `(codes - zeros) × scales` (codes 0-15; zeros, scales (rows, groups)).

        In each group whose codes fit 4 bits re-centred, c = codes - zero + 8 and the kernel's zero is
        exactly 0; elsewhere c = codes and its zero is `(8 - zero) × scale`, which bfloat16 rounds
        (by at most 8 × scale × 2**-9). Returns (packed codes, bfloat16 scales and zeros).
        """
        group = q.group_size or self.in_features
        column_group = torch.arange(self.in_features) // group
        centred = _centred(codes, zeros, group)
        outside = ((centred < 0) | (centred > 15)).to(torch.int32)
        fits = torch.zeros_like(scales, dtype=torch.int32).index_add_(1, column_group, outside) == 0
        codes = torch.where(fits[:, column_group], centred, codes.to(torch.int32))
        zero = torch.where(fits, 0.0, (8 - zeros) * scales)
        index = torch.arange(0, self.in_features, size) // group
        scales_and_zeros = torch.stack([scales[:, index].T, zero[:, index].T], dim=-1).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        return packed, scales_and_zeros.to(self.KERNEL_DTYPE)

    def _init_int4(self, q: QuantizedTensor, size: int) -> str:
        """Codes of 2-4 bits on the int4 kernel (see `_int4_operand`)."""
        self.kernel_group = size
        packed, scales_and_zeros = self._int4_operand(q.codes, q.scales.float(), zero_points(q), q, size)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        return "int4"

    @staticmethod
    def _high_nibbles_centre(q: QuantizedTensor) -> bool:
        """Whether every high nibble re-centres in 4 bits: hi - zh + 8 in 0-15 (always for 5-7 bits and
        for symmetric 8; not for asymmetric 8, whose zero would then be large and bfloat16-rounded)."""
        if q.bits <= 4:
            return False
        high_zeros = torch.div(zero_points(q), 16, rounding_mode="floor")
        centred = _centred(q.codes.to(torch.int32) >> 4, high_zeros, q.group_size or q.shape[1])
        return bool(centred.min() >= 0) and bool(centred.max() <= 15)

    def _init_int4_pair(self, q: QuantizedTensor, size: int) -> str:
        """Codes of 5-8 bits as two int4 kernel calls: with q = 16·hi + lo and z = 16·zh + zl,
        (q - z)·s = (hi - zh)·16s + (lo - zl)·s."""
        codes, scales, zeros = q.codes.to(torch.int32), q.scales.float(), zero_points(q)
        high_zeros = torch.div(zeros, 16, rounding_mode="floor")
        self.kernel_group = size
        high, high_scales = self._int4_operand(codes >> 4, 16 * scales, high_zeros, q, size)
        low, low_scales = self._int4_operand(codes & 15, scales, zeros - 16 * high_zeros, q, size)
        self.register_buffer("weight_int4", high)
        self.register_buffer("scales_and_zeros", high_scales)
        self.register_buffer("weight_int4_low", low)
        self.register_buffer("scales_and_zeros_low", low_scales)
        return "int4-pair"

    def _init_packed(self, q: QuantizedTensor, spec: kernels.KernelSpec) -> str:
        """qconvert's codes in bit planes (`kernels.py`), for the C or the compiled fused kernels."""
        c_kernel = c_kernels.kernel_for(spec)
        weight = kernels.pack(q, spec)
        self.spec, self.planes = spec, len(weight.planes)
        for i, plane in enumerate(weight.planes):
            self.register_buffer(f"plane{i}", plane)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("offsets", weight.offsets)
        self.register_buffer("table", get_grid(q.grid).table.float() if c_kernel == "table" else None)
        return f"c-{c_kernel}" if c_kernel else "fused"

    def _packed(self) -> kernels.PackedWeight:
        """The planes, scales and offsets, read from the buffers (float32, as the kernels need)."""
        planes = tuple(getattr(self, f"plane{i}") for i in range(self.planes))
        offsets = None if self.offsets is None else self.offsets.float()
        return kernels.PackedWeight(self.spec, planes, self.scales.float(), offsets)

    def _init_unpack(self, q: QuantizedTensor) -> str:
        self.register_buffer("packed", pack_codes(q.codes, q.bits))
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", None if q.zeros is None else pack_codes(q.zeros, q.bits))
        return "unpack"

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
        elif self.kernel in ("int4", "int4-pair"):
            k, mm = self.KERNEL_DTYPE, torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(x.to(k), self.weight_int4, self.kernel_group, self.scales_and_zeros).float()
            if self.kernel == "int4-pair":
                y += mm(x.to(k), self.weight_int4_low, self.kernel_group, self.scales_and_zeros_low).float()
            y = y.to(self.dtype)
        elif self.kernel == "unpack":
            x = x if self.activations is None else fake_quantize(x, self.activations, self.input_scale)
            y = x @ dequantize(self.quantized(), self.dtype).T
        else:
            x = x if self.activations is None else fake_quantize(x, self.activations, self.input_scale)
            y = self._forward_packed(x.float()).to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        """The fused (`kernels.py`) and C (`c_kernels.py`) paths: one row straight from the codes; more
        rows (a prompt) through the dequantized weight."""
        weight, spec = self._packed(), self.spec
        if x.shape[0] == 1 and self.kernel == "fused":
            return kernels.Compiled.call("gemv", x[0], weight)[None]
        if x.shape[0] == 1:
            table = None if self.table is None else self.table.float()
            return c_kernels.gemv(kernels.grouped_input(x[0], spec), weight, table)[None]
        if self.kernel == "c-table":
            table = self.table.float()
            dense = c_kernels.table_dequantize(weight.planes[0], weight.scales, table, spec.group, spec.columns)
        else:
            dense = kernels.Compiled.call("dequantize", weight)
        return x @ dense.T

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kernel={self.kernel}"
        )


def _centred(codes: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """codes - zero + 8 (int32) for (rows, columns) codes and their (rows, groups) zero points: the
    int4 kernel's code for a weight whose zero point is 8."""
    column_group = torch.arange(codes.shape[1]) // group
    return codes.to(torch.int32) - zeros[:, column_group].to(torch.int32) + 8
