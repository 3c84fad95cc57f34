"""Convert a checkpoint: plan every tensor from headers alone, then stream them through a quantizer.

Memory stays near the largest single tensor: each one is read, quantized, packed, written, hashed
and dropped before the next is read.
"""

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from qconvert import __version__
from qconvert.calibration.pipeline import BlockProgress, CalibratedResults, calibrate, resolved_settings
from qconvert.calibration.store import BlockStore, calibration_folder, finished_blocks
from qconvert.compatibility import publish_check
from qconvert.errors import SchemeError
from qconvert.formats.base import Layout
from qconvert.heap import reuse_freed_memory
from qconvert.io import hashing
from qconvert.io.loading import Checkpoint, SourceBytes
from qconvert.io.quantized_sources import QuantizedCheckpoint
from qconvert.io.sources import open_checkpoint
from qconvert.io.threads import BackgroundWorker, prefetched
from qconvert.io.writing import (
    SafetensorsStreamWriter,
    TensorSpec,
    check_destination,
    output_lock,
    remove_path,
    shard_file_names,
    split_into_shards,
    staged_output,
    write_json,
)
from qconvert.manifest import (
    MANIFEST_FILE,
    METADATA_KEY,
    REPACKED,
    REQUANTIZED,
    RESCALED,
    Manifest,
    StoredRecord,
    TensorRecord,
)
from qconvert.plan.planning import ConversionPlan, PlannedTensor, kept_dtype, plan_conversion
from qconvert.quantizers.base import SCALE_DTYPES, QuantConfig, QuantizedTensor, relative_error
from qconvert.quantizers.grids import GRIDS, ScaleRangeError
from qconvert.settings import Settings, settings_dict

# Called after each source tensor with (its manifest record, source bytes done, source bytes in all, tensors in all).
ProgressCallback = Callable[[TensorRecord, int, int, int], None]


@dataclass
class ConversionResult:
    output: Path
    manifest: Manifest
    files: list[Path] = field(default_factory=list)
    runtime_check: dict | None = None  # transformers' loading of the output, when it was checked


def default_output(source: str, settings: Settings) -> Path:
    """`<source>-<scheme>` beside a local source; in the working folder for a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        base = path.with_suffix("") if path.is_file() else path
        return base.with_name(f"{base.name}-{settings.suffix()}")
    return Path(f"{source.split('/')[-1]}-{settings.suffix()}")


def convert(
    source: str | Path,
    output: str | Path | None = None,
    settings: Settings | None = None,
    *,
    force: bool = False,
    revision: str | None = None,
    command: list[str] | None = None,
    progress: ProgressCallback | None = None,
    calibration_progress: BlockProgress | None = None,
    check_resources: bool = False,
    check_runtime: bool = True,
) -> ConversionResult:
    """Quantize the checkpoint at `source` into a qconvert output folder.

    Args:
        source: a checkpoint folder, a .safetensors/.bin file, or a cached hub id.
        output: the folder to create; default `<source>-<scheme>` (see `default_output`).
        settings: what to do; default 4-bit round-to-nearest, groups of 64, asymmetric.
        force: replace `output` if it exists.
        revision: hub revision, for a hub id.
        command: the command line to record in the manifest.
        progress: called after every tensor.
        calibration_progress: called at every stage of every block, for calibrated quantizers.
        check_resources: refuse to start when the predicted memory or disk exceeds what is free.
        check_runtime: before publishing a compressed-tensors output, run transformers' loading of it on
            the meta device and refuse it if any weight would be missing or ignored.

    Returns:
        The output folder, its manifest and the files written.

    Raises:
        QConvertError: bad source, settings or output; nothing is left at `output`, and the source is
            never written: an `output` that is, contains or lies inside the source is refused.
        VerificationError: with `check_runtime`, transformers would load the output wrongly.
    """
    settings = settings or Settings()
    checkpoint = open_checkpoint(source, revision)
    hashing.start(checkpoint.files)  # the manifest's checksums, on another core while tensors are converted
    destination = Path(output) if output else default_output(str(source), settings)
    protected = source_paths(checkpoint)
    check_destination(destination, force, protected)
    plan = planned_with_budget(checkpoint, settings)
    settings = _with_calibration_dtype(settings, checkpoint, plan)
    if check_resources:
        from qconvert.plan.prediction import check_resources as check
        from qconvert.plan.prediction import predict

        check(predict(checkpoint, plan, settings, destination))
    layout = plan.layout
    shards, file_names, manifest = _prepare(checkpoint, plan, settings, command)
    with output_lock(destination), _calibration_kept_only_when_interrupted(destination):
        with staged_output(destination, force, protected) as staging:
            calibrated = _calibrate(checkpoint, plan, settings, destination, calibration_progress)
            if calibrated is not None and calibrated.records():
                manifest.training = {"blocks": calibrated.records()}
            writers = _open_writers(staging, file_names, shards, manifest)
            try:
                _stream(checkpoint, plan, settings, writers, progress, calibrated)
            except BaseException:
                for writer in writers:
                    writer.close()
                raise
            manifest.source = _describe_source(checkpoint)  # the weights were hashed while being read
            manifest.compute_totals()
            metadata = {"format": "pt", METADATA_KEY: manifest.to_json()}
            for writer in writers:
                writer.finish(metadata)
            _write_sidecars(staging, checkpoint, manifest, layout, file_names, shards)
            runtime_check = (
                publish_check(staging, destination, layout.name, checkpoint.folder) if check_runtime else None
            )
        remove_path(calibration_folder(destination))
    return ConversionResult(destination, manifest, [destination / n for n in file_names], runtime_check)


def _prepare(
    checkpoint: Checkpoint, plan: ConversionPlan, settings: Settings, command: list[str] | None
) -> tuple[list[list[TensorSpec]], list[str], Manifest]:
    """The output's shards, their file names, and the manifest to fill in (each record naming its file)."""
    shards = split_into_shards([p.specs for p in plan.tensors], settings.max_shard_size)
    file_names = shard_file_names(len(shards))
    for file_name, shard in zip(file_names, shards):
        for spec in shard:
            _stored_record(plan.tensors, spec.name).file = file_name
    manifest = Manifest(
        qconvert_version=__version__,
        layout=plan.layout.name,
        source=_describe_source(checkpoint, placeholder=True),
        settings=settings_dict(settings),
        tensors=[p.record for p in plan.tensors],
        command=command,
    )
    return shards, file_names, manifest


