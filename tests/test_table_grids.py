"""`--grid`: float and table grids end to end: conversion with every quantizer, the native layout,
verify, inspect, qconvert's own model, exports (which re-round onto the grids they have) and refusals."""

import json

import pytest
import torch
from helpers import make_tiny_lm
from typer.testing import CliRunner

import qconvert
from qconvert.cli import app
from qconvert.evaluate.runtime import build_quantized_model
from qconvert.formats.export import export
from qconvert.manifest import read_manifest

runner = CliRunner()
TABLES = ["nf4", "iq4nl", "mxfp4", "nvfp4", "mxfp8", "fp8", "fp8-block"]


def model(*args):
    return runner.invoke(app, ["model", *map(str, args), "--json"])


@pytest.mark.parametrize("grid", TABLES)
def test_every_grid_converts_verifies_and_runs(tmp_path, tiny_lm, grid):
    result = model(tiny_lm, "-o", tmp_path / grid, "--grid", grid)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # compressed-tensors has formats for fp8, mxfp8, nvfp4 and mxfp4 (auto picks it); nf4 and iq4nl stay native,
    # and fp8-block too on this model: its 64-wide rows are half a block, which compressed-tensors cannot store
    assert summary["layout"] == ("native" if grid in ("nf4", "iq4nl", "fp8-block") else "compressed-tensors")
    records = [r for r in read_manifest(tmp_path / grid).tensors if r.action == "quantized"]
    assert {r.grid for r in records} == {grid} and {r.bits for r in records} == {8 if "fp8" in grid else 4}
    verified = runner.invoke(app, ["verify", str(tmp_path / grid)])
    assert verified.exit_code == 0, verified.output
    inspected = runner.invoke(app, ["inspect", str(tmp_path / grid), "--json"])
    assert f"rtn {grid} " in inspected.stdout
    # qconvert's runtime (packed layers) computes what the dequantized weights compute
    ids = torch.arange(1, 17).view(1, -1)
    with torch.no_grad():
        exact = qconvert.load_model(tmp_path / grid)(ids).logits
        packed = build_quantized_model(tmp_path / grid, use_kernels=True)(ids).logits
    assert torch.allclose(exact, packed, atol=1e-4 * float(exact.abs().max()))


@pytest.fixture(scope="module")
def tiny_lm_128(tmp_path_factory, real_models):
    """A tiny Llama whose rows are whole 128-wide blocks (fp8-block's)."""
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm-128"), real_models, hidden=128)


@pytest.mark.parametrize("grid", ["fp8", "mxfp8", "fp8-block", "nvfp4", "mxfp4"])
def test_transformers_loads_the_float_formats_with_qconvert_s_values(tmp_path, tiny_lm, tiny_lm_128, grid):
    from qconvert.compatibility import check

    out = tmp_path / grid
    source = tiny_lm_128 if grid == "fp8-block" else tiny_lm
    result = model(source, "-o", out, "--grid", grid, "--layout", "compressed-tensors")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    formats = {"fp8": "float-quantized", "fp8-block": "float-quantized", "mxfp8": "mxfp8-quantized"}
    formats["nvfp4"] = "nvfp4-pack-quantized"
    assert group["format"] == formats.get(grid, "mxfp4-pack-quantized")
    assert group["weights"]["type"] == "float"
    # transformers' own loading and forward, against qconvert's dequantized model of the same files
    assert check(out, "transformers", forward=True) == ("compressed-tensors", [])
    vllm = check(out, "vllm")[1]
    assert (vllm == []) is (grid != "mxfp8")  # vLLM runs mxfp8 only as W8A8


@pytest.mark.parametrize("quantizer", ["clip", "gptq", "awq"])
def test_calibrated_and_searching_quantizers_target_table_grids(tmp_path, tiny_lm, quantizer):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    calib = ["--calib", text, "--calib-samples", "4", "--calib-seqlen", "32"] if quantizer != "clip" else []
    result = model(tiny_lm, "-o", tmp_path / "out", "--grid", "nvfp4", "-q", quantizer, *calib)
    assert result.exit_code == 0, result.output
    records = [r for r in read_manifest(tmp_path / "out").tensors if r.action == "quantized"]
    assert records and {(r.grid, r.quantizer) for r in records} == {("nvfp4", quantizer)}


