"""Recipes: parsing, errors with file and line, rule precedence, and `recipe check` == conversion."""

import json
from pathlib import Path

import pytest
from helpers import REPO
from typer.testing import CliRunner

from qconvert.cli import app
from qconvert.conversion import convert
from qconvert.errors import SchemeError
from qconvert.plan.recipes import load_recipe
from qconvert.settings import build_settings

runner = CliRunner()

MIXED = """\
# a test recipe
[defaults]
bits = 4
group_size = 32

[[rules]]
match = 'layers\\.0\\.mlp'
keep = true

[[rules]]
match = 'down_proj'
bits = 8
group_size = 0
symmetric = true

[[rules]]
match = 'embed_tokens'
bits = 6
"""


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_recipe_is_valid():
    recipes = sorted((REPO / "configs").glob("*.toml"))
    assert len(recipes) >= 7
    for path in recipes:
        assert path.read_text().startswith("# "), f"{path.name} needs a one-line comment saying what it is for"
        result = runner.invoke(app, ["recipe", "check", str(path), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["sha256"]


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("[defaults]\nbits = 4\nbitz = 3\n", 3, "unknown key `bitz`"),
        ("[defaults]\nbits = 7\n", 2, "bits = 7 is not supported"),
        ('[defaults]\nbits = "4"\n', 2, "`bits` must be an integer"),
        ("[defaults]\ngroup_size = -1\n", 2, "group_size must be 0"),
        ('[defaults]\nquantizer = "magic"\n', 2, "no quantizer named 'magic'"),
        (
            "[defaults]\nbits = 4\n\n[[rules]]\nmatch = 'a'\n\n[[rules]]\nmatch = '(unclosed'\n",
            8,
            "not a valid regular expression",
        ),
        ("[[rules]]\nmatch = 'a'\nkeep = true\nbits = 4\n", 4, "takes no scheme keys"),
        ("[[rules]]\nbits = 4\n", 1, "has no `match`"),
        ("[extras]\nx = 1\n", 1, "unknown section [extras]"),
        ("[calibration]\nsamples = 0\n", 2, "samples must be positive"),
        ("[defaults]\nbits = = 4\n", 2, "not valid TOML"),
    ],
)
def test_bad_recipes_are_refused_with_file_line_and_reason(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(SchemeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert str(path) in message and f"line {line}" in message and words in message


def test_bad_recipe_on_the_command_line_is_one_sentence_and_exit_2(tmp_path, tiny_checkpoint):
    path = write(tmp_path, "[defaults]\nbitz = 3\n")
    result = runner.invoke(app, ["model", str(tiny_checkpoint), "--recipe", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "line 2: unknown key `bitz`" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_first_matching_rule_wins_and_the_manifest_names_it(tmp_path, tiny_checkpoint):
    recipe = load_recipe(write(tmp_path, MIXED))
    manifest = convert(tiny_checkpoint, tmp_path / "out", build_settings(recipe, {}, {})).manifest
    by_name = {t.name: t for t in manifest.tensors}
    kept = by_name["model.layers.0.mlp.down_proj.weight"]  # rule 1 (keep) beats rule 2 (down_proj)
    assert kept.action == "kept" and kept.reason == "kept in float by rule 1 of recipe.toml (line 6)"
    down = by_name["model.layers.1.mlp.down_proj.weight"]
    assert (down.bits, down.group_size, down.symmetric) == (8, 192, True)
    assert down.reason == "quantized by rule 2 of recipe.toml (line 10)"
    embed = by_name["model.embed_tokens.weight"]  # the default rule keeps embeddings; a rule can quantize them
    assert (embed.action, embed.bits, embed.group_size) == ("quantized", 6, 32)
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert (q.bits, q.group_size, q.reason) == (4, 32, "linear weight inside a transformer block")
    assert manifest.settings["recipe"]["sha256"] == recipe.sha256


def test_flags_override_the_recipe_defaults_and_exclude_beats_its_rules(tmp_path, tiny_checkpoint):
    path = write(tmp_path, MIXED)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "model",
            str(tiny_checkpoint),
            "--recipe",
            str(path),
            "--bits",
            "3",
            "--exclude",
            "embed_tokens",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    by_name = {t["name"]: t for t in json.loads((out / "qconvert.json").read_text())["tensors"]}
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["bits"] == 3  # flag beats [defaults]
    assert by_name["model.layers.1.mlp.down_proj.weight"]["bits"] == 8  # a rule still beats the defaults
    assert by_name["model.embed_tokens.weight"]["action"] == "kept"
    assert by_name["model.embed_tokens.weight"]["reason"] == "excluded by --exclude embed_tokens"


def test_recipe_check_shows_exactly_what_conversion_then_does(tmp_path, tiny_checkpoint):
    path = write(tmp_path, MIXED)
    check = runner.invoke(app, ["recipe", "check", str(path), "--model", str(tiny_checkpoint), "--full", "--json"])
    assert check.exit_code == 0, check.output
    predicted = json.loads(check.stdout)
    manifest = convert(tiny_checkpoint, tmp_path / "out", build_settings(load_recipe(path), {}, {})).manifest
    from qconvert.inspection import scheme_label

    assert [(r["name"], r["scheme"], r["reason"], r["bytes"]) for r in predicted["tensors"]] == [
        (t.name, scheme_label(t), t.reason, t.stored_bytes) for t in manifest.tensors
    ]
    for key in ("stored_bytes", "quantized_bits_per_weight", "bits_per_weight"):
        assert predicted["totals"][key] == manifest.totals[key]


def test_recipe_check_table_names_the_rules(tmp_path, tiny_checkpoint):
    result = runner.invoke(app, ["recipe", "check", str(write(tmp_path, MIXED)), "--model", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "rule 2 of recipe.toml (line 10)" in result.stdout and "bits per weight" in result.stdout
