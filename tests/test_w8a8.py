"""W8A8: 8-bit weights per channel with each linear's input quantized too (int8 per token, int8 with a
static scale from calibration, FP8 per token). transformers (compressed-tensors), qconvert's reference
model and its packed runtime compute it alike."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import qconvert
from qconvert.cli import app
from qconvert.compatibility import check
from qconvert.evaluate.runtime import build_quantized_model
from qconvert.formats.export import export
from qconvert.manifest import read_manifest
from qconvert.quantizers.activations import fake_quantize, quantize_input, static_scale

runner = CliRunner()
SCHEMES = ["int8-dynamic", "int8-static", "fp8-dynamic"]


def convert(source, out, *flags, calib=None):
    calibration = ["--calib", str(calib), "--calib-samples", "4", "--calib-seqlen", "32"] if calib else []
    result = runner.invoke(app, ["model", str(source), "-o", str(out), *flags, *calibration, "--json"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def calib(tmp_path_factory, eval_text):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(eval_text[:20000])
    return path


def test_int8_per_token_follows_compressed_tensors():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [255.0, -255.0, 1.0]])
    codes, scales = quantize_input(x, "int8-dynamic")
    assert scales[0, 0] == pytest.approx(2.0 / 127.5) and scales[1, 0] == 1.0  # an all-zero token stays 0
    assert codes[2].tolist() == [127, -128, 0] and codes.dtype == torch.int8
    assert torch.allclose(fake_quantize(x, "int8-dynamic"), codes.float() * scales)


def test_static_int8_clamps_beyond_its_calibrated_range():
    scale = static_scale(2.0, "int8-static")
    assert scale.item() == pytest.approx(2.0 / 127.5)
    codes, _ = quantize_input(torch.tensor([[1.0, -1.0, 50.0, -50.0]]), "int8-static", scale)
    assert codes.tolist() == [[64, -64, 127, -128]]


def test_fp8_per_token_rounds_as_torch_float8():
    x = torch.randn(5, 64) * 10
    codes, scales = quantize_input(x, "fp8-dynamic")
    assert codes.dtype == torch.float8_e4m3fn and torch.allclose(scales, x.abs().amax(-1, keepdim=True) / 448)
    assert codes.float().abs().amax(-1).eq(448).all()  # each token's largest value lands on E4M3's largest
    torch.testing.assert_close(fake_quantize(x, "fp8-dynamic"), (x / scales).to(torch.float8_e4m3fn).float() * scales)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", ["compressed-tensors", "native"])
def test_transformers_and_qconvert_compute_the_same_w8a8_model(tmp_path, tiny_lm, calib, layout, scheme):
    static = scheme == "int8-static"
    out = convert(
        tiny_lm, tmp_path / layout, "--activations", scheme, "--layout", layout, calib=calib if static else None
    )
    records = [r for r in read_manifest(out).tensors if r.action == "quantized"]
    assert records and {r.activations for r in records} == {scheme}
    assert {r.bits for r in records} == {8} and {r.grid for r in records} == {"fp8" if "fp8" in scheme else "int"}
    assert all((r.input_scale is not None) == static for r in records)
    ids = torch.arange(1, 17).view(1, -1)
    with torch.no_grad():
        reference = qconvert.load_model(out)(ids).logits  # input quantization as forward pre-hooks
        packed = build_quantized_model(out)(ids).logits  # int8 x int8 -> int32 with torch._int_mm
    assert (packed - reference).abs().max() < 5e-3 * reference.abs().max()
    if layout == "compressed-tensors":
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        inputs = config["config_groups"]["group_0"]["input_activations"]
        assert inputs["strategy"] == ("tensor" if static else "token") and inputs["dynamic"] is not static
        assert inputs["type"] == ("float" if "fp8" in scheme else "int")
        assert check(out, "transformers", forward=True) == ("compressed-tensors", [])
        assert check(out, "vllm")[1] == []


def test_smoothed_static_output_exports_to_compressed_tensors_that_transformers_runs(tmp_path, tiny_lm, calib):
    flags = ["--activations", "int8-static", "--smooth", "auto", "--layout", "native"]
    out = convert(tiny_lm, tmp_path / "native", *flags, calib=calib)
    records = read_manifest(out).tensors
    rescaled = {r.name for r in records if r.origin == "rescaled"}
    assert {n.rsplit(".", 2)[-2] for n in rescaled} == {"input_layernorm", "post_attention_layernorm"}
    report = export(out, "compressed-tensors", tmp_path / "ct")
    assert not report.requantized
    assert check(tmp_path / "ct", "transformers", forward=True) == ("compressed-tensors", [])
    ids = torch.arange(1, 17).view(1, -1)
    with torch.no_grad():
        ours, theirs = qconvert.load_model(out)(ids).logits, qconvert.load_model(tmp_path / "ct")(ids).logits
    assert torch.equal(ours, theirs)


def test_check_finds_a_missing_static_input_scale(tmp_path, tiny_lm, calib):
    out = convert(tiny_lm, tmp_path / "static", "--activations", "int8-static", calib=calib)
    tensors = load_file(out / "model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if not k.endswith("layers.0.self_attn.q_proj.input_scale")},
        out / "model.safetensors",
    )
    _, problems = check(out, "transformers")
    assert any("q_proj.input_scale is missing" in p.message for p in problems)


def test_quantized_inputs_change_the_output(tmp_path, tiny_lm):
    w8a8 = convert(tiny_lm, tmp_path / "w8a8", "--activations", "int8-dynamic")
    w8 = convert(tiny_lm, tmp_path / "w8", "--bits", "8", "--group-size", "0", "--symmetric")
    ids = torch.arange(1, 17).view(1, -1)
    with torch.no_grad():
        a, b = qconvert.load_model(w8a8)(ids).logits, qconvert.load_model(w8)(ids).logits
    assert 0 < (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--bits", "4", "--activations", "int8-dynamic"], "int8 weights with one scale per output channel"),
        (["--grid", "nf4", "--activations", "int8-dynamic"], "int8 weights"),
        (["--grid", "int", "--activations", "fp8-dynamic"], "fp8 weights"),
        (["--activations", "int4"], "not supported"),
        (["--activations", "int8-static"], "--activations int8-static needs the model's activations"),
        (["--smooth", "0.5"], "add --activations"),
        (["--activations", "int8-dynamic", "--smooth", "1.5"], "not a strength"),
        (["--activations", "int8-dynamic", "--smooth", "high"], "not a strength"),
        (["--activations", "int8-dynamic", "--smooth", "0.5"], "--smooth needs the model's activations"),
        (["--activations", "int8-dynamic", "--smooth", "0.5", "-q", "awq"], "awq already scales"),
        (["--activations", "int8-dynamic", "--format", "gguf"], "--format gguf cannot say"),
        (["--activations", "int8-dynamic", "--target-bpw", "4"], "a size budget chooses each tensor's bits"),
    ],
)
def test_w8a8_refusals_are_one_sentence(tmp_path, tiny_lm, flags, words):
    result = runner.invoke(app, ["model", str(tiny_lm), "-o", str(tmp_path / "x"), *flags])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert words in result.output.replace("\n", " ")
    assert not (tmp_path / "x").exists()


def test_a_failed_conversion_leaves_no_folder_it_made(tmp_path, tiny_lm):
    out = tmp_path / "made" / "for" / "out"
    result = runner.invoke(app, ["model", str(tiny_lm), "-o", str(out), "--activations", "int8-static"])
    assert result.exit_code == 2 and "--calib FILE" in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_shipped_w8a8_recipe_smooths_and_quantizes_inputs(tmp_path, tiny_lm, calib):
    from helpers import REPO

    out = convert(tiny_lm, tmp_path / "out", "--recipe", str(REPO / "configs" / "w8a8-smoothquant.toml"), calib=calib)
    manifest = read_manifest(out)
    assert manifest.settings["smooth"] == "auto" and manifest.settings["activations"] == "int8-dynamic"
    assert {r.activations for r in manifest.tensors if r.action == "quantized"} == {"int8-dynamic"}
    assert any(r.origin == "rescaled" for r in manifest.tensors)  # the norms took SmoothQuant's scales
