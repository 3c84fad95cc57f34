"""The compressed-tensors "pack-quantized" layout, which transformers, vLLM and SGLang load.

For a linear layer `<module>` whose weight is rows × columns:

| stored tensor                 | dtype       | shape                             |
|-------------------------------|-------------|-----------------------------------|
| `<module>.weight_packed`      | I32         | rows × ceil(columns·bits / 32)    |
| `<module>.weight_scale`       | F16 or BF16 | rows × groups (1 for per-channel) |
| `<module>.weight_zero_point`  | I32         | ceil(rows·bits / 32) × groups     | (asymmetric; packed down columns)
| `<module>.weight_shape`       | I64         | 2                                 |

compressed-tensors packs each row as a little-endian bit stream of int32 words holding the signed
code + 2**(bits-1), which is our unsigned code, in our bit order (`packing.py`): so its words are our
packed bytes padded to 4 bytes per row. Signed zero points are likewise ours minus 2**(bits-1).
It cannot express partial groups (columns not divisible by the group size), and its loader cannot
read asymmetric grouped zero points of a weight with rows·bits ≤ 32 (one word per group).

This module also reads such checkpoints as a source (`READER`, schemes from `config_groups`), exports a
qconvert output into this layout (`export`), and checks what transformers and vLLM accept (`check`).
"""

import dataclasses
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch

from qconvert.errors import SourceError, UnsupportedModelError
from qconvert.formats import compressed_tensors_float as floats
from qconvert.formats.base import (
    ExportSource,
    Layout,
    Problem,
    Reader,
    StoredModule,
    config_json,
    record_config,
    scale_spec,
    source_dtype,
    stored_headers,
    stored_quantized,
)
from qconvert.formats.exporting import WEIGHTS_FILE, ExportReport, copy_tokenizer_files, read_config
from qconvert.formats.vllm_rules import fused_problems, vllm_scheme_problems
from qconvert.io.loading import Checkpoint
from qconvert.io.skeleton import EXPERTS, build_skeleton
from qconvert.io.writing import SafetensorsStreamWriter, TensorSpec, staged_output
from qconvert.manifest import MANIFEST_FILE, METADATA_KEY, StoredRecord, TensorRecord
from qconvert.packing import pack_stream_words, unpack_stream_words
from qconvert.quantizers.activations import get_scheme
from qconvert.quantizers.base import QuantConfig, QuantizedTensor
from qconvert.quantizers.grids import GRIDS

FORMAT = "pack-quantized"
EMBEDDING = re.compile(r"(embed|wte|wpe|lm_head)", re.IGNORECASE)


