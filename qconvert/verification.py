"""`qconvert verify`: re-read an output and check it against its manifest.

A manifest is evidence only if it cannot be edited unnoticed: the copy in `qconvert.json` and the one
embedded in every weights file must agree, and every stored tensor's name, dtype, shape and size must
follow from the scheme the manifest records for it (bits, group size, symmetric, scale dtype, kept or
quantized), re-derived here with the layout's own rules, not read from the manifest's own listing.
Sizes for the `--max-bpw` / `--max-size` gates are recomputed from the files (`measured_totals`).
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from qconvert.errors import QConvertError
from qconvert.formats.base import record_config
from qconvert.formats.registry import LAYOUTS, get_layout
from qconvert.io.dtypes import DTYPE_NAMES, FLOAT_DTYPES, SAFETENSORS_DTYPES
from qconvert.manifest import (
    KEPT,
    METADATA_KEY,
    QUANTIZED,
    REPACKED,
    REQUANTIZED,
    RESCALED,
    Manifest,
    TensorRecord,
    read_manifest,
)
from qconvert.output import iter_records, quantized_tensor
from qconvert.quantizers import dequantize
from qconvert.quantizers.grids import GRIDS, effective_scales
from qconvert.settings import PASSTHROUGH_DTYPES


def verify_output(output: Path) -> tuple[list[str], int]:
    """Check both manifest copies agree, every stored tensor follows from its recorded scheme, every
    checksum, dtype and shape, and that quantized tensors unpack.

    Returns:
        (problems, number of source tensors checked); no problems means the output is sound.
    """
    manifest = read_manifest(output)
    problems = (
        _copies_disagree(output) + _unlisted_tensors(output, manifest) + _underived(manifest) + _unexplained(manifest)
    )
    checked = 0
    try:
        for record, stored in iter_records(output, manifest):
            checked += 1
            for name, tensor in stored.items():
                expected = record.stored[name]
                actual = (DTYPE_NAMES.get(tensor.dtype), list(tensor.shape))
                if actual != (expected.dtype, expected.shape):
                    problems.append(f"{name}: stored as {actual}, manifest says {(expected.dtype, expected.shape)}")
                    continue
                digest = hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                if digest != expected.sha256:
                    problems.append(
                        f"{name}: sha256 {digest[:12]}… does not match the manifest's {expected.sha256[:12]}…"
                    )
            if record.action == "quantized" and not any(p.startswith(tuple(stored)) for p in problems):
                problems.extend(_check_quantized(manifest, record, stored))
    except QConvertError as exc:
        problems.append(str(exc))
    measured = measured_totals(output) if not problems and output.is_dir() else manifest.totals
    if measured != manifest.totals:
        problems.append(f"the manifest's totals {manifest.totals} are not those of the files {measured}")
    return problems, checked


def _check_quantized(manifest, record, stored) -> list[str]:
    try:
        q = quantized_tensor(manifest, record, stored)
        weight = dequantize(q)
    except Exception as exc:  # any failure to unpack is what verify exists to report
        return [f"{record.name}: does not unpack ({exc})"]
    problems = []
    if list(weight.shape) != record.shape:
        problems.append(f"{record.name}: unpacks to {list(weight.shape)}, manifest says {record.shape}")
    scales = effective_scales(q.scales, q.grid, q.global_scale)
    zero_allowed = GRIDS[q.grid].scale == "e4m3"  # an all-zero nvfp4 block has scale 0; float scales never do
    if not (torch.isfinite(scales).all() and (zero_allowed or (scales != 0).all())):  # symmetric scales carry a sign
        problems.append(f"{record.name}: has zero or non-finite scales")
    return problems


def _unlisted_tensors(output: Path, manifest) -> list[str]:
    folder = output if output.is_dir() else output.parent
    listed: dict[str, set[str]] = {}
    for record in manifest.tensors:
        for name, entry in record.stored.items():
            listed.setdefault(entry.file or "model.safetensors", set()).add(name)
    problems = []
    for file, names in listed.items():
        if Path(file).name != file or not (folder / file).is_file():
            continue  # reported when its tensors are read
        try:
            with safe_open(folder / file, framework="pt") as handle:
                extra = set(handle.keys()) - names
        except Exception as exc:
            problems.append(f"{file}: unreadable ({exc})")
            continue
        if extra:
            problems.append(f"{file}: holds tensors the manifest does not list: {', '.join(sorted(extra)[:5])}")
    return problems


def _copies_disagree(output: Path) -> list[str]:
    """The manifest in qconvert.json against the one embedded in each weights file."""
    if not output.is_dir():
        return []
    sidecar = json.loads(read_manifest(output).to_json())
    files = sorted(
        {
            entry.file or "model.safetensors"
            for record in Manifest.from_json(json.dumps(sidecar)).tensors
            for entry in record.stored.values()
        }
    )
    problems = []
    for file in files:
        if Path(file).name != file or not (output / file).is_file():
            continue  # reported when its tensors are read
        try:
            with safe_open(output / file, framework="pt") as handle:
                embedded = (handle.metadata() or {}).get(METADATA_KEY)
        except Exception as exc:
            problems.append(f"{file}: unreadable ({exc})")
            continue
        if embedded is None:
            problems.append(f"{file}: carries no embedded manifest")
        elif _normalized(embedded) != sidecar:
            problems.append(f"{file}: its embedded manifest differs from qconvert.json (one of them was edited)")
    return problems


def _normalized(text: str) -> dict | None:
    """A manifest's JSON as this qconvert writes it (fields a schema lacks filled with None), or None."""
    try:
        return json.loads(Manifest.from_json(text).to_json())
    except (json.JSONDecodeError, TypeError, KeyError):
        return None


