"""Choose each tensor's bit width to fit a size budget with the least total error.

Sensitivity is measured one tensor at a time: the reconstruction error of round-to-nearest on every
candidate (integers of 2-8 bits in groups of half, once, twice and four times the tensor's own group
size, and per channel; with `--budget-grids`, also those table grids at their own bits and blocks),
in one of two units:
- with calibration text (`--calib`): the loss increase it predicts, Σ F ΔW² with F the diagonal of
  the empirical Fisher information (`calibration/fisher.py`), so a weight the loss is sensitive to
  costs more than one it ignores, across tensors and within them;
- without: |ΔW|² / |W|² times the tensor's size, so every weight counts alike whatever its tensor's
  scale (plain |ΔW|² over-protects tensors with large weights).
On SmolLM2 (40 windows of eval.txt) the first gives perplexity 34.7 at 3.5 bits per weight and 24.0
at 4.0, the second 39.9 and 26.8. The stored bytes of every (tensor, width) pair come from the output
layout, so scales and zero points are counted exactly.

Choosing widths is then a multiple-choice knapsack: minimise the summed error subject to the summed
bytes. The greedy solution on each tensor's lower convex hull of (bytes, error) is the exact
Lagrangian optimum at every budget it lands on; it starts every tensor at its smallest width and
repeatedly takes the upgrade that removes the most error per extra byte while it fits.
"""

import heapq
from dataclasses import dataclass

import torch

from qconvert.errors import SchemeError
from qconvert.io.loading import Checkpoint
from qconvert.limits import SUPPORTED_BITS
from qconvert.plan.planning import Candidate, ConversionPlan
from qconvert.quantizers import QuantConfig
from qconvert.quantizers.base import dequantize
from qconvert.quantizers.grids import GRIDS
from qconvert.quantizers.rtn import rtn_quantize
from qconvert.settings import Settings

CANDIDATE_BITS = SUPPORTED_BITS
GROUP_MULTIPLES = (
    0.5,
    1,
    2,
    4,
)  # group sizes tried: half, once, twice and four times the tensor's own, and per channel


@dataclass
class _Option:
    candidate: Candidate
    bytes: int
    error: float


