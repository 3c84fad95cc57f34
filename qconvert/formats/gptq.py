"""Export a qconvert output in the GPTQ checkpoint layout (AutoGPTQ's "gptq" format, version 1), which
transformers (through optimum/gptqmodel), vLLM and SGLang read.

For a quantized linear `m` with weight (out, in), `bits` ∈ {2, 4, 8} and groups of `g` input columns:
- `m.qweight` int32 (in·bits/32, out): word [i, j] holds the codes of inputs 32/bits·i ... for output
  j, the first in the lowest bits (packed down the *input* dimension, unlike qconvert's rows);
- `m.qzeros` int32 (in/g, out·bits/32): the zero points packed the same way along the *output* dimension;
- `m.scales` float16 (in/g, out), `m.g_idx` int32 (in,) = i // g (no act-order permutation:
  qconvert's groups are contiguous);
- weight[j, i] = scales[g_idx[i], j] · (code[i, j] − (qzeros[g_idx[i], j] + 1)).

The "+ 1" is version 1's convention: AutoGPTQ stored zero − 1, and every v1 reader adds the 1 back.
Version 2 (GPTQModel's in-memory form, `checkpoint_format: gptq_v2`) stores the zero itself; readers of
v1 are the widespread ones, so v1 is written. A zero of 0 cannot be stored in v1 (0 − 1 wraps); such a
group's zero becomes 1 and its codes move up by one, which is exact unless a code was already the
largest (then that code is clipped, and the tensor is reported as requantized).
GPTQ holds one grid per model; a tensor on another grid is requantized onto the most common one, and
quantized non-linear tensors (embeddings) are written dequantized in float16.

Read as a source (`READER`): AutoGPTQ v1 and GPTQModel v2 (`checkpoint_format: gptq_v2`, zeros stored as
they are) at 2, 4 and 8 bits. An act-order g_idx (groups not contiguous) is read as float only.
"""

import json
import re
from collections import Counter
from pathlib import Path

import torch

from qconvert.errors import SourceError, UnsupportedModelError
from qconvert.formats.base import (
    ExportSource,
    Problem,
    Reader,
    StoredModule,
    config_json,
    stored_headers,
    stored_quantized,
)
from qconvert.formats.exporting import (
    WEIGHTS_FILE,
    ExportReport,
    copy_tokenizer_files,
    read_config,
    recomputed_by_runtimes,
)
from qconvert.formats.vllm_rules import vllm_scheme_problems
from qconvert.io.loading import Checkpoint
from qconvert.io.writing import SafetensorsStreamWriter, TensorSpec, staged_output
from qconvert.manifest import TensorRecord
from qconvert.packing import pack_words, unpack_words
from qconvert.quantizers.base import QuantConfig, QuantizedTensor, dequantize
from qconvert.quantizers.rtn import rtn_quantize

GPTQ_BITS = (2, 4, 8)  # 3-bit GPTQ packs across words in its own pattern: not written
BLOCK = re.compile(r"\.\d+\.")  # the ".3." of model.layers.3.mlp.up_proj


def export(source: ExportSource, destination: Path, force: bool = False) -> ExportReport:
    """Write `output` as a GPTQ (v1) checkpoint folder at `destination`.

    Raises:
        SourceError: `output` is not a qconvert output with a config.json.
        UnsupportedModelError: no quantized linear, a grid GPTQ cannot hold (3, 5 or 6 bits; per channel), or
            a linear whose input features are not a multiple of 32.
        OutputError: `destination` exists and `force` is false.
    """
    output, manifest = source.path, source.manifest
    config = read_config(output, "a GPTQ checkpoint")
    linears = [r for r in manifest.tensors if r.action == "quantized" and _is_linear(r)]
    columns = {r.name: r.shape[1] for r in linears}
    unpackable = [name for name, count in columns.items() if count % 32]
    if unpackable:  # AutoGPTQ sizes qweight as in_features // 32 * bits rows: a remainder has no room
        raise UnsupportedModelError(
            f"GPTQ packs input features 32 at a time, and {unpackable[0]} has {columns[unpackable[0]]} "
            f"({len(unpackable)} such tensors); export it to gguf or mlx, which write such tensors in float."
        )
    grid = _model_grid(linears)
    kinds = {_module_kind(r.name) for r in linears}
    specs = [spec for r in manifest.tensors for spec in _specs(r, grid, kinds)]
    report = ExportReport(destination, "gptq")
    with staged_output(destination, force, [output]) as folder:
        writer = SafetensorsStreamWriter(folder / WEIGHTS_FILE, specs, metadata_bytes=64)
        try:
            for record, stored in source.records():
                for name, tensor in _gptq_tensors(source, record, stored, grid, kinds, report).items():
                    writer.write(name, tensor)
            writer.finish({"format": "pt"})
        finally:
            writer.close()
        quantization = _quantize_config(grid, sorted(kinds))
        config["quantization_config"] = {**quantization, "quant_method": "gptq"}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "quantize_config.json").write_text(json.dumps(quantization, indent=2) + "\n")
        copy_tokenizer_files(output, folder)
    return report


