"""Will this file load in that runtime? Check an output against what the runtime expects, from the
headers alone: the config's schema, tensor names, dtypes and shapes, and the quantization schemes the
runtime's loaders and kernels accept. Each problem names the tensor it concerns.

The rules are the runtimes' documented ones, as of the versions the tests load with:
- transformers: float checkpoints; compressed-tensors (linear layers only, every quantized module
  with weight_packed / weight_scale / weight_shape, zero points for asymmetric groups); GPTQ
  (qweight / qzeros / scales / g_idx in AutoGPTQ v1 shapes); GGUF files of architectures it maps.
- llama.cpp: GGUF files: an architecture it runs, the hyper-parameters and tokenizer keys it reads,
  every block's tensors, and block types it has kernels for.
- mlx (mlx_lm): float checkpoints, or weight / scales / biases with uint32 packed rows, groups of 32,
  64 or 128, and rope_theta at the top of config.json (mlx_lm does not read rope_parameters).
- vllm: compressed-tensors or GPTQ with 4 or 8-bit weights (GPTQ also 2 and 3), groups of 32, 64 or
  128 or per channel, no quantized embeddings, and one scheme shared by the projections vLLM fuses
  (q/k/v into qkv_proj, gate/up into gate_up_proj).
"""

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.errors import SourceError
from qconvert.formats.compressed_tensors import schemes_from_config
from qconvert.manifest import MANIFEST_FILE

RUNTIMES = ("transformers", "llama.cpp", "mlx", "vllm")
FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
GGUF_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
LLAMA_CPP_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count")
LLAMA_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Problem:
    tensor: str | None  # None: the file or its config as a whole
    message: str

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "message": self.message}


def detect_format(path: Path) -> str:
    """"gguf", "mlx", "gptq", "compressed-tensors", "qconvert-native" or "float".

    Raises:
        SourceError: `path` does not exist, or is a folder without config.json or weights.
    """
    if path.is_file() and path.open("rb").read(4) == b"GGUF":
        return "gguf"
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} is neither a .gguf file nor a model folder with config.json.")
    config = _config(path)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if "quantization" in config:
        return "mlx"
    if method in ("gptq", "compressed-tensors"):
        return method
    if (path / MANIFEST_FILE).is_file() and json.loads((path / MANIFEST_FILE).read_text()).get("layout") == "native":
        return "qconvert-native"
    return "float"


def check(path: Path, runtime: str) -> tuple[str, list[Problem]]:
    """(the format found, every problem `runtime` would have loading it); no problems: it loads."""
    found = detect_format(path)
    accepted = {"transformers": {"float", "compressed-tensors", "gptq", "gguf"}, "llama.cpp": {"gguf"},
                "mlx": {"float", "mlx"}, "vllm": {"float", "compressed-tensors", "gptq"}}[runtime]
    if found not in accepted:
        advice = {"llama.cpp": "gguf", "mlx": "mlx"}.get(runtime, "compressed-tensors")
        return found, [Problem(None, f"{runtime} does not read the {found} format; "
                                     f"`qconvert export {path} --to {advice}` writes one it does.")]
    checks = {"gguf": _check_gguf, "mlx": _check_mlx, "gptq": _check_gptq,
              "compressed-tensors": _check_compressed_tensors, "float": lambda p, r: []}
    return found, checks[found](path, runtime)


def _check_compressed_tensors(path: Path, runtime: str) -> list[Problem]:
    config, tensors = _config(path), _headers(path)
    problems = []
    quantized = {name.removesuffix(".weight_packed") for name in tensors if name.endswith(".weight_packed")}
    schemes = schemes_from_config(config.get("quantization_config") or {}, quantized)
    for module in sorted(quantized):
        if schemes[module] is None:
            problems.append(Problem(module, "stored packed, but no config group of quantization_config targets it"))
            continue
        bits, group, symmetric = schemes[module]
        required = ["weight_packed", "weight_scale", "weight_shape"] + ([] if symmetric else ["weight_zero_point"])
        for part in required:
            if f"{module}.{part}" not in tensors:
                problems.append(Problem(module, f"{module}.{part} is missing"))
        packed = tensors.get(f"{module}.weight_packed")
        if packed and packed[0] != torch.int32:
            problems.append(Problem(module, f"weight_packed is {packed[0]}, not int32"))
        if "embed" in module or module.endswith("lm_head"):
            problems.append(Problem(module, f"{runtime} quantizes only linear layers from compressed-tensors; "
                                            "this embedding cannot load"))
        if runtime == "vllm":
            problems += _vllm_scheme_problems(module, bits, group, allowed_bits=(4, 8))
    if runtime == "vllm":
        problems += _fused_problems(schemes)
    return problems


