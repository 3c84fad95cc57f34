"""The `qconvert` command line: parse options, call the library, map errors to exit codes.

Exit codes (documented in the README):
  0 success                      4 quality gate failed (eval --max-ppl..., verify --max-bpw)
  1 internal error (a bug; the traceback is kept)      5 some sweep settings or batch jobs failed
  2 bad input or usage           6 predicted out of memory or disk (--force starts anyway)
  3 verify found a damaged output                      7 unsupported model
  130 interrupted
"""

import errno
import json
import re
import signal
import sys
import traceback
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from qconvert import __version__
from qconvert.errors import QConvertError

app = typer.Typer(
    help="Turn a Hugging Face checkpoint into a compact quantized model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# markup=False everywhere: paths, tensor names and messages are printed as they are ("qconvert[hf]"
# must not lose its brackets); styles come only from `_say`'s Text.
stderr = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)  # a path is never broken across lines


def _stdout() -> Console:
    # Tables piped to a file or a CI log should not wrap at 80 columns.
    console = Console(markup=False, highlight=False)
    return console if console.is_terminal else Console(width=200, markup=False, highlight=False)


def _say(label: str, style: str, text: str, console: Console | None = None) -> None:
    """One line: a styled label, then `text` exactly as given."""
    (console or stderr).print(Text.assemble((label, style), " ", text), soft_wrap=True)


_debug = False


class ExportFormat(str, Enum):
    gguf = "gguf"
    mlx = "mlx"
    gptq = "gptq"
    compressed_tensors = "compressed-tensors"


class OutputFormat(str, Enum):
    qconvert = "qconvert"
    gguf = "gguf"
    mlx = "mlx"
    gptq = "gptq"
    compressed_tensors = "compressed-tensors"


class Layout(str, Enum):
    auto = "auto"
    compressed_tensors = "compressed-tensors"
    native = "native"


class FloatDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class ScaleDtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what CI runners and `timeout` send), handled exactly like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _run(action: Callable[[], int | None]) -> None:
    """Run a command body; a user error, an OS error or an interruption becomes one line on stderr and its
    exit code. Anything else is a bug in qconvert: its traceback is kept, with a request to report it."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (the CLI called from a worker thread): signals stay as they are
        previous = None
    try:
        code = action()
    except QConvertError as exc:
        if _debug:
            raise
        _say("error:", "bold red", str(exc))
        raise typer.Exit(code=exc.exit_code) from None
    except KeyboardInterrupt as exc:
        kept = getattr(exc, "qconvert_note", None)
        stderr.print(
            f"{'terminated' if isinstance(exc, _Terminated) else 'interrupted'}; nothing was published."
            + (f" {kept}" if kept else "")
        )
        raise typer.Exit(code=143 if isinstance(exc, _Terminated) else 130) from None
    except OSError as exc:
        if _debug:
            raise
        code = 6 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 2
        _say("error:", "bold red", _os_error_sentence(exc))
        raise typer.Exit(code=code) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise  # usage errors: typer prints them itself (exit 2)
    except Exception:
        traceback.print_exc()
        _say(
            "error:", "bold red", f"this is a bug in qconvert {__version__}; please report it with the traceback above."
        )
        raise typer.Exit(code=1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code:
        raise typer.Exit(code=code)


def _os_error_sentence(exc: OSError) -> str:
    """One sentence for an OS error: what failed, on which path, and what to do."""
    where = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or str(exc)
    advice = {
        errno.ENOSPC: "nothing was published; free some space or write the output elsewhere with -o",
        errno.EDQUOT: "nothing was published; free some space or write the output elsewhere with -o",
        errno.EACCES: "check the permissions, or write the output elsewhere with -o",
        errno.EPERM: "check the permissions, or write the output elsewhere with -o",
        errno.EROFS: "write the output elsewhere with -o",
        errno.ENOENT: "check that the path exists and was not moved away while qconvert ran",
    }.get(exc.errno, "")
    return f"{reason}{':' if where else ''}{where}" + (f"; {advice}." if advice else ".")


def parse_size(text: str) -> int:
    """ "500MB", "2GiB", "1000000" -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 500MB or 2GiB.")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }[unit]
    return int(number * scale)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors too.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    global _debug
    _debug = debug
    if version:
        print(f"qconvert {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit(code=2)


RecipeOption = Annotated[
    Optional[Path],
    typer.Option("--recipe", help="A TOML recipe (see configs/); the flags below override its defaults."),
]
BitsOption = Annotated[
    Optional[int],
    typer.Option("--bits", help="Bits per weight code: 2, 3, 4, 5, 6 or 8. (default: 4)", show_default=False),
]
GroupOption = Annotated[
    Optional[int],
    typer.Option(
        "--group-size",
        help="Weights per scale within a row; 0 = one scale per output channel. (default: 64)",
        show_default=False,
    ),
]
SymmetricOption = Annotated[
    Optional[bool],
    typer.Option(
        "--symmetric/--asymmetric",
        help="Symmetric grid (no zero point) or asymmetric (integer zero point). (default: asymmetric)",
        show_default=False,
    ),
]
QuantizerOption = Annotated[
    Optional[str],
    typer.Option(
        "-q", "--quantizer", help="Quantizer name; see `qconvert quantizers`. (default: rtn)", show_default=False
    ),
]
TargetBpwOption = Annotated[
    Optional[float],
    typer.Option(
        "--target-bpw",
        help=(
            "Choose each tensor's bits to average this many bits per quantized weight (scales and zero points counted)."
        ),
    ),
]
TargetSizeOption = Annotated[
    Optional[str],
    typer.Option("--target-size", help="Choose each tensor's bits so the whole output fits this size, e.g. 90MB."),
]
IncludeOption = Annotated[
    Optional[list[str]],
    typer.Option("--include", help="Also quantize 2-D tensors whose name matches this regex (repeatable)."),
]
ExcludeOption = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", help="Keep tensors whose name matches this regex in float (repeatable)."),
]
CalibOption = Annotated[
    Optional[Path],
    typer.Option(
        "--calib", help="Calibration text file, for calibrated quantizers (gptq, awq).", rich_help_panel="Calibration"
    ),
]
CalibSamplesOption = Annotated[
    Optional[int],
    typer.Option(
        "--calib-samples", help="Calibration windows. (default: 128)", show_default=False, rich_help_panel="Calibration"
    ),
]
CalibSeqlenOption = Annotated[
    Optional[int],
    typer.Option(
        "--calib-seqlen",
        help="Tokens per calibration window. (default: 512)",
        show_default=False,
        rich_help_panel="Calibration",
    ),
]
OutputOption = Annotated[
    Optional[Path], typer.Option("-o", "--output", help="Output folder (default: <source>-<scheme> beside the source).")
]