# (source, staging folder, settings, shard index, command) for `convert_part`, run where `run_parts` runs it
PartCall = tuple[str, str, Settings, int, "list[str] | None"]


def convert_in_parts(
    source: str | Path,
    output: str | Path,
    settings: Settings,
    run_parts: Callable[[list[PartCall]], list[dict]],
    *,
    force: bool = False,
    command: list[str] | None = None,
    check_runtime: bool = True,
) -> ConversionResult:
    """`convert`, with each output shard (`settings.max_shard_size`) written by an independent call of
    `convert_part`, which `run_parts` runs (one after another here; on a cluster, one task each, where
    every node sees the source and the output's folder). This process then writes the one manifest into
    every shard's header, the index and the sidecars, checks and publishes: the output is byte-identical
    to `convert`'s.

    Raises:
        SchemeError: a calibrated quantizer, whose blocks form a chain rather than independent parts;
            anything `convert` raises.
    """
    checkpoint = open_checkpoint(source)
    destination = Path(output)
    protected = source_paths(checkpoint)
    check_destination(destination, force, protected)
    plan = planned_with_budget(checkpoint, settings)
    if plan.calibrated is not None:
        raise SchemeError(
            f"{plan.calibrated.name} calibrates block after block, each from the previous block's quantized "
            "outputs, so its conversion cannot be split into independent parts; run it on one machine."
        )
    if settings.target_bpw is not None or settings.target_size is not None:
        raise SchemeError(
            "a size budget measures every tensor's error before choosing its bits, which every part would repeat; "
            "convert with a budget on one machine, or give the chosen bits as a recipe."
        )
    shards, file_names, manifest = _prepare(checkpoint, plan, settings, command)
    records = {r.name: r for r in manifest.tensors}
    with output_lock(destination), staged_output(destination, force, protected) as staging:
        # Absolute paths: each part runs in its own process, perhaps on another machine, in another folder.
        where = str(Path(source).resolve()) if Path(source).exists() else str(source)
        calls = [(where, str(staging.resolve()), settings, index, command) for index in range(len(shards))]
        for part in run_parts(calls):
            for name, fields in part.items():
                record = records[name]
                record.relative_mse, record.input_scale = fields["relative_mse"], fields["input_scale"]
                record.origin = fields["origin"]
                for stored_name, digest in fields["sha256"].items():
                    record.stored[stored_name].sha256 = digest
        manifest.source = _describe_source(checkpoint)
        manifest.compute_totals()
        metadata = {"format": "pt", METADATA_KEY: manifest.to_json()}
        reserve = _metadata_reserve(manifest)
        for file_name, shard in zip(file_names, shards):
            SafetensorsStreamWriter.reopen(staging / file_name, shard, reserve).finish(metadata)
        _write_sidecars(staging, checkpoint, manifest, plan.layout, file_names, shards)
        runtime_check = (
            publish_check(staging, destination, plan.layout.name, checkpoint.folder) if check_runtime else None
        )
    return ConversionResult(destination, manifest, [destination / n for n in file_names], runtime_check)


