"""compressed-tensors' float formats, for qconvert's fp8, mxfp8, nvfp4 and mxfp4 grids (the rest of the
compressed-tensors room is `compressed_tensors.py`, whose layout calls these for those grids).

For a linear layer `<module>` whose weight is rows × columns (compressed-tensors 0.20's compressors):

- fp8, `float-quantized`: `weight` F8_E4M3 (rows, columns), `weight_scale` F16/BF16 (rows, groups);
- mxfp8, `mxfp8-quantized`: `weight` F8_E4M3 (rows, columns), `weight_scale` U8 E8M0 (rows, columns/32);
- nvfp4, `nvfp4-pack-quantized`: `weight_packed` U8 (rows, columns/2), `weight_scale` F8_E4M3
  (rows, columns/16), `weight_global_scale` F32 (1);
- mxfp4, `mxfp4-pack-quantized`: `weight_packed` U8 (rows, columns/2), `weight_scale` U8 E8M0
  (rows, columns/32).

FP4 codes are E2M1 bit patterns, two per byte, the first in the low nibble: qconvert's own 4-bit
packing (`packing.pack_codes`). FP8 codes are float8_e4m3fn's bytes. compressed-tensors divides block
scales by `weight_global_scale`, which is therefore the reciprocal of qconvert's global scale (a power
of two, so exactly). Every value moves bit for bit.
"""

import torch

from qconvert.formats.base import scale_spec
from qconvert.io.writing import TensorSpec
from qconvert.packing import pack_codes, unpack_codes
from qconvert.quantizers.base import QuantConfig, QuantizedTensor
from qconvert.quantizers.grids import compact_scales, expand_scales

FLOAT_FORMATS = {
    "fp8": "float-quantized",
    "fp8-block": "float-quantized",
    "mxfp8": "mxfp8-quantized",
    "nvfp4": "nvfp4-pack-quantized",
    "mxfp4": "mxfp4-pack-quantized",
}
SCALE_DTYPE_NAMES = {"nvfp4": "torch.float8_e4m3fn", "mxfp4": "torch.uint8", "mxfp8": "torch.uint8"}
FP8_GRIDS = ("fp8", "mxfp8", "fp8-block")  # one float8_e4m3fn byte per weight, unpacked


def grid_of(bits: int, group_size: int, layout: str, strategy: str = "") -> str | None:
    """qconvert's grid for a compressed-tensors float scheme (bits, group size, format, strategy), or None."""
    if layout == FLOAT_FORMATS["mxfp8"]:
        return "mxfp8"
    if strategy == "block":
        return "fp8-block" if (bits, group_size) == (8, 128) else None
    return "fp8" if bits == 8 else {16: "nvfp4", 32: "mxfp4"}.get(group_size)


def specs(module: str, shape: tuple[int, int], config: QuantConfig) -> list[TensorSpec]:
    rows, columns = shape
    scale = scale_spec(f"{module}.weight_scale", rows, config.groups_for(columns), config)
    if config.grid in FP8_GRIDS:
        return [TensorSpec(f"{module}.weight", "F8_E4M3", (rows, columns)), scale]
    stored = [TensorSpec(f"{module}.weight_packed", "U8", (rows, columns // 2)), scale]
    if config.grid == "nvfp4":
        stored.append(TensorSpec(f"{module}.weight_global_scale", "F32", (1,)))
    return stored


def encode(module: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    if q.grid in FP8_GRIDS:
        return {
            f"{module}.weight": q.codes.view(torch.float8_e4m3fn),
            f"{module}.weight_scale": compact_scales(q.scales, q.grid),
        }
    stored = {f"{module}.weight_packed": pack_codes(q.codes, 4), f"{module}.weight_scale": q.scales}
    if q.global_scale is not None:
        stored[f"{module}.weight_global_scale"] = q.global_scale.float().reciprocal()
    return stored


def decode(module: str, stored: dict[str, torch.Tensor], config: QuantConfig, shape, dtype) -> QuantizedTensor:
    rows, columns = shape
    if config.grid in FP8_GRIDS:
        codes = stored[f"{module}.weight"].view(torch.uint8)
    else:
        codes = unpack_codes(stored[f"{module}.weight_packed"], 4, columns)
    global_scale = stored.get(f"{module}.weight_global_scale")
    return QuantizedTensor(
        codes=codes,
        scales=expand_scales(stored[f"{module}.weight_scale"], config.grid, rows),
        zeros=None,
        bits=config.bits,
        group_size=config.group_size_for(columns),
        shape=(rows, columns),
        dtype=dtype,
        grid=config.grid,
        global_scale=None if global_scale is None else global_scale.float().reciprocal(),
    )


def weights_args_of(bits: int, kind: str, symmetric: bool, strategy: str, group_size: int) -> dict:
    """A config group's `weights` entry with the fields compressed-tensors' own configs carry."""
    return {
        "num_bits": bits,
        "type": kind,
        "symmetric": symmetric,
        "strategy": strategy,
        "group_size": group_size or None,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def weights_args(grid: str, group_size: int) -> dict:
    """The `weights` entry of a config group, as compressed-tensors' presets write it (FP8 per channel or
    in groups; NVFP4A16: tensor_group of 16; MXFP4A16: group of 32)."""
    strategy = {"nvfp4": "tensor_group", "fp8-block": "block"}.get(grid, "group" if group_size else "channel")
    args = weights_args_of(8 if grid in FP8_GRIDS else 4, "float", True, strategy, group_size)
    if grid == "fp8-block":  # 128 x 128 blocks: compressed-tensors' FP8_BLOCK
        args.update(group_size=None, block_structure=[128, 128])
    if grid in SCALE_DTYPE_NAMES:
        args["scale_dtype"] = SCALE_DTYPE_NAMES[grid]
    return args
