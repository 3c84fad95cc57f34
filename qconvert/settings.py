"""What a conversion does, as one value: built from command-line flags, a recipe, or both."""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qconvert.calibration.samples import CalibrationSettings
from qconvert.errors import SchemeError
from qconvert.formats import LAYOUT_CHOICES
from qconvert.limits import GRID_NAMES, smooth_problem
from qconvert.plan.recipes import Recipe, Rule, load_recipe
from qconvert.quantizers import QuantConfig
from qconvert.quantizers.activations import weights_of
from qconvert.quantizers.grids import grid_defaults

PASSTHROUGH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorScheme:
    """The quantizer and grid for one tensor: the defaults with its deciding rule's overrides."""

    quantizer: str
    config: QuantConfig


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output; recorded in the manifest.

    `quantizer` … `scale_dtype` are the defaults every quantized tensor gets unless a rule (from
    `rules` or `include`) overrides them; `target_bpw` / `target_size` then let qconvert choose
    each tensor's bits within that budget (see `plan/allocation.py`).
    """

    quantizer: str = "rtn"
    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    scale_dtype: str = "float16"
    grid: str = "int"  # or a table grid of quantizers/grids.py (nf4, iq4nl, mxfp4, nvfp4, fp8)
    activations: str | None = None  # W8A8: a scheme of quantizers/activations.py, e.g. "int8-dynamic"
    smooth: float | str | None = None  # SmoothQuant's migration strength α in [0, 1], or "auto"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dtype: str | None = None  # cast for kept float tensors; None keeps the source dtype
    layout: str = "auto"
    max_shard_size: int | None = None  # bytes
    options: dict = field(default_factory=dict)  # the quantizer's own options, e.g. {"act_order": True}
    calibration: CalibrationSettings | None = None  # for quantizers that need activations
    rules: tuple[Rule, ...] = ()  # a recipe's ordered rules
    recipe: Recipe | None = None
    target_bpw: float | None = None  # bits per quantized weight, scales and zero points counted
    target_size: int | None = None  # bytes of the whole output
    budget_grids: tuple[str, ...] = ()  # table grids a budget may choose besides integer widths

    def __post_init__(self) -> None:
        if self.layout not in LAYOUT_CHOICES:
            raise SchemeError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUT_CHOICES)}.")
        if self.dtype is not None and self.dtype not in PASSTHROUGH_DTYPES:
            raise SchemeError(f"--dtype {self.dtype} is not supported; choose one of {', '.join(PASSTHROUGH_DTYPES)}.")
        if self.max_shard_size is not None and self.max_shard_size <= 0:
            raise SchemeError("--max-shard-size must be positive.")
        if self.target_bpw is not None and self.target_size is not None:
            raise SchemeError("give --target-bpw or --target-size, not both.")
        budgeted = self.target_bpw is not None or self.target_size is not None
        if budgeted and self.activations:
            raise SchemeError(
                f"a size budget chooses each tensor's bits, but --activations {self.activations} fixes them at 8; "
                "drop one of them."
            )
        if self.budget_grids:
            self._check_budget_grids(budgeted)
        if budgeted and self.grid != "int":
            raise SchemeError(
                f"a size budget chooses among integer widths; it cannot start from --grid {self.grid} "
                "(drop one of them)."
            )
        if self.target_bpw is not None and not 2 <= self.target_bpw <= 9:
            raise SchemeError(
                f"--target-bpw {self.target_bpw} is out of reach: quantized tensors take 2 to 9 bits per weight."
            )
        if self.smooth is not None:
            self._check_smooth()
        self.config  # validates bits, group size and scale dtype now, not mid-conversion

    def _check_budget_grids(self, budgeted: bool) -> None:
        if not budgeted:
            raise SchemeError("--budget-grids names candidates of a size budget; add --target-bpw or --target-size.")
        unknown = [g for g in self.budget_grids if g not in GRID_NAMES or g == "int"]
        if unknown:
            tables = ", ".join(g for g in GRID_NAMES if g != "int")
            raise SchemeError(f"--budget-grids takes table grids ({tables}), not {', '.join(unknown)}.")

    def _check_smooth(self) -> None:
        if self.activations is None:
            raise SchemeError(
                "--smooth moves activation outliers into the weights, which only helps when activations are "
                "quantized too; add --activations (e.g. int8-dynamic) or drop --smooth."
            )
        if smooth_problem(self.smooth):
            raise SchemeError(f"--smooth {smooth_problem(self.smooth)}.")
        if self.quantizer == "awq":
            raise SchemeError(
                "awq already scales input channels to suit the weights; --smooth takes rtn, clip or gptq."
            )

    @property
    def config(self) -> QuantConfig:
        return QuantConfig(
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            scale_dtype=self.scale_dtype,
            grid=self.grid,
            activations=self.activations,
        )

    def scheme(self, overrides: dict[str, Any]) -> TensorScheme:
        """The scheme of a tensor whose deciding rule sets `overrides` (grid keys and/or "quantizer"); a rule
        that sets only `grid` gets the bits, symmetry and group size that grid implies."""
        grid = {k: v for k, v in overrides.items() if k != "quantizer"}
        if "grid" in grid:
            grid.update(grid_defaults(grid["grid"], grid))
        return TensorScheme(overrides.get("quantizer", self.quantizer), dataclasses.replace(self.config, **grid))

    def suffix(self) -> str:
        """Folder-name suffix, e.g. "int4-g64", "rtn-int3-ch-sym", "gptq-nf4-g64", or the recipe's name."""
        if self.recipe is not None:
            return self.recipe.path.stem
        parts = [] if self.quantizer == "rtn" else [self.quantizer]
        if self.activations:  # "w8a8-int8-dynamic-sq0.5": the scheme implies the weights' grid
            return "-".join(
                parts + ["w8a8", self.activations] + ([f"sq{self.smooth}"] if self.smooth is not None else [])
            )
        if self.target_bpw is not None:
            parts += [f"bpw{self.target_bpw:g}"]
        elif self.target_size is not None:
            parts += [f"{self.target_size / 1e6:.0f}MB"]
        else:
            parts += [f"int{self.bits}" if self.grid == "int" else self.grid]  # "nf4-g64": a table grid's bits
        parts += [f"g{self.group_size}" if self.group_size else "ch"]
        parts += ["sym"] if self.symmetric and self.grid == "int" else []
        return "-".join(parts)


