import json
import math

import pytest
import torch
from typer.testing import CliRunner

import qconvert
from qconvert import Settings, convert
from qconvert.cli import app
from qconvert.evaluate.evaluation import EvalSettings, evaluate, score, token_windows
from qconvert.evaluate.qlinear import QuantizedLinear
from qconvert.evaluate.runtime import build_quantized_model

torch.set_grad_enabled(False)
TEXT = "Quantization maps floating point weights to a few bits. " * 60


def small_settings(**kwargs):
    return EvalSettings(ctx=64, max_tokens=256, prompt_tokens=16, decode_tokens=4, **kwargs)


def test_perplexity_agrees_with_transformers_own_loss(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    windows = token_windows(AutoTokenizer.from_pretrained(tiny_lm), TEXT, small_settings())
    losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert score(model, windows)["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


@pytest.mark.parametrize("settings", [Settings(bits=3, group_size=32), Settings(bits=4, group_size=0)])
def test_quantized_model_scores_like_its_dequantized_copy(tiny_lm, tmp_path, settings):
    out = convert(tiny_lm, tmp_path / "out", settings).output
    result = evaluate(out, TEXT, small_settings(use_kernels=False))
    windows = token_windows(qconvert.evaluate.evaluation.load_tokenizer((out, None)), TEXT, small_settings())
    assert result.perplexity == pytest.approx(score(qconvert.load_model(out), windows)["perplexity"], rel=1e-5)
    assert result.kind == "qconvert" and result.bits_per_weight < 16


def test_kernel_paths_stay_close_and_memory_shrinks_with_bits(tiny_lm, tmp_path):
    float_result = evaluate(tiny_lm, TEXT, small_settings())
    results = {}
    for bits in (8, 4):
        out = convert(
            tiny_lm,
            tmp_path / f"int{bits}",
            Settings(bits=bits, group_size=0 if bits == 8 else 32, symmetric=bits == 8),
        ).output
        kinds = {m.kernel for m in build_quantized_model(out).modules() if isinstance(m, QuantizedLinear)}
        assert kinds == {f"int{bits}"}
        results[bits] = evaluate(out, TEXT, small_settings(), baseline=tiny_lm)
        exact = evaluate(out, TEXT, small_settings(use_kernels=False))
        assert results[bits].perplexity == pytest.approx(exact.perplexity, rel=1e-2)
    assert results[4].weight_memory_bytes < results[8].weight_memory_bytes < float_result.weight_memory_bytes
    assert 0 <= results[8].baseline["mean_kld"] < results[4].baseline["mean_kld"]
    assert results[8].baseline["top1_agreement"] > 0.9


def test_cli_eval_json_and_quality_gate(tiny_lm, tmp_path):
    runner = CliRunner()
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    assert (
        runner.invoke(app, ["model", str(tiny_lm), "-o", str(out), "--bits", "2", "--group-size", "32"]).exit_code == 0
    )
    common = [
        "--text",
        str(text),
        "--ctx",
        "64",
        "--max-tokens",
        "128",
        "--decode-tokens",
        "2",
        "--baseline",
        str(tiny_lm),
    ]
    ok = runner.invoke(app, ["eval", str(out), *common, "--json"])
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout)
    assert result["baseline"]["mean_kld"] > 0 and result["windows"] == 2
    gated = runner.invoke(app, ["eval", str(out), *common, "--max-kld", "0.000001"])
    assert gated.exit_code == 4 and "quality gate failed" in gated.output


def test_eval_refuses_an_encoder_clearly(real_models, tmp_path):
    out = convert(real_models / "all-minilm-l6-v2", tmp_path / "out", Settings(bits=8, group_size=0)).output
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    result = CliRunner().invoke(app, ["eval", str(out), "--text", str(text)])
    assert result.exit_code == 7 and "not a causal language model" in result.output


@pytest.mark.parametrize("tied", [True, False])
def test_a_decoded_token_reads_one_embedding_row_unless_the_head_shares_the_table(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qconvert.evaluate.evaluation import bytes_read_per_token, weight_memory

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    table, row = 1000 * 32 * 4, 32 * 4
    assert bytes_read_per_token(model) == weight_memory(model) - (0 if tied else table - row)
