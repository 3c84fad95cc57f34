"""Rows for `qconvert inspect`: each tensor's scheme, stored bytes and bits per weight."""

import re
from pathlib import Path

from qconvert.io.dtypes import DTYPE_NAMES
from qconvert.io.sources import open_checkpoint
from qconvert.manifest import MANIFEST_FILE, TensorRecord, read_manifest


def scheme_label(record: TensorRecord) -> str:
    if record.action != "quantized":
        dtypes = {s.dtype for s in record.stored.values()}
        return f"kept {'/'.join(sorted(dtypes))}"
    group = f"g{record.group_size}" if record.group_size < record.shape[1] else "per-channel"
    if record.grid not in (None, "int"):
        label = f"{record.quantizer} {record.grid} {group}"
    else:
        label = f"{record.quantizer} int{record.bits} {group} {'sym' if record.symmetric else 'asym'}"
    return label + (f" W8A8 ({record.activations} inputs)" if record.activations else "")


def inspect_rows(path: Path) -> tuple[list[dict], dict]:
    """Per-tensor rows and totals for a qconvert output, or for a plain checkpoint."""
    is_output = (
        (path / MANIFEST_FILE).is_file() if path.is_dir() else path.suffix == ".safetensors" and _has_manifest(path)
    )
    if not is_output:
        return _checkpoint_rows(path)
    manifest = read_manifest(path)
    rows = [
        {
            "name": r.name,
            "scheme": scheme_label(r),
            "shape": r.shape,
            "bytes": r.stored_bytes,
            "bits_per_weight": 8 * r.stored_bytes / max(r.parameters, 1),
            "relative_mse": r.relative_mse,
            "stored": sorted(r.stored),
        }
        for r in manifest.tensors
    ]
    return rows, manifest.totals


def plan_rows(plan) -> tuple[list[dict], dict]:
    """Rows and totals for a conversion plan (`recipe check`, `plan`): what would be done, and which rule decided."""
    rows = [
        {
            "name": p.record.name,
            "scheme": scheme_label(p.record),
            "reason": p.record.reason,
            "shape": p.record.shape,
            "bytes": p.record.stored_bytes,
            "bits_per_weight": 8 * p.record.stored_bytes / max(p.record.parameters, 1),
            "relative_mse": None,
        }
        for p in plan.tensors
    ]
    return rows, plan.totals()


def fold_layers(rows: list[dict]) -> list[dict]:
    """One row per tensor kind: layer numbers replaced by `*`, bytes summed, bits per weight recomputed."""
    folded: dict[tuple, dict] = {}
    for r in rows:
        name = re.sub(r"\.\d+\.", ".*.", r["name"])
        key = (name, r["scheme"], r.get("reason"))
        entry = folded.setdefault(key, {**r, "name": name, "count": 0, "bytes": 0, "parameters": 0, "_error": 0.0})
        entry["count"] += 1
        entry["bytes"] += r["bytes"]
        params = r["bytes"] * 8 / r["bits_per_weight"] if r["bits_per_weight"] else 0
        entry["parameters"] += params
        entry["_error"] += (r["relative_mse"] or 0.0) * params
    for entry in folded.values():
        entry["bits_per_weight"] = 8 * entry["bytes"] / entry["parameters"] if entry["parameters"] else 0.0
        if entry["relative_mse"] is not None:
            entry["relative_mse"] = entry["_error"] / entry["parameters"]  # parameter-weighted mean
        del entry["_error"], entry["parameters"]
    return list(folded.values())


def _has_manifest(path: Path) -> bool:
    try:
        read_manifest(path)
        return True
    except Exception:
        return False


def _checkpoint_rows(path: Path) -> tuple[list[dict], dict]:
    checkpoint = open_checkpoint(path)
    rows = [
        {
            "name": t.name,
            "scheme": f"source {DTYPE_NAMES[t.dtype]}",
            "shape": list(t.shape),
            "bytes": t.nbytes,
            "bits_per_weight": 8.0 * t.dtype.itemsize,
            "relative_mse": None,
            "stored": [t.name],
        }
        for t in checkpoint.tensors.values()
    ]
    params = sum(t.numel for t in checkpoint.tensors.values())
    stored = sum(r["bytes"] for r in rows)
    totals = {
        "parameters": params,
        "stored_bytes": stored,
        "bits_per_weight": round(8 * stored / params, 4),
        "quantized_parameters": 0,
        "quantized_bits_per_weight": None,
    }
    return rows, totals
