"""`qconvert plan` and `recipe check`: what a conversion would do to each tensor, from headers alone."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from qconvert.cli.common import app, run_command, say, settings_from_flags, stdout_console
from qconvert.cli.options import (
    ActivationsOption,
    BitsOption,
    BudgetGridsOption,
    CalibOption,
    CalibSamplesOption,
    CalibSeqlenOption,
    ExcludeOption,
    FullOption,
    GridOption,
    GroupOption,
    IncludeOption,
    JsonOption,
    OutputOption,
    QuantizerOption,
    RecipeOption,
    SmoothOption,
    SymmetricOption,
    TargetBpwOption,
    TargetSizeOption,
)

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
    full: FullOption = False,
    as_json: JsonOption = False,
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
        _print_plan(model_source, settings_from_flags(file, {}, {}), full, as_json)

    run_command(action)


@app.command()
def plan(
    source: Annotated[str, typer.Argument(help="Checkpoint folder, .safetensors/.bin file, or cached hub id.")],
    output: OutputOption = None,
    recipe: RecipeOption = None,
    bits: BitsOption = None,
    grid: GridOption = None,
    activations: ActivationsOption = None,
    smooth: SmoothOption = None,
    group_size: GroupOption = None,
    symmetric: SymmetricOption = None,
    quantizer: QuantizerOption = None,
    target_bpw: TargetBpwOption = None,
    target_size: TargetSizeOption = None,
    budget_grids: BudgetGridsOption = None,
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    calib: CalibOption = None,
    calib_samples: CalibSamplesOption = None,
    calib_seqlen: CalibSeqlenOption = None,
    full: FullOption = False,
    as_json: JsonOption = False,
) -> None:
    """Predict a conversion before running it: output size, bits per weight, peak memory, disk and time."""

    def action() -> None:
        settings = settings_from_flags(
            recipe,
            dict(
                quantizer=quantizer,
                bits=bits,
                grid=grid,
                activations=activations,
                smooth=smooth,
                group_size=group_size,
                symmetric=symmetric,
                target_bpw=target_bpw,
                target_size=target_size,
                budget_grids=budget_grids,
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
            f"{_gb(prediction.free_disk_bytes)}), about {prediction.seconds:.0f} s "
            f"(± {prediction.seconds_tolerance:.0%}).",
            highlight=False,
        )
        for problem in prediction.problems():
            say("✗", "red", problem, out)


def _gb(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1e9:.2f} GB"
