"""Quantization-aware training (QAT): weights, scales and zero points learn to sit on the grid.

`prepare` puts a `FakeQuantizer` on the weight of selected linears (a torch parametrization): the
layer then computes with the weight its codes stand for, `(q - z) * s`, exactly as `dequantize`
rebuilds it, while gradients reach the float weight behind it, the scales and the zero points.
Rounding passes gradients straight through (STE, Bengio et al. 2013, arXiv:1308.3432) inside the
grid and stops them outside; the scale's gradient is LSQ's (Esser et al. 2020, arXiv:1902.08153)
without its gradient scale, which Adam's per-parameter step size makes moot; learned zero points are
LSQ+'s (Bhalgat et al. 2020). `convert` turns the layers back into plain
linears and returns the codes and scales the converter writes: the same numbers, so the converted
model computes exactly what the trained one did.

The `qat` quantizer trains one transformer block at a time (EfficientQAT's Block-AP, Chen et al.
2024, arXiv:2407.11062): starting from GPTQ's codes, the block's quantized form learns to map the
quantized model's activations onto the float block's outputs on the float model's own activations,
by mean squared error. Memory is one block, its optimizer state and two streams of activations.
"""

import math
from typing import Any

import torch
from torch.nn.utils import parametrize

from qconvert.errors import SchemeError
from qconvert.quantizers.base import CalibratedQuantizer, QuantConfig, QuantizedTensor, zero_points
from qconvert.quantizers.grids import SCALE_DTYPES, effective_scales
from qconvert.quantizers.registry import register
from qconvert.quantizers.rtn import group_view, rtn_quantize


