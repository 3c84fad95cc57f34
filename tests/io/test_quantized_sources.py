"""Already-quantized sources (GPTQ, AWQ, compressed-tensors): read exactly, repacked losslessly onto the
same grid, or dequantized and quantized again with a warning."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import qconvert
from qconvert.cli import app
from qconvert.conversion import convert
from qconvert.formats.export import export
from qconvert.settings import Settings

runner = CliRunner()
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order: bits 4i of a word hold column AWQ_ORDER[i]


@pytest.fixture(scope="module")
def original(tmp_path_factory, tiny_lm):
    return convert(tiny_lm, tmp_path_factory.mktemp("imports") / "int4", Settings(bits=4, group_size=32)).output


def _model(source, out, *flags):
    result = runner.invoke(app, ["model", str(source), "-o", str(out), "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _assert_same_weights(a, b):
    first, second = qconvert.load(a, torch.float32), qconvert.load(b, torch.float32)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_gptq_checkpoint_on_the_same_grid_is_repacked_exactly(original, tmp_path):
    gptq = export(original, "gptq", tmp_path / "gptq").destination
    summary = _model(gptq, tmp_path / "back", "--bits", "4", "--group-size", "32")
    assert summary["warnings"] == []
    _assert_same_weights(original, tmp_path / "back")
    manifest = json.loads((tmp_path / "back" / "qconvert.json").read_text())
    quantized = [t for t in manifest["tensors"] if t["action"] == "quantized"]
    assert quantized and all(t["origin"] == "repacked" for t in quantized)
    assert all(t["reason"].endswith("; read from its gptq int4 g32 asym source") for t in quantized)


def test_another_grid_is_requantized_with_a_warning(original, tmp_path):
    gptq = export(original, "gptq", tmp_path / "gptq").destination
    result = runner.invoke(app, ["model", str(gptq), "-o", str(tmp_path / "int8"), "--bits", "8", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "not an exact copy" in result.stderr
    records = qconvert.manifest.read_manifest(tmp_path / "int8").tensors
    assert {t.origin for t in records if t.action == "quantized"} == {"requantized"}
    # quantized again from the source's float values: 8 bits reproduce them closely
    theirs, ours = qconvert.load(tmp_path / "int8", torch.float32), qconvert.load(original, torch.float32)
    name = "model.layers.0.mlp.down_proj.weight"
    assert (theirs[name] - ours[name]).abs().max() < 0.01 * ours[name].abs().max()


def _write_awq(original, folder):
    """An AutoAWQ gemm checkpoint of the same codes, packed as AutoAWQ documents it."""
    import shutil

    from qconvert.manifest import read_manifest
    from qconvert.output import iter_records, quantized_tensor

    folder.mkdir()
    manifest = read_manifest(original)
    tensors = {}

    def pack(values):  # (rows, columns) -> (rows, columns / 8) int32
        rows, columns = values.shape
        words = torch.zeros(rows, columns // 8, dtype=torch.int64)
        for i, column in enumerate(AWQ_ORDER):
            words |= values[:, column::8].to(torch.int64) << (4 * i)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    for record, stored in iter_records(original, manifest):
        if record.action != "quantized":
            tensors[record.name] = stored[record.name]
            continue
        q = quantized_tensor(manifest, record, stored)
        module = record.name.removesuffix(".weight")
        tensors[f"{module}.qweight"] = pack(q.codes.t())
        tensors[f"{module}.qzeros"] = pack(q.zeros.t())
        tensors[f"{module}.scales"] = q.scales.t().contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((original / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "version": "gemm",
        "zero_point": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(original / name, folder / name)
    return folder


def test_awq_checkpoint_is_read_exactly(original, tmp_path):
    awq = _write_awq(original, tmp_path / "awq")
    assert _model(awq, tmp_path / "back", "--bits", "4", "--group-size", "32")["warnings"] == []
    _assert_same_weights(original, tmp_path / "back")
    inspected = runner.invoke(app, ["inspect", str(awq), "--json"])
    assert inspected.exit_code == 0 and "model.layers.0.mlp.up_proj.weight" in inspected.stdout
    assert "qweight" not in inspected.stdout


def test_compressed_tensors_checkpoint_moves_to_native_exactly(original, tmp_path):
    _model(original, tmp_path / "native", "--bits", "4", "--group-size", "32", "--layout", "native")
    _assert_same_weights(original, tmp_path / "native")


def test_act_order_gptq_is_read_through_its_group_index(original, tmp_path):
    """A permuted g_idx (act-order) has no contiguous groups: its float values are read, then quantized."""
    gptq = export(original, "gptq", tmp_path / "gptq").destination
    tensors = load_file(gptq / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    columns = tensors[f"{name}.g_idx"].shape[0]
    order = torch.randperm(columns, generator=torch.Generator().manual_seed(0))
    tensors[f"{name}.g_idx"] = tensors[f"{name}.g_idx"][order].contiguous()
    save_file(tensors, gptq / "model.safetensors", metadata={"format": "pt"})
    from qconvert.io.sources import open_checkpoint

    checkpoint = open_checkpoint(gptq)
    weight = dict(checkpoint.iter_tensors([f"{name}.weight"]))[f"{name}.weight"].float()
    assert checkpoint.quantized(f"{name}.weight") is None
    codes = qconvert.load(original, torch.float32)[f"{name}.weight"]  # same codes, groups now follow g_idx
    assert weight.shape == codes.shape and not torch.equal(weight, codes)
    result = runner.invoke(app, ["model", str(gptq), "-o", str(tmp_path / "out"), "--bits", "4", "--group-size", "32"])
    assert result.exit_code == 0 and "1 weights were dequantized" in result.stderr, result.output


def test_unreadable_quantization_is_one_sentence(tmp_path, original):
    awq = _write_awq(original, tmp_path / "awq")
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (awq / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["model", str(awq), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "gemm layout" in result.stderr


def test_a_compressed_tensors_source_builds_its_model_once(original, tmp_path, monkeypatch):
    from qconvert.io import skeleton

    source = export(original, "compressed-tensors", tmp_path / "ct").destination
    built = []
    real = skeleton._meta_model
    monkeypatch.setattr(skeleton, "_meta_model", lambda *a: built.append(a) or real(*a))
    convert(source, tmp_path / "again", Settings(bits=4, group_size=32, layout="native"))
    assert len(built) == 1
