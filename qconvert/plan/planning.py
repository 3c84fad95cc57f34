"""The plan of a conversion, from checkpoint headers alone: every tensor's fate, scheme and stored bytes.

`qconvert model` executes this plan; `qconvert recipe check` and `qconvert plan` print it, so what
they show is what conversion then does.
"""

from dataclasses import dataclass, field

import torch

from qconvert.errors import SchemeError, UnsupportedModelError
from qconvert.formats.base import Layout
from qconvert.formats.registry import choose_layout
from qconvert.io.dtypes import DTYPE_NAMES, FLOAT_DTYPES
from qconvert.io.loading import Checkpoint
from qconvert.io.skeleton import QUANTIZABLE
from qconvert.io.writing import TensorSpec
from qconvert.manifest import BY_BUDGET, KEPT, QUANTIZED, Manifest, StoredRecord, TensorRecord
from qconvert.plan.selection import IN_BLOCK, Decision, command_line_rules, decide
from qconvert.quantizers import Quantizer, get
from qconvert.quantizers.activations import needs_calibration
from qconvert.settings import PASSTHROUGH_DTYPES, Settings, TensorScheme


@dataclass(frozen=True)
class Candidate:
    """One scheme a budget may give a tensor: a grid at some bits and group size (0: per channel)."""

    grid: str
    bits: int
    group_size: int

    def describe(self) -> str:
        """e.g. "int4 g64", "nf4 g64", "fp8 per-channel"."""
        kind = f"int{self.bits}" if self.grid == "int" else self.grid
        return f"{kind} {f'g{self.group_size}' if self.group_size else 'per-channel'}"

    def overrides(self) -> dict:
        """The scheme keys this candidate sets (a table grid has no zero point)."""
        keys = {"grid": self.grid, "bits": self.bits, "group_size": self.group_size}
        return keys if self.grid == "int" else {**keys, "symmetric": True}


@dataclass
class PlannedTensor:
    record: TensorRecord
    specs: list[TensorSpec]
    scheme: TensorScheme | None  # None for a kept tensor


@dataclass
class ConversionPlan:
    tensors: list[PlannedTensor]
    layout: Layout
    quantizers: dict[TensorScheme, Quantizer] = field(default_factory=dict)

    def quantizer_of(self, planned: PlannedTensor) -> Quantizer:
        return self.quantizers[planned.scheme]

    @property
    def calibrated(self) -> Quantizer | None:
        """The calibrated quantizer (for its default grid), if any tensor uses one."""
        return next((q for q in self.quantizers.values() if q.requires_calibration), None)

    def totals(self) -> dict:
        manifest = Manifest("", "", {}, {}, [p.record for p in self.tensors])
        manifest.compute_totals()
        return manifest.totals


def plan_conversion(
    checkpoint: Checkpoint, settings: Settings, chosen: dict[str, Candidate] | None = None
) -> ConversionPlan:
    """Decide every tensor: kept or quantized, with which quantizer and grid, stored how.

    `chosen` (tensor name -> `Candidate`) overrides the grid, bits and group size of quantized
    tensors, as chosen for `--target-bpw` / `--target-size`.

    Raises:
        SchemeError: nothing to quantize, an impossible scheme, or calibration settings that do
            not fit the quantizers.
    """
    rules = command_line_rules(settings.include, settings.exclude, settings.rules)
    skeleton = checkpoint.skeleton()
    decisions = {
        name: decide(info, rules, skeleton.role(name) if skeleton else None)
        for name, info in checkpoint.tensors.items()
    }
    schemes = {}
    for name, decision in decisions.items():
        if decision.quantize:
            if checkpoint.tensors[name].dtype not in FLOAT_DTYPES:
                raise SchemeError(
                    f"tensor {name} has dtype {checkpoint.tensors[name].dtype}; qconvert quantizes "
                    "float32, float16 and bfloat16 weights only."
                )
            overrides = dict(decision.overrides)
            if chosen and name in chosen:
                overrides.update(chosen[name].overrides())
            schemes[name] = settings.scheme(overrides)
    if not schemes:
        raise _nothing_selected(checkpoint, skeleton)
    quantizers = _quantizers(set(schemes.values()), settings)
    layout = choose_layout(
        settings.layout,
        [(n, checkpoint.tensors[n].shape, s.config) for n, s in schemes.items()],
        skeleton.roles if skeleton else None,
    )
    planned = [
        _planned(checkpoint, name, decisions[name], schemes.get(name), quantizers, layout, settings, chosen)
        for name in checkpoint.tensors
    ]
    return ConversionPlan(planned, layout, quantizers)


