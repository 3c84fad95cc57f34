"""qconvert against llama.cpp's llama-quantize, side by side in one run: wall seconds, CPU seconds and
peak RSS of the whole process, min and median of several runs, and the ratios.

Both make the same grid from the same weights: llama-quantize Q4_0 from a bf16 GGUF, and
`qconvert model --bits 4 --group-size 32 --symmetric` (Q4_0's grid: int4, groups of 32, one float16
scale) from the Hugging Face checkpoint, with its manifest, checksums and runtime check included.
For context it also times the path users take with llama.cpp from a Hugging Face checkpoint:
convert_hf_to_gguf.py (to bf16) and then llama-quantize.

Models: SmolLM2-135M (models/smollm2-135m) and a random Llama of ~730M parameters in bf16 (hidden
2048, 12 layers, SmolLM2's tokenizer so that convert_hf_to_gguf.py accepts it), written by this script.

qconvert keeps transformers' answers about a model between runs (`qconvert/io/memo.py`); its first
run with an empty cache is reported on its own line, and the timed runs are the ones after it.

`--neighbours N` starts N busy processes (one spinning Python loop each) for the whole measurement,
as on a shared CI runner.

Usage:
    python scripts/compare.py [--runs 3] [--neighbours 2] [--llama-cpp build/llama.cpp] [--calib TEXT]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "models" / "smollm2-135m"


def run(command: list, env: dict | None = None, output: Path | None = None) -> dict:
    """Run `command` as a child; its own wall seconds, CPU seconds (user + system) and peak RSS.
    `output` is removed first, outside the timing: both tools are timed writing a new output."""
    if output is not None:
        shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        if status:
            err.seek(0)
            sys.exit(f"{' '.join(map(str, command))} failed:\n{err.read().decode()[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_gb": usage.ru_maxrss / 1e6}


def make_llama(folder: Path, layers: int = 12) -> Path:
    """A random bf16 Llama (hidden 2048, 32 heads, 4 key/value heads, MLP 5632) with SmolLM2's tokenizer."""
    if (folder / "model.safetensors").is_file():
        return folder
    subprocess.run([sys.executable, __file__, "--write-llama", str(folder), str(layers)], check=True)
    return folder


def write_llama(folder: Path, layers: int) -> None:
    import torch

    from qconvert.io.dtypes import DTYPE_NAMES
    from qconvert.io.writing import SafetensorsStreamWriter, TensorSpec

    hidden, inter, kv, vocab = 2048, 5632, 256, 49152
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    folder.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(name, DTYPE_NAMES[torch.bfloat16], shape) for name, shape in shapes.items()]
    writer = SafetensorsStreamWriter(folder / "model.safetensors", specs, metadata_bytes=32)
    generator = torch.Generator().manual_seed(0)
    for spec in specs:
        tensor = torch.ones(spec.shape) if len(spec.shape) == 1 else torch.randn(spec.shape, generator=generator) * 0.02
        writer.write(spec.name, tensor.to(torch.bfloat16))
    writer.finish({"format": "pt"})
    config = json.loads((SMOLLM2 / "config.json").read_text())
    config.pop("_model_name_or_path", None)
    config |= dict(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=32,
        num_key_value_heads=kv // 64,
        head_dim=64,
        num_hidden_layers=layers,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOLLM2 / name, folder / name)


def summary(runs: list[dict]) -> dict:
    return {k: (min(r[k] for r in runs), statistics.median(r[k] for r in runs)) for k in ("wall", "cpu", "rss_gb")}


def line(label: str, s: dict) -> str:
    wall, cpu, rss = s["wall"], s["cpu"], s["rss_gb"]
    return (
        f"  {label:<44} wall {wall[0]:6.2f} / {wall[1]:6.2f} s   cpu {cpu[0]:6.2f} / {cpu[1]:6.2f} s"
        f"   peak RSS {rss[0]:.2f} / {rss[1]:.2f} GB"
    )


def predicted_seconds(source: Path, options: list, env: dict) -> tuple[float, float]:
    """`qconvert plan --json`'s predicted seconds for this conversion and the tolerance it states."""
    command = [sys.executable, "-m", "qconvert.cli", "plan", str(source), *map(str, options), "--json"]
    plan = json.loads(subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout)
    return plan["prediction"]["seconds"], plan["prediction"]["seconds_tolerance"]


def prediction_line(predicted: tuple[float, float], measured: float) -> str:
    seconds, tolerance = predicted
    within = abs(measured - seconds) <= tolerance * seconds
    return (
        f"  qconvert plan predicted {seconds:.1f} s (± {tolerance:.0%}), measured {measured:.2f} s: "
        f"{'within' if within else 'OUTSIDE'} (off by {measured / seconds - 1:+.0%})"
    )


