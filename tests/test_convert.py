import hashlib
import json

import pytest
import torch
from helpers import tiny_tensors, write_checkpoint
from safetensors import safe_open

import qconvert
from qconvert import Settings, convert, load
from qconvert.errors import SchemeError
from qconvert.quantizers import dequantize, get
from qconvert.verification import verify_output


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_default_output_is_named_after_the_scheme(tiny_checkpoint):
    result = convert(tiny_checkpoint, settings=Settings(bits=3, group_size=32))
    assert result.output == tiny_checkpoint.with_name("tiny-int3-g32")
    assert sorted(p.name for p in result.output.iterdir()) == ["config.json", "model.safetensors", "qconvert.json"]


def test_same_command_gives_byte_identical_output(tiny_checkpoint, tmp_path):
    first = convert(tiny_checkpoint, tmp_path / "a").output
    second = convert(tiny_checkpoint, tmp_path / "b").output
    assert files_of(first) == files_of(second)


def test_manifest_describes_every_tensor(tiny_checkpoint, tmp_path):
    result = convert(tiny_checkpoint, tmp_path / "out", Settings(bits=4, group_size=64, layout="native"))
    manifest = json.loads((result.output / "qconvert.json").read_text())
    with safe_open(result.output / "model.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["qconvert"]) == manifest
        for record in manifest["tensors"]:
            for name, stored in record["stored"].items():
                data = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy()
                assert hashlib.sha256(data).hexdigest() == stored["sha256"]
                assert stored["bytes"] == data.size
    by_name = {t["name"]: t for t in manifest["tensors"]}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert (q["action"], q["bits"], q["group_size"], q["symmetric"], q["quantizer"]) == (
        "quantized",
        4,
        64,
        False,
        "rtn",
    )
    assert q["source_dtype"] == "BF16" and q["shape"] == [64, 64] and 0 < q["relative_mse"] < 0.05
    assert by_name["model.embed_tokens.weight"]["action"] == "kept"
    assert by_name["model.norm.weight"]["reason"].startswith("1-D")
    # per row of 64 weights: 32 bytes of 4-bit codes, a float16 scale, a 4-bit zero point padded to a byte
    assert sum(s["bytes"] for s in q["stored"].values()) == 64 * (32 + 2 + 1)
    assert 4 + 16 / 64 + 4 / 64 <= manifest["totals"]["quantized_bits_per_weight"] <= 4 + 16 / 64 + 8 / 64
    assert (
        manifest["source"]["sha256"]["model.safetensors"]
        == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    )
    assert manifest["settings"]["bits"] == 4 and manifest["schema_version"] == 2


def test_load_returns_the_dequantized_weights(tiny_checkpoint, tmp_path):
    settings = Settings(bits=3, group_size=32, symmetric=True)
    result = convert(tiny_checkpoint, tmp_path / "out", settings)
    state = load(result.output)
    source = tiny_tensors()
    assert set(state) == set(source)
    name = "model.layers.1.mlp.down_proj.weight"
    expected = dequantize(get("rtn")(settings.config).quantize(name, source[name]), torch.bfloat16)
    assert torch.equal(state[name], expected)
    assert torch.equal(state["model.embed_tokens.weight"], source["model.embed_tokens.weight"])


def test_partial_groups_fall_back_to_the_native_layout(tmp_path):
    tensors = {"blocks.0.proj.weight": torch.randn(8, 576)}
    source = write_checkpoint(tmp_path / "src", tensors)
    result = convert(source, tmp_path / "out", Settings(group_size=128))
    assert result.manifest.layout == "native"
    assert result.manifest.tensors[0].group_size == 128
    error = (load(result.output)["blocks.0.proj.weight"] - tensors["blocks.0.proj.weight"]).abs()
    assert error.max() < 0.5
    with pytest.raises(SchemeError, match="576 columns, not a multiple of group size 128"):
        convert(source, tmp_path / "ct", Settings(group_size=128, layout="compressed-tensors"))


def test_include_exclude_and_dtype(tiny_checkpoint, tmp_path):
    settings = Settings(include=("embed_tokens",), exclude=(r"layers\.1\.",), dtype="float16")
    manifest = convert(tiny_checkpoint, tmp_path / "out", settings).manifest
    by_name = {t.name: t for t in manifest.tensors}
    assert by_name["model.embed_tokens.weight"].action == "quantized"
    assert by_name["model.layers.1.mlp.down_proj.weight"].reason == r"excluded by --exclude layers\.1\."
    assert by_name["model.layers.1.mlp.down_proj.weight"].stored["model.layers.1.mlp.down_proj.weight"].dtype == "F16"


def test_sharded_output_loads_and_verifies(tiny_checkpoint, tmp_path):
    result = convert(tiny_checkpoint, tmp_path / "out", Settings(max_shard_size=20_000))
    assert len(result.files) > 1
    index = json.loads((result.output / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in result.files}
    assert verify_output(result.output) == ([], len(tiny_tensors()))
    assert set(load(result.output)) == set(tiny_tensors())


def test_a_failure_midway_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    calls = []
    original = qconvert.quantizers.rtn.RTNQuantizer.quantize

    def failing(self, name, weight, stats=None):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, name, weight, stats)

    monkeypatch.setattr(qconvert.quantizers.rtn.RTNQuantizer, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_checkpoint, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_verify_catches_a_flipped_byte(tiny_checkpoint, tmp_path):
    output = convert(tiny_checkpoint, tmp_path / "out").output
    path = output / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    problems, _ = verify_output(output)
    assert len(problems) == 1 and "sha256" in problems[0]


def test_non_float_buffers_pass_through(tmp_path):
    tensors = {"encoder.layer.0.dense.weight": torch.randn(16, 32), "embeddings.position_ids": torch.arange(8)[None]}
    result = convert(write_checkpoint(tmp_path / "src", tensors), tmp_path / "out", Settings(group_size=16))
    assert torch.equal(load(result.output)["embeddings.position_ids"], tensors["embeddings.position_ids"])


def test_included_non_float_tensor_is_refused(tmp_path):
    source = write_checkpoint(tmp_path / "src", {"blocks.0.w.weight": torch.randn(8, 8).double()})
    with pytest.raises(SchemeError, match="float64"):
        convert(source, tmp_path / "out")


def test_config_gets_a_quantization_config(tiny_checkpoint, tmp_path):
    config = json.loads((convert(tiny_checkpoint, tmp_path / "out").output / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    native = json.loads(
        (convert(tiny_checkpoint, tmp_path / "n", Settings(layout="native")).output / "config.json").read_text()
    )
    assert native["quantization_config"]["layout"] == "native" and "quant_method" not in native["quantization_config"]
