"""Run qconvert's GGUF exports with llama.cpp itself, next to llama.cpp's own llama-quantize output of
the same type: file size, perplexity (llama-perplexity) and tokens per second (llama-bench).

llama.cpp's tools come from scripts/build_llama_cpp.sh (built from the source llama-cpp-python vendors).
The float GGUF that llama-quantize starts from is made by that source's own convert_hf_to_gguf.py.
qconvert's files are made with `qconvert model --format gguf` on grids that map exactly onto the GGUF
type (e.g. Q4_0 = symmetric int4 groups of 32 with float16 scales, embeddings Q8_0 as llama-quantize
does for a tied head), so any perplexity difference comes from how the codes were chosen.

Usage:
    bash scripts/build_llama_cpp.sh build/llama.cpp
    python scripts/bench_llama_cpp.py models/smollm2-135m --text ../shared/data/eval.txt \\
        --llama-cpp build/llama.cpp --calib ../shared/data/calib.txt
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qconvert.errors import QConvertError
from qconvert.evaluate.llama_cpp import llama_perplexity, speed

# GGUF type -> the qconvert grid that maps onto it exactly (blocks of 32, float16 scales)
GRIDS = {
    "Q4_0": ["--bits", "4", "--group-size", "32", "--symmetric"],
    "Q4_1": ["--bits", "4", "--group-size", "32", "--asymmetric"],
    "Q8_0": ["--bits", "8", "--group-size", "32", "--symmetric"],
}
EMBEDDINGS_Q8_0 = '[[rules]]\nmatch = "embed_tokens"\nquantizer = "rtn"\nbits = 8\ngroup_size = 32\nsymmetric = true\n'


def run(command: list, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{result.stderr[-3000:]}")
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument(
        "--llama-cpp", type=Path, default=Path("build/llama.cpp"), help="where build_llama_cpp.sh built"
    )
    parser.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0"], choices=sorted(GRIDS))
    parser.add_argument("--quantizers", nargs="+", default=["rtn", "clip"], help="qconvert quantizers to export with")
    parser.add_argument("--calib", type=Path, help="calibration text, for gptq/awq among --quantizers")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens for gptq/awq")
    parser.add_argument("--chunks", type=int, default=40, help="512-token chunks llama-perplexity scores")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--keep", type=Path, help="keep the GGUF files in this folder")
    args = parser.parse_args()
    tools = args.llama_cpp.resolve()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="qconvert-llama-cpp-"))
    scratch.mkdir(parents=True, exist_ok=True)
    recipe = scratch / "embeddings-q8_0.toml"
    recipe.write_text(EMBEDDINGS_Q8_0)

    converter = next(tools.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    float_gguf = scratch / "float-f16.gguf"
    if not float_gguf.exists():
        environment = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
        run([sys.executable, converter, args.source, "--outtype", "f16", "--outfile", float_gguf], env=environment)
    rows = [("float F16 (convert_hf_to_gguf)", float_gguf, None)]
    for gguf_type in args.types:
        reference = scratch / f"llama-quantize-{gguf_type}.gguf"
        _, seconds = run([tools / "bin" / "llama-quantize", float_gguf, reference, gguf_type, args.threads])
        rows.append((f"llama-quantize {gguf_type}", reference, seconds))
        for quantizer in args.quantizers:
            ours = scratch / f"qconvert-{quantizer}-{gguf_type}.gguf"
            calibration = (
                ["--calib", args.calib, "--calib-samples", args.calib_samples] if quantizer in ("gptq", "awq") else []
            )
            _, seconds = run(
                [
                    sys.executable,
                    "-m",
                    "qconvert.cli",
                    "model",
                    args.source,
                    "-o",
                    ours,
                    "--force",
                    "--format",
                    "gguf",
                    "-q",
                    quantizer,
                    *GRIDS[gguf_type],
                    "--recipe",
                    recipe,
                    *calibration,
                ]
            )
            rows.append((f"qconvert {quantizer} → {gguf_type}", ours, seconds))
    print(
        f"llama.cpp tools: {tools}; perplexity over {args.chunks} chunks of 512 tokens of {args.text.name}, "
        f"{args.threads} threads\n"
    )
    print("| file | MB | perplexity (llama-perplexity) | prompt tok/s | generate tok/s | convert s |")
    print("|---|---|---|---|---|---|")
    for label, path, seconds in rows:
        try:
            ppl, _ = llama_perplexity(tools, path, args.text, 512, args.chunks, args.threads)
            prompt, decode_ms = speed(tools, path, 512, 128, args.threads, runs=2)
        except QConvertError as exc:
            sys.exit(str(exc))
        generated = 1000 / decode_ms
        took = f"{seconds:.1f}" if seconds is not None else ""
        print(
            f"| {label} | {path.stat().st_size / 1e6:.1f} | {ppl:.3f} | {prompt:.0f} | {generated:.1f} | {took} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