class _RoundToGrid(torch.autograd.Function):
    """q = clamp(round(x) + z, 0, top): exact codes forward; backward, the gradient of x + z inside
    the grid and none outside it (where q is a constant)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
        shifted = x.round().add_(zero)
        inside = (shifted >= 0) & (shifted <= top)
        ctx.save_for_backward(inside)
        return shifted.clamp_(0, top)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        passed = grad * inside
        return passed, passed.sum(-1, keepdim=True), None


class _RoundTo(torch.autograd.Function):
    """Round to a dtype's values (a scale to its stored float16) or to integers (a zero point to
    [0, top]) in the forward pass; pass the gradient unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype | None, top: int) -> torch.Tensor:
        return x.to(dtype).float() if dtype is not None else x.round().clamp(0, top)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class FakeQuantizer(torch.nn.Module):
    """The weight a linear computes with, from its float weight and learnable scales and zero points.

    Integer grids only (any bits, group size, symmetric or not). Built from a QuantizedTensor (the
    start: rtn, clip or gptq codes); its scales (float32, rows × groups) and, asymmetric, zero points
    (float32, rounded in use) are parameters.

    Raises:
        SchemeError: a table grid or W8A8 config, which QAT does not train.
    """

    def __init__(self, start: QuantizedTensor, config: QuantConfig) -> None:
        super().__init__()
        _check_trainable("this weight", config)
        self.config = config
        self.top = 2**config.bits - 1
        self.columns = start.shape[1]
        self.scale = torch.nn.Parameter(effective_scales(start.scales, "int", None).clone())
        zero = zero_points(start)
        if config.symmetric:
            self.register_buffer("zero", zero)
        else:
            self.zero = torch.nn.Parameter(zero)

    def codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scales, zero points) of `weight` (rows, columns) as float32: codes (rows, groups,
        group size), the scales as stored (rounded to the scale dtype), the zero points as integers."""
        scale = _RoundTo.apply(self.scale, SCALE_DTYPES[self.config.scale_dtype], self.top)
        zero = self.zero if self.config.symmetric else _RoundTo.apply(self.zero, None, self.top)
        position = group_view(weight, self.config) * scale.reciprocal().unsqueeze(-1)  # as rtn: × the reciprocal
        return _RoundToGrid.apply(position, zero.unsqueeze(-1), self.top), scale, zero

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = self.codes(weight)
        values = (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)  # dequantize's own arithmetic
        return values.view(values.shape[0], -1)[:, : self.columns]

    @torch.no_grad()
    def quantized(self, weight: torch.Tensor) -> QuantizedTensor:
        """The QuantizedTensor the converter writes for `weight`: `dequantize` of it equals `forward(weight)`.

        Raises:
            SchemeError: a scale left the range of its stored dtype.
        """
        codes, scale, zero = self.codes(weight)
        stored = scale.to(SCALE_DTYPES[self.config.scale_dtype])
        if not torch.isfinite(stored).all() or bool((stored == 0).any()):
            raise SchemeError(
                f"training drove a scale outside what {self.config.scale_dtype} holds; lower the learning rate."
            )
        rows = codes.shape[0]
        return QuantizedTensor(
            codes=codes.view(rows, -1)[:, : self.columns].to(torch.uint8).contiguous(),
            scales=stored,
            zeros=None if self.config.symmetric else zero.to(torch.uint8),
            bits=self.config.bits,
            group_size=self.config.group_size_for(self.columns),
            shape=(rows, self.columns),
            dtype=weight.dtype,
        )


def prepare(
    module: torch.nn.Module, configs: dict[str, QuantConfig], start: dict[str, QuantizedTensor] | None = None
) -> dict[str, FakeQuantizer]:
    """Fake-quantize the linear weights named in `configs` ("layers.0.mlp.up_proj.weight", relative to
    `module`): each computes with its codes' values from now on, starting from the codes of `start[name]`
    (e.g. gptq's result; default: rtn's), so training begins where that method ended.

    Raises:
        SchemeError: a name that is not a linear's weight, or a grid QAT does not train.
    """
    linears = {name: _linear(module, name) for name in configs}  # refuse before changing anything
    for name, config in configs.items():
        _check_trainable(name, config)
    quantizers = {}
    for name, config in configs.items():
        linear = linears[name]
        weight = linear.weight.detach().float()
        begin = start[name] if start is not None else rtn_quantize(name, weight, config)
        linear.weight.data = _inside_cells(weight, begin, config)
        quantizers[name] = FakeQuantizer(begin, config)
        parametrize.register_parametrization(linear, "weight", quantizers[name])
    return quantizers


def _inside_cells(weight: torch.Tensor, start: QuantizedTensor, config: QuantConfig) -> torch.Tensor:
    """The float weight to train, (rows, columns) float32: `weight` moved into the rounding cell of its
    code in `start`, so it rounds to exactly those codes while keeping where it sat in the cell.

    Sitting on the codes' values instead would be a dead start: STE sees no rounding error there, so
    the scales get no gradient, and no weight lies near a cell's edge where a small step flips a code.
    """
    rows, columns = start.shape
    scale = effective_scales(start.scales, "int", None).unsqueeze(-1)
    zero = zero_points(start).unsqueeze(-1)
    position = group_view(weight, config) * scale.reciprocal() + zero
    codes = group_view(start.codes.float(), config)
    margin = 0.49  # never on an edge, where rounding could go either way
    inside = codes + (position - codes).clamp_(-margin, margin)
    return ((inside - zero) * scale).view(rows, -1)[:, :columns].contiguous()


def convert(module: torch.nn.Module) -> dict[str, QuantizedTensor]:
    """Undo `prepare`: every fake-quantized linear of `module` becomes a plain one holding the weight its
    codes stand for; returns those codes and scales by weight name (what the converter writes)."""
    results = {}
    for name, sub in list(module.named_modules()):
        if parametrize.is_parametrized(sub, "weight"):
            fake = sub.parametrizations.weight[0]
            if isinstance(fake, FakeQuantizer):
                results[f"{name}.weight" if name else "weight"] = fake.quantized(sub.parametrizations.weight.original)
                parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
                sub.weight.requires_grad_(False)
    return results


def _linear(module: torch.nn.Module, name: str) -> torch.nn.Linear:
    path = "" if name == "weight" else name.removesuffix(".weight")  # "" is `module` itself
    try:
        linear = module.get_submodule(path) if name.endswith("weight") else None
    except AttributeError:
        linear = None
    if not isinstance(linear, torch.nn.Linear):
        raise SchemeError(f"{name} is not the weight of a linear layer, so it cannot be fake-quantized.")
    return linear


@register("qat")
class QATQuantizer(CalibratedQuantizer):
    description = "quantization-aware training, block by block, from gptq's codes (EfficientQAT Block-AP)"
    needs_float_targets = True
    options = {
        "start": "gptq",  # the codes training begins from: gptq, clip or rtn
        # Passes over the calibration windows per block. 4: int2 needs them (SmolLM2 g64: 41.8 at 2, 37.4
        # at 4), and 4 still trains SmolLM2 in under half an hour.
        "epochs": 4,
        "lr": 5e-4,  # Adam's learning rate for the float weights
        "scale_lr": 1e-4,  # ... and for scales and zero points
        "damp": 0.01,  # gptq's, for the start
        "act_order": True,
        "seed": 0,  # the order of the batches in each epoch
    }

    def __init__(self, config: QuantConfig, **options: Any) -> None:
        super().__init__(config, **options)
        settings = self.settings
        if settings["start"] not in ("gptq", "clip", "rtn"):
            raise SchemeError(f"qat starts from gptq, clip or rtn codes, not {settings['start']!r}.")
        for name in ("epochs", "seed"):
            if isinstance(settings[name], bool) or not isinstance(settings[name], int) or settings[name] < 0:
                raise SchemeError(f"qat's {name} must be a whole number, 0 or more, not {settings[name]!r}.")
        for name in ("lr", "scale_lr"):
            rate = settings[name]
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < math.inf:
                raise SchemeError(f"qat's {name} must be a finite learning rate, 0 or more, not {rate!r}.")

    def check_configs(self, configs: dict[str, QuantConfig]) -> None:
        for name, config in configs.items():
            _check_trainable(name, config)

    def calibration_use(self) -> str:
        return "quantizer 'qat' trains each block on calibration text against the float model"

    def quantize_block(self, block) -> dict[str, QuantizedTensor]:
        if not block.configs:  # a block the rules keep in float: nothing to train
            return {}
        self.check_configs(block.configs)
        start = self._start(block)
        originals = {name: block.weight(name).clone() for name in block.configs}
        relative = {name[len(block.prefix) :]: config for name, config in block.configs.items()}
        fakes = prepare(block.module, relative, {name[len(block.prefix) :]: q for name, q in start.items()})
        try:
            block.record = train_block(block, list(fakes.values()), self.settings)
        finally:
            trained = convert(block.module)
            for name, weight in originals.items():  # errors are measured against the source's weights
                block.linears[name].weight.data = weight
        if block.record["kept"] == "start":
            return start
        return {block.prefix + name: q for name, q in trained.items()}

    def _start(self, block) -> dict[str, QuantizedTensor]:
        kind = self.settings["start"]
        if kind == "gptq":
            from qconvert.quantizers.gptq import GPTQQuantizer

            gptq = GPTQQuantizer(self.config, damp=self.settings["damp"], act_order=self.settings["act_order"])
            return gptq.quantize_block(block)
        if kind == "clip":
            from qconvert.quantizers.clip import clip_quantize

            return {n: clip_quantize(n, block.weight(n), c) for n, c in block.configs.items()}
        return {n: rtn_quantize(n, block.weight(n), c) for n, c in block.configs.items()}


def _check_trainable(name: str, config: QuantConfig) -> None:
    if config.grid != "int" or config.activations is not None:
        kind = config.grid if config.grid != "int" else f"W8A8 ({config.activations})"
        raise SchemeError(f"qat trains integer weight grids only; {name} is set to {kind}. Use gptq for it.")


def train_block(block, fakes: list[FakeQuantizer], settings: dict) -> dict:
    """Train `block.module` (its selected linears fake-quantized) to map `block.inputs` onto
    `block.targets`, batch by batch, for `settings["epochs"]` passes in a seeded order; keep the start
    if training did not lower the loss over all batches. Returns the record for the manifest: losses
    (mean squared error) before, per epoch and after, steps, and which weights were kept. No times: the
    same command gives the same bytes."""
    module, inputs, targets = block.module, block.inputs.hidden, block.targets.hidden
    kwargs = block.inputs.kwargs
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    weights = [linear.parametrizations.weight.original for linear in _parametrized(module)]
    quantizer_parameters = [p for fake in fakes for p in fake.parameters()]
    for p in weights + quantizer_parameters:
        p.requires_grad_(True)
    snapshot = [p.detach().clone() for p in weights + quantizer_parameters]
    optimizer = torch.optim.Adam(
        [
            {"params": weights, "lr": float(settings["lr"])},
            {"params": quantizer_parameters, "lr": float(settings["scale_lr"])},
        ]
    )
    total_steps = int(settings["epochs"]) * len(inputs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, total_steps))
    before = _mean_loss(module, inputs, kwargs, targets)
    block.report(f"loss {before:.4g} at the start")
    generator = torch.Generator().manual_seed(int(settings["seed"]))  # the same order on every run and resume
    with torch.enable_grad():  # whatever the caller's mode (calibration runs under no_grad)
        epoch_losses, steps = _epochs(block, optimizer, schedule, generator, int(settings["epochs"]))
    for p in weights + quantizer_parameters:
        p.requires_grad_(False)
    after = _mean_loss(module, inputs, kwargs, targets) if steps else before
    kept = "trained" if after < before else "start"  # also when training diverged (a NaN loss)
    if kept == "start":
        for p, saved in zip(weights + quantizer_parameters, snapshot):
            p.data.copy_(saved)
    return {
        "loss_start": _finite(before),
        "loss_epochs": [_finite(loss) for loss in epoch_losses],
        "loss_end": _finite(after if kept == "trained" else before),
        "steps": steps,
        "kept": kept,
    }


def _epochs(block, optimizer, schedule, generator, epochs: int) -> tuple[list[float], int]:
    """Run the training epochs; returns each epoch's mean loss and the steps taken."""
    module, inputs, kwargs, targets = block.module, block.inputs.hidden, block.inputs.kwargs, block.targets.hidden
    epoch_losses, steps = [], 0
    for epoch in range(epochs):
        total = 0.0
        for i in torch.randperm(len(inputs), generator=generator).tolist():
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(module, inputs[i], kwargs[i], targets[i])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
            steps += 1
        epoch_losses.append(total / max(1, len(inputs)))
        block.report(f"epoch {epoch + 1}: loss {epoch_losses[-1]:.4g}")
    return epoch_losses, steps


def _finite(loss: float) -> float | None:
    """A loss for the manifest's JSON, which has no NaN or infinity: None for those."""
    return loss if math.isfinite(loss) else None


def _warmup_cosine(step: int, total: int) -> float:
    """The learning rate's factor at `step` of `total`: a linear warm-up over the first tenth (Adam's
    first steps are full-size whatever the gradient), then a cosine decay to zero (as EfficientQAT):
    large steps find better codes, small ones settle them."""
    warmup = max(1, total // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _parametrized(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in module.modules()
        if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], FakeQuantizer)
    ]


def _loss(module: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, target: torch.Tensor) -> torch.Tensor:
    output = module(hidden, **kwargs)
    output = output[0] if isinstance(output, tuple) else output
    return torch.nn.functional.mse_loss(output, target)


@torch.no_grad()
def _mean_loss(module: torch.nn.Module, inputs: list, kwargs: list, targets: list) -> float:
    # Caching each weight's fake-quantized value once per pass, not once per batch.
    with parametrize.cached():
        return sum(_loss(module, h, k, t).item() for h, k, t in zip(inputs, kwargs, targets)) / max(1, len(inputs))
