"""Benchmark quantizers for quality, time and memory: convert with each, then score each output.

Every conversion and every evaluation runs in its own fresh process, so wall seconds and peak RSS
are that process's own (see bench_convert.py). Perplexity uses `qconvert eval` with the same
windows for every row, the float model included.

Usage:
    python scripts/bench_quality.py models/smollm2-135m --text ../shared/data/eval.txt \\
        --calib ../shared/data/calib.txt --setting "rtn --bits 4 --group-size 64 --symmetric" \\
        --setting "gptq --bits 4 --group-size 64 --symmetric" ...
Each --setting is a quantizer name followed by `qconvert model` options; --calib is added for
calibrated quantizers. The llm-compressor figure printed beside them is the one measured on this
machine kind and quoted in issue 4 (it is not re-run here: llm-compressor is not installed).
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import run_once  # noqa: E402

CALIBRATED = {"gptq", "awq"}
PEER = "llm-compressor 0.14 GPTQ int4 g64 sym, 128x512 calib: ppl 21.62, 282 s and 1.05 GB peak RSS for the process"


def evaluate(model: Path, text: Path, tokenizer: Path, max_tokens: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "qconvert.cli",
        "eval",
        str(model),
        "--text",
        str(text),
        "--tokenizer",
        str(tokenizer),
        "--max-tokens",
        str(max_tokens),
        "--decode-tokens",
        "4",
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--setting", action="append", required=True)
    parser.add_argument("--max-tokens", type=int, default=20480)
    parser.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    parser.add_argument(
        "--float-ppl", type=float, help="the float model's perplexity, if already measured (skips its evaluation)"
    )
    args = parser.parse_args()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="qconvert-quality-"))
    scratch.mkdir(parents=True, exist_ok=True)
    base = (
        {
            "perplexity": args.float_ppl,
            "bytes_on_disk": sum(f.stat().st_size for f in args.source.glob("*.safetensors")),
        }
        if args.float_ppl
        else evaluate(args.source, args.text, args.source, args.max_tokens)
    )
    print(
        "| setting | ppl | change vs float | bits/weight (quantized tensors) | file MB | convert s | convert "
        "peak RSS GB |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| float | {base['perplexity']:.3f} | | 16 | {base['bytes_on_disk'] / 1e6:.1f} | | |", flush=True)
    for setting in args.setting:
        quantizer, *options = shlex.split(setting)
        if quantizer in CALIBRATED:
            options += ["--calib", str(args.calib)]
        out = scratch / setting.replace(" ", "_").replace("-", "")
        run = run_once(args.source, out, ["-q", quantizer, *options])
        result = evaluate(out, args.text, args.source, args.max_tokens)
        change = 100 * (result["perplexity"] / base["perplexity"] - 1)
        print(
            f"| {setting} | {result['perplexity']:.3f} | {change:+.1f}% | "
            f"{run['summary']['quantized_bits_per_weight']} | "
            f"{result['bytes_on_disk'] / 1e6:.1f} | {run['seconds']:.1f} | {run['peak_rss_gb']:.2f} |",
            flush=True,
        )
    print(f"\npeer (quoted, not re-run): {PEER}")


if __name__ == "__main__":
    main()
