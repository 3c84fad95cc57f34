"""Read checkpoints that are already quantized (GPTQ, AWQ, compressed-tensors) as what they encode.

Such a checkpoint stores each quantized linear as several tensors (codes, scales, zero points, ...).
`QuantizedCheckpoint` shows the rest of qconvert one float weight per linear instead, named as the
float model names it, so planning, calibration, budgets and inspection work unchanged; and it hands
the exact codes and scales (`quantized`) to a conversion that writes the same grid, which then repacks
them instead of quantizing again. The formats, as their projects document them:

- GPTQ (AutoGPTQ/GPTQModel, `checkpoint_format` gptq = v1 or gptq_v2): qweight int32 (in·bits/32, out)
  packed down the input dimension, qzeros (groups, out·bits/32) along the output, scales (groups, out),
  g_idx (in,); weight = scale · (code − zero), zero = stored + 1 in v1, as stored in v2. An act-order
  g_idx (groups not contiguous) is read as float only.
- AWQ (AutoAWQ "gemm"): qweight int32 (in, out/8) and qzeros (groups, out/8) packed along the output in
  the interleaved order 0 2 4 6 1 3 5 7, scales (groups, out); weight = scale · (code − zero).
- compressed-tensors pack-quantized: weight_packed, weight_scale, weight_zero_point, weight_shape, as
  qconvert writes them (`formats/compressed_tensors.py`), schemes from `config_groups`.
"""

import json
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from qconvert.errors import SourceError
from qconvert.io.loading import Checkpoint, TensorInfo
from qconvert.packing import unpack_words
from qconvert.quantizers.base import QuantizedTensor, dequantize

RECENT = 4  # decoded modules kept: the prefetch depth plus the one being converted, and a spare
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's packing: bits 4i of a word hold column AWQ_ORDER[i]


@dataclass
class _Module:
    """One quantized linear: its stored parts and what they encode."""

    parts: dict[str, str]  # role (qweight, scales, ...) -> stored tensor name
    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool


