"""`qconvert eval --runtime llama.cpp`: score and time a model with llama.cpp's own tools.

The tools (`llama-perplexity`, `llama-bench`) come from `scripts/build_llama_cpp.sh`, which builds
them from the llama.cpp source that llama-cpp-python's sdist vendors. A GGUF file runs as it is; a
qconvert output is exported to GGUF first, and only if every quantized tensor maps onto a GGUF type
exactly (int4/int8 symmetric groups of 32 → Q4_0/Q8_0, asymmetric int4 groups of 32 → Q4_1, iq4nl,
mxfp4): otherwise llama.cpp would run a requantized copy, not this model. A float checkpoint is
converted by the vendored `convert_hf_to_gguf.py` in its own dtype.

llama-perplexity scores the second half of each `ctx`-token chunk (each token sees at least ctx/2 of
context), so its perplexity is lower than qconvert's, which scores every token of each window; the
two compare within a runtime, not across.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qconvert.errors import QConvertError, SourceError, UnsupportedModelError
from qconvert.evaluate.evaluation import EvalResult, EvalSettings
from qconvert.evaluate.runtime import is_qconvert_output

DEFAULT_TOOLS = Path("build/llama.cpp")
TOOLS = ("llama-perplexity", "llama-bench")


def find_tools(folder: Path | None) -> Path:
    """The folder holding bin/llama-perplexity and bin/llama-bench: `folder`, else $QCONVERT_LLAMA_CPP,
    else build/llama.cpp.

    Raises:
        QConvertError: the tools are not there.
    """
    folder = folder or Path(os.environ.get("QCONVERT_LLAMA_CPP", DEFAULT_TOOLS))
    missing = [tool for tool in TOOLS if not os.access(folder / "bin" / tool, os.X_OK)]
    if missing:
        raise QConvertError(
            f"llama.cpp's {', '.join(missing)} is not built in {folder}/bin; run `bash scripts/build_llama_cpp.sh "
            f"{folder}` (about 15 minutes on 2 cores) or pass --llama-cpp DIR."
        )
    return folder


def evaluate_llama_cpp(path: Path, text: str, settings: EvalSettings, tools: Path) -> EvalResult:
    """Perplexity (llama-perplexity) and speed (llama-bench) of the model at `path` run by llama.cpp.

    Raises:
        SourceError: `path` is missing, or a tool fails on it.
        UnsupportedModelError: a qconvert output would not export to GGUF exactly.
    """
    if not path.exists():
        raise SourceError(f"{path} does not exist.")
    if settings.prompt_tokens < 1 or settings.decode_tokens < 1:
        raise QConvertError("llama-bench needs at least one prompt token and one decoded token (--decode-tokens).")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qconvert-llama-cpp-") as scratch:
        scratch = Path(scratch)
        gguf, parameters = as_gguf(path, scratch, tools)
        text_file = scratch / "text.txt"
        text_file.write_text(text)
        chunks = (settings.max_tokens // settings.ctx) if settings.max_tokens else None
        perplexity, chunks_scored = llama_perplexity(tools, gguf, text_file, settings.ctx, chunks)
        prefill, decode = speed(tools, gguf, settings.prompt_tokens, settings.decode_tokens)
        size = gguf.stat().st_size
    return EvalResult(
        model=str(path),
        kind="gguf" if path.suffix == ".gguf" else "qconvert" if is_qconvert_output(path) else "checkpoint",
        perplexity=perplexity,
        windows=chunks_scored,
        tokens_scored=chunks_scored * (settings.ctx - settings.ctx // 2 - 1),  # perplexity.cpp's count per chunk
        parameters=parameters,
        bytes_on_disk=size,
        bits_per_weight=8 * size / parameters,
        weight_memory_bytes=size,
        peak_rss_bytes=None,  # the tools' own peak is not measured (a child's getrusage peak includes its parent's)
        prefill_tokens_per_s=prefill,
        decode_ms_per_token=decode,
        eval_seconds=time.perf_counter() - start,
        runtime="llama.cpp",
    )


def as_gguf(path: Path, scratch: Path, tools: Path) -> tuple[Path, int]:
    """(a GGUF file of the model, written in `scratch` unless it is one, and its parameter count).

    Raises:
        UnsupportedModelError: a qconvert output would not export to GGUF exactly.
    """
    import gguf

    if path.suffix == ".gguf":
        target = path
    elif is_qconvert_output(path):
        target = _export(path, scratch)
    else:
        target = _convert_float(path, scratch, tools)
    try:
        reader = gguf.GGUFReader(target)
    except (ValueError, OSError) as exc:
        raise SourceError(f"{target} is not a GGUF file gguf can read: {exc}") from exc
    return target, sum(int(t.n_elements) for t in reader.tensors)


def _export(output: Path, scratch: Path) -> Path:
    from qconvert.formats.export import export

    report = export(output, "gguf", scratch / "model.gguf")
    if report.requantized:
        raise UnsupportedModelError(
            f"{output} does not map onto GGUF exactly: {len(report.requantized)} tensors (e.g. "
            f"{report.requantized[0]}) would be requantized, so llama.cpp would run a different model; GGUF holds "
            "int4/int8 symmetric groups of 32, asymmetric int4 groups of 32, iq4nl and mxfp4 exactly."
        )
    return report.destination


def _convert_float(folder: Path, scratch: Path, tools: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} is neither a GGUF file, a qconvert output nor a checkpoint folder.")
    converters = sorted(tools.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not converters:
        raise QConvertError(f"{tools} has no llama.cpp source with convert_hf_to_gguf.py; rerun build_llama_cpp.sh.")
    target = scratch / "float.gguf"
    environment = {**os.environ, "PYTHONPATH": str(converters[-1].parent / "gguf-py")}
    _run([sys.executable, converters[-1], folder, "--outtype", "auto", "--outfile", target], env=environment)
    return target


def llama_perplexity(
    tools: Path, gguf: Path, text: Path, ctx: int, chunks: int | None, threads: int | None = None
) -> tuple[float, int]:
    """(perplexity, chunks scored) by llama-perplexity over `text` in chunks of `ctx` tokens.

    Raises:
        SourceError: the tool fails or prints no perplexity.
    """
    threads = threads or os.cpu_count()
    command = [tools / "bin" / "llama-perplexity", "-m", gguf, "-f", text, "-c", ctx, "-t", threads]
    output = _run([*command, *(["--chunks", chunks] if chunks else [])])
    found = re.search(r"Final estimate: PPL = ([\d.]+)", output)
    counted = re.search(r"calculating perplexity over (\d+) chunks", output)
    if not found or not counted:
        raise SourceError(f"llama-perplexity printed no perplexity for {gguf.name}: {output.strip()[-300:]}")
    return float(found.group(1)), int(counted.group(1))


def speed(
    tools: Path, gguf: Path, prompt: int, decode: int, threads: int | None = None, runs: int = 3
) -> tuple[float, float]:
    """(prefill tokens/s, decode ms/token): llama-bench's mean of `runs` runs of each.

    Raises:
        SourceError: the tool fails or prints no speeds.
    """
    threads = threads or os.cpu_count()
    command = [tools / "bin" / "llama-bench", "-m", gguf, "-p", prompt, "-n", decode, "-t", threads]
    output = _run([*command, "-r", runs, "-o", "json"], stdout_only=True)
    try:
        rows = json.loads(output)
        prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
        generated = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    except (ValueError, KeyError, TypeError, StopIteration) as exc:
        raise SourceError(f"llama-bench printed no prompt and generation speeds for {gguf.name}.") from exc
    return prefill, 1000 / generated


def _run(command: list, env: dict | None = None, stdout_only: bool = False) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env)
    if result.returncode:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SourceError(f"{Path(command[0]).name} failed (exit {result.returncode}): {detail[0]}")
    return result.stdout if stdout_only else result.stdout + result.stderr
