"""Perplexity against size on disk, one series per method, each with its frontier: docs/tradeoff.png.

Every point is a `qconvert eval --json` result (same text, windows and tokenizer for all), so a
qconvert output, a float checkpoint and a llama.cpp GGUF file are scored alike. A series' frontier
joins the points no smaller point of the same series beats; reference series (llama-quantize's types)
are drawn dashed.

Usage:
    python scripts/plot_tradeoff.py SERIES=EVAL.json[,EVAL.json...] ... [--reference SERIES=...]
        [--float EVAL.json] [--title TITLE] -o docs/tradeoff.png [--markdown]
"""

import argparse
import json
from pathlib import Path


def load(spec: str) -> tuple[str, list[dict]]:
    name, _, files = spec.partition("=")
    points = []
    for file in files.split(","):
        result = json.loads(Path(file).read_text())
        if result.get("runtime", "qconvert") != "qconvert":
            raise SystemExit(f"{file} was scored by {result['runtime']}, not comparable: use qconvert eval")
        points.append({"label": Path(file).name.removesuffix(".eval.json"), **result})
    return name, points


def frontier(points: list[dict]) -> list[dict]:
    """The points that no smaller point beats, by size."""
    best, kept = float("inf"), []
    for p in sorted(points, key=lambda p: (p["bytes_on_disk"], p["perplexity"])):
        if p["perplexity"] < best:
            best = p["perplexity"]
            kept.append(p)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", nargs="+", help="SERIES=EVAL.json[,EVAL.json...]")
    parser.add_argument("--reference", action="append", default=[], help="a reference series, drawn dashed")
    parser.add_argument("--float", type=Path, help="the float model's eval JSON (a star and a dotted line)")
    parser.add_argument("--title", default="accuracy against size")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--markdown", action="store_true", help="also print every point as a markdown table")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    markers = "osD^vP<>hX"
    rows = []
    for i, (spec, reference) in enumerate([(s, False) for s in args.series] + [(s, True) for s in args.reference]):
        name, points = load(spec)
        style = {"color": "gray" if reference else f"C{i}", "marker": "s" if reference else markers[i % len(markers)]}
        ax.scatter(
            [p["bytes_on_disk"] / 1e6 for p in points], [p["perplexity"] for p in points], s=36, zorder=3, **style
        )
        edge = frontier(points)
        ax.plot(
            [p["bytes_on_disk"] / 1e6 for p in edge],
            [p["perplexity"] for p in edge],
            linestyle="--" if reference else "-",
            color=style["color"],
            label=name,
        )
        for p in points:
            ax.annotate(
                p["label"],
                (p["bytes_on_disk"] / 1e6, p["perplexity"]),
                xytext=(4, 3),
                textcoords="offset points",
                fontsize=6,
            )
            rows.append((name, p))
    if args.float:
        base = json.loads(args.float.read_text())
        ax.scatter(
            [base["bytes_on_disk"] / 1e6],
            [base["perplexity"]],
            marker="*",
            s=180,
            color="black",
            label="float",
            zorder=4,
        )
        ax.axhline(base["perplexity"], color="black", linewidth=0.8, linestyle=":")
        rows.append(("float", {"label": "float", **base}))
    ax.set_yscale("log")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(args.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output)
    if args.markdown:
        print("| series | setting | MB | bits/weight (file) | perplexity |")
        print("|---|---|---|---|---|")
        for name, p in sorted(rows, key=lambda r: (r[0], r[1]["bytes_on_disk"])):
            size, bits, ppl = p["bytes_on_disk"] / 1e6, p["bits_per_weight"], p["perplexity"]
            print(f"| {name} | {p['label']} | {size:.1f} | {bits:.2f} | {ppl:.2f} |")


if __name__ == "__main__":
    main()
