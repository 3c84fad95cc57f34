"""Fused kernels: one input row times a packed weight, computed straight from its codes.

Decoding a token multiplies every weight matrix by a single row, so its speed is the speed of
reading the weights (`scripts/bench_bandwidth.py`). Dequantize-then-matmul reads the codes, writes a
float32 weight 4-16 times their size, and reads it back; these kernels read each code once. They
are plain torch expressions that `torch.compile` (Inductor's CPU code generation) fuses into one
vectorized loop per layer shape. Run uncompiled, the same expressions are the exact reference.

Layout, private to the runtime and built at load from qconvert's packed codes: a weight of R rows
and C columns in groups of g is padded to whole groups, each group to a multiple of 8 columns (code
0 against an input of 0), and its b-bit codes are split into bit planes of 8, 4, 2 or 1 bits
(`PLANES`: 6 = 4 + 2, 3 = 2 + 1, ...) so that no code straddles a byte. In a plane of k bits, byte
j of a group holds the codes of columns j, j + g/p, ..., j + (p-1)·g/p (p = 8 / k codes per byte):
sub-code i of every byte meets one contiguous slice of the input, which Inductor vectorizes. The
plane holds exactly b bits per weight, as the file does.

What a code stands for, per grid (`quantizers/grids.py`):
- int: q − z, times the group's scale s. The kernel sums q·x per group, then subtracts z·s·Σx.
- 16-value tables (nf4, iq4nl, mxfp4, nvfp4): T[q] as the multilinear polynomial in q's four bits
  (its Möbius coefficients). Fifteen multiply-adds vectorize where a table lookup, a gather, does
  not: 3.5 ms against 21 ms for a 49152 × 576 layer on this project's 2-core machine (float32 7 ms).
- FP8 E4M3 (fp8, mxfp8, fp8-block): the code's bits placed in a float32's (exponent re-biased by
  120), subnormals scaled separately. The two NaN patterns (0x7F, 0xFF) decode as ±480: no grid
  ever writes them.
"""

import time
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qconvert.quantizers.base import QuantizedTensor, zero_points
from qconvert.quantizers.grids import E4M3_VALUES, effective_scales, get_grid

PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
COLUMN_ALIGN = 8  # each group is padded to a multiple of this, so that 1-bit planes fill whole bytes


