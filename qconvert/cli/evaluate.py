"""`qconvert eval` and `sweep`: perplexity, size, memory and speed, and the trade-off across settings."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from qconvert.cli.common import app, run_command, stderr
from qconvert.cli.options import ClusterOption, SmoothOption
from qconvert.errors import QConvertError
from qconvert.limits import GRID_NAMES


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{option} takes a comma-separated list of integers, e.g. 8,4,3; got {text!r}."
        ) from None


TextOption = Annotated[Optional[Path], typer.Option("--text", help="Evaluation text file (UTF-8).")]
DatasetOption = Annotated[
    Optional[str], typer.Option("--dataset", help="A public set read with the `datasets` library: wikitext2.")
]
CtxOption = Annotated[int, typer.Option("--ctx", help="Tokens per window.")]
MaxTokensOption = Annotated[
    int, typer.Option("--max-tokens", help="Score at most this many tokens (0 = the whole text).")
]
DecodeOption = Annotated[int, typer.Option("--decode-tokens", help="Greedy tokens decoded to time decoding.")]
KernelsOption = Annotated[
    bool,
    typer.Option(
        "--kernels/--no-kernels",
        help="Fast kernels: torch's int8/int4 CPU kernels (bfloat16 activations) and compiled fused ones; "
        "or the exact float32 dequantize-then-matmul.",
    ),
]


@app.command("eval")
def eval_command(
    model_path: Annotated[
        Path, typer.Argument(metavar="MODEL", help="A qconvert output, a checkpoint folder, or a .gguf file.")
    ],
    text: TextOption = None,
    dataset: DatasetOption = None,
    ctx: CtxOption = 512,
    max_tokens: MaxTokensOption = 20480,
    baseline: Annotated[
        Optional[Path],
        typer.Option(help="Compare against this model: perplexity change, KL divergence, top-1 agreement."),
    ] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer folder (default: the model's own).")] = None,
    decode_tokens: DecodeOption = 32,
    kernels: KernelsOption = True,
    runtime: Annotated[
        str,
        typer.Option(
            help="Who runs the model: qconvert (transformers with packed layers) or llama.cpp (llama-perplexity "
            "and llama-bench on its GGUF; perplexity scores each chunk's second half, so compare it only with "
            "llama.cpp's)."
        ),
    ] = "qconvert",
    llama_cpp: Annotated[
        Optional[Path],
        typer.Option(
            "--llama-cpp",
            help="Where scripts/build_llama_cpp.sh built llama.cpp (default: $QCONVERT_LLAMA_CPP or build/llama.cpp).",
        ),
    ] = None,
    max_ppl_increase: Annotated[
        Optional[float], typer.Option(help="Fail (exit 4) if perplexity rises more than this % over --baseline.")
    ] = None,
    max_kld: Annotated[
        Optional[float], typer.Option(help="Fail (exit 4) if the mean KL divergence from --baseline exceeds this.")
    ] = None,
    max_ppl: Annotated[Optional[float], typer.Option(help="Fail (exit 4) if perplexity exceeds this.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Perplexity, size, memory and speed of a model; with --baseline, how far it drifted."""
    from qconvert.evaluate.evaluation import EvalSettings, check_quality_gate, evaluate
    from qconvert.io.text import read_text

    def action() -> None:
        settings = EvalSettings(
            ctx=ctx, max_tokens=max_tokens or None, decode_tokens=decode_tokens, use_kernels=kernels
        )
        if runtime == "llama.cpp":
            from qconvert.evaluate.llama_cpp import evaluate_llama_cpp, find_tools

            if baseline or tokenizer:
                raise QConvertError("--baseline and --tokenizer work with --runtime qconvert only.")
            result = evaluate_llama_cpp(model_path, read_text(text, dataset), settings, find_tools(llama_cpp))
        elif runtime == "qconvert":
            result = evaluate(model_path, read_text(text, dataset), settings, baseline, tokenizer)
        else:
            raise QConvertError(f"--runtime {runtime} is not one of qconvert, llama.cpp.")
        if as_json:
            print(json.dumps(result.to_dict(), sort_keys=True))
        else:
            _print_eval(result)
        check_quality_gate(result, max_ppl_increase, max_kld, max_ppl)

    run_command(action)


def _print_eval(result) -> None:
    table = Table(title=f"{result.model} ({result.kind}, run by {result.runtime})", show_header=False)
    rows = [("perplexity", f"{result.perplexity:.4f} over {result.tokens_scored:,} tokens ({result.windows} windows)")]
    if result.baseline:
        b = result.baseline
        rows += [
            ("baseline perplexity", f"{b['perplexity']:.4f} ({b['ppl_change_pct']:+.2f}%)"),
            ("mean KL divergence", f"{b['mean_kld']:.5f}"),
            ("top-1 agreement", f"{100 * b['top1_agreement']:.2f}%"),
        ]
    rows += [
        ("parameters", f"{result.parameters:,}"),
        ("size on disk", f"{result.bytes_on_disk / 1e6:.1f} MB"),
        ("bits per weight", f"{result.bits_per_weight:.3f} (whole file, scales and zero points counted)"),
        ("weights in memory", f"{result.weight_memory_bytes / 1e6:.1f} MB"),
        ("peak RSS", "not measured" if result.peak_rss_bytes is None else f"{result.peak_rss_bytes / 1e6:.0f} MB"),
        ("prefill", f"{result.prefill_tokens_per_s:.1f} tokens/s"),
        ("decode", f"{result.decode_ms_per_token:.1f} ms/token"),
    ]
    if result.kernels:
        kernels = ", ".join(f"{count} {name}" for name, count in sorted(result.kernels.items()))
        rows.append(("linear kernels", f"{kernels}; compiling took {result.compile_seconds:.1f} s (not in the speeds)"))
    if result.compile_failed:
        rows.append(
            ("compiling failed", f"{result.compile_failed}; fused kernels ran uncompiled (same results, slower)")
        )
    for key, value in rows:
        table.add_row(key, value)
    Console(stderr=True, width=None if stderr.is_terminal else 160, markup=False).print(table)


