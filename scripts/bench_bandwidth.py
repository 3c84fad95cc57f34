"""Decode speed per setting against this machine's memory-bandwidth floor, in qconvert's runtime and llama.cpp's.

Decoding one token reads every weight once, so its floor is (bytes of weights read per token) ÷
(memory read bandwidth). The bandwidth is measured by summing a tensor much larger than the caches
(torch's vectorized reduction, all its threads): the median of several runs, with their spread.
Each model is then timed in its own process, as `qconvert eval` times it (`evaluation.speed`: a
prompt, then greedy tokens with the KV cache, after a warm-up run that also compiles any fused
kernel): the median of several runs of prefill tokens/s and decode ms/token, the fraction of the
floor reached (floor ÷ measured; 1.0 would be perfect), the weights held in memory against the
file's size, the peak memory the process added while loading and running the model, and the kernels
its linears run on. With --llama-cpp, every model that runs in llama.cpp exactly (a GGUF file, a
float checkpoint, or a qconvert output whose GGUF export is exact) is timed by llama-bench too, with
the same prompt and token counts.

Usage:
    python scripts/bench_bandwidth.py MODEL [MODEL ...] [--runs 5] [--prompt 128] [--decode 32]
        [--llama-cpp build/llama.cpp] [--plot docs/speed.png] [--json rows.json]
MODEL is a float checkpoint folder, a qconvert output or a .gguf file, as `qconvert eval` takes;
MODEL=LABEL names its row.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


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


def memory_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc: unlike getrusage's peak, which a child
    inherits from the parent it was forked from, VmHWM starts afresh in each program."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure_one(path: Path, runs: int, prompt_tokens: int, decode: int) -> dict:
    """One model in this process: its row of the table (see the module docstring)."""
    from qconvert.evaluate import kernels
    from qconvert.evaluate.evaluation import bytes_read_per_token, kernel_counts, size_on_disk, speed, weight_memory
    from qconvert.evaluate.runtime import load_for_eval

    before, compiling = memory_bytes("VmRSS"), kernels.Compiled.seconds
    loaded = load_for_eval(path)  # builds the C kernels, if this machine has not yet
    model = loaded.model
    prompt = torch.arange(1000, 1000 + prompt_tokens)
    with torch.no_grad():
        speed(model, prompt, 1)  # warm-up: compiles fused kernels, if any
    compile_seconds = kernels.Compiled.seconds - compiling
    timings = [speed(model, prompt, decode) for _ in range(runs)]
    _, on_disk = size_on_disk(path, loaded)
    return {
        "read_bytes": bytes_read_per_token(model),
        "weight_bytes": weight_memory(model),
        "file_bytes": on_disk,
        "peak_added_bytes": memory_bytes("VmHWM") - before,
        "prefill_tokens_per_s": statistics.median(t[0] for t in timings),
        "decode_ms": statistics.median(t[1] for t in timings),
        "decode_ms_spread": [min(t[1] for t in timings), max(t[1] for t in timings)],
        "kernels": kernel_counts(model),
        "compile_seconds": compile_seconds,
    }


def llama_cpp_decode(path: Path, tools: Path, prompt_tokens: int, decode: int) -> float | None:
    """llama-bench's decode ms/token for the model, or None when llama.cpp would not run it exactly."""
    from qconvert.errors import UnsupportedModelError
    from qconvert.evaluate import llama_cpp

    with tempfile.TemporaryDirectory() as scratch:
        try:
            gguf, _ = llama_cpp.as_gguf(path, Path(scratch), tools)
        except UnsupportedModelError:
            return None
        return llama_cpp.speed(tools, gguf, prompt_tokens, decode)[1]


def plot(rows: list[dict], path: Path, bandwidth: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.8), dpi=120)
    positions = range(len(rows))
    ax.barh([p - 0.2 for p in positions], [r["decode_ms"] for r in rows], height=0.4, label="qconvert eval")
    llama = [(p, r["llama_cpp_decode_ms"]) for p, r in zip(positions, rows) if r.get("llama_cpp_decode_ms")]
    if llama:
        ax.barh([p + 0.2 for p, _ in llama], [v for _, v in llama], height=0.4, color="tab:orange", label="llama.cpp")
    ax.scatter(
        [r["floor_ms"] for r in rows], list(positions), marker="|", s=200, color="black", zorder=3,
        label=f"floor: weight bytes ÷ {bandwidth / 1e9:.0f} GB/s",
    )  # fmt: skip
    for p, r in zip(positions, rows):
        ax.text(r["decode_ms"], p - 0.2, f" {r['decode_ms']:.1f}", va="center", fontsize=7)
    ax.set_yticks(list(positions), [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("decode ms/token (128-token prompt, then greedy tokens; lower is faster)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="MODEL or MODEL=LABEL")
    parser.add_argument("--gib", type=float, default=1.0, help="size of the tensor read to measure bandwidth")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (qconvert eval's default)")
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded per run (qconvert eval's default)")
    parser.add_argument("--llama-cpp", type=Path, help="where scripts/build_llama_cpp.sh built llama.cpp")
    parser.add_argument("--plot", type=Path, help="write the bar chart here")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--title", default="decode speed per setting", help="the chart's title")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.runs, args.prompt, args.decode)))
        return
    if not args.models:
        parser.error("name at least one MODEL")

    rates = read_bandwidth(args.gib, max(args.runs, 5))
    bandwidth = statistics.median(rates)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads: read bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"(median; min {rates[0] / 1e9:.1f}, max {rates[-1] / 1e9:.1f}); {args.prompt}-token prompt, "
        f"{args.decode} tokens, median of {args.runs} runs\n"
    )
    print(
        "| setting | MB read/token | floor ms | decode ms/token | of floor | llama.cpp ms/token | prefill tok/s "
        "| weights MB / file MB | peak added MB | kernels | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for spec in args.models:
        path, _, label = spec.partition("=")
        path = Path(path)
        command = [sys.executable, __file__, "--one", str(path), "--runs", str(args.runs)]
        command += ["--prompt", str(args.prompt), "--decode", str(args.decode)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
            print(f"| {label or path.name} | failed: {reason} |")
            continue
        row = {"label": label or path.name, "model": str(path), **json.loads(result.stdout.splitlines()[-1])}
        row["floor_ms"] = 1000 * row["read_bytes"] / bandwidth
        if args.llama_cpp:
            row["llama_cpp_decode_ms"] = llama_cpp_decode(path, args.llama_cpp, args.prompt, args.decode)
        rows.append(row)
        llama = f"{row['llama_cpp_decode_ms']:.1f}" if row.get("llama_cpp_decode_ms") else ""
        kernels = ", ".join(f"{n} {k}" for k, n in sorted(row["kernels"].items())) or "float"
        print(
            f"| {row['label']} | {row['read_bytes'] / 1e6:.1f} | {row['floor_ms']:.1f} | {row['decode_ms']:.1f} "
            f"| {row['floor_ms'] / row['decode_ms']:.2f} | {llama} | {row['prefill_tokens_per_s']:.0f} "
            f"| {row['weight_bytes'] / 1e6:.0f} / {row['file_bytes'] / 1e6:.0f} | {row['peak_added_bytes'] / 1e6:.0f} "
            f"| {kernels} | {row['compile_seconds']:.1f} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1))
    if args.plot and rows:
        plot(rows, args.plot, bandwidth, args.title)


if __name__ == "__main__":
    main()
