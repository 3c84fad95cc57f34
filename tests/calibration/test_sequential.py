"""The single-pass, true-sequential run of a block (`calibration/sequential.py`), on small stand-in blocks."""

import gc

import greenlet
import pytest
import torch

from qconvert.calibration import sequential
from qconvert.calibration.blocks import BlockInputs
from qconvert.calibration.sequential import SequentialRun
from qconvert.calibration.statistics import CalibrationBlock
from qconvert.errors import SchemeError, UnsupportedModelError
from qconvert.quantizers.base import QuantConfig, dequantize
from qconvert.quantizers.gptq import gptq_quantize

CONFIG = QuantConfig(bits=4, group_size=16, symmetric=True)


class Block(torch.nn.Module):
    """Two linears reading one input (like q/k), then one reading their product (like o_proj)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(32, 32, bias=False)
        self.b = torch.nn.Linear(32, 32, bias=False)
        self.c = torch.nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return x + self.c(torch.tanh(self.a(x)) * self.b(x))


class Routed(Block):
    """Which linear comes first depends on the data: batches would disagree on the order."""

    def forward(self, x):
        if x.mean() > 0:
            return self.c(self.a(x))
        return self.a(self.c(x))


def make_block(module, batches=3):
    inputs = BlockInputs()
    generator = torch.Generator().manual_seed(1)
    inputs.hidden = [torch.randn(2, 8, 32, generator=generator) + (i % 2) * 3 - 1.5 for i in range(batches)]
    inputs.kwargs = [{} for _ in range(batches)]
    configs = {f"layer.{n}.weight": CONFIG for n in ("a", "b", "c")}
    return CalibrationBlock(module, "layer.", configs, inputs)


def solve(name, weight, hessian, config):
    return gptq_quantize(weight, hessian, config)


@pytest.mark.parametrize("offload", [False, True])
def test_each_linear_is_quantized_from_the_inputs_the_quantized_ones_before_it_give(offload, tmp_path, monkeypatch):
    module = Block()
    source = {n: p.detach().clone() for n, p in module.named_parameters()}
    block = make_block(module)
    inputs = [h.clone() for h in block.inputs.hidden]
    seen, moved = [], []
    if offload:  # every paused input goes to the file while its linear is solved, and comes back exactly
        monkeypatch.setattr(sequential, "OFFLOAD_BYTES", 0)
        restore = sequential._Offload.restore
        monkeypatch.setattr(
            sequential._Offload,
            "restore",
            lambda self, batch: moved.append(len(self.moved.get(id(batch), []))) or restore(self, batch),
        )
    results, errors = SequentialRun(block, solve, seen.append, offload_folder=tmp_path if offload else None).run()
    # Three batches, each paused at a and then at c, and its input read back just before it resumes.
    assert moved == ([0, 0, 0, 1, 1, 1, 1, 1, 1] if offload else [])
    assert not list(tmp_path.iterdir())  # the file is gone
    assert seen == ["a", "b", "c"]  # b shares a's input: quantized at once, without a round of its own

    # The reference: a's and b's Hessian from the inputs, c's from what quantized a and b give.
    x = torch.cat([h.reshape(-1, 32) for h in inputs])
    h_ab = 2 * x.T @ x / len(x)
    qa, qb = gptq_quantize(source["a.weight"], h_ab, CONFIG), gptq_quantize(source["b.weight"], h_ab, CONFIG)
    y = torch.tanh(x @ dequantize(qa).T) * (x @ dequantize(qb).T)
    qc = gptq_quantize(source["c.weight"], 2 * y.T @ y / len(y), CONFIG)
    for name, expected in (("a", qa), ("b", qb), ("c", qc)):
        assert torch.equal(results[f"layer.{name}.weight"].codes, expected.codes), name
        assert errors[f"layer.{name}.weight"] > 0  # against the source weights, not the quantized ones

    # The next block's inputs: a plain forward of the quantized block, bit for bit.
    with torch.no_grad():
        for before, after in zip(inputs, block.inputs.hidden):
            assert torch.equal(module(before), after)


def test_batches_reaching_linears_in_different_orders_are_refused_and_unwound():
    block = make_block(Routed())
    run = SequentialRun(block, solve, lambda stage: None)
    with pytest.raises(UnsupportedModelError, match="different orders"):
        run.run()
    assert not block.module.a._forward_pre_hooks  # hooks removed


def test_an_error_while_quantizing_reaches_the_caller_and_leaves_no_batch_paused():
    block = make_block(Block())

    def failing(name, weight, hessian, config):
        if name.endswith("c.weight"):
            raise SchemeError("cannot")
        return solve(name, weight, hessian, config)

    run = SequentialRun(block, failing, lambda stage: None)
    with torch.enable_grad():
        with pytest.raises(SchemeError, match="cannot"):
            run.run()
        assert torch.is_grad_enabled()  # the run's no_grad ends with it, whichever batch was paused
    assert not block.module.c._forward_pre_hooks
    paused = [g for g in gc.get_objects() if type(g) is greenlet.greenlet and g.parent and not g.dead]
    assert not paused


def test_storages_every_batch_reads_are_never_offloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(sequential, "OFFLOAD_BYTES", 0)
    module, shared = Block(), torch.randn(4, 32)
    offload = sequential._Offload(tmp_path, sequential._shared_storages(module, [{"rotary": (shared, shared)}]))
    for tensor in (module.a.weight, shared, module.a.weight.detach().view(-1)):
        offload.move("batch", tensor)
        assert tensor.untyped_storage().nbytes() == tensor.numel() * 4
    own = torch.randn(4, 32)
    offload.move("batch", own)
    assert own.untyped_storage().nbytes() == 0  # away until its batch resumes
    offload.restore("batch")
    offload.close()
