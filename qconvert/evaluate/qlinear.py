"""A linear layer that keeps its weight quantized in memory.

It picks the fastest path torch offers on CPU for its scheme, keeping one copy of the weight:

- W8A8 int8 (`int8-dynamic`, `int8-static`): the input is quantized per token or with its static
  scale (`quantizers/activations.py`) and the int8 × int8 product accumulates exactly in int32
  (`torch._int_mm`, which runs on the CPU's VNNI int8 instructions), then both scales apply: what
  compressed-tensors computes for the same file, without its dequantized float weight. W8A8 FP8
  quantizes the input the same way and multiplies the FP8 values in float32 (torch has no FP8
  matmul on CPU).
- int codes of 5-8 bits per output channel: int8 codes and a per-row scale. A few rows of input (decoding) go
  through `aten._weight_int8pack_mm`; a long prompt dequantizes the weight for one float32 matmul,
  which is exact and, on a long input, faster. An asymmetric zero point becomes a per-row
  correction, `(x · 1) × (128 - zero) × scale`.
- int codes of 2-4 bits in groups of any multiple of 32 (per channel included):
  `aten._weight_int4pack_mm_for_cpu`, whose weight is `(c - 8) × scale + zero` per group of
  32-256; a group that is a multiple of the kernel's repeats its scale. Codes under 4 bits use 4
  of them, so int2 and int3 decode as fast as int4 and take 4 bits of memory.
- int codes of 5-8 bits in such groups: two int4 kernel calls, high and low nibble (8 bits of
  memory), where the high nibble's zero point re-centres exactly (5-7 bits, and symmetric 8).
- everything else, on qconvert's codes split into bit planes (`kernels.py`; the file's bits exactly):
  for one row of input, where AVX2 is there, a C GEMV (`c_kernels.py`) for 4-bit tables (nf4,
  iq4nl, mxfp4, nvfp4: `c-table`), FP8 E4M3 (fp8, mxfp8, fp8-block: `c-e4m3`) and 8-bit int groups
  (`c-int8`); otherwise Inductor's compiled fused kernel (`fused`: int groups the int4 kernel cannot
  tile, and everything where the C code cannot build). A prompt dequantizes the weight (C lookups
  for tables, the compiled code otherwise) for one float32 matmul.

On AVX2 CPUs torch 2.13 vectorizes these kernels only for bfloat16 activations (its float32
path is scalar: 50x slower than a float32 matmul, measured), so the kernels get bfloat16 inputs and
their outputs are cast back: the torch kernel paths match the float32 dequantized model to bfloat16
rounding, the fused and long-input int8 paths to float32 summation order. `use_kernels=False`
unpacks and dequantizes qconvert's codes on every call, exactly, everywhere.
"""

import torch
from torch import nn

