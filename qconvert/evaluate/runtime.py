"""Build runnable transformers models for evaluation: float checkpoints, GGUF files, and qconvert
outputs whose linear layers stay quantized in memory (`QuantizedLinear`)."""

from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.errors import SourceError, UnsupportedModelError
from qconvert.evaluate.qlinear import QuantizedLinear
from qconvert.libraries import quiet_libraries, quiet_transformers
from qconvert.manifest import MANIFEST_FILE, read_manifest
from qconvert.output import iter_records, quantized_tensor
from qconvert.quantizers.base import dequantize


@dataclass
class LoadedModel:
    model: torch.nn.Module
    kind: str  # "qconvert", "checkpoint" or "gguf"
    tokenizer_source: tuple[Path, str | None]  # (folder, gguf file name or None)
    files: list[Path]  # weight files on disk, for the size


def is_qconvert_output(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_FILE).is_file()


def load_for_eval(path: Path, dtype: torch.dtype = torch.float32, use_kernels: bool = True) -> LoadedModel:
    """Load any supported model for evaluation.

    Raises:
        SourceError: the path is missing or transformers cannot build a causal LM from it.
    """
    if not path.exists():
        raise SourceError(f"{path} does not exist.")
    if is_qconvert_output(path):
        return LoadedModel(
            build_quantized_model(path, dtype, use_kernels), "qconvert", (path, None), _weight_files(path)
        )
    if path.suffix == ".gguf":
        return LoadedModel(
            _from_pretrained(path.parent, dtype, gguf_file=path.name), "gguf", (path.parent, path.name), [path]
        )
    return LoadedModel(_from_pretrained(path, dtype), "checkpoint", (path, None), _weight_files(path))


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def _from_pretrained(folder: Path, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with quiet_libraries():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    except Exception as exc:  # whatever transformers raises (an unsafe pickle, a bad config...) means: cannot load
        raise SourceError(
            f"transformers cannot load {folder} as a causal language model: {str(exc).splitlines()[0]}"
        ) from exc


def build_quantized_model(
    output: Path, dtype: torch.dtype = torch.float32, use_kernels: bool = True
) -> torch.nn.Module:
    """A transformers model of a qconvert output whose quantized linears stay packed in memory.

    The skeleton is built with parameters on the meta device (buffers such as rotary frequencies
    are real), quantized linears are swapped for `QuantizedLinear`, then the kept tensors are
    assigned. Peak memory is the quantized model plus one tensor.
    """
    import transformers
    from accelerate import init_empty_weights

    quiet_transformers()
    if not (output / "config.json").is_file():
        raise SourceError(f"{output} has no config.json, so it cannot be run as a model.")
    config = transformers.AutoConfig.from_pretrained(output)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or [])):
        raise UnsupportedModelError(
            f"{output} is a {', '.join(config.architectures or ['model'])}, not a causal language model; "
            "perplexity needs one."
        )
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    manifest = read_manifest(output)
    table_name = f"{_parameter_name(model, model.get_input_embeddings())}.weight"
    kept = {}
    for record, stored in iter_records(output, manifest):
        if record.action == "quantized" and _is_linear(model, record.name):
            _swap_in(
                model,
                record.name,
                QuantizedLinear(
                    quantized_tensor(manifest, record, stored),
                    _has_bias(model, record.name),
                    dtype,
                    use_kernels,
                ),
            )
        elif record.action == "quantized":  # e.g. an embedding, looked up rather than multiplied: keep its float values
            kept[record.name] = dequantize(quantized_tensor(manifest, record, stored), dtype)
        else:
            tensor = stored[record.name]
            keep_stored = use_kernels and record.name == table_name and tensor.dtype in HALF_DTYPES
            kept[record.name] = tensor.to(dtype) if tensor.is_floating_point() and not keep_stored else tensor
    model.load_state_dict(kept, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SourceError(f"{output} lacks weights for {', '.join(missing[:3])}.")
    _compute_in(model, dtype)
    return model.eval()


HALF_DTYPES = (torch.bfloat16, torch.float16)


def _compute_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Let an embedding table kept in its 16-bit stored dtype work inside a `dtype` model: lookups
    come out in `dtype` (exactly: widening is exact), and an output head tied to the table becomes a
    `TableHead`."""
    table = model.get_input_embeddings()
    if table.weight.dtype == dtype:
        return
    table.register_forward_hook(lambda module, args, out: out.to(dtype))
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and head.bias is None and head.weight is table.weight:
        model.set_output_embeddings(TableHead(table.weight, dtype))


class TableHead(torch.nn.Module):
    """An output head sharing a 16-bit embedding table.

    Decoding (one row) multiplies in the table's dtype, with torch's multi-threaded 16-bit GEMV: it
    reads half the bytes a float32 copy would, and on a small model the head is most of a token's
    weight reads (SmolLM2: 57 of 170 MB). The input and the logits are rounded to that dtype. Longer
    inputs (perplexity, prompts) widen the table a block at a time and multiply in `dtype`.
    """

    def __init__(self, weight: torch.nn.Parameter, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight, self.dtype = weight, dtype

    CHUNK = 4096  # table rows widened at a time: a block that stays in cache for its matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return (x.to(self.weight.dtype) @ self.weight.T).to(self.dtype)
        x = x.to(self.dtype)
        blocks = [x @ self.weight[i : i + self.CHUNK].to(self.dtype).T for i in range(0, len(self.weight), self.CHUNK)]
        return torch.cat(blocks, dim=-1)


def _parameter_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _is_linear(model: torch.nn.Module, tensor_name: str) -> bool:
    try:
        return isinstance(model.get_submodule(_module_name(tensor_name)), torch.nn.Linear)
    except AttributeError:
        return True  # let _swap_in report the missing module


def _module_name(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


def _has_bias(model: torch.nn.Module, tensor_name: str) -> bool:
    return getattr(model.get_submodule(_module_name(tensor_name)), "bias", None) is not None


def _swap_in(model: torch.nn.Module, tensor_name: str, layer: QuantizedLinear) -> None:
    parent_name, _, child = _module_name(tensor_name).rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        original = getattr(parent, child)
    except AttributeError as exc:
        raise SourceError(f"the model built from config.json has no module for {tensor_name}.") from exc
    if not isinstance(original, torch.nn.Linear):
        raise SourceError(f"{tensor_name} belongs to a {type(original).__name__}, which qconvert cannot run quantized.")
    setattr(parent, child, layer)
