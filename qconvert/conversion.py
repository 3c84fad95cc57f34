"""Convert a checkpoint: plan every tensor from headers alone, then stream them through a quantizer.

Memory stays near the largest single tensor: each one is read, quantized, packed, written, hashed
and dropped before the next is read.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qconvert import __version__
from qconvert.calibration.pipeline import BlockProgress, CalibratedResults, calibrate
from qconvert.calibration.samples import CalibrationSettings
from qconvert.calibration.store import BlockStore, calibration_folder
from qconvert.errors import SchemeError
from qconvert.formats import LAYOUT_CHOICES, choose_layout
from qconvert.formats.base import Layout
from qconvert.io.loading import DTYPE_NAMES, FLOAT_DTYPES, Checkpoint, open_checkpoint
from qconvert.io.threads import BackgroundWorker, prefetched
from qconvert.io.writing import (
    SafetensorsStreamWriter, TensorSpec, shard_file_names, split_into_shards, staged_directory, write_json,
)
from qconvert.manifest import MANIFEST_FILE, METADATA_KEY, Manifest, StoredRecord, TensorRecord
from qconvert.quantizers import QuantConfig, Quantizer, get
from qconvert.quantizers.base import relative_error
from qconvert.selection import compile_patterns, decide

PASSTHROUGH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Called after each source tensor with (tensor name, source bytes done, source bytes in all).
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output; recorded in the manifest."""

    quantizer: str = "rtn"
    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    scale_dtype: str = "float16"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dtype: str | None = None  # cast for kept float tensors; None keeps the source dtype
    layout: str = "auto"
    max_shard_size: int | None = None  # bytes
    options: dict = field(default_factory=dict)  # the quantizer's own options, e.g. {"act_order": True}
    calibration: CalibrationSettings | None = None  # for quantizers that need activations

    def __post_init__(self) -> None:
        if self.layout not in LAYOUT_CHOICES:
            raise SchemeError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUT_CHOICES)}.")
        if self.dtype is not None and self.dtype not in PASSTHROUGH_DTYPES:
            raise SchemeError(f"--dtype {self.dtype} is not supported; choose one of {', '.join(PASSTHROUGH_DTYPES)}.")
        if self.max_shard_size is not None and self.max_shard_size <= 0:
            raise SchemeError("--max-shard-size must be positive.")

    @property
    def config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                           scale_dtype=self.scale_dtype)

    def suffix(self) -> str:
        """Folder-name suffix, e.g. "int4-g64" or "rtn-int3-ch-sym"."""
        parts = [] if self.quantizer == "rtn" else [self.quantizer]
        parts += [f"int{self.bits}", f"g{self.group_size}" if self.group_size else "ch"]
        return "-".join(parts + (["sym"] if self.symmetric else []))


@dataclass
class ConversionResult:
    output: Path
    manifest: Manifest
    files: list[Path] = field(default_factory=list)


