"""Write safetensors files tensor by tensor, and publish an output folder atomically.

The safetensors library can only save tensors it holds all at once. We stream instead: every
tensor's dtype and shape is known before any is computed, so the header (and every data offset)
is fixed up front and each tensor is written, hashed and dropped as soon as it exists. The header
reserves room for the metadata, which is patched in at the end and padded with spaces (JSON
whitespace, allowed by the format) so the data never moves. Files are readable by `safe_open`.
"""

import hashlib
import json
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from qconvert.errors import OutputError
from qconvert.io.loading import DTYPE_NAMES, SAFETENSORS_DTYPES


@dataclass(frozen=True)
class TensorSpec:
    """A tensor planned for the output: its stored name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = SAFETENSORS_DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


class SafetensorsStreamWriter:
    """Writes the tensors of `specs`, in that order, into a safetensors file at `path`.

    Args:
        path: the file to create.
        specs: every tensor the file will hold, in write order.
        metadata_bytes: room to reserve for the `__metadata__` JSON written by `finish`.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata_bytes: int) -> None:
        self.path = path
        self.specs = specs
        self._next = 0
        self._entries: dict[str, dict] = {}
        offset = 0
        for spec in specs:
            self._entries[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                        "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        self.data_bytes = offset
        placeholder = self._header_json({"": " " * metadata_bytes})
        self._header_length = len(placeholder) + (-len(placeholder) % 8)  # data starts 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", self._header_length) + b" " * self._header_length)

    def write(self, name: str, tensor: torch.Tensor) -> str:
        """Append the next planned tensor and return the sha256 of its bytes."""
        spec = self.specs[self._next]
        actual = (DTYPE_NAMES.get(tensor.dtype), tuple(tensor.shape))
        if spec.name != name or actual != (spec.dtype, spec.shape):
            raise AssertionError(f"planned {spec} but got {name} {actual}")  # a bug in the planner
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data)
        self._next += 1
        return hashlib.sha256(data).hexdigest()

    def finish(self, metadata: dict[str, str]) -> None:
        """Patch the final metadata into the reserved header space and close the file."""
        if self._next != len(self.specs):
            raise AssertionError(f"{self.path} got {self._next} of {len(self.specs)} planned tensors")
        header = self._header_json(metadata)
        if len(header) > self._header_length:
            raise AssertionError(f"metadata needs {len(header)} header bytes, {self._header_length} reserved")
        self._file.seek(8)
        self._file.write(header + b" " * (self._header_length - len(header)))
        self._file.close()

    def close(self) -> None:
        self._file.close()

    def _header_json(self, metadata: dict[str, str]) -> bytes:
        header = {"__metadata__": metadata, **self._entries}
        return json.dumps(header, separators=(",", ":")).encode()


def split_into_shards(groups: list[list[TensorSpec]], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    """Split tensor groups (kept whole: a weight with its scales) into shards of at most `max_shard_bytes`."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for group in groups:
        group_bytes = sum(spec.nbytes for spec in group)
        if max_shard_bytes and shards[-1] and size + group_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += group_bytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def staged_directory(destination: Path, force: bool) -> Iterator[Path]:
    """Yield an empty staging folder beside `destination`; on success it replaces `destination`.

    On failure or interruption the staging folder is removed, so nothing half-written ever sits
    where a finished output belongs.

    Raises:
        OutputError: `destination` exists and `force` is false, or it cannot be created.
    """
    if destination.exists() and not force:
        raise OutputError(f"{destination} already exists; pass --force to overwrite it.")
    staging = destination.with_name(f".{destination.name}.qconvert-partial")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"cannot create {staging}: {exc.strerror}.") from exc
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace(staging, destination)


def _replace(staging: Path, destination: Path) -> None:
    if not destination.exists():
        staging.rename(destination)
        return
    retired = destination.with_name(f".{destination.name}.qconvert-old")
    shutil.rmtree(retired, ignore_errors=True)
    destination.rename(retired)
    staging.rename(destination)
    if retired.is_dir():
        shutil.rmtree(retired)
    else:
        retired.unlink()
