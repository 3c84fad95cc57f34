"""Export a qconvert output in mlx_lm's layout, which `mlx_lm.load` / `mlx_lm.generate` read.

For a quantized module `m` (a Linear or an Embedding) mlx_lm stores three tensors:
- `m.weight`: uint32 (rows, columns·bits/32), each row a little-endian bit stream of the codes
  (code j in bits j·bits ... of the stream, words little-endian) — the same stream qconvert's native
  packing writes, read as 32-bit words;
- `m.scales` and `m.biases`: (rows, columns/group), with weight = scales · code + biases.
So qconvert's (code − zero) · scale becomes biases = −scale · zero: exact for symmetric grids (zero is
a power of two), rounded to the scales' float type for asymmetric ones (reported as repacked).
config.json gets `quantization` = {"group_size", "bits"} of the most common grid plus one entry per
module on another grid. MLX takes groups of 32, 64 or 128 that divide the row; a tensor on any other
grid (per channel, partial groups) is requantized by round-to-nearest on the largest such group.

`check` says what mlx_lm would refuse; `dequantized` reads such a folder back (weight = scales · code +
biases) for `check --forward` to compare with mlx_lm's own logits.
"""

import json
from collections import Counter
from pathlib import Path

import torch

from qconvert.formats.base import ExportSource, Problem, config_json, stored_headers
from qconvert.formats.exporting import (
    WEIGHTS_FILE,
    ExportReport,
    copy_tokenizer_files,
    read_config,
    recomputed_by_runtimes,
)
from qconvert.io.dtypes import DTYPE_NAMES
from qconvert.io.writing import SafetensorsStreamWriter, TensorSpec, staged_output
from qconvert.manifest import TensorRecord
from qconvert.packing import pack_codes, unpack_codes
from qconvert.quantizers.base import QuantConfig, QuantizedTensor, dequantize
from qconvert.quantizers.grids import GRIDS, effective_scales
from qconvert.quantizers.rtn import rtn_quantize

MLX_GROUP_SIZES = (128, 64, 32)
MLX_BITS = (2, 3, 4, 5, 6, 8)
MX_MODES = {"mxfp4": 4, "mxfp8": 8}  # MLX modes whose codes and E8M0 scales are qconvert's grids bit for bit


def export(source: ExportSource, destination: Path, force: bool = False) -> ExportReport:
    """Write `output` as an mlx_lm model folder at `destination`.

    Raises:
        SourceError: `output` is not a qconvert output with a config.json.
        OutputError: `destination` exists and `force` is false.
    """
    output, manifest = source.path, source.manifest
    config = _mlx_config(output)
    grids = {r.name: mlx_grid(r) for r in manifest.tensors if r.action == "quantized"}
    specs = [spec for r in manifest.tensors for spec in _specs(r, grids.get(r.name))]
    report = ExportReport(destination, "mlx")
    with staged_output(destination, force, [output]) as folder:
        writer = SafetensorsStreamWriter(folder / WEIGHTS_FILE, specs, metadata_bytes=64)
        try:
            for record, stored in source.records():
                if record.name in grids:
                    q = source.quantized(record, stored)
                    for name, tensor in _mlx_tensors(record.name, q, grids[record.name], report).items():
                        writer.write(name, tensor)
                elif not recomputed_by_runtimes(record.name):
                    writer.write(record.name, stored[record.name])
                    report.exact.append(record.name)
            writer.finish({"format": "mlx"})
        finally:
            writer.close()
        config["quantization"] = config["quantization_config"] = _quantization_config(grids)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(output, folder)
    return report


def mlx_grid(record: TensorRecord) -> tuple[int, int, str] | None:
    """(bits, group size, MLX mode) mlx_lm will store the tensor with: its own grid where MLX has it
    (affine integers, or mxfp4 / mxfp8 whose E2M1 / E4M3 codes and E8M0 scales MLX stores as they are),
    else affine on the largest MLX group dividing the row; None if none does (the tensor is then kept in float)."""
    columns = record.shape[-1]
    if record.grid in MX_MODES and columns % 32 == 0:
        return MX_MODES[record.grid], 32, record.grid
    if record.group_size in MLX_GROUP_SIZES and columns % record.group_size == 0:
        return record.bits, record.group_size, "affine"
    group = next((g for g in MLX_GROUP_SIZES if columns % g == 0), None)
    return (record.bits, group, "affine") if group else None


