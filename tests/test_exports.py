"""MLX, GPTQ and compressed-tensors exports, each read back by the real client where it runs here
(MLX's CPU build and mlx_lm; transformers for compressed-tensors), and GPTQ against an unpacking
written from AutoGPTQ's documented format (its loaders need CUDA builds)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import qconvert
from qconvert.cli import app
from qconvert.conversion import convert
from qconvert.formats.export import export
from qconvert.quantizers.base import QuantizedTensor
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


def _reference_gptq_weight(qweight, qzeros, scales, g_idx, bits):
    """AutoGPTQ v1, as its README and kernels describe it: codes packed down the input dimension,
    zeros along the output dimension, each stored as zero − 1."""
    per_word, mask = 32 // bits, 2**bits - 1
    codes = torch.stack([(qweight >> (bits * k)) & mask for k in range(per_word)], dim=1).reshape(-1, qweight.shape[1])
    zeros = (
        torch.stack([(qzeros >> (bits * k)) & mask for k in range(per_word)], dim=2).reshape(qzeros.shape[0], -1) + 1
    )
    g = g_idx.long()
    return (scales[g].float() * (codes - zeros[g]).float()).t()


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, 64, False), (8, 32, False), (2, 32, True)])
def test_gptq_export_unpacks_to_qconvert_s_weights(tmp_path, tiny_lm, bits, group, symmetric):
    out = convert(tiny_lm, tmp_path / "out", Settings(bits=bits, group_size=group, symmetric=symmetric)).output
    report = export(out, "gptq")
    tensors = load_file(report.destination / "model.safetensors")
    config = json.loads((report.destination / "config.json").read_text())["quantization_config"]
    assert (
        config | {"bits": bits, "group_size": group, "sym": symmetric, "quant_method": "gptq", "desc_act": False}
        == config
    )
    assert json.loads((report.destination / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    ours = qconvert.load(out, torch.float32)
    linears = [n for n in ours if n.endswith("proj.weight")]
    for name in linears:
        module = name.removesuffix(".weight")
        assert tensors[f"{module}.qweight"].dtype == torch.int32 and tensors[f"{module}.scales"].dtype == torch.float16
        weight = _reference_gptq_weight(
            *(tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), bits
        )
        assert torch.equal(weight, ours[name]), name
    assert set(linears) <= set(report.exact)
    assert (report.destination / "tokenizer.json").is_file()


def test_gptq_v1_moves_a_zero_of_zero_up_one_code():
    from qconvert.formats.gptq import _v1_codes_and_zeros

    codes = torch.tensor([[0, 3, 14, 2], [15, 0, 1, 1]], dtype=torch.uint8)
    q = QuantizedTensor(
        codes=codes,
        scales=torch.ones(2, 2, dtype=torch.float16),
        zeros=torch.tensor([[0, 2], [0, 5]], dtype=torch.uint8),
        bits=4,
        group_size=2,
        shape=(2, 4),
        dtype=torch.float32,
    )
    moved, zeros, clipped = _v1_codes_and_zeros(q)
    assert zeros.tolist() == [[1, 2], [1, 5]] and (zeros >= 1).all()
    assert moved.tolist() == [[1, 4, 14, 2], [15, 1, 1, 1]]
    assert clipped  # row 1's 15 could not move up to 16
    assert torch.equal(
        (moved - zeros.repeat_interleave(2, 1))[0], (codes.int() - q.zeros.int().repeat_interleave(2, 1))[0]
    )


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


def test_model_format_gguf_writes_only_the_gguf_and_never_overwrites(tmp_path, tiny_lm):
    target = tmp_path / "tiny.gguf"
    arguments = [
        "model",
        str(tiny_lm),
        "-o",
        str(target),
        "--bits",
        "4",
        "--group-size",
        "32",
        "--symmetric",
        "--format",
        "gguf",
    ]
    assert runner.invoke(app, arguments).exit_code == 0
    assert target.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
    again = runner.invoke(app, arguments)
    assert again.exit_code == 2 and "already exists" in again.stderr
