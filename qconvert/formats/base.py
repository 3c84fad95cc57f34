"""A layout decides which tensors, with which names, dtypes and shapes, store a quantized weight."""

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from qconvert.io.dtypes import DTYPE_NAMES, SAFETENSORS_DTYPES
from qconvert.io.writing import TensorSpec
from qconvert.manifest import TensorRecord
from qconvert.quantizers.base import SCALE_DTYPES, QuantConfig, QuantizedTensor


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
    return TensorSpec(name, DTYPE_NAMES[SCALE_DTYPES[config.scale_dtype]], (rows, groups))


def record_config(record: TensorRecord) -> QuantConfig:
    return QuantConfig(
        bits=record.bits, group_size=record.group_size, symmetric=record.symmetric, scale_dtype=record.scale_dtype
    )


def source_dtype(record: TensorRecord) -> torch.dtype:
    return SAFETENSORS_DTYPES[record.source_dtype]