def test_exports_re_round_table_grids_onto_their_own(tmp_path, tiny_lm):
    out = tmp_path / "nf4"
    assert model(tiny_lm, "-o", out, "--grid", "nf4").exit_code == 0
    quantized = {r.name for r in read_manifest(out).tensors if r.action == "quantized"}
    for to in ("gguf", "mlx", "gptq"):
        report = export(out, to, tmp_path / f"x-{to}")
        assert set(report.exact) & quantized == set() and report.requantized, to
    refused = runner.invoke(app, ["export", str(out), "--to", "compressed-tensors", "-o", str(tmp_path / "ct")])
    assert refused.exit_code != 0 and "nf4" in refused.output


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--grid", "nf4", "--bits", "8"], "grid nf4 has 4-bit codes"),
        (["--grid", "mxfp4", "--group-size", "64"], "grid mxfp4 scales groups of 32"),
        (["--grid", "nvfp4", "--asymmetric"], "no zero point"),
        (["--grid", "fp4"], "unknown grid 'fp4'"),
        (["--grid", "nf4", "--target-bpw", "4.5"], "a size budget chooses among integer widths"),
        (["--grid", "nf4", "--layout", "compressed-tensors"], "compressed-tensors has no format for the nf4 grid"),
    ],
)
def test_impossible_grid_flags_are_one_sentence(tmp_path, tiny_lm, flags, fragment):
    result = runner.invoke(app, ["model", str(tiny_lm), "-o", str(tmp_path / "x"), *flags])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("grid, bits, exports", [("mxfp4", 4, ("mlx", "gguf")), ("mxfp8", 8, ("mlx",))])
def test_mx_grids_move_exactly_into_mlx_and_gguf(tmp_path, tiny_lm, grid, bits, exports):
    from qconvert.compatibility import check

    out = tmp_path / grid
    assert model(tiny_lm, "-o", out, "--grid", grid, "--layout", "native").exit_code == 0
    quantized = {r.name for r in read_manifest(out).tensors if r.action == "quantized"}
    for to in exports:
        report = export(out, to, tmp_path / f"x-{to}")
        assert quantized <= set(report.exact) and not report.requantized, to
    mlx_config = json.loads((tmp_path / "x-mlx" / "config.json").read_text())["quantization"]
    assert mlx_config == {"group_size": 32, "bits": bits, "mode": grid}
    assert check(tmp_path / "x-mlx", "mlx", forward=True) == ("mlx", [])  # mlx_lm runs it with qconvert's values


def test_an_integer_source_is_requantized_onto_a_table_grid_of_the_same_bits(tmp_path, tiny_lm):
    # int4 g32 symmetric and iq4nl share bits, group and symmetry: the codes must still not be repacked
    source = tmp_path / "int4"
    assert model(tiny_lm, "-o", source, "--bits", "4", "--group-size", "32", "--symmetric").exit_code == 0
    result = model(source, "-o", tmp_path / "iq4nl", "--grid", "iq4nl")
    assert result.exit_code == 0, result.output
    records = [r for r in read_manifest(tmp_path / "iq4nl").tensors if r.action == "quantized"]
    assert {(r.grid, r.origin) for r in records} == {("iq4nl", "requantized")}
    ours, theirs = qconvert.load(source, torch.float32), qconvert.load(tmp_path / "iq4nl", torch.float32)
    name = records[0].name
    assert (ours[name] - theirs[name]).abs().max() < 0.2 * ours[name].abs().max()


@pytest.mark.parametrize("grid", ["fp8", "mxfp8", "fp8-block", "nvfp4", "mxfp4"])
def test_compressed_tensors_float_checkpoints_are_read_and_repacked_exactly(tmp_path, tiny_lm, tiny_lm_128, grid):
    source = tmp_path / "ct"
    checkpoint = tiny_lm_128 if grid == "fp8-block" else tiny_lm
    assert model(checkpoint, "-o", source, "--grid", grid, "--layout", "compressed-tensors").exit_code == 0
    result = model(source, "-o", tmp_path / "native", "--grid", grid, "--layout", "native")
    assert result.exit_code == 0, result.output
    records = [r for r in read_manifest(tmp_path / "native").tensors if r.action == "quantized"]
    assert records and {r.origin for r in records} == {"repacked"}
    assert all(
        r.reason.endswith(f"read from its compressed-tensors {grid} g{r.group_size} source")
        or r.reason.endswith(f"read from its compressed-tensors {grid} per channel source")
        for r in records
    )
    ours, theirs = qconvert.load(source, torch.float32), qconvert.load(tmp_path / "native", torch.float32)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.mark.parametrize("grid, block", [("mxfp4", 32), ("nvfp4", 16)])