def _model_grid(linears: list[TensorRecord]) -> tuple[int, int, bool]:
    """(bits, group size, symmetric) of most of the quantized linears: GPTQ has one per model."""
    if not linears:
        raise UnsupportedModelError("GPTQ stores quantized linear layers, and this output has none.")
    bits, group, symmetric = Counter((r.bits, r.group_size, r.symmetric) for r in linears).most_common(1)[0][0]
    if bits not in GPTQ_BITS or group == 0:
        grid = f"{bits}-bit {'per channel' if group == 0 else f'groups of {group}'}"
        raise UnsupportedModelError(f"GPTQ export takes 2, 4 or 8-bit groups; most of this output is {grid}.")
    return bits, group, symmetric


def _target(record: TensorRecord, kinds: set[str]) -> str:
    """What the tensor becomes: "skip", "copy" (as stored), "float16" (dequantized) or "gptq"."""
    if recomputed_by_runtimes(record.name):
        return "skip"
    if _is_linear(record) and _module_kind(record.name) in kinds:
        return "gptq"  # a loader replaces every module of a quantized kind, so all of them need codes
    return "float16" if record.action == "quantized" else "copy"


def _specs(record: TensorRecord, grid: tuple[int, int, bool], kinds: set[str]) -> list[TensorSpec]:
    target = _target(record, kinds)
    if target != "gptq":
        dtype = {"skip": None, "copy": record.source_dtype, "float16": "F16"}[target]
        return [TensorSpec(record.name, dtype, tuple(record.shape))] if dtype else []
    (rows, columns), (bits, group, _) = record.shape, grid
    if columns % (32 // bits) or rows % (32 // bits):
        raise UnsupportedModelError(f"{record.name} is {rows} x {columns}, which {bits}-bit GPTQ words do not divide.")
    module, groups, per_word = record.name.removesuffix(".weight"), -(-columns // group), 32 // bits
    return [
        TensorSpec(f"{module}.qweight", "I32", (columns // per_word, rows)),
        TensorSpec(f"{module}.qzeros", "I32", (groups, rows // per_word)),
        TensorSpec(f"{module}.scales", "F16", (groups, rows)),
        TensorSpec(f"{module}.g_idx", "I32", (columns,)),
    ]


def _gptq_tensors(
    source: ExportSource,
    record: TensorRecord,
    stored: dict,
    grid: tuple[int, int, bool],
    kinds: set[str],
    report: ExportReport,
) -> dict[str, torch.Tensor]:
    target = _target(record, kinds)
    if target == "skip":
        return {}
    if target == "copy":
        report.exact.append(record.name)
        return {record.name: stored[record.name]}
    q = source.quantized(record, stored) if record.action == "quantized" else stored[record.name]
    if target == "float16":
        report.requantized.append(record.name)
        report.types[record.name] = "float16"
        return {record.name: dequantize(q, torch.float16)}
    bits, group, symmetric = grid
    onto_grid = (
        not isinstance(q, QuantizedTensor)
        or q.grid != "int"
        or (q.bits, q.group_size, q.symmetric) != grid
        or q.scales.dtype != torch.float16
    )
    if onto_grid:  # another grid, or a float tensor of a quantized kind
        config = QuantConfig(bits=bits, group_size=group, symmetric=symmetric, scale_dtype="float16")
        weight = dequantize(q, torch.float32) if isinstance(q, QuantizedTensor) else q.float()
        q = rtn_quantize(record.name, weight, config)
    codes, zeros, clipped = _v1_codes_and_zeros(q)
    getattr(report, "requantized" if onto_grid or clipped else "exact").append(record.name)
    module = record.name.removesuffix(".weight")
    report.types[f"{module}.qweight"] = f"gptq int{bits} g{group}"
    columns = q.shape[1]
    return {
        f"{module}.qweight": pack_int32(codes.t(), bits),  # (in, out): packed down the input dimension
        f"{module}.qzeros": pack_int32((zeros - 1).t().contiguous(), bits, along_rows=False),
        f"{module}.scales": q.scales.t().contiguous(),
        f"{module}.g_idx": torch.arange(columns, dtype=torch.int32) // group,
    }


def _v1_codes_and_zeros(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Codes (out, in) and zeros (out, groups) as int32 with every zero ≥ 1, and whether a code was clipped."""
    codes = q.codes.to(torch.int32)
    if q.zeros is None:
        zeros = torch.full(q.scales.shape, 2 ** (q.bits - 1), dtype=torch.int32)
    else:
        zeros = q.zeros.to(torch.int32)
    shift = (zeros == 0).to(torch.int32)  # v1 cannot store a zero of 0: move the group up one code
    if not shift.any():
        return codes, zeros, False
    per_column = shift.repeat_interleave(q.group_size, dim=1)[:, : codes.shape[1]]
    moved = codes + per_column
    top = 2**q.bits - 1
    clipped = bool((moved > top).any())
    return moved.clamp_(max=top), zeros + shift, clipped


def pack_int32(values: torch.Tensor, bits: int, along_rows: bool = True) -> torch.Tensor:
    """Pack 32/bits consecutive values (down the rows, as qweight; or along each row, as qzeros) into one
    int32 each, the first in the lowest bits (`packing.pack_words`)."""
    return pack_words(values.t(), bits).t().contiguous() if along_rows else pack_words(values, bits)


def _quantize_config(grid: tuple[int, int, bool], modules: list[str]) -> dict:
    bits, group, symmetric = grid
    return {
        "bits": bits,
        "group_size": group,
        "sym": symmetric,
        "desc_act": False,
        "static_groups": False,
        "true_sequential": True,
        "checkpoint_format": "gptq",
        "quant_method": "gptq",
        "modules_in_block_to_quantize": [modules],
    }


def _is_linear(record: TensorRecord) -> bool:
    """A linear layer's weight inside a numbered block (GPTQ quantizes those, never embeddings or the head)."""
    return (
        len(record.shape) == 2
        and record.name.endswith(".weight")
        and BLOCK.search(record.name) is not None
        and "embed" not in record.name
    )


def _module_kind(name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> self_attn.q_proj"""
    return BLOCK.split(name.removesuffix(".weight"), maxsplit=1)[-1]


# ---------------------------------------------------------------- reading GPTQ checkpoints


def _modules(raw: Checkpoint, quantization: dict) -> dict[str, StoredModule]:
    bits, group = quantization.get("bits"), quantization.get("group_size", -1)
    if bits not in GPTQ_BITS:
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
            modules[prefix + "weight"] = StoredModule(
                parts, (rows, columns), bits, group if group > 0 else 0, bool(quantization.get("sym", True))
            )
    return modules


def _decode(module: StoredModule, parts: dict, quantization: dict, dtype: torch.dtype):
    bits, (rows, columns) = module.bits, module.shape
    codes = unpack_words(parts["qweight"].t(), bits).t()[:columns].t()  # (out, in)
    zeros = unpack_words(parts["qzeros"], bits)[:, :rows].t()  # (out, groups)
    convention = quantization.get("checkpoint_format", "gptq")
    if convention != "gptq_v2":
        zeros = (zeros + 1) & (2**bits - 1)  # v1 stores zero - 1
    if module.symmetric and not bool((zeros == 2 ** (bits - 1)).all()):
        found = sorted(set(zeros.unique().tolist()))[:4]
        raise SourceError(
            f"{next(iter(module.parts.values()))}: a symmetric {bits}-bit GPTQ checkpoint in the "
            f"{convention} convention must decode every zero point to {2 ** (bits - 1)}, "
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
        return None, weight.to(dtype)
    return stored_quantized(codes, scales, zeros, group, module, dtype), None


READER = Reader(markers=(".qweight",), modules=_modules, decode=_decode)


# ---------------------------------------------------------------- what runtimes accept


def check(path: Path, runtime: str) -> list[Problem]:
    """Every tensor of a GPTQ folder whose parts, dtypes or shapes a GPTQ loader (transformers, vLLM)
    would not accept, and for vLLM grids its kernels lack."""
    quantization = config_json(path)["quantization_config"]
    bits, group = quantization.get("bits"), quantization.get("group_size")
    tensors = stored_headers(path)
    problems = []
    modules = sorted(name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight"))
    if not modules:
        problems.append(Problem(None, "quantization_config says gptq, but no tensor is named *.qweight"))
    for module in modules:
        parts = {part: tensors.get(f"{module}.{part}") for part in ("qweight", "qzeros", "scales", "g_idx")}
        missing = [p for p, header in parts.items() if header is None]
        if missing:
            problems.append(Problem(module, f"{', '.join(missing)} missing"))
            continue
        problems += _part_problems(module, parts, bits, group)
        if runtime == "vllm":
            problems += vllm_scheme_problems(module, bits, group if group > 0 else 0, allowed_bits=(2, 3, 4, 8))
    return problems


def _part_problems(module: str, parts: dict, bits: int, group: int) -> list[Problem]:
    per_word = 32 // bits if bits in GPTQ_BITS else None
    columns, rows = parts["g_idx"][1][0], parts["scales"][1][1]
    problems = []
    if columns % 32:
        problems.append(Problem(module, f"{columns} input features: GPTQ loaders pack them 32 at a time"))
    expected = {
        "qweight": (torch.int32, (columns // per_word, rows) if per_word else None),
        "qzeros": (torch.int32, (-(-columns // group) if group > 0 else 1, rows // per_word) if per_word else None),
        "scales": (torch.float16, None),
        "g_idx": (torch.int32, (columns,)),
    }
    for part, (dtype, shape) in expected.items():
        if parts[part][0] != dtype or (shape and parts[part][1] != shape):
            found = f"is {parts[part][0]} {parts[part][1]}, expected {dtype} {shape or ''}".rstrip()
            problems.append(Problem(f"{module}.{part}", found))
    return problems
