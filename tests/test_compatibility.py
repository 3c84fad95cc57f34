"""qconvert check --runtime: what each runtime needs, read from headers, with the tensor at fault."""

import json

import pytest
from typer.testing import CliRunner

from qconvert.cli import app
from qconvert.conversion import convert
from qconvert.formats.export import export
from qconvert.settings import Settings

runner = CliRunner()


def _check(path, runtime):
    result = runner.invoke(app, ["check", str(path), "--runtime", runtime, "--json"])
    assert result.stdout, result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def int4_output(tmp_path_factory, tiny_lm):
    return convert(
        tiny_lm, tmp_path_factory.mktemp("check") / "int4", Settings(bits=4, group_size=32, symmetric=True)
    ).output


@pytest.mark.parametrize(
    "target, runtime",
    [
        (None, "transformers"),
        (None, "vllm"),
        ("mlx", "mlx"),
        ("gptq", "vllm"),
        ("gguf", "llama.cpp"),
        ("gguf", "transformers"),
    ],
)
def test_every_export_passes_the_check_of_the_runtime_it_is_for(int4_output, tmp_path, target, runtime):
    path = export(int4_output, target, tmp_path / f"out.{target}").destination if target else int4_output
    code, report = _check(path, runtime)
    assert code == 0 and report["ok"] and report["problems"] == [], report


def test_gptq_in_transformers_needs_its_backend_and_check_says_so(int4_output, tmp_path):
    # transformers loads GPTQ through optimum/gptqmodel, whose PyPI builds need CUDA: not installed here, so
    # transformers cannot load it on this machine, and check must not claim otherwise.
    import importlib.util

    path = export(int4_output, "gptq", tmp_path / "out.gptq").destination
    code, report = _check(path, "transformers")
    if importlib.util.find_spec("optimum") is None and importlib.util.find_spec("gptqmodel") is None:
        assert code == 3 and "not installed" in report["problems"][0]["message"], report
    else:
        assert code == 0, report


def test_a_format_the_runtime_does_not_read_is_one_problem_with_the_way_out(int4_output, tiny_lm):
    code, report = _check(int4_output, "llama.cpp")
    assert code == 3 and "--to gguf" in report["problems"][0]["message"]
    assert _check(tiny_lm, "mlx")[0] == 0  # mlx_lm reads float checkpoints


def test_native_layout_is_refused_for_transformers(tmp_path, tiny_lm):
    out = convert(tiny_lm, tmp_path / "native", Settings(bits=3, group_size=32, layout="native")).output
    code, report = _check(out, "transformers")
    assert code == 3 and report["format"] == "qconvert-native"


def test_vllm_needs_one_scheme_for_the_projections_it_fuses(tmp_path, tiny_lm):
    recipe = tmp_path / "v8.toml"
    recipe.write_text(
        '[defaults]\nbits = 4\ngroup_size = 32\nsymmetric = true\n\n[[rules]]\nmatch = "v_proj"\nbits = 8\n'
    )
    out = tmp_path / "mixed"
    assert (
        runner.invoke(
            app, ["model", str(tiny_lm), "-o", str(out), "--recipe", str(recipe), "--layout", "compressed-tensors"]
        ).exit_code
        == 0
    )
    code, report = _check(out, "vllm")
    assert code == 3
    fused = [p for p in report["problems"] if "fuses" in p["message"]]
    assert {p["tensor"] for p in fused} == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert "v_proj int8" in fused[0]["message"]
    assert _check(out, "transformers")[0] == 0  # transformers keeps them separate


def test_mlx_config_without_rope_theta_is_caught(int4_output, tmp_path):
    folder = export(int4_output, "mlx", tmp_path / "mlx").destination
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_theta")
    (folder / "config.json").write_text(json.dumps(config))
    code, report = _check(folder, "mlx")
    assert code == 3 and "rope_theta" in report["problems"][0]["message"]


def test_a_damaged_gptq_tensor_is_named(int4_output, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = export(int4_output, "gptq", tmp_path / "gptq").destination
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.qweight"] = tensors["model.layers.1.mlp.up_proj.qweight"][:-1].clone()
    tensors["model.layers.0.mlp.down_proj.scales"] = tensors["model.layers.0.mlp.down_proj.scales"].to(torch.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    code, report = _check(folder, "transformers")
    assert code == 3
    assert {p["tensor"] for p in report["problems"]} == {
        "model.layers.1.mlp.up_proj.qweight",
        "model.layers.0.mlp.down_proj.scales",
    }
