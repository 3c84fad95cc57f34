"""The quantizer plugin interface: a config, a result type and an abstract base class.

A quantizer turns one float weight matrix into unsigned integer codes plus per-group scales and
(for asymmetric schemes) integer zero points, on a grid (`grids.py`: integers, or a table of values
such as NF4 or FP4). How codes become bits is `packing.py`'s job, and how they are laid out in a file
is `formats/`'s: a quantizer never does I/O.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qconvert.errors import SchemeError
from qconvert.limits import SUPPORTED_BITS
from qconvert.quantizers import rtn_kernel
from qconvert.quantizers.activations import get_scheme, weights_of
from qconvert.quantizers.grids import SCALE_DTYPES, effective_scales, get_grid


@dataclass(frozen=True)
class QuantConfig:
    """What to do to one weight matrix.

    Attributes:
        bits: bits per code (2, 3, 4, 5, 6 or 8).
        group_size: consecutive weights of a row that share a scale; 0 means one group per row
            (per output channel). The last group of a row may be shorter; groups never cross rows.
        symmetric: no zero point; codes are centred on 2**(bits-1).
        scale_dtype: "float16" (default: three more mantissa bits than bfloat16, and weight
            scales sit well inside its range) or "bfloat16"; a grid with its own scale format
            (mxfp4's E8M0, nvfp4's E4M3) ignores it.
        grid: "int" (integer codes, the default) or a table grid of `grids.py` (nf4, iq4nl, mxfp4,
            nvfp4, fp8), which fixes bits, symmetry and, for some, the group size.
        activations: None (float inputs) or a scheme of `activations.py` ("int8-dynamic",
            "int8-static", "fp8-dynamic"): W8A8, the layer's input quantized too; needs 8-bit weights of
            the scheme's grid, symmetric, one scale per output channel (`activations.weights_of`).
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    scale_dtype: str = "float16"
    grid: str = "int"
    activations: str | None = None

    def __post_init__(self) -> None:
        grid = get_grid(self.grid)
        if self.activations is not None:
            get_scheme(self.activations)
            wanted = weights_of(self.activations)
            if {k: getattr(self, k) for k in wanted} != wanted:
                weights = "fp8" if wanted["grid"] == "fp8" else "int8"
                raise SchemeError(
                    f"--activations {self.activations} takes {weights} weights with one scale per output channel; "
                    "drop --bits, --grid, --group-size and --asymmetric (it implies them)."
                )
        if self.grid != "int":
            if self.bits != grid.bits or not self.symmetric:
                raise SchemeError(
                    f"grid {self.grid} has {grid.bits}-bit codes and no zero point; drop --bits and --asymmetric "
                    f"(or give --bits {grid.bits})."
                )
            if grid.block is not None and self.group_size != grid.block:
                raise SchemeError(
                    f"grid {self.grid} scales groups of {grid.block}; drop --group-size or give {grid.block}."
                )
        if self.bits not in SUPPORTED_BITS:
            raise SchemeError(f"--bits {self.bits} is not supported; choose one of {list(SUPPORTED_BITS)}.")
        if self.group_size < 0:
            raise SchemeError(f"--group-size {self.group_size} is negative; use 0 for per-channel or a positive size.")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale dtype {self.scale_dtype!r} is not supported; choose float16 or bfloat16.")

    def group_size_for(self, columns: int) -> int:
        """The effective group size for a row of `columns` weights."""
        return columns if self.group_size == 0 else min(self.group_size, columns)

    def groups_for(self, columns: int) -> int:
        """Groups per row of `columns` weights (the last one may be partial)."""
        return -(-columns // self.group_size_for(columns))


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized 2-D weight: `weight[r, c] ≈ (codes[r, c] - zeros[r, g]) * scales[r, g]`, g = c // group_size,
    on the integer grid; `values[codes[r, c]] * scale[r, g]` on a table grid (`grids.py`).

    Attributes:
        codes: uint8 (rows, columns), each value in [0, 2**bits).
        scales: (rows, groups) as stored: the config's scale dtype, or the grid's own scale format
            (uint8 E8M0 exponents for mxfp4, float8_e4m3fn for nvfp4).
        zeros: uint8 (rows, groups) in [0, 2**bits), or None for symmetric (zero = 2**(bits-1)).
        bits, group_size: as applied (group_size is the effective size, never 0).
        shape: the original weight shape; dtype: its original dtype.
        grid: the grid's name; global_scale: float32 (1,) for grids with one (nvfp4), else None.
        activations: the scheme of `activations.py` when the layer's input is quantized too (W8A8), else None.
        input_scale: float32 (1,), the static input scale of an `int8-static` layer, else None.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]
    dtype: torch.dtype
    grid: str = "int"
    global_scale: torch.Tensor | None = None
    activations: str | None = None
    input_scale: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.zeros is None


