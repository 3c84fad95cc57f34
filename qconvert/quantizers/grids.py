"""Grids: the values a code can stand for, and how a group's scale is formed and stored.

A quantizer maps each weight to the code whose value, times its group's scale, is nearest; the
grid says what those values and scales are. Every quantizer reaches a grid through three calls —
`fit` (a group's scale from its range), `nearest` (codes) and `values` (what codes stand for) — so
rtn, clip and gptq target every grid alike.

| grid  | code values                              | scale per group, stored as              | group   |
|-------|------------------------------------------|-----------------------------------------|---------|
| int   | 0 … 2**bits − 1 minus a zero point       | float16 / bfloat16; zero point uint8    | any     |
| nf4   | NF4's 16 normal-float values in [−1, 1]  | group absmax, float16 / bfloat16        | any, 64 |
| iq4nl | llama.cpp's IQ4_NL table, −127 … 113     | signed extreme / −127, float16          | 32      |
| mxfp4 | FP4 E2M1: ±{0, .5, 1, 1.5, 2, 3, 4, 6}   | power of two: E8M0, uint8 (bias 127)    | 32      |
| nvfp4 | FP4 E2M1                                 | FP8 E4M3 × one float32 scale per tensor | 16      |
| mxfp8 | FP8 E4M3 (±448)                          | power of two: E8M0, uint8 (bias 127)    | 32      |
| fp8   | every finite FP8 E4M3 value (±448)       | absmax / 448, float16 / bfloat16        | any, 0  |
| fp8-block | FP8 E4M3                             | absmax / 448 of a 128 × 128 block       | 128     |

Sources: NF4, Dettmers et al. 2023 (QLoRA), the table bitsandbytes uses; IQ4_NL, llama.cpp's
`kvalues_iq4nl`; MXFP4 and MXFP8, the OCP Microscaling Formats (MX) v1.0 spec (shared exponent
floor(log2 absmax) minus the element format's largest exponent: 2 for E2M1's 6, 8 for E4M3's 448);
NVFP4, NVIDIA's format as compressed-tensors
and MLX define it (a global scale near absmax / (448 · 6), block scales absmax / 6 in E4M3 units of it);
FP8 E4M3, the OCP 8-bit floating point spec (`torch.float8_e4m3fn`, largest 448); fp8-block, the
128 × 128 weight blocks of DeepSeek-V3's FP8 checkpoints (compressed-tensors' `block` strategy).

A grid whose scale spans a band of rows (fp8-block: 128) repeats the band's scale on each of its rows
in a QuantizedTensor, so every quantizer and the runtime see one scale per (row, group); the layouts
store one row of scales per band.

Codes are unsigned integers (`packing.py` packs them): for E2M1 and E4M3 the code is the format's
own bit pattern, so packed codes are the format's bytes; for NF4 and IQ4_NL it is the table index.
"""

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from qconvert.errors import SchemeError
from qconvert.limits import GRID_NAMES  # the command line names grids without importing torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
IQ4_NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
E4M3_MAX = 448.0
E8M0_BIAS = 127


def _e4m3_values() -> tuple[float, ...]:
    """The value of every float8_e4m3fn bit pattern; its two NaN patterns stand for nothing (NaN)."""
    return tuple(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist())


SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SCALE_TOLERANCE = 0.05  # largest relative change rounding a scale up to its stored dtype may make


class ScaleRangeError(SchemeError):
    """Scales outside what their stored dtype represents (the tensor's name is added by the caller)."""


