import pytest
import torch
from helpers import first_block

from qconvert.quantizers import QuantConfig, dequantize, get
from qconvert.quantizers.awq import output_error, search_scales
from qconvert.quantizers.rtn import rtn_quantize


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