def test_a_row_exactly_one_block_wide_reads_back(tmp_path, grid, block):
    from safetensors.torch import save_file

    from qconvert.conversion import convert
    from qconvert.settings import Settings
    from qconvert.verification import verify_output

    (tmp_path / "src").mkdir()
    weight = torch.randn(8, block, generator=torch.Generator().manual_seed(0))
    save_file({"blocks.0.proj.weight": weight}, tmp_path / "src" / "model.safetensors")
    settings = Settings(grid=grid, bits=4, symmetric=True, group_size=block, layout="native")
    out = convert(tmp_path / "src", tmp_path / grid, settings).output
    assert verify_output(out) == ([], 1)
    assert qconvert.load(out)["blocks.0.proj.weight"].shape == (8, block)


def test_a_model_mixing_grids_is_written_native(tmp_path, tiny_lm):
    recipe = tmp_path / "mixed.toml"
    recipe.write_text(
        '[defaults]\nbits = 4\ngroup_size = 32\nsymmetric = true\n\n[[rules]]\nmatch = "mlp"\ngrid = "mxfp4"\n'
    )
    result = model(tiny_lm, "-o", tmp_path / "auto", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layout"] == "native"
    records = [r for r in read_manifest(tmp_path / "auto").tensors if r.action == "quantized"]
    assert {r.grid for r in records} == {"int", "mxfp4"}
    refused = model(tiny_lm, "-o", tmp_path / "ct", "--recipe", recipe, "--layout", "compressed-tensors")
    assert refused.exit_code == 2 and "mixing grids (int, mxfp4)" in refused.output


def test_w8a8_exports_only_to_compressed_tensors(tmp_path, tiny_lm):
    out = tmp_path / "w8a8"
    flags = ["--bits", "8", "--group-size", "0", "--symmetric", "--activations", "int8-dynamic", "--layout", "native"]
    assert model(tiny_lm, "-o", out, *flags).exit_code == 0
    refused = runner.invoke(app, ["export", str(out), "--to", "gguf"])
    assert refused.exit_code == 7 and "W8A8" in refused.output and not (tmp_path / "w8a8.gguf").exists()
    report = export(out, "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert report.exact and config["config_groups"]["group_0"]["format"] == "int-quantized"
    assert "W8A8" in runner.invoke(app, ["inspect", str(out)]).output


def test_batch_jobs_take_grids(tmp_path, tiny_lm):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[[jobs]]\nsource = "{tiny_lm}"\noutput = "nf4"\nsettings = {{ grid = "nf4" }}\n')
    result = runner.invoke(app, ["batch", str(jobs), "--json"])
    assert result.exit_code == 0, result.output
    assert {r.grid for r in read_manifest(tmp_path / "nf4").tensors if r.action == "quantized"} == {"nf4"}


def test_check_does_not_suggest_an_export_that_cannot_hold_the_grid(tmp_path, tiny_lm):
    from qconvert.compatibility import check

    assert model(tiny_lm, "-o", tmp_path / "nf4", "--grid", "nf4").exit_code == 0
    _, problems = check(tmp_path / "nf4", "transformers")
    assert len(problems) == 1 and "no export helps" in problems[0].message and "nf4" in problems[0].message


def test_vllm_check_refuses_fp8_in_groups(tmp_path, tiny_lm):
    from qconvert.compatibility import check

    out = tmp_path / "fp8-g32"
    assert model(tiny_lm, "-o", out, "--grid", "fp8", "--group-size", "32").exit_code == 0
    assert check(out, "transformers")[1] == []
    assert any("not groups of 32" in p.message for p in check(out, "vllm")[1])
