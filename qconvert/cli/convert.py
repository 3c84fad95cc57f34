"""`qconvert model`, `plan` and `recipe check`: convert a checkpoint, or show what converting it would do."""

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from qconvert.cli.common import (
    BitsOption,
    CalibOption,
    CalibSamplesOption,
    CalibSeqlenOption,
    ExcludeOption,
    FloatDtype,
    GroupOption,
    IncludeOption,
    LayoutChoice,
    OutputFormat,
    OutputOption,
    QuantizerOption,
    RecipeOption,
    ScaleDtype,
    SymmetricOption,
    TargetBpwOption,
    TargetSizeOption,
    app,
    print_export,
    run_command,
    say,
    stderr,
    stdout_console,
)
from qconvert.cli.progress import block_progress, progress_bar
from qconvert.formats import Format


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
        LayoutChoice, typer.Option(help="auto: compressed-tensors when it can hold the scheme, else native.")
    ] = LayoutChoice("auto"),
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
    ] = OutputFormat("qconvert"),
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
        settings = _settings(
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
                layout=Format.COMPRESSED_TENSORS.value
                if output_format.value == Format.COMPRESSED_TENSORS
                else layout.value,
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
        with EventLog(events) as log, progress_bar("converting") as report, block_progress() as block_report:

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
            say("warning:", "yellow", warning)
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
            print_export(exported)
        else:
            stderr.print(
                f"wrote {result.output} ({result.manifest.layout} layout): "
                f"{totals['stored_bytes'] / 1e6:.1f} MB, {totals['quantized_bits_per_weight']} bits per "
                "quantized weight, "
                f"{totals['bits_per_weight']} overall",
                highlight=False,
            )

    run_command(action)


def _requantized_warning(manifest) -> list[str]:
    """One sentence when weights of an already-quantized source could not move exactly."""
    from qconvert.manifest import REQUANTIZED

    redone = [t for t in manifest.tensors if t.origin == REQUANTIZED]
    if not redone:
        return []
    return [
        f"{len(redone)} weights were dequantized and quantized again from the quantized source (its grid is not "
        f"the one asked for), so they are not an exact copy; ask for the source's own grid to repack them losslessly."
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
    from qconvert.calibration.store import calibration_folder, finished_blocks
    from qconvert.conversion import default_output, source_paths
    from qconvert.formats.export import default_destination, export
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
            if not finished_blocks(calibration_folder(scratch / "qconvert")):
                remove_path(scratch)
            raise
        except BaseException:
            remove_path(scratch)
            raise
        remove_path(scratch)


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
                say("✓", "green", f"{file}: valid; {len(recipe.rules)} rules, defaults {recipe.defaults}")
            return
        _print_plan(model_source, _settings(file, {}, {}), full, as_json)

    run_command(action)


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
        settings = _settings(
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

    run_command(action)


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
    out = stdout_console()
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
            say("✗", "red", problem, out)


def _gb(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1e9:.2f} GB"


def _settings(recipe: Path | None, flags: dict, calibration_flags: dict):
    from qconvert.settings import settings_from_options  # imports torch: not at --help time

    return settings_from_options(recipe, flags, calibration_flags)
