"""How much each input column of each linear layer matters: the mean square of the activations it
meets, E[x_j²] = diag(H)/2, measured by running calibration text through the float model one block at
a time. A weight error ΔW then costs about Σ_j E[x_j²] Σ_i ΔW_ij² in output error, which is what
`--target-bpw --calib` minimises instead of the plain weight error."""

import torch

from qconvert.calibration.blocks import DecoderBlocks
from qconvert.calibration.pipeline import release_freed_memory
from qconvert.calibration.samples import CalibrationSettings, calibration_windows
from qconvert.calibration.statistics import CalibrationBlock
from qconvert.io.loading import Checkpoint
from qconvert.quantizers import QuantConfig


def input_energy(checkpoint: Checkpoint, names: list[str], settings: CalibrationSettings) -> dict[str, torch.Tensor]:
    """Tensor name -> E[x_j²] per input column, for the named linears inside the decoder blocks
    (names outside them are left out: their error counts unweighted)."""
    blocks = DecoderBlocks(checkpoint)
    inputs = blocks.first_inputs(calibration_windows(checkpoint.folder, settings), settings.batch_size)
    energy = {}
    for index in range(len(blocks)):
        prefix = blocks.block_prefix(index)
        inside = [n for n in names if n.startswith(prefix)]
        module = blocks.load(index)
        if inside:
            block = CalibrationBlock(module, prefix, {n: QuantConfig() for n in inside}, inputs)
            for group, hessian in block.input_hessians():
                for name in group:
                    energy[name] = torch.diagonal(hessian).div(2).clone()
        with torch.no_grad():
            inputs.run(module, keep_outputs=True)  # the float model's activations: nothing is quantized yet
        blocks.unload(index)
        release_freed_memory()
    return energy