@dataclass
class _Planned:
    record: TensorRecord
    specs: list[TensorSpec]


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

    Returns:
        The output folder, its manifest and the files written.

    Raises:
        QConvertError: bad source, settings or output; nothing is left at `output`.
    """
    settings = settings or Settings()
    checkpoint = open_checkpoint(source, revision)
    quantizer = _quantizer(settings)
    destination = Path(output) if output else default_output(str(source), settings)
    planned, layout = _plan(checkpoint, settings, quantizer)
    shards = split_into_shards([p.specs for p in planned], settings.max_shard_size)
    file_names = shard_file_names(len(shards))
    for file_name, shard in zip(file_names, shards):
        for spec in shard:
            _stored_record(planned, spec.name).file = file_name
    manifest = Manifest(
        qconvert_version=__version__,
        layout=layout.name,
        source=_describe_source(checkpoint, placeholder=True),
        settings=settings_dict(settings),
        tensors=[p.record for p in planned],
        command=command,
    )
    with staged_directory(destination, force) as staging:
        calibrated = _calibrate(checkpoint, quantizer, planned, settings, destination, calibration_progress)
        writers = _open_writers(staging, file_names, shards, manifest)
        try:
            _stream(checkpoint, planned, quantizer, layout, settings, writers, progress, calibrated)
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
    if calibrated is not None:
        calibrated.store.remove()
    return ConversionResult(destination, manifest, [destination / n for n in file_names])


def _quantizer(settings: Settings) -> Quantizer:
    quantizer = get(settings.quantizer)(settings.config, **settings.options)
    if quantizer.requires_calibration and settings.calibration is None:
        raise SchemeError(f"quantizer {quantizer.name!r} learns from activations: give calibration text with --calib FILE.")
    if not quantizer.requires_calibration and settings.calibration is not None:
        raise SchemeError(f"quantizer {quantizer.name!r} uses no calibration data; drop --calib or choose gptq.")
    return quantizer


def _calibrate(checkpoint: Checkpoint, quantizer: Quantizer, planned: list[_Planned], settings: Settings,
               destination: Path, progress: BlockProgress | None) -> CalibratedResults | None:
    """Run the calibration pass of a calibrated quantizer; its results wait in a resumable store."""
    if not quantizer.requires_calibration:
        return None
    key = {"qconvert_version": __version__, "settings": settings_dict(settings),
           "source": {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in checkpoint.files}}
    store = BlockStore(calibration_folder(destination), key)
    selected = [p.record.name for p in planned if p.record.action == "quantized"]
    return calibrate(checkpoint, quantizer, selected, settings.calibration, store, progress)


def _plan(checkpoint: Checkpoint, settings: Settings, quantizer: Quantizer) -> tuple[list[_Planned], Layout]:
    include = compile_patterns(list(settings.include), "--include")
    exclude = compile_patterns(list(settings.exclude), "--exclude")
    decisions = {name: decide(info, include, exclude) for name, info in checkpoint.tensors.items()}
    for name, decision in decisions.items():
        info = checkpoint.tensors[name]
        if decision.quantize and info.dtype not in FLOAT_DTYPES:
            raise SchemeError(f"tensor {name} has dtype {info.dtype}; qconvert quantizes float32, float16 and bfloat16 weights only.")
    quantized = [(n, checkpoint.tensors[n].shape, settings.config) for n, d in decisions.items() if d.quantize]
    if not quantized:
        raise SchemeError(f"no tensor in {checkpoint.source} is selected for quantization; use --include to pick some.")
    layout = choose_layout(settings.layout, quantized)
    planned = []
    for name, info in checkpoint.tensors.items():
        decision = decisions[name]
        record = TensorRecord(name=name, shape=list(info.shape), source_dtype=DTYPE_NAMES[info.dtype],
                              action="quantized" if decision.quantize else "kept", reason=decision.reason, stored={})
        if decision.quantize:
            config = settings.config
            record.quantizer, record.quantizer_version = quantizer.name, quantizer.version
            record.bits, record.group_size = config.bits, config.group_size_for(info.shape[1])
            record.symmetric, record.scale_dtype = config.symmetric, config.scale_dtype
            record.relative_mse = 1.23456e-100  # widest value, so the reserved header room suffices
            specs = layout.specs(name, info.shape, config)
        else:
            dtype = _kept_dtype(info.dtype, settings)
            specs = [TensorSpec(name, DTYPE_NAMES[dtype], info.shape)]
        record.stored = {s.name: StoredRecord(s.dtype, list(s.shape), s.nbytes, "0" * 64) for s in specs}
        planned.append(_Planned(record, specs))
    return planned, layout


def _kept_dtype(dtype: torch.dtype, settings: Settings) -> torch.dtype:
    if settings.dtype is None or dtype not in FLOAT_DTYPES:
        return dtype
    return PASSTHROUGH_DTYPES[settings.dtype]


def _stored_record(planned: list[_Planned], stored_name: str) -> StoredRecord:
    for p in planned:
        if stored_name in p.record.stored:
            return p.record.stored[stored_name]
    raise AssertionError(stored_name)


def _open_writers(staging: Path, file_names: list[str], shards: list[list[TensorSpec]], manifest: Manifest) -> list[SafetensorsStreamWriter]:
    manifest.compute_totals()
    placeholder = {"format": "pt", METADATA_KEY: manifest.to_json()}
    # Totals and checksums change length a little once known; reserve generously.
    reserve = len(json.dumps(placeholder)) + 16 * len(manifest.tensors) + 1024
    return [SafetensorsStreamWriter(staging / name, shard, reserve) for name, shard in zip(file_names, shards)]


def _stream(checkpoint: Checkpoint, planned: list[_Planned], quantizer: Quantizer, layout: Layout,
            settings: Settings, writers: list[SafetensorsStreamWriter], progress: ProgressCallback | None,
            calibrated: CalibratedResults | None) -> None:
    """Read, quantize and write every tensor; reading and writing run on their own threads."""
    writer_of = {spec.name: w for w in writers for spec in w.specs}
    total = sum(checkpoint.tensors[p.record.name].nbytes for p in planned)
    done = 0
    names = [p.record.name for p in planned]
    background = BackgroundWorker()
    try:
        for p, (name, tensor) in zip(planned, prefetched(checkpoint.iter_tensors(names))):
            record = p.record
            result, error = calibrated.result(name) if calibrated is not None and name in calibrated else (None, None)
            if record.action == "quantized":
                q = result if result is not None else quantizer.quantize(name, tensor, None)
                record.relative_mse = error if error is not None else relative_error(tensor, q)
                stored = layout.encode(name, q)
            else:
                if result is not None:  # a kept tensor the quantizer changed, e.g. a norm that absorbed AWQ's scales
                    tensor, record.reason = result, f"{record.reason}; rescaled by {quantizer.name}"
                stored = {name: tensor.to(_kept_dtype(tensor.dtype, settings))}
            background.submit(lambda stored=stored, record=record: _write_all(stored, record, writer_of))
            done += checkpoint.tensors[name].nbytes
            if progress:
                progress(name, done, total)
    finally:
        background.join()


def _write_all(stored: dict[str, torch.Tensor], record: TensorRecord, writer_of: dict) -> None:
    for stored_name, tensor in stored.items():
        record.stored[stored_name].sha256 = writer_of[stored_name].write(stored_name, tensor)


def _describe_source(checkpoint: Checkpoint, placeholder: bool = False) -> dict:
    files = checkpoint.files + checkpoint.auxiliary_files()
    base = checkpoint.folder or checkpoint.files[0].parent
    return {
        "path": None if checkpoint.hub_id else str(Path(checkpoint.source).expanduser().resolve()),
        "hub_id": checkpoint.hub_id,
        "revision": checkpoint.revision,
        "sha256": {str(f.relative_to(base)): "0" * 64 if placeholder else checkpoint.sha256(f) for f in files},
    }


def settings_dict(settings: Settings) -> dict:
    return {
        "quantizer": settings.quantizer, "bits": settings.bits, "group_size": settings.group_size,
        "symmetric": settings.symmetric, "scale_dtype": settings.scale_dtype, "include": list(settings.include),
        "exclude": list(settings.exclude), "dtype": settings.dtype, "layout": settings.layout,
        "max_shard_size": settings.max_shard_size, "options": dict(sorted(settings.options.items())),
        "calibration": settings.calibration.describe() if settings.calibration else None,
    }


def _write_sidecars(staging: Path, checkpoint: Checkpoint, manifest: Manifest, layout: Layout,
                    file_names: list[str], shards: list[list[TensorSpec]]) -> None:
    (staging / MANIFEST_FILE).write_text(manifest.to_json() + "\n")
    if len(file_names) > 1:
        weight_map = {spec.name: file for file, shard in zip(file_names, shards) for spec in shard}
        total = sum(spec.nbytes for shard in shards for spec in shard)
        write_json(staging / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    for path in checkpoint.auxiliary_files():
        if path.name != "config.json":
            shutil.copy2(path, staging / path.name)
    config = checkpoint.config
    if config is not None:
        config["quantization_config"] = layout.quantization_config(manifest.tensors)
        write_json(staging / "config.json", config)