def _check_gptq(path: Path, runtime: str) -> list[Problem]:
    quantization = _config(path)["quantization_config"]
    bits, group = quantization.get("bits"), quantization.get("group_size")
    tensors = _headers(path)
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
        per_word = 32 // bits if bits in (2, 4, 8) else None
        columns = parts["g_idx"][1][0]
        rows = parts["scales"][1][1]
        expected = {"qweight": (torch.int32, (columns // per_word, rows) if per_word else None),
                    "qzeros": (torch.int32, (-(-columns // group) if group > 0 else 1, rows // per_word) if per_word else None),
                    "scales": (torch.float16, None), "g_idx": (torch.int32, (columns,))}
        for part, (dtype, shape) in expected.items():
            if parts[part][0] != dtype or (shape and parts[part][1] != shape):
                problems.append(Problem(f"{module}.{part}", f"is {parts[part][0]} {parts[part][1]}, expected {dtype} {shape or ''}".rstrip()))
        if runtime == "vllm":
            problems += _vllm_scheme_problems(module, bits, group if group > 0 else 0, allowed_bits=(2, 3, 4, 8))
    return problems


def _vllm_scheme_problems(module: str, bits, group, allowed_bits: tuple) -> list[Problem]:
    problems = []
    if bits not in allowed_bits:
        problems.append(Problem(module, f"vLLM's kernels take {' or '.join(map(str, allowed_bits))}-bit weights, not {bits}"))
    if group not in (0, 32, 64, 128):
        problems.append(Problem(module, f"vLLM's kernels take groups of 32, 64 or 128 (or per channel), not {group}"))
    return problems


def _fused_problems(schemes: dict[str, tuple | None]) -> list[Problem]:
    """vLLM loads q/k/v (and gate/up) into one fused layer, which has one scheme: they must agree."""
    problems = []
    by_parent = defaultdict(dict)
    for module, scheme in schemes.items():
        parent, _, leaf = module.rpartition(".")
        by_parent[parent][leaf] = scheme
    for parent, leaves in sorted(by_parent.items()):
        for fused in FUSED:
            present = {leaf: leaves.get(leaf) for leaf in fused if leaf in leaves}
            if present and (len(set(present.values())) > 1 or len(present) < len(fused)):
                described = ", ".join(f"{leaf} {_describe(s)}" for leaf, s in sorted(present.items()))
                problems.append(Problem(parent, f"vLLM fuses {'/'.join(sorted(fused))} into one layer with one scheme; "
                                                f"here: {described}{' (others float)' if len(present) < len(fused) else ''}"))
    return problems


def _describe(scheme: tuple | None) -> str:
    if not scheme or scheme[0] is None:
        return "float"
    bits, group, symmetric = scheme
    return f"int{bits} {'g' + str(group) if group else 'per channel'}{'' if symmetric else ' asym'}"


def _check_mlx(path: Path, runtime: str) -> list[Problem]:
    config, tensors = _config(path), _headers(path)
    quantization = config["quantization"]
    problems = []
    if "rope_parameters" in config and "rope_theta" not in config:
        problems.append(Problem(None, "config.json has rope_parameters but no rope_theta; mlx_lm would use 10000"))
    for name in sorted(n for n in tensors if n.endswith(".scales")):
        module = name.removesuffix(".scales")
        grid = quantization.get(module, quantization)
        bits, group = grid.get("bits"), grid.get("group_size")
        weight, scales, biases = tensors.get(f"{module}.weight"), tensors[name], tensors.get(f"{module}.biases")
        if bits not in (2, 3, 4, 5, 6, 8) or group not in (32, 64, 128):
            problems.append(Problem(module, f"MLX quantizes with 2-8 bits in groups of 32, 64 or 128, not {bits} bits in {group}"))
            continue
        if weight is None or biases is None:
            problems.append(Problem(module, "weight, scales and biases must all be present"))
            continue
        if weight[0] != torch.uint32:
            problems.append(Problem(f"{module}.weight", f"is {weight[0]}, MLX packs into uint32"))
        columns = weight[1][1] * 32 // bits
        if scales[1] != (weight[1][0], columns // group) or biases[1] != scales[1]:
            problems.append(Problem(module, f"scales {scales[1]} / biases {biases[1]} do not fit {weight[1][0]} rows of "
                                            f"{columns} columns in groups of {group}"))
    return problems


def _check_gguf(path: Path, runtime: str) -> list[Problem]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        return [Problem(None, f"not a readable GGUF file: {exc}")]
    fields = reader.fields
    architecture = _gguf_string(fields.get("general.architecture"))
    problems = []
    if architecture != "llama":
        problems.append(Problem(None, f"checked rules cover the llama architecture; this file says {architecture!r}"))
        return problems
    for key in LLAMA_CPP_KEYS:
        if f"llama.{key}" not in fields:
            problems.append(Problem(None, f"metadata llama.{key} is missing"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if key not in fields:
            problems.append(Problem(None, f"metadata {key} is missing: the file has no tokenizer"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for name, kind in sorted(types.items()):
        if kind not in GGUF_TYPES:
            problems.append(Problem(name, f"type {kind} has no CPU kernel in the checked llama.cpp"))
    blocks = int(fields["llama.block_count"].parts[-1][0]) if "llama.block_count" in fields else 0
    wanted = ["token_embd.weight", "output_norm.weight"] + [f"blk.{i}.{t}.weight" for i in range(blocks) for t in LLAMA_BLOCK_TENSORS]
    problems += [Problem(name, "missing") for name in wanted if name not in types]
    return problems


def _gguf_string(field) -> str | None:
    return bytes(field.parts[-1]).decode() if field is not None else None


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _headers(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    from qconvert.io.loading import open_checkpoint

    checkpoint = open_checkpoint(path)
    stored = getattr(checkpoint, "stored", None) or checkpoint  # the stored tensors, not a quantized source's weights
    return {name: (info.dtype, tuple(info.shape)) for name, info in stored.tensors.items()}
