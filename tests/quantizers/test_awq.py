import pytest
import torch

from qconvert.calibration.blocks import DecoderBlocks
from qconvert.calibration.samples import CalibrationSettings, calibration_windows
from qconvert.calibration.statistics import CalibrationBlock
from qconvert.io.sources import open_checkpoint
from qconvert.quantizers import QuantConfig, dequantize, get
from qconvert.quantizers.awq import output_error, search_scales
from qconvert.quantizers.rtn import rtn_quantize

TEXT = " ".join(f"Line {i} of a calibration text about rivers, foxes and dogs." for i in range(200))


def first_block(source, tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT)
    checkpoint = open_checkpoint(source)
    blocks = DecoderBlocks(checkpoint)
    settings = CalibrationSettings(text=str(tmp_path / "calib.txt"), samples=4, seqlen=32, batch_size=2)
    inputs = blocks.first_inputs(calibration_windows(checkpoint.folder, settings), settings.batch_size)
    module = blocks.load(0)
    names = [n for n in checkpoint.tensors if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    return CalibrationBlock(
        module, blocks.block_prefix(0), {n: QuantConfig(bits=3, group_size=32) for n in names}, inputs
    )


def test_folding_scales_leaves_the_float_block_unchanged(tiny_lm, tmp_path):
    block = first_block(tiny_lm, tmp_path)
    with torch.no_grad():
        before = [block.module(h, **k) for h, k in zip(block.inputs.hidden, block.inputs.kwargs)]
        replaced = get("awq")(QuantConfig(bits=3, group_size=32)).fold_scales(block)
        after = [block.module(h, **k) for h, k in zip(block.inputs.hidden, block.inputs.kwargs)]
    assert set(replaced) == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_scale_search_never_loses_to_unscaled_rtn():
    # α = 0 (all scales 1) is on the grid, so the chosen scales are at least as good as plain rtn.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=g) * (torch.rand(128, generator=g) * 4) ** 2  # a few loud channels
    hessian = 2 * x.T @ x / x.shape[0]
    weight = torch.randn(64, 128, generator=g)
    config = QuantConfig(bits=3, group_size=32)
    scales = search_scales(weight, hessian, config)
    awq = dequantize(rtn_quantize("w", weight * scales, config)) / scales
    plain = dequantize(rtn_quantize("w", weight, config))
    assert output_error(weight, awq, hessian) < 0.9 * output_error(weight, plain, hessian)
    assert output_error(weight, plain, hessian) == pytest.approx(
        ((x @ (plain - weight).T) ** 2).sum().item() * 2 / x.shape[0], rel=1e-3
    )