class Sensitivity:
    """Every quantized tensor's error at every candidate width: measured once, then priced under a layout."""

    def __init__(self, checkpoint: Checkpoint, plan: ConversionPlan, settings: Settings) -> None:
        self.schemes = {p.record.name: p.scheme for p in plan.tensors if p.scheme}
        self.tables = settings.budget_grids
        self.shapes = {name: tuple(checkpoint.tensors[name].shape) for name in self.schemes}
        if settings.calibration is None:
            self.errors = {
                name: self._relative_errors(name, weight)
                for name, weight in checkpoint.iter_tensors(list(self.schemes), hash_on_the_way=False)
            }
            return
        from qconvert.calibration.fisher import loss_fisher

        self.errors = {}
        for name, fisher in loss_fisher(checkpoint, list(self.schemes), settings.calibration):
            _, weight = next(checkpoint.iter_tensors([name], hash_on_the_way=False))
            self.errors[name] = self._loss_errors(name, weight, fisher)

    def _config(self, name: str, candidate: Candidate) -> QuantConfig:
        config = self.schemes[name].config
        symmetric = config.symmetric if candidate.grid == "int" else True
        return QuantConfig(
            bits=candidate.bits,
            group_size=candidate.group_size,
            symmetric=symmetric,
            scale_dtype=config.scale_dtype,
            grid=candidate.grid,
        )

    def _candidates(self, name: str) -> list[Candidate]:
        own, columns = self.schemes[name].config.group_size, self.shapes[name][1]
        sizes = {0} | ({int(own * m) for m in GROUP_MULTIPLES if 16 <= own * m < columns} if own else set())
        integers = [Candidate("int", bits, size) for bits in CANDIDATE_BITS for size in sorted(sizes)]
        tables = [Candidate(g, GRIDS[g].bits, GRIDS[g].block or GRIDS[g].default_group) for g in self.tables]
        return integers + tables

    def _relative_errors(self, name: str, weight: torch.Tensor) -> dict[Candidate, float]:
        """|W - Q(W)|² / |W|² on each candidate, times the tensor's size."""
        scale = weight.numel() / max(float(weight.float().square().sum()), 1e-30)
        return {c: float(self._squared_error(name, weight, c).sum()) * scale for c in self._candidates(name)}

    def _loss_errors(self, name: str, weight: torch.Tensor, fisher: torch.Tensor) -> dict[Candidate, float]:
        """Σ F (W - Q(W))² on each candidate: twice the loss increase it predicts."""
        return {c: float(self._squared_error(name, weight, c).mul_(fisher).sum()) for c in self._candidates(name)}

    def _squared_error(self, name: str, weight: torch.Tensor, candidate: Candidate) -> torch.Tensor:
        return dequantize(rtn_quantize(name, weight, self._config(name, candidate))).sub_(weight.float()).square_()

    def allocate(self, plan: ConversionPlan, settings: Settings) -> dict[str, Candidate]:
        """Tensor name -> its candidate within the budget of `settings`, bytes counted in `plan`'s layout.

        Raises:
            SchemeError: the budget is below every tensor at 2 bits or above every tensor at 8 bits.
        """
        kept_bytes = sum(p.record.stored_bytes for p in plan.tensors if not p.scheme)
        parameters = sum(p.record.parameters for p in plan.tensors if p.scheme)
        if settings.target_bpw is not None:
            budget, wanted = settings.target_bpw * parameters / 8, f"--target-bpw {settings.target_bpw}"
        else:
            budget, wanted = settings.target_size - kept_bytes, f"--target-size {settings.target_size / 1e6:.1f} MB"
        options = {
            name: _lower_hull([_Option(c, self._bytes(plan, name, c), error) for c, error in errors.items()])
            for name, errors in self.errors.items()
        }
        smallest = sum(o[0].bytes for o in options.values())
        largest = sum(o[-1].bytes for o in options.values())
        if not smallest <= budget <= largest:
            raise SchemeError(
                f"{wanted} is out of reach: the selected tensors take {_bpw(smallest, parameters)} to "
                f"{_bpw(largest, parameters)} bits per weight ({(smallest + kept_bytes) / 1e6:.1f} to "
                f"{(largest + kept_bytes) / 1e6:.1f} MB in all)."
            )
        return _choose(options, budget)

    def _bytes(self, plan: ConversionPlan, name: str, candidate: Candidate) -> int:
        return sum(spec.nbytes for spec in plan.layout.specs(name, self.shapes[name], self._config(name, candidate)))


def _lower_hull(options: list[_Option]) -> list[_Option]:
    """Drop widths that a mix of their neighbours beats: what remains has falling error per byte."""
    hull: list[_Option] = []
    for option in sorted(options, key=lambda o: o.bytes):
        if hull and option.error >= hull[-1].error:
            continue  # more bytes, no less error
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], option):
            hull.pop()
        hull.append(option)
    return hull


def _slope(a: _Option, b: _Option) -> float:
    """Error removed per extra byte going from a to b."""
    return (a.error - b.error) / max(b.bytes - a.bytes, 1)


def _choose(options: dict[str, list[_Option]], budget: float) -> dict[str, Candidate]:
    level = {name: 0 for name in options}
    spent = sum(o[0].bytes for o in options.values())
    heap = [(-_slope(o[0], o[1]), name) for name, o in options.items() if len(o) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        current, following = options[name][level[name]], options[name][level[name] + 1]
        extra = following.bytes - current.bytes
        if spent + extra > budget:
            continue  # too big for what is left; smaller upgrades further down may still fit
        spent += extra
        level[name] += 1
        if level[name] + 1 < len(options[name]):
            heapq.heappush(heap, (-_slope(following, options[name][level[name] + 1]), name))
    return {name: options[name][level[name]].candidate for name in sorted(options)}


def _bpw(stored: float, parameters: int) -> str:
    return f"{8 * stored / parameters:.2f}"