@dataclass
class QuantizedCheckpoint(Checkpoint):
    """A checkpoint whose quantized linears appear as float weights (`tensors`), with `method` the
    source's quant_method and `stored` its real tensors."""

    method: str = ""
    stored: Checkpoint | None = None
    modules: dict[str, _Module] = field(default_factory=dict)  # logical weight name -> its parts
    checkpoint_format: str = "gptq"
    float_dtype: torch.dtype = torch.float16
    _recent: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def iter_tensors(self, names: list[str], hash_on_the_way: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            if name in self.modules:
                yield name, self.float_weight(name)
            else:
                yield from self.stored.iter_tensors([name], hash_on_the_way=False)

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
        decoded = _DECODERS[self.method](self, module, {role: parts[n] for role, n in module.parts.items()})
        with self._lock:
            self._recent[name] = decoded
            while len(self._recent) > RECENT:
                del self._recent[next(iter(self._recent))]
        return decoded

    def stored_scheme(self, name: str) -> str | None:
        if name not in self.modules:
            return None
        m = self.modules[name]
        return (
            f"{self.method} int{m.bits} "
            f"{'g' + str(m.group_size) if m.group_size else 'per channel'}{'' if m.symmetric else ' asym'}"
        )


def open_quantized(raw: Checkpoint) -> Checkpoint:
    """`raw` itself if it is not stored quantized, else its QuantizedCheckpoint view.

    Raises:
        SourceError: a quantization method or variant qconvert cannot read.
    """
    quantization = quantization_settings(raw)
    method = quantization.get("quant_method")
    if method is None or not any(n.endswith(_MARKERS.get(method, ("\0",))) for n in raw.tensors):
        return raw  # e.g. a float checkpoint, or a qconvert native output (read by qconvert.load)
    if method not in _MODULES:
        raise SourceError(
            f"{raw.source} is quantized with {method!r}, which qconvert does not read "
            "(it reads gptq, awq and compressed-tensors)."
        )
    modules = _MODULES[method](raw, quantization)
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
        method=method,
        stored=raw,
        modules=modules,
        checkpoint_format=quantization.get("checkpoint_format", "gptq"),
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


def _gptq_modules(raw: Checkpoint, quantization: dict) -> dict[str, _Module]:
    bits, group = quantization.get("bits"), quantization.get("group_size", -1)
    if bits not in (2, 4, 8):
        raise SourceError(
            f"{raw.source} is {bits}-bit GPTQ; qconvert reads 2, 4 and 8-bit GPTQ (3-bit packs across words)."
        )
    modules = {}
    for name in raw.tensors:
        if name.endswith(".qweight"):
            prefix = name.removesuffix("qweight")
            parts = {
                role: prefix + role for role in ("qweight", "qzeros", "scales", "g_idx") if prefix + role in raw.tensors
            }
            rows, columns = raw.tensors[prefix + "scales"].shape[1], raw.tensors[name].shape[0] * 32 // bits
            modules[prefix + "weight"] = _Module(
                parts, (rows, columns), bits, group if group > 0 else 0, bool(quantization.get("sym", True))
            )
    return modules


def _awq_modules(raw: Checkpoint, quantization: dict) -> dict[str, _Module]:
    bits, group, version = (
        quantization.get("bits", quantization.get("w_bit")),
        quantization.get("group_size", quantization.get("q_group_size")),
        str(quantization.get("version", "gemm")).lower(),
    )
    if bits != 4 or version != "gemm":
        raise SourceError(
            f"{raw.source} is AWQ {version} with {bits} bits; qconvert reads 4-bit AWQ in the gemm layout."
        )
    modules = {}
    for name in raw.tensors:
        if name.endswith(".qweight"):
            prefix = name.removesuffix("qweight")
            parts = {role: prefix + role for role in ("qweight", "qzeros", "scales")}
            columns, rows = raw.tensors[name].shape[0], raw.tensors[prefix + "scales"].shape[1]
            modules[prefix + "weight"] = _Module(parts, (rows, columns), 4, group, False)
    return modules


def _compressed_tensors_modules(raw: Checkpoint, quantization: dict) -> dict[str, _Module]:
    from qconvert.formats.compressed_tensors import schemes_from_config

    prefixes = [n.removesuffix("weight_packed") for n in raw.tensors if n.endswith(".weight_packed")]
    skeleton = raw.skeleton()
    schemes = schemes_from_config(
        quantization, {p.rstrip(".") for p in prefixes}, skeleton.runtime_name if skeleton else None
    )
    shapes = dict(raw.iter_tensors([p + "weight_shape" for p in prefixes], hash_on_the_way=False))
    modules = {}
    for prefix in prefixes:
        scheme = schemes[prefix.rstrip(".")]
        if scheme is None:
            raise SourceError(f"{prefix}weight_packed is stored packed but no config group of {raw.source} targets it.")
        bits, group, symmetric = scheme
        parts = {
            role: prefix + role
            for role in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
            if prefix + role in raw.tensors
        }
        modules[prefix + "weight"] = _Module(
            parts, tuple(shapes[prefix + "weight_shape"].tolist()), bits, group, symmetric
        )
    return modules


def _decode_gptq(
    checkpoint: QuantizedCheckpoint, module: _Module, parts: dict
) -> tuple[QuantizedTensor | None, torch.Tensor | None]:
    bits, (rows, columns) = module.bits, module.shape
    codes = unpack_words(parts["qweight"].t(), bits).t()[:columns].t()  # (out, in)
    zeros = unpack_words(parts["qzeros"], bits)[:, :rows].t()  # (out, groups)
    if checkpoint.checkpoint_format != "gptq_v2":
        zeros = (zeros + 1) & (2**bits - 1)  # v1 stores zero - 1
    if module.symmetric and not bool((zeros == 2 ** (bits - 1)).all()):
        found = sorted(set(zeros.unique().tolist()))[:4]
        raise SourceError(
            f"{next(iter(module.parts.values()))}: a symmetric {bits}-bit GPTQ checkpoint in the "
            f"{checkpoint.checkpoint_format} convention must decode every zero point to {2 ** (bits - 1)}, "
            f"but these decode to {found}: its checkpoint_format (v1 stores zero - 1, gptq_v2 the zero "
            "itself) or sym setting is wrong."
        )
    scales = parts["scales"].t().contiguous()
    group = module.group_size or columns
    g_idx = parts.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(columns) // group):
        # act-order: column i uses group g_idx[i]; not contiguous groups, so only its float values travel
        g = g_idx.long()
        weight = (codes.float() - zeros[:, g].float()) * scales[:, g].float()
        return None, weight.to(checkpoint.float_dtype)
    return _quantized(codes, scales, zeros, bits, group, module, checkpoint), None


def _decode_awq(checkpoint: QuantizedCheckpoint, module: _Module, parts: dict) -> tuple[QuantizedTensor | None, None]:
    codes = unpack_words(parts["qweight"], 4, AWQ_ORDER).t()  # (out, in)
    zeros = unpack_words(parts["qzeros"], 4, AWQ_ORDER).t()
    return _quantized(codes, parts["scales"].t().contiguous(), zeros, 4, module.group_size, module, checkpoint), None


def _decode_compressed_tensors(
    checkpoint: QuantizedCheckpoint, module: _Module, parts: dict
) -> tuple[QuantizedTensor, None]:
    from qconvert.formats.compressed_tensors import unpack_from_words

    rows, columns = module.shape
    zeros = parts.get("weight_zero_point")
    if zeros is not None:
        zeros = unpack_from_words(zeros.T, module.bits, rows).T.contiguous()
    codes = unpack_from_words(parts["weight_packed"], module.bits, columns)
    return _quantized(
        codes, parts["weight_scale"], zeros, module.bits, module.group_size or columns, module, checkpoint
    ), None


def _quantized(codes, scales, zeros, bits, group, module: _Module, checkpoint: QuantizedCheckpoint) -> QuantizedTensor:
    """A QuantizedTensor; zero points equal to the symmetric centre everywhere become a symmetric grid."""
    if zeros is not None and bool((zeros == 2 ** (bits - 1)).all()):
        zeros = None
    return QuantizedTensor(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scales,
        zeros=None if zeros is None else zeros.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group,
        shape=module.shape,
        dtype=checkpoint.float_dtype,
    )


_MODULES = {"gptq": _gptq_modules, "awq": _awq_modules, "compressed-tensors": _compressed_tensors_modules}
_DECODERS = {"gptq": _decode_gptq, "awq": _decode_awq, "compressed-tensors": _decode_compressed_tensors}
_MARKERS = {"gptq": (".qweight",), "awq": (".qweight",), "compressed-tensors": (".weight_packed",)}
