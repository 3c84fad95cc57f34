"""Export a qconvert output of a Llama-family model to GGUF, the file llama.cpp and ollama run.

The container, metadata keys, tensor names and block encodings come from the `gguf` library.
qconvert's grids map onto GGUF block types without requantizing where they coincide:

| qconvert tensor                               | GGUF type | how                                   |
|-----------------------------------------------|-----------|---------------------------------------|
| int4, groups of 32, symmetric, float16 scales | Q4_0      | exact: d = scale, q = code            |
| int8, groups of 32, symmetric, float16 scales | Q8_0      | exact: d = scale, q = code - 128      |
| int4, groups of 32, asymmetric, float16       | Q4_1      | same grid: d = scale, m = -scale·zero rounded to float16 |
| iq4nl grid, float16 scales                    | IQ4_NL    | exact: d = scale, q = table index     |
| mxfp4 grid                                    | MXFP4     | exact: e = E8M0 exponent, q = E2M1 code |
| any other quantized tensor                    | Q8_0 (≥ 5 bits) or Q4_0 | dequantized, requantized by `gguf` |
| a quantized tensor whose rows are not a multiple of 32 | F16 | dequantized: no GGUF block fits |
| norms                                         | F32       | as llama.cpp requires                 |
| other kept tensors                            | F16       |                                       |

llama.cpp's rotary embedding expects q_proj and k_proj rows (and their biases) in its own head order;
rows are permuted exactly as llama.cpp's converter does (codes and scales move together, so this is
lossless).
The report says which tensors were exact and which were requantized. `check` says what llama.cpp
would refuse in a GGUF file (architecture, metadata, tensors, block types).
"""

import dataclasses
import errno
import os
from pathlib import Path

import numpy as np
import torch

from qconvert.errors import SourceError, UnsupportedModelError
from qconvert.formats.base import ExportSource, Problem
from qconvert.formats.exporting import ExportReport, recomputed_by_runtimes
from qconvert.io.writing import staged_output
from qconvert.quantizers.base import QuantizedTensor, dequantize

LLAMA_FAMILY = {"llama", "mistral"}
BLOCK = 32  # weights per block of every GGUF type qconvert writes (Q4_0, Q4_1, Q8_0)
ROTARY_TENSORS = tuple(f"self_attn.{p}_proj.{kind}" for p in "qk" for kind in ("weight", "bias"))
# What the checked llama.cpp runs: block types with CPU kernels, metadata it reads, every block's tensors.
GGUF_TYPES = {
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_K",
    "IQ4_NL",
    "MXFP4",
}
LLAMA_CPP_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count")
LLAMA_BLOCK_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def export(source: ExportSource, destination: Path, force: bool = False) -> ExportReport:
    """Write `output` (a qconvert output folder) as one GGUF file at `destination`.

    Raises:
        SourceError: `output` is not a qconvert output with config and tokenizer.
        UnsupportedModelError: the architecture is not Llama-family.
        OutputError: `destination` exists and `force` is false.
    """
    import gguf

    output = source.path
    config = _config(output)
    if config.get("model_type") not in LLAMA_FAMILY:
        raise UnsupportedModelError(
            f"GGUF export supports Llama-family models ({', '.join(sorted(LLAMA_FAMILY))}); "
            f"{output} is {config.get('model_type')!r}."
        )
    with staged_output(destination, force, [output], folder=False) as staging:
        return _write_gguf(source, config, staging, ExportReport(destination, "gguf"), gguf)


