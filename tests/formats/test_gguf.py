"""GGUF export: read back with the gguf library and with transformers' GGUF loader."""

import json

import pytest
import torch
from typer.testing import CliRunner

import qconvert
from qconvert.cli import app
from qconvert.conversion import convert
from qconvert.settings import Settings

runner = CliRunner()
torch.set_grad_enabled(False)


@pytest.mark.parametrize(
    "grid, bits, symmetric, gguf_type, kind",
    [
        ("int", 4, True, "Q4_0", "exact"),
        ("int", 8, True, "Q8_0", "exact"),
        ("int", 4, False, "Q4_1", "repacked"),
        ("iq4nl", 4, True, "IQ4_NL", "exact"),
        ("mxfp4", 4, True, "MXFP4", "exact"),
    ],
)
def test_gguf_export_loads_in_transformers_with_qconvert_s_weights(
    tmp_path, tiny_lm, grid, bits, symmetric, gguf_type, kind
):
    import gguf
    from transformers import AutoModelForCausalLM

    settings = Settings(bits=bits, group_size=32, symmetric=symmetric, grid=grid, layout="native")
    out = convert(tiny_lm, tmp_path / "out", settings).output
    result = runner.invoke(app, ["export", str(out), "--to", "gguf", "--json"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "out.gguf"
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type and types["blk.1.ffn_down.weight"] == gguf_type
    assert types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "F16"

    report = json.loads(result.stdout)
    assert "model.layers.0.self_attn.q_proj.weight" in report[kind] and not report["requantized"]

    ids = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 378, 314, 260, 3465]])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf", dtype=torch.float32)(ids).logits
    ours = qconvert.load_model(out)(ids).logits
    # the embeddings travel as float16 (they were bfloat16), everything else is the same numbers
    assert (theirs - ours).abs().max() < 2e-2 * ours.abs().max()


def test_other_grids_are_requantized_and_reported(tmp_path, tiny_lm):
    out = convert(tiny_lm, tmp_path / "out", Settings(bits=3, group_size=64)).output
    result = runner.invoke(app, ["export", str(out), "--to", "gguf"])
    assert result.exit_code == 0, result.output
    assert "requantized: model.layers.0.self_attn.q_proj.weight" in result.stderr
    again = runner.invoke(app, ["export", str(out), "--to", "gguf"])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_gguf_export_refuses_an_encoder(tmp_path, real_models):
    out = convert(
        real_models / "all-minilm-l6-v2", tmp_path / "out", Settings(bits=8, group_size=0, symmetric=True)
    ).output
    result = runner.invoke(app, ["export", str(out), "--to", "gguf"])
    assert result.exit_code == 7 and "Llama-family" in result.stderr


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
