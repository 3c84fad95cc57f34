"""Measure a model: perplexity on real text, divergence from a baseline, size, memory and speed.

Every model is scored on the same token windows (non-overlapping, `ctx` tokens, the first
`max_tokens` of the text), so a float checkpoint, a qconvert output and a GGUF file compare
directly. Divergence uses the measures llama.cpp's perplexity tool ranks its types by: mean KL
divergence of the next-token distributions from the baseline's, and top-1 token agreement.
"""

import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qconvert.errors import QConvertError, QualityGateError, SourceError
from qconvert.evaluate import kernels
from qconvert.evaluate.qlinear import QuantizedLinear
from qconvert.evaluate.runtime import LoadedModel, load_for_eval
from qconvert.manifest import read_manifest


@dataclass(frozen=True)
class EvalSettings:
    ctx: int = 512
    max_tokens: int | None = 20480  # 40 windows of 512: the windows of the reference figures
    prompt_tokens: int = 128  # prefill speed is measured on a prompt this long
    decode_tokens: int = 32  # then this many greedy tokens are decoded for the decode speed
    use_kernels: bool = True  # torch's int8/int4 kernels (bfloat16 activations) and compiled fused ones; False: exact

    def __post_init__(self) -> None:
        if self.ctx < 2:
            raise QConvertError("--ctx must be at least 2 tokens.")
        if self.max_tokens is not None and self.max_tokens < self.ctx:
            raise QConvertError(f"--max-tokens {self.max_tokens} is less than one window of --ctx {self.ctx} tokens.")


@dataclass
class EvalResult:
    model: str
    kind: str
    perplexity: float
    windows: int
    tokens_scored: int
    parameters: int
    bytes_on_disk: int
    bits_per_weight: float
    weight_memory_bytes: int
    peak_rss_bytes: int | None  # None: not measured (another runtime's processes)
    prefill_tokens_per_s: float
    decode_ms_per_token: float
    eval_seconds: float
    baseline: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # how many linear layers run on each kernel
    compile_seconds: float = 0.0  # spent compiling fused kernels (or loading them from Inductor's cache)
    compile_failed: str | None = None  # why the fused kernels run uncompiled (slower, same results), if they do
    runtime: str = "qconvert"  # or "llama.cpp" (`llama_cpp.py`): which runtime scored and timed it

    def to_dict(self) -> dict:
        return asdict(self)


def load_tokenizer(source: tuple[Path, str | None]):
    from transformers import AutoTokenizer

    folder, gguf_file = source
    try:
        return (
            AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
            if gguf_file
            else AutoTokenizer.from_pretrained(folder)
        )
    except (OSError, ValueError) as exc:
        raise SourceError(f"no tokenizer found at {folder}; pass --tokenizer PATH.") from exc