def convert_part(source: str, staging: str, settings: Settings, index: int, command: list[str] | None) -> dict:
    """Write the tensors of output shard `index` into `staging`, leaving its header's metadata for
    `convert_in_parts`; return each tensor's record fields (errors, origins, stored checksums)."""
    checkpoint = open_checkpoint(source)
    plan = planned_with_budget(checkpoint, settings)
    shards, file_names, manifest = _prepare(checkpoint, plan, settings, command)
    mine = {spec.name for spec in shards[index]}
    tensors = [p for p in plan.tensors if any(spec.name in mine for spec in p.specs)]
    writer = SafetensorsStreamWriter(Path(staging) / file_names[index], shards[index], _metadata_reserve(manifest))
    try:
        _stream(checkpoint, plan, settings, [writer], None, None, tensors)
    finally:
        writer.close()
    return {
        p.record.name: {
            "relative_mse": p.record.relative_mse,
            "input_scale": p.record.input_scale,
            "origin": p.record.origin,
            "sha256": {n: stored.sha256 for n, stored in p.record.stored.items()},
        }
        for p in tensors
    }


def source_paths(checkpoint: Checkpoint) -> list[Path]:
    """What an output must never replace or lie inside: the source folder (or file) and its weight files."""
    return [checkpoint.folder or checkpoint.files[0], *checkpoint.files]


@contextmanager
def _calibration_kept_only_when_interrupted(destination: Path) -> Iterator[None]:
    """On an error, remove the calibration store; on an interruption keep it only when at least one block
    is finished (a rerun resumes from it), and say so on the exception for the command line to print."""
    try:
        yield
    except KeyboardInterrupt as exc:
        store = calibration_folder(destination)
        finished = finished_blocks(store)
        if finished:
            exc.qconvert_note = (
                f"The calibration of {finished} finished blocks is kept in {store}: the same command "
                f"resumes from there; delete that folder to discard it."
            )
        else:
            remove_path(store)
        raise
    except BaseException:
        remove_path(calibration_folder(destination))
        raise


def planned_with_budget(checkpoint: Checkpoint, settings: Settings) -> ConversionPlan:
    """The conversion plan; under --target-bpw / --target-size, with each tensor's bits chosen to fit."""
    plan = plan_conversion(checkpoint, settings)
    if settings.target_bpw is None and settings.target_size is None:
        return plan
    from qconvert.plan.allocation import Sensitivity

    sensitivity = Sensitivity(checkpoint, plan, settings)
    # A mix of widths may change the layout (and so the bytes of each width): price it in the new one.
    for _ in range(3):
        allocated = plan_conversion(checkpoint, settings, sensitivity.allocate(plan, settings))
        if allocated.layout.name == plan.layout.name:
            return allocated
        plan = allocated
    return allocated


def _calibrated_configs(plan: ConversionPlan) -> dict:
    return {
        p.record.name: p.scheme.config for p in plan.tensors if p.scheme and plan.quantizer_of(p).requires_calibration
    }


def _with_calibration_dtype(settings: Settings, checkpoint: Checkpoint, plan: ConversionPlan) -> Settings:
    """`settings` with the calibration's "auto" compute dtype decided, so the manifest says which was used."""
    if plan.calibrated is None or settings.calibration is None:
        return settings
    chosen = resolved_settings(settings.calibration, checkpoint, plan.calibrated, _calibrated_configs(plan))
    return dataclasses.replace(settings, calibration=chosen)