def _specs(record: TensorRecord, grid: tuple[int, int, str] | None) -> list[TensorSpec]:
    if record.action != "quantized":
        return (
            []
            if recomputed_by_runtimes(record.name)
            else [TensorSpec(record.name, record.source_dtype, tuple(record.shape))]
        )
    if grid is None:
        return [TensorSpec(record.name, record.source_dtype, tuple(record.shape))]
    (rows, columns), (bits, group, mode) = record.shape, grid
    module = record.name.removesuffix(".weight")
    if mode in MX_MODES:
        return [
            TensorSpec(f"{module}.weight", "U32", (rows, columns * bits // 32)),
            TensorSpec(f"{module}.scales", "U8", (rows, columns // group)),
        ]
    scale_dtype = DTYPE_NAMES[getattr(torch, record.scale_dtype)]
    return [
        TensorSpec(f"{module}.weight", "U32", (rows, columns * bits // 32)),
        TensorSpec(f"{module}.scales", scale_dtype, (rows, columns // group)),
        TensorSpec(f"{module}.biases", scale_dtype, (rows, columns // group)),
    ]


def _mlx_tensors(
    name: str, q: QuantizedTensor, grid: tuple[int, int, str] | None, report: ExportReport
) -> dict[str, torch.Tensor]:
    if grid is None:  # no MLX group divides the row: the float values, in the source dtype the specs promise
        report.dequantized.append(name)
        report.types[name] = "float"
        return {name: dequantize(q, q.dtype)}
    bits, group, mode = grid
    module = name.removesuffix(".weight")
    if mode in MX_MODES:  # the same bits: E2M1 / E4M3 codes in a little-endian stream, E8M0 exponents
        report.exact.append(name)
        report.types[f"{module}.weight"] = f"mlx {mode}"
        return {
            f"{module}.weight": pack_codes(q.codes, bits).view(torch.int32).view(torch.uint32),
            f"{module}.scales": q.scales,
        }
    requantize = group != q.group_size or q.grid != "int"
    if requantize:  # not a grid MLX has: round the float weights again on one it has
        scale_dtype = "bfloat16" if q.scales.dtype == torch.bfloat16 else "float16"
        config = QuantConfig(bits=bits, group_size=group, symmetric=False, scale_dtype=scale_dtype)
        q = rtn_quantize(name, dequantize(q, torch.float32), config)
    zeros = (
        q.zeros.to(torch.float64)
        if q.zeros is not None
        else torch.full_like(q.scales, 2 ** (bits - 1), dtype=torch.float64)
    )
    exact_biases = -q.scales.to(torch.float64) * zeros
    biases = exact_biases.to(q.scales.dtype)
    how = (
        "requantized" if requantize else "exact" if torch.equal(biases.to(torch.float64), exact_biases) else "repacked"
    )
    getattr(report, how).append(name)
    report.types[f"{module}.weight"] = f"mlx q{bits} g{group}"
    words = pack_codes(q.codes, bits).view(torch.int32).view(torch.uint32)  # little-endian machines only, as MLX itself
    return {f"{module}.weight": words, f"{module}.scales": q.scales, f"{module}.biases": biases}


def _quantization_config(grids: dict[str, tuple[int, int, str] | None]) -> dict:
    """The most common grid as the default, and every module on another grid by name."""
    counts = Counter(g for g in grids.values() if g)
    if not counts:
        return {}
    common = counts.most_common(1)[0][0]
    config: dict = _grid_entry(common)
    for name, grid in sorted(grids.items()):
        if grid and grid != common:
            config[name.removesuffix(".weight")] = _grid_entry(grid)
    return config


def _grid_entry(grid: tuple[int, int, str]) -> dict:
    bits, group, mode = grid
    return {"group_size": group, "bits": bits, **({"mode": mode} if mode != "affine" else {})}


def _mlx_config(output: Path) -> dict:
    config = read_config(output, "an MLX model")
    # transformers 5 moved rope_theta (and rope_scaling) under rope_parameters; mlx_lm reads the old
    # keys and silently falls back to theta 10000, which garbles every position past the first.
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", rope)
    return config


# ---------------------------------------------------------------- what mlx_lm accepts, and reading it back


def check(path: Path, runtime: str) -> list[Problem]:
    """Every module of an MLX folder that mlx_lm would not load: a grid MLX lacks, missing parts, a
    dtype or shape that does not fit; and a config whose rope base mlx_lm would not find."""
    config, tensors = config_json(path), stored_headers(path)
    quantization = config["quantization"]
    problems = []
    if "rope_parameters" in config and "rope_theta" not in config:
        problems.append(Problem(None, "config.json has rope_parameters but no rope_theta; mlx_lm would use 10000"))
    for name in sorted(n for n in tensors if n.endswith(".scales")):
        module = name.removesuffix(".scales")
        grid = quantization.get(module, quantization)
        problems += _module_problems(module, grid, tensors)
    return problems


def _module_problems(module: str, grid: dict, tensors: dict) -> list[Problem]:
    bits, group, mode = grid.get("bits"), grid.get("group_size"), grid.get("mode", "affine")
    weight, scales, biases = (
        tensors.get(f"{module}.weight"),
        tensors[f"{module}.scales"],
        tensors.get(f"{module}.biases"),
    )
    if mode in MX_MODES:
        if (bits, group) != (MX_MODES[mode], 32) or scales[0] != torch.uint8 or weight is None:
            why = f"MLX's {mode} takes {MX_MODES[mode]}-bit codes in groups of 32 with uint8 scales and no biases"
            return [Problem(module, why)]
        biases = scales  # no biases: the shape checks below compare the scales with themselves
    elif mode != "affine":
        return [Problem(module, f"qconvert checks MLX's affine, mxfp4 and mxfp8 modes, not {mode}")]
    if bits not in MLX_BITS or group not in MLX_GROUP_SIZES:
        return [Problem(module, f"MLX quantizes with 2-8 bits in groups of 32, 64 or 128, not {bits} bits in {group}")]
    if weight is None or biases is None:
        return [Problem(module, "weight, scales and biases must all be present")]
    problems = []
    if weight[0] != torch.uint32:
        problems.append(Problem(f"{module}.weight", f"is {weight[0]}, MLX packs into uint32"))
    columns = weight[1][1] * 32 // bits
    if scales[1] != (weight[1][0], columns // group) or biases[1] != scales[1]:
        problems.append(
            Problem(
                module,
                f"scales {scales[1]} / biases {biases[1]} do not fit {weight[1][0]} rows of "
                f"{columns} columns in groups of {group}",
            )
        )
    return problems


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """The float weights of an MLX folder, read by qconvert: per module, weight = scales · code + biases
    over groups (mxfp4 / mxfp8: E2M1 / E4M3 value · 2^(scale − 127)), the codes a little-endian bit stream in uint32
    words."""
    from safetensors.torch import load_file

    quantization = config_json(path)["quantization"]
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    for name in [n for n in state if n.endswith(".scales")]:
        module = name.removesuffix(".scales")
        grid = quantization.get(module, quantization)
        bits, group = grid["bits"], grid["group_size"]
        words, scales = state.pop(f"{module}.weight"), state.pop(name)
        rows, columns = words.shape[0], words.shape[1] * 32 // bits
        codes = unpack_codes(words.contiguous().view(torch.uint8), bits, columns).view(rows, -1, group)
        mode = grid.get("mode", "affine")
        if mode in MX_MODES:
            weight = GRIDS[mode].decode(codes) * effective_scales(scales, mode, None).unsqueeze(-1)
        else:
            weight = codes.float() * scales.float().unsqueeze(-1) + state.pop(f"{module}.biases").float().unsqueeze(-1)
        state[f"{module}.weight"] = weight.view(rows, columns)
    return state