def _write_gguf(source: ExportSource, config: dict, staging: Path, report: ExportReport, gguf) -> ExportReport:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(staging, "llama")
    _write_metadata(writer, config, source.path)
    for record, stored in source.records():
        target = names.get_name(record.name, try_suffixes=(".weight", ".bias"))
        if target is None:
            if recomputed_by_runtimes(record.name):
                continue
            raise UnsupportedModelError(f"{record.name} has no GGUF name for the llama architecture.")
        if record.action == "quantized" and record.shape[-1] % BLOCK:  # no GGUF block fits these rows
            tensor = _llama_rope_order(dequantize(source.quantized(record, stored), torch.float16), record.name, config)
            qtype = gguf.GGMLQuantizationType.F16
            report.dequantized.append(record.name)
            writer.add_tensor(target, tensor.numpy())
        elif record.action == "quantized":
            q = _llama_rope_order(source.quantized(record, stored), record.name, config)
            data, qtype, how = _encode(q, gguf)
            getattr(report, how).append(record.name)
            writer.add_tensor(target, data, raw_dtype=qtype)
        else:
            tensor = _llama_rope_order(stored[record.name], record.name, config)
            qtype = gguf.GGMLQuantizationType.F32 if tensor.dim() == 1 else gguf.GGMLQuantizationType.F16
            array = (
                tensor.float().numpy() if qtype == gguf.GGMLQuantizationType.F32 else tensor.to(torch.float16).numpy()
            )
            report.exact.append(record.name)
            writer.add_tensor(target, array)
        report.types[target] = qtype.name
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except OSError as exc:
        if exc.errno is None:  # gguf checks free space itself and raises a bare OSError
            full = "space" in str(exc).lower()
            raise OSError(
                errno.ENOSPC if full else errno.EIO,
                os.strerror(errno.ENOSPC) if full else str(exc),
                str(report.destination),
            ) from exc
        raise
    return report


def _config(output: Path) -> dict:
    import json

    path = output / "config.json"
    if not path.is_file() or not (output / "tokenizer.json").is_file():
        raise SourceError(f"GGUF export needs config.json and tokenizer.json in {output}.")
    return json.loads(path.read_text())


