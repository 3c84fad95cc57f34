"""The C kernels of round-to-nearest (`rtn_kernel.py`) give the same bits as rtn's torch code."""

import itertools

import pytest
import torch

from qconvert.errors import SchemeError
from qconvert.quantizers import rtn, rtn_kernel
from qconvert.quantizers.base import QuantConfig, relative_error
from qconvert.quantizers.grids import ScaleRangeError

pytestmark = pytest.mark.skipif(rtn_kernel.load() is None, reason="no C compiler or no AVX2 here")


def in_torch(monkeypatch, call):
    with monkeypatch.context() as m:
        m.setattr(rtn_kernel, "applies", lambda weight: False)
        return call()


def weight(shape, dtype, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[0, :3] = 0.5  # a group whose largest magnitude is positive
    w[-1, -2:] = -0.7  # and one where it is negative
    if shape[1] >= 64:
        w[1, 32:64] = 0  # an all-zero group
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_scales_zero_points_and_error_equal_torchs(monkeypatch, dtype, symmetric):
    for seed, (bits, group, shape) in enumerate(itertools.product([2, 3, 4, 8], [32, 100, 0], [(37, 250), (6, 7)])):
        w = weight(shape, dtype, seed)
        config = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
        assert rtn_kernel.applies(w)
        ours = rtn.rtn_quantize("t", w, config)
        reference = in_torch(monkeypatch, lambda: rtn.rtn_quantize("t", w, config))
        assert torch.equal(ours.codes, reference.codes), (bits, group, shape)
        assert torch.equal(ours.scales, reference.scales)
        assert (ours.zeros is None) == symmetric and (symmetric or torch.equal(ours.zeros, reference.zeros))
        assert relative_error(w, ours) == in_torch(monkeypatch, lambda: relative_error(w, reference)) > 0


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("magnitude", [5e-3, 1.0, 300.0])  # float16 scales among the subnormals, normal, large
def test_stored_scales_equal_torchs_across_the_scale_dtypes_range(monkeypatch, scale_dtype, magnitude):
    w = weight((16, 96), torch.float32, 0) * magnitude
    for symmetric in (True, False):
        config = QuantConfig(bits=4, group_size=32, symmetric=symmetric, scale_dtype=scale_dtype)
        ours = rtn.rtn_quantize("t", w, config)
        reference = in_torch(monkeypatch, lambda: rtn.rtn_quantize("t", w, config))
        assert torch.equal(ours.scales, reference.scales) and torch.equal(ours.codes, reference.codes)
        assert symmetric or torch.equal(ours.zeros, reference.zeros)


def test_scales_out_of_range_get_torchs_error(monkeypatch):
    w = torch.randn(4, 64) * 1e6  # scales past float16's largest value
    config = QuantConfig(bits=4, group_size=32)
    with pytest.raises(ScaleRangeError) as ours:
        rtn.rtn_quantize("t", w, config)
    with pytest.raises(ScaleRangeError) as reference:
        in_torch(monkeypatch, lambda: rtn.rtn_quantize("t", w, config))
    assert str(ours.value) == str(reference.value) and "bfloat16" in str(ours.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_wherever_they_lie(dtype, bad):
    for column in (5, 99):  # inside eight-wide steps and in a partial group's tail
        w = torch.randn(4, 100).to(dtype)
        w[2, column] = bad
        with pytest.raises(SchemeError, match="NaN or infinite"):
            rtn.rtn_quantize("t", w, QuantConfig(bits=4, group_size=32))


def test_float16_and_strided_weights_take_the_torch_path():
    assert not rtn_kernel.applies(torch.randn(8, 64).half())
    assert not rtn_kernel.applies(torch.randn(64, 8).t())
    w = torch.randn(64, 8).t()
    assert rtn.rtn_quantize("t", w, QuantConfig(bits=4, group_size=32)).codes.shape == (8, 64)