from qconvert.evaluate import c_kernels, kernels
from qconvert.packing import pack_codes, unpack_codes
from qconvert.quantizers.activations import fake_quantize, quantize_input
from qconvert.quantizers.base import QuantizedTensor, dequantize
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
        self.kernel = "unpack"
        self.grid, self.global_scale = q.grid, q.global_scale
        if q.grid == "int" and q.group_size == self.in_features and (q.bits == 8 or (use_kernels and q.bits >= 5)):
            self._init_int8(q)
        elif use_kernels and q.grid == "int" and (size := self._int4_kernel_group(q)) and q.bits <= 4:
            self._init_int4(q, size)
        elif use_kernels and q.grid == "int" and size and q.activations is None and self._init_int4_pair(q, size):
            pass
        elif use_kernels and (spec := kernels.spec_for(q)) is not None:
            self._init_fused(q, spec)
        else:
            self._init_unpack(q)

    def _init_int8(self, q: QuantizedTensor) -> None:
        """Codes of 5-8 bits, one scale per row, as int8 `q - z` where that fits (up to 7 bits, and
        symmetric 8); otherwise (asymmetric 8 bits) as `q - 128` with a per-row correction
        `(x · 1) × (128 - z) × scale`."""
        self.kernel = "int8"
        scales, zeros = q.scales.float().view(-1), self._zeros(q).view(-1)
        centred = q.codes.to(torch.int16) - zeros.to(torch.int16)[:, None]
        fits = bool(centred.min() >= -128) and bool(centred.max() <= 127)
        codes = centred if fits else q.codes.to(torch.int16) - 128
        self.register_buffer("weight_int8", codes.to(torch.int8))
        self.register_buffer("scales", scales)
        self.register_buffer("row_offset", None if fits else (128 - zeros) * scales)

    def _int4_kernel_group(self, q: QuantizedTensor) -> int | None:
        """The kernel's group size that serves `q`'s groups (repeating their scales), or None.

        The kernel takes groups of 32-256 columns that tile the row, and an even number of
        columns. A group of g columns (per-channel: the whole row) is served by the largest of
        those sizes that divides both g and the row, so a partial last group is served too.
        """
        group = q.group_size or self.in_features
        for size in (256, 128, 64, 32):
            if group % size == 0 and self.in_features % size == 0:
                return size
        return None

    def _int4_operand(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, q: QuantizedTensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One operand of the int4 kernel, whose weight is `(c - 8) × scale + zero` per kernel group,
        for the weight `(codes - zeros) × scales` (codes 0-15, zeros and scales per (row, group)).

        Codes are re-centred, c = codes - zeros + 8, wherever that fits 4 bits, so the kernel's zero
        is exactly 0; otherwise c = codes and its zero is `(8 - zeros) × scales`, which bfloat16
        rounds. Returns (packed codes, scales and zeros, whether re-centred).
        """
        group = q.group_size or self.in_features
        column_group = torch.arange(self.in_features) // group
        centred = codes.to(torch.int32) - zeros[:, column_group].to(torch.int32) + 8
        if bool(centred.min() >= 0) and bool(centred.max() <= 15):
            codes, zero = centred, torch.zeros_like(scales)
        else:
            zero = (8 - zeros) * scales
        index = torch.arange(0, self.in_features, size) // group
        scales_and_zeros = torch.stack([scales[:, index].T, zero[:, index].T], dim=-1).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        return packed, scales_and_zeros.to(self.KERNEL_DTYPE), codes is centred

    def _init_int4(self, q: QuantizedTensor, size: int) -> None:
        """Codes of 2-4 bits on the int4 kernel (see `_int4_operand`)."""
        self.kernel, self.kernel_group = "int4", size
        packed, scales_and_zeros, _ = self._int4_operand(q.codes, q.scales.float(), self._zeros(q), q, size)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def _init_int4_pair(self, q: QuantizedTensor, size: int) -> bool:
        """Codes of 5-8 bits as two int4 kernel calls: with q = 16·hi + lo and z = 16·zh + zl,
        (q - z)·s = (hi - zh)·16s + (lo - zl)·s. Taken only when the high operand re-centres (always
        for 5-7 bits and for symmetric 8 bits), so its bfloat16 zero is exact; False otherwise."""
        codes, scales, zeros = q.codes.to(torch.int32), q.scales.float(), self._zeros(q)
        high_zeros = torch.div(zeros, 16, rounding_mode="floor")
        high, high_scales, centred = self._int4_operand(codes >> 4, 16 * scales, high_zeros, q, size)
        if not centred:
            return False
        low, low_scales, _ = self._int4_operand(codes & 15, scales, zeros - 16 * high_zeros, q, size)
        self.kernel, self.kernel_group = "int4-pair", size
        self.register_buffer("weight_int4", high)
        self.register_buffer("scales_and_zeros", high_scales)
        self.register_buffer("weight_int4_low", low)
        self.register_buffer("scales_and_zeros_low", low_scales)
        return True

    @staticmethod
    def _zeros(q: QuantizedTensor) -> torch.Tensor:
        return q.zeros.float() if q.zeros is not None else torch.full_like(q.scales.float(), 2 ** (q.bits - 1))

    def _init_fused(self, q: QuantizedTensor, spec: kernels.KernelSpec) -> None:
        c_kernel = c_kernels.kernel_for(spec)
        self.kernel = f"c-{c_kernel}" if c_kernel else "fused"
        self.fused = kernels.pack(q, spec)
        self.register_buffer("table", get_grid(q.grid).table.float().contiguous() if c_kernel == "table" else None)
        for i, plane in enumerate(self.fused.planes):  # buffers too, so the model's memory counts them
            self.register_buffer(f"plane{i}", plane)
        self.register_buffer("scales", self.fused.scales)
        self.register_buffer("offsets", self.fused.offsets)

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
        weight, spec = self.fused, self.fused.spec
        if x.shape[0] == 1 and self.kernel == "fused":
            return kernels.Compiled.call("gemv", x[0], weight)[None]
        if x.shape[0] == 1:
            grouped = kernels.grouped_input(x[0], spec)
            if self.kernel == "c-table":
                return c_kernels.table_gemv(grouped, weight.planes[0], weight.scales, self.table)[None]
            kind = self.kernel.removeprefix("c-")
            return c_kernels.byte_gemv(grouped, weight.planes[0], weight.scales, weight.offsets, kind)[None]
        if self.kernel == "c-table":
            dense = c_kernels.table_dequantize(weight.planes[0], weight.scales, self.table, spec.group, spec.columns)
        else:
            dense = kernels.Compiled.call("dequantize", weight)
        return x @ dense.T

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kernel={self.kernel}"
        )
