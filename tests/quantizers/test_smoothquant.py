"""SmoothQuant: folding its scales leaves the float block's function unchanged, and on a block whose
activations have an outlier channel it brings the W8A8 output much closer to float than naive W8A8."""

import pytest
import torch
from helpers import first_block
from typer.testing import CliRunner

from qconvert.cli import app
from qconvert.quantizers import QuantConfig, QuantizedTensor, dequantize, get
from qconvert.quantizers.activations import fake_quantize, weights_of
from qconvert.quantizers.smoothquant import W8A8Calibration, smoothing_scales

W8 = QuantConfig(**weights_of("int8-dynamic"), activations="int8-dynamic")
runner = CliRunner()


def block_outputs(block) -> list[torch.Tensor]:
    with torch.no_grad():
        return [block.module(h, **k) for h, k in zip(block.inputs.hidden, block.inputs.kwargs)]


def w8a8_outputs(block, results: dict, scheme: str) -> list[torch.Tensor]:
    """The block with its weights replaced by `results` and every quantized linear's input quantized."""
    parameters = dict(block.module.named_parameters())
    hooks = []
    for name, result in results.items():
        local = name[len(block.prefix) :]
        if isinstance(result, QuantizedTensor):
            parameters[local].data = dequantize(result)
            module = block.module.get_submodule(local.removesuffix(".weight"))
            scale = result.input_scale
            hooks.append(module.register_forward_pre_hook(lambda _, a, s=scale: (fake_quantize(a[0], scheme, s),)))
        else:
            parameters[local].data = result.float()
    try:
        return block_outputs(block)
    finally:
        for hook in hooks:
            hook.remove()


def with_outlier_channel(block, channel: int = 5, factor: float = 60.0):
    """The same function, but the normed input of q/k/v carries channel `channel` `factor` times louder
    (the norm's weight up, the linears' columns down): the outlier pattern SmoothQuant targets."""
    norm = block.module.input_layernorm
    norm.weight.data[channel] *= factor
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(block.module.self_attn, name).weight.data[:, channel] /= factor
    return block


def relative_error(outputs, reference) -> float:
    return sum(float((o - r).square().sum()) for o, r in zip(outputs, reference)) / sum(
        float(r.square().sum()) for r in reference
    )


def test_smoothing_leaves_the_float_block_unchanged(tiny_lm, tmp_path):
    block = first_block(tiny_lm, tmp_path, W8)
    before = block_outputs(block)
    quantizer = W8A8Calibration(get("rtn")(W8), "int8-dynamic", 0.5)
    replaced = quantizer.smooth_block(block, block.input_ranges())
    assert set(replaced) == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}
    for a, b in zip(before, block_outputs(block)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("smooth", [0.5, "auto"])
def test_smoothing_tames_an_outlier_channel(tiny_lm, tmp_path, smooth):
    errors = {}
    for label, alpha in (("naive", None), ("smoothed", smooth)):
        block = with_outlier_channel(first_block(tiny_lm, tmp_path, W8))
        reference = block_outputs(block)
        quantizer = W8A8Calibration(get("rtn")(W8), "int8-dynamic", alpha)
        errors[label] = relative_error(w8a8_outputs(block, quantizer.quantize_block(block), "int8-dynamic"), reference)
    assert errors["smoothed"] < 0.5 * errors["naive"], errors


def test_static_scales_come_from_the_calibration_inputs(tiny_lm, tmp_path):
    config = QuantConfig(**weights_of("int8-static"), activations="int8-static")
    block = first_block(tiny_lm, tmp_path, config)
    largest = {name: float(r.absmax.max()) for name, r in block.input_ranges().items()}
    results = W8A8Calibration(get("rtn")(config), "int8-static", None).quantize_block(block)
    for name, result in results.items():
        assert result.input_scale.item() == pytest.approx(largest[name] / 127.5)


def test_smoothing_scales_follow_the_paper():
    act, weight = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    torch.testing.assert_close(smoothing_scales(act, weight, 0.5), torch.tensor([2.0, 0.5, 1.0]))
    torch.testing.assert_close(smoothing_scales(act, weight, 1.0), torch.tensor([4.0, 1.0, 1.0]))


def test_smoothing_a_model_without_llama_blocks_is_refused(tmp_path, real_models):
    calib = tmp_path / "calib.txt"
    calib.write_text("A sentence about rivers and foxes. " * 200)
    args = ["model", str(real_models / "all-minilm-l6-v2"), "-o", str(tmp_path / "x"), "--activations", "int8-dynamic"]
    result = runner.invoke(app, [*args, "--smooth", "0.5", "--calib", str(calib), "--calib-samples", "2"])
    assert result.exit_code != 0 and "Llama-style blocks" in result.output.replace("\n", " "), result.output
    assert not (tmp_path / "x").exists()