@app.command()
def model(
    source: Annotated[
        str, typer.Argument(help="Checkpoint folder, .safetensors/.bin file, or cached hub id (org/name).")
    ],
    output: OutputOption = None,
    recipe: RecipeOption = None,
    bits: BitsOption = None,
    group_size: GroupOption = None,
    symmetric: SymmetricOption = None,
    quantizer: QuantizerOption = None,
    target_bpw: TargetBpwOption = None,
    target_size: TargetSizeOption = None,
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    dtype: Annotated[
        Optional[FloatDtype],
        typer.Option(help="Cast kept float tensors to this dtype (default: keep the source dtype)."),
    ] = None,
    scale_dtype: Annotated[
        Optional[ScaleDtype], typer.Option(help="dtype of stored scales. (default: float16)", show_default=False)
    ] = None,
    layout: Annotated[
        Layout, typer.Option(help="auto: compressed-tensors when it can hold the scheme, else native.")
    ] = Layout.auto,
    max_shard_size: Annotated[
        Optional[str], typer.Option(help="Split the weights into shards of at most this size, e.g. 2GB.")
    ] = None,
    revision: Annotated[Optional[str], typer.Option(help="Revision of a hub id.")] = None,
    calib: CalibOption = None,
    calib_dataset: Annotated[
        Optional[str],
        typer.Option(
            help="Calibration from a public set through `datasets`: wikitext2.", rich_help_panel="Calibration"
        ),
    ] = None,
    calib_samples: CalibSamplesOption = None,
    calib_seqlen: CalibSeqlenOption = None,
    calib_batch_size: Annotated[
        Optional[int],
        typer.Option(help="Windows per forward pass. (default: 4)", show_default=False, rich_help_panel="Calibration"),
    ] = None,
    seed: Annotated[
        Optional[int],
        typer.Option(
            help="Seed for the calibration window positions. (default: 0)",
            show_default=False,
            rich_help_panel="Calibration",
        ),
    ] = None,
    damp: Annotated[
        Optional[float],
        typer.Option(
            help="gptq: dampening, a fraction of the mean Hessian diagonal (default 0.01).",
            rich_help_panel="Calibration",
        ),
    ] = None,
    act_order: Annotated[
        Optional[bool],
        typer.Option(
            "--act-order/--no-act-order",
            help="gptq: quantize columns by decreasing activation energy (default on).",
            rich_help_panel="Calibration",
        ),
    ] = None,
    events: Annotated[
        Optional[Path],
        typer.Option(
            help="Append a JSON-lines stream of progress events (phase, tensor i of N, RSS, ETA, errors) to this file."
        ),
    ] = None,
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            help=(
                "qconvert: safetensors + manifest; gguf, mlx, gptq: that runtime's format (converted, then "
                "exported); compressed-tensors: that layout or an error."
            ),
        ),
    ] = OutputFormat.qconvert,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Overwrite the output if it exists, and start even when the plan predicts too little memory or disk.",
        ),
    ] = False,
    check_runtime: Annotated[
        bool,
        typer.Option(
            "--check/--no-check",
            help=(
                "Before publishing a compressed-tensors output, run transformers' own loading of it on the "
                "meta device and refuse it if any weight would be missing or ignored."
            ),
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Quantize a checkpoint into a packed safetensors file with a manifest (or another runtime's format)."""
    from qconvert.conversion import convert
    from qconvert.events import EventLog

    def action() -> None:
        settings = _settings_from_flags(
            recipe,
            dict(
                quantizer=quantizer,
                bits=bits,
                group_size=group_size,
                symmetric=symmetric,
                scale_dtype=scale_dtype.value if scale_dtype else None,
                include=include,
                exclude=exclude,
                dtype=dtype.value if dtype else None,
                max_shard_size=max_shard_size,
                layout="compressed-tensors" if output_format == OutputFormat.compressed_tensors else layout.value,
                target_bpw=target_bpw,
                target_size=target_size,
                options={k: v for k, v in {"damp": damp, "act_order": act_order}.items() if v is not None} or None,
            ),
            dict(
                text=calib,
                dataset=calib_dataset,
                samples=calib_samples,
                seqlen=calib_seqlen,
                seed=seed,
                batch_size=calib_batch_size,
            ),
        )
        with EventLog(events) as log, _progress_bar("converting") as report, _block_progress() as block_report:

            def on_tensor(record, done: int, total: int, count: int) -> None:
                report(record.name, done, total)
                log.tensor(record, done, total, count)

            def on_block(stage: str, done: int, total: int) -> None:
                block_report(stage, done, total)
                log.block(stage, done, total)

            log.start(source, settings)
            with _exported_as(output_format.value, source, output, settings, force, revision) as (
                destination,
                exporter,
            ):
                result = convert(
                    source,
                    destination,
                    settings,
                    force=force,
                    revision=revision,
                    command=["qconvert", *sys.argv[1:]],
                    progress=on_tensor,
                    calibration_progress=on_block,
                    check_resources=not force,
                    check_runtime=check_runtime,
                )
                exported = exporter(result.output)
            log.done(result)
        totals = result.manifest.totals
        warnings = _requantized_warning(result.manifest)
        if result.runtime_check and result.runtime_check["ok"] is False:
            warnings.append(
                f"transformers would not load this output correctly ({result.runtime_check['note']}): "
                + "; ".join(f"{p['tensor'] or ''} {p['message']}".strip() for p in result.runtime_check["problems"][:3])
            )
        for warning in warnings:
            _say("warning:", "yellow", warning)
        if as_json:
            from qconvert.events import peak_rss

            print(
                json.dumps(
                    {
                        "output": str(exported.destination if exported else result.output),
                        "layout": result.manifest.layout,
                        "peak_rss_bytes": peak_rss(),
                        "files": [str(f) for f in result.files],
                        "export": exported.to_dict() if exported else None,
                        "warnings": warnings,
                        "runtime_check": result.runtime_check,
                        **totals,
                    },
                    sort_keys=True,
                )
            )
        elif exported:  # the qconvert output it came from was scratch, and is gone
            _print_export(exported)
        else:
            stderr.print(
                f"wrote {result.output} ({result.manifest.layout} layout): "
                f"{totals['stored_bytes'] / 1e6:.1f} MB, {totals['quantized_bits_per_weight']} bits per "
                "quantized weight, "
                f"{totals['bits_per_weight']} overall",
                highlight=False,
            )

    _run(action)


def _requantized_warning(manifest) -> list[str]:
    """One sentence when weights of an already-quantized source could not move exactly."""
    from qconvert.conversion import REQUANTIZED

    redone = [t for t in manifest.tensors if REQUANTIZED in t.reason]
    if not redone:
        return []
    source = redone[0].reason.split(REQUANTIZED)[1].strip()
    return [
        f"{len(redone)} weights were {REQUANTIZED} {source} (its grid is not the one asked for), so they are not "
        f"an exact copy; ask for the source's own grid to repack them losslessly."
    ]


@contextmanager
def _exported_as(
    output_format: str, source: str, output: Path | None, settings, force: bool, revision: str | None = None
):
    """Yield (where to convert, what to do with the result): for qconvert and compressed-tensors the
    output itself; for gguf, mlx and gptq a scratch folder `.<final>.qconvert-scratch` beside the final
    destination, exported from and then removed (the destination appears only once complete).

    The scratch folder's name is fixed, so a rerun of an interrupted calibrated conversion finds its
    calibration store there and resumes; the final destination's lock is held throughout, so no other
    run uses it meanwhile. It is removed on success and on error, and kept after an interruption only
    when it holds finished calibration blocks (the interruption's note says where)."""
    from qconvert.conversion import default_output, source_paths
    from qconvert.formats.exporting import default_destination, export
    from qconvert.io.sources import open_checkpoint
    from qconvert.io.writing import check_destination, output_lock, remove_path

    if output_format in ("qconvert", "compressed-tensors"):
        yield output, lambda converted: None
        return
    final = Path(output) if output else default_destination(default_output(source, settings), output_format)
    check_destination(final, force, source_paths(open_checkpoint(source, revision)))  # a hub id's cache folder too
    scratch = final.with_name(f".{final.name}.qconvert-scratch")
    with output_lock(final):
        remove_path(scratch / "qconvert")  # a killed run's intermediate output (its calibration store stays, to resume)
        try:
            yield scratch / "qconvert", lambda converted: export(converted, output_format, final, force)
        except KeyboardInterrupt:
            if not any(scratch.glob(".*.qconvert-calibration/block-*.safetensors")):
                remove_path(scratch)
            raise
        except BaseException:
            remove_path(scratch)
            raise
        remove_path(scratch)


def _settings_from_flags(recipe: Path | None, flags: dict, calibration_flags: dict):
    """Settings from the recipe and the flags as typer gives them (lists, size strings, paths)."""
    from qconvert.plan.recipes import load_recipe
    from qconvert.settings import build_settings

    flags = dict(flags)
    for key in ("include", "exclude"):
        flags[key] = tuple(flags[key]) if flags.get(key) else None
    for key in ("target_size", "max_shard_size"):
        flags[key] = parse_size(flags[key]) if flags.get(key) else None
    text = calibration_flags.get("text")
    calibration_flags = {**calibration_flags, "text": str(text) if text else None}
    return build_settings(load_recipe(recipe) if recipe else None, flags, calibration_flags)


recipe_app = typer.Typer(help="Work with recipes (TOML files of settings and per-tensor rules).", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("check")
def recipe_check(
    file: Annotated[Path, typer.Argument(help="The recipe to validate.")],
    model_source: Annotated[
        Optional[str],
        typer.Option(
            "--model", help="Show what the recipe would do to this checkpoint (headers only, nothing converted)."
        ),
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="One row per tensor instead of per tensor kind.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Validate a recipe; with --model, print each tensor's scheme, bits per weight and size."""
    from qconvert.plan.recipes import load_recipe

    def action() -> None:
        recipe = load_recipe(file)
        if model_source is None:
            summary = {
                "recipe": str(file),
                "sha256": recipe.sha256,
                "defaults": recipe.defaults,
                "calibration": recipe.calibration,
                "rules": [r.describe() for r in recipe.rules],
            }
            if as_json:
                print(json.dumps(summary, sort_keys=True))
            else:
                _say("✓", "green", f"{file}: valid; {len(recipe.rules)} rules, defaults {recipe.defaults}")
            return
        _print_plan(model_source, _settings_from_flags(file, {}, {}), full, as_json)

    _run(action)


@app.command()
def plan(
    source: Annotated[str, typer.Argument(help="Checkpoint folder, .safetensors/.bin file, or cached hub id.")],
    output: OutputOption = None,
    recipe: RecipeOption = None,
    bits: BitsOption = None,
    group_size: GroupOption = None,
    symmetric: SymmetricOption = None,
    quantizer: QuantizerOption = None,
    target_bpw: TargetBpwOption = None,
    target_size: TargetSizeOption = None,
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    calib: CalibOption = None,
    calib_samples: CalibSamplesOption = None,
    calib_seqlen: CalibSeqlenOption = None,
    full: Annotated[bool, typer.Option("--full", help="One row per tensor instead of per tensor kind.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Predict a conversion before running it: output size, bits per weight, peak memory, disk and time."""

    def action() -> None:
        settings = _settings_from_flags(
            recipe,
            dict(
                quantizer=quantizer,
                bits=bits,
                group_size=group_size,
                symmetric=symmetric,
                target_bpw=target_bpw,
                target_size=target_size,
                include=include,
                exclude=exclude,
            ),
            dict(text=calib, samples=calib_samples, seqlen=calib_seqlen),
        )
        _print_plan(source, settings, full, as_json, output, predict_resources=True)

    _run(action)


def _print_plan(
    source: str, settings, full: bool, as_json: bool, output: Path | None = None, predict_resources: bool = False
) -> None:
    """The table of what a conversion would do to each tensor, with totals (and the resource prediction)."""
    from qconvert.conversion import default_output, planned_with_budget
    from qconvert.inspection import fold_layers, plan_rows
    from qconvert.io.sources import open_checkpoint
    from qconvert.plan.prediction import predict

    checkpoint = open_checkpoint(source)
    conversion_plan = planned_with_budget(checkpoint, settings)
    rows, totals = plan_rows(conversion_plan)
    rows = rows if full else fold_layers(rows)
    prediction = (
        predict(checkpoint, conversion_plan, settings, output or default_output(source, settings))
        if predict_resources
        else None
    )
    if as_json:
        print(
            json.dumps(
                {"tensors": rows, "totals": totals, "prediction": prediction.to_dict() if prediction else None},
                sort_keys=True,
            )
        )
        return
    table = Table(title=f"{source}: {conversion_plan.layout.name} layout", show_footer=True)
    for column, footer in [
        ("tensor", "total"),
        ("scheme", ""),
        ("decided by", ""),
        ("bytes", f"{totals['stored_bytes']:,}"),
        ("bits/weight", str(totals["bits_per_weight"])),
    ]:
        table.add_column(column, footer=footer, justify="right" if column in ("bytes", "bits/weight") else "left")
    for r in rows:
        name = f"{r['name']} ×{r['count']}" if r.get("count", 1) > 1 else r["name"]
        table.add_row(name, r["scheme"], r["reason"], f"{r['bytes']:,}", f"{r['bits_per_weight']:.3f}")
    out = _stdout()
    out.print(table)
    out.print(
        f"quantized tensors: {totals['quantized_parameters']:,} parameters at "
        f"{totals['quantized_bits_per_weight']} bits per weight "
        f"(scales and zero points counted); whole file {totals['bits_per_weight']} bits per weight, "
        f"{totals['stored_bytes'] / 1e6:.1f} MB.",
        highlight=False,
    )
    if prediction:
        out.print(
            f"predicted: peak memory {prediction.peak_rss_bytes / 1e9:.2f} GB (available "
            f"{_gb(prediction.available_memory_bytes)}), disk {prediction.disk_bytes / 1e9:.2f} GB (free "
            f"{_gb(prediction.free_disk_bytes)}), about {prediction.seconds:.0f} s.",
            highlight=False,
        )
        for problem in prediction.problems():
            _say("✗", "red", problem, out)


def _gb(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1e9:.2f} GB"


@app.command()
def batch(
    jobs_file: Annotated[
        Path, typer.Argument(metavar="JOBS", help="A TOML file of jobs: sources x recipes (or settings) with outputs.")
    ],
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Jobs to run at once (each is its own process; mind the memory).")
    ] = 1,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Run the remaining jobs after one fails.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo jobs whose output is already current.")] = False,
    report: Annotated[
        Optional[Path], typer.Option(help="Where to write the report (default: batch-report.json beside JOBS).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report's rows as JSON on stdout.")] = False,
) -> None:
    """Convert many models x recipes; skip outputs that are already current; exit 5 if any job failed."""
    from qconvert.batch import load_jobs, run_batch

    def action() -> int:
        job_list = load_jobs(jobs_file)
        report_path = report or jobs_file.parent / "batch-report.json"

        def announce(result) -> None:
            detail = (
                result.error if result.status == "failed" else f"{result.seconds or 0:.1f} s" if result.seconds else ""
            )
            stderr.print(f"{result.status}: {result.source} -> {result.output} {detail}", highlight=False)

        results = run_batch(job_list, report_path, force=force, keep_going=keep_going, workers=jobs, on_result=announce)
        if as_json:
            from dataclasses import asdict

            print(json.dumps([asdict(r) for r in results], sort_keys=True))
        else:
            table = Table("status", "source", "output", "seconds", "peak RSS GB", "bpw (quantized)", "MB", "error")
            for r in results:
                table.add_row(
                    r.status,
                    r.source,
                    r.output,
                    f"{r.seconds:.1f}" if r.seconds else "",
                    f"{r.peak_rss_bytes / 1e9:.2f}" if r.peak_rss_bytes else "",
                    str(r.quantized_bits_per_weight or ""),
                    f"{r.size_bytes / 1e6:.1f}" if r.size_bytes else "",
                    r.error or "",
                )
            _stdout().print(table)
        stderr.print(f"wrote {report_path}", highlight=False)
        return 5 if any(r.status in ("failed", "not run") for r in results) else 0

    _run(action)


@app.command()
def export(
    output: Annotated[Path, typer.Argument(metavar="OUT", help="A qconvert output folder.")],
    to: Annotated[ExportFormat, typer.Option("--to", help="Target format.")],
    destination: Annotated[
        Optional[Path],
        typer.Option(
            "-o",
            "--output",
            help=(
                "Where to write (default: OUT.gguf, or the folder OUT-mlx, OUT-gptq, OUT-compressed-tensors "
                "beside OUT)."
            ),
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the destination if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report on stdout.")] = False,
) -> None:
    """Write a qconvert output in another runtime's format, saying which tensors moved exactly."""
    from qconvert.formats.exporting import export as export_output

    def action() -> None:
        report = export_output(output, to.value, destination, force)
        if as_json:
            print(json.dumps(report.to_dict(), sort_keys=True))
        else:
            _print_export(report)

    _run(action)


def _print_export(report) -> None:
    stderr.print(
        f"wrote {report.destination} ({report.format}): {len(report.exact)} tensors exact, "
        f"{len(report.repacked)} repacked on the same grid (offsets rounded to the scales' float type), "
        f"{len(report.requantized)} requantized, {len(report.dequantized)} written as float (no block of the "
        "format fits their rows)"
    )
    for name in report.requantized:
        stderr.print(f"  requantized: {name}")
    for name in report.dequantized:
        stderr.print(f"  as float: {name}")


class _Bar:
    """A rich progress bar on stderr, silent when stderr is not a terminal; `report` updates it."""

    def __init__(self, *columns, field: str) -> None:
        self.progress = Progress(
            *columns,
            TimeRemainingColumn(),
            TextColumn(f"{{task.fields[{field}]}}"),
            console=stderr,
            transient=True,
            disable=not stderr.is_terminal,
        )
        self.field = field
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self.report

    def report(self, label: str, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=total, **{self.field: ""})
        self.progress.update(self.task, completed=done, **{self.field: label})

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def _progress_bar(label: str) -> _Bar:
    """Conversion progress: source bytes done, with the current tensor."""
    return _Bar(TextColumn(label), BarColumn(), DownloadColumn(), field="tensor")


class _block_progress(_Bar):
    """Calibration progress: a bar over blocks on a terminal, one line per block otherwise (CI logs)."""

    def __init__(self) -> None:
        super().__init__(
            TextColumn("calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"), field="stage"
        )

    def report(self, stage: str, done: int, total: int) -> None:
        super().report(stage, done, total)
        if not stderr.is_terminal and stage.endswith("done"):
            stderr.print(f"calibrating: {stage} ({done}/{total})", highlight=False)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A qconvert output folder, or any checkpoint.")],
    fold: Annotated[
        bool, typer.Option("--fold", help="One row per tensor kind, layer numbers folded into '*'.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")] = False,
) -> None:
    """Show every tensor: its scheme, stored bytes and bits per weight, with totals."""
    from qconvert.inspection import fold_layers, inspect_rows

    def action() -> None:
        rows, totals = inspect_rows(path)
        if fold:
            rows = fold_layers(rows)
        if as_json:
            print(json.dumps({"tensors": rows, "totals": totals}, sort_keys=True))
            return
        table = Table(title=str(path), show_footer=True)
        for column, footer in [
            ("tensor", "total"),
            ("scheme", ""),
            ("shape", ""),
            ("bytes", f"{totals['stored_bytes']:,}"),
            ("bits/weight", str(totals["bits_per_weight"])),
            ("rel. MSE", ""),
        ]:
            table.add_column(
                column, footer=footer, justify="right" if column in ("bytes", "bits/weight", "rel. MSE") else "left"
            )
        for r in rows:
            mse = "" if r["relative_mse"] is None else f"{r['relative_mse']:.2e}"
            name = f"{r['name']} ×{r['count']}" if r.get("count", 1) > 1 else r["name"]
            table.add_row(
                name, r["scheme"], "×".join(map(str, r["shape"])), f"{r['bytes']:,}", f"{r['bits_per_weight']:.3f}", mse
            )
        _stdout().print(table)
        if totals.get("quantized_bits_per_weight") is not None:
            _stdout().print(
                f"{totals['parameters']:,} parameters; quantized tensors: {totals['quantized_parameters']:,} "
                "parameters "
                f"at {totals['quantized_bits_per_weight']} bits per weight (scales and zero points counted); "
                f"whole file {totals['bits_per_weight']} bits per weight.",
                highlight=False,
            )

    _run(action)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A qconvert output folder.")],
    max_bpw: Annotated[
        Optional[float],
        typer.Option(help="Fail (exit 4) if the quantized tensors take more bits per weight than this."),
    ] = None,
    max_size: Annotated[
        Optional[str], typer.Option(help="Fail (exit 4) if the weights take more than this, e.g. 100MB.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Re-read an output: checksums, shapes, and that every quantized tensor unpacks; optionally gate its size."""
    from qconvert.errors import QualityGateError, VerificationError
    from qconvert.verification import measured_totals, verify_output

    def action() -> int:
        problems, checked = verify_output(path)
        totals = measured_totals(path) if not problems else {}  # from the files, not the manifest's say-so
        gate = []
        if max_bpw is not None and totals and (totals.get("quantized_bits_per_weight") or 0) > max_bpw:
            gate.append(
                f"{totals['quantized_bits_per_weight']} bits per quantized weight is above the {max_bpw} allowed"
            )
        if max_size is not None and totals and totals["stored_bytes"] > parse_size(max_size):
            gate.append(f"{totals['stored_bytes'] / 1e6:.1f} MB of weights is above the {max_size} allowed")
        if gate and not problems:
            if as_json:
                print(
                    json.dumps(
                        {"ok": False, "tensors_checked": checked, "problems": [], "gate": gate, "totals": totals}
                    )
                )
            raise QualityGateError(f"quality gate failed: {'; '.join(gate)}.")
        if as_json:
            print(
                json.dumps(
                    {
                        "ok": not problems,
                        "tensors_checked": checked,
                        "problems": problems,
                        "gate": gate,
                        "totals": totals,
                    }
                )
            )
        else:
            _print_problems(problems, f"{path}: {checked} tensors verified")
        return VerificationError.exit_code if problems else 0

    _run(action)


class Runtime(str, Enum):
    transformers = "transformers"
    llama_cpp = "llama.cpp"
    mlx = "mlx"
    vllm = "vllm"


@app.command()
def check(
    path: Annotated[Path, typer.Argument(help="A model folder (any format qconvert writes) or a .gguf file.")],
    runtime: Annotated[Runtime, typer.Option("--runtime", help="The runtime that is to load it.")],
    forward: Annotated[
        bool,
        typer.Option(
            "--forward",
            help=(
                "Also load the weights in the runtime and compare its logits on a few tokens with qconvert's "
                "dequantized model."
            ),
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Check that a runtime would load the model: config, tensor names, dtypes, shapes and schemes its
    loaders and kernels accept, and for transformers its own loading path run on the meta device (every
    weight it would leave missing or ignore). Exit 3, with every problem and its tensor, if not."""
    from qconvert.compatibility import check as check_runtime
    from qconvert.errors import VerificationError

    def action() -> int:
        found, problems = check_runtime(path, runtime.value, forward=forward)
        if as_json:
            print(
                json.dumps(
                    {
                        "ok": not problems,
                        "format": found,
                        "runtime": runtime.value,
                        "problems": [p.to_dict() for p in problems],
                    },
                    sort_keys=True,
                )
            )
        else:
            _print_problems(
                [f"{p.tensor + ': ' if p.tensor else ''}{p.message}" for p in problems],
                f"{path} ({found}) has what {runtime.value} needs",
            )
        return VerificationError.exit_code if problems else 0

    _run(action)


def _print_problems(problems: list[str], all_good: str) -> None:
    """One ✗ line per problem on stderr, or one ✓ line when there are none."""
    for problem in problems:
        _say("✗", "red", problem)
    if not problems:
        _say("✓", "green", all_good)


@app.command()
def quantizers(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List the registered quantizers, built in and from installed plugins."""
    from qconvert.quantizers import registry

    def action() -> None:
        rows = []
        for name in registry.available():
            try:
                cls = registry.get(name)
                rows.append(
                    {
                        "name": name,
                        "class": f"{cls.__module__}.{cls.__qualname__}",
                        "calibration": cls.requires_calibration,
                        "description": cls.description,
                        "error": None,
                    }
                )
            except QConvertError as exc:
                rows.append({"name": name, "class": None, "calibration": None, "description": "", "error": str(exc)})
        if as_json:
            print(json.dumps(rows))
            return
        table = Table("name", "class", "needs calibration", "description")
        for r in rows:
            table.add_row(
                r["name"],
                r["class"] or Text("failed to load", style="red"),
                "" if r["error"] else ("yes" if r["calibration"] else "no"),
                r["error"] or r["description"],
            )
        _stdout().print(table)

    _run(action)


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
        "--kernels/--no-kernels", help="Use torch's int8/int4 CPU kernels (bfloat16 activations) or exact float32."
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
        result = evaluate(model_path, read_text(text, dataset), settings, baseline, tokenizer)
        if as_json:
            print(json.dumps(result.to_dict(), sort_keys=True))
        else:
            _print_eval(result)
        check_quality_gate(result, max_ppl_increase, max_kld, max_ppl)

    _run(action)


def _print_eval(result) -> None:
    table = Table(title=f"{result.model} ({result.kind})", show_header=False)
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
        ("peak RSS", f"{result.peak_rss_bytes / 1e6:.0f} MB"),
        ("prefill", f"{result.prefill_tokens_per_s:.1f} tokens/s"),
        ("decode", f"{result.decode_ms_per_token:.1f} ms/token"),
    ]
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
        typer.Option(help="Calibration text for calibrated quantizers (gptq).", rich_help_panel="Calibration"),
    ] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.", rich_help_panel="Calibration")] = 128,
    calib_seqlen: Annotated[
        int, typer.Option(help="Tokens per calibration window.", rich_help_panel="Calibration")
    ] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
) -> None:
    """Convert at every setting, evaluate each and the float model on the same text, and draw the trade-off."""
    from qconvert.calibration.samples import CalibrationSettings
    from qconvert.evaluate.evaluation import EvalSettings
    from qconvert.evaluate.report import require_plotting, write_report
    from qconvert.evaluate.sweep import rows_as_dicts, run_sweep, setting_grid
    from qconvert.io.text import read_text

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
        )
        settings = EvalSettings(
            ctx=ctx, max_tokens=max_tokens or None, decode_tokens=decode_tokens, use_kernels=kernels
        )
        read_text(text, dataset)  # fail early on a bad text source
        require_plotting()
        eval_args = ["--text", str(text.resolve())] if text else ["--dataset", str(dataset)]
        rows = run_sweep(
            source,
            grid,
            output,
            eval_args,
            settings,
            reference or [],
            log=lambda line: stderr.print(line, highlight=False),
        )
        context = {
            "source": str(source),
            "text": str(text or dataset),
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

    _run(action)


if __name__ == "__main__":
    app()
