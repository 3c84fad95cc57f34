import pytest
import torch

from qconvert.quantizers import QuantConfig, dequantize, get
from qconvert.quantizers.gptq import gptq_quantize


def correlated_inputs(samples: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Inputs with uneven, correlated channels, as real activations have (GPTQ gains nothing on white noise)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) / columns**0.5
    scales = torch.rand(columns, generator=g) * 3 + 0.1
    return (torch.randn(samples, columns, generator=g) @ mixing) * scales


def output_error(weight, q, x):
    return ((x @ weight.T - x @ dequantize(q).T) ** 2).mean().item()


@pytest.mark.parametrize(
    "bits, group_size, symmetric, act_order",
    [
        (4, 64, False, False),
        (4, 64, True, False),
        (3, 64, False, True),
        (4, 0, False, False),
        (4, 48, False, False),  # 200 columns: the last group of each row is partial
        (2, 32, False, True),
    ],
)
def test_gptq_reduces_output_error_against_rtn(bits, group_size, symmetric, act_order):
    g = torch.Generator().manual_seed(1)
    columns = 200 if group_size == 48 else 256
    weight = torch.randn(96, columns, generator=g)
    x = correlated_inputs(2048, columns)
    hessian = 2 * x.T @ x / x.shape[0]
    config = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    gptq = gptq_quantize(weight, hessian, config, act_order=act_order)
    rtn = get("rtn")(config).quantize("w", weight)
    assert gptq.codes.shape == weight.shape and int(gptq.codes.max()) < 2**bits
    assert gptq.scales.shape == rtn.scales.shape
    assert output_error(weight, gptq, x) < 0.8 * output_error(weight, rtn, x)


def test_identity_hessian_gives_round_to_nearest():
    # With H = I no column's error can be compensated by another: GPTQ is rtn.
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    config = QuantConfig(bits=4, group_size=32)
    gptq = gptq_quantize(weight, torch.eye(128), config, damp=0.0)
    rtn = get("rtn")(config).quantize("w", weight)
    assert (gptq.codes.int() - rtn.codes.int()).abs().max() <= 1  # division vs reciprocal ties
    assert (gptq.codes == rtn.codes).float().mean() > 0.999


def test_singular_hessian_is_damped_not_fatal():
    weight = torch.randn(16, 64)
    x = torch.randn(8, 64)  # rank 8 < 64: H is singular
    x[:, 5] = 0  # and one input is dead
    q = gptq_quantize(weight, x.T @ x, QuantConfig(bits=4, group_size=32), damp=0.0)
    assert torch.isfinite(dequantize(q)).all()


def test_unknown_option_is_refused():
    from qconvert.errors import SchemeError

    with pytest.raises(SchemeError, match="takes no option"):
        get("rtn")(QuantConfig(), act_order=True)
