"""Benchmark `qconvert model`: wall seconds, peak RSS and source MB/s.

Each conversion runs in a fresh child process, so its peak RSS (ru_maxrss) is its own; this parent
stays small (it never imports torch), because a forked child starts with its parent's RSS counted.

Usage:
    python scripts/bench_convert.py models/smollm2-135m [--bits 4 --group-size 64 ...]
    python scripts/bench_convert.py --synthetic 1.5 [qconvert options]   # a Llama-shaped bf16 model of ~1.5 GB
Extra options are passed to `qconvert model` unchanged.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def llama_shapes(target_gb: float) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a TinyLlama-like model (hidden 2048, 256-wide k/v) with ~target_gb of bf16."""
    hidden, inter, kv, vocab = 2048, 5632, 256, 32000
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    layers = max(1, round((target_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    return shapes


def make_synthetic(folder: Path, target_gb: float) -> Path:
    """Write a random bf16 checkpoint tensor by tensor, in a child process (see the module docstring)."""
    subprocess.run([sys.executable, __file__, "--write-synthetic", str(folder), str(target_gb)], check=True)
    return folder


def write_synthetic(folder: Path, target_gb: float) -> None:
    import torch

    from qconvert.io.dtypes import DTYPE_NAMES
    from qconvert.io.writing import SafetensorsStreamWriter, TensorSpec

    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(target_gb)
    specs = [TensorSpec(name, DTYPE_NAMES[torch.bfloat16], shape) for name, shape in shapes.items()]
    writer = SafetensorsStreamWriter(folder / "model.safetensors", specs, metadata_bytes=32)
    g = torch.Generator().manual_seed(0)
    for spec in specs:
        writer.write(spec.name, (torch.randn(spec.shape, generator=g) * 0.02).to(torch.bfloat16))
    writer.finish({"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))


def source_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_once(source: Path, output: Path, options: list[str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "qconvert.cli",
        "model",
        str(source),
        "-o",
        str(output),
        "--force",
        "--json",
        *options,
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if status:
            sys.exit(err.read())
        summary = json.loads(out.read())
    peak_kb = usage.ru_maxrss
    return {"seconds": seconds, "peak_rss_gb": peak_kb / 1e6, "summary": summary}


def main() -> None:
    if sys.argv[1:2] == ["--write-synthetic"]:
        return write_synthetic(Path(sys.argv[2]), float(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path)
    parser.add_argument("--synthetic", type=float, metavar="GB", help="generate a Llama-shaped bf16 model of this size")
    parser.add_argument("--repeat", type=int, default=1)
    args, options = parser.parse_known_args()
    scratch = Path(tempfile.mkdtemp(prefix="qconvert-bench-"))
    try:
        source = make_synthetic(scratch / "synthetic", args.synthetic) if args.synthetic else args.source
        size = source_bytes(source)
        print(f"source: {source} ({size / 1e9:.3f} GB); options: {' '.join(options) or '(defaults)'}")
        for _ in range(args.repeat):  # peak RSS is the maximum over the runs so far
            r = run_once(source, scratch / "out", options)
            s = r["summary"]
            print(
                f"{r['seconds']:.2f} s wall (process start included), {size / 1e6 / r['seconds']:.0f} MB/s of source, "
                f"peak RSS {r['peak_rss_gb']:.2f} GB; output {s['stored_bytes'] / 1e6:.1f} MB, "
                f"{s['quantized_bits_per_weight']} bits per quantized weight, layout {s['layout']}"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
