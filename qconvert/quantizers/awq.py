"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling them up before
rounding, and fold the inverse scale into the operation that produces those activations.

For linears reading input X, scaling input channel j of every weight by s_j and dividing X's
channel j by s_j leaves the output unchanged, but rounds the scaled weights on a finer relative
grid where s_j > 1. AWQ searches s = rms(X)^α over α ∈ [0, 1) and keeps the α whose quantized
weights best reproduce the float output. The output error of a weight error ΔW over the
calibration set is tr(ΔW H ΔWᵀ) with H = 2XᵀX/n, the statistic GPTQ also uses, so the search needs
no stored activations. The division by s is folded exactly into the previous operation: the norm
before q/k/v and before gate/up (its weight), and up_proj's rows before down_proj (since
down's input is act(gate) * up). o_proj's input comes out of attention, where grouped-query heads
forbid an exact fold, so it is quantized without scales, as AutoAWQ does for such models.

Folding needs to know which operation feeds which linears; `FOLDS` names them for the Llama block
layout (Llama, Mistral, Qwen2, Gemma, SmolLM and kin). Other blocks are refused with a clear message.
A norm's fold respects how it applies its weight (`norm_offset`): Gemma's RMSNorm multiplies by
1 + w, so w becomes (1 + w) / s - 1; a norm that does neither is refused.
"""

import torch

from qconvert.errors import UnsupportedModelError
from qconvert.quantizers.base import CalibratedQuantizer, QuantConfig, QuantizedTensor, dequantize
from qconvert.quantizers.clip import clip_quantize
from qconvert.quantizers.registry import register
from qconvert.quantizers.rtn import rtn_quantize

# (operation whose output feeds the linears, the linears), as module paths inside a block.
FOLDS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
GRID = 20


def output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error over the calibration inputs, up to a constant: tr(ΔW H ΔWᵀ)."""
    delta = approximation - weight
    return float((delta @ hessian).mul_(delta).sum())


def search_scales(
    weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, grid: int = GRID, name: str = "weight"
) -> torch.Tensor:
    """Per input channel scales s = rms(x)^α, α chosen to minimise the output error of rtn(W·s)/s."""
    rms = torch.diagonal(hessian).div(2).clamp(min=0).sqrt()
    best, best_error = torch.ones_like(rms), float("inf")
    for step in range(grid):
        scales = rms.pow(step / grid).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centre the range so scales stay near 1
        approximation = dequantize(rtn_quantize(name, weight * scales, config)) / scales
        error = output_error(weight, approximation, hessian)
        if error < best_error:
            best, best_error = scales, error
    return best


@register("awq")
class AWQQuantizer(CalibratedQuantizer):
    description = "AWQ: activation-aware per-channel scales folded into the previous op, then round-to-nearest"
    options = {"grid": GRID}

    def quantize_block(self, block) -> dict[str, "QuantizedTensor | torch.Tensor"]:
        hessians = {name: h for names, h in block.input_hessians() for name in names}
        replaced = self.fold_scales(block, hessians)
        # Then clip each group's range where the (scaled) activations say it matters, as AutoAWQ's
        # auto_clip does: the error of column j counts in proportion to E[x_j²] = H_jj / 2.
        results = {
            name: clip_quantize(
                name, block.weight(name), block.configs[name], _column_importance(block, name, hessians)
            )
            for name in block.linears
        }
        return {**replaced, **results}

    def fold_scales(self, block, hessians: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Search and fold every group's scales into the block in place (its function is unchanged);
        return the kept tensors that changed. `hessians` (computed if not given) become those of the
        scaled inputs."""
        if hessians is None:
            hessians = {name: h for names, h in block.input_hessians() for name in names}
        replaced = {}
        for feeder, consumers in FOLDS:
            names = [f"{block.prefix}{c}.weight" for c in consumers]
            if not all(n in block.linears for n in names):
                continue  # not all selected: leave this group unscaled
            weight = torch.cat([block.weight(n) for n in names])
            scales = search_scales(weight, hessians[names[0]], block.configs[names[0]], self.settings["grid"], names[0])
            replaced.update(fold_into_feeder(block, feeder, scales, self.name))
            hessian = hessians[names[0]] / scales.outer(scales)  # inputs are now x / s
            for name in names:
                block.linears[name].weight.data.mul_(scales)
                hessians[name] = hessian
        return replaced


def _column_importance(block, name: str, hessians: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.diagonal(hessians[name]).clamp(min=0) + 1e-12


def norm_offset(module: torch.nn.Module, name: str, method: str = "awq") -> float:
    """How a norm applies its weight, found by running it: 0 when it multiplies by `w` (LayerNorm,
    Llama's RMSNorm), 1 when by `1 + w` (Gemma's RMSNorm).

    Raises:
        UnsupportedModelError: the module applies its weight some other way, so no fold is known exact.
    """
    import copy

    probe = copy.deepcopy(module).float()
    x = torch.randn(3, probe.weight.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        probe.weight.zero_()
        at_zero = probe(x)
        probe.weight.fill_(1.0)
        at_one = probe(x)
        probe.weight.fill_(2.0)
        at_two = probe(x)
    # (offset + w) · n(x) is linear in w: zero at w = -offset, and twice as far from it at 2 as at 1 (for offset 0).
    if at_zero.abs().max() <= 1e-6 * at_one.abs().max() and torch.allclose(at_two, 2 * at_one, rtol=1e-4, atol=1e-6):
        return 0.0
    if torch.allclose(at_one, 2 * at_zero, rtol=1e-4, atol=1e-6) and torch.allclose(
        at_two, 3 * at_zero, rtol=1e-4, atol=1e-6
    ):
        return 1.0
    raise UnsupportedModelError(
        f"{method} folds its scales into {name}, a {type(module).__name__} that applies its weight "
        f"neither as w nor as 1 + w, so no exact fold is known; this model cannot take {method}."
    )


def fold_into_feeder(block, feeder: str, scales: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    """Divide the output channels of `feeder` (a module path in `block`, from FOLDS) by `scales` (float32,
    its output width), in place; return its changed kept tensors (a norm's weight and bias) by name.

    Raises:
        UnsupportedModelError: the block has no such module, or it is a norm with no exact fold.
    """
    try:
        module = block.module.get_submodule(feeder)
    except AttributeError as exc:
        raise UnsupportedModelError(
            f"{method} folds its scales into {block.prefix}{feeder}, which this model's blocks lack; "
            f"{method} supports Llama-style blocks (Llama, Mistral, Qwen2, Gemma and kin)."
        ) from exc
    weight = module.weight.data
    offset = 0.0 if isinstance(module, torch.nn.Linear) else norm_offset(module, f"{block.prefix}{feeder}", method)
    # A norm that multiplies by (offset + w) folds 1/s as (offset + w) / s - offset.
    weight.add_(offset).div_(scales.view(-1, *([1] * (weight.dim() - 1)))).sub_(offset)
    if getattr(module, "bias", None) is not None:
        module.bias.data.div_(scales)
    if isinstance(module, torch.nn.Linear):
        return {}  # a linear feeder (up_proj) is quantized with the rest, its rows already divided
    changed = {f"{block.prefix}{feeder}.weight": weight}
    if getattr(module, "bias", None) is not None:
        changed[f"{block.prefix}{feeder}.bias"] = module.bias.data
    return changed
