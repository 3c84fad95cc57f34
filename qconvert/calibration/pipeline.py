"""Calibrated quantization, one decoder block at a time.

For each block: read its weights from the checkpoint, let the quantizer see the calibration
activations entering it (and quantize), put the *quantized* weights into the block, and run the
activations through it to get the next block's inputs, so later blocks learn to compensate for the
errors of earlier ones (as GPTQ does). Peak memory is one block plus the activations.

A quantizer that learns to reproduce the float model (`needs_float_targets`, e.g. qat) also gets the
float block's outputs on the float model's own activations: a second stream of activations, run
through the blocks as they were, so each block learns to undo the errors of the quantized blocks
before it.

Finished blocks are saved as they complete (`BlockStore`). A re-run finds them, recomputes the
activations by running the saved quantized blocks (bit-identical to the first run, since the same
weights see the same inputs) and carries on from the first unfinished block.
"""

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from qconvert.calibration.blocks import DecoderBlocks
from qconvert.calibration.samples import CalibrationSettings, calibration_windows
from qconvert.calibration.sequential import SequentialRun
from qconvert.calibration.statistics import CalibrationBlock
from qconvert.calibration.store import BlockResults, BlockStore
from qconvert.errors import SchemeError
from qconvert.heap import release_freed_memory
from qconvert.io.loading import Checkpoint
from qconvert.quantizers.base import CalibratedQuantizer, QuantConfig, QuantizedTensor, dequantize, relative_error
from qconvert.quantizers.grids import ScaleRangeError
from qconvert.quantizers.rtn import check_scale_range

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Called with (stage, blocks done, blocks in all); stage is e.g. "block 3: statistics".
BlockProgress = Callable[[str, int, int], None]


class CalibratedResults:
    """Where each tensor's calibrated result waits: its block's file in the store."""

    def __init__(self, store: BlockStore, blocks: int) -> None:
        self.store = store
        self.blocks = blocks
        self.block_of = {name: index for index in range(blocks) for name in store.names(index)}

    def records(self) -> list[dict]:
        """The quantizer's record of each block that has one (qat: its losses), in block order."""
        return [{"block": i, **r} for i in range(self.blocks) if (r := self.store.record(i)) is not None]

    def __contains__(self, name: str) -> bool:
        return name in self.block_of

    def result(self, name: str) -> tuple["QuantizedTensor | torch.Tensor", float | None]:
        """(quantized tensor, its relative error) or (replacement float tensor, None)."""
        return self.store.result(name, self.block_of[name])


def calibrate(
    checkpoint: Checkpoint,
    quantizer: CalibratedQuantizer,
    configs: dict[str, QuantConfig],
    settings: CalibrationSettings,
    store: BlockStore,
    progress: BlockProgress | None = None,
) -> CalibratedResults:
    """Quantize every tensor named in `configs` (with its own grid) block by block into `store`.

    Raises:
        SchemeError: a selected tensor lies outside the decoder blocks, or the model cannot be run.
    """
    quantizer.check_configs(configs)
    settings = resolved_settings(settings, checkpoint, quantizer, configs)
    blocks = DecoderBlocks(checkpoint, COMPUTE_DTYPES[settings.dtype])
    block_of = _assign_to_blocks(blocks, list(configs))
    report = progress or (lambda stage, done, total: None)
    unfinished = [i for i in range(len(blocks)) if not store.finished(i)]
    if not unfinished:
        return CalibratedResults(store, len(blocks))
    report("tokenizing calibration text", 0, len(blocks))
    inputs = blocks.first_inputs(calibration_windows(checkpoint.folder, settings), settings.batch_size)
    targets = inputs.copy() if quantizer.needs_float_targets else None
    release_freed_memory()  # the tokenizer and the embeddings are gone
    for index in range(unfinished[-1] + 1):
        began, record, outputs_done = time.perf_counter(), None, False
        module, prefix = blocks.load(index), blocks.block_prefix(index)
        if targets is not None:  # the float block's outputs: what this block learns to give, and the next's inputs
            with torch.no_grad():
                targets.run(module, keep_outputs=True)
        if store.finished(index):
            report(f"block {index}: replaying its saved result", index, len(blocks))
            results = store.load(index)
        else:
            report(f"block {index}: {quantizer.name}", index, len(blocks))
            names = [n for n, i in block_of.items() if i == index]
            block = CalibrationBlock(
                module,
                prefix,
                {n: configs[n] for n in names},
                inputs,
                targets,
                report=lambda stage, index=index: report(f"block {index}: {stage}", index, len(blocks)),
            )
            if quantizer.sequential:  # one pass: the block's outputs come with its results
                results, errors = _quantize_sequentially(quantizer, block, names, checkpoint, store.folder)
                outputs_done = True
            else:
                results = _quantize_block(quantizer, block, names, checkpoint)
                # Against the block's weights as the quantizer left them (AWQ folds scales into them).
                errors = {
                    n: relative_error(block.weight(n), r) for n, r in results.items() if isinstance(r, QuantizedTensor)
                }
            store.save(index, results, errors, block.record)
            record = block.record
        if index < unfinished[-1] and not outputs_done:  # the next blocks' inputs: this block's outputs, quantized
            report(f"block {index}: outputs", index, len(blocks))
            _apply(module, prefix, results)
            with torch.no_grad():
                inputs.run(module, keep_outputs=True)
        blocks.unload(index)
        release_freed_memory()
        report(f"block {index}: done{_summary(record)} in {time.perf_counter() - began:.0f} s", index + 1, len(blocks))
    del inputs, targets
    release_freed_memory()  # before the streaming pass reads the checkpoint again
    return CalibratedResults(store, len(blocks))