class KernelSpec(NamedTuple):
    """What a compiled kernel is specialized on: one per distinct layer shape and scheme."""

    rows: int
    columns: int
    group: int  # columns per scale (the whole row for per-channel)
    padded: int  # the group padded to a multiple of COLUMN_ALIGN
    planes: tuple[int, ...]  # bits of each plane, most significant first
    values: str  # "int", "table" (16 values) or "e4m3"
    coefficients: tuple[float, ...] = ()  # a table's multilinear coefficients

    @property
    def groups(self) -> int:
        return -(-self.columns // self.group)

    @property
    def shifts(self) -> tuple[int, ...]:
        """Left shift of each plane's codes in the full code."""
        shifts, below = [], sum(self.planes)
        for bits in self.planes:
            below -= bits
            shifts.append(below)
        return tuple(shifts)


class PackedWeight(NamedTuple):
    """A weight in the kernels' layout: planes (rows, groups, padded·bits/8) uint8, scales (rows, groups)
    float32, and for the int grid offsets = zero point × scale (rows, groups) float32."""

    spec: KernelSpec
    planes: tuple[torch.Tensor, ...]
    scales: torch.Tensor
    offsets: torch.Tensor | None


def spec_for(q: QuantizedTensor) -> KernelSpec | None:
    """The kernel spec of `q`, or None when its grid has no fused kernel (a table of other than 16
    values that is not FP8 E4M3)."""
    rows, columns = q.shape
    group = min(q.group_size, columns) if q.group_size else columns
    padded = -(-group // COLUMN_ALIGN) * COLUMN_ALIGN
    if q.grid == "int":
        return KernelSpec(rows, columns, group, padded, PLANES[q.bits], "int")
    grid = get_grid(q.grid)
    if len(grid.values) == 16:
        return KernelSpec(rows, columns, group, padded, (4,), "table", multilinear_coefficients(grid.table))
    if grid.values is E4M3_VALUES:
        return KernelSpec(rows, columns, group, padded, (8,), "e4m3")
    return None


def multilinear_coefficients(table: torch.Tensor) -> tuple[float, ...]:
    """c such that T[q] = Σ_S c[S] Π_{i∈S} bit_i(q) over subsets S of q's four bits (S as a bitmask):
    the Möbius transform of the 16-entry table, in float64."""
    c = table.double().clone()
    for bit in range(4):
        for q in range(16):
            if q >> bit & 1:
                c[q] -= c[q ^ (1 << bit)]
    return tuple(c.tolist())


def pack(q: QuantizedTensor, spec: KernelSpec) -> PackedWeight:
    """`q` in the kernels' layout (see the module docstring)."""
    codes = _grouped(q.codes, spec, 0)
    planes = tuple(_plane(codes, bits, shift, spec) for bits, shift in zip(spec.planes, spec.shifts))
    scales = effective_scales(q.scales, q.grid, q.global_scale).float().contiguous()
    offsets = None
    if spec.values == "int":
        offsets = (zero_points(q) * scales).contiguous()
    return PackedWeight(spec, planes, scales, offsets)


def _grouped(t: torch.Tensor, spec: KernelSpec, value) -> torch.Tensor:
    """(rows, columns) -> (rows, groups, padded), padding with `value`."""
    t = F.pad(t, (0, spec.groups * spec.group - spec.columns), value=value)
    t = t.view(t.shape[0], spec.groups, spec.group)
    return F.pad(t, (0, spec.padded - spec.group), value=value)


def grouped_input(x: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """(columns,) -> (groups, padded) contiguous, zero-padded as the planes are."""
    if spec.columns == spec.groups * spec.padded:
        return x.contiguous().view(spec.groups, spec.padded)
    return _grouped(x[None], spec, 0.0)[0].contiguous()


def _plane(codes: torch.Tensor, bits: int, shift: int, spec: KernelSpec) -> torch.Tensor:
    per_byte = 8 // bits
    sub = ((codes >> shift) & ((1 << bits) - 1)).view(spec.rows, spec.groups, per_byte, spec.padded // per_byte)
    plane = torch.zeros_like(sub[:, :, 0])
    for i in range(per_byte):
        plane |= sub[:, :, i] << (i * bits)
    return plane.contiguous()


def _sub_codes(plane: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """The codes of a plane, sub-code i of every byte (the columns of slice i of each group)."""
    if bits == 8:
        return [plane]
    mask = (1 << bits) - 1
    return [(plane >> (i * bits)) & mask for i in range(8 // bits)]


def _values(codes: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """What codes (uint8) stand for, float32, before their scale (and zero point)."""
    if spec.values == "int":
        return codes.float()
    if spec.values == "table":
        c = spec.coefficients
        b0, b1, b2, b3 = (((codes >> i) & 1).float() for i in range(4))

        def over_low_bits(o: int) -> torch.Tensor:  # the terms whose high bits (b2, b3) are fixed by o
            return (c[o] + c[o + 1] * b0) + b1 * (c[o + 2] + c[o + 3] * b0)

        return (over_low_bits(0) + b2 * over_low_bits(4)) + b3 * (over_low_bits(8) + b2 * over_low_bits(12))
    bits = codes.int()
    magnitude = bits & 0x7F
    normal = ((magnitude << 20) + (120 << 23)).view(torch.float32)  # E4M3 exponent bias 7 -> float32's 127
    subnormal = (magnitude & 7).float() * 2.0**-9
    value = torch.where(magnitude < 8, subnormal, normal)
    return torch.where(bits >= 128, -value, value)


def gemv(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """y = Ŵ x for one input row.

    Args:
        x: (columns,) float32.
        weight: the packed weight (`pack`).

    Returns:
        (rows,) float32, equal to `dequantize(q) @ x` up to float32 summation order.
    """
    spec = weight.spec
    x = _grouped(x[None], spec, 0.0)[0]  # (groups, padded)
    dot = None
    for plane, bits, shift in zip(weight.planes, spec.planes, spec.shifts):
        per_byte = 8 // bits
        slices = x.view(spec.groups, per_byte, spec.padded // per_byte)
        for i, codes in enumerate(_sub_codes(plane, bits)):
            term = (_values(codes, spec) * slices[:, i]).sum(-1)
            term = term * (1 << shift) if shift else term
            dot = term if dot is None else dot + term
    y = (dot * weight.scales).sum(-1)
    if weight.offsets is not None:
        y = y - (weight.offsets * x.sum(-1)).sum(-1)
    return y


def dequantize(weight: PackedWeight) -> torch.Tensor:
    """The (rows, columns) float32 weight, for inputs of many rows (a prompt)."""
    spec = weight.spec
    codes = [torch.cat(_sub_codes(p, bits), dim=-1) for p, bits in zip(weight.planes, spec.planes)]
    if spec.values == "int":
        full = sum(c.int() << shift for c, shift in zip(codes, spec.shifts))
        values = full.float() * weight.scales[..., None] - weight.offsets[..., None]
    else:
        values = _values(codes[0], spec) * weight.scales[..., None]
    return values[:, :, : spec.group].reshape(spec.rows, -1)[:, : spec.columns]


class Compiled:
    """`gemv` and `dequantize` compiled once per KernelSpec, with the time spent compiling.

    Inductor's FX graph cache keeps the generated code on disk, so a later process with the same
    shapes loads it instead of compiling again. If compiling fails (no C++ compiler, say), the
    uncompiled expressions run instead: slower, same results.
    """

    seconds = 0.0  # spent compiling: first calls here, and building `c_kernels.py`
    failed: str | None = None
    _called: set = set()  # (kernel, spec) pairs already compiled

    @classmethod
    def call(cls, name: str, *args) -> torch.Tensor:
        if cls.failed is not None:
            return _EAGER[name](*args)
        key = (name, args[-1].spec)
        if key in cls._called:
            return _compiled(name)(*args)
        start = time.perf_counter()
        try:
            result = _compiled(name)(*args)
        except Exception as exc:  # an Inductor or compiler failure: keep the exact eager path
            cls.failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return _EAGER[name](*args)
        finally:
            cls.seconds += time.perf_counter() - start
        cls._called.add(key)
        return result


_EAGER = {"gemv": gemv, "dequantize": dequantize}


@cache
def _compiled(name: str):
    import torch._dynamo

    # Dynamo specializes the one compiled function on each spec: an entry of its cache per layer shape.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    # A table's fifteen multiply-adds exceed Inductor's default threshold for materializing an
    # intermediate (30 ops), which would write the decoded weight out in float32 and read it back.
    return torch.compile(_EAGER[name], dynamic=False, options={"realize_opcount_threshold": 1000})