def _underived(manifest: Manifest) -> list[str]:
    """Every record whose stored tensors are not what its recorded scheme makes."""
    if manifest.layout not in LAYOUTS:
        return [f"the manifest names layout {manifest.layout!r}, which qconvert does not write"]
    layout = get_layout(manifest.layout)
    cast = (manifest.settings or {}).get("dtype")
    problems = []
    for record in manifest.tensors:
        try:
            expected = _expected_specs(layout, record, cast)
        except Exception as exc:  # a scheme no layout could have written is itself the finding
            problems.append(f"{record.name}: its recorded scheme is impossible ({exc})")
            continue
        listed = {name: (entry.dtype, list(entry.shape), entry.bytes) for name, entry in record.stored.items()}
        if listed != expected:
            problems.append(
                f"{record.name}: the manifest lists {listed}, but a {record.action} tensor of its "
                f"recorded scheme is stored as {expected}"
            )
    return problems


# What each stored action can have come from (schema 2; schema 1 records carry no origin).
ORIGINS_OF = {"quantized": (QUANTIZED, REPACKED, REQUANTIZED), "kept": (KEPT, RESCALED)}


def _unexplained(manifest: Manifest) -> list[str]:
    """Records of a schema-2 manifest without a decision, or whose origin cannot produce what they store."""
    if manifest.schema_version < 2:
        return []
    problems = []
    for record in manifest.tensors:
        if not record.decided_by:
            problems.append(f"{record.name}: the manifest does not say which rule decided it")
        if record.origin not in ORIGINS_OF.get(record.action, ()):
            problems.append(f"{record.name}: origin {record.origin!r} cannot give a {record.action} tensor")
    return problems


def _expected_specs(layout, record: TensorRecord, cast: str | None) -> dict:
    if record.action == "quantized":
        config = record_config(record)
        if len(record.shape) != 2 or record.group_size != config.group_size_for(record.shape[1]):
            raise ValueError(f"group size {record.group_size} for shape {record.shape}")
        specs = layout.specs(record.name, tuple(record.shape), config)
        return {s.name: (s.dtype, list(s.shape), s.nbytes) for s in specs}
    if record.action != "kept":
        raise ValueError(f"action {record.action!r}")
    source = SAFETENSORS_DTYPES[record.source_dtype]
    dtype = PASSTHROUGH_DTYPES[cast] if cast in PASSTHROUGH_DTYPES and source in FLOAT_DTYPES else source
    count = 1
    for d in record.shape:
        count *= d
    return {record.name: (DTYPE_NAMES[dtype], list(record.shape), count * dtype.itemsize)}


def measured_totals(output: Path) -> dict:
    """Parameters, bytes and bits per weight computed from the files' own headers (not the manifest's
    totals, which an edit could change): what the `--max-bpw` / `--max-size` gates compare."""
    manifest = read_manifest(output)
    folder = output if output.is_dir() else output.parent
    sizes: dict[str, int] = {}
    for file in sorted({e.file or "model.safetensors" for r in manifest.tensors for e in r.stored.values()}):
        with safe_open(folder / file, framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                count = 1
                for d in piece.get_shape():
                    count *= d
                sizes[name] = count * SAFETENSORS_DTYPES[piece.get_dtype()].itemsize
    for record in manifest.tensors:
        for name, entry in record.stored.items():
            entry.bytes = sizes.get(name, 0)
    manifest.compute_totals()
    return manifest.totals
