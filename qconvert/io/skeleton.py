"""What the runtime builds for each checkpoint tensor: the module it lands in, found by building the model.

Names lie: GPT-2 stores its projections for `Conv1D` modules (weights transposed), transformers 5
builds MoE routers as plain parameters of a router module, and renames keys of nested language
models while loading. So qconvert asks transformers itself: it builds the checkpoint's model class
from its config with every parameter on the meta device (no memory), maps each checkpoint key to
the parameter it loads into with transformers' own key renames and converters
(`transformers.core_model_loading.rename_source_key`), and reads the module type there.

Roles:
- "linear": the weight of an `nn.Linear` (quantizable in every layout);
- "experts": one expert's linear weight that transformers stacks into a fused experts parameter
  while loading (`MergeModulelist`), which its compressed-tensors loader also handles;
- "embedding": the weight of an `nn.Embedding`;
- anything else: a description such as "Conv1D weight" or "Qwen3MoeTopKRouter weight", or
  "unused" for a key the model has no parameter for.
"""

from dataclasses import dataclass, field
from typing import Callable

from qconvert.io import memo

LINEAR, EXPERTS, EMBEDDING, UNUSED = "linear", "experts", "embedding", "unused"
QUANTIZABLE = (LINEAR, EXPERTS, EMBEDDING)


@dataclass(frozen=True)
class Skeleton:
    """The checkpoint's model as transformers builds it: `roles` maps checkpoint tensor names to roles,
    `runtime_names` to the parameter names transformers loads them as (they differ where it renames
    keys, as for nested language models); `model_class` names the class built."""

    model_class: str
    roles: dict[str, str]
    runtime_names: dict[str, str]
    _rename: Callable[[str], tuple[str, str | None]] = field(repr=False, compare=False)
    _model: object = field(default=None, repr=False, compare=False)  # on the meta device: no memory
    _build: Callable[[], object] | None = field(default=None, repr=False, compare=False)  # when recalled

    def role(self, name: str) -> str:
        return self.roles.get(name, UNUSED)

    @property
    def recalled(self) -> bool:
        """Read from the answers of an earlier run (`memo.py`) rather than built: transformers not imported."""
        return self._model is None and self._build is not None

    def for_names(self, names: list[str]) -> "Skeleton":
        """The same model's roles of other checkpoint names (a quantized source's float weights besides its
        stored parts), without building the model again (a recalled skeleton builds it now)."""
        model = self._model if self._model is not None else self._build()
        rename = self._rename if self._model is not None else _Renamer(model)
        roles, runtime_names = _roles(model, names, rename)
        return Skeleton(self.model_class, roles, runtime_names, rename, model)

    def runtime_name(self, key: str) -> str:
        """The name transformers gives checkpoint key `key` (any key, e.g. a packed part) while loading."""
        return self.runtime_names.get(key) or self._rename(key)[0]


def build_skeleton(folder, config: dict | None, names: list[str]) -> Skeleton | None:
    """The roles of `names` in the model transformers builds from `folder`'s config.json, or None when
    there is no config, transformers is not installed, or it cannot build the architecture (the caller
    then decides by name, and says so)."""
    if folder is None or not isinstance(config, dict):
        return None
    inputs = {"config": config, "names": names}
    recalled = memo.recall("skeleton", inputs)
    if recalled is not None and set(recalled.get("roles", ())) == set(names):
        return Skeleton(
            recalled["model_class"],
            recalled["roles"],
            {n: n for n in names},
            lambda key: (key, None),
            _build=lambda: _meta_model(folder, config),
        )
    try:
        model = _meta_model(folder, config)
    except Exception:  # any failure to build means: no skeleton, decide by name
        return None
    if model is None:
        return None
    rename = _Renamer(model)
    roles, runtime_names = _roles(model, names, rename)
    if _renames_nothing(names, rename):
        memo.remember("skeleton", inputs, {"model_class": type(model).__name__, "roles": roles})
    return Skeleton(type(model).__name__, roles, runtime_names, rename, model)


# What layouts append to a weight's name; a recalled skeleton maps these to themselves too.
_PART_SUFFIXES = ("", "_packed", "_scale", "_shape", "_zero_point", "_global_scale", "_g_idx")


def _renames_nothing(names: list[str], rename) -> bool:
    """transformers loads every key, and every layout part of it, under its own name, with no converter:
    the only skeletons worth keeping (a recalled one renames nothing)."""
    return all(rename(n + suffix) == (n + suffix, None) for n in names for suffix in _PART_SUFFIXES)


def _meta_model(folder, config: dict):
    import torch

    try:
        import transformers
        from accelerate import init_empty_weights
    except ImportError:
        return None
    from qconvert.libraries import quiet_libraries

    architectures = config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with quiet_libraries():
        hf_config = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    with init_empty_weights(include_buffers=False), quiet_libraries():
        if model_class is not None:
            return model_class._from_config(hf_config, dtype=torch.float32)
        return transformers.AutoModel.from_config(hf_config, dtype=torch.float32)


class _Renamer:
    """transformers' own key renaming for a model: checkpoint key -> (parameter name, the converter
    pattern that matched it or None). Keeps only names, no tensor."""

    def __init__(self, model) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.known = dict.fromkeys(model.state_dict(keep_vars=True), True)
        self.prefix = model.base_model_prefix

    def __call__(self, key: str) -> tuple[str, str | None]:
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(key, self.renamings, self.converters, self.prefix, self.known)


def _roles(model, names: list[str], rename) -> tuple[dict[str, str], dict[str, str]]:
    import torch
    from transformers.core_model_loading import MergeModulelist

    merges = {
        p
        for c in rename.converters
        if any(isinstance(op, MergeModulelist) for op in c.operations)
        for p in c.source_patterns
    }
    modules = dict(model.named_modules())
    roles, runtime_names = {}, {}
    for name in names:
        target, pattern = rename(name)
        runtime_names[name] = target
        module_name, _, attribute = target.rpartition(".")
        module = modules.get(module_name)
        if pattern is not None:
            roles[name] = EXPERTS if pattern in merges else f"converted by transformers while loading ({pattern})"
        elif target not in rename.known or module is None:
            roles[name] = UNUSED
        elif isinstance(module, torch.nn.Linear) and attribute == "weight":
            roles[name] = LINEAR
        elif isinstance(module, torch.nn.Embedding) and attribute == "weight":
            roles[name] = EMBEDDING
        else:
            roles[name] = f"{type(module).__name__} {attribute}"
    return roles, runtime_names
