"""Our compressed-tensors layout against the compressed-tensors library's own code, and the export of a
native output into it, loaded by transformers."""

import pytest
import torch
from typer.testing import CliRunner

import qconvert
from qconvert.cli import app
from qconvert.conversion import convert
from qconvert.formats.compressed_tensors import CompressedTensorsLayout, module_targets
from qconvert.formats.native import NativeLayout
from qconvert.manifest import TensorRecord
from qconvert.packing import pack_stream_words
from qconvert.quantizers import QuantConfig, dequantize, get
from qconvert.settings import Settings

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
runner = CliRunner()
torch.set_grad_enabled(False)
IDS = [1, 504, 3458, 282, 253, 1345, 30, 378, 314, 260, 3465, 2114, 288, 822, 260, 6130, 30]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("shape", [(6, 64), (5, 96), (3, 40)])
def test_packed_words_equal_compressed_tensors_pack_to_int32(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    theirs = ct_helpers.pack_to_int32(signed, bits)
    assert torch.equal(pack_stream_words(codes, bits), theirs)
    assert torch.equal(ct_helpers.unpack_from_int32(theirs, bits, torch.Size(shape)), signed)


def record_for(name, shape, config):
    return TensorRecord(
        name=name,
        shape=list(shape),
        source_dtype="F32",
        action="quantized",
        reason="",
        stored={},
        quantizer="rtn",
        bits=config.bits,
        group_size=config.group_size_for(shape[1]),
        symmetric=config.symmetric,
        scale_dtype=config.scale_dtype,
    )


@pytest.mark.parametrize("layout", [CompressedTensorsLayout(), NativeLayout()])
@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(4, 32, False),
        QuantConfig(3, 0, True),
        QuantConfig(8, 64, False),
        QuantConfig(2, 16, True),
        QuantConfig(8, 0, False),
    ],
)
def test_encode_matches_specs_and_decodes_exactly(layout, config):
    name, shape = "model.layers.0.mlp.up_proj.weight", (40, 128)
    q = get("rtn")(config).quantize(name, torch.randn(shape))
    stored = layout.encode(name, q)
    specs = layout.specs(name, shape, config)
    assert [(s.name, s.shape) for s in specs] == [(n, tuple(t.shape)) for n, t in stored.items()]
    back = layout.decode(record_for(name, shape, config), stored)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert (back.zeros is None) == (q.zeros is None) and (q.zeros is None or torch.equal(back.zeros, q.zeros))


def test_asymmetric_zero_points_match_compressed_tensors_decompression():
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    config = QuantConfig(4, 32, False, "float16")
    name = "layer.weight"
    weight = torch.randn(24, 96)
    q = get("rtn")(config).quantize(name, weight)
    stored = CompressedTensorsLayout().encode(name, q)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    )
    local = {k.removeprefix("layer."): v for k, v in stored.items()}
    theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    torch.testing.assert_close(theirs.float(), dequantize(q), rtol=2e-3, atol=1e-4)


def test_partial_groups_are_not_expressible():
    layout = CompressedTensorsLayout()
    assert "not a multiple of group size 128" in layout.unsupported_reason(
        "a.weight", (8, 576), QuantConfig(group_size=128)
    )
    assert layout.unsupported_reason("a.weight", (16, 576), QuantConfig(group_size=64)) is None
    # 8 rows of 4-bit zero points fill one word per group, which compressed-tensors' loader cannot read
    assert "single word" in layout.unsupported_reason("a.weight", (8, 576), QuantConfig(group_size=64))
    assert layout.unsupported_reason("a.weight", (8, 576), QuantConfig(group_size=64, symmetric=True)) is None


def test_targets_fold_layer_numbers_only_when_safe():
    modules = ["m.layers.0.q", "m.layers.1.q", "m.layers.0.k"]
    candidates = set(modules) | {"m.layers.1.k"}
    assert module_targets(modules, candidates) == ["m.layers.0.k", r"re:^m\.layers\.\d+\.q$"]


def test_auto_layout_keeps_compressed_tensors_only_where_transformers_loads_it():
    from qconvert.errors import SchemeError
    from qconvert.formats.registry import choose_layout
    from qconvert.quantizers import QuantConfig

    q, v = ("model.layers.0.self_attn.q_proj.weight", (64, 64)), ("model.layers.0.self_attn.v_proj.weight", (64, 64))
    sym4, sym8 = QuantConfig(bits=4, symmetric=True), QuantConfig(bits=8, symmetric=True)
    asym4, asym8 = QuantConfig(bits=4), QuantConfig(bits=8)
    assert choose_layout("auto", [(*q, sym4), (*v, sym8)]).name == "compressed-tensors"  # symmetric mixes load
    assert choose_layout("auto", [(*q, asym4), (*v, asym4)]).name == "compressed-tensors"
    assert choose_layout("auto", [(*q, asym4), (*v, asym8)]).name == "native"  # transformers dequantizes one scheme
    assert choose_layout("auto", [(*q, sym4), ("model.embed_tokens.weight", (256, 64), sym8)]).name == "native"
    with pytest.raises(SchemeError, match="mixed asymmetric"):
        choose_layout("compressed-tensors", [(*q, asym4), (*v, asym8)])


def test_compressed_tensors_export_repacks_a_native_output_that_transformers_loads(tmp_path, tiny_lm):
    from transformers import AutoModelForCausalLM

    out = convert(tiny_lm, tmp_path / "out", Settings(bits=4, group_size=32, symmetric=True, layout="native")).output
    result = runner.invoke(app, ["export", str(out), "--to", "compressed-tensors", "-o", str(tmp_path / "ct")])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", str(tmp_path / "ct")]).exit_code == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)(torch.tensor([IDS])).logits
    ours = qconvert.load_model(out)(torch.tensor([IDS])).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_compressed_tensors_export_refuses_what_the_layout_cannot_hold(tmp_path, tiny_lm):
    recipe = tmp_path / "embed.toml"
    recipe.write_text(
        '[defaults]\nbits = 4\ngroup_size = 32\n\n[[rules]]\nmatch = "embed_tokens"\nbits = 8\ngroup_size = 0\n'
    )
    out = convert(tiny_lm, tmp_path / "out", Settings(bits=4, group_size=32)).output
    assert (
        runner.invoke(app, ["model", str(tiny_lm), "-o", str(tmp_path / "mixed"), "--recipe", str(recipe)]).exit_code
        == 0
    )
    result = runner.invoke(app, ["export", str(tmp_path / "mixed"), "--to", "compressed-tensors"])
    assert result.exit_code == 7 and "embed_tokens" in result.stderr, result.output
    assert runner.invoke(app, ["export", str(out), "--to", "compressed-tensors"]).exit_code == 0


@pytest.mark.parametrize("flags", [["--bits", "4", "--symmetric"], ["--grid", "fp8"]])
def test_per_channel_is_written_as_the_channel_strategy(tmp_path, tiny_lm, flags):
    import json

    from qconvert.compatibility import check

    out = tmp_path / "per-channel"
    result = runner.invoke(app, ["model", str(tiny_lm), "-o", str(out), *flags, "--group-size", "0"])
    assert result.exit_code == 0, result.output
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    # rows of 64 (attention) and 128 (down_proj) columns: one scheme, not a group per row width
    assert len(groups) == 1 and groups["group_0"]["weights"]["strategy"] == "channel"
    assert groups["group_0"]["weights"]["group_size"] is None
    assert check(out, "transformers", forward=True) == ("compressed-tensors", [])
    assert check(out, "vllm")[1] == []
