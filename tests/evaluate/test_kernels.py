"""The runtime's fast paths agree with dequantize-then-matmul in float32: the fused kernels of
`evaluate/kernels.py` (uncompiled and compiled) to float32 summation order, torch's int4/int8
kernels to bfloat16 rounding; per grid, per shape, partial groups included."""

import pytest
import torch

from qconvert.evaluate import c_kernels, kernels
from qconvert.evaluate.qlinear import QuantizedLinear
from qconvert.evaluate.runtime import TableHead, build_quantized_model
from qconvert.quantizers import QuantConfig, dequantize, get
from qconvert.quantizers.grids import get_grid, grid_defaults

torch.set_grad_enabled(False)

SHAPES = [(40, 200), (136, 256)]  # 200 columns: a partial last group for every group size below
INT_CONFIGS = [
    QuantConfig(bits, group, symmetric)
    for bits in (2, 3, 4, 5, 6, 8)
    for group, symmetric in ((32, True), (64, False), (100, False), (0, True))
]
TABLE_CONFIGS = [
    QuantConfig(**grid_defaults(grid, {}), grid=grid)
    for grid in ("nf4", "iq4nl", "mxfp4", "nvfp4", "mxfp8", "fp8", "fp8-block")
]


def quantize(config: QuantConfig, shape: tuple[int, int], seed: int = 0):
    torch.manual_seed(seed)
    return get("rtn")(config).quantize("w", torch.randn(*shape) * 0.05)


