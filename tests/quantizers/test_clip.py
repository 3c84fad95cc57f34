import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconvert.quantizers import QuantConfig, dequantize, get
from qconvert.quantizers.clip import importance_of
from qconvert.quantizers.grids import ScaleRangeError
from qconvert.quantizers.rtn import group_view


def squared_error(name, weight, config):
    """The error clip minimises: squared, weighted by importance (|w| plus the group's rms)."""
    q = get(name)(config).quantize("w", weight)
    groups = group_view(weight, config)
    return (importance_of(groups) * (group_view(dequantize(q), config) - groups) ** 2).sum().item(), q


@settings(deadline=None, max_examples=60)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([0, 16, 64]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31),
    columns=st.integers(1, 200),
)
def test_clip_is_never_worse_than_rtn(bits, group_size, symmetric, seed, columns):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, columns, generator=g) * torch.rand(8, 1, generator=g)
    config = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    try:
        squared_error("rtn", weight, config)
    except ScaleRangeError:  # a group float16 scales cannot hold: clip refuses it too, never clamps
        with pytest.raises(ScaleRangeError):
            squared_error("clip", weight, config)
        return
    clip_error, q = squared_error("clip", weight, config)
    rtn_error, _ = squared_error("rtn", weight, config)
    assert clip_error <= rtn_error * (1 + 1e-5) + 1e-12
    assert int(q.codes.max()) < 2**bits


@pytest.mark.parametrize(
    "bits, symmetric, bound", [(2, False, 0.82), (3, False, 0.92), (4, False, 0.96), (4, True, 0.98)]
)
def test_clip_helps_on_heavy_tailed_weights(bits, symmetric, bound):
    # Real weights have outliers; student-t samples mimic them. Measured ratios (seed 0): 0.78, 0.88, 0.93,
    # 0.973 (the sign-aware symmetric rtn grid leaves less to gain).
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((256, 512))
    config = QuantConfig(bits=bits, group_size=64, symmetric=symmetric)
    clip_error, _ = squared_error("clip", weight, config)
    rtn_error, _ = squared_error("rtn", weight, config)
    assert clip_error < bound * rtn_error
