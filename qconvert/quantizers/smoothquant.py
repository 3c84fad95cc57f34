"""The calibrated steps of W8A8: SmoothQuant's migration, and static input scales.

SmoothQuant (Xiao et al. 2023, arXiv:2211.10438): a few input channels of an LLM's linears carry
outliers far above the rest, so quantizing each token's input to int8 leaves the other channels only
a few codes. Dividing input channel j by

    s_j = max|X_j|^α / max_i |W_ij|^(1-α)

and multiplying the weights' column j by s_j leaves the product unchanged while moving the outliers
into the weights, which are quantized per output channel and have room for them. The division folds
exactly into the operation that produces X (the norms before q/k/v and gate/up, and up_proj's rows
before down_proj: AWQ's folds, `awq.FOLDS`, with the same handling of every norm parametrization), so
the runtime computes nothing extra. α = 0.5 is the paper's default; `auto` tries α = 0, 0.1, ..., 1 for
each group of linears sharing an input and keeps the one whose W8A8 output (inputs quantized as the
scheme says, weights by round-to-nearest) is closest to the float output on a sample of calibration
tokens.

A static scheme (`int8-static`) takes its one input scale per layer from the largest input the
calibration text produced, after smoothing: absmax / 127.5, compressed-tensors' min-max observer.
"""

import dataclasses

import torch

from qconvert.errors import UnsupportedModelError
from qconvert.quantizers.activations import fake_quantize, get_scheme, static_scale
from qconvert.quantizers.awq import FOLDS, fold_into_feeder
from qconvert.quantizers.base import CalibratedQuantizer, QuantizedTensor, Quantizer, dequantize
from qconvert.quantizers.rtn import rtn_quantize

ALPHAS = tuple(i / 10 for i in range(11))
SAMPLE_TOKENS = 1024  # calibration tokens per group on which `auto` compares strengths


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (float32, channels) = act_absmax^α / weight_absmax^(1-α); 1 where either is zero (nothing to move)."""
    scales = act_absmax.pow(alpha) / weight_absmax.pow(1 - alpha)
    usable = (act_absmax > 0) & (weight_absmax > 0)
    return torch.where(usable, scales, torch.ones_like(scales)).clamp(min=1e-5)


class W8A8Calibration(CalibratedQuantizer):
    """The quantizer of W8A8 layers when their activations need calibration (`--smooth`, a static
    scheme): smooths each block, quantizes its weights with `inner` (rtn, clip or gptq, which then sees
    the smoothed weights and inputs), and attaches static input scales. It writes what `inner` writes,
    under `inner`'s name: the manifest's settings record the smoothing.
    """

    def __init__(self, inner: Quantizer, activations: str, smooth: float | str | None) -> None:
        super().__init__(inner.config)
        self.inner, self.activations, self.smooth = inner, activations, smooth
        self.name, self.version, self.settings = inner.name, inner.version, inner.settings

    def calibration_use(self) -> str:
        static = not get_scheme(self.activations).dynamic
        flags = (["--smooth"] if self.smooth is not None else []) + (
            [f"--activations {self.activations}"] if static else []
        )
        return f"{' and '.join(flags)} {'need' if len(flags) > 1 else 'needs'} the model's activations"

    def quantize_block(self, block) -> dict[str, "QuantizedTensor | torch.Tensor"]:
        ranges = block.input_ranges(SAMPLE_TOKENS if self.smooth == "auto" else 0)
        replaced = self.smooth_block(block, ranges) if self.smooth is not None else {}
        if self.inner.requires_calibration:
            results = self.inner.quantize_block(block)
        else:
            results = {name: self.inner.quantize(name, block.weight(name)) for name in block.linears}
        if not get_scheme(self.activations).dynamic:
            for name, result in results.items():
                if isinstance(result, QuantizedTensor):
                    scale = static_scale(float(ranges[name].absmax.max()), self.activations)
                    results[name] = dataclasses.replace(result, input_scale=scale)
        return {**replaced, **results}

    def smooth_block(self, block, ranges: dict) -> dict[str, torch.Tensor]:
        """Fold SmoothQuant's scales into every group of `block` whose linears are all selected, in place
        (the block computes the same function); return the kept tensors that changed (norms). The input
        ranges of the smoothed linears become those of their new inputs."""
        replaced, smoothed = {}, 0
        for feeder, consumers in FOLDS:
            names = [f"{block.prefix}{c}.weight" for c in consumers]
            if not all(n in block.linears for n in names):
                continue
            smoothed += 1
            weight = torch.cat([block.weight(n) for n in names])
            act_absmax = ranges[names[0]].absmax
            alpha = self.smooth if self.smooth != "auto" else self._best_alpha(block, names, weight, ranges[names[0]])
            scales = smoothing_scales(act_absmax, weight.abs().amax(0), alpha)
            replaced.update(fold_into_feeder(block, feeder, scales, "smoothquant"))
            for name in names:
                block.linears[name].weight.data.mul_(scales)
                ranges[name].absmax = ranges[name].absmax / scales
        if not smoothed:  # a flag that changes nothing must not pass silently
            raise UnsupportedModelError(
                f"--smooth folds its scales into the norms before q/k/v and gate/up and into up_proj before "
                f"down_proj; block {block.prefix.rstrip('.')} has no such group of selected linears "
                "(SmoothQuant supports Llama-style blocks: Llama, Mistral, Qwen2, Gemma and kin)."
            )
        return replaced

    def _best_alpha(self, block, names: list[str], weight: torch.Tensor, inputs) -> float:
        """The α whose W8A8 output on the sampled inputs is nearest the float output (squared error)."""
        x = inputs.rows()
        reference = x @ weight.T
        act_absmax, weight_absmax = inputs.absmax, weight.abs().amax(0)
        config = block.configs[names[0]]
        errors = {}
        for alpha in ALPHAS:
            scales = smoothing_scales(act_absmax, weight_absmax, alpha)
            static = static_scale(float((act_absmax / scales).max()), self.activations)
            quantized_x = fake_quantize(x / scales, self.activations, static)
            quantized_w = dequantize(rtn_quantize(names[0], weight * scales, config))
            errors[alpha] = float((quantized_x @ quantized_w.T).sub_(reference).square_().sum())
        return min(errors, key=errors.get)
