import json

import pytest
import torch
from helpers import tiny_tensors, write_checkpoint
from safetensors.torch import save_file
from typer.testing import CliRunner

from qconvert.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_model_json_summary(tiny_checkpoint, tmp_path):
    result = run(
        "model", tiny_checkpoint, "--bits", 8, "--group-size", 0, "--symmetric", "-o", tmp_path / "out", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layout"] == "compressed-tensors" and summary["output"] == str(tmp_path / "out")
    assert summary["quantized_bits_per_weight"] > 8


def test_inspect_and_verify(tiny_checkpoint, tmp_path):
    assert run("model", tiny_checkpoint, "-o", tmp_path / "out").exit_code == 0
    table = run("inspect", tmp_path / "out")
    assert table.exit_code == 0 and "rtn int4 g64 asym" in table.output and "kept BF16" in table.output
    rows = json.loads(run("inspect", tmp_path / "out", "--json").stdout)
    assert len(rows["tensors"]) == len(tiny_tensors())
    assert "source BF16" in run("inspect", tiny_checkpoint).output  # plain checkpoints too
    folded = json.loads(run("inspect", tmp_path / "out", "--fold", "--json").stdout)["tensors"]
    down = next(r for r in folded if r["name"] == "model.layers.*.mlp.down_proj.weight")
    assert down["count"] == 2 and down["bytes"] == 2 * next(
        r["bytes"] for r in rows["tensors"] if r["name"].endswith("0.mlp.down_proj.weight")
    )
    verified = run("verify", tmp_path / "out", "--json")
    assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"]


def test_verify_failure_has_its_own_exit_code(tiny_checkpoint, tmp_path):
    run("model", tiny_checkpoint, "-o", tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    result = run("verify", tmp_path / "out")
    assert result.exit_code == 3 and "sha256" in result.output


def test_missing_path(tmp_path):
    assert_user_error(run("model", tmp_path / "nope"), "does not exist")


def test_no_weights(tmp_path):
    assert_user_error(run("model", tmp_path), "no weights found")


def test_unsupported_dtype(tmp_path):
    source = write_checkpoint(tmp_path / "src", {"layers.0.w.weight": torch.randn(8, 8, dtype=torch.float64)})
    assert_user_error(run("model", source), "float32, float16 and bfloat16")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", 7], "--bits 7 is not supported"),
        (["--group-size", -3], "--group-size -3 is negative"),
        (["--include", "("], "not a valid regular expression"),
        (["-q", "nope"], "unknown quantizer 'nope'"),
        (["--max-shard-size", "lots"], "is not a size"),
    ],
)
def test_bad_settings(tiny_checkpoint, args, message):
    assert_user_error(run("model", tiny_checkpoint, *args), message)


def test_bad_choice_is_a_usage_error(tiny_checkpoint):
    assert run("model", tiny_checkpoint, "--layout", "gguf").exit_code == 2


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    assert_user_error(run("model", tiny_checkpoint, "-o", tmp_path / "out"), "truncated")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    assert_user_error(run("model", tiny_checkpoint, "-o", out), "already exists; pass --force")
    assert (out / "keep").read_text() == "mine"
    assert run("model", tiny_checkpoint, "-o", out, "--force").exit_code == 0
    assert not (out / "keep").exists() and (out / "qconvert.json").exists()


def test_not_an_output(tiny_checkpoint):
    assert_user_error(run("verify", tiny_checkpoint), "is not a qconvert output")


def test_internal_errors_exit_1_with_traceback(tiny_checkpoint, monkeypatch):
    import qconvert.conversion

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(qconvert.conversion, "convert", bug)
    result = run("model", tiny_checkpoint)
    assert result.exit_code == 1
    assert (
        "Traceback" in result.output and "RuntimeError: a bug" in result.output and "please report it" in result.output
    )


def test_single_file_source(tmp_path):
    save_file(tiny_tensors(), tmp_path / "weights.safetensors")
    result = run("model", tmp_path / "weights.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "weights-int4-g64" / "model.safetensors").exists()
