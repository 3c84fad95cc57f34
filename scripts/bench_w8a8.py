"""Prefill and decode speed of W8A8 against float, side by side in one process on the same prompt.

Rows: the float checkpoint in transformers (float32), then each W8A8 output (`--activations ...`) in
qconvert's packed runtime (int8 x int8 -> int32 with torch._int_mm for the int schemes) and in
transformers' own compressed-tensors runtime (which quantizes the inputs, then multiplies in float).
Each figure is the median (and min) of --repeats timed runs after one warm-up.

Usage:
    python scripts/bench_w8a8.py models/smollm2-135m OUT_W8A8 [OUT_W8A8 ...] --prompt 512 --repeats 5
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from qconvert.evaluate.runtime import build_quantized_model


def timed(function, repeats: int) -> tuple[float, float]:
    """(median, min) seconds of `repeats` calls after a warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


@torch.no_grad()
def measure(model, prompt: torch.Tensor, decode: int, repeats: int) -> dict:
    def prefill():
        return model(prompt, use_cache=True)

    def generate():
        out = prefill()
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(decode):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    prefill_median, prefill_min = timed(prefill, repeats)
    total_median, _ = timed(generate, max(1, repeats // 2))
    return {
        "prefill tok/s (median)": prompt.shape[1] / prefill_median,
        "prefill tok/s (best)": prompt.shape[1] / prefill_min,
        "decode ms/token": 1000 * max(total_median - prefill_median, 0.0) / decode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_model", type=Path)
    parser.add_argument("outputs", type=Path, nargs="+")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens for prefill")
    parser.add_argument("--decode", type=int, default=16, help="tokens decoded after the prompt")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import transformers

    torch.manual_seed(0)
    prompt = torch.randint(100, 40000, (1, args.prompt))
    rows = [
        (
            "float32, transformers",
            transformers.AutoModelForCausalLM.from_pretrained(args.float_model, dtype=torch.float32),
        )
    ]
    for output in args.outputs:
        rows.append((f"{output.name}, qconvert runtime", build_quantized_model(output)))
        rows.append(
            (
                f"{output.name}, transformers",
                transformers.AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32),
            )
        )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"prompt {args.prompt} tokens, {args.repeats} runs"
    )
    print(f"{'model, runtime':<48} {'prefill tok/s (median)':>24} {'(best)':>8} {'decode ms/token':>16}")
    for label, model in rows:
        result = measure(model.eval(), prompt, args.decode, args.repeats)
        speeds = f"{result['prefill tok/s (median)']:>24.0f} {result['prefill tok/s (best)']:>8.0f}"
        print(f"{label:<48} {speeds} {result['decode ms/token']:>16.1f}")
        sys.stdout.flush()
        del model


if __name__ == "__main__":
    main()
