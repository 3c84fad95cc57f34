"""Read AWQ checkpoints (AutoAWQ's "gemm" version, 4 bits) as the codes and scales they store.

For a linear with weight (out, in) in groups of `g` input columns: `qweight` int32 (in, out/8) and
`qzeros` int32 (in/g, out/8) are packed along the output dimension in AutoAWQ's interleaved order
0 2 4 6 1 3 5 7 (`AWQ_ORDER`), `scales` float16 (in/g, out); weight = scale · (code − zero).
qconvert reads AWQ but does not write it (GPTQ and compressed-tensors reach the same runtimes).
"""

import torch

from qconvert.errors import SourceError
from qconvert.formats.base import Reader, StoredModule, stored_quantized
from qconvert.io.loading import Checkpoint
from qconvert.packing import unpack_words

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's packing: bits 4i of a word hold column AWQ_ORDER[i]


def _modules(raw: Checkpoint, quantization: dict) -> dict[str, StoredModule]:
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
            modules[prefix + "weight"] = StoredModule(parts, (rows, columns), 4, group, False)
    return modules


def _decode(module: StoredModule, parts: dict, quantization: dict, dtype: torch.dtype):
    codes = unpack_words(parts["qweight"], 4, AWQ_ORDER).t()  # (out, in)
    zeros = unpack_words(parts["qzeros"], 4, AWQ_ORDER).t()
    scales = parts["scales"].t().contiguous()
    return stored_quantized(codes, scales, zeros, module.group_size, module, dtype), None


READER = Reader(markers=(".qweight",), modules=_modules, decode=_decode)
