"""`qconvert eval --runtime llama.cpp`: the GGUF handed to llama.cpp's tools, what is read back from
them, and the refusals. Stand-in tools record their arguments; with llama.cpp built
(scripts/build_llama_cpp.sh, $QCONVERT_LLAMA_CPP or build/llama.cpp) the last test runs the real ones."""

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qconvert.cli import app

runner = CliRunner()
TEXT = "Quantization maps floating point weights to a few bits. " * 60
PERPLEXITY = """calculating perplexity over 3 chunks, n_ctx=64
[1]12.5,[2]13.0,[3]13.25,
Final estimate: PPL = 13.2500 +/- 0.5
"""
BENCH = [
    {"n_prompt": 16, "n_gen": 0, "avg_ts": 400.0},
    {"n_prompt": 0, "n_gen": 4, "avg_ts": 125.0},
]


@pytest.fixture
def fake_tools(tmp_path):
    """llama-perplexity and llama-bench stand-ins that check their model is a GGUF file and log their arguments."""
    tools = tmp_path / "llama.cpp"
    (tools / "bin").mkdir(parents=True)
    for name, output in (("llama-perplexity", PERPLEXITY), ("llama-bench", json.dumps(BENCH))):
        script = tools / "bin" / name
        script.write_text(
            "#!/bin/sh\n"
            f'echo "$@" >> {tools}/calls.log\n'
            'head -c 4 "$2" | grep -q GGUF || { echo "not a GGUF file" >&2; exit 1; }\n'
            f"cat <<'EOF'\n{output}\nEOF\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return tools


def eval_args(model, text_file, tools, *extra):
    common = ["--text", str(text_file), "--ctx", "64", "--max-tokens", "192", "--decode-tokens", "4"]
    return ["eval", str(model), *common, "--runtime", "llama.cpp", "--llama-cpp", str(tools), "--json", *extra]


def convert(tiny_lm, out, *flags):
    result = runner.invoke(app, ["model", str(tiny_lm), "-o", str(out), *flags])
    assert result.exit_code == 0, result.output
    return out


def test_llama_cpp_runs_the_exact_gguf_export(tiny_lm, tmp_path, fake_tools):
    out = convert(tiny_lm, tmp_path / "q4_0", "--bits", "4", "--group-size", "32", "--symmetric")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = runner.invoke(app, eval_args(out, text, fake_tools))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["runtime"] == "llama.cpp" and summary["kind"] == "qconvert"
    assert summary["perplexity"] == 13.25 and summary["windows"] == 3 and summary["tokens_scored"] == 3 * 31
    assert summary["prefill_tokens_per_s"] == 400.0 and summary["decode_ms_per_token"] == pytest.approx(8.0)
    calls = (fake_tools / "calls.log").read_text().splitlines()
    assert "-c 64" in calls[0] and "--chunks 3" in calls[0] and "-p 128 -n 4" in calls[1]


def test_a_model_gguf_would_requantize_is_refused(tiny_lm, tmp_path, fake_tools):
    out = convert(tiny_lm, tmp_path / "int3", "--bits", "3", "--group-size", "64")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = runner.invoke(app, eval_args(out, text, fake_tools))
    assert result.exit_code != 0 and "does not map onto GGUF exactly" in result.output
    assert "Traceback" not in result.output and not (fake_tools / "calls.log").exists()


def test_missing_tools_and_a_baseline_are_refused_in_one_sentence(tiny_lm, tmp_path, fake_tools):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    unreadable = runner.invoke(app, eval_args(fake, text, fake_tools))
    assert unreadable.exit_code != 0 and "is not a GGUF file" in unreadable.output
    nothing = runner.invoke(app, [*eval_args(tiny_lm, text, fake_tools), "--decode-tokens", "0"])
    assert nothing.exit_code != 0 and "one decoded token" in nothing.output
    missing = runner.invoke(app, eval_args(tiny_lm, text, tmp_path / "nowhere"))
    assert missing.exit_code != 0 and "scripts/build_llama_cpp.sh" in missing.output
    baseline = runner.invoke(app, eval_args(tiny_lm, text, tmp_path / "nowhere", "--baseline", str(tiny_lm)))
    assert baseline.exit_code != 0 and "--runtime qconvert only" in baseline.output


BUILT = Path(os.environ.get("QCONVERT_LLAMA_CPP", Path(__file__).parents[2] / "build" / "llama.cpp"))


@pytest.mark.skipif(not (BUILT / "bin" / "llama-bench").exists(), reason="llama.cpp is not built here")
def test_real_llama_cpp_scores_the_export_like_the_float_model(tiny_lm, tmp_path):
    out = convert(tiny_lm, tmp_path / "q8_0", "--bits", "8", "--group-size", "32", "--symmetric")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    results = {}
    for name, model in (("float", tiny_lm), ("q8_0", out)):
        result = runner.invoke(app, eval_args(model, text, BUILT))
        assert result.exit_code == 0, result.output
        results[name] = json.loads(result.stdout)
    assert results["q8_0"]["perplexity"] == pytest.approx(results["float"]["perplexity"], rel=0.02)
    assert results["q8_0"]["bytes_on_disk"] < results["float"]["bytes_on_disk"]
