"""End to end on real checkpoints: SmolLM2-135M (Llama) and all-MiniLM-L6-v2 (BERT).

The outputs are loaded by transformers itself, with no qconvert code, and compared with qconvert's
own dequantized weights (tight) and with the float model (close).
"""

import math
from pathlib import Path

import pytest
import torch

import qconvert
from qconvert import Settings, convert
from qconvert.verification import verify_output

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def smollm2(real_models):
    return real_models / "smollm2-135m"


@pytest.fixture(scope="module")
def eval_windows(smollm2, eval_text):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2)(eval_text[:20000], return_tensors="pt").input_ids[0]
    return ids[: 2 * 512].view(2, 512)


@pytest.fixture(scope="module")
def float_logits(smollm2, eval_windows):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)(eval_windows).logits


def perplexity(logits, ids):
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(loss.item())


@pytest.mark.parametrize("symmetric, max_ppl_ratio", [(False, 1.45), (True, 1.8)])
def test_smollm2_int4_loads_in_transformers_and_matches(
    smollm2, tmp_path, eval_windows, float_logits, symmetric, max_ppl_ratio
):
    from transformers import AutoModelForCausalLM

    result = convert(smollm2, tmp_path / "out", Settings(bits=4, group_size=64, symmetric=symmetric))
    assert result.manifest.layout == "compressed-tensors"
    assert verify_output(result.output)[0] == []
    theirs = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32)(eval_windows).logits
    ours = qconvert.load_model(result.output)(eval_windows).logits
    # compressed-tensors dequantizes in the scales' float16, we in float32: only rounding apart
    assert (theirs - ours).abs().max() < 2e-3 * ours.abs().max()
    float_ppl, quant_ppl = perplexity(float_logits, eval_windows), perplexity(ours, eval_windows)
    assert float_ppl < quant_ppl < max_ppl_ratio * float_ppl
    agreement = (ours.argmax(-1) == float_logits.argmax(-1)).float().mean()
    assert agreement > 0.6


def test_smollm2_partial_groups_use_the_native_layout(smollm2, tmp_path, eval_windows, float_logits):
    result = convert(smollm2, tmp_path / "out", Settings(bits=4, group_size=128))
    assert result.manifest.layout == "native"
    down = next(t for t in result.manifest.tensors if t.name.endswith("layers.0.mlp.down_proj.weight"))
    assert down.stored[down.name + ".scales"].shape == [576, 12]  # 1536 / 128
    q = next(t for t in result.manifest.tensors if t.name.endswith("layers.0.self_attn.q_proj.weight"))
    assert q.stored[q.name + ".scales"].shape == [576, 5]  # 576 = 4 × 128 + a partial 64
    logits = qconvert.load_model(result.output)(eval_windows).logits
    assert perplexity(logits, eval_windows) < 1.5 * perplexity(float_logits, eval_windows)


def test_smollm2_8_bit_is_nearly_lossless(smollm2, tmp_path, eval_windows, float_logits):
    from transformers import AutoModelForCausalLM

    result = convert(smollm2, tmp_path / "out", Settings(bits=8, group_size=0, symmetric=True))
    logits = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32)(eval_windows).logits
    # Symmetric grids use all 256 codes (scale = absmax / 127.5), so a row's extreme weight is up to
    # half a step off: measured +1.2% on these windows (absmax / 127 gave +0.2%, but int4 g64 lost 8%).
    assert perplexity(logits, eval_windows) < 1.015 * perplexity(float_logits, eval_windows)
    assert (
        result.output.joinpath("tokenizer.json").is_file()
        and result.output.joinpath("generation_config.json").is_file()
    )


@pytest.mark.parametrize("bits, group_size, min_cosine", [(8, 0, 0.999), (4, 32, 0.95)])
def test_minilm_embeddings_survive(real_models, tmp_path, bits, group_size, min_cosine):
    from transformers import AutoModel, AutoTokenizer

    source = real_models / "all-minilm-l6-v2"
    result = convert(source, tmp_path / "out", Settings(bits=bits, group_size=group_size, symmetric=bits == 8))
    assert result.manifest.layout == "compressed-tensors"
    by_name = {t.name: t for t in result.manifest.tensors}
    assert by_name["encoder.layer.0.attention.self.query.weight"].action == "quantized"
    assert by_name["embeddings.position_ids"].action == "kept"
    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = tokenizer(
        ["The cat sits on the mat.", "Quantization maps floats to small integers."], return_tensors="pt", padding=True
    )

    def embed(model):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embed(AutoModel.from_pretrained(source))
    quantized = embed(AutoModel.from_pretrained(result.output))
    assert torch.nn.functional.cosine_similarity(reference, quantized).min() > min_cosine


def test_smollm2_mixed_recipe_quantizes_the_tied_embedding_once(smollm2, tmp_path, eval_windows, float_logits):
    from qconvert.plan.recipes import load_recipe
    from qconvert.settings import build_settings

    recipe = load_recipe(REPO / "configs" / "mixed-q4km.toml")
    result = convert(smollm2, tmp_path / "out", build_settings(recipe, {}, {}))
    by_name = {t.name: t for t in result.manifest.tensors}
    embedding = by_name["model.embed_tokens.weight"]
    assert (embedding.action, embedding.bits) == (
        "quantized",
        8,
    ) and "lm_head.weight" not in by_name  # tied: one tensor
    assert (
        by_name["model.layers.3.self_attn.v_proj.weight"].bits == 6
        and by_name["model.layers.3.mlp.down_proj.weight"].bits == 5
    )
    # transformers cannot load quantized embeddings from compressed-tensors, so the output is native
    assert result.manifest.layout == "native" and verify_output(result.output)[0] == []
    model = qconvert.load_model(result.output)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = model(eval_windows).logits
    assert perplexity(logits, eval_windows) < 1.2 * perplexity(float_logits, eval_windows)


def test_smollm2_symmetric_mixed_bits_load_in_transformers(smollm2, tmp_path, eval_windows):
    from transformers import AutoModelForCausalLM

    settings = Settings(
        bits=4, group_size=64, symmetric=True, rules=load_rules(tmp_path, "[[rules]]\nmatch = 'v_proj'\nbits = 8\n")
    )
    result = convert(smollm2, tmp_path / "out", settings)
    assert result.manifest.layout == "compressed-tensors"
    theirs = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32)(eval_windows).logits
    ours = qconvert.load_model(result.output)(eval_windows).logits
    assert (theirs - ours).abs().max() < 2e-3 * ours.abs().max()


def load_rules(tmp_path, text):
    from qconvert.plan.recipes import load_recipe

    (tmp_path / "r.toml").write_text(text)
    return load_recipe(tmp_path / "r.toml").rules
