"""Read checkpoints that are already quantized (GPTQ, AWQ, compressed-tensors) as what they encode.

Such a checkpoint stores each quantized linear as several tensors (codes, scales, zero points, ...).
`QuantizedCheckpoint` shows the rest of qconvert one float weight per linear instead, named as the
float model names it, so planning, calibration, budgets and inspection work unchanged; and it hands
the exact codes and scales (`quantized`) to a conversion that writes the same grid, which then repacks
them instead of quantizing again. How each format stores its modules is its own module's `READER`
(`formats/gptq.py`, `formats/awq.py`, `formats/compressed_tensors.py`); this module finds the format and
the settings, and keeps the last few decoded modules at hand.
"""

import json
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from qconvert.errors import SourceError
from qconvert.formats.base import StoredModule
from qconvert.formats.registry import READERS
from qconvert.io.loading import UNBUILT, Checkpoint, TensorInfo
from qconvert.quantizers.base import QuantizedTensor, dequantize

RECENT = 4  # decoded modules kept: the prefetch depth plus the one being converted, and a spare


@dataclass
class QuantizedCheckpoint(Checkpoint):
    """A checkpoint whose quantized linears appear as float weights (`tensors`), with `method` the
    source's quant_method and `stored` its real tensors."""

    method: str = ""
    stored: Checkpoint | None = None
    modules: dict[str, StoredModule] = field(default_factory=dict)  # logical weight name -> its parts
    quantization: dict = field(default_factory=dict)  # the source's quantization settings, merged
    float_dtype: torch.dtype = torch.float16
    _recent: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def iter_tensors(
        self, names: list[str], hash_on_the_way: bool = True, unread: frozenset[str] = frozenset()
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            if name in self.modules:
                yield name, self.float_weight(name)
            else:
                yield from self.stored.iter_tensors([name], hash_on_the_way=False, unread=unread & {name})

    def quantized(self, name: str) -> QuantizedTensor | None:
        """The exact codes and scales behind a logical weight, or None (kept tensor, or act-order GPTQ)."""
        return self._decoded(name)[0] if name in self.modules else None

    def float_weight(self, name: str) -> torch.Tensor:
        q, weight = self._decoded(name)
        return weight if q is None else dequantize(q, self.float_dtype)

    def _decoded(self, name: str) -> tuple[QuantizedTensor | None, torch.Tensor | None]:
        """Read and decode a module's parts once: a conversion asks for its float weight (on the prefetch
        thread, up to two tensors ahead) and then for its codes, so the last few stay at hand."""
        with self._lock:
            if name in self._recent:
                return self._recent[name]
        module = self.modules[name]
        parts = dict(self.stored.iter_tensors(list(module.parts.values()), hash_on_the_way=False))
        by_role = {role: parts[n] for role, n in module.parts.items()}
        decoded = READERS[self.method].decode(module, by_role, self.quantization, self.float_dtype)
        with self._lock:
            self._recent[name] = decoded
            while len(self._recent) > RECENT:
                del self._recent[next(iter(self._recent))]
        return decoded

    def skeleton(self):
        """The stored checkpoint's skeleton (built once, which reading compressed-tensors' targets may already
        have done), with roles for this view's float weight names."""
        if self._skeleton is UNBUILT:
            stored = self.stored.skeleton()
            self._skeleton = stored.for_names(list(self.tensors)) if stored else None
        return self._skeleton

    def stored_scheme(self, name: str) -> str | None:
        if name not in self.modules:
            return None
        m = self.modules[name]
        if m.grid != "int":
            return f"{self.method} {m.grid} {'g' + str(m.group_size) if m.group_size else 'per channel'}"
        return (
            f"{self.method} int{m.bits} "
            f"{'g' + str(m.group_size) if m.group_size else 'per channel'}{'' if m.symmetric else ' asym'}"
        )


def open_quantized(raw: Checkpoint) -> Checkpoint:
    """`raw` itself if it is not stored quantized, else its QuantizedCheckpoint view.

    Raises:
        SourceError: a variant of GPTQ, AWQ or compressed-tensors qconvert cannot read.
    """
    quantization = quantization_settings(raw)
    reader = READERS.get(quantization.get("quant_method"))
    if reader is None or not any(n.endswith(reader.markers) for n in raw.tensors):
        return raw  # a float checkpoint, a qconvert native output (read by qconvert.load), or a method it lacks
    modules = reader.modules(raw, quantization)
    dtype = _float_dtype(raw)
    consumed = {n for m in modules.values() for n in m.parts.values()}
    weight_at = {next(iter(m.parts.values())): weight for weight, m in modules.items()}
    tensors = {}
    for name, info in raw.tensors.items():  # file order; a module's weight where its first part was
        module = weight_at.get(name)
        if module is not None:
            tensors[module] = TensorInfo(module, dtype, modules[module].shape, info.file)
        elif name not in consumed:
            tensors[name] = info
    return QuantizedCheckpoint(
        raw.source,
        raw.folder,
        raw.files,
        tensors,
        raw.hub_id,
        raw.revision,
        method=quantization["quant_method"],
        stored=raw,
        modules=modules,
        quantization=quantization,
        float_dtype=dtype,
    )


# Where quantization tools write their settings besides config.json, and the method each file implies.
SETTINGS_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq"}
SETTINGS_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "w_bit", "q_group_size", "version")


def quantization_settings(raw: Checkpoint) -> dict:
    """A quantized checkpoint's settings, from config.json's quantization_config and from the files GPTQ
    and AWQ tools write beside it (quantize_config.json, quant_config.json), merged.

    Raises:
        SourceError: two of them contradict each other on a setting that changes how weights decode.
    """
    sources: list[tuple[str, dict]] = []
    in_config = (raw.config or {}).get("quantization_config")
    if isinstance(in_config, dict) and in_config:
        sources.append(("config.json", in_config))
    for file_name, method in SETTINGS_FILES.items():
        path = raw.folder / file_name if raw.folder else None
        if path is not None and path.is_file():
            try:
                settings = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise SourceError(f"{path} is not valid JSON: {exc}") from exc
            if isinstance(settings, dict):
                sources.append((file_name, {"quant_method": method, **settings}))
    merged: dict = {}
    origin: dict[str, str] = {}
    for where, settings in sources:
        for key, value in settings.items():
            if key in merged and key in (*SETTINGS_KEYS, "quant_method") and merged[key] != value:
                raise SourceError(
                    f"{raw.source}: {origin[key]} says {key} = {merged[key]!r} but {where} says {value!r}; "
                    "fix the one that is wrong before converting."
                )
            if key not in merged:
                merged[key], origin[key] = value, where
    return merged


def _float_dtype(raw: Checkpoint) -> torch.dtype:
    name = (raw.config or {}).get("dtype") or (raw.config or {}).get("torch_dtype") or "float16"
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(name, torch.float16)