def stored_scales(scales: torch.Tensor, scale_dtype: str, strict: bool = True) -> torch.Tensor:
    """Round scales to their stored dtype, keeping their sign.

    Below the dtype's smallest normal value magnitudes round up, so the group's extremes still reach the
    grid (codes are computed against the stored scale); above it they round to nearest. A scale of zero
    (a group of zeros, whose codes all sit on the zero point) is stored as the dtype's smallest normal
    value. Any other scale must survive the rounding within SCALE_TOLERANCE: one that would overflow to
    infinity or lose its precision among float16's subnormals (weights far larger or smaller than
    float16 reaches) is refused, never clamped silently.

    A search weighing candidate scales passes `strict=False`: a candidate out of range is clamped, and
    its error, measured on the clamped scale, rules it out.

    Raises:
        ScaleRangeError: (strict) some scale does not fit `scale_dtype`.
    """
    dtype = SCALE_DTYPES[scale_dtype]
    info = torch.finfo(dtype)
    if not strict:
        magnitude = scales.abs().nan_to_num(nan=info.tiny).clamp(min=info.tiny, max=info.max)
        return torch.where(scales < 0, -magnitude, magnitude).to(dtype)
    magnitude = scales.abs()
    stored = magnitude.to(dtype)
    # Among the subnormals rounding is coarse: round up there, so the group's extremes still reach the grid.
    coarse = (stored.float() < magnitude) & (magnitude < info.tiny)
    stored = torch.where(coarse, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    nonzero = magnitude > 0
    drift = (stored.float() - magnitude).abs() > SCALE_TOLERANCE * magnitude
    if not torch.isfinite(magnitude).all() or bool((nonzero & drift).any()):
        low, high = magnitude[nonzero].min().item(), magnitude[nonzero].max().item()
        other = "bfloat16" if scale_dtype == "float16" else None
        advice = (
            f"pass --scale-dtype {other} (a recipe rule can give it to this tensor alone)"
            if other and high < 3e38
            else "its values are too large to quantize; keep it in float with --exclude"
        )
        raise ScaleRangeError(
            f"needs scales from {low:.3g} to {high:.3g}, which {scale_dtype} cannot hold "
            f"(normal range {info.tiny:.3g} to {info.max:.3g}); {advice}."
        )
    stored = torch.where(nonzero, stored, torch.full_like(stored, info.tiny))
    return torch.where(scales < 0, -stored, stored)


E4M3_VALUES = _e4m3_values()


@dataclass(frozen=True)
class Grid:
    """A table grid: `values[code]` times the group's scale (see the module table). The integer grid
    (`int`) is the affine one `rtn` has always used; it has no table."""

    name: str
    bits: int
    values: tuple[float, ...] = ()
    scale: str = "float"  # "float" (the config's scale dtype), "e8m0" (power of two) or "e4m3" (with a global scale)
    block: int | None = None  # the only group size the format allows, if it fixes one
    default_group: int = 64
    signed_extreme: bool = False  # the table is lopsided: put the group's largest-magnitude weight on its end
    band: int = 1  # consecutive rows sharing each group's scale (fp8-block: 128)

    @cached_property
    def table(self) -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.float32)

    @cached_property
    def largest(self) -> float:
        return max(abs(v) for v in self.values if v == v)

    @cached_property
    def _midpoints_and_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The boundaries between consecutive distinct finite values, and the code of each value: built
        once, since gptq asks for the nearest codes once per column."""
        table = self.table
        finite = torch.nonzero(table == table).view(-1)
        ordered, order = torch.sort(table[finite], stable=True)
        keep = torch.ones_like(ordered, dtype=torch.bool)
        keep[1:] = ordered[1:] != ordered[:-1]  # -0.0 and 0.0: one value, the first code
        ordered, codes = ordered[keep], finite[order][keep]
        return (ordered[1:] + ordered[:-1]) / 2, codes.to(torch.uint8)

    def fit(
        self, absmax: torch.Tensor, extreme: torch.Tensor, global_scale: float | None, scale_dtype: str, strict=True
    ) -> torch.Tensor:
        """Each group's scale (float32, as it will be stored: rounded to its storage format) so that the
        group's largest magnitude `absmax` lands on the table's end; `extreme` is the signed weight of
        largest magnitude. `global_scale` is the tensor's scale for e4m3 block scales.

        Raises:
            ScaleRangeError: (strict) a float scale outside what `scale_dtype` holds.
        """
        if self.band > 1:  # one scale for the band of rows: its largest magnitude, on each of its rows
            absmax = band_max(absmax, self.band)
        if self.scale == "e8m0":  # E2M1's largest, 6, is 1.5 · 2²; E4M3's, 448, is 1.75 · 2⁸
            exponent = torch.floor(torch.log2(absmax.clamp(min=2.0**-126))) - math.floor(math.log2(self.largest))
            return torch.exp2(exponent.clamp(-E8M0_BIAS, E8M0_BIAS))
        if self.scale == "e4m3":
            units = (absmax / self.largest / global_scale).clamp(max=E4M3_MAX)
            return units.to(torch.float8_e4m3fn).float() * global_scale
        raw = (
            extreme / min(self.values) if self.signed_extreme else absmax / self.largest
        )  # signed: -127 · scale = extreme
        return stored_scales(raw, scale_dtype, strict).float()

    def global_scale(self, weight: torch.Tensor) -> float | None:
        """The per-tensor float32 scale of e4m3 block scales (NVFP4): the power of two at or above
        absmax / (448 · 6), so block scales stay within E4M3's 448. A power of two, so the reciprocal
        compressed-tensors stores and the absmax MLX takes are exact, and every runtime reads the same
        values bit for bit."""
        if self.scale != "e4m3":
            return None
        absmax = float(weight.abs().max())
        return 2.0 ** math.ceil(math.log2(absmax / (E4M3_MAX * self.largest))) if absmax > 0 else 1.0

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (uint8) of the table values nearest to `x` (weights already divided by their scale);
        a tie goes to the lower value. NaN entries of the table are never chosen."""
        midpoints, codes = self._midpoints_and_codes
        return codes[torch.bucketize(x.float(), midpoints)]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The table value of every code (float32)."""
        return self.table[codes.long()]


GRIDS = {
    "int": Grid("int", 0),
    "nf4": Grid("nf4", 4, NF4),
    "iq4nl": Grid("iq4nl", 4, tuple(float(v) for v in IQ4_NL), block=32, default_group=32, signed_extreme=True),
    "mxfp4": Grid("mxfp4", 4, E2M1, scale="e8m0", block=32, default_group=32),
    "nvfp4": Grid("nvfp4", 4, E2M1, scale="e4m3", block=16, default_group=16),
    "mxfp8": Grid("mxfp8", 8, E4M3_VALUES, scale="e8m0", block=32, default_group=32),
    "fp8": Grid("fp8", 8, E4M3_VALUES, default_group=0),
    "fp8-block": Grid("fp8-block", 8, E4M3_VALUES, block=128, default_group=128, band=128),
}


def band_max(values: torch.Tensor, band: int) -> torch.Tensor:
    """Each value (rows, ...) replaced by the largest over its band of `band` consecutive rows (the last
    band may be shorter)."""
    rows = values.shape[0]
    padded = torch.nn.functional.pad(values, (0, 0) * (values.dim() - 1) + (0, -rows % band))
    largest = padded.view(-1, band, *values.shape[1:]).amax(1)
    return largest.repeat_interleave(band, 0)[:rows]


def compact_scales(scales: torch.Tensor, grid: str) -> torch.Tensor:
    """Per-row scales (rows, groups) -> as a layout stores them: one row per band of rows."""
    band = GRIDS[grid].band
    return scales if band == 1 else scales[::band].contiguous()


def expand_scales(stored: torch.Tensor, grid: str, rows: int) -> torch.Tensor:
    """A layout's scales -> one row per weight row (inverse of `compact_scales`)."""
    band = GRIDS[grid].band
    return stored if band == 1 else stored.repeat_interleave(band, 0)[:rows]


