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
"""

import re
import sys
from collections import defaultdict

import torch

from qconvert.formats.base import Layout, record_config, scale_spec, source_dtype
from qconvert.io.skeleton import EXPERTS
from qconvert.io.writing import TensorSpec
from qconvert.manifest import TensorRecord
from qconvert.packing import pack_codes, unpack_codes
from qconvert.quantizers.base import QuantConfig, QuantizedTensor

FORMAT = "pack-quantized"
EMBEDDING = re.compile(r"(embed|wte|wpe|lm_head)", re.IGNORECASE)


def words_per_row(count: int, bits: int) -> int:
    return -(-count * bits // 32)


def pack_to_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) codes -> int32 (rows, words_per_row(n, bits)), compressed-tensors' layout."""
    packed = pack_codes(codes, bits)
    pad = -packed.shape[1] % 4
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    # Through a flat view: a single-row tensor may carry strides that forbid viewing bytes as words.
    return packed.reshape(-1).view(torch.int32).view(packed.shape[0], -1)


def unpack_from_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    # Through a flat copy: a (n, 1) transpose counts as contiguous yet keeps a stride that forbids the view.
    rows = words.shape[0]
    packed = words.reshape(-1).clone().view(torch.uint8).view(rows, -1)[:, : -(-count * bits // 8)]
    return unpack_codes(packed.contiguous(), bits, count)


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
        if EMBEDDING.search(name):
            return (
                f"{name} is an embedding or output head, which transformers cannot load quantized from "
                "compressed-tensors"
            )
        rows, columns = shape[0], shape[-1]
        if config.group_size and columns % config.group_size:
            return (
                f"{name} has {columns} columns, not a multiple of group size {config.group_size}, "
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
        stored = {f"{module}.weight_packed": pack_to_words(q.codes, q.bits), f"{module}.weight_scale": q.scales}
        if q.zeros is not None:
            stored[f"{module}.weight_zero_point"] = pack_to_words(q.zeros.T, q.bits).T.contiguous()
        stored[f"{module}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
        return stored

    def decode(self, record: TensorRecord, stored: dict[str, torch.Tensor]) -> QuantizedTensor:
        config = record_config(record)
        module = module_name(record.name)
        rows, columns = record.shape
        scales = stored[f"{module}.weight_scale"]
        zeros = stored.get(f"{module}.weight_zero_point")
        if zeros is not None:
            zeros = unpack_from_words(zeros.T, config.bits, rows).T.contiguous()
        return QuantizedTensor(
            codes=unpack_from_words(stored[f"{module}.weight_packed"], config.bits, columns),
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
                schemes[(r.bits, r.group_size, r.symmetric)].append(module_name(rename(r.name)))
        linear_like = {module_name(rename(r.name)) for r in records if r.name.endswith(".weight") and len(r.shape) == 2}
        groups = {}
        for i, ((bits, group_size, symmetric), modules) in enumerate(sorted(schemes.items())):
            groups[f"group_{i}"] = {
                "targets": module_targets(modules, linear_like),
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": symmetric,
                    "strategy": "group" if group_size else "channel",
                    "group_size": group_size or None,
                    "dynamic": False,
                    "actorder": None,
                    "block_structure": None,
                    "observer": "minmax",
                    "observer_kwargs": {},
                },
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        config = {
            "quant_method": "compressed-tensors",
            "format": FORMAT,
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": [],
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }
        if any(not symmetric for _, _, symmetric in schemes):
            # transformers 5 builds asymmetric modules with unpacked zero-point shapes and then
            # rejects the packed ones compressed-tensors itself writes; dequantizing while loading
            # takes the path that reads them correctly. vLLM ignores this key.
            config["dequantize"] = True
        return config


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


def schemes_from_config(quantization_config: dict, modules: set[str], runtime_name=None) -> dict[str, tuple | None]:
    """module -> (bits, group size or 0, symmetric) of the first config group targeting it (a module
    name, a "re:" pattern or the class name Linear), or None: how readers resolve `targets`. Targets
    are matched against each module's name as stored and as the runtime renames it (`runtime_name`)."""
    rules = []
    for group in (quantization_config.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        scheme = (weights.get("num_bits"), weights.get("group_size") or 0, weights.get("symmetric", True))
        rules += [(target, scheme) for target in group.get("targets", [])]

    def scheme_of(module: str) -> tuple | None:
        names = {module, module_name(runtime_name(module + ".weight"))} if runtime_name else {module}
        for target, scheme in rules:
            for name in names:
                if (target.startswith("re:") and re.match(target[3:], name)) or target in ("Linear", name):
                    return scheme
        return None

    return {module: scheme_of(module) for module in modules}
