"""True-sequential calibration: each linear of a block is quantized as soon as its inputs are
complete, in one forward pass per block.

GPTQ's reference implementation quantizes a block's linears in forward order, each from the inputs
that the already-quantized linears before it produce: o_proj from attention computed with quantized
q/k/v, down_proj from quantized gate/up. Its Hessian H = 2XᵀX/n sums over every calibration token,
so a linear can only be quantized once every batch has delivered its input to it. Each batch's
forward therefore runs as a greenlet (a coroutine with its own stack), paused at the linear; they
take turns on one thread, always in batch order, so nothing depends on scheduling, and torch keeps
its one pool of worker threads and its one heap (OS threads would each get their own: measured
4.7 s and 1.9 GB per SmolLM2 block instead of 3.8 s and 1.0 GB). One round:

    every batch runs until it reaches the next linear not yet quantized, adds its input to that
    linear's Hessian and pauses; the linear is quantized and its weight replaced by the quantized
    values; the batches resume.

A linear that reads the very tensor the last quantized one read (k/v after q, up after gate) shares
its Hessian and is quantized as soon as the first batch reaches it, without another round. When
every batch has finished, its output, computed with all of the block's quantized weights, is the
next block's input: the same values a plain forward of the quantized block gives, which is what a
resumed run computes from the saved block.

Memory: paused batches hold their live activations at once; the peak is at the last linear
(down_proj's input, tokens × intermediate size), on top of the residual and what transformers'
frames keep. While a linear is solved, the inputs the batches paused with are moved to a temporary
file beside the calibration store (`_Offload`), and read back before the batches resume: on SmolLM2
with 128 x 512 tokens this took the peak RSS from 0.98 to 0.85 GB, for 12.8 GB written and read back
(about 16 s over 30 blocks). The page cache keeps them while memory is plentiful, and writes them to
disk when it is not.
"""

import ctypes
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch

from qconvert.calibration.statistics import CalibrationBlock, GramSums
from qconvert.errors import UnsupportedModelError
from qconvert.heap import map_large_allocations, release_freed_memory
from qconvert.quantizers.base import QuantConfig, QuantizedTensor, dequantize, relative_error

# (tensor name, float32 weight (rows, columns), H (columns, columns), config) -> its quantized form
SolveLinear = Callable[[str, torch.Tensor, torch.Tensor, QuantConfig], QuantizedTensor]


OFFLOAD_BYTES = 1 << 20  # smaller paused inputs stay in memory: not worth a write and a read


class _Offload:
    """Paused inputs moved to files while their batches wait: each tensor keeps its shape and dtype, but
    its storage is emptied (resized to 0 bytes) until `restore` reads its bytes back, just before its
    batch resumes, so that the batches' activations come back one batch at a time.

    Only an input that owns its whole storage is moved, so nothing else (a parameter, another tensor
    viewing the same memory) can see it emptied; and nothing of its batch runs while it is away. Two
    files take turns: a round's inputs go to one while the last round's are read back from the other."""

    def __init__(self, folder: Path | None, shared: set[int]) -> None:
        self.shared = shared  # storages every batch reads (parameters, buffers, keyword arguments): never moved
        self.files = [] if folder is None else [tempfile.TemporaryFile(dir=folder) for _ in range(2)]
        self.round = 0
        self.ends = [0, 0]  # where each file's next input goes
        self.moved: dict[int, list[tuple[torch.Tensor, BinaryIO, int]]] = {}  # batch id -> (tensor, file, offset)

    def move(self, batch: "_Batch", x: torch.Tensor) -> None:
        if not self._movable(x):
            return
        side = self.round % 2
        file, offset = self.files[side], self.ends[side]
        file.seek(offset)
        file.write(memoryview(_bytes_of(x)))
        self.ends[side] += x.untyped_storage().nbytes()
        self.moved.setdefault(id(batch), []).append((x, file, offset))
        x.untyped_storage().resize_(0)

    def _movable(self, x: torch.Tensor) -> bool:
        """A large enough input that owns its whole resizable storage, which no other batch reads."""
        storage, nbytes = x.untyped_storage(), x.numel() * x.element_size()
        return (
            bool(self.files)
            and nbytes >= OFFLOAD_BYTES
            and x.is_contiguous()
            and x.storage_offset() == 0
            and storage.nbytes() == nbytes
            and storage.resizable()
            and not isinstance(x, torch.nn.Parameter)
            and storage.data_ptr() not in self.shared
        )

    def restore(self, batch: "_Batch") -> None:
        """Give the batch's moved inputs their bytes back."""
        for x, file, offset in self.moved.pop(id(batch), []):
            nbytes = x.numel() * x.element_size()
            x.untyped_storage().resize_(nbytes)
            file.seek(offset)
            if file.readinto(memoryview(_bytes_of(x))) != nbytes:
                raise OSError(f"the temporary file of paused inputs lost {nbytes} bytes")

    def next_round(self) -> None:
        """Every batch has resumed: the file they were read back from is rewritten from its start by the
        next round (over the same pages of the page cache, not truncated and grown again)."""
        self.round += 1
        self.ends[self.round % 2] = 0

    def close(self) -> None:
        for file in self.files:
            file.close()


def _shared_storages(module: torch.nn.Module, kwargs: list[dict]) -> set[int]:
    """The storages of the block's parameters and buffers and of the batches' keyword arguments."""
    tensors = [*module.parameters(), *module.buffers()]
    for arguments in kwargs:
        for value in arguments.values():
            tensors += [v for v in (value if isinstance(value, (tuple, list)) else (value,)) if torch.is_tensor(v)]
    return {t.untyped_storage().data_ptr() for t in tensors}


