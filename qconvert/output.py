"""Read a qconvert output back: its stored tensors, dequantized weights, or a transformers model."""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from qconvert.errors import SourceError
from qconvert.formats.registry import get_layout
from qconvert.manifest import Manifest, TensorRecord, read_manifest
from qconvert.quantizers import QuantizedTensor, dequantize
from qconvert.quantizers.activations import fake_quantize


def iter_records(output: Path, manifest: Manifest) -> Iterator[tuple[TensorRecord, dict[str, torch.Tensor]]]:
    """Yield each manifest record with its stored tensors, one record at a time."""
    folder = output if output.is_dir() else output.parent
    handles: dict[str, object] = {}
    try:
        for record in manifest.tensors:
            stored = {}
            for name, entry in record.stored.items():
                file = entry.file or "model.safetensors"
                if Path(file).name != file or file in (".", ".."):  # a manifest names files beside itself, nothing else
                    raise SourceError(
                        f"the manifest of {folder} names the weights file {file!r}, which is not a file "
                        "name in that folder; it was edited or damaged."
                    )
                if file not in handles:
                    handles[file] = _open(folder / file)
                try:
                    stored[name] = handles[file].get_tensor(name)
                except SafetensorError as exc:
                    raise SourceError(f"{folder / file} lacks tensor {name} named in its manifest.") from exc
            yield record, stored
    finally:
        handles.clear()


def _open(path: Path):
    if not path.is_file():
        raise SourceError(f"{path} is missing.")
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as exc:
        raise SourceError(f"cannot read {path}: it is truncated or corrupt ({exc}).") from exc


def quantized_tensor(manifest: Manifest, record: TensorRecord, stored: dict[str, torch.Tensor]) -> QuantizedTensor:
    return get_layout(manifest.layout).decode(record, stored)


@dataclass
class QconvertOutput:
    """A qconvert output folder as exporters read it: its manifest, then one record at a time."""

    path: Path
    manifest: Manifest

    def records(self) -> Iterator[tuple[TensorRecord, dict[str, torch.Tensor]]]:
        """Each record with its stored tensors, one at a time (`iter_records`)."""
        return iter_records(self.path, self.manifest)

    def quantized(self, record: TensorRecord, stored: dict[str, torch.Tensor]) -> QuantizedTensor:
        """The codes and scales of a quantized record, decoded by the output's layout."""
        return quantized_tensor(self.manifest, record, stored)


def open_output(path: Path) -> QconvertOutput:
    """The qconvert output folder at `path`.

    Raises:
        SourceError: `path` is not a qconvert output, or its manifest is damaged.
    """
    return QconvertOutput(path, read_manifest(path))


def load(output: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Dequantized state dict of a qconvert output, with the source's tensor names.

    Args:
        output: a qconvert output folder.
        dtype: dtype of the dequantized weights; default each tensor's source dtype.
    """
    output = Path(output)
    manifest = read_manifest(output)
    state = {}
    for record, stored in iter_records(output, manifest):
        if record.action == "quantized":
            q = quantized_tensor(manifest, record, stored)
            state[record.name] = dequantize(q, dtype or q.dtype)
        else:
            tensor = stored[record.name]
            state[record.name] = tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor
    return state


def load_model(output: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers model holding the dequantized weights of a qconvert output.

    Raises:
        SourceError: the output has no config.json, or transformers does not know its architecture.
    """
    import transformers

    output = Path(output)
    if not (output / "config.json").is_file():
        raise SourceError(f"{output} has no config.json, so it cannot be built as a transformers model.")
    config = transformers.AutoConfig.from_pretrained(output)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    architecture = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise SourceError(f"transformers has no model class {architecture} for {output}.")
    state = load(output, dtype)
    # transformers builds the skeleton without allocating weights, then takes ours (ties included).
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    _quantize_inputs(model, read_manifest(output))
    return model.eval()


def _quantize_inputs(model, manifest: Manifest) -> None:
    """Give every W8A8 linear its input quantization (`quantizers/activations.py`) as a forward pre-hook,
    so the model computes what a runtime that quantizes activations computes."""
    modules = dict(model.named_modules())
    for record in manifest.tensors:
        module = modules.get(record.name.removesuffix(".weight"))
        if record.activations and module is not None:
            scale = None if record.input_scale is None else torch.tensor([record.input_scale])
            module.register_forward_pre_hook(
                lambda _, args, s=record.activations, scale=scale: (fake_quantize(args[0], s, scale), *args[1:])
            )
