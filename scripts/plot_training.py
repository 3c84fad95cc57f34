"""The loss of quantization-aware training, block by block: docs/qat_loss.png.

Reads the training record that `qconvert model -q qat` writes into each output's manifest
(`training.blocks`: the block's mean squared error against the float model's outputs at gptq's
start, after each epoch, and at the end) and draws, per output, the start (dashed) and what training
kept (solid) against the block index, plus each block's epochs as points.

Usage:
    python scripts/plot_training.py LABEL=OUTPUT [LABEL=OUTPUT ...] -o docs/qat_loss.png [--markdown]
"""

import argparse
import json
from pathlib import Path


def records(output: str) -> list[dict]:
    manifest = json.loads((Path(output) / "qconvert.json").read_text())
    training = manifest.get("training")
    if not training:
        raise SystemExit(f"{output} has no training record: it was not made by -q qat")
    return training["blocks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", help="LABEL=OUTPUT folder")
    parser.add_argument("-o", "--output", required=True, help="the PNG to write")
    parser.add_argument("--markdown", action="store_true", help="also print the mean loss ratio per output")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for spec in args.outputs:
        label, _, folder = spec.partition("=")
        blocks = records(folder)
        index = [b["block"] for b in blocks]
        line = axes.plot(index, [b["loss_end"] for b in blocks], marker="o", markersize=3, label=f"{label}: qat")[0]
        axes.plot(
            index,
            [b["loss_start"] for b in blocks],
            linestyle="--",
            color=line.get_color(),
            label=f"{label}: gptq start",
        )
        for b in blocks:
            axes.scatter([b["block"]] * len(b["loss_epochs"]), b["loss_epochs"], s=4, color=line.get_color(), alpha=0.4)
        if args.markdown:
            ratio = sum(b["loss_end"] / b["loss_start"] for b in blocks) / len(blocks)
            trained = sum(b["kept"] == "trained" for b in blocks)
            print(f"| {label} | {trained}/{len(blocks)} | {ratio:.3f} |")
    axes.set_yscale("log")
    axes.set_xlabel("transformer block")
    axes.set_ylabel("block output MSE vs float model (log)")
    axes.set_title("Quantization-aware training, block by block (points: epoch means)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