def resolved_settings(
    settings: CalibrationSettings, checkpoint: Checkpoint, quantizer: CalibratedQuantizer, configs: dict
) -> CalibrationSettings:
    """`settings` with an "auto" compute dtype decided for these tensors and this quantizer (see
    `CalibrationSettings.resolved`).

    Raises:
        SchemeError: bfloat16 asked of a quantizer that trains (its gradients need float32).
    """
    if settings.dtype == "bfloat16" and quantizer.needs_float_targets:
        raise SchemeError(f"{quantizer.name} trains its blocks in float32; drop --calib-dtype bfloat16.")
    return settings.resolved({checkpoint.tensors[n].dtype for n in configs}, quantizer.sequential)


def _summary(record: dict | None) -> str:
    """A learning quantizer's loss before and after the block's training, for the progress line."""
    if not record or record.get("loss_start") is None or record.get("loss_end") is None:
        return ""
    return f", loss {record['loss_start']:.4g} -> {record['loss_end']:.4g}"


def _assign_to_blocks(blocks: DecoderBlocks, selected: list[str]) -> dict[str, int]:
    block_of = {}
    for name in selected:
        index = next((i for i in range(len(blocks)) if name.startswith(blocks.block_prefix(i))), None)
        if index is None:
            raise SchemeError(
                f"{name} is selected for quantization but lies outside the decoder blocks, which "
                "calibrated quantizers cannot reach; exclude it or use rtn/clip."
            )
        block_of[name] = index
    return block_of


def _quantize_sequentially(
    quantizer: CalibratedQuantizer,
    block: CalibrationBlock,
    names: list[str],
    checkpoint: Checkpoint,
    offload_folder: Path | None = None,
) -> tuple[BlockResults, dict[str, float]]:
    """Each linear as soon as its inputs are complete (`sequential.py`); the block's inputs become its outputs."""
    _check_weights(block, names)
    report = lambda linear: block.report(f"{quantizer.name} {linear}")  # noqa: E731
    run = SequentialRun(block, quantizer.quantize_linear, report, offload_folder=offload_folder)
    try:
        results, errors = run.run()
    except ScaleRangeError as exc:
        raise SchemeError(f"a tensor of block {block.prefix.rstrip('.')} ({', '.join(names)}) {exc}") from exc
    return _as_source_dtypes(quantizer, results, names, checkpoint), errors


def _check_weights(block: CalibrationBlock, names: list[str]) -> None:
    for name in names:  # before any search mixes the tensors: name the one at fault
        if not torch.isfinite(block.weight(name)).all():
            raise SchemeError(f"tensor {name} contains NaN or infinite values and cannot be quantized.")
        check_scale_range(name, block.weight(name), block.configs[name])


def _quantize_block(
    quantizer: CalibratedQuantizer, block: CalibrationBlock, names: list[str], checkpoint: Checkpoint
) -> BlockResults:
    _check_weights(block, names)
    try:
        results = quantizer.quantize_block(block)
    except ScaleRangeError as exc:
        raise SchemeError(f"a tensor of block {block.prefix.rstrip('.')} ({', '.join(names)}) {exc}") from exc
    return _as_source_dtypes(quantizer, results, names, checkpoint)


def _as_source_dtypes(
    quantizer: CalibratedQuantizer, results: BlockResults, names: list[str], checkpoint: Checkpoint
) -> BlockResults:
    missing = [n for n in names if n not in results]
    if missing:
        raise SchemeError(
            f"quantizer {quantizer.name} returned no result for {missing[0]} (no calibration input reached it)."
        )
    for name, result in results.items():  # the source dtype, not the float32 compute dtype
        source_dtype = checkpoint.tensors[name].dtype
        if isinstance(result, QuantizedTensor):
            results[name] = dataclasses.replace(result, dtype=source_dtype)
        else:
            results[name] = result.to(source_dtype)
    return results


def _apply(module: torch.nn.Module, prefix: str, results: BlockResults) -> None:
    """Put the results into the block: quantized weights as their float values, replacements as given."""
    parameters = dict(module.named_parameters())
    for name, result in results.items():
        parameter = parameters[name[len(prefix) :]]
        value = dequantize(result) if isinstance(result, QuantizedTensor) else result
        parameter.data = value.to(parameter.dtype)  # the compute dtype, as a sequential run left it
