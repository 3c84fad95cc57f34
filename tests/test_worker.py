"""`qconvert.worker`: a batch or sweep job as JSON, run in its own process, reported like the command line."""

import json

from qconvert.conversion import convert
from qconvert.plan.recipes import load_recipe
from qconvert.settings import build_settings
from qconvert.worker import run_in_process


def test_a_convert_job_writes_what_convert_writes(tmp_path, tiny_llama):
    (tmp_path / "r.toml").write_text('[defaults]\nbits = 3\n\n[[rules]]\nmatch = "down_proj"\nbits = 8\n')
    job = {
        "task": "convert",
        "source": str(tiny_llama),
        "output": str(tmp_path / "job"),
        "recipe": str(tmp_path / "r.toml"),
        "options": {"group_size": 32, "symmetric": True, "max_shard_size": "1GB"},
        "calibration": {},
        "command": ["qconvert", "batch", "jobs.toml"],
    }
    code, stdout, stderr, peak = run_in_process(job)
    assert code == 0, stderr
    reported = json.loads(stdout)
    assert reported["output"] == job["output"] and reported["peak_rss_bytes"] > 0 and peak > 0
    recipe = load_recipe(tmp_path / "r.toml")
    settings = build_settings(recipe, {"group_size": 32, "symmetric": True, "max_shard_size": 10**9}, {})
    here = convert(tiny_llama, tmp_path / "here", settings)
    assert _same_tensors(tmp_path / "job", here.output)  # the files differ only in the manifest's command
    manifest = json.loads((tmp_path / "job" / "qconvert.json").read_text())
    assert manifest["command"] == ["qconvert", "batch", "jobs.toml"] and reported["totals"] == manifest["totals"]


def _same_tensors(a, b):
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def test_a_failing_job_gives_the_command_lines_sentence_and_exit_code(tmp_path):
    code, stdout, stderr, _ = run_in_process({"task": "convert", "source": str(tmp_path / "none"), "output": "x"})
    assert code == 2 and stdout == "" and "does not exist" in stderr and "Traceback" not in stderr
    code, _, stderr, _ = run_in_process({"task": "train"})
    assert code == 2 and "unknown worker task 'train'" in stderr


def test_an_evaluate_job_scores_the_model(tmp_path, tiny_lm):
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    job = {
        "task": "evaluate",
        "model": str(tiny_lm),
        "text": str(tmp_path / "t.txt"),
        "tokenizer": str(tiny_lm),
        "settings": {"ctx": 64, "max_tokens": 128, "decode_tokens": 2, "prompt_tokens": 8},
    }
    code, stdout, stderr, _ = run_in_process(job)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["perplexity"] > 1 and result["tokens_scored"] > 0
