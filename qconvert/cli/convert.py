"""`qconvert model`: convert a checkpoint, with progress, the event log, and --format exports."""

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from qconvert.cli.common import app, print_export, run_command, say, settings_from_flags, stderr
from qconvert.cli.options import (
    ActivationsOption,
    ActOrderOption,
    BitsOption,
    BudgetGridsOption,
    CalibBatchOption,
    CalibDatasetOption,
    CalibDtypeOption,
    CalibOption,
    CalibSamplesOption,
    CalibSeqlenOption,
    CheckOption,
    ClusterOption,
    DampOption,
    DtypeOption,
    EpochsOption,
    EventsOption,
    ExcludeOption,
    ForceOption,
    FormatOption,
    GridOption,
    GroupOption,
    IncludeOption,
    LayoutChoice,
    LayoutOption,
    LrOption,
    MaxShardOption,
    OutputFormat,
    OutputOption,
    QuantizerOption,
    RecipeOption,
    RevisionOption,
    ScaleDtypeOption,
    ScaleLrOption,
    SeedOption,
    SmoothOption,
    StartOption,
    SymmetricOption,
    TargetBpwOption,
    TargetSizeOption,
)
from qconvert.cli.progress import block_progress, progress_bar
from qconvert.errors import SchemeError
from qconvert.formats import HOLDS_ACTIVATIONS, Format
from qconvert.io import hashing
from qconvert.io.threads import idle_threads_sleep


def quantizer_options(**given) -> dict | None:
    """The quantizer options given on the command line (None: none given; the recipe's or defaults apply)."""
    return {k: v for k, v in given.items() if v is not None} or None


@app.command()
def model(
    source: Annotated[
        str, typer.Argument(help="Checkpoint folder, .safetensors/.bin file, or cached hub id (org/name).")
    ],
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
    dtype: DtypeOption = None,
    scale_dtype: ScaleDtypeOption = None,
    layout: LayoutOption = LayoutChoice("auto"),
    max_shard_size: MaxShardOption = None,
    revision: RevisionOption = None,
    calib: CalibOption = None,
    calib_dataset: CalibDatasetOption = None,
    calib_samples: CalibSamplesOption = None,
    calib_seqlen: CalibSeqlenOption = None,
    calib_batch_size: CalibBatchOption = None,
    calib_dtype: CalibDtypeOption = None,
    seed: SeedOption = None,
    damp: DampOption = None,
    act_order: ActOrderOption = None,
    epochs: EpochsOption = None,
    lr: LrOption = None,
    scale_lr: ScaleLrOption = None,
    start: StartOption = None,
    events: EventsOption = None,
    output_format: FormatOption = OutputFormat("qconvert"),
    force: ForceOption = False,
    check_runtime: CheckOption = True,
    cluster: ClusterOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Quantize a checkpoint into a packed safetensors file with a manifest (or another runtime's format)."""
    idle_threads_sleep()  # before torch is imported
    hashing.start_for_source(source)  # while torch is imported, the other core hashes the source
    to = output_format.value

    def action() -> None:
        options = dict(
            quantizer=quantizer,
            bits=bits,
            grid=grid,
            activations=activations,
            smooth=smooth,
            group_size=group_size,
            symmetric=symmetric,
            scale_dtype=scale_dtype.value if scale_dtype else None,
            include=include,
            exclude=exclude,
            dtype=dtype.value if dtype else None,
            max_shard_size=max_shard_size,
            layout=Format.COMPRESSED_TENSORS.value if to == Format.COMPRESSED_TENSORS else layout.value,
            target_bpw=target_bpw,
            target_size=target_size,
            budget_grids=budget_grids,
            options=quantizer_options(
                damp=damp, act_order=act_order, epochs=epochs, lr=lr, scale_lr=scale_lr, start=start
            ),
        )
        calibration = dict(
            text=calib,
            dataset=calib_dataset,
            samples=calib_samples,
            seqlen=calib_seqlen,
            seed=seed,
            batch_size=calib_batch_size,
            dtype=calib_dtype,
        )
        settings = settings_from_flags(recipe, options, calibration)
        if settings.activations and to != "qconvert" and to not in HOLDS_ACTIVATIONS:
            raise SchemeError(
                f"--format {to} cannot say that a layer's inputs are quantized, so it cannot hold --activations "
                f"{settings.activations}; use --format compressed-tensors (or qconvert), or drop --activations."
            )
        if cluster:
            result = _convert_on_cluster(source, output, settings, to, force, cluster, check_runtime, revision, events)
            exported = None
        else:
            result, exported = _convert_with_progress(
                source, output, settings, to, force, revision, events, check_runtime
            )
        _report_conversion(result, exported, as_json)

    run_command(action)


def _convert_on_cluster(source, output, settings, to: str, force, address: str, check_runtime, revision, events):
    """Each output shard (`--max-shard-size`) converted by its own task on a Ray cluster (`cluster.py`)."""
    from qconvert.cluster import convert_across_cluster
    from qconvert.conversion import default_output

    if to != "qconvert":
        raise SchemeError(f"--cluster writes qconvert's output; convert it with `qconvert export --to {to}` after.")
    if revision or events:
        raise SchemeError("--cluster converts a local checkpoint without an event log; drop --revision and --events.")
    return convert_across_cluster(
        source,
        output or default_output(source, settings),
        settings,
        address,
        force=force,
        command=["qconvert", *sys.argv[1:]],
        check_runtime=check_runtime,
    )


def _convert_with_progress(source, output, settings, to: str, force, revision, events, check_runtime):
    """Convert (and export, for --format gguf, mlx or gptq) with progress bars and the event log:
    (the conversion's result, the export's report or None)."""
    from qconvert.conversion import convert
    from qconvert.events import EventLog

    with EventLog(events) as log, progress_bar("converting") as report, block_progress() as block_report:

        def on_tensor(record, done: int, total: int, count: int) -> None:
            report(record.name, done, total)
            log.tensor(record, done, total, count)

        def on_block(stage: str, done: int, total: int) -> None:
            block_report(stage, done, total)
            log.block(stage, done, total)

        log.start(source, settings)
        with _exported_as(to, source, output, settings, force, revision) as (destination, exporter):
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
    return result, exported


def _report_conversion(result, exported, as_json: bool) -> None:
    """Warnings on stderr, then the JSON summary on stdout or one line on stderr."""
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

        summary = {
            "output": str(exported.destination if exported else result.output),
            "layout": result.manifest.layout,
            "peak_rss_bytes": peak_rss(),
            "files": [str(f) for f in result.files],
            "export": exported.to_dict() if exported else None,
            "warnings": warnings,
            "runtime_check": result.runtime_check,
            **totals,
        }
        print(json.dumps(summary, sort_keys=True))
    elif exported:  # the qconvert output it came from was scratch, and is gone
        print_export(exported)
    else:
        stderr.print(
            f"wrote {result.output} ({result.manifest.layout} layout): "
            f"{totals['stored_bytes'] / 1e6:.1f} MB, {totals['quantized_bits_per_weight']} bits per "
            f"quantized weight, {totals['bits_per_weight']} overall",
            highlight=False,
        )


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
