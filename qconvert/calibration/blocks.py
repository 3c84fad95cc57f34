"""A model's transformer blocks, run one at a time on calibration activations.

transformers builds the model skeleton with its parameters on the meta device (no memory), so any
architecture it knows with the usual layout (embeddings -> a list of decoder blocks -> norm -> head)
works. Only the tensors needed to reach the first block, and then one block at a time, are read from
the checkpoint; the activations between blocks are the only other large thing held.
"""

from typing import Any

import torch

from qconvert.errors import UnsupportedModelError
from qconvert.io.loading import Checkpoint


class _FirstBlockReached(Exception):
    """Raised by a hook to stop the model's forward once the first block's inputs are captured."""


class BlockInputs:
    """The calibration activations entering the current block, in batches, with each batch's keyword
    arguments (position embeddings, attention mask) as the model passed them to its first block."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.hidden)

    def copy(self) -> "BlockInputs":
        """A second stream of activations: its own hidden states, the same keyword arguments."""
        other = BlockInputs()
        other.hidden = [h.clone() for h in self.hidden]
        other.kwargs = self.kwargs
        return other

    def run(self, block: torch.nn.Module, keep_outputs: bool) -> None:
        """Run every batch through `block`; with `keep_outputs` its outputs become the next inputs."""
        for index, (hidden, kwargs) in enumerate(zip(self.hidden, self.kwargs)):
            output = block(hidden, **kwargs)
            if keep_outputs:  # in place: the activations keep their memory instead of churning the heap
                hidden.copy_(output[0] if isinstance(output, tuple) else output)


class _HandBack(torch.nn.Module):
    """Stands in for all the blocks: ignores its input and returns the given hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class DecoderBlocks:
    """Load a model's transformer blocks from `checkpoint` one at a time, in `dtype` (float32 or
    bfloat16: what their forward computes in).

    Decoders (Llama, Qwen, Mistral...) and encoders (BERT) alike: whatever transformers builds from
    the checkpoint's config with one list of `num_hidden_layers` blocks.

    Raises:
        SchemeError: transformers cannot build the model, or its tensor names do not match the checkpoint's.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> None:
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.model = _empty_model(checkpoint, dtype)
        self.prefix, self.layers = _decoder_layers(self.model)
        missing = [n for n in self._block_tensor_names(0) if n not in checkpoint.tensors]
        if missing:
            raise UnsupportedModelError(
                f"{checkpoint.source} does not use transformers' tensor names for "
                f"{type(self.model).__name__} (no {missing[0]}), so its blocks cannot be run."
            )

    def __len__(self) -> int:
        return len(self.layers)

    def block_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."

    def first_inputs(self, windows: torch.Tensor, batch_size: int) -> BlockInputs:
        """Embed the calibration windows and capture what the model hands its first block."""
        self.load_outside_blocks()
        inputs = BlockInputs()

        def capture(module, args, kwargs):
            inputs.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
            inputs.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _FirstBlockReached

        hook = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in windows.split(batch_size):
                    try:
                        self.model(input_ids=batch)
                    except _FirstBlockReached:
                        pass
        finally:
            hook.remove()
        self.release_outside_blocks()  # the embeddings are no longer needed; blocks are loaded one by one
        return inputs

    def load(self, index: int) -> torch.nn.Module:
        """Block `index` with its weights read from the checkpoint, in the compute dtype."""
        block = self.layers[index]
        prefix = self.block_prefix(index)
        names = self._block_tensor_names(index)
        state = {
            name[len(prefix) :]: tensor.to(self.dtype)
            for name, tensor in self.checkpoint.iter_tensors(names, hash_on_the_way=False)
        }
        block.load_state_dict(state, strict=False, assign=True)
        return block.eval()

    def unload(self, index: int) -> None:
        self.layers[index].to("meta")

    def _block_tensor_names(self, index: int) -> list[str]:
        """The block's parameter names in checkpoint file order (sequential reads), absent ones last."""
        prefix = self.block_prefix(index)
        names = {prefix + name for name, _ in self.layers[index].named_parameters()}
        return [n for n in self.checkpoint.tensors if n in names] + sorted(names - self.checkpoint.tensors.keys())

    def loss(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The language-model loss of `input_ids` given the last block's output `hidden`: the model's own
        forward (final norm, head, loss) with its blocks replaced by one that hands back `hidden`.
        Needs the tensors outside the blocks (`load_outside_blocks`).

        Raises:
            UnsupportedModelError: the model has no language-model head (e.g. an encoder).
        """
        if self.model.get_output_embeddings() is None:
            raise UnsupportedModelError(
                f"{self.checkpoint.source} ({type(self.model).__name__}) has no language-model "
                "head, so its loss cannot weigh the tensors."
            )
        parent_name, _, attribute = self.prefix.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        setattr(parent, attribute, torch.nn.ModuleList([_HandBack(hidden)]))
        try:
            return self.model(input_ids=input_ids, labels=input_ids).loss
        finally:
            setattr(parent, attribute, self.layers)

    def load_outside_blocks(self) -> None:
        """Read the tensors outside the blocks (embeddings, final norm, head) in the compute dtype."""
        block_names = self.prefix + "."
        wanted = [n for n, p in self.model.named_parameters() if not n.startswith(block_names)]
        present = [n for n in self.checkpoint.tensors if n in set(wanted)]
        state = {
            name: tensor.to(self.dtype) for name, tensor in self.checkpoint.iter_tensors(present, hash_on_the_way=False)
        }
        self.model.load_state_dict(state, strict=False, assign=True)
        self.model.tie_weights()

    def release_outside_blocks(self) -> None:
        """Put the tensors outside the blocks back on the meta device (no memory)."""
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(self.prefix + "."):
                module_name, _, attribute = name.rpartition(".")
                meta = torch.nn.Parameter(param.to("meta"), requires_grad=False)
                setattr(self.model.get_submodule(module_name), attribute, meta)


def _empty_model(checkpoint: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint's own architecture (e.g. LlamaForCausalLM, BertModel), parameters on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    from qconvert.libraries import quiet_transformers

    quiet_transformers()
    if checkpoint.folder is None or checkpoint.config is None:
        raise UnsupportedModelError(
            f"calibration runs the model, which needs config.json beside the weights; {checkpoint.source} has none."
        )
    architectures = checkpoint.config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint.folder)
        config.use_cache = False  # a key/value cache would only grow during calibration
        with init_empty_weights(include_buffers=False):
            if model_class is not None:
                model = model_class._from_config(config, dtype=dtype)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, OSError, AttributeError) as exc:
        kind = ", ".join(architectures) or checkpoint.config.get("model_type", "model")
        raise UnsupportedModelError(
            f"calibration runs the model block by block with transformers, which cannot build "
            f"{checkpoint.source} ({kind}): {str(exc).splitlines()[0]}"
        ) from exc
    return model.eval()


def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's list of decoder blocks: the ModuleList with one entry per hidden layer."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise UnsupportedModelError(
        f"cannot find the {count} decoder blocks of {type(model).__name__}: no list of that many layers."
    )