def close(actual: torch.Tensor, expected: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, rel: float) -> bool:
    """Within `rel` of the largest |W||x| sum, the scale of float32 rounding in a dot product."""
    return bool((actual - expected).abs().max() <= rel * (weight.abs() @ x.abs().T).max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", INT_CONFIGS + TABLE_CONFIGS, ids=str)
def test_fused_kernel_expressions_are_exact(config, shape):
    q = quantize(config, shape)
    spec = kernels.spec_for(q)
    weight = kernels.pack(q, spec)
    assert sum(p.numel() for p in weight.planes) * 8 == shape[0] * spec.groups * spec.padded * config.bits
    expected = dequantize(q)
    assert torch.allclose(kernels.dequantize(weight), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    x = torch.randn(1, shape[1])
    assert close(kernels.gemv(x[0], weight)[None], x @ expected.T, expected, x, 1e-6)


@pytest.mark.parametrize("config", [QuantConfig(3, 64, False), TABLE_CONFIGS[0], TABLE_CONFIGS[-2]], ids=str)
def test_compiled_kernels_compute_what_the_expressions_do(config):
    q = quantize(config, (40, 200), seed=1)
    weight = kernels.pack(q, kernels.spec_for(q))
    x = torch.randn(200)
    before = kernels.Compiled.seconds
    y = kernels.Compiled.call("gemv", x, weight)
    assert kernels.Compiled.failed is None and kernels.Compiled.seconds > before
    expected = dequantize(q)
    assert close(y[None], x[None] @ expected.T, expected, x[None], 1e-6)
    assert torch.allclose(kernels.Compiled.call("dequantize", weight), kernels.dequantize(weight), rtol=0, atol=1e-7)


@pytest.mark.skipif(c_kernels.load() is None, reason="no C compiler or no AVX2 here")
@pytest.mark.parametrize("shape", SHAPES + [(8, 40)])
@pytest.mark.parametrize("config", TABLE_CONFIGS[:4], ids=str)
def test_the_c_table_kernel_is_exact(config, shape):
    q = quantize(config, shape)
    weight = kernels.pack(q, kernels.spec_for(q))
    table = get_grid(config.grid).table.float()
    expected = dequantize(q)
    dequantized = c_kernels.table_dequantize(weight.planes[0], weight.scales, table, weight.spec.group, shape[1])
    assert torch.equal(dequantized, expected)
    x = torch.randn(shape[1])
    y = c_kernels.gemv(kernels.grouped_input(x, weight.spec), weight, table)
    assert close(y[None], x[None] @ expected.T, expected, x[None], 1e-6)


@pytest.mark.skipif(c_kernels.load() is None, reason="no C compiler or no AVX2 here")
@pytest.mark.parametrize("shape", SHAPES + [(8, 44)])
@pytest.mark.parametrize("config", INT_CONFIGS + TABLE_CONFIGS[4:], ids=str)
def test_the_c_int_and_e4m3_kernels_are_exact(config, shape):
    q = quantize(config, shape)
    weight = kernels.pack(q, kernels.spec_for(q))
    assert c_kernels.kernel_for(weight.spec) == ("int" if config.grid == "int" else "e4m3")
    expected = dequantize(q)
    x = torch.randn(shape[1])
    y = c_kernels.gemv(kernels.grouped_input(x, weight.spec), weight)
    assert close(y[None], x[None] @ expected.T, expected, x[None], 1e-6)


def test_every_e4m3_code_decodes_as_torch_does():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # the two NaN patterns: never produced
    q = quantize(QuantConfig(**grid_defaults("fp8", {}), grid="fp8"), (1, len(codes)))
    q = type(q)(**{**q.__dict__, "codes": codes[None], "scales": torch.ones(1, 1, dtype=q.scales.dtype)})
    weight = kernels.pack(q, kernels.spec_for(q))
    expected = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(kernels.dequantize(weight)[0], expected)
    if c_kernels.load() is not None:
        for column in range(len(codes)):  # one-hot inputs read one decoded code at a time
            x = torch.zeros(len(codes))
            x[column] = 1
            y = c_kernels.gemv(kernels.grouped_input(x, weight.spec), weight)
            assert y.item() == expected[column].item()


def test_without_the_c_kernels_the_compiled_ones_serve(monkeypatch):
    monkeypatch.setattr(c_kernels, "load", lambda: None)
    for config in (TABLE_CONFIGS[0], TABLE_CONFIGS[5], QuantConfig(8, 64, False)):
        assert QuantizedLinear(quantize(config, (40, 200)), has_bias=False).kernel == "fused"


@pytest.mark.parametrize(
    "config, kernel",
    [
        (QuantConfig(8, 0, True), "int8"),
        (QuantConfig(8, 0, False), "int8"),
        (QuantConfig(4, 64, False), "int4"),
        (QuantConfig(4, 0, True), "int4"),  # per channel: the kernel's groups repeat the row's scale
        (QuantConfig(3, 64, False), "int4"),
        (QuantConfig(2, 32, True), "int4"),
        (QuantConfig(5, 64, False), "int4-pair"),
        (QuantConfig(6, 0, True), "int8"),  # per channel: the int8 kernel
        (QuantConfig(5, 0, False), "int8"),
        (QuantConfig(6, 32, True), "int4-pair"),
        (QuantConfig(8, 128, True), "int4-pair"),
        (QuantConfig(8, 64, False), "c-int"),  # an asymmetric 8-bit high nibble does not re-centre
        (QuantConfig(8, 100, False), "c-int"),
        (QuantConfig(4, 100, False), "c-int"),  # groups the int4 kernel cannot tile
        (QuantConfig(2, 16, True), "c-int"),
        (TABLE_CONFIGS[0], "c-table"),  # nf4
        (TABLE_CONFIGS[3], "c-table"),  # nvfp4, groups of 16
        (TABLE_CONFIGS[4], "c-e4m3"),  # mxfp8
        (TABLE_CONFIGS[5], "c-e4m3"),  # fp8, per channel
        (TABLE_CONFIGS[6], "c-e4m3"),  # fp8-block
    ],
    ids=str,
)
@pytest.mark.parametrize("rows", [1, 40])  # one row: the decoding paths; 40: a prompt
def test_quantized_linear_kernels_match_dequantize_then_matmul(config, kernel, rows):
    q = quantize(config, (96, 576))
    layer = QuantizedLinear(q, has_bias=True)
    assert layer.kernel == kernel
    bias = torch.randn(96)
    layer.bias = torch.nn.Parameter(bias)
    x = torch.randn(1, rows, 576)
    weight = dequantize(q)
    expected = x @ weight.T + bias
    exact = kernel == "fused" or kernel.startswith("c-") or (kernel == "int8" and rows > layer.SMALL_INPUT_ROWS)
    # torch's kernels take bfloat16 activations: 2**-9 relative on each input
    assert close(layer(x).view(-1, 96), expected.view(-1, 96), weight, x.view(-1, 576), 1e-6 if exact else 4e-3)
    exact_layer = QuantizedLinear(q, has_bias=True, use_kernels=False)
    exact_layer.bias = torch.nn.Parameter(bias)
    assert exact_layer.kernel in ("unpack", "int8")  # int8 per channel: int8 codes, then a float32 matmul
    assert close(exact_layer(x).view(-1, 96), expected.view(-1, 96), weight, x.view(-1, 576), 1e-6)


@pytest.mark.parametrize(
    "config, shape",
    [
        (QuantConfig(4, 64, False), (40, 96)),  # rows not a multiple of 16: the int4 kernel refuses them
        (QuantConfig(3, 64, True), (16, 96)),  # a partial last group on the int4 kernel
        (QuantConfig(6, 64, False), (32, 160)),  # ... and on the pair
    ],
    ids=str,
)
def test_small_and_partial_layers_take_a_path_that_accepts_them(config, shape):
    q = quantize(config, shape)
    layer = QuantizedLinear(q, has_bias=False)
    x = torch.randn(1, shape[1])
    weight = dequantize(q)
    exact = layer.kernel == "fused" or layer.kernel.startswith("c-")
    assert close(layer(x), x @ weight.T, weight, x, 1e-6 if exact else 4e-3)


def test_asymmetric_int4_groups_recentre_where_they_fit():
    q = quantize(QuantConfig(4, 64, False), (32, 128))
    layer = QuantizedLinear(q, has_bias=False)
    zeros = layer.scales_and_zeros[..., 1].float()
    fits = [bool(((q.codes[r, g * 64 : (g + 1) * 64].int() - int(q.zeros[r, g]) + 8).clamp(0, 15)
                  == q.codes[r, g * 64 : (g + 1) * 64].int() - int(q.zeros[r, g]) + 8).all())
            for r in range(32) for g in range(2)]  # fmt: skip
    assert any(fits) and not all(fits)
    assert [bool(z == 0) for z in zeros.T.reshape(-1)] == fits


def test_a_tied_16_bit_table_stays_16_bit_and_decodes_in_it(tiny_lm, tmp_path, monkeypatch):
    from qconvert import Settings, convert

    out = convert(tiny_lm, tmp_path / "out", Settings(bits=4, group_size=32)).output
    fast, exact = build_quantized_model(out), build_quantized_model(out, use_kernels=False)
    head = fast.get_output_embeddings()
    assert isinstance(head, TableHead) and head.weight.dtype == torch.bfloat16
    assert head.weight is fast.get_input_embeddings().weight
    assert exact.get_input_embeddings().weight.dtype == torch.float32
    x = torch.randn(1, 1, head.weight.shape[1])
    table = head.weight.float()
    assert close(head(x)[0], x[0] @ table.T, table, x[0], 4e-3)  # one row: bfloat16
    prompt = torch.randn(1, 5, head.weight.shape[1])
    monkeypatch.setattr(TableHead, "CHUNK", 1000)  # widened a block at a time, blocks of the vocabulary
    assert torch.allclose(head(prompt), prompt @ table.T, rtol=0, atol=1e-5)  # longer inputs: float32
