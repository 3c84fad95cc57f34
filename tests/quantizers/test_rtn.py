import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconvert.errors import SchemeError
from qconvert.limits import SUPPORTED_BITS
from qconvert.quantizers import QuantConfig, dequantize, get
from qconvert.quantizers.grids import ScaleRangeError


@st.composite
def weights_and_config(draw):
    rows, columns = draw(st.integers(1, 12)), draw(st.integers(1, 300))
    config = QuantConfig(
        bits=draw(st.sampled_from(SUPPORTED_BITS)),
        group_size=draw(st.sampled_from([0, 7, 32, 64, 128])),
        symmetric=draw(st.booleans()),
        scale_dtype=draw(st.sampled_from(["float16", "bfloat16"])),
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    return torch.randn(rows, columns, generator=g) * scale, config


def scale_per_weight(q):
    return q.scales.float().abs().repeat_interleave(q.group_size, dim=1)[:, : q.shape[1]]


@settings(deadline=None, max_examples=200)
@given(weights_and_config())
def test_rtn_error_is_within_half_a_step(case):
    weight, config = case
    try:
        q = get("rtn")(config).quantize("w", weight)
    except ScaleRangeError:
        # refused, never clamped: only where a group's step falls among float16's subnormals (below its
        # smallest normal, 6.1e-5, precision thins out to steps of 6e-8)
        from qconvert.quantizers.rtn import group_view

        smallest = group_view(weight, config).abs().amax(-1).min().item() / (2**config.bits - 1)
        assert config.scale_dtype == "float16" and smallest < 2.5e-5
        return
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**config.bits
    assert q.scales.shape == (weight.shape[0], config.groups_for(weight.shape[1]))
    error = (weight - dequantize(q)).abs()
    step = scale_per_weight(q)
    # Half a step, plus slack for the scale's rounding to 16 bits (which can push the group's
    # extreme weight just past the grid) and for the asymmetric zero point's rounding. Symmetric: the
    # extreme sits on code -2**(bits-1), so a weight of the other sign as large may lie one step past
    # the top code 2**(bits-1) - 1.
    slack = step * (1.0 if not config.symmetric else 0.5 + 2 ** (config.bits - 1) * 2**-7)
    assert torch.all(error <= 0.5 * step + slack + 1e-6)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_more_bits_means_less_error(bits):
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    errors = [
        ((weight - dequantize(get("rtn")(QuantConfig(bits=b)).quantize("w", weight))) ** 2).mean() for b in (bits, 8)
    ]
    assert errors[1] <= errors[0]


def test_partial_last_group_is_its_own_group():
    weight = torch.randn(4, 576)
    q = get("rtn")(QuantConfig(bits=4, group_size=128)).quantize("w", weight)
    assert q.scales.shape == (4, 5)
    # the last group holds columns 512..575 only: its scale comes from them alone
    last = weight[:, 512:]
    expected = (last.amax(1).clamp(min=0) - last.amin(1).clamp(max=0)) / 15
    torch.testing.assert_close(q.scales[:, 4].float(), expected, rtol=1e-3, atol=0)


def test_constant_and_zero_groups_survive():
    weight = torch.zeros(2, 64)
    weight[1] = 3.0
    q = get("rtn")(QuantConfig(bits=4, group_size=32)).quantize("w", weight)
    torch.testing.assert_close(dequantize(q), weight, atol=1e-3, rtol=1e-3)


def test_non_finite_weights_are_refused():
    weight = torch.randn(2, 64)
    weight[0, 3] = float("nan")
    with pytest.raises(SchemeError, match="NaN"):
        get("rtn")(QuantConfig()).quantize("layer.weight", weight)


@pytest.mark.parametrize("kwargs", [dict(bits=7), dict(bits=1), dict(group_size=-1), dict(scale_dtype="float32")])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(SchemeError):
        QuantConfig(**kwargs)