def _calibrate(
    checkpoint: Checkpoint, plan: ConversionPlan, settings: Settings, destination: Path, progress: BlockProgress | None
) -> CalibratedResults | None:
    """Run the calibration pass of a calibrated quantizer; its results wait in a resumable store."""
    quantizer = plan.calibrated
    if quantizer is None:
        return None
    if settings.calibration is None:
        raise SchemeError(
            f"{quantizer.calibration_use()}: give calibration text with --calib FILE (in a batch job, `calib`)."
        )
    key = {
        "qconvert_version": __version__,
        "settings": settings_dict(settings),
        "source": {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in checkpoint.files},
    }
    store = BlockStore(calibration_folder(destination), key)
    return calibrate(checkpoint, quantizer, _calibrated_configs(plan), settings.calibration, store, progress)


def _stored_record(planned: list[PlannedTensor], stored_name: str) -> StoredRecord:
    for p in planned:
        if stored_name in p.record.stored:
            return p.record.stored[stored_name]
    raise AssertionError(stored_name)


def _open_writers(
    staging: Path, file_names: list[str], shards: list[list[TensorSpec]], manifest: Manifest
) -> list[SafetensorsStreamWriter]:
    reserve = _metadata_reserve(manifest)
    return [SafetensorsStreamWriter(staging / name, shard, reserve) for name, shard in zip(file_names, shards)]


def _metadata_reserve(manifest: Manifest) -> int:
    """Header room for the final metadata: the manifest with every field at its widest."""
    manifest.compute_totals()
    return len(json.dumps({"format": "pt", METADATA_KEY: manifest.widest_json()}))


def _stream(
    checkpoint: Checkpoint,
    plan: ConversionPlan,
    settings: Settings,
    writers: list[SafetensorsStreamWriter],
    progress: ProgressCallback | None,
    calibrated: CalibratedResults | None,
    tensors: list[PlannedTensor] | None = None,
) -> None:
    """Read, quantize and write every tensor (or those given); reading and writing run on their own threads."""
    tensors = plan.tensors if tensors is None else tensors
    writer_of = {spec.name: w for w in writers for spec in w.specs}
    total = sum(checkpoint.tensors[p.record.name].nbytes for p in tensors)
    done = 0
    names = [p.record.name for p in tensors]
    unread = frozenset(p.record.name for p in tensors if _copied_unchanged(p, checkpoint, settings, calibrated))
    background = BackgroundWorker()
    # Two cores fewer for torch: the reader, the writer and the hashing threads keep two busy, and the row
    # blocks are cache-sized. On 2 cores (one torch thread) the 730M Llama converted in 3.8-4.2 s this way
    # against 4.4-4.6 s with two, and in 6.4-6.8 s against 7.1-11.7 s with two busy neighbour processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)) - 2)))
    reuse_freed_memory()
    try:
        for p, (name, tensor) in zip(tensors, prefetched(checkpoint.iter_tensors(names, unread=unread))):
            stored = _convert_one(p, tensor, plan, settings, calibrated, checkpoint)
            background.submit(lambda stored=stored, record=p.record: _write_all(stored, record, writer_of))
            done += checkpoint.tensors[name].nbytes
            if progress:
                progress(p.record, done, total, len(tensors))
    finally:
        torch.set_num_threads(threads)
        background.join()


def _copied_unchanged(
    p: PlannedTensor, checkpoint: Checkpoint, settings: Settings, calibrated: CalibratedResults | None
) -> bool:
    """A kept tensor that leaves as it came (same dtype, not changed by calibration): the writer copies its
    bytes from the source a chunk at a time, so an embedding of any size never sits in memory."""
    info = checkpoint.tensors[p.record.name]
    return (
        p.record.action != "quantized"
        and not isinstance(checkpoint, QuantizedCheckpoint)
        and info.file.suffix == ".safetensors"
        and kept_dtype(info.dtype, settings) == info.dtype
        and (calibrated is None or p.record.name not in calibrated)
    )


def _convert_one(
    p: PlannedTensor,
    tensor: torch.Tensor,
    plan: ConversionPlan,
    settings: Settings,
    calibrated: CalibratedResults | None,
    checkpoint: Checkpoint,
) -> dict[str, torch.Tensor]:
    """The stored tensors for one source tensor; fills in its record's error."""
    record, name = p.record, p.record.name
    result, error = calibrated.result(name) if calibrated is not None and name in calibrated else (None, None)
    if (
        record.action == "quantized"
        and result is None
        and isinstance(checkpoint, QuantizedCheckpoint)
        and name in checkpoint.modules
    ):
        result = _from_quantized_source(checkpoint, name, p.scheme.config, record)
    if record.action == "quantized":
        try:
            q = result if result is not None else plan.quantizer_of(p).quantize(name, tensor, None)
        except ScaleRangeError as exc:
            raise SchemeError(f"tensor {name} {exc}") from exc
        record.relative_mse = error if error is not None else relative_error(tensor, q)
        record.input_scale = None if q.input_scale is None else float(q.input_scale)
        return plan.layout.encode(name, dataclasses.replace(q, activations=record.activations))
    if isinstance(tensor, SourceBytes):  # copied unchanged by the writer (`_copied_unchanged`)
        return {name: tensor}
    if result is not None:  # a kept tensor the quantizer changed, e.g. a norm that absorbed AWQ's scales
        tensor, record.origin = result, RESCALED
    return {name: _cast_kept(name, tensor, kept_dtype(tensor.dtype, settings))}