def zero_points(q: QuantizedTensor) -> torch.Tensor:
    """The int grid's zero points of `q` as float32 (rows, groups): stored ones, or 2**(bits-1) when symmetric."""
    return q.zeros.float() if q.zeros is not None else torch.full(q.scales.shape, 2.0 ** (q.bits - 1))


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
    """Rebuild the float weight (or the given `rows` of it) from codes, scales and zero points, in float32."""
    codes, scales = q.codes[rows], effective_scales(q.scales[rows], q.grid, q.global_scale)
    count, columns = codes.shape
    groups = scales.shape[1]
    padded = groups * q.group_size
    if padded != columns:
        codes = torch.nn.functional.pad(codes, (0, padded - columns))
    codes = codes.view(count, groups, q.group_size)
    if q.grid != "int":
        return get_grid(q.grid).decode(codes).mul_(scales.unsqueeze(-1)).view(count, padded)[:, :columns].to(dtype)
    weight = codes.float()
    zeros = q.zeros[rows].float() if q.zeros is not None else torch.full_like(scales, 2 ** (q.bits - 1))
    weight = weight.sub_(zeros.unsqueeze(-1)).mul_(scales.unsqueeze(-1))
    return weight.view(count, padded)[:, :columns].to(dtype)


def relative_error(weight: torch.Tensor, q: QuantizedTensor) -> float:
    """|W - deq(Q)|² / |W|², in float64, rounded to 6 significant digits for stable manifests: by the C
    kernel of `rtn_kernel.py` on the integer grid where it applies, else in cache-sized row blocks."""
    if q.grid == "int" and q.codes.dtype == torch.uint8 and q.codes.is_contiguous() and rtn_kernel.applies(weight):
        scales, zeros = q.scales.float().contiguous(), zero_points(q).contiguous()
        error, norm = rtn_kernel.error_sums(weight, q.codes, scales, zeros, q.group_size)
    else:
        error, norm = _error_sums(weight, q)
    return float(f"{error / norm:.6g}") if norm else 0.0


def _error_sums(weight: torch.Tensor, q: QuantizedTensor) -> tuple[float, float]:
    """(|W - deq(Q)|², |W|²) in float64, over cache-sized row blocks."""
    rows, columns = weight.shape
    step = max(1, (1 << 19) // max(columns, 1))
    error = norm = 0.0
    for start in range(0, rows, step):
        block = slice(start, start + step)
        w = weight[block].double()  # float32 squares of large weights overflow
        error += (dequantize(q, rows=block).double().sub_(w)).square_().sum().item()
        norm += w.square().sum().item()
    return error, norm


class Quantizer(ABC):
    """Base class of every quantizer, built in or plugged in through the `qconvert.quantizers` entry points.

    Subclasses set `name` (the registry key, used on the CLI and in manifests) and implement
    `quantize`. Method-specific settings are declared in `options` (name -> default) and arrive as
    keyword arguments; an option a quantizer does not declare is refused, never silently ignored.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    requires_calibration: ClassVar[bool] = False
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: QuantConfig, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise SchemeError(
                f"quantizer {self.name!r} takes no option {', '.join(unknown)} (its options: {accepted})."
            )
        self.config = config
        self.settings = {**self.options, **options}

    @abstractmethod
    def quantize(self, name: str, weight: torch.Tensor, stats: Any = None) -> QuantizedTensor:
        """Quantize the 2-D float `weight` of tensor `name`."""

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """The float32 weight `q` stands for."""
        return dequantize(q)


class CalibratedQuantizer(Quantizer):
    """A quantizer that needs activations: it quantizes one decoder block at a time.

    The converter runs calibration text through the model block by block and hands each block to
    `quantize_block` (see `qconvert.calibration.blocks.CalibrationBlock`); the results replace the
    block's tensors in the output. `quantize` is used only for selected tensors outside the blocks.
    """

    requires_calibration = True
    # True: the block also carries the float model's outputs (`CalibrationBlock.targets`) to learn from.
    needs_float_targets: ClassVar[bool] = False
    # True: the quantizer solves one linear at a time from its input Hessian (`quantize_linear`), so the
    # pipeline quantizes each linear as soon as its inputs are complete, in one forward pass per block.
    sequential: ClassVar[bool] = False

    def quantize_linear(
        self, name: str, weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig
    ) -> QuantizedTensor:
        """Quantize one linear's float32 `weight` (rows, columns) given H = 2XᵀX/n (columns, columns) of
        its calibration inputs X, float32 (for `sequential` quantizers)."""
        raise NotImplementedError(f"{self.name} quantizes whole blocks only")

    @abstractmethod
    def quantize_block(self, block: Any) -> dict[str, "QuantizedTensor | torch.Tensor"]:
        """Quantize the selected linears of `block`; return results by tensor name.

        A float tensor in the result replaces that tensor of the source (e.g. a norm weight that
        absorbed AWQ's scales); a QuantizedTensor is the quantized form of a selected weight.
        """

    def check_configs(self, configs: dict[str, QuantConfig]) -> None:
        """Refuse, before any calibration work, tensor configs this quantizer cannot handle.

        Raises:
            SchemeError: naming the tensor and why.
        """

    def calibration_use(self) -> str:
        """What it uses calibration text for, for the message that asks for it."""
        return f"quantizer {self.name!r} learns from activations"

    def quantize(self, name: str, weight: torch.Tensor, stats: Any = None) -> QuantizedTensor:
        raise SchemeError(
            f"{self.name} quantizes linear layers inside decoder blocks only, from their calibration "
            f"activations; {name} is outside them (leave it in float or exclude it)."
        )