def build_settings(recipe: Recipe | None, flags: dict[str, Any], calibration_flags: dict[str, Any]) -> Settings:
    """Settings from a recipe's defaults (if any) with the command-line flags that were given (not None)
    on top; calibration settings merge the same way, field by field."""
    given = {k: v for k, v in flags.items() if v is not None}
    calibration = {
        **((recipe.calibration or {}) if recipe else {}),
        **{k: v for k, v in calibration_flags.items() if v is not None},
    }
    has_source = calibration.get("text") is not None or calibration.get("dataset") is not None
    values = {**(recipe.defaults if recipe else {}), **given}
    if values.get("activations"):  # W8A8 implies its weights, as a grid implies its bits
        values.update({k: v for k, v in weights_of(values["activations"]).items() if k not in values})
    values.update(grid_defaults(values.get("grid", "int"), values))
    if "smooth" in values:
        values["smooth"] = smooth_strength(values["smooth"])
    if recipe is not None:
        values.update(rules=recipe.rules, recipe=recipe)
    return Settings(**values, calibration=CalibrationSettings(**calibration) if has_source else None)


def settings_from_options(recipe: str | Path | None, options: dict[str, Any], calibration: dict[str, Any]) -> Settings:
    """Settings as a person or a job writes them: a recipe file (or None), option values that may be
    lists for tuples and size strings ("500MB") for bytes, and calibration fields (a path for `text`).
    None means "not given". The command line and `qconvert.worker` both build settings here.

    Raises:
        SchemeError: a bad recipe, size or setting.
    """
    options = dict(options)
    for key in ("include", "exclude"):
        options[key] = tuple(options[key]) if options.get(key) else None
    grids = options.get("budget_grids")
    if isinstance(grids, str):  # "nf4,fp8" from the command line
        grids = [g.strip() for g in grids.split(",") if g.strip()]
    options["budget_grids"] = tuple(grids) if grids else None
    for key in ("target_size", "max_shard_size"):
        value = options.get(key)
        options[key] = parse_size(value) if isinstance(value, str) else value or None
    text = calibration.get("text")
    calibration = {**calibration, "text": str(text) if text else None}
    return build_settings(load_recipe(recipe) if recipe else None, options, calibration)


def smooth_strength(value: float | int | str | None) -> float | str | None:
    """--smooth as given ("0.5", 0.5, "auto", None) -> 0.5, "auto" or None (range checked by Settings).

    Raises:
        SchemeError: neither a number nor auto.
    """
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise SchemeError(f"--smooth {value} is not a strength in [0, 1] or auto.") from None


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """ "500MB", "2GiB", "1000000" -> bytes.

    Raises:
        SchemeError: `text` is not a size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise SchemeError(f"{text!r} is not a size; write e.g. 500MB or 2GiB.")
    return int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "B").upper()])


def settings_dict(settings: Settings) -> dict:
    """Every field of `settings` as plain JSON values: the manifest's record and the key that decides
    whether a calibration store or a batch output is still current. Derived from the dataclass fields,
    so a field added to `Settings` can never be left out of the key."""
    return {f.name: _plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def _plain(value):
    if hasattr(value, "describe"):  # a recipe, its rules, calibration settings
        return value.describe()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items())}
    return value
