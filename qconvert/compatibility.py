"""Will this file load in that runtime? Check an output against what the runtime expects, from the
headers alone: the config's schema, tensor names, dtypes and shapes, and the quantization schemes the
runtime's loaders and kernels accept. Each problem names the tensor it concerns.

For transformers, headers are not the last word: `loading_problems` builds the model from the
output's config on the meta device and runs transformers' own loading path (its key renames,
converters and quantizer integration) with `output_loading_info`, so every tensor it would leave
missing (initialised at random), ignore, or fail to convert is a problem; `forward_problems` loads the
weights for real and compares the runtime's logits on a few tokens with qconvert's own dequantized
model.

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

import dataclasses
import importlib.util
import json
from pathlib import Path

from qconvert.errors import SourceError, VerificationError
from qconvert.formats import mlx
from qconvert.formats.base import Problem, config_json
from qconvert.formats.registry import CHECKS
from qconvert.io import memo
from qconvert.io.skeleton import build_skeleton
from qconvert.io.sources import open_checkpoint
from qconvert.libraries import quiet_libraries
from qconvert.manifest import MANIFEST_FILE

RUNTIMES = ("transformers", "llama.cpp", "mlx", "vllm")


def detect_format(path: Path) -> str:
    """ "gguf", "mlx", "gptq", "compressed-tensors", "qconvert-native" or "float".

    Raises:
        SourceError: `path` does not exist, or is a folder without config.json or weights.
    """
    if path.is_file() and path.open("rb").read(4) == b"GGUF":
        return "gguf"
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} is neither a .gguf file nor a model folder with config.json.")
    config = config_json(path)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if "quantization" in config:
        return "mlx"
    if method in ("gptq", "compressed-tensors"):
        return method
    if (path / MANIFEST_FILE).is_file() and json.loads((path / MANIFEST_FILE).read_text()).get("layout") == "native":
        return "qconvert-native"
    return "float"


def check(path: Path, runtime: str, forward: bool = False) -> tuple[str, list[Problem]]:
    """(the format found, every problem `runtime` would have loading it); no problems: it loads.

    With `forward`, also run a few tokens through the runtime and compare its logits with qconvert's
    dequantized model of the same files (`forward_problems`).
    """
    found = detect_format(path)
    accepted = {
        "transformers": {"float", "compressed-tensors", "gptq", "gguf"},
        "llama.cpp": {"gguf"},
        "mlx": {"float", "mlx"},
        "vllm": {"float", "compressed-tensors", "gptq"},
    }[runtime]
    if found not in accepted:
        advice = {"llama.cpp": "gguf", "mlx": "mlx"}.get(runtime, "compressed-tensors")
        refusal = _compressed_tensors_refusal(path) if advice == "compressed-tensors" else None
        if refusal:  # e.g. an nf4 grid: no format this runtime reads holds it, so no export would help
            return found, [Problem(None, f"{runtime} does not read the {found} format, and no export helps: {refusal}")]
        return found, [
            Problem(
                None,
                f"{runtime} does not read the {found} format; "
                f"`qconvert export {path} --to {advice}` writes one it does.",
            )
        ]
    problems = CHECKS[found](path, runtime) if found in CHECKS else []
    if runtime == "transformers" and found != "gguf" and not problems:
        problems = loading_problems(path)
    if forward and not problems:
        problems = forward_problems(path, runtime, found)
    return found, problems


def _compressed_tensors_refusal(path: Path) -> str | None:
    """Why a qconvert output cannot be exported to compressed-tensors, or None if it can."""
    from qconvert.formats.compressed_tensors import refusal_for
    from qconvert.manifest import read_manifest

    return refusal_for(read_manifest(path).tensors)


def _transformers_load(path: Path, **kwargs):
    """transformers' AutoModelForCausalLM (or AutoModel) loading of `path`, with its loading report (callers
    run it inside `quiet_libraries`)."""
    import transformers

    config = config_json(path)
    causal = any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
        for a in config.get("architectures") or []
    )
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model_class = getattr(transformers, (config.get("architectures") or [""])[0], None) or auto
    return model_class.from_pretrained(path, output_loading_info=True, **kwargs)


def loading_problems(path: Path) -> list[Problem]:
    """Every tensor transformers would leave missing, ignore, mismatch or fail to convert when loading
    `path`, found by running its loading path with every parameter on the meta device (no data read)."""
    log = None
    try:
        with quiet_libraries() as log:
            _, info = _transformers_load(path, device_map="meta", ignore_mismatched_sizes=True)
    except Exception as exc:  # anything transformers raises means it does not load
        return [Problem(None, _cannot_load(exc, log))]
    if info.get("mismatched_keys"):
        shapes = _recorded_shapes(path)
        info["mismatched_keys"] = {m for m in info["mismatched_keys"] if not _shape_recorded(m, shapes)}
    return _loading_info_problems(info)


def _shape_recorded(mismatch: tuple, shapes: dict) -> bool:
    """Whether a mismatch on the meta device is only that: a compressed-tensors weight dequantized while
    loading takes its shape from the values of `weight_shape`, which the meta device does not read. True
    when those values (`shapes`, by runtime name) are the shape the model expects."""
    key, _, expected = mismatch
    return shapes.get(f"{str(key).removesuffix('.weight')}.weight_shape") == tuple(expected)


def _recorded_shapes(path: Path) -> dict[str, tuple]:
    """Every `weight_shape` value in the files, by the name transformers loads it as."""
    from safetensors import safe_open

    values = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            values.update(
                {k: tuple(handle.get_tensor(k).tolist()) for k in handle.keys() if k.endswith(".weight_shape")}
            )
    skeleton = build_skeleton(path, config_json(path), list(values)) if values else None
    return {(skeleton.runtime_name(k) if skeleton else k): v for k, v in values.items()}


def _cannot_load(exc: Exception, log=None) -> str:
    from importlib.metadata import PackageNotFoundError

    if isinstance(exc, (ImportError, PackageNotFoundError)):
        return (
            "transformers cannot load it on this machine: a package it needs for this format is not "
            f"installed ({_first_line(exc)})"
        )
    detail = log.errors() if log is not None else ""  # the report it refers to was silenced: quote its errors
    return f"transformers cannot load it: {_first_line(exc)}" + (f" ({detail})" if detail else "")


def _loading_info_problems(info: dict) -> list[Problem]:
    why = {
        "missing_keys": "missing: transformers would initialise it at random",
        "unexpected_keys": "unexpected: transformers would ignore it",
        "mismatched_keys": "has a shape the model does not expect: transformers would initialise it at random",
    }
    problems = [
        Problem(str(key[0] if isinstance(key, tuple) else key), message)
        for field, message in why.items()
        for key in sorted(info.get(field) or [], key=str)
    ]
    problems += [Problem(None, f"transformers reported: {_first_line(m)}") for m in info.get("error_msgs") or []]
    return problems


FORWARD_TOKENS = 16
# Largest logit difference allowed, relative to the largest logit; both runtimes run in float32, as
# qconvert's reference does, so what is left is the order of their float32 sums.
FORWARD_TOLERANCE = {"transformers": 1e-2, "mlx": 1e-3}


def forward_problems(path: Path, runtime: str, found: str) -> list[Problem]:
    """Run FORWARD_TOKENS tokens through `runtime`'s own loading of `path` and through qconvert's
    dequantized model of the same files (float32), and fail when their logits differ by more than
    FORWARD_TOLERANCE of the largest logit.

    transformers runs qconvert outputs (compressed-tensors) and float checkpoints, against
    `qconvert.load_model`; mlx_lm runs MLX exports, against a transformers model holding qconvert's own
    reading of the MLX files (weight = scales · code + biases)."""
    if runtime == "mlx" and found == "mlx":
        return _mlx_forward_problems(path)
    if runtime == "llama.cpp":
        return [
            Problem(
                None,
                "check --forward would run llama.cpp through llama-cpp-python, which qconvert does not "
                "drive yet; the header checks above are all that ran (llama-perplexity on the file is the proof)",
            )
        ]
    if runtime != "transformers" or found not in ("compressed-tensors", "float"):
        return [
            Problem(
                None,
                f"check --forward runs transformers on qconvert outputs and float checkpoints and mlx_lm "
                f"on MLX exports; not {runtime} on {found}",
            )
        ]
    return _transformers_forward_problems(path, found)


def _compare(ours, theirs, runtime: str) -> list[Problem]:
    """Problems if `theirs` differs from `ours` by more than FORWARD_TOLERANCE of the largest logit."""
    difference = float((ours - theirs).abs().max())
    scale = float(ours.abs().max()) or 1.0
    allowed = FORWARD_TOLERANCE[runtime] * scale
    if not difference <= allowed:
        return [
            Problem(
                None,
                f"the logits {runtime} computes differ from qconvert's dequantized model's by up to {difference:.4g} "
                f"(largest logit {scale:.4g}; allowed {allowed:.4g})",
            )
        ]
    return []


def _token_ids(vocabulary: int | None):
    import torch

    return torch.arange(1, FORWARD_TOKENS + 1).remainder(vocabulary or 100).view(1, -1)


def _mlx_forward_problems(path: Path) -> list[Problem]:
    import torch

    try:
        import mlx.core as mx
        from mlx_lm import load
    except ImportError:
        return [
            Problem(
                None, "mlx and mlx_lm are not installed here, so --forward cannot run MLX (pip install 'qconvert[mlx]')"
            )
        ]
    try:
        with quiet_libraries():
            model, _ = load(str(path))
    except Exception as exc:  # anything mlx_lm raises means it does not load
        return [Problem(None, f"mlx_lm cannot load it: {_first_line(exc)}")]
    # MLX computes in the dtype of the model's float arrays: in float32 its logits show how it reads the
    # weights, not its 16-bit rounding (which a bfloat16 model adds, differently per quantization mode).
    model.set_dtype(mx.float32)
    reference = _model_from_state(path, mlx.dequantized(path))
    ids = _token_ids(reference.config.vocab_size)
    theirs = torch.tensor(model(mx.array(ids.tolist())).astype(mx.float32).tolist())
    with torch.no_grad():
        ours = _first_output(reference(ids))
    return _compare(ours, theirs, "mlx")


def _model_from_state(path: Path, state: dict):
    import torch
    import transformers

    with quiet_libraries():
        config = transformers.AutoConfig.from_pretrained(path)
    for key in ("quantization_config", "quantization"):
        if hasattr(config, key):
            delattr(config, key)
    model_class = getattr(transformers, (config.architectures or ["AutoModelForCausalLM"])[0])
    with quiet_libraries():
        model = model_class.from_pretrained(
            None, config=config, state_dict={k: v.float() for k, v in state.items()}, dtype=torch.float32
        )
    return model.eval()


def _transformers_forward_problems(path: Path, found: str) -> list[Problem]:
    import torch

    from qconvert.output import load_model

    log = None
    try:
        with quiet_libraries() as log:
            model, info = _transformers_load(path, dtype=torch.float32)
    except Exception as exc:
        return [Problem(None, _cannot_load(exc, log))]
    problems = _loading_info_problems(info)
    if problems:
        return problems
    if found == "compressed-tensors":
        with quiet_libraries():
            reference = load_model(path)
    else:  # a float checkpoint: the weights as qconvert reads them, not transformers' loading a second time
        checkpoint = open_checkpoint(path)
        reference = _model_from_state(path, dict(checkpoint.iter_tensors(list(checkpoint.tensors))))
    ids = _token_ids(getattr(model.config, "vocab_size", None))
    with torch.no_grad(), quiet_libraries():
        ours = _first_output(reference.eval()(ids))
        try:
            theirs = _first_output(model.eval()(ids))
        except Exception as exc:  # the runtime loaded it but cannot run it: that is the finding
            return [Problem(None, f"transformers loads it but fails running it: {_first_line(exc)}")]
    return _compare(ours, theirs, "transformers")


def _first_output(output):
    return output.logits if hasattr(output, "logits") else output[0]


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def publish_check(staging: Path, destination: Path, layout: str, source_folder: Path | None) -> dict:
    """transformers' own loading of the output, on the meta device (`loading_problems`) before it is published, for
    a compressed-tensors output; "ok": None, with the reason, when it was skipped (qconvert's own layout,
    no transformers, no config).
    Problems the float source has too are reported (ok: false), not raised.

    Raises:
        VerificationError: transformers would leave a weight missing, ignore one, or fail to convert one,
            and loads the source correctly.
    """
    if layout != "compressed-tensors":
        return {
            "runtime": "transformers",
            "ok": None,
            "skipped": "qconvert's native layout, which transformers refuses "
            "by design (qconvert.load_model reads it; qconvert export converts it)",
        }
    if importlib.util.find_spec("transformers") is None or not (staging / "config.json").is_file():
        return {
            "runtime": "transformers",
            "ok": None,
            "skipped": "transformers is not installed, or there is no config.json",
        }
    inputs = _loading_inputs(staging)
    if memo.recall("transformers-loads", inputs) is not None:  # these very tensors loaded cleanly before
        return {"runtime": "transformers", "ok": True, "problems": []}
    problems = [
        dataclasses.replace(p, message=p.message.replace(str(staging), str(destination)))  # name what the user named
        for p in loading_problems(staging)
    ]
    if not problems:
        memo.remember("transformers-loads", inputs, {"ok": True})
        return {"runtime": "transformers", "ok": True, "problems": []}
    listed = [p.to_dict() for p in problems]
    if source_folder is not None and (source_folder / "config.json").is_file() and loading_problems(source_folder):
        # the float source does not load in transformers either (e.g. a config that does not match its
        # weights): the output inherits that, qconvert did not cause it
        return {
            "runtime": "transformers",
            "ok": False,
            "problems": listed,
            "note": "the source checkpoint does not load in transformers either",
        }
    summary = "; ".join(f"{p.tensor + ': ' if p.tensor else ''}{p.message}" for p in problems[:5])
    raise VerificationError(
        f"transformers would not load this output correctly, so it was not published: {summary}"
        f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. This is a bug in "
        "qconvert; please report it. --layout native writes an output qconvert.load reads."
    )


def _loading_inputs(folder: Path) -> dict:
    """Everything transformers' loading of `folder` depends on besides the libraries (`memo.py`): its
    config, the shard index, each file's tensor names, dtypes and shapes, and the values of the few
    tensors the check itself reads (the recorded `weight_shape`s)."""
    from safetensors import safe_open

    from qconvert.io.loading import read_safetensors_header

    index = folder / "model.safetensors.index.json"
    files, recorded = {}, {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors = read_safetensors_header(f)
        files[f.name] = [[t.name, str(t.dtype), list(t.shape)] for t in tensors]
        shapes = [t.name for t in tensors if t.name.endswith("weight_shape")]
        if shapes:
            with safe_open(f, "pt") as opened:
                recorded |= {name: opened.get_tensor(name).tolist() for name in shapes}
    return {
        "config": json.loads((folder / "config.json").read_text()),
        "index": json.loads(index.read_text())["weight_map"] if index.is_file() else None,
        "files": files,
        "recorded_shapes": recorded,
    }
