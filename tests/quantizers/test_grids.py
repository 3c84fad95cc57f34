"""Table grids (`quantizers/grids.py`): codes round-trip, values agree with each format's own definition
(MLX for mxfp4 and nvfp4, gguf for IQ4_NL, torch's float8_e4m3fn for fp8), and rtn, clip and gptq all
target them."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconvert.errors import SchemeError
from qconvert.packing import pack_codes
from qconvert.quantizers import QuantConfig, dequantize
from qconvert.quantizers.clip import clip_quantize
from qconvert.quantizers.gptq import gptq_quantize
from qconvert.quantizers.grids import GRIDS, IQ4_NL, NF4, effective_scales, grid_defaults
from qconvert.quantizers.rtn import rtn_quantize

TABLES = ["nf4", "iq4nl", "mxfp4", "nvfp4", "mxfp8", "fp8", "fp8-block"]


def config(grid: str) -> QuantConfig:
    return QuantConfig(grid=grid, **grid_defaults(grid, {}))


def weight(rows=16, columns=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=g) * 0.05


def distinct_codes(grid) -> list[int]:
    """Codes whose values are distinct and finite: the first code of each value (0.0 before -0.0)."""
    seen, codes = set(), []
    for code, value in enumerate(grid.values):
        if value == value and value not in seen:
            seen.add(value)
            codes.append(code)
    return codes


@pytest.mark.parametrize("name", TABLES)
def test_the_nearest_code_of_a_codes_value_is_that_code(name):
    grid = GRIDS[name]
    codes = torch.tensor(distinct_codes(grid), dtype=torch.uint8)
    assert torch.equal(grid.nearest(grid.decode(codes)), codes)


@settings(deadline=None, max_examples=60)
# (weights far below 1e-3 need scales float16 cannot hold, which is refused, not rounded)
@given(name=st.sampled_from(TABLES), seed=st.integers(0, 2**31), scale=st.floats(0.05, 20.0))
def test_rtn_picks_the_nearest_value_and_dequantizes_to_it(name, seed, scale):
    w = weight(seed=seed) * scale
    q = rtn_quantize("w", w, config(name))
    grid = GRIDS[name]
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**grid.bits and q.grid == name
    step = effective_scales(q.scales, name, q.global_scale).repeat_interleave(q.group_size, dim=1)  # per weight
    table = grid.table[grid.table == grid.table]
    nearest = (w.unsqueeze(-1) - table * step.unsqueeze(-1)).abs().amin(-1)
    error = (dequantize(q) - w).abs()
    assert torch.allclose(dequantize(q), grid.decode(q.codes) * step)
    inside = w.abs() <= grid.largest * step.abs()  # beyond the table's end a weight is clipped, not rounded
    assert bool((error <= nearest + 1e-6 * step.abs())[inside].all())


def test_mx_and_nvfp4_dequantize_as_mlx_does():
    mx = pytest.importorskip("mlx.core")
    w = weight(rows=8, columns=64)
    for name, extra in [("mxfp4", {}), ("nvfp4", {}), ("mxfp8", {})]:
        q = rtn_quantize("w", w, config(name))
        words = mx.array(pack_codes(q.codes, q.bits).view(torch.int32).numpy().view(np.uint32))
        scales = mx.array(q.scales.view(torch.uint8).numpy())  # E8M0 exponents, or E4M3 bit patterns
        if name == "nvfp4":  # MLX takes the tensor's absmax and divides by 6 · 448 itself
            extra = {"global_scale": mx.array(np.float32(float(q.global_scale) * 6 * 448))}
        theirs = mx.dequantize(
            words, scales, group_size=q.group_size, bits=q.bits, mode=name, dtype=mx.float32, **extra
        )
        assert np.array_equal(np.array(theirs), dequantize(q).numpy()), name


def test_mx_scales_follow_the_ocp_rule():
    # shared exponent floor(log2(absmax)) - 2: the E2M1 maximum, 6, is 1.5 · 2²
    w = torch.zeros(1, 32)
    w[0, 0] = 5.0  # log2 5 = 2.32 -> 2^(2-2) = 1: 5 rounds to 4 or 6 at scale 1
    q = rtn_quantize("w", w, config("mxfp4"))
    assert int(q.scales[0, 0]) == 127 and float(dequantize(q)[0, 0]) in (4.0, 6.0)
    # mxfp8: floor(log2(absmax)) - 8, E4M3's 448 being 1.75 · 2⁸: 5 -> 2^(2-8), and 5 = 320 · 2^-6 exactly
    q = rtn_quantize("w", w, config("mxfp8"))
    assert int(q.scales[0, 0]) == 127 - 6 and float(dequantize(q)[0, 0]) == 5.0


def test_iq4nl_dequantizes_as_gguf_does():
    gguf = pytest.importorskip("gguf")
    w = weight(rows=4, columns=64)
    q = rtn_quantize("w", w, config("iq4nl"))
    blocks = []
    for r in range(4):
        for g in range(2):
            codes = q.codes[r, 32 * g : 32 * g + 32]
            packed = (codes[:16] | (codes[16:] << 4)).numpy().astype(np.uint8)  # llama.cpp's nibble order
            blocks.append(np.concatenate([q.scales[r, g : g + 1].numpy().view(np.uint8), packed]))
    data = np.stack(blocks).reshape(4, -1)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.IQ4_NL)
    assert np.allclose(theirs, dequantize(q).numpy(), rtol=0, atol=0)
    assert list(IQ4_NL) == [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def test_fp8_codes_are_torchs_own_rounding():
    w = weight()
    q = rtn_quantize("w", w, config("fp8"))
    scales = q.scales.float()
    theirs = (w / scales).to(torch.float8_e4m3fn).view(torch.uint8)
    assert (theirs != q.codes).float().mean() < 1e-3  # ties may differ; nothing else
    assert NF4[0] == -1.0 and NF4[-1] == 1.0 and NF4[7] == 0.0 and len(NF4) == 16


@pytest.mark.parametrize("name", TABLES)
def test_clip_never_loses_to_rtn_and_gptq_beats_it_at_the_output(name):
    w = weight(rows=32, columns=256, seed=1)
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.2, 3, 256)
    hessian = 2 * x.T @ x / x.shape[0]

    def output_error(q):
        return float(((dequantize(q) - w) @ x.T).square().sum())

    rtn = rtn_quantize("w", w, config(name))
    if name != "fp8-block":  # its scales span 128 rows: clip, a per-row search, refuses it
        clip = clip_quantize("w", w, config(name))
        assert (dequantize(clip) - w).square().sum() <= (dequantize(rtn) - w).square().sum() * 1.001 or name == "nvfp4"
    gptq = gptq_quantize(w, hessian, config(name), act_order=True)
    assert gptq.grid == name and output_error(gptq) < output_error(rtn)


def test_a_grid_fixes_its_bits_symmetry_and_block():
    with pytest.raises(SchemeError, match="grid nf4 has 4-bit codes"):
        QuantConfig(grid="nf4", bits=8, symmetric=True)
    with pytest.raises(SchemeError, match="grid mxfp4 scales groups of 32"):
        QuantConfig(grid="mxfp4", bits=4, symmetric=True, group_size=64)
    with pytest.raises(SchemeError, match="unknown grid"):
        QuantConfig(grid="fp3")
    assert grid_defaults("fp8", {}) == {"bits": 8, "symmetric": True, "group_size": 0}
    assert grid_defaults("nf4", {"group_size": 128})["bits"] == 4


def test_fp8_blocks_share_one_scale_per_128_by_128():
    w = weight(rows=200, columns=256, seed=3)
    w[130, 7] = 9.0  # the loudest weight of block (1, 0): its scale is 9 / 448, on rows 128-199
    q = rtn_quantize("w", w, config("fp8-block"))
    assert q.scales.shape == (200, 2)
    assert torch.equal(q.scales[:128], q.scales[:1].expand(128, 2)) and torch.equal(
        q.scales[128:], q.scales[128:129].expand(72, 2)
    )
    assert float(q.scales[199, 0]) == pytest.approx(9.0 / 448, rel=1e-3)
    gptq = gptq_quantize(w, torch.eye(256), config("fp8-block"))
    assert torch.equal(gptq.scales[:128], gptq.scales[:1].expand(128, 2))


def test_clip_refuses_grids_shared_across_rows():
    with pytest.raises(SchemeError, match="shares a scale across 128 rows"):
        clip_quantize("w", weight(), config("fp8-block"))
