"""Finished blocks of a calibrated conversion, kept on disk so that an interrupted run resumes.

The folder `.<output>.qconvert-calibration` sits beside the output. It holds `key.json` (everything
the results depend on: settings, calibration text checksum, source files, qconvert version) and one
`block-NNNNN.safetensors` per finished block, each written to a temporary name and renamed, so a
block file is either complete or absent. A run whose key differs starts afresh; a finished
conversion removes the folder.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qconvert.io.dtypes import DTYPE_NAMES, SAFETENSORS_DTYPES
from qconvert.quantizers.base import QuantizedTensor

BlockResults = dict[str, "QuantizedTensor | torch.Tensor"]
_PARTS = ("codes", "scales", "zeros", "global_scale", "input_scale")
# Metadata keys that are not tensor names: the quantizer's report of the block (qat: its losses), and
# the block's index, which keeps the header of a block with nothing selected from being empty (safetensors
# cannot read back a file with neither tensors nor metadata).
_RECORD, _BLOCK = "__record__", "__block__"


def calibration_folder(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.qconvert-calibration")


def finished_blocks(folder: Path) -> int:
    """How many blocks a store at `folder` holds finished (0 when there is none): what a rerun resumes from."""
    return len(list(folder.glob("block-*.safetensors"))) if folder.is_dir() else 0


class BlockStore:
    def __init__(self, folder: Path, key: dict) -> None:
        self.folder = folder
        key_file = folder / "key.json"
        text = json.dumps(key, indent=2, sort_keys=True)
        if not (key_file.is_file() and key_file.read_text() == text):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            key_file.write_text(text)
        self._index: dict[str, Path] = {}

    def finished(self, index: int) -> bool:
        return self._path(index).is_file()

    def save(self, index: int, results: BlockResults, errors: dict[str, float], record: dict | None = None) -> None:
        """Save a block's results, with the relative error of each quantized tensor against the weight it
        replaced, and the quantizer's `record` of the block (JSON values), if any."""
        tensors, metadata = {}, {_BLOCK: str(index)}
        if record is not None:
            metadata[_RECORD] = json.dumps(record, sort_keys=True)
        for name, result in results.items():
            if isinstance(result, QuantizedTensor):
                metadata[name] = json.dumps(
                    {
                        "bits": result.bits,
                        "grid": result.grid,
                        "group_size": result.group_size,
                        "shape": list(result.shape),
                        "dtype": DTYPE_NAMES[result.dtype],
                        "relative_mse": errors[name],
                    }
                )
                for part in _PARTS:
                    if getattr(result, part) is not None:
                        tensors[f"{name}:{part}"] = getattr(result, part).contiguous()
            else:
                metadata[name] = json.dumps({"float": True})
                tensors[name] = result.contiguous()
        temporary = self._path(index).with_suffix(".tmp")
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, self._path(index))

    def load(self, index: int) -> BlockResults:
        with safe_open(self._path(index), "pt") as f:
            return {name: _result(f, name, json.loads(f.metadata()[name])) for name in _names(f)}

    def result(self, name: str, index: int) -> tuple["QuantizedTensor | torch.Tensor", float | None]:
        """One tensor's result from block `index`, read alone, with its relative error if quantized."""
        with safe_open(self._path(index), "pt") as f:
            meta = json.loads(f.metadata()[name])
            return _result(f, name, meta), meta.get("relative_mse")

    def names(self, index: int) -> list[str]:
        with safe_open(self._path(index), "pt") as f:
            return _names(f)

    def record(self, index: int) -> dict | None:
        """What the quantizer reported of block `index` (None when it reported nothing)."""
        with safe_open(self._path(index), "pt") as f:
            text = f.metadata().get(_RECORD)
        return None if text is None else json.loads(text)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"  # `finished_blocks` counts these


def _names(f) -> list[str]:
    return [name for name in f.metadata() if name not in (_RECORD, _BLOCK)]


def _result(f, name: str, meta: dict) -> "QuantizedTensor | torch.Tensor":
    if meta.get("float"):
        return f.get_tensor(name)
    keys = set(f.keys())
    parts = {part: f.get_tensor(f"{name}:{part}") if f"{name}:{part}" in keys else None for part in _PARTS}
    return QuantizedTensor(
        **parts,
        bits=meta["bits"],
        grid=meta.get("grid", "int"),
        group_size=meta["group_size"],
        shape=tuple(meta["shape"]),
        dtype=SAFETENSORS_DTYPES[meta["dtype"]],
    )
