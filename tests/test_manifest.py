"""The manifest's structured provenance (schema 2): who decided each tensor, where its values came from,
the header room reserved for it, and that outputs written with schema 1 still verify."""

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qconvert.calibration.samples import CalibrationSettings
from qconvert.conversion import convert
from qconvert.manifest import (
    BY_BUDGET,
    BY_DEFAULT,
    BY_RUNTIME,
    METADATA_KEY,
    SCHEMA_VERSION,
    WIDEST_FLOAT,
    Manifest,
    read_manifest,
)
from qconvert.plan.recipes import load_recipe
from qconvert.settings import Settings, build_settings
from qconvert.verification import verify_output

BLOCK = "model.layers.0."


def records(output):
    return {r.name: r for r in read_manifest(output).tensors}


def test_every_record_says_which_rule_decided_it(tmp_path, tiny_llama):
    (tmp_path / "r.toml").write_text('[defaults]\nbits = 4\n\n[[rules]]\nmatch = "mlp\\\\.down_proj"\nbits = 8\n')
    settings = build_settings(
        load_recipe(tmp_path / "r.toml"), {"exclude": ("q_proj",), "include": ("embed_tokens",)}, {}
    )
    got = records(convert(tiny_llama, tmp_path / "out", settings).output)
    assert got[BLOCK + "self_attn.q_proj.weight"].decided_by == "--exclude q_proj"
    assert got[BLOCK + "mlp.down_proj.weight"].decided_by == "rule 1 of r.toml (line 4)"
    assert got[BLOCK + "mlp.down_proj.weight"].bits == 8
    assert got["model.embed_tokens.weight"].decided_by == "--include embed_tokens"
    assert got[BLOCK + "mlp.up_proj.weight"].decided_by == BY_DEFAULT
    assert got[BLOCK + "input_layernorm.weight"].decided_by == BY_DEFAULT
    origins = (
        {r.origin for r in got.values() if r.action == "quantized"},
        {r.origin for r in got.values() if r.action == "kept"},
    )
    assert origins == ({"quantized"}, {"kept"})


def test_a_rule_the_runtime_cannot_hold_is_decided_by_the_runtime_module(tmp_path):
    from helpers import save_tiny
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        num_hidden_layers=1,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        vocab_size=256,
    )
    source = save_tiny(tmp_path / "moe", config, Qwen3MoeForCausalLM)
    got = records(convert(source, tmp_path / "out", Settings(include=["mlp\\.gate\\.weight"], layout="native")).output)
    router = got[BLOCK + "mlp.gate.weight"]
    assert (router.action, router.decided_by) == ("kept", BY_RUNTIME)


def test_a_size_budget_says_it_chose_the_grid(tmp_path, tiny_llama):
    got = records(convert(tiny_llama, tmp_path / "out", Settings(target_bpw=5.0)).output)
    assert {r.decided_by for r in got.values() if r.action == "quantized"} == {BY_BUDGET}


def test_awq_marks_the_norms_it_rescaled(tmp_path, tiny_lm):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    calibration = CalibrationSettings(text=str(text), samples=4, seqlen=32)
    got = records(convert(tiny_lm, tmp_path / "out", Settings(quantizer="awq", calibration=calibration)).output)
    rescaled = {n for n, r in got.items() if r.origin == "rescaled"}
    assert BLOCK + "input_layernorm.weight" in rescaled and BLOCK + "post_attention_layernorm.weight" in rescaled
    assert all(got[n].action == "kept" for n in rescaled)


def test_the_reserved_header_room_is_an_upper_bound(tmp_path, tiny_llama):
    manifest = read_manifest(convert(tiny_llama, tmp_path / "out").output)
    assert len(manifest.widest_json()) >= len(manifest.to_json())
    assert len(json.dumps(WIDEST_FLOAT)) == 24 and all(
        len(json.dumps(x)) <= 24 for x in (-1.2345678901234567e-300, 1e-5 / 3, 2.0**-1074)
    )


def _as_schema_1(output):
    """Rewrite an output's manifest (both copies) as qconvert wrote it before schema 2."""
    data = json.loads((output / "qconvert.json").read_text())
    data["schema_version"] = 1
    for record in data["tensors"]:
        del record["origin"], record["decided_by"]
    text = json.dumps(data, sort_keys=True, indent=1)
    (output / "qconvert.json").write_text(text + "\n")
    weights = output / "model.safetensors"
    with safe_open(weights, framework="pt") as handle:
        metadata = handle.metadata()
    save_file(load_file(weights), weights, metadata={**metadata, METADATA_KEY: text})


def test_a_schema_1_output_still_verifies_and_a_newer_one_is_refused(tmp_path, tiny_llama):
    out = convert(tiny_llama, tmp_path / "out", Settings(layout="native")).output
    _as_schema_1(out)
    manifest = read_manifest(out)
    assert manifest.schema_version == 1 and {r.origin for r in manifest.tensors} == {None}
    assert verify_output(out)[0] == []

    data = json.loads((out / "qconvert.json").read_text())
    (out / "qconvert.json").write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(Exception, match="newer qconvert"):
        read_manifest(out)


def test_verify_finds_an_origin_that_cannot_give_what_is_stored(tmp_path, tiny_llama):
    out = convert(tiny_llama, tmp_path / "out", Settings(layout="native")).output
    manifest = read_manifest(out)
    quantized = next(r for r in manifest.tensors if r.action == "quantized")
    quantized.origin = "kept"
    (out / "qconvert.json").write_text(manifest.to_json() + "\n")
    problems = verify_output(out)[0]
    assert any(f"{quantized.name}: origin 'kept' cannot give a quantized tensor" in p for p in problems)


def test_from_json_round_trips():
    manifest = Manifest("1", "native", {}, {}, [])
    assert Manifest.from_json(manifest.to_json()) == manifest