def stored_scale_rows(grid: str, rows: int) -> int:
    """Rows of stored scales for a weight of `rows` rows."""
    return -(-rows // GRIDS[grid].band)


def get_grid(name: str) -> Grid:
    """Raises:
    SchemeError: no grid has that name."""
    if name not in GRIDS:
        raise SchemeError(f"unknown grid {name!r}; choose one of {', '.join(GRID_NAMES)}.")
    return GRIDS[name]


def grid_defaults(grid: str, given: dict) -> dict:
    """The bits, symmetry and group size a table grid implies, for the keys not in `given`: what
    `--grid nf4` alone, or a recipe rule setting only `grid`, means."""
    if grid == "int":
        return {}
    g = get_grid(grid)
    implied = {"bits": g.bits, "symmetric": True, "group_size": g.block or g.default_group}
    return {k: v for k, v in implied.items() if k not in given}


def stored_scale_dtype(grid: str, scale_dtype: str) -> str:
    """The safetensors dtype a grid's scales are stored in."""
    kind = GRIDS[grid].scale
    return {"e8m0": "U8", "e4m3": "F8_E4M3"}.get(kind) or {"float16": "F16", "bfloat16": "BF16"}[scale_dtype]


def to_stored(scales: torch.Tensor, grid: str, global_scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """Float32 effective scales -> the stored tensor: E8M0 biased exponents (uint8), E4M3 units of the
    global scale, or floats in `dtype`. Exact: the scales were formed in these formats (`Grid.fit`)."""
    kind = GRIDS[grid].scale
    if kind == "e8m0":
        return (torch.log2(scales).round() + E8M0_BIAS).clamp(0, 254).to(torch.uint8)
    if kind == "e4m3":
        return (scales / global_scale).to(torch.float8_e4m3fn)
    return scales.to(dtype)


def effective_scales(stored: torch.Tensor, grid: str, global_scale: torch.Tensor | None) -> torch.Tensor:
    """Stored scales -> float32 multipliers of the code values (inverse of `to_stored`)."""
    kind = GRIDS[grid].scale
    if kind == "e8m0":
        return torch.exp2(stored.float() - E8M0_BIAS)
    if kind == "e4m3":
        return stored.float() * global_scale.float()
    return stored.float()
