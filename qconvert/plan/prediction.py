"""Predict a conversion's output size, peak memory, disk and time from checkpoint headers alone.

The size is exact (the plan knows every stored tensor's bytes). Memory and time come from a
simple model of how qconvert runs, with constants measured on a 2-core x86 machine:

- streaming (rtn, clip): the process's baseline (Python, torch) plus two copies of the largest
  tensor read whole (reader prefetch, writer queue; tensors kept unchanged are copied a chunk at a
  time) and the codes of the largest quantized one (the
  quantizer works on cache-sized row blocks, so its float32 working set is small);
- calibration (gptq, awq): the baseline with transformers, the activations between blocks
  (samples x seqlen x hidden, float32), one batch's forward intermediates and one block's weights;
  qat adds the float model's stream of activations, the training state of one block and a batch's
  activations kept for the backward pass.

`tests/test_prediction.py` checks the prediction against measured peak RSS and output size.
"""

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from qconvert.errors import ResourceError
from qconvert.io.loading import Checkpoint
from qconvert.plan.planning import ConversionPlan, kept_dtype
from qconvert.quantizers import rtn_kernel
from qconvert.settings import Settings

GB = 1e9
BASE_RSS = 0.23 * GB  # python + torch + safetensors, measured
SKELETON_RSS = 0.19 * GB  # transformers imported and the meta-device model built to read each tensor's module, measured
CALIBRATION_BASE_RSS = 0.45 * GB  # + transformers, the model skeleton and the tokenizer, measured
IN_FLIGHT_COPIES = 2.0  # largest source tensor: one prefetched, one being converted or queued for writing
CODE_BYTES = 2.0  # per weight of the largest quantized tensor: its codes and their packed copy
FORWARD_OVERHEAD = (
    2.0  # a batch's intermediates are allocated and freed in an order that leaves slack; fits SmolLM2 at 128 x 512
)
# Source bytes read, quantized, hashed and written per second (rtn int4 g32, compare.py): the integer grid
# by the C kernels (`rtn_kernel.py`; 730M Llama 2.40 s, SmolLM2 1.75 s), else by torch (and the other grids).
STREAM_BYTES_PER_S = {"c": 1.2e9, "torch": 400e6}
STARTUP_S = 1.5  # python, torch and the plan, with transformers' answers recalled (`io/memo.py`)
TRANSFORMERS_S = 4.5  # the first run on a model: transformers imported, the model built, the output loaded
CALIBRATION_FLOPS = 140e9  # sustained float32 rate of a two-pass calibration (awq at 128 x 512: 235 s on SmolLM2)
# gptq in one pass per block (`calibration/sequential.py`), fitted to SmolLM2 at 128 x 512 tokens (117 s):
FORWARD_FLOPS = {"bfloat16": 300e9, "float32": 150e9}  # a block's forward, with its elementwise work
# X^T X of each distinct linear input, upper blocks only (bfloat16 products summed in float32: 4x float32's rate)
GRAM_FLOPS = {"bfloat16": 500e9, "float32": 160e9}
OFFLOAD_BYTES_PER_S = 0.75e9  # paused inputs written to a file and read back (gptq on SmolLM2: +16 s for 12.8 GB)
SOLVE_SECONDS_PER_WEIGHT = 2e-7  # gptq's column loops, two row halves at once
SECONDS_TOLERANCE = 0.3  # what the time prediction is checked to (scripts/compare.py's runs; the note of issue 16)
TRAINING_PASSES = 3  # a training step's forward and backward, in forward passes
TRAINING_FLOPS = 150e9  # ... at the rate of whole-block passes (qat on SmolLM2: 24 s per block for 2 epochs)
# A batch's activations kept for the backward pass, in forward intermediates (fits SmolLM2's 1.24 GB).
TRAINING_ACTIVATIONS = 1.0


@dataclass
class Prediction:
    weights_bytes: int  # the tensors' bytes: exact
    output_bytes: int  # with headers, manifest, config and tokenizer files: within a few kB
    quantized_bits_per_weight: float | None
    bits_per_weight: float | None
    peak_rss_bytes: int
    disk_bytes: int  # output, plus the calibration store while it runs
    seconds: float
    seconds_tolerance: float  # the measured runs fall within seconds x (1 ± this)
    available_memory_bytes: int | None
    free_disk_bytes: int | None

    def problems(self) -> list[str]:
        found = []
        if self.available_memory_bytes is not None and self.peak_rss_bytes > self.available_memory_bytes:
            found.append(
                f"it needs about {self.peak_rss_bytes / GB:.2f} GB of memory and "
                f"{self.available_memory_bytes / GB:.2f} GB is available"
            )
        if self.free_disk_bytes is not None and self.disk_bytes > self.free_disk_bytes:
            found.append(
                f"it writes about {self.disk_bytes / GB:.2f} GB and the output's disk has "
                f"{self.free_disk_bytes / GB:.2f} GB free"
            )
        return found

    def to_dict(self) -> dict:
        return asdict(self)


