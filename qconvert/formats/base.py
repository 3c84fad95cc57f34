"""What every format module fills in: a `Layout` (how qconvert stores a quantized weight as named
tensors), a `Reader` (how a checkpoint another tool quantized decodes to codes and scales), the
`Problem`s a runtime check reports, and small helpers they share."""

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Protocol

import torch

from qconvert.errors import SourceError
from qconvert.io.dtypes import SAFETENSORS_DTYPES
from qconvert.io.loading import Checkpoint, read_checkpoint
from qconvert.io.writing import TensorSpec
from qconvert.manifest import Manifest, TensorRecord
from qconvert.quantizers.base import QuantConfig, QuantizedTensor
from qconvert.quantizers.grids import GRIDS, stored_scale_dtype, stored_scale_rows


class Layout(ABC):
    """Maps a QuantizedTensor to stored tensors and back, and describes itself in config.json."""

    name: ClassVar[str]

    def unsupported_reason(
        self, name: str, shape: tuple[int, ...], config: QuantConfig, role: str | None = None
    ) -> str | None:
        """Why this layout cannot store `name` (of `role` in the runtime's model, where known) under
        `config`, or None if it can."""
        return None

    def unsupported_mix_reason(self, configs: list[QuantConfig]) -> str | None:
        """Why this layout cannot hold these schemes together, or None if it can."""
        return None

    def refusal(
        self, quantized: list[tuple[str, tuple[int, ...], QuantConfig]], roles: dict[str, str] | None = None
    ) -> str | None:
        """The first reason this layout cannot hold these (name, shape, config) tensors together, or None."""
        reasons = [
            self.unsupported_reason(name, shape, config, (roles or {}).get(name)) for name, shape, config in quantized
        ]
        reasons.append(self.unsupported_mix_reason([config for _, _, config in quantized]))
        return next((r for r in reasons if r), None)

    @abstractmethod
    def specs(self, name: str, shape: tuple[int, int], config: QuantConfig) -> list[TensorSpec]:
        """The stored tensors for weight `name`, known before it is quantized."""

    @abstractmethod
    def encode(self, name: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Stored tensors for `q`, in the order of `specs`."""

    @abstractmethod
    def decode(self, record: TensorRecord, stored: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Rebuild the QuantizedTensor from its stored tensors."""

    @abstractmethod
    def quantization_config(self, records: list[TensorRecord], runtime_name=None) -> dict:
        """The `quantization_config` entry for config.json; `runtime_name` maps a checkpoint key to the
        name the runtime loads it as (`Skeleton.runtime_name`), where a layout names modules."""


def scale_spec(name: str, rows: int, groups: int, config: QuantConfig) -> TensorSpec:
    """The stored scales of a weight with `rows` rows: in the config's scale dtype, or the grid's own format
    (E8M0 as U8, E4M3); one row per band of rows for a grid whose rows share scales (fp8-block)."""
    shape = (stored_scale_rows(config.grid, rows), groups)
    return TensorSpec(name, stored_scale_dtype(config.grid, config.scale_dtype), shape)


def record_config(record: TensorRecord) -> QuantConfig:
    """The QuantConfig a record was quantized with. A group spanning its row is one scale per output
    channel (group size 0); a format's fixed block stays a block, even on a row narrower than it (one
    partial block, recorded at the row's width)."""
    block = GRIDS[record.grid or "int"].block
    group_size = record.group_size
    if record.group_size >= record.shape[-1]:
        group_size = block or 0
    return QuantConfig(
        bits=record.bits,
        group_size=group_size,
        symmetric=record.symmetric,
        scale_dtype=record.scale_dtype,
        grid=record.grid or "int",
        activations=record.activations,
    )


def source_dtype(record: TensorRecord) -> torch.dtype:
    return SAFETENSORS_DTYPES[record.source_dtype]


@dataclass(frozen=True)
class Problem:
    """One reason a runtime would not load a file as qconvert reads it."""

    tensor: str | None  # None: the file or its config as a whole
    message: str

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "message": self.message}


@dataclass
class StoredModule:
    """One quantized linear of a checkpoint another tool wrote: its stored parts and the grid they encode."""

    parts: dict[str, str]  # role (qweight, scales, ...) -> stored tensor name
    shape: tuple[int, int]  # (rows, columns) of the float weight
    bits: int
    group_size: int  # 0: per channel
    symmetric: bool
    grid: str = "int"  # or a table grid of quantizers/grids.py


# decode(module, its stored parts by role, the source's quantization settings, float dtype) ->
# (codes and scales, None), or (None, float weight) when the grid is not one qconvert can hold exactly.
Decoder = Callable[[StoredModule, dict, dict, torch.dtype], tuple[QuantizedTensor | None, torch.Tensor | None]]


@dataclass(frozen=True)
class Reader:
    """How to read a quantized checkpoint of one format as the float weights it encodes."""

    markers: tuple[str, ...]  # a stored tensor name ending in one of these marks the format
    modules: Callable[[Checkpoint, dict], dict[str, StoredModule]]  # float weight name -> its module
    decode: Decoder


def stored_quantized(codes, scales, zeros, group_size: int, module: StoredModule, dtype: torch.dtype):
    """A QuantizedTensor of a stored module; zero points at the symmetric centre everywhere become a
    symmetric grid (no zeros)."""
    bits = module.bits
    if zeros is not None and bool((zeros == 2 ** (bits - 1)).all()):
        zeros = None
    return QuantizedTensor(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scales,
        zeros=None if zeros is None else zeros.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
        shape=module.shape,
        dtype=dtype,
        grid=module.grid,
    )


def config_json(folder: Path) -> dict:
    """A model folder's config.json as a dict.

    Raises:
        SourceError: it is not a JSON object.
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{folder / 'config.json'} holds a JSON {type(config).__name__}, not an object of settings.")
    return config


def stored_headers(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every stored tensor's (dtype, shape), from the headers: what a runtime check looks at."""
    return {name: (info.dtype, tuple(info.shape)) for name, info in read_checkpoint(folder).tensors.items()}


class ExportSource(Protocol):
    """A qconvert output as an exporter reads it (`output.QconvertOutput` is one)."""

    path: Path  # the output folder
    manifest: Manifest

    def records(self) -> Iterator[tuple[TensorRecord, dict[str, torch.Tensor]]]:
        """Each record with its stored tensors, one at a time."""

    def quantized(self, record: TensorRecord, stored: dict[str, torch.Tensor]) -> QuantizedTensor:
        """The codes and scales of a quantized record."""
