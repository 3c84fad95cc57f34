"""W8A8: int8 weights per channel with each linear's input quantized per token at run time. transformers
(compressed-tensors int-quantized), qconvert's reference model and its packed runtime compute it alike."""

import json

import pytest
import torch
from typer.testing import CliRunner

import qconvert
from qconvert.cli import app
from qconvert.compatibility import check
from qconvert.evaluate.runtime import build_quantized_model
from qconvert.manifest import read_manifest
from qconvert.quantizers.activations import fake_quantize, int8_per_token

runner = CliRunner()
W8A8 = ["--bits", "8", "--group-size", "0", "--symmetric", "--activations", "int8"]


def test_int8_per_token_follows_compressed_tensors():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [255.0, -255.0, 1.0]])
    codes, scales = int8_per_token(x)
    assert scales[0, 0] == pytest.approx(2.0 / 127.5) and scales[1, 0] == 1.0  # an all-zero token stays 0
    assert codes[2].tolist() == [127, -128, 0] and codes.dtype == torch.int8
    assert torch.allclose(fake_quantize(x, "int8"), codes.float() * scales)


@pytest.mark.parametrize("layout", ["compressed-tensors", "native"])
def test_transformers_and_qconvert_compute_the_same_w8a8_model(tmp_path, tiny_lm, layout):
    out = tmp_path / layout
    result = runner.invoke(app, ["model", str(tiny_lm), "-o", str(out), *W8A8, "--layout", layout, "--json"])
    assert result.exit_code == 0, result.output
    records = [r for r in read_manifest(out).tensors if r.action == "quantized"]
    assert records and {r.activations for r in records} == {"int8"}
    ids = torch.arange(1, 17).view(1, -1)
    with torch.no_grad():
        reference = qconvert.load_model(out)(ids).logits  # input quantization as forward pre-hooks
        packed = build_quantized_model(out)(ids).logits  # int8 x int8 -> int32 with torch._int_mm
    assert (packed - reference).abs().max() < 5e-3 * reference.abs().max()
    if layout == "compressed-tensors":
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        group = config["config_groups"]["group_0"]
        assert group["format"] == "int-quantized" and group["input_activations"]["strategy"] == "token"
        assert check(out, "transformers", forward=True) == ("compressed-tensors", [])
        assert check(out, "vllm")[1] == []


def test_quantized_inputs_change_the_output(tmp_path, tiny_lm):
    w8a8, w8 = tmp_path / "w8a8", tmp_path / "w8"
    assert runner.invoke(app, ["model", str(tiny_lm), "-o", str(w8a8), *W8A8]).exit_code == 0
    assert runner.invoke(app, ["model", str(tiny_lm), "-o", str(w8), *W8A8[:-2]]).exit_code == 0
    ids = torch.arange(1, 17).view(1, -1)
    with torch.no_grad():
        a, b = qconvert.load_model(w8a8)(ids).logits, qconvert.load_model(w8)(ids).logits
    assert 0 < (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize(
    "flags", [["--bits", "4", "--activations", "int8"], [*W8A8[:-1], "fp8"], ["--grid", "nf4", "--activations", "int8"]]
)
def test_w8a8_needs_int8_per_channel_weights(tmp_path, tiny_lm, flags):
    result = runner.invoke(app, ["model", str(tiny_lm), "-o", str(tmp_path / "x"), *flags])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x").exists()
