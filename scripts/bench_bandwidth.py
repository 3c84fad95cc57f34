"""This machine's memory bandwidth, and how close each model's decoding comes to the floor it implies.

Decoding one token reads every weight once, so its floor is (bytes of weights read per token) ÷
(memory read bandwidth). The bandwidth is measured by summing a tensor much larger than the caches
(torch's vectorized reduction, all its threads): the median of several runs, with their spread.
Each model then decodes in qconvert's runtime (`qconvert eval`'s loader: packed layers stay
packed), and the script prints its bytes read per token, the floor, the measured ms/token (median
of several runs) and the fraction of the floor reached (floor ÷ measured: 1.0 would be perfect).

Usage:
    python scripts/bench_bandwidth.py MODEL [MODEL ...] [--gib 1] [--runs 5] [--decode 32]
MODEL is a float checkpoint folder, a qconvert output or a .gguf file, as `qconvert eval` takes.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from qconvert.evaluate.evaluation import bytes_read_per_token, load_for_eval


def read_bandwidth(gib: float, runs: int) -> list[float]:
    """Bytes per second that summing a `gib` GiB float32 tensor reads, each of `runs` runs after a warm-up,
    sorted (this VM's figure moves between calls: the floor uses the median, the spread is printed)."""
    data = torch.ones(int(gib * 2**30) // 4)
    data.sum()
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        data.sum()
        rates.append(data.numel() * 4 / (time.perf_counter() - start))
    return sorted(rates)


@torch.no_grad()
def decode_ms(model, decode: int, runs: int) -> float:
    """Median ms per greedy token after a 16-token prompt, with the KV cache."""
    prompt = torch.arange(100, 116).view(1, -1)

    def generate() -> float:
        out = model(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / decode

    generate()
    return 1000 * statistics.median(generate() for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--gib", type=float, default=1.0, help="size of the tensor read to measure bandwidth")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded per run")
    args = parser.parse_args()

    rates = read_bandwidth(args.gib, max(args.runs, 5))
    bandwidth = statistics.median(rates)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads: read bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"(median; min {rates[0] / 1e9:.1f}, max {rates[-1] / 1e9:.1f})"
    )
    print(f"{'model':<40} {'MB read/token':>14} {'floor ms':>9} {'measured ms':>12} {'of floor':>9}")
    for path in args.models:
        model = load_for_eval(path).model
        read = bytes_read_per_token(model)
        floor, measured = 1000 * read / bandwidth, decode_ms(model, args.decode, args.runs)
        print(f"{path.name:<40} {read / 1e6:>14.1f} {floor:>9.1f} {measured:>12.1f} {floor / measured:>9.2f}")
        del model


if __name__ == "__main__":
    main()