def _planned(
    checkpoint: Checkpoint,
    name: str,
    decision: Decision,
    scheme: TensorScheme | None,
    quantizers: dict[TensorScheme, Quantizer],
    layout: Layout,
    settings: Settings,
    chosen: dict[str, Candidate] | None,
) -> PlannedTensor:
    """One tensor's record (with its decision and scheme) and stored tensors."""
    info = checkpoint.tensors[name]
    reason, decided_by = decision.reason, decision.by
    if chosen and name in chosen:
        reason += f"; {chosen[name].describe()} chosen by the size budget"
        decided_by = BY_BUDGET
    stored_as = checkpoint.stored_scheme(name)
    if scheme and stored_as:
        reason += f"; read from its {stored_as} source"
    record = TensorRecord(
        name=name,
        shape=list(info.shape),
        source_dtype=DTYPE_NAMES[info.dtype],
        action="quantized" if scheme else "kept",
        reason=reason,
        stored={},
        decided_by=decided_by,
        origin=QUANTIZED if scheme else KEPT,  # until conversion finds it repacked, requantized or rescaled
    )
    if scheme:
        config, quantizer = scheme.config, quantizers[scheme]
        record.quantizer, record.quantizer_version = quantizer.name, quantizer.version
        record.bits, record.group_size = config.bits, config.group_size_for(info.shape[1])
        record.symmetric, record.scale_dtype, record.grid = config.symmetric, config.scale_dtype, config.grid
        record.activations = config.activations
        specs = layout.specs(name, info.shape, config)
    else:
        specs = [TensorSpec(name, DTYPE_NAMES[kept_dtype(info.dtype, settings)], info.shape)]
    record.stored = {s.name: StoredRecord(s.dtype, list(s.shape), s.nbytes, "0" * 64) for s in specs}
    return PlannedTensor(record, specs, scheme)


def _nothing_selected(checkpoint: Checkpoint, skeleton) -> SchemeError:
    """Why nothing was selected, and the way out if there is one."""
    if skeleton is not None:
        roles = sorted(
            {skeleton.role(n) for n, info in checkpoint.tensors.items() if len(info.shape) == 2 and IN_BLOCK.search(n)}
            - set(QUANTIZABLE)
        )
        if roles and not any(skeleton.role(n) in QUANTIZABLE for n in checkpoint.tensors if IN_BLOCK.search(n)):
            return UnsupportedModelError(
                f"no tensor in {checkpoint.source} can be quantized: transformers builds its block weights as "
                f"{', '.join(roles)}, not linear layers, and a runtime would load random weights in place of a "
                f"quantized one ({skeleton.model_class})."
            )
    return SchemeError(f"no tensor in {checkpoint.source} is selected for quantization; use --include to pick some.")


def _quantizers(schemes: set[TensorScheme], settings: Settings) -> dict[TensorScheme, Quantizer]:
    """One quantizer per scheme; the options go to the default quantizer, which they were given for."""
    quantizers = {}
    for scheme in sorted(schemes, key=lambda s: (s.quantizer, s.config.bits, s.config.group_size, s.config.symmetric)):
        options = settings.options if scheme.quantizer == settings.quantizer else {}
        quantizers[scheme] = _with_activation_calibration(get(scheme.quantizer)(scheme.config, **options), settings)
    calibrated = sorted({q.name for q in quantizers.values() if q.requires_calibration})
    if len(calibrated) > 1:
        raise SchemeError(f"one conversion can run one calibrated quantizer, not {' and '.join(calibrated)}.")
    budgeted = (
        settings.target_bpw is not None or settings.target_size is not None
    )  # calibration weighs the budget's errors
    if not calibrated and settings.calibration is not None and not budgeted:
        raise SchemeError(
            f"quantizer {settings.quantizer!r} uses no calibration data; drop --calib or choose gptq or awq."
        )
    return quantizers


def _with_activation_calibration(quantizer: Quantizer, settings: Settings) -> Quantizer:
    """W8A8 layers whose activations need calibration (SmoothQuant, a static scheme) get their quantizer
    wrapped in the calibrated steps of `quantizers/smoothquant.py`."""
    activations = quantizer.config.activations
    if activations is None or not needs_calibration(activations, settings.smooth):
        return quantizer
    from qconvert.quantizers.smoothquant import W8A8Calibration

    return W8A8Calibration(quantizer, activations, settings.smooth)


def kept_dtype(dtype: torch.dtype, settings: Settings) -> torch.dtype:
    if settings.dtype is None or dtype not in FLOAT_DTYPES:
        return dtype
    return PASSTHROUGH_DTYPES[settings.dtype]