def calibrated(scratch: Path, calib: Path, runs: int) -> dict:
    """gptq and awq at llm-compressor's setting (int4 g64 symmetric, 128 x 512 tokens of `calib`) on SmolLM2."""
    figures = {}
    for quantizer in ("gptq", "awq"):
        options = ["-q", quantizer, "--bits", "4", "--group-size", "64", "--symmetric", "--calib", calib]
        env = {**os.environ, "QCONVERT_CACHE": str(scratch / "calibrated-memo")}
        predicted = predicted_seconds(SMOLLM2, options, env)
        out = scratch / f"smollm2-{quantizer}"
        command = [sys.executable, "-m", "qconvert.cli", "model", SMOLLM2, "-o", out, "--force", "--json", *options]
        s = summary([run(command, env, out) for _ in range(runs)])
        print(line(f"qconvert {quantizer} int4 g64 sym, 128 x 512 (min / median)", s))
        print(prediction_line(predicted, s["wall"][1]))
        figures[quantizer] = {**s, "predicted_seconds": predicted[0]}
    return figures


def compare(name: str, source: Path, tools: Path, scratch: Path, runs: int) -> dict:
    converter = tools.parent / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    gguf_bf16, gguf_q4 = scratch / f"{name}-bf16.gguf", scratch / f"{name}-q4_0.gguf"
    to_gguf = [sys.executable, converter, source, "--outtype", "bf16", "--outfile", gguf_bf16]
    quantize = [tools / "llama-quantize", gguf_bf16, gguf_q4, "Q4_0", str(os.cpu_count())]
    out = scratch / f"{name}-qconvert"
    options = ["--bits", "4", "--group-size", "32", "--symmetric"]
    ours = [sys.executable, "-m", "qconvert.cli", "model", source, "-o", out, "--force", "--json", *options]
    cache = scratch / f"{name}-memo"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "QCONVERT_CACHE": str(cache)}
    print(f"{name} ({source}, {sum(f.stat().st_size for f in source.glob('*.safetensors')) / 1e9:.2f} GB):")
    convert = summary([run(to_gguf)])
    first = summary([run(ours, env, out)])  # fills the empty cache
    results = {"llama-quantize": [], "qconvert": []}
    for _ in range(runs):  # interleaved, so both see the same machine
        results["llama-quantize"].append(run(quantize, output=gguf_q4))
        results["qconvert"].append(run(ours, env, out))
    q, theirs = summary(results["qconvert"]), summary(results["llama-quantize"])
    print(line("convert_hf_to_gguf.py (bf16), once", convert))
    print(line("llama-quantize Q4_0 (min / median)", theirs))
    print(line("qconvert int4 g32 sym (min / median)", q))
    print(line("qconvert, first run with an empty cache", first))
    path = {k: (convert[k][0] + theirs[k][1], None) for k in ("wall", "cpu")}
    print(f"  llama.cpp from the HF checkpoint (convert + quantize): {path['wall'][0]:.2f} s wall")
    print(prediction_line(predicted_seconds(source, options, env), q["wall"][1]))
    ratios = {k: q[k][1] / theirs[k][1] for k in ("wall", "cpu", "rss_gb")}
    print(
        f"  qconvert / llama-quantize (medians): wall {ratios['wall']:.2f}x, cpu {ratios['cpu']:.2f}x, "
        f"peak RSS {ratios['rss_gb']:.2f}x"
    )
    return {"qconvert": q, "llama-quantize": theirs, "first": first, "convert_hf_to_gguf": convert, "ratios": ratios}


def main() -> None:
    if sys.argv[1:2] == ["--write-llama"]:
        return write_llama(Path(sys.argv[2]), int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--neighbours", type=int, default=0, help="busy processes to run beside the measurement")
    parser.add_argument("--llama-cpp", type=Path, default=REPO / "build" / "llama.cpp")
    parser.add_argument("--scratch", type=Path, help="keep the models and outputs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--calib", type=Path, help="also time gptq and awq on SmolLM2 with 128 x 512 tokens of this text (minutes)"
    )
    parser.add_argument("--calibrated-runs", type=int, default=1, help="runs of each calibrated conversion")
    args = parser.parse_args()
    subprocess.run(["bash", str(REPO / "scripts" / "build_llama_cpp.sh"), str(args.llama_cpp)], check=True)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="qconvert-compare-"))
    scratch.mkdir(parents=True, exist_ok=True)
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.neighbours)]
    try:
        print(f"{os.cpu_count()} cores, {args.neighbours} busy neighbour processes; {args.runs} runs each")
        figures = {
            "smollm2-135m": compare("smollm2-135m", SMOLLM2, args.llama_cpp.resolve() / "bin", scratch, args.runs),
            "llama-730m": compare(
                "llama-730m", make_llama(scratch / "llama-730m"), args.llama_cpp.resolve() / "bin", scratch, args.runs
            ),
        }
        if args.calib:
            figures["calibrated"] = calibrated(scratch, args.calib.resolve(), args.calibrated_runs)
    finally:
        for n in neighbours:
            n.kill()
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"neighbours": args.neighbours, **figures}, indent=2))


if __name__ == "__main__":
    main()
