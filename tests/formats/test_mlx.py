"""MLX export, read back by MLX's CPU build and mlx_lm, against qconvert's own reading."""

import json

import pytest
import torch
from typer.testing import CliRunner

import qconvert
from qconvert.cli import app
from qconvert.conversion import convert
from qconvert.formats.export import export
from qconvert.settings import Settings

runner = CliRunner()
torch.set_grad_enabled(False)
IDS = [1, 504, 3458, 282, 253, 1345, 30, 378, 314, 260, 3465, 2114, 288, 822, 260, 6130, 30]


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (3, 64, False), (8, 64, False), (2, 32, True)])
def test_mlx_dequantizes_every_tensor_as_qconvert_does(tmp_path, tiny_lm, bits, group, symmetric):
    import mlx.core as mx  # a test dependency (qconvert[mlx]): never skipped

    out = convert(tiny_lm, tmp_path / "out", Settings(bits=bits, group_size=group, symmetric=symmetric)).output
    report = export(out, "mlx")
    stored = mx.load(str(report.destination / "model.safetensors"))
    quantization = json.loads((report.destination / "config.json").read_text())["quantization"]
    assert quantization["bits"] == bits and quantization["group_size"] == group
    ours = qconvert.load(out, torch.float32)
    for name in report.exact + report.repacked:
        module = name.removesuffix(".weight")
        if f"{module}.scales" not in stored:
            continue
        theirs = mx.dequantize(
            stored[name], stored[f"{module}.scales"], stored[f"{module}.biases"], group_size=group, bits=bits
        ).astype(mx.float32)
        expected = ours[name]
        # MLX computes scale·code + bias in the scales' float16; asymmetric biases are rounded to it too
        tolerance = (1e-3 if symmetric else 2e-3) * expected.abs().max()
        assert (torch.tensor(theirs.tolist()) - expected).abs().max() <= tolerance, name
    assert bool(report.repacked) == (not symmetric) and not report.requantized


def test_mlx_requantizes_grids_it_lacks_and_says_so(tmp_path, tiny_lm):
    out = convert(tiny_lm, tmp_path / "out", Settings(bits=4, group_size=16)).output  # MLX has no groups of 16
    result = runner.invoke(app, ["export", str(out), "--to", "mlx", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "model.layers.0.mlp.down_proj.weight" in report["requantized"] and report["destination"].endswith("out-mlx")


def test_mlx_lm_runs_the_export_of_smollm2_like_qconvert(tmp_path, real_models):
    """The real client: mlx_lm.load builds the model from the exported folder, and its logits match
    qconvert's dequantized model (MLX computes in the checkpoint's bfloat16)."""
    import mlx.core as mx
    from mlx_lm import load

    out = tmp_path / "smollm2-int4"
    result = runner.invoke(
        app,
        [
            "model",
            str(real_models / "smollm2-135m"),
            "-o",
            str(out),
            "--bits",
            "4",
            "--group-size",
            "64",
            "--format",
            "mlx",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["export"]["format"] == "mlx"
    assert not list(tmp_path.glob(".*")), "the scratch qconvert output is removed"
    model, tokenizer = load(str(out))
    theirs = torch.tensor(model(mx.array([IDS])).astype(mx.float32).tolist())[0]
    reference = convert(real_models / "smollm2-135m", tmp_path / "ref", Settings(bits=4, group_size=64)).output
    ours = qconvert.load_model(reference)(torch.tensor([IDS])).logits[0]
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()