def _cast_kept(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, refusing a cast that turns finite values into infinities.

    Raises:
        SchemeError: some value lies outside `dtype`'s range.
    """
    cast = tensor.to(dtype)
    if (
        dtype != tensor.dtype
        and cast.is_floating_point()
        and not bool(torch.isfinite(cast).all())
        and bool(torch.isfinite(tensor).all())
    ):
        largest = tensor.abs().max().item()
        raise SchemeError(
            f"tensor {name} holds values up to {largest:.3g}, beyond {str(dtype).removeprefix('torch.')}'s "
            f"largest {torch.finfo(dtype).max:.3g}; drop --dtype or choose a wider one (bfloat16, float32)."
        )
    return cast


def _from_quantized_source(
    checkpoint: QuantizedCheckpoint, name: str, config: QuantConfig, record: TensorRecord
) -> QuantizedTensor | None:
    """The source's own codes and scales when they are on the requested grid (the record's origin
    becomes "repacked"), else None ("requantized": the weight is dequantized and quantized again)."""
    source = checkpoint.quantized(name)
    columns = checkpoint.tensors[name].shape[1]
    same = (
        source is not None
        and source.grid == config.grid  # int4 codes are not nf4 codes: same bits, other values
        and source.bits == config.bits
        and source.group_size == config.group_size_for(columns)
        and (GRIDS[config.grid].scale != "float" or source.scales.dtype == SCALE_DTYPES[config.scale_dtype])
        and (source.zeros is None or not config.symmetric)
    )
    record.origin = REPACKED if same else REQUANTIZED
    if not same:
        return None
    if source.zeros is None and not config.symmetric:  # a symmetric grid is an asymmetric one with centred zeros
        source = dataclasses.replace(
            source, zeros=torch.full(source.scales.shape, 2 ** (source.bits - 1), dtype=torch.uint8)
        )
    return dataclasses.replace(source, dtype=checkpoint.tensors[name].dtype)


def _write_all(stored: dict[str, "torch.Tensor | SourceBytes"], record: TensorRecord, writer_of: dict) -> None:
    for stored_name, tensor in stored.items():
        writer = writer_of[stored_name]
        copy = writer.copy if isinstance(tensor, SourceBytes) else writer.write
        record.stored[stored_name].sha256 = copy(stored_name, tensor)


def _describe_source(checkpoint: Checkpoint, placeholder: bool = False) -> dict:
    files = checkpoint.files + checkpoint.auxiliary_files()
    base = checkpoint.folder or checkpoint.files[0].parent
    return {
        "path": None if checkpoint.hub_id else str(Path(checkpoint.source).expanduser().resolve()),
        "hub_id": checkpoint.hub_id,
        "revision": checkpoint.revision,
        "sha256": {str(f.relative_to(base)): "0" * 64 if placeholder else checkpoint.sha256(f) for f in files},
    }


def _write_sidecars(
    staging: Path,
    checkpoint: Checkpoint,
    manifest: Manifest,
    layout: Layout,
    file_names: list[str],
    shards: list[list[TensorSpec]],
) -> None:
    (staging / MANIFEST_FILE).write_text(manifest.to_json() + "\n")
    if len(file_names) > 1:
        weight_map = {spec.name: file for file, shard in zip(file_names, shards) for spec in shard}
        total = sum(spec.nbytes for shard in shards for spec in shard)
        write_json(
            staging / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    for path in checkpoint.auxiliary_files():
        if path.name != "config.json":
            shutil.copy2(path, staging / path.name)
    config = checkpoint.config
    if config is not None:
        skeleton = checkpoint.skeleton()
        config["quantization_config"] = layout.quantization_config(
            manifest.tensors, skeleton.runtime_name if skeleton else None
        )
        write_json(staging / "config.json", config)