def token_windows(tokenizer, text: str, settings: EvalSettings) -> torch.Tensor:
    """(windows, ctx) token ids: consecutive non-overlapping windows from the start of the text."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if settings.max_tokens is not None:
        ids = ids[: settings.max_tokens]
    count = ids.numel() // settings.ctx
    if count == 0:
        raise QConvertError(f"the text has {ids.numel()} tokens, fewer than one window of {settings.ctx}.")
    return ids[: count * settings.ctx].view(count, settings.ctx)


@torch.no_grad()
def score(model, windows: torch.Tensor, baseline_model=None) -> dict:
    """Perplexity over `windows`, and with a baseline its perplexity, mean KL divergence and top-1 agreement."""
    nll = base_nll = kld = agree = 0.0
    scored = 0
    for window in windows:
        ids = window[None]
        targets = window[1:]
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        nll += -log_probs.gather(1, targets[:, None]).sum().item()
        scored += targets.numel()
        if baseline_model is not None:
            base = torch.log_softmax(baseline_model(ids).logits[0, :-1].float(), dim=-1)
            base_nll += -base.gather(1, targets[:, None]).sum().item()
            kld += (base.exp() * (base - log_probs)).sum().item()
            agree += (base.argmax(-1) == log_probs.argmax(-1)).sum().item()
    result = {"perplexity": math.exp(nll / scored), "tokens_scored": scored}
    if baseline_model is not None:
        base_ppl = math.exp(base_nll / scored)
        result["baseline"] = {
            "perplexity": base_ppl,
            "ppl_change_pct": 100 * (result["perplexity"] / base_ppl - 1),
            "mean_kld": kld / scored,
            "top1_agreement": agree / scored,
        }
    return result


@torch.no_grad()
def speed(model, prompt: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode ms/token): greedy decoding with the KV cache, after a warm-up run."""

    def run(n_decode: int) -> tuple[float, float]:
        start = time.perf_counter()
        out = model(prompt[None], use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(n_decode):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, (time.perf_counter() - start) / max(n_decode, 1)

    run(2)  # warm-up: first calls pay for allocation and kernel selection
    prefill, per_token = run(decode_tokens)
    return prompt.numel() / prefill, 1000 * per_token


def weight_memory(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def bytes_read_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: every parameter and buffer (`weight_memory`), except the
    input embedding table, of which a token reads one row, unless the output head shares it (tied)."""
    total = weight_memory(model)
    table = getattr(model.get_input_embeddings(), "weight", None)
    head = getattr(model.get_output_embeddings(), "weight", None)
    if table is None or (head is not None and head.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()):
        return total
    return total - table.untyped_storage().nbytes() + table[0].numel() * table.element_size()


def size_on_disk(path: Path, loaded: LoadedModel) -> tuple[int, int]:
    """(parameters, bytes of weight files). A qconvert output's parameters come from its manifest."""
    size = sum(f.stat().st_size for f in loaded.files)
    if loaded.kind == "qconvert":
        return read_manifest(path).totals["parameters"], size
    return sum(p.numel() for p in loaded.model.parameters()), size


def evaluate(
    path: Path,
    text: str,
    settings: EvalSettings = EvalSettings(),
    baseline: Path | None = None,
    tokenizer_path: Path | None = None,
) -> EvalResult:
    """Evaluate the model at `path` (qconvert output, checkpoint folder or .gguf) on `text`."""
    start = time.perf_counter()
    compiling = kernels.Compiled.seconds
    loaded = load_for_eval(path, use_kernels=settings.use_kernels)
    tokenizer = load_tokenizer((tokenizer_path, None) if tokenizer_path else loaded.tokenizer_source)
    windows = token_windows(tokenizer, text, settings)
    baseline_model = load_for_eval(baseline).model if baseline else None
    scores = score(loaded.model, windows, baseline_model)
    del baseline_model
    prompt = windows.view(-1)[: settings.prompt_tokens]
    prefill_rate, decode_ms = speed(loaded.model, prompt, settings.decode_tokens)
    parameters, on_disk = size_on_disk(path, loaded)
    return EvalResult(
        model=str(path),
        kind=loaded.kind,
        perplexity=scores["perplexity"],
        windows=windows.shape[0],
        tokens_scored=scores["tokens_scored"],
        parameters=parameters,
        bytes_on_disk=on_disk,
        bits_per_weight=8 * on_disk / parameters,
        weight_memory_bytes=weight_memory(loaded.model),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        prefill_tokens_per_s=prefill_rate,
        decode_ms_per_token=decode_ms,
        eval_seconds=time.perf_counter() - start,
        baseline=scores.get("baseline", {}),
        kernels=kernel_counts(loaded.model),
        compile_seconds=kernels.Compiled.seconds - compiling,
        compile_failed=kernels.Compiled.failed,
    )


def kernel_counts(model: torch.nn.Module) -> dict[str, int]:
    """How many of the model's quantized linears run on each kernel (`QuantizedLinear.kernel`)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            counts[module.kernel] = counts.get(module.kernel, 0) + 1
    return counts


def check_quality_gate(
    result: EvalResult, max_ppl_increase: float | None, max_kld: float | None, max_ppl: float | None = None
) -> None:
    """Raise QualityGateError when a limit is crossed.

    Raises:
        QConvertError: a relative limit was given without a baseline to measure it against.
    """
    if max_ppl is not None and result.perplexity > max_ppl:
        raise QualityGateError(
            f"quality gate failed: perplexity {result.perplexity:.3f} is above the {max_ppl} allowed."
        )
    if (max_ppl_increase is not None or max_kld is not None) and not result.baseline:
        raise QConvertError("--max-ppl-increase and --max-kld need --baseline MODEL.")
    if not result.baseline:
        return
    change, kld = result.baseline.get("ppl_change_pct"), result.baseline.get("mean_kld")
    if max_ppl_increase is not None and change > max_ppl_increase:
        raise QualityGateError(
            f"quality gate failed: perplexity rose {change:.2f}% over the baseline, above the "
            f"{max_ppl_increase}% allowed."
        )
    if max_kld is not None and kld > max_kld:
        raise QualityGateError(f"quality gate failed: mean KL divergence {kld:.4f} is above the {max_kld} allowed.")
