"""Write a sweep's results: a markdown table, JSON, CSV, and the trade-off and speed figures."""

import csv
import json
from pathlib import Path

from qconvert.errors import QConvertError
from qconvert.evaluate.sweep import SweepRow, rows_as_dicts

COLUMNS = [  # (header, row attribute, format)
    ("setting", "label", "{}"),
    ("bits/weight (quantized)", "quantized_bits_per_weight", "{:.3f}"),
    ("bits/weight (file)", "bits_per_weight", "{:.3f}"),
    ("size MB", "size_mb", "{:.1f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("vs float %", "ppl_change_pct", "{:+.1f}"),
    ("prefill tok/s", "prefill_tokens_per_s", "{:.0f}"),
    ("decode ms/token", "decode_ms_per_token", "{:.1f}"),
    ("weights in memory MB", "weight_memory_mb", "{:.0f}"),
    ("conversion s", "conversion_seconds", "{:.1f}"),
    ("status", "status", "{}"),
]


def cell(row: SweepRow, attribute: str, fmt: str) -> str:
    value = getattr(row, attribute)
    if attribute == "conversion_seconds" and value is None:
        return "reused" if row.reused else ""
    return "" if value is None else fmt.format(value)


def require_plotting() -> None:
    """Refuse before a long sweep starts, rather than after it, when figures cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise QConvertError(
            "sweep draws its figures with matplotlib, which is not installed: "
            "pip install 'qconvert[hf]' (or pip install matplotlib)."
        ) from exc


def write_report(rows: list[SweepRow], folder: Path, context: dict) -> list[Path]:
    """Write every report file into `folder` and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _markdown(rows, folder / "report.md", context),
        _json(rows, folder / "report.json", context),
        _csv(rows, folder / "report.csv"),
    ]
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")  # no display needed: figures go straight to files
    written += [_tradeoff_figure(rows, folder / "tradeoff.png", context), _speed_figure(rows, folder / "speed.png")]
    return written


def _markdown(rows: list[SweepRow], path: Path, context: dict) -> Path:
    lines = [
        f"# qconvert sweep: {context['source']}",
        "",
        f"Perplexity on {context['text']} ({context['windows']}), same tokens for every row. "
        "Bits per weight count scales and zero points.",
        "",
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(r, a, f) for _, a, f in COLUMNS) + " |" for r in rows]
    failures = [r for r in rows if r.status != "ok"]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {r.label}: {r.error}" for r in failures]
    path.write_text("\n".join(lines) + "\n")
    return path


def _json(rows: list[SweepRow], path: Path, context: dict) -> Path:
    path.write_text(json.dumps({**context, "rows": rows_as_dicts(rows)}, indent=2) + "\n")
    return path


def _csv(rows: list[SweepRow], path: Path) -> Path:
    data = rows_as_dicts(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    return path


def plotted(rows: list[SweepRow]) -> list[SweepRow]:
    return [r for r in rows if r.status == "ok" and r.perplexity and r.size_mb]


def _tradeoff_figure(rows: list[SweepRow], path: Path, context: dict) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    styles = {
        "qconvert": dict(color="tab:blue", marker="o", label="qconvert"),
        "reference": dict(color="tab:orange", marker="s", label="reference"),
        "float": dict(color="black", marker="*", s=160, label="float"),
    }
    for role, style in styles.items():
        points = [r for r in plotted(rows) if r.role == role]
        if points:
            ax.scatter([r.size_mb for r in points], [r.perplexity for r in points], zorder=3, **{"s": 50, **style})
            for r in points:
                ax.annotate(r.label, (r.size_mb, r.perplexity), textcoords="offset points", xytext=(6, 4), fontsize=8)
    float_row = next((r for r in plotted(rows) if r.role == "float"), None)
    if float_row:
        ax.axhline(float_row.perplexity, color="black", linewidth=0.8, linestyle=":", zorder=1)
    ax.set_yscale("log")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(f"{Path(context['source']).name}: accuracy vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _speed_figure(rows: list[SweepRow], path: Path) -> Path:
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.status == "ok" and r.decode_ms_per_token]
    colors = {"float": "black", "qconvert": "tab:blue", "reference": "tab:orange"}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(points) + 1.5), dpi=120)
    ax.barh([r.label for r in points], [r.decode_ms_per_token for r in points], color=[colors[r.role] for r in points])
    for i, r in enumerate(points):
        ax.text(r.decode_ms_per_token, i, f" {r.decode_ms_per_token:.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("decode ms/token (greedy, lower is faster)")
    ax.set_title("decode speed per setting")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