def _write_metadata(writer, config: dict, output: Path) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_name(config.get("_name_or_path") or output.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    _write_tokenizer(writer, config, output, gguf)


def _write_tokenizer(writer, config: dict, output: Path, gguf) -> None:
    """A byte-level BPE tokenizer as llama.cpp's converter writes it (model "gpt2")."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output)
    vocab = tokenizer.get_vocab()
    size = max(config["vocab_size"], len(vocab))
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(output / "tokenizer.json"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(output, load_merges=True, n_vocab=size).add_to_gguf(writer)


def _pre_tokenizer(tokenizer_file: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer split. Its "default" splits punctuation and
    digit runs its own way, so a file that says "default" for a GPT-2-style tokenizer is scored on
    different tokens than transformers sees (SmolLM2: llama-perplexity 24.9 instead of 18.x for Q4_0)."""
    import json

    pre = json.loads(tokenizer_file.read_text()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in parts]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"  # the GPT-2 split regex, as ByteLevel(use_regex) applies it
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"  # every digit alone, then the GPT-2 regex
    return "default"


def _llama_rope_order(value, name: str, config: dict):
    """Rows of q_proj / k_proj (and their scales, and their biases) in llama.cpp's rotary order, as its
    converter permutes them: a bias left in the original order would meet the wrong rows."""
    if not name.endswith(ROTARY_TENSORS):
        return value
    heads = config["num_attention_heads"]
    if ".k_proj." in name:
        heads = config.get("num_key_value_heads", heads)
    if isinstance(value, QuantizedTensor):
        order = _permutation(value.shape[0], heads)
        zeros = None if value.zeros is None else value.zeros[order]
        return dataclasses.replace(value, codes=value.codes[order], scales=value.scales[order], zeros=zeros)
    return value[_permutation(value.shape[0], heads)]


def _permutation(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's `permute`: within each head, interleave the two halves of the rotary dimensions."""
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _encode(q: QuantizedTensor, gguf) -> tuple[np.ndarray, object, str]:
    """(raw block bytes, GGUF type, "exact" | "repacked" | "requantized")."""
    T = gguf.GGMLQuantizationType
    rows, columns = q.shape
    fp16 = q.scales.dtype == torch.float16
    if q.grid == "iq4nl" and fp16 and columns % 32 == 0:
        return _blocks_q4(q.scales, None, q.codes), T.IQ4_NL, "exact"
    if q.grid == "mxfp4" and columns % 32 == 0:
        return _blocks_q4(q.scales, None, q.codes), T.MXFP4, "exact"
    if q.grid == "int" and q.group_size == 32 and columns % 32 == 0 and fp16:
        if q.bits == 4 and q.symmetric:
            return _blocks_q4(q.scales, None, q.codes), T.Q4_0, "exact"
        if q.bits == 8 and q.symmetric:
            return _blocks_q8(q.scales, q.codes), T.Q8_0, "exact"
        if q.bits == 4:
            offsets = (-(q.scales.float() * q.zeros.float())).to(torch.float16)
            return _blocks_q4(q.scales, offsets, q.codes), T.Q4_1, "repacked"
    qtype = T.Q8_0 if q.bits >= 5 else T.Q4_0
    return gguf.quants.quantize(dequantize(q).numpy(), qtype), qtype, "requantized"


def _blocks_q4(scales: torch.Tensor, offsets: torch.Tensor | None, codes: torch.Tensor) -> np.ndarray:
    """Blocks of 32 4-bit codes after their scale (and offset): Q4_0 and IQ4_NL (float16 d, 16 bytes),
    Q4_1 (d, m, 16 bytes), MXFP4 (E8M0 byte e, 16 bytes); byte j holds codes j (low) and j + 16 (high)."""
    rows, columns = codes.shape
    blocks = codes.view(rows, columns // 32, 2, 16)
    nibbles = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).numpy()
    header = [scales.contiguous().view(torch.uint8).numpy().reshape(rows, -1, scales.element_size())]
    if offsets is not None:
        header.append(offsets.numpy().view(np.uint8).reshape(rows, -1, 2))
    return np.concatenate([*header, nibbles], axis=-1).reshape(rows, -1)


def _blocks_q8(scales: torch.Tensor, codes: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks of 32: float16 d then 32 signed bytes."""
    rows, columns = codes.shape
    signed = (codes.to(torch.int16) - 128).to(torch.int8).view(rows, columns // 32, 32).numpy().view(np.uint8)
    return np.concatenate([scales.numpy().view(np.uint8).reshape(rows, -1, 2), signed], axis=-1).reshape(rows, -1)


# ---------------------------------------------------------------- what llama.cpp accepts


def check(path: Path, runtime: str) -> list[Problem]:
    """Every reason llama.cpp would not run a GGUF file: an architecture outside the checked rules,
    missing hyper-parameters or tokenizer, block types without a CPU kernel, missing block tensors."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        return [Problem(None, f"not a readable GGUF file: {exc}")]
    fields = reader.fields
    architecture = _string(fields.get("general.architecture"))
    if architecture != "llama":
        return [Problem(None, f"checked rules cover the llama architecture; this file says {architecture!r}")]
    problems = [
        Problem(None, f"metadata llama.{key} is missing") for key in LLAMA_CPP_KEYS if f"llama.{key}" not in fields
    ]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if key not in fields:
            problems.append(Problem(None, f"metadata {key} is missing: the file has no tokenizer"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for name, kind in sorted(types.items()):
        if kind not in GGUF_TYPES:
            problems.append(Problem(name, f"type {kind} has no CPU kernel in the checked llama.cpp"))
    blocks = int(fields["llama.block_count"].parts[-1][0]) if "llama.block_count" in fields else 0
    wanted = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(blocks) for t in LLAMA_BLOCK_TENSORS
    ]
    return problems + [Problem(name, "missing") for name in wanted if name not in types]


def _string(field) -> str | None:
    return bytes(field.parts[-1]).decode() if field is not None else None
