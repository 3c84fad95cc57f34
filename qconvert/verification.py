"""`qconvert verify`: re-read an output and check it against its manifest."""

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open

from qconvert.errors import QConvertError
from qconvert.io.loading import DTYPE_NAMES
from qconvert.manifest import read_manifest
from qconvert.output import iter_records, quantized_tensor
from qconvert.quantizers import dequantize


def verify_output(output: Path) -> tuple[list[str], int]:
    """Check every stored tensor's checksum, dtype and shape, and that quantized ones unpack.

    Returns:
        (problems, number of source tensors checked); no problems means the output is sound.
    """
    manifest = read_manifest(output)
    problems = _unlisted_tensors(output, manifest)
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
                    problems.append(f"{name}: sha256 {digest[:12]}… does not match the manifest's {expected.sha256[:12]}…")
            if record.action == "quantized" and not any(p.startswith(tuple(stored)) for p in problems):
                problems.extend(_check_quantized(manifest, record, stored))
    except QConvertError as exc:
        problems.append(str(exc))
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
    scales = q.scales.float()
    if not (torch.isfinite(scales).all() and (scales != 0).all()):  # symmetric scales carry a sign
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
        if not (folder / file).is_file():
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