def _bytes_of(x: torch.Tensor) -> ctypes.Array:
    """The bytes of a contiguous tensor, in place (a numpy view would pin its storage's size)."""
    return (ctypes.c_char * (x.numel() * x.element_size())).from_address(x.data_ptr())


class _Batch:
    """One batch's forward through the block, as a greenlet that runs whenever it is switched to."""

    def __init__(self, run: "SequentialRun", hidden: torch.Tensor, kwargs: dict) -> None:
        from greenlet import greenlet

        self.hidden, self.kwargs = hidden, kwargs
        self.output: torch.Tensor | None = None
        self.paused_at: str | None = None  # the linear whose input it delivered last
        self.paused_input: weakref.ref | None = None  # that input, to recognise a linear sharing it
        self.greenlet = greenlet(lambda: run.forward(self))

    @property
    def finished(self) -> bool:
        return self.greenlet.dead


@contextmanager
def _unwinding(batches: list[_Batch], hooks: list, offload: _Offload) -> Iterator[None]:
    """Remove the hooks and the offload file at the end, and after an error unwind the paused batches
    (GreenletExit ends them quietly), so that none is left holding its activations."""
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        offload.close()
        for batch in batches:
            if not batch.finished:
                batch.greenlet.throw()


class SequentialRun:
    """Quantize `block`'s selected linears in forward order with `solve`, in one pass over its inputs.

    `run()` returns the quantized tensors and their relative errors against the source weights, and
    leaves the block's outputs (with the quantized weights) in `block.inputs`, as the next block's inputs.

    Raises:
        UnsupportedModelError: batches reach the linears in different orders (data-dependent routing).
        SchemeError: from `solve`.
    """

    def __init__(
        self,
        block: CalibrationBlock,
        solve: SolveLinear,
        report: Callable[[str], None],
        offload_folder: Path | None = None,
    ) -> None:
        self.block, self.solve, self.report = block, solve, report
        self.offload_folder = offload_folder  # where the paused inputs wait while a linear is solved
        self.name_of = {linear: name for name, linear in block.linears.items()}
        self.results: dict[str, QuantizedTensor] = {}
        self.errors: dict[str, float] = {}
        self.grams = GramSums()  # per linear paused at: ΣXᵀX while the batches arrive
        self.hessians: dict[str, torch.Tensor] = {}  # the last round's H, which linears reading its input share
        self.current: _Batch | None = None

    def run(self) -> tuple[dict[str, QuantizedTensor], dict[str, float]]:
        map_large_allocations()
        inputs = self.block.inputs
        self.offload = _Offload(self.offload_folder, _shared_storages(self.block.module, inputs.kwargs))
        batches = [_Batch(self, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        inputs.hidden = []  # each batch owns its activations until its output replaces them
        hooks = [linear.register_forward_pre_hook(self._hook) for linear in self.block.linears.values()]
        # Grad mode is per thread, so shared by the greenlets: set once around them all, not in each.
        with torch.no_grad(), _unwinding(batches, hooks, self.offload):
            active = batches
            while active:
                for batch in active:
                    self.offload.restore(batch)
                    self.current = batch
                    batch.greenlet.switch()  # runs it until it pauses at a linear or finishes; raises its errors
                self.offload.next_round()
                paused = [b for b in active if not b.finished]
                if not paused:
                    break
                reached = {b.paused_at for b in paused}
                if len(reached) > 1 or len(paused) < len(active):
                    raise UnsupportedModelError(
                        f"the batches reach the linears of {self.block.prefix.rstrip('.')} in different orders "
                        "(routing that depends on the data), so they cannot be quantized in forward order."
                    )
                name = reached.pop()
                release_freed_memory()  # the batches' freed temporaries lie between their held activations
                # Only this round's H can still be shared (by the linears reading the same input): drop the rest.
                self.hessians = {name: self.grams.hessian(name)}
                self._quantize(name, self.hessians[name])
                active = paused
        inputs.hidden = [b.output for b in batches]
        return self.results, self.errors

    def forward(self, batch: _Batch) -> None:
        hidden, batch.hidden = batch.hidden, None
        output = self.block.module(hidden, **batch.kwargs)
        batch.output = output[0] if isinstance(output, tuple) else output

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        """Before a selected linear runs in the current batch: deliver its input, or pass if quantized."""
        name, batch, x = self.name_of[module], self.current, args[0]
        if name in self.results:
            return
        shared = batch.paused_input is not None and batch.paused_input() is x
        if shared and batch.paused_at in self.results:  # the same input as the linear just quantized
            self._quantize(name, self.hessians[batch.paused_at])
            return
        self.grams.add(name, x)
        batch.paused_at, batch.paused_input = name, weakref.ref(x)
        self.offload.move(batch, x)
        batch.greenlet.parent.switch()  # pause: back to `run`, until every batch has delivered

    def _quantize(self, name: str, hessian: torch.Tensor) -> None:
        """Quantize one linear from H and put its quantized values into the block for what follows."""
        self.report(name[len(self.block.prefix) :].removesuffix(".weight"))
        linear = self.block.linears[name]
        weight = linear.weight.detach().float()
        q = self.solve(name, weight, hessian, self.block.configs[name])
        self.results[name] = q
        self.errors[name] = relative_error(weight, q)
        linear.weight.data = dequantize(q).to(linear.weight.dtype)