def words_per_row(count: int, bits: int) -> int:
    return -(-count * bits // 32)


def module_name(name: str) -> str:
    return name.removesuffix(".weight")


class CompressedTensorsLayout(Layout):
    name = "compressed-tensors"

    def unsupported_reason(
        self, name: str, shape: tuple[int, ...], config: QuantConfig, role: str | None = None
    ) -> str | None:
        if sys.byteorder != "little":
            return "compressed-tensors words are little-endian and this machine is big-endian"
        if not name.endswith(".weight"):
            return f"{name} is not a module's .weight"
        if config.grid not in ("int", *floats.FLOAT_FORMATS):
            return f"compressed-tensors has no format for the {config.grid} grid (its native layout holds it)"
        if EMBEDDING.search(name):
            return (
                f"{name} is an embedding or output head, which transformers cannot load quantized from "
                "compressed-tensors"
            )
        rows, columns = shape[0], shape[-1]
        if config.group_size and columns % config.group_size:
            band = GRIDS[config.grid].band
            unit = f"{band} × {config.group_size} blocks' width" if band > 1 else "group size"
            return (
                f"{name} has {columns} columns, not a multiple of {unit} {config.group_size}, "
                "and compressed-tensors has no partial groups"
            )
        if not config.symmetric and role == EXPERTS:
            # transformers stacks the experts' weights while loading; their zero points never reach
            # compressed-tensors' decompressor ("Asymmetric quant requires zero-point values")
            return (
                f"{name} is an MoE expert, whose asymmetric zero points transformers cannot load from "
                "compressed-tensors"
            )
        if not config.symmetric and words_per_row(rows, config.bits) == 1 and config.groups_for(columns) > 1:
            # its zero points fit one int32 word per group; compressed-tensors' loader (0.20) views that
            # (1, groups) tensor transposed as bytes and fails, so transformers cannot load the model
            return (
                f"{name} has {rows} rows, whose {config.bits}-bit zero points fill a single word per group, "
                "which compressed-tensors' loader cannot read"
            )
        return None

    def unsupported_mix_reason(self, configs: list[QuantConfig]) -> str | None:
        formats = {(c.grid, c.activations) for c in configs}
        if len(formats) > 1:
            # a model mixing compressed-tensors formats (mixed-precision) fails in transformers' loading of
            # the packed float and int groups together (measured: "Expected torch.int32 but got torch.uint8")
            grids = ", ".join(sorted({f"{g}{' W8A8' if a else ''}" for g, a in formats}))
            return f"transformers cannot load one compressed-tensors model mixing grids ({grids})"
        schemes = {(c.bits, c.group_size, c.symmetric) for c in configs}
        if len(schemes) > 1 and any(not c.symmetric for c in configs):
            # transformers (5.x) dequantizes asymmetric checkpoints while loading, and does so with the
            # first config group's scheme for every layer; symmetric mixes load through compressed-tensors.
            return "transformers loads mixed asymmetric compressed-tensors schemes wrongly"
        return None

    def specs(self, name: str, shape: tuple[int, int], config: QuantConfig) -> list[TensorSpec]:
        rows, columns = shape
        groups = config.groups_for(columns)
        module = module_name(name)
        if config.grid != "int":
            return floats.specs(module, shape, config) + _input_specs(module, config)
        if config.activations:  # W8A8: compressed-tensors' int-quantized, int8 codes unpacked
            return [
                TensorSpec(f"{module}.weight", "I8", shape),
                scale_spec(f"{module}.weight_scale", rows, groups, config),
                *_input_specs(module, config),
            ]
        specs = [
            TensorSpec(f"{module}.weight_packed", "I32", (rows, words_per_row(columns, config.bits))),
            scale_spec(f"{module}.weight_scale", rows, groups, config),
        ]
        if not config.symmetric:
            specs.append(TensorSpec(f"{module}.weight_zero_point", "I32", (words_per_row(rows, config.bits), groups)))
        specs.append(TensorSpec(f"{module}.weight_shape", "I64", (2,)))
        return specs

    def encode(self, name: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        module = module_name(name)
        if q.grid != "int":
            return {**floats.encode(module, q), **_input_tensors(module, q)}
        if q.activations:
            return {
                f"{module}.weight": (q.codes.to(torch.int16) - 128).to(torch.int8),
                f"{module}.weight_scale": q.scales,
                **_input_tensors(module, q),
            }
        stored = {f"{module}.weight_packed": pack_stream_words(q.codes, q.bits), f"{module}.weight_scale": q.scales}
        if q.zeros is not None:
            stored[f"{module}.weight_zero_point"] = pack_stream_words(q.zeros.T, q.bits).T.contiguous()
        stored[f"{module}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
        return stored

    def decode(self, record: TensorRecord, stored: dict[str, torch.Tensor]) -> QuantizedTensor:
        config = record_config(record)
        module = module_name(record.name)
        rows, columns = record.shape
        if config.grid != "int":
            q = floats.decode(module, stored, config, (rows, columns), source_dtype(record))
            return dataclasses.replace(
                q, activations=config.activations, input_scale=stored.get(f"{module}.input_scale")
            )
        if config.activations:
            return QuantizedTensor(
                input_scale=stored.get(f"{module}.input_scale"),
                codes=(stored[f"{module}.weight"].to(torch.int16) + 128).to(torch.uint8),
                scales=stored[f"{module}.weight_scale"],
                zeros=None,
                bits=8,
                group_size=columns,
                shape=(rows, columns),
                dtype=source_dtype(record),
                activations=config.activations,
            )
        scales = stored[f"{module}.weight_scale"]
        zeros = stored.get(f"{module}.weight_zero_point")
        if zeros is not None:
            zeros = unpack_stream_words(zeros.T, config.bits, rows).T.contiguous()
        return QuantizedTensor(
            codes=unpack_stream_words(stored[f"{module}.weight_packed"], config.bits, columns),
            scales=scales,
            zeros=zeros,
            bits=config.bits,
            group_size=config.group_size_for(columns),
            shape=(rows, columns),
            dtype=source_dtype(record),
        )

    def quantization_config(self, records: list[TensorRecord], runtime_name=None) -> dict:
        # Targets name modules as the runtime builds them: transformers renames some checkpoint keys while
        # loading (a VLM's language_model.model.layers... becomes model.language_model.layers...), and
        # compressed-tensors matches targets against the renamed model.
        rename = runtime_name or (lambda key: key)
        schemes: dict[tuple, list[str]] = defaultdict(list)
        for r in records:
            if r.action == "quantized":
                # A group spanning its row is written as compressed-tensors' "channel" strategy (vLLM's kernels
                # take no group as wide as a row): `record_config` gives it group size 0.
                c = record_config(r)
                key = (c.bits, c.group_size, c.symmetric, c.grid, c.activations or "")
                schemes[key].append(module_name(rename(r.name)))
        linear_like = {module_name(rename(r.name)) for r in records if r.name.endswith(".weight") and len(r.shape) == 2}
        groups = {}
        for i, ((bits, group_size, symmetric, grid, activations), modules) in enumerate(sorted(schemes.items())):
            groups[f"group_{i}"] = {
                "targets": module_targets(modules, linear_like),
                "weights": _weights_args(bits, group_size, symmetric, grid),
                "input_activations": input_activations_args(activations) if activations else None,
                "output_activations": None,
                "format": floats.FLOAT_FORMATS.get(grid, "int-quantized" if activations else FORMAT),
            }
        formats = {group["format"] for group in groups.values()}
        config = {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": [],
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }
        if any(not symmetric or grid in ("nvfp4", "mxfp4", "mxfp8") for _, _, symmetric, grid, _ in schemes):
            # transformers 5 builds asymmetric modules with unpacked zero-point shapes and then
            # rejects the packed ones compressed-tensors itself writes; dequantizing while loading
            # takes the path that reads them correctly. Its FP4 and MXFP8 modules, kept compressed,
            # unpack to bfloat16 whatever the model's dtype, so a float32 model fails at its first
            # matmul on CPU (measured for each); dequantized while loading they hold exactly
            # qconvert's values. vLLM ignores this key.
            config["dequantize"] = True
        return config


def input_activations_args(name: str) -> dict:
    """The `input_activations` entry of a W8A8 scheme (qconvert/quantizers/activations.py): int or
    float, 8 bits, symmetric, per token and dynamic, or per tensor with a static `input_scale`."""
    scheme = get_scheme(name)
    strategy = "token" if scheme.dynamic else "tensor"
    args = floats.weights_args_of(8, scheme.kind, True, strategy, 0)
    return {**args, "dynamic": scheme.dynamic, "observer": None if scheme.dynamic else "minmax"}


def _input_specs(module: str, config: QuantConfig) -> list[TensorSpec]:
    """A static scheme's input scale (symmetric: compressed-tensors expects no zero point)."""
    if config.activations is None or get_scheme(config.activations).dynamic:
        return []
    return [TensorSpec(f"{module}.input_scale", "F32", (1,))]


def _input_tensors(module: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    return {} if q.input_scale is None else {f"{module}.input_scale": q.input_scale.float()}


def _weights_args(bits: int, group_size: int, symmetric: bool, grid: str) -> dict:
    if grid != "int":
        return floats.weights_args(grid, group_size)
    return floats.weights_args_of(bits, "int", symmetric, "group" if group_size else "channel", group_size)


def module_targets(modules: list[str], candidates: set[str]) -> list[str]:
    """Short "re:" targets matching exactly `modules` among `candidates` (layer numbers folded).

    Falls back to exact names for any pattern that would also catch a module left unquantized.
    """
    chosen = set(modules)
    by_pattern: dict[str, list[str]] = defaultdict(list)
    for module in modules:
        parts = [r"\d+" if part.isdigit() else re.escape(part) for part in module.split(".")]
        by_pattern["^" + r"\.".join(parts) + "$"].append(module)
    targets = []
    for pattern, members in sorted(by_pattern.items()):
        regex = re.compile(pattern)
        if all(m in chosen for m in candidates if regex.match(m)):
            targets.append("re:" + pattern)
        else:
            targets.extend(sorted(members))
    return targets


class GroupScheme(NamedTuple):
    """What a `config_groups` entry declares for the modules it targets (its first four fields are the
    (bits, group, symmetric, kind) `vllm_rules` compares across fused projections)."""

    bits: int | None
    group_size: int  # 0: per channel; a `block` strategy's block width
    symmetric: bool
    kind: str  # "int" or "float"
    format: str  # e.g. pack-quantized, int-quantized, float-quantized
    static_input: bool  # input_activations with a fixed `input_scale`
    grid: str | None  # qconvert's grid for a float scheme (None: none matches); "int" for integers


def schemes_from_config(
    quantization_config: dict, modules: set[str], runtime_name=None
) -> dict[str, GroupScheme | None]:
    """module -> the `GroupScheme` of the first config group targeting it (a module name, a "re:" pattern
    or the class name Linear), or None: how readers resolve `targets`. Targets are matched against each
    module's name as stored and as the runtime renames it (`runtime_name`)."""
    rules = []
    for group in (quantization_config.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        strategy = weights.get("strategy") or ""
        block = weights.get("block_structure") if strategy == "block" else None
        bits, kind = weights.get("num_bits"), weights.get("type", "int")
        group_size = (block[1] if block else weights.get("group_size")) or 0
        layout = group.get("format") or quantization_config.get("format") or FORMAT
        scheme = GroupScheme(
            bits=bits,
            group_size=group_size,
            symmetric=weights.get("symmetric", True),
            kind=kind,
            format=layout,
            static_input=(group.get("input_activations") or {}).get("dynamic") is False,
            grid="int" if kind == "int" else floats.grid_of(bits, group_size, layout, strategy),
        )
        rules += [(target, scheme) for target in group.get("targets", [])]

    def scheme_of(module: str) -> GroupScheme | None:
        names = {module, module_name(runtime_name(module + ".weight"))} if runtime_name else {module}
        for target, scheme in rules:
            for name in names:
                if (target.startswith("re:") and re.match(target[3:], name)) or target in ("Linear", name):
                    return scheme
        return None

    return {module: scheme_of(module) for module in modules}


# ---------------------------------------------------------------- reading compressed-tensors checkpoints


def _modules(raw: Checkpoint, quantization: dict) -> dict[str, StoredModule]:
    prefixes = [n.removesuffix("weight_scale") for n in raw.tensors if n.endswith(".weight_scale")]
    skeleton = raw.skeleton()
    schemes = schemes_from_config(
        quantization, {p.rstrip(".") for p in prefixes}, skeleton.runtime_name if skeleton else None
    )
    modules = {}
    for prefix in prefixes:
        scheme = schemes[prefix.rstrip(".")]
        if scheme is None:
            raise SourceError(f"{prefix}weight_scale is stored but no config group of {raw.source} targets it.")
        if scheme.kind == "float":
            modules[prefix + "weight"] = _float_module(raw, prefix, scheme)
    int_prefixes = [p for p in prefixes if schemes[p.rstrip(".")].kind == "int"]
    unpacked = [p for p in int_prefixes if schemes[p.rstrip(".")].format != FORMAT]
    if unpacked:
        raise SourceError(
            f"{unpacked[0].rstrip('.')} is compressed-tensors {schemes[unpacked[0].rstrip('.')].format}, which "
            f"qconvert does not read as a source yet (it reads {FORMAT} and "
            f"{', '.join(floats.FLOAT_FORMATS.values())})."
        )
    shapes = dict(raw.iter_tensors([p + "weight_shape" for p in int_prefixes], hash_on_the_way=False))
    for prefix in int_prefixes:
        bits, group, symmetric = schemes[prefix.rstrip(".")][:3]
        parts = {
            role: prefix + role
            for role in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
            if prefix + role in raw.tensors
        }
        shape = tuple(shapes[prefix + "weight_shape"].tolist())
        modules[prefix + "weight"] = StoredModule(parts, shape, bits, group, symmetric)
    return modules


def _float_module(raw: Checkpoint, prefix: str, scheme: GroupScheme) -> StoredModule:
    """A float-quantized (fp8, mxfp8, fp8-block) or FP4-packed (nvfp4, mxfp4) module, as
    `compressed_tensors_float.py` lays them out; any other float scheme is refused by name."""
    bits, group, grid = scheme.bits, scheme.group_size, scheme.grid
    one_byte = grid in floats.FP8_GRIDS
    roles = ("weight", "weight_scale") if one_byte else ("weight_packed", "weight_scale", "weight_global_scale")
    parts = {role: prefix + role for role in roles if prefix + role in raw.tensors}
    first = raw.tensors.get(prefix + roles[0])
    if grid is None or first is None:
        raise SourceError(
            f"{prefix.rstrip('.')} is compressed-tensors {bits}-bit float in groups of {group}, which qconvert "
            "does not read (it reads fp8, mxfp8, nvfp4 and mxfp4)."
        )
    rows, columns = first.shape
    shape = (rows, columns if one_byte else 2 * columns)
    return StoredModule(parts, shape, bits, group, True, grid)


def _decode(module: StoredModule, parts: dict, quantization: dict, dtype: torch.dtype):
    if module.grid != "int":
        stored = {f"m.{role}": tensor for role, tensor in parts.items()}
        config = QuantConfig(bits=module.bits, group_size=module.group_size, symmetric=True, grid=module.grid)
        return floats.decode("m", stored, config, module.shape, dtype), None
    rows, columns = module.shape
    zeros = parts.get("weight_zero_point")
    if zeros is not None:
        zeros = unpack_stream_words(zeros.T, module.bits, rows).T.contiguous()
    codes = unpack_stream_words(parts["weight_packed"], module.bits, columns)
    return stored_quantized(codes, parts["weight_scale"], zeros, module.group_size or columns, module, dtype), None


READER = Reader(markers=(".weight_packed", ".weight_scale"), modules=_modules, decode=_decode)


# ---------------------------------------------------------------- exporting a qconvert output


def export(source: ExportSource, destination: Path, force: bool = False) -> ExportReport:
    """Write a qconvert output re-packed in this layout at `destination`: the same codes, scales and zero
    points, so nothing is requantized; the result is still a qconvert output, whose manifest names the
    re-packed tensors and their checksums.

    Raises:
        UnsupportedModelError: the layout cannot hold one of the quantized tensors (e.g. quantized
            embeddings, which transformers cannot load from it).
        OutputError: `destination` exists and `force` is false.
    """
    output, manifest = source.path, source.manifest
    config = read_config(output, "a compressed-tensors checkpoint")
    layout = CompressedTensorsLayout()
    refusal = refusal_for(manifest.tensors)
    if refusal:
        raise UnsupportedModelError(
            f"compressed-tensors cannot store this model: {refusal}; qconvert's native layout holds it "
            "(qconvert model --layout native)."
        )
    records = [_relaid(r, layout) for r in manifest.tensors]
    relaid = dataclasses.replace(manifest, layout=layout.name, tensors=records)
    relaid.compute_totals()
    specs = [TensorSpec(name, s.dtype, tuple(s.shape)) for r in records for name, s in r.stored.items()]
    report = ExportReport(destination, "compressed-tensors")
    with staged_output(destination, force, [output]) as folder:
        writer = SafetensorsStreamWriter(
            folder / WEIGHTS_FILE,
            specs,
            metadata_bytes=len(json.dumps({"format": "pt", METADATA_KEY: relaid.widest_json()})),
        )
        try:
            for (record, stored), new in zip(source.records(), records):
                tensors = (
                    layout.encode(record.name, source.quantized(record, stored))
                    if record.action == "quantized"
                    else {record.name: stored[record.name]}
                )
                for name, tensor in tensors.items():
                    new.stored[name].sha256 = writer.write(name, tensor)
                report.exact.append(record.name)
            writer.finish({"format": "pt", METADATA_KEY: relaid.to_json()})
        finally:
            writer.close()
        skeleton = build_skeleton(output, config, [r.name for r in records])
        config["quantization_config"] = layout.quantization_config(records, skeleton.runtime_name if skeleton else None)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / MANIFEST_FILE).write_text(relaid.to_json() + "\n")
        copy_tokenizer_files(output, folder)
    return report


def refusal_for(records: list[TensorRecord]) -> str | None:
    """Why this layout cannot hold these records' quantized tensors, or None: what `export` and `check`
    both ask of a qconvert output."""
    quantized = [(r.name, tuple(r.shape), record_config(r)) for r in records if r.action == "quantized"]
    return CompressedTensorsLayout().refusal(quantized)


def _relaid(record: TensorRecord, layout: Layout) -> TensorRecord:
    """The record with its stored tensors as `layout` names and shapes them (checksums filled on writing)."""
    if record.action != "quantized":
        stored = {n: dataclasses.replace(s, file=WEIGHTS_FILE) for n, s in record.stored.items()}
    else:
        specs = layout.specs(record.name, tuple(record.shape), record_config(record))
        stored = {
            s.name: StoredRecord(dtype=s.dtype, shape=list(s.shape), bytes=s.nbytes, file=WEIGHTS_FILE) for s in specs
        }
    return dataclasses.replace(record, stored=stored)


# ---------------------------------------------------------------- what runtimes accept


def check(path: Path, runtime: str) -> list[Problem]:
    """Every quantized module of a compressed-tensors folder that transformers or vLLM would not load: no
    config group, missing parts, a dtype the loader refuses, a quantized embedding; for vLLM also grids
    its kernels lack and fused projections on different schemes."""
    config, tensors = config_json(path), stored_headers(path)
    quantized = {name.removesuffix(".weight_scale") for name in tensors if name.endswith(".weight_scale")}
    skeleton = build_skeleton(path, config, [f"{m}.weight" for m in quantized])
    schemes = schemes_from_config(
        config.get("quantization_config") or {}, quantized, skeleton.runtime_name if skeleton else None
    )
    problems = []
    for module in sorted(quantized):
        if schemes[module] is None:
            problems.append(Problem(module, "stored packed, but no config group of quantization_config targets it"))
            continue
        problems += _module_problems(module, schemes[module], tensors, runtime)
    if runtime == "vllm":
        problems += fused_problems(schemes)
    return problems


# What each kind of module stores: part -> its dtype (None: any), for (type, bits, group size).
INT_PARTS = {"weight_packed": torch.int32, "weight_scale": None, "weight_shape": torch.int64}
FLOAT_PARTS = {
    "fp8": {"weight": torch.float8_e4m3fn, "weight_scale": None},
    "mxfp8": {"weight": torch.float8_e4m3fn, "weight_scale": torch.uint8},
    "fp8-block": {"weight": torch.float8_e4m3fn, "weight_scale": None},
    "nvfp4": {"weight_packed": torch.uint8, "weight_scale": torch.float8_e4m3fn, "weight_global_scale": torch.float32},
    "mxfp4": {"weight_packed": torch.uint8, "weight_scale": torch.uint8},
}


def _module_problems(module: str, scheme: GroupScheme, tensors: dict, runtime: str) -> list[Problem]:
    bits, group, kind, grid = scheme.bits, scheme.group_size, scheme.kind, scheme.grid
    if grid is None:
        return [Problem(module, f"compressed-tensors has no {bits}-bit float format in groups of {group}")]
    if kind == "float":
        required = dict(FLOAT_PARTS[grid])
    elif scheme.format == "int-quantized":
        required = {"weight": torch.int8, "weight_scale": None}
    else:
        required = {**INT_PARTS, **({} if scheme.symmetric else {"weight_zero_point": None})}
    if scheme.static_input:  # the config promises a fixed input scale: without it the runtime runs uncalibrated
        required["input_scale"] = torch.float32
    problems = []
    for part, dtype in required.items():
        header = tensors.get(f"{module}.{part}")
        if header is None:
            problems.append(Problem(module, f"{module}.{part} is missing"))
        elif dtype is not None and header[0] != dtype:
            problems.append(Problem(module, f"{part} is {header[0]}, not {str(dtype).removeprefix('torch.')}"))
    if "embed" in module or module.endswith("lm_head"):
        why = f"{runtime} quantizes only linear layers from compressed-tensors; this embedding cannot load"
        problems.append(Problem(module, why))
    if runtime == "vllm" and kind == "int":
        problems += vllm_scheme_problems(module, bits, group, allowed_bits=(4, 8))
    if runtime == "vllm" and kind == "float":
        problems += _vllm_float_problems(module, grid, group)
    return problems


def _vllm_float_problems(module: str, grid: str, group: int) -> list[Problem]:
    """What vLLM's compressed-tensors schemes (CompressedTensorsW8A16Fp8, W8A8Fp8, W8A8Mxfp8) do not take."""
    if grid == "fp8" and group:
        return [
            Problem(module, f"vLLM's FP8 kernels take one scale per output channel or tensor, not groups of {group}")
        ]
    if grid == "mxfp8":
        return [
            Problem(
                module,
                "vLLM runs mxfp8 only as W8A8, quantizing the inputs to MXFP8 too: its output would differ "
                "from this weight-only model",
            )
        ]
    return []
