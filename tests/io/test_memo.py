"""Answers kept between runs (`io/memo.py`): recalled only for the very same inputs, never a failure."""

import json

import pytest

from qconvert import compatibility
from qconvert.io import memo, skeleton
from qconvert.io.sources import open_checkpoint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "memo"
    monkeypatch.setenv("QCONVERT_CACHE", str(folder))
    return folder


def test_a_skeleton_is_recalled_without_building_the_model(tiny_llama, cache, monkeypatch):
    checkpoint = open_checkpoint(tiny_llama)
    built = skeleton.build_skeleton(checkpoint.folder, checkpoint.config, list(checkpoint.tensors))
    assert len(list(cache.glob("skeleton-*.json"))) == 1

    builds = []

    def no_model(folder, config):
        builds.append(config)
        raise RuntimeError("cannot build")

    monkeypatch.setattr(skeleton, "_meta_model", no_model)
    recalled = skeleton.build_skeleton(checkpoint.folder, checkpoint.config, list(checkpoint.tensors))
    assert not builds
    assert recalled.roles == built.roles and recalled.model_class == built.model_class
    packed = "model.layers.0.mlp.up_proj.weight_packed"
    assert recalled.runtime_name(packed) == packed
    # Other inputs are another question, asked afresh (here the build fails: no skeleton).
    changed = {**checkpoint.config, "num_hidden_layers": 1}
    assert skeleton.build_skeleton(checkpoint.folder, changed, list(checkpoint.tensors)) is None
    assert builds == [changed]


def test_a_damaged_or_disabled_cache_is_asked_afresh(cache, monkeypatch):
    memo.remember("question", {"x": 1}, {"answer": 42})
    assert memo.recall("question", {"x": 1}) == {"answer": 42}
    assert memo.recall("question", {"x": 2}) is None
    (entry,) = cache.glob("question-*.json")
    entry.write_text("{not json")
    assert memo.recall("question", {"x": 1}) is None
    monkeypatch.setenv("QCONVERT_CACHE", "off")
    memo.remember("question", {"x": 3}, {"answer": 1})
    assert memo.recall("question", {"x": 3}) is None


def test_a_clean_runtime_check_is_recalled_and_a_failing_one_never(tiny_llama, tmp_path, cache, monkeypatch):
    from qconvert.conversion import convert
    from qconvert.settings import Settings

    out = convert(tiny_llama, tmp_path / "out", Settings(bits=4, group_size=32)).output
    assert len(list(cache.glob("transformers-loads-*.json"))) == 1  # the publish check passed and was kept

    def must_not_run(path):
        raise AssertionError("transformers was asked again")

    monkeypatch.setattr(compatibility, "loading_problems", must_not_run)
    assert compatibility.publish_check(out, out, "compressed-tensors", None)["ok"] is True

    # A changed header is another question, and a problem found is not kept.
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    problem = compatibility.Problem("lm_head.weight", "missing: transformers would initialise it at random")
    monkeypatch.setattr(compatibility, "loading_problems", lambda path: [problem])
    with pytest.raises(Exception, match="would not load"):
        compatibility.publish_check(out, out, "compressed-tensors", None)
    assert len(list(cache.glob("transformers-loads-*.json"))) == 1