@app.command()
def sweep(
    source: Annotated[Path, typer.Argument(help="The float checkpoint folder.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Report folder (converted models go in its models/).")
    ] = Path("report"),
    bits: Annotated[str, typer.Option(help="Comma-separated bit widths.")] = "8,6,4,3",
    group_size: Annotated[str, typer.Option(help="Comma-separated group sizes (0 = per channel).")] = "64",
    quantizer: Annotated[str, typer.Option("-q", "--quantizer", help="Comma-separated quantizer names.")] = "rtn",
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric")] = False,
    grids: Annotated[
        str,
        typer.Option(
            "--grids",
            help=f"Comma-separated table grids to add ({', '.join(g for g in GRID_NAMES if g != 'int')}), each at "
            "its own bits.",
        ),
    ] = "",
    activations: Annotated[
        str,
        typer.Option(
            "--activations",
            help="Comma-separated W8A8 schemes to add (int8-dynamic, int8-static, fp8-dynamic), each with its "
            "8-bit per-channel weights.",
        ),
    ] = "",
    smooth: SmoothOption = None,
    reference: Annotated[
        Optional[list[Path]],
        typer.Option(help="Also evaluate this model (checkpoint, qconvert output or .gguf); repeatable."),
    ] = None,
    text: TextOption = None,
    dataset: DatasetOption = None,
    ctx: CtxOption = 512,
    max_tokens: MaxTokensOption = 20480,
    decode_tokens: DecodeOption = 32,
    kernels: KernelsOption = True,
    calib: Annotated[
        Optional[Path],
        typer.Option(
            help="Calibration text for gptq and awq rows, and for W8A8 rows with --smooth or int8-static.",
            rich_help_panel="Calibration",
        ),
    ] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.", rich_help_panel="Calibration")] = 128,
    calib_seqlen: Annotated[
        int, typer.Option(help="Tokens per calibration window.", rich_help_panel="Calibration")
    ] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
    cluster: ClusterOption = None,
) -> None:
    """Convert at every setting, evaluate each and the float model on the same text, and draw the trade-off."""
    from qconvert.calibration.samples import CalibrationSettings
    from qconvert.evaluate.evaluation import EvalSettings
    from qconvert.evaluate.report import require_plotting
    from qconvert.evaluate.sweep import EvalText, run_sweep, setting_grid
    from qconvert.io.text import read_text
    from qconvert.settings import smooth_strength

    def action() -> int:
        calibration = (
            CalibrationSettings(text=str(calib.resolve()), samples=calib_samples, seqlen=calib_seqlen)
            if calib
            else None
        )
        grid = setting_grid(
            _int_list(bits, "--bits"),
            _int_list(group_size, "--group-size"),
            [q.strip() for q in quantizer.split(",") if q.strip()],
            symmetric,
            calibration,
            [g.strip() for g in grids.split(",") if g.strip()],
            [a.strip() for a in activations.split(",") if a.strip()],
            smooth_strength(smooth),
        )
        settings = EvalSettings(
            ctx=ctx, max_tokens=max_tokens or None, decode_tokens=decode_tokens, use_kernels=kernels
        )
        read_text(text, dataset)  # fail early on a bad text source
        require_plotting()
        if cluster:
            from qconvert.cluster import sweep_mapper
        rows = run_sweep(
            source,
            grid,
            output,
            EvalText(text, None if text else dataset),
            settings,
            reference or [],
            log=lambda line: stderr.print(line, highlight=False),
            map_settings=sweep_mapper(cluster) if cluster else None,
        )
        return _report_sweep(rows, output, source, str(text or dataset), ctx, max_tokens, as_json)

    run_command(action)


def _report_sweep(rows, output: Path, source: Path, text: str, ctx: int, max_tokens: int, as_json: bool) -> int:
    """Write the report files, print the rows as JSON if asked; exit 5 if any row failed."""
    from qconvert.evaluate.report import write_report
    from qconvert.evaluate.sweep import rows_as_dicts

    context = {
        "source": str(source),
        "text": text,
        "ctx": ctx,
        "max_tokens": max_tokens,
        "windows": f"windows of {ctx} tokens, first {max_tokens or 'all'} tokens",
    }
    files = write_report(rows, output, context)
    if as_json:
        print(json.dumps(rows_as_dicts(rows)))
    failed = [r.label for r in rows if r.status != "ok"]
    stderr.print(
        f"wrote {', '.join(str(f) for f in files)}" + (f"; failed: {', '.join(failed)}" if failed else ""),
        highlight=False,
    )
    return 5 if failed else 0
