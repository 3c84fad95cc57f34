"""qconvert's own layout, for any bit width and group size.

For a source weight `W` named `<name>` (rows × columns, groups = ceil(columns / group_size)):

| stored tensor    | dtype        | shape                                  | content                     |
|------------------|--------------|----------------------------------------|-----------------------------|
| `<name>.packed`  | U8           | rows × ceil(columns·bits / 8)          | codes, `packing.py` order   |
| `<name>.scales`  | F16 or BF16  | rows × groups                          | per-group scale             |
| `<name>.zeros`   | U8           | rows × ceil(groups·bits / 8)           | zero points, packed (asymmetric only) |
| `<name>.global_scale` | F32     | 1                                      | nvfp4: scale of the block scales |

fp8-block stores one row of scales per 128 rows (its blocks are 128 × 128).

`W[r, c] = (code[r, c] - zero[r, c // group_size]) * scale[r, c // group_size]`, where a symmetric
weight's zero is 2**(bits-1). On a table grid (`quantizers/grids.py`) `W[r, c] = value[code[r, c]] *
scale[r, c // group_size]`, the scales stored as the grid defines them (U8 E8M0 exponents for mxfp4,
F8_E4M3 for nvfp4). Grid, bits, group size and the original shape are in the manifest.
"""

import torch

from qconvert.formats.base import Layout, record_config, scale_spec, source_dtype
from qconvert.io.writing import TensorSpec
from qconvert.manifest import TensorRecord
from qconvert.packing import pack_codes, packed_row_bytes, unpack_codes
from qconvert.quantizers.base import QuantConfig, QuantizedTensor
from qconvert.quantizers.grids import GRIDS, compact_scales, expand_scales


class NativeLayout(Layout):
    name = "native"

    def specs(self, name: str, shape: tuple[int, int], config: QuantConfig) -> list[TensorSpec]:
        rows, columns = shape
        groups = config.groups_for(columns)
        specs = [
            TensorSpec(f"{name}.packed", "U8", (rows, packed_row_bytes(columns, config.bits))),
            scale_spec(f"{name}.scales", rows, groups, config),
        ]
        if not config.symmetric:
            specs.append(TensorSpec(f"{name}.zeros", "U8", (rows, packed_row_bytes(groups, config.bits))))
        if GRIDS[config.grid].scale == "e4m3":
            specs.append(TensorSpec(f"{name}.global_scale", "F32", (1,)))
        return specs

    def encode(self, name: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        stored = {f"{name}.packed": pack_codes(q.codes, q.bits), f"{name}.scales": compact_scales(q.scales, q.grid)}
        if q.zeros is not None:
            stored[f"{name}.zeros"] = pack_codes(q.zeros, q.bits)
        if q.global_scale is not None:
            stored[f"{name}.global_scale"] = q.global_scale.float()
        return stored

    def decode(self, record: TensorRecord, stored: dict[str, torch.Tensor]) -> QuantizedTensor:
        config = record_config(record)
        rows, columns = record.shape
        scales = expand_scales(stored[f"{record.name}.scales"], config.grid, rows)
        zeros = stored.get(f"{record.name}.zeros")
        return QuantizedTensor(
            codes=unpack_codes(stored[f"{record.name}.packed"], config.bits, columns),
            scales=scales,
            zeros=None if zeros is None else unpack_codes(zeros, config.bits, scales.shape[1]),
            bits=config.bits,
            group_size=config.group_size_for(columns),
            shape=(rows, columns),
            dtype=source_dtype(record),
            grid=config.grid,
            global_scale=stored.get(f"{record.name}.global_scale"),
            activations=config.activations,
            input_scale=None if record.input_scale is None else torch.tensor([record.input_scale]),
        )

    def quantization_config(self, records: list[TensorRecord], runtime_name=None) -> dict:
        # No quant_method on purpose: transformers skips a method it does not know and loads the folder
        # with every quantized weight initialised at random, but refuses a quantization_config without
        # one. `qconvert.load` / `qconvert.load_model` read this layout; `qconvert export` converts it.
        return {
            "format": "qconvert",
            "layout": self.name,
            "note": "qconvert's native layout: load it with qconvert.load_model, or convert it with qconvert export",
        }
