"""Correct in the runtime, for every architecture (issue 11): each kind of input that other converters get
wrong, with the right answer as the expected value: the runtime's own logits against qconvert's
dequantized model, or one sentence, an exit code and nothing left behind."""

import json
import shutil

import pytest
import torch
from helpers import save_tiny
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import qconvert
from qconvert.cli import app
from qconvert.conversion import convert
from qconvert.errors import SchemeError, UnsupportedModelError
from qconvert.formats.export import export as export_to
from qconvert.settings import Settings

runner = CliRunner()
IDS = torch.arange(100, 116).view(1, -1)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(
        **{
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 49152,
            "max_position_embeddings": 256,
            **overrides,
        }
    )


def leftovers(folder, keep=()):
    """Every entry of `folder` other than `keep`: staging, scratch, locks, stores a run left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def calibration_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Some calibration text about Python. " * 200)
    return text


def calibrated(text, quantizer="gptq"):
    """The flags of a small calibrated conversion."""
    return ["-q", quantizer, "--calib", text, "--calib-samples", 2, "--calib-seqlen", 32]


def edited_copy(source, folder, edit):
    """A copy of checkpoint `source` at `folder` whose tensors `edit` changed in place."""
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def interrupted_at_block(monkeypatch, number):
    """Calibration raises KeyboardInterrupt when it starts quantizing its `number`-th block (never for 0);
    returns the list that counts the blocks it started."""
    import qconvert.calibration.pipeline as pipeline

    calls = []

    def counting(real):
        def quantize_block(*args):
            calls.append(1)
            if len(calls) == number:
                raise KeyboardInterrupt
            return real(*args)

        return quantize_block

    # two-pass quantizers quantize a block in `_quantize_block`, gptq in `_quantize_sequentially`
    for name in ("_quantize_block", "_quantize_sequentially"):
        monkeypatch.setattr(pipeline, name, counting(getattr(pipeline, name)))
    return calls


def runtime_logits(path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def qconvert_logits(path):
    with torch.no_grad():
        return qconvert.load_model(path).eval()(IDS).logits


# ---------------------------------------------------------------- 1. MoE routers stay float


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    folder = tmp_path_factory.mktemp("moe")
    common = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return {
        "qwen3moe": save_tiny(
            folder / "qwen3moe",
            Qwen3MoeConfig(
                **common,
                intermediate_size=128,
                moe_intermediate_size=64,
                num_experts=4,
                num_experts_per_tok=2,
                head_dim=16,
            ),
            Qwen3MoeForCausalLM,
        ),
        "mixtral": save_tiny(
            folder / "mixtral",
            MixtralConfig(**common, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
            MixtralForCausalLM,
        ),
    }


@pytest.mark.parametrize(
    "name, router",
    [("qwen3moe", "model.layers.0.mlp.gate.weight"), ("mixtral", "model.layers.0.block_sparse_moe.gate.weight")],
)
def test_moe_router_stays_float_and_the_runtime_matches_qconvert(moe_models, tmp_path, name, router):
    out = convert(moe_models[name], tmp_path / "out", Settings(bits=4, group_size=32, symmetric=True)).output
    records = {r.name: r for r in qconvert.manifest.read_manifest(out).tensors}
    assert records[router].action == "kept" and "Router" in records[router].reason
    experts = [r for r in records.values() if ".experts." in r.name]
    assert experts and all(r.action == "quantized" for r in experts)
    result = run("check", out, "--runtime", "transformers", "--forward", "--json")
    assert result.exit_code == 0, result.output
    assert (runtime_logits(out) - qconvert_logits(out)).abs().max() < 1e-3


def test_a_quantized_router_is_caught_by_check_and_never_published(moe_models, tmp_path, monkeypatch):
    import qconvert.io.skeleton as skeleton

    real_roles = skeleton._roles

    def everything_linear(model, names, rename):  # the old rule: a 2-D weight in a block is a linear layer
        roles, runtime_names = real_roles(model, names, rename)
        return {n: skeleton.LINEAR if r != skeleton.EXPERTS else r for n, r in roles.items()}, runtime_names

    monkeypatch.setattr(skeleton, "_roles", everything_linear)
    source = moe_models["qwen3moe"]
    refused = run("model", source, "-o", tmp_path / "out", "--symmetric", "--group-size", "32")
    assert refused.exit_code == 3 and "mlp.gate.weight: missing" in refused.output, refused.output
    assert leftovers(tmp_path) == []
    assert (
        run("model", source, "-o", tmp_path / "out", "--symmetric", "--group-size", "32", "--no-check").exit_code == 0
    )
    monkeypatch.undo()
    checked = run("check", tmp_path / "out", "--runtime", "transformers", "--json")
    assert checked.exit_code == 3
    assert {p["tensor"] for p in json.loads(checked.stdout)["problems"]} >= {"model.layers.0.mlp.gate.weight"}


# ---------------------------------------------------------------- 2. GPT-2's Conv1D


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    return save_tiny(
        tmp_path_factory.mktemp("gpt2") / "gpt2",
        GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64),
        GPT2LMHeadModel,
    )


def test_gpt2_conv1d_is_refused_in_one_sentence(gpt2, tmp_path):
    result = run("model", gpt2, "-o", tmp_path / "out")
    assert result.exit_code == 7 and "Conv1D" in result.output and "Traceback" not in result.output
    assert leftovers(tmp_path) == []
    included = run("model", gpt2, "-o", tmp_path / "out", "--include", "c_attn")  # no rule can make it a linear layer
    assert included.exit_code == 7, included.output


def test_gpt2_named_like_linears_would_be_caught_before_publishing(gpt2, tmp_path, monkeypatch):
    import qconvert.io.skeleton as skeleton

    monkeypatch.setattr(skeleton, "build_skeleton", lambda *args: None)  # decide by name, as before
    # symmetric: transformers loads compressed-tensors linears only, so every Conv1D weight would be random
    # (asymmetric outputs are dequantized while loading, which happens to fill Conv1D weights too)
    result = run("model", gpt2, "-o", tmp_path / "out", "--symmetric", "--group-size", "32")
    assert result.exit_code == 3 and "transformers would not load this output correctly" in result.output
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- 3. rows not a multiple of the group


@pytest.fixture(scope="module")
def llama344(tmp_path_factory, real_models):
    from transformers import LlamaForCausalLM

    return save_tiny(
        tmp_path_factory.mktemp("l344") / "l344",
        llama_config(intermediate_size=344),
        LlamaForCausalLM,
        tokenizer_from=real_models / "smollm2-135m",
    )


def test_partial_groups_native_output_is_refused_by_transformers_and_check(llama344, tmp_path):
    import transformers

    out = convert(llama344, tmp_path / "out", Settings(bits=4, group_size=32)).output
    assert qconvert.manifest.read_manifest(out).layout == "native"
    with pytest.raises(ValueError, match="quant_method"):  # refused, never loaded with random weights
        transformers.AutoModelForCausalLM.from_pretrained(out)
    assert run("check", out, "--runtime", "transformers").exit_code == 3


def test_partial_groups_export_to_gguf_and_mlx_as_float_and_load_right(llama344, tmp_path):
    out = convert(llama344, tmp_path / "out", Settings(bits=4, group_size=32)).output
    down = "model.layers.0.mlp.down_proj.weight"
    for target in ("gguf", "mlx"):
        result = run("export", out, "--to", target, "--json")
        assert result.exit_code == 0, result.output
        assert down in json.loads(result.stdout)["dequantized"]
    formatted = run("model", llama344, "-o", tmp_path / "direct.gguf", "--format", "gguf", "--group-size", "32")
    assert formatted.exit_code == 0, formatted.output
    assert leftovers(tmp_path, keep={"out", "out.gguf", "out-mlx", "direct.gguf"}) == []

    import transformers

    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf", dtype=torch.float32)
    with torch.no_grad():
        difference = (gguf_model(IDS).logits - qconvert_logits(out)).abs().max()
    assert difference < 1e-2, difference  # float16 storage of the partial-group weights

    import mlx.core as mx
    from mlx_lm import load

    mlx_model, _ = load(str(tmp_path / "out-mlx"))
    theirs = torch.tensor(mlx_model(mx.array(IDS.tolist())).astype(mx.float32).tolist())
    ours = qconvert_logits(out)
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()  # MLX computes in bfloat16


# ---------------------------------------------------------------- 4. GGUF permutes q/k biases with their rows


def test_gguf_permutes_q_and_k_biases_like_their_rows(tmp_path, real_models):
    import gguf
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    source = save_tiny(
        tmp_path / "bias",
        llama_config(attention_bias=True),
        LlamaForCausalLM,
        tokenizer_from=real_models / "smollm2-135m",
        biases=True,
    )
    out = convert(source, tmp_path / "out", Settings(bits=4, group_size=32, symmetric=True)).output
    assert run("export", out, "--to", "gguf").exit_code == 0
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors}
    ours = qconvert.load(out, torch.float32)
    processor = LlamaTensorProcessor(
        config={"num_attention_heads": 4, "num_key_value_heads": 2}
    )  # llama.cpp's order, undone
    for block_name, module in [
        ("blk.0.attn_q", "model.layers.0.self_attn.q_proj"),
        ("blk.1.attn_k", "model.layers.1.self_attn.k_proj"),
    ]:
        for kind in ("weight", "bias"):
            t = tensors[f"{block_name}.{kind}"]
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[f"{module}.{kind}"].shape)
            restored = torch.tensor(processor.process(values, f"{block_name}.{kind}").weights)
            assert torch.allclose(restored, ours[f"{module}.{kind}"], atol=1e-3), (block_name, kind)


# ---------------------------------------------------------------- 5. AWQ and Gemma's (1 + w) norm


def test_awq_folds_into_gemma_norms_exactly(tmp_path, real_models):
    from transformers import GemmaConfig, GemmaForCausalLM

    source = save_tiny(
        tmp_path / "gemma",
        GemmaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=49152,
        ),
        GemmaForCausalLM,
        tokenizer_from=real_models / "smollm2-135m",
    )
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    reference = runtime_logits(source)
    errors = {}
    for quantizer in ("rtn", "awq"):
        settings = Settings(
            quantizer=quantizer,
            bits=8,
            group_size=32,
            layout="native",
            calibration=qconvert.calibration.samples.CalibrationSettings(text=str(text), samples=4, seqlen=64)
            if quantizer == "awq"
            else None,
        )
        out = convert(source, tmp_path / quantizer, settings).output
        errors[quantizer] = float((qconvert_logits(out) - reference).abs().max())
    assert errors["awq"] < 3 * errors["rtn"], errors  # was 45x before the fold respected 1 + w


def test_a_norm_that_is_neither_w_nor_one_plus_w_is_refused():
    from qconvert.quantizers.awq import norm_offset

    class SquaredNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.weight**2 + x

    with pytest.raises(UnsupportedModelError, match="SquaredNorm"):
        norm_offset(SquaredNorm(), "model.layers.0.input_layernorm")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert norm_offset(GemmaRMSNorm(8), "g") == 1.0 and norm_offset(LlamaRMSNorm(8), "l") == 0.0
    assert norm_offset(torch.nn.LayerNorm(8), "ln") == 0.0


# ---------------------------------------------------------------- 6, 12, 16. inputs that lie


def sharded(tmp_path, weight_map=None, config=None):
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(64, 64)}, folder / "a.safetensors")
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(64, 64)}, folder / "b.safetensors")
    index = {
        "metadata": {},
        "weight_map": weight_map
        or {
            "model.layers.0.mlp.up_proj.weight": "a.safetensors",
            "model.layers.0.mlp.down_proj.weight": "b.safetensors",
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (folder / "config.json").write_bytes(config)
    return folder


def assert_sentence(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.output.count("\n") <= 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    folder = sharded(
        tmp_path,
        {"model.layers.0.mlp.up_proj.weight": "a.safetensors", "model.layers.0.mlp.down_proj.weight": "a.safetensors"},
    )
    assert_sentence(
        run("model", folder, "-o", tmp_path / "out"), 2, "model.layers.0.mlp.down_proj.weight", "a.safetensors"
    )
    assert leftovers(tmp_path, keep={"sharded"}) == []


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "/etc/passwd", "/tmp/../etc/passwd"])
def test_index_paths_outside_the_folder_are_never_opened(tmp_path, shard):
    (tmp_path / "outside").mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(64, 64)}, tmp_path / "outside" / "x.safetensors")
    folder = sharded(tmp_path, {"model.layers.0.mlp.up_proj.weight": shard})
    assert_sentence(run("model", folder, "-o", tmp_path / "out"), 2, "outside")


@pytest.mark.parametrize("weight_map", [["a.safetensors"], {"model.layers.0.mlp.up_proj.weight": 3}])
def test_malformed_indexes_are_one_sentence(tmp_path, weight_map):
    assert_sentence(run("model", sharded(tmp_path, weight_map), "-o", tmp_path / "out"), 2, "not a valid shard index")


@pytest.mark.parametrize("config", [b"[1, 2]", bytes(range(256))])
def test_malformed_configs_are_one_sentence(tmp_path, config):
    assert_sentence(run("model", sharded(tmp_path, config=config), "-o", tmp_path / "out"), 2, "config.json")


def test_a_negative_shape_is_one_sentence(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}, path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"shape":[4,4]', b'"shape":[-4,-4]'))
    assert_sentence(run("model", path, "-o", tmp_path / "out"), 2, "shape")


def test_empty_weights_are_kept_and_the_rest_converts(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    save_file(
        {
            "model.layers.0.a.weight": torch.zeros(0, 64),
            "model.layers.0.b.weight": torch.zeros(64, 0),
            "model.layers.0.c.weight": torch.randn(64, 64),
        },
        folder / "model.safetensors",
    )
    out = convert(folder, tmp_path / "out").output
    actions = {r.name: r.action for r in qconvert.manifest.read_manifest(out).tensors}
    assert actions == {
        "model.layers.0.a.weight": "kept",
        "model.layers.0.b.weight": "kept",
        "model.layers.0.c.weight": "quantized",
    }
    assert run("verify", out).exit_code == 0


# ---------------------------------------------------------------- 7, 16. numeric range


def one_weight(tmp_path, weight, name="model.layers.0.mlp.up_proj.weight", extra=None):
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    save_file({name: weight, **(extra or {})}, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("magnitude", [1e-6, 4e5])
def test_scales_float16_cannot_hold_are_refused_and_bfloat16_holds_them(tmp_path, magnitude):
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * magnitude
    source = one_weight(tmp_path, weight)
    assert_sentence(
        run("model", source, "-o", tmp_path / "out"), 2, "model.layers.0.mlp.up_proj.weight", "--scale-dtype bfloat16"
    )
    assert leftovers(tmp_path, keep={"src"}) == []
    out = convert(source, tmp_path / "out", Settings(scale_dtype="bfloat16")).output
    restored = qconvert.load(out, torch.float32)["model.layers.0.mlp.up_proj.weight"]
    assert ((restored - weight).norm() / weight.norm()) < 0.1


def test_a_weight_near_float32_max_is_refused_or_held_and_no_nan_reaches_a_manifest(tmp_path):
    weight = torch.randn(64, 64)
    weight[3, 5] = 3e38
    source = one_weight(tmp_path, weight)
    assert_sentence(run("model", source, "-o", tmp_path / "out"), 2, "--scale-dtype bfloat16")
    assert run("model", source, "-o", tmp_path / "out", "--scale-dtype", "bfloat16").exit_code == 0
    manifest = json.loads((tmp_path / "out" / "qconvert.json").read_text())
    assert all(t["relative_mse"] is None or t["relative_mse"] >= 0 for t in manifest["tensors"])
    weight[3, 6] = -3e38  # the group's range overflows float32 itself
    assert_sentence(
        run("model", one_weight(tmp_path, weight), "-o", tmp_path / "o2", "--scale-dtype", "bfloat16"), 2, "too large"
    )


def test_a_kept_tensor_cast_out_of_range_is_refused(tmp_path):
    source = one_weight(
        tmp_path, torch.randn(64, 64), extra={"model.layers.0.input_layernorm.weight": torch.full((64,), 1e5)}
    )
    assert_sentence(
        run("model", source, "-o", tmp_path / "out", "--dtype", "float16"),
        2,
        "model.layers.0.input_layernorm.weight",
        "float16",
    )


# ---------------------------------------------------------------- 8, 18. nothing left behind; interruptions


@pytest.mark.parametrize("quantizer", ["gptq", "awq"])
def test_nan_under_calibration_names_the_tensor_and_leaves_nothing(tmp_path, tiny_lm, quantizer):
    def poison(tensors):
        tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")

    source = edited_copy(tiny_lm, tmp_path / "nan", poison)
    result = run("model", source, "-o", tmp_path / "out", *calibrated(calibration_text(tmp_path), quantizer))
    assert_sentence(result, 2, "model.layers.1.self_attn.k_proj.weight", "NaN")
    assert leftovers(tmp_path, keep={"nan", "calib.txt"}) == []


def test_an_interrupted_calibration_keeps_finished_blocks_says_so_and_resumes(tmp_path, tiny_lm, monkeypatch):
    interrupted_at_block(monkeypatch, 2)
    args = ["model", tiny_lm, "-o", tmp_path / "out", *calibrated(calibration_text(tmp_path))]
    result = run(*args)
    store = tmp_path / ".out.qconvert-calibration"
    assert result.exit_code == 130 and "nothing was published" in result.output and str(store) in result.output
    assert "delete that folder to discard it" in result.output
    assert leftovers(tmp_path, keep={"calib.txt", store.name}) == []
    monkeypatch.undo()
    assert run(*args).exit_code == 0
    assert leftovers(tmp_path, keep={"calib.txt", "out"}) == []


def test_an_interruption_before_any_block_leaves_nothing(tmp_path, tiny_lm, monkeypatch):
    interrupted_at_block(monkeypatch, 1)
    text = calibration_text(tmp_path)
    result = run("model", tiny_lm, "-o", tmp_path / "out.gguf", "--format", "gguf", *calibrated(text))
    assert result.exit_code == 130
    assert leftovers(tmp_path, keep={"calib.txt"}) == []


def test_sigterm_is_handled_like_ctrl_c(tmp_path, tiny_lm, monkeypatch):
    import os
    import signal

    import qconvert.conversion as conversion

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(conversion, "_stream", terminated)
    result = run("model", tiny_lm, "-o", tmp_path / "out")
    assert result.exit_code == 143 and "terminated; nothing was published" in result.output
    assert leftovers(tmp_path) == []


def test_format_exports_build_in_a_fixed_scratch_folder_that_an_error_removes(tmp_path, tiny_lm, monkeypatch):
    import qconvert.formats.export as exporting

    seen = []

    def failing_export(converted, to, destination, force):
        seen.append(converted)
        raise OSError(28, "No space left on device", str(destination))

    monkeypatch.setattr(exporting, "export", failing_export)
    result = run("model", tiny_lm, "-o", tmp_path / "m.gguf", "--format", "gguf")
    assert_sentence(result, 6, "No space left on device", "nothing was published")
    assert seen[0].parent.name == ".m.gguf.qconvert-scratch"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- 9. GPTQ settings in quantize_config.json


def test_gptq_settings_only_in_quantize_config_json_are_read(tmp_path, tiny_lm):
    out = convert(tiny_lm, tmp_path / "out", Settings(bits=4, group_size=32, symmetric=True)).output
    gptq = export_to(out, "gptq", tmp_path / "gptq").destination
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (gptq / "config.json").write_text(json.dumps(config))
    again = convert(gptq, tmp_path / "again", Settings(bits=4, group_size=32, symmetric=True)).output
    assert all(
        r.origin == "repacked" for r in qconvert.manifest.read_manifest(again).tensors if r.action == "quantized"
    )
    ours, theirs = qconvert.load(out), qconvert.load(again)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    settings = json.loads((gptq / "quantize_config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {**settings, "bits": 8}}))
    assert_sentence(run("model", gptq, "-o", tmp_path / "x"), 2, "bits", "quantize_config.json")


def test_a_gptq_zero_point_convention_that_contradicts_the_config_is_refused(tmp_path, tiny_lm):
    out = convert(tiny_lm, tmp_path / "out", Settings(bits=4, group_size=32, symmetric=True)).output
    gptq = export_to(out, "gptq", tmp_path / "gptq").destination
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"  # the file holds v1 zeros
    (gptq / "config.json").write_text(json.dumps(config))
    assert_sentence(run("model", gptq, "-o", tmp_path / "x"), 2, "checkpoint_format")


# ---------------------------------------------------------------- 10, 20. the command line itself


def test_messages_with_brackets_keep_them(tmp_path):
    result = run("model", tmp_path / "qconvert[hf]", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "qconvert[hf]" in result.output


def test_version_and_bare_command():
    assert run("--version").exit_code == 0 and qconvert.__version__ in run("--version").output
    assert run().exit_code in (0, 2)


def test_eval_of_a_pickle_transformers_refuses_is_a_sentence(tmp_path, tiny_llama):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    assert_sentence(run("eval", folder, "--text", text), 2, "transformers cannot load")


def test_check_loads_a_float_checkpoint_instead_of_trusting_it(tmp_path, tiny_llama):
    assert run("check", tiny_llama, "--runtime", "transformers").exit_code == 0
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = run("check", broken, "--runtime", "transformers", "--json")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["problems"][0]["tensor"] == "model.layers.1.mlp.up_proj.weight"


# ---------------------------------------------------------------- 11, 14, 17. the output path


@pytest.mark.parametrize("where", ["source", "parent", "inside"])
def test_the_source_is_never_the_output(tmp_path, tiny_llama, where):
    source = tmp_path / "src"
    shutil.copytree(tiny_llama, source)
    before = sorted(p.name for p in source.iterdir())
    output = {"source": source, "parent": tmp_path, "inside": source / "out"}[where]
    assert_sentence(run("model", source, "-o", output, "--force"), 2, "source")
    assert sorted(p.name for p in source.iterdir()) == before


def test_a_link_at_the_output_is_replaced_never_followed(tmp_path, tiny_llama):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(target)
    assert_sentence(run("model", tiny_llama, "-o", link), 2, "symbolic link")
    assert run("model", tiny_llama, "-o", link, "--force").exit_code == 0
    assert not link.is_symlink() and (link / "qconvert.json").is_file() and (target / "keep.txt").read_text() == "mine"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert run("model", tiny_llama, "-o", dangling).exit_code == 2
    assert run("model", tiny_llama, "-o", dangling, "--force").exit_code == 0 and not dangling.is_symlink()
    assert leftovers(tmp_path, keep={"precious", "out", "dangling"}) == []


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path, tiny_llama):
    from qconvert.io.writing import output_lock

    with output_lock(tmp_path / "out"):
        # the lock is per process; another process's run (what batch --jobs does) is simulated by forgetting ours
        from qconvert.io import writing

        held = set(writing._HELD)
        writing._HELD.clear()
        try:
            assert_sentence(run("model", tiny_llama, "-o", tmp_path / "out"), 2, "another qconvert run is writing")
        finally:
            writing._HELD.update(held)
    assert run("model", tiny_llama, "-o", tmp_path / "out").exit_code == 0
    assert leftovers(tmp_path, keep={"out"}) == []


def test_replacing_an_output_is_one_exchange_and_leaves_nothing(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert run("model", tiny_llama, "-o", out).exit_code == 0
    inode = out.stat().st_ino
    assert run("model", tiny_llama, "-o", out, "--bits", "8", "--force").exit_code == 0
    assert out.stat().st_ino != inode and qconvert.manifest.read_manifest(out).tensors[2].bits in (8, None)
    assert leftovers(tmp_path, keep={"out"}) == []


# ---------------------------------------------------------------- 13. disk full


def test_disk_full_while_writing_is_one_sentence_and_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    import errno

    from qconvert.io import writing

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(writing.SafetensorsStreamWriter, "write", full)
    assert_sentence(run("model", tiny_llama, "-o", tmp_path / "out"), 6, "No space left on device")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- 15, 19. verify has teeth


@pytest.fixture
def verified(tmp_path, tiny_llama):
    out = convert(tiny_llama, tmp_path / "out", Settings(bits=4, group_size=32)).output
    assert run("verify", out).exit_code == 0
    return out


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.update(group_size=16),
        lambda t: t.update(symmetric=not t["symmetric"]),
        lambda t: t.update(bits=8),
        lambda t: t.update(action="kept"),
    ],
)
def test_verify_catches_an_edited_scheme_in_either_manifest_copy(verified, edit):
    path = verified / "qconvert.json"
    manifest = json.loads(path.read_text())
    record = next(t for t in manifest["tensors"] if t["action"] == "quantized")
    edit(record)
    path.write_text(json.dumps(manifest))
    assert run("verify", verified).exit_code == 3


def test_verify_catches_an_edited_embedded_manifest(verified):
    from qconvert.io.writing import SafetensorsStreamWriter  # noqa: F401  (the header layout it writes)

    path = verified / "model.safetensors"
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    embedded = json.loads(header["__metadata__"]["qconvert"])
    embedded["tensors"][2]["bits"] = 8
    header["__metadata__"]["qconvert"] = json.dumps(embedded, sort_keys=True, indent=1)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    data[8 : 8 + length] = text + b" " * (length - len(text))
    path.write_bytes(bytes(data))
    result = run("verify", verified)
    assert result.exit_code == 3 and "differs from qconvert.json" in result.output


def test_gates_measure_the_files_not_the_manifest(verified):
    from qconvert.verification import measured_totals

    honest = measured_totals(verified)
    path = verified / "qconvert.json"
    manifest = json.loads(path.read_text())
    manifest["totals"]["quantized_bits_per_weight"] = 1.0
    path.write_text(json.dumps(manifest))
    assert measured_totals(verified) == honest
    assert run("verify", verified, "--max-bpw", "2").exit_code == 3  # the edit itself is found


# ---------------------------------------------------------------- architectures, two settings each


def _architectures():
    import transformers as T

    common = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return {
        "llama": (T.LlamaConfig(**common, intermediate_size=128), T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config(**common, intermediate_size=128), T.Qwen2ForCausalLM),  # q/k/v biases
        "mistral": (T.MistralConfig(**common, intermediate_size=128), T.MistralForCausalLM),
        "phi3": (
            T.Phi3Config(**common, intermediate_size=128, pad_token_id=0),
            T.Phi3ForCausalLM,
        ),  # fused qkv, gate_up
        "gemma": (T.GemmaConfig(**common, intermediate_size=128, head_dim=16), T.GemmaForCausalLM),
        "bert": (
            T.BertConfig(
                num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=256
            ),
            T.BertModel,
        ),
        "llava": (
            T.LlavaConfig(
                text_config=T.LlamaConfig(**common, intermediate_size=128),
                vision_config=T.CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    image_size=32,
                    patch_size=8,
                ),
                image_token_index=255,
            ),
            T.LlavaForConditionalGeneration,
        ),
    }


@pytest.fixture(scope="module")
def architectures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("architectures")
    return {
        name: save_tiny(folder / name, config, cls, biases=name == "qwen2")
        for name, (config, cls) in _architectures().items()
    }


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "phi3", "gemma", "bert", "llava"])
@pytest.mark.parametrize(
    "flags", [["--bits", "4", "--group-size", "32", "--symmetric"], ["--bits", "8", "--group-size", "0"]]
)
def test_every_architecture_loads_in_transformers_as_qconvert_reads_it(architectures, tmp_path, name, flags):
    out = tmp_path / "out"
    result = run("model", architectures[name], "-o", out, *flags, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layout"] == "compressed-tensors" and summary["runtime_check"]["ok"], summary
    assert summary["quantized_parameters"] > 0
    if name in ("bert", "llava"):  # no causal-LM head to compare logits on: the meta-device load is the check
        assert run("check", out, "--runtime", "transformers").exit_code == 0
        return
    checked = run("check", out, "--runtime", "transformers", "--forward", "--json")
    assert checked.exit_code == 0, checked.output


def test_the_vlm_quantizes_its_nested_language_model_by_module(architectures):
    skeleton = qconvert.io.sources.open_checkpoint(architectures["llava"]).skeleton()
    roles = skeleton.roles
    language = [n for n, role in roles.items() if "language_model" in n and ".layers.0." in n and role == "linear"]
    assert language, roles


# ---------------------------------------------------------------- more of the same kinds


def test_check_forward_runs_mlx_lm_and_catches_what_headers_cannot(tmp_path, tiny_lm):
    out = convert(tiny_lm, tmp_path / "out", Settings(bits=4, group_size=32, symmetric=True)).output
    from qconvert.formats.export import export

    mlx = export(out, "mlx", tmp_path / "mlx").destination
    assert run("check", mlx, "--runtime", "mlx", "--forward").exit_code == 0
    config = json.loads((mlx / "config.json").read_text())
    config["rope_theta"] = 1.0  # a key mlx_lm reads and transformers does not (it reads rope_parameters)
    (mlx / "config.json").write_text(json.dumps(config))
    assert run("check", mlx, "--runtime", "mlx").exit_code == 0  # the headers are fine
    result = run("check", mlx, "--runtime", "mlx", "--forward", "--json")
    assert result.exit_code == 3 and "differ from qconvert" in json.loads(result.stdout)["problems"][0]["message"]


def test_gptq_export_refuses_rows_it_cannot_pack(llama344, tmp_path):
    out = convert(llama344, tmp_path / "out", Settings(bits=4, group_size=32, symmetric=True)).output
    assert_sentence(run("export", out, "--to", "gptq"), 7, "model.layers.0.mlp.down_proj.weight", "344")
    assert leftovers(tmp_path, keep={"out"}) == []


def test_an_export_never_replaces_its_own_source(tmp_path, tiny_llama):
    out = convert(tiny_llama, tmp_path / "out", Settings(bits=4, group_size=32, symmetric=True)).output
    for target in ("mlx", "compressed-tensors"):
        assert_sentence(run("export", out, "--to", target, "-o", out, "--force"), 2, "source")
    assert run("verify", out).exit_code == 0


def test_model_json_says_whether_the_runtime_check_ran(tmp_path, tiny_llama):
    compressed = json.loads(run("model", tiny_llama, "-o", tmp_path / "a", "--json").stdout)
    assert compressed["runtime_check"] == {"runtime": "transformers", "ok": True, "problems": []}
    native = json.loads(run("model", tiny_llama, "-o", tmp_path / "b", "--layout", "native", "--json").stdout)
    assert native["runtime_check"]["ok"] is None and "native layout" in native["runtime_check"]["skipped"]


def test_an_interrupted_format_export_keeps_its_scratch_store_and_resumes(tmp_path, tiny_lm, monkeypatch):
    interrupted_at_block(monkeypatch, 2)
    text = calibration_text(tmp_path)
    args = [
        "model",
        tiny_lm,
        "-o",
        tmp_path / "m.gguf",
        "--format",
        "gguf",
        "--symmetric",
        "--group-size",
        "32",
        *calibrated(text),
    ]
    assert run(*args).exit_code == 130
    scratch = tmp_path / ".m.gguf.qconvert-scratch"
    assert list(scratch.glob(".*.qconvert-calibration/block-00000.safetensors"))
    monkeypatch.undo()
    calls = interrupted_at_block(monkeypatch, 0)  # counts, never interrupts
    assert run(*args).exit_code == 0
    assert len(calls) == 1  # block 0 was replayed from the store, only block 1 quantized anew
    assert leftovers(tmp_path, keep={"calib.txt", "m.gguf"}) == []


def test_zero_points_of_a_single_word_are_kept_out_of_compressed_tensors(tmp_path):
    """k_proj with 8 rows: its 4-bit zero points fill one int32 word per group, which compressed-tensors'
    loader cannot read back (transformers fails while converting): auto picks the native layout, and the
    symmetric grid (no zero points) still loads in transformers."""
    from transformers import LlamaForCausalLM

    source = save_tiny(
        tmp_path / "kv8",
        llama_config(num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=1, head_dim=8, vocab_size=128),
        LlamaForCausalLM,
    )
    assert convert(source, tmp_path / "asym", Settings(bits=4, group_size=32)).manifest.layout == "native"
    with pytest.raises(SchemeError, match="single word"):
        convert(source, tmp_path / "forced", Settings(bits=4, group_size=32, layout="compressed-tensors"))
    symmetric = convert(source, tmp_path / "sym", Settings(bits=4, group_size=32, symmetric=True)).output
    assert run("check", symmetric, "--runtime", "transformers", "--forward").exit_code == 0


def test_moe_experts_with_zero_points_go_native_and_symmetric_ones_load(moe_models, tmp_path):
    # transformers stacks the experts while loading and their zero points never reach compressed-tensors'
    # decompressor: asymmetric MoE outputs are written native (transformers refuses them, qconvert reads them)
    asymmetric = convert(moe_models["mixtral"], tmp_path / "asym", Settings(bits=4, group_size=32)).output
    assert qconvert.manifest.read_manifest(asymmetric).layout == "native"
    assert run("check", asymmetric, "--runtime", "transformers").exit_code == 3
    with pytest.raises(SchemeError, match="MoE expert"):
        convert(
            moe_models["mixtral"], tmp_path / "forced", Settings(bits=4, group_size=32, layout="compressed-tensors")
        )


def test_shards_linked_from_elsewhere_are_read_like_the_hugging_face_cache(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(64, 64)}, blobs / "aaa")
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(64, 64)}, blobs / "bbb")
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model-00001-of-00002.safetensors").symlink_to("../../blobs/aaa")
    (snapshot / "model-00002-of-00002.safetensors").symlink_to("../../blobs/bbb")
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors",
                    "model.layers.0.mlp.down_proj.weight": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    assert run("model", snapshot, "-o", tmp_path / "out").exit_code == 0


def test_verify_opens_no_file_outside_the_output(verified, tiny_llama):
    path = verified / "qconvert.json"
    manifest = json.loads(path.read_text())
    for record in manifest["tensors"]:
        for entry in record["stored"].values():
            entry["file"] = str(tiny_llama / "model.safetensors")
    path.write_text(json.dumps(manifest))
    result = run("verify", verified)
    assert result.exit_code == 3 and "not a file name in that folder" in result.output


def test_format_exports_never_replace_a_cached_source(tmp_path, tiny_llama, monkeypatch):
    cache = tmp_path / "hf"
    snapshot = cache / "hub" / "models--acme--tiny" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_llama, snapshot)
    (cache / "hub" / "models--acme--tiny" / "refs").mkdir()
    (cache / "hub" / "models--acme--tiny" / "refs" / "main").write_text(snapshot.name)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))  # read at call time; the env var at import
    before = sorted(p.name for p in snapshot.iterdir())
    assert_sentence(run("model", "acme/tiny", "-o", snapshot, "--format", "mlx", "--force"), 2, "source")
    assert sorted(p.name for p in snapshot.iterdir()) == before


def test_a_killed_runs_scratch_output_does_not_block_the_next_run(tmp_path, tiny_lm):
    leftover = tmp_path / ".x.gguf.qconvert-scratch" / "qconvert"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half-written")
    assert run("model", tiny_lm, "-o", tmp_path / "x.gguf", "--format", "gguf").exit_code == 0
    assert leftovers(tmp_path, keep={"x.gguf"}) == []


def test_gguf_disk_full_is_exit_6(tmp_path, tiny_lm, monkeypatch):
    import gguf

    out = convert(tiny_lm, tmp_path / "out", Settings(bits=4, group_size=32, symmetric=True)).output

    def full(self, *args, **kwargs):  # what gguf raises when it finds too little room: an OSError without errno
        raise OSError("Not enough free space to write 56623104 bytes after offset 1785152")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    assert_sentence(run("export", out, "--to", "gguf"), 6, "No space left on device", "out.gguf")
    assert leftovers(tmp_path, keep={"out"}) == []


def test_a_calibrated_scale_refusal_names_its_tensor(tmp_path, tiny_lm):
    def enlarge(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].float() * 1e7

    source = edited_copy(tiny_lm, tmp_path / "big", enlarge)
    result = run("model", source, "-o", tmp_path / "out", *calibrated(calibration_text(tmp_path)))
    assert_sentence(result, 2, "tensor model.layers.0.mlp.up_proj.weight needs scales")