def predict(checkpoint: Checkpoint, plan: ConversionPlan, settings: Settings, destination: Path) -> Prediction:
    totals = plan.totals()
    # Each file's header holds the manifest, roughly its JSON size; sidecars are copied.
    headers = 400 * len(plan.tensors) + 2 * sum(len(p.specs) for p in plan.tensors) * 120
    output_bytes = totals["stored_bytes"] + headers + sum(f.stat().st_size for f in checkpoint.auxiliary_files())
    source_bytes = sum(info.nbytes for info in checkpoint.tensors.values())
    # Tensors kept as they are are copied from the source a chunk at a time; the others are read whole.
    infos = [(p, checkpoint.tensors[p.record.name]) for p in plan.tensors]
    largest = max((i.nbytes for p, i in infos if p.scheme or kept_dtype(i.dtype, settings) != i.dtype), default=0)
    largest_quantized = max(p.record.parameters for p in plan.tensors if p.scheme)
    # transformers' memory whenever it may be imported: to build the skeleton, or for the runtime check of
    # the output, whose recalled answer (`io/memo.py`) the plan cannot know beforehand
    skeleton = SKELETON_RSS if checkpoint.skeleton() is not None else 0
    built = skeleton and not checkpoint.skeleton().recalled
    peak = BASE_RSS + skeleton + IN_FLIGHT_COPIES * largest + CODE_BYTES * largest_quantized
    in_c = rtn_kernel.load() is not None and all(p.scheme.config.grid == "int" for p in plan.tensors if p.scheme)
    seconds = STARTUP_S + source_bytes / STREAM_BYTES_PER_S["c" if in_c else "torch"]
    if built:
        seconds += TRANSFORMERS_S
    disk = output_bytes
    if plan.calibrated is not None:
        calibration_peak, calibration_seconds = _calibration_cost(checkpoint, plan, settings)
        peak = max(peak, calibration_peak)
        seconds += calibration_seconds
        disk += totals["quantized_bytes"] * 2  # the block store holds codes unpacked (one byte each)
    return Prediction(
        weights_bytes=totals["stored_bytes"],
        output_bytes=output_bytes,
        quantized_bits_per_weight=totals["quantized_bits_per_weight"],
        bits_per_weight=totals["bits_per_weight"],
        peak_rss_bytes=int(peak),
        disk_bytes=int(disk),
        seconds=round(seconds, 1),
        seconds_tolerance=SECONDS_TOLERANCE,
        available_memory_bytes=available_memory(),
        free_disk_bytes=free_disk(destination),
    )


def _calibration_cost(checkpoint: Checkpoint, plan: ConversionPlan, settings: Settings) -> tuple[float, float]:
    config = checkpoint.config or {}
    hidden = config.get("hidden_size") or config.get("d_model") or 1024
    intermediate = config.get("intermediate_size") or 4 * hidden
    heads = config.get("num_attention_heads") or 16
    blocks = config.get("num_hidden_layers") or 1
    calibration = settings.calibration
    samples, seqlen, batch = (
        (calibration.samples, calibration.seqlen, calibration.batch_size) if calibration else (128, 512, 4)
    )
    tokens, batch_tokens = samples * seqlen, batch * seqlen
    activations = tokens * hidden * 4
    forward = FORWARD_OVERHEAD * (batch_tokens * (3 * intermediate + 6 * hidden) * 4 + batch * heads * seqlen**2 * 4)
    block_parameters = sum(p.record.parameters for p in plan.tensors if p.scheme) / blocks
    weights = block_parameters * 4 * 3  # float32 block, its quantized copy, the solver's working set
    embeddings = max(
        (info.numel * 4 for name, info in checkpoint.tensors.items() if "embed" in name or "wte" in name), default=0
    )
    pass_flops = blocks * tokens * 2 * block_parameters
    if getattr(plan.calibrated, "sequential", False):
        # One pass: the forward, X^T X of the inputs of q/k/v, o, gate/up and down, and the solves.
        dtype = (
            calibration.resolved(
                {checkpoint.tensors[p.record.name].dtype for p in plan.tensors if p.scheme}, True
            ).dtype
            if calibration
            else "float32"
        )
        grams = blocks * tokens * 2 * 0.625 * (3 * hidden**2 + intermediate**2)
        seconds = pass_flops / FORWARD_FLOPS[dtype] + grams / GRAM_FLOPS[dtype]
        seconds += blocks * block_parameters * SOLVE_SECONDS_PER_WEIGHT
        itemsize = 2 if dtype == "bfloat16" else 4
        offloaded = blocks * tokens * (3 * hidden + intermediate) * itemsize  # the inputs of q, o, gate and down
        seconds += offloaded / OFFLOAD_BYTES_PER_S
        # Every batch paused at o_proj: the block's input, the norm's output, q, k and v (the paused inputs
        # themselves wait in a file: `sequential._Offload`).
        in_flight = tokens * 4 * hidden * itemsize
        return CALIBRATION_BASE_RSS + activations * itemsize / 4 + in_flight, seconds
    # Per block: a statistics pass and a quantized pass over all tokens, plus X^T X.
    seconds = (2 * pass_flops + blocks * tokens * 2 * (hidden + intermediate) * hidden) / CALIBRATION_FLOPS
    if getattr(plan.calibrated, "needs_float_targets", False):  # qat: the float stream, its targets pass, and training
        activations *= 2
        passes = 3 + TRAINING_PASSES * int(plan.calibrated.settings.get("epochs", 0))  # + the loss before, after
        seconds += passes * pass_flops / TRAINING_FLOPS
        # The trained weights, their gradients, Adam's two moments and the start's copy; a batch's saved activations.
        weights += block_parameters * 4 * 5 + TRAINING_ACTIVATIONS * forward
    peak = CALIBRATION_BASE_RSS + activations + max(forward + weights, embeddings)
    return peak, seconds


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or None off Linux."""
    from qconvert.events import proc_kilobytes

    return proc_kilobytes("/proc/meminfo", "MemAvailable")


def free_disk(destination: Path) -> int | None:
    folder = destination.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_resources(prediction: Prediction) -> None:
    """Refuse to start a run the machine cannot hold (`--force` skips this).

    Raises:
        ResourceError: with what is needed and what is there.
    """
    problems = prediction.problems()
    if problems:
        raise ResourceError(f"not starting: {'; '.join(problems)}. Free some, or pass --force to try anyway.")
