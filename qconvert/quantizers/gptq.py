"""GPTQ (Frantar et al. 2022): quantize a weight one column at a time, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

For a linear layer with calibration inputs X, H = 2 XᵀX / n measures how much an error in each
input column costs at the output. Rounding column i leaves an error e; the remaining columns absorb
it as W[:, j] -= e · H⁻¹[i, j] / H⁻¹[i, i], which is the least-squares correction. With the
upper Cholesky factor of H⁻¹ this is a sequence of rank-1 updates, batched in blocks of columns
("lazy batch" updates) so most of the work is one matrix product per block.

Rows are independent given H, so a matrix's rows are split across the cores, each part solved by
its own single-threaded column loop: the loop is many small operations, which a shared thread pool
only slows down. The pipeline quantizes each linear as soon as its inputs are complete inside the
block, from the inputs the already-quantized linears before it produce ("true sequential", in one
forward pass per block: `calibration/sequential.py`).

Group scales and zero points are those of `rtn` (min/max of a group, rounded to the stored scale
dtype), taken when the group's first column is reached, from the weights as updated so far. Any grid
works (`rtn.Rounding`): a column goes to its nearest codes on the integer grid or on a table (nf4,
mxfp4, nvfp4, ...), and the error pushed on is against those codes' values. With
`act_order` the columns are visited by decreasing H diagonal (most important first); groups are then
fixed up front from the original weights ("static groups"), so the stored layout keeps plain
contiguous groups and loads anywhere rtn's does, with no g_idx permutation.
"""

from concurrent.futures import ThreadPoolExecutor

import torch

from qconvert.errors import SchemeError
from qconvert.quantizers.base import CalibratedQuantizer, QuantConfig, QuantizedTensor
from qconvert.quantizers.registry import register
from qconvert.quantizers.rtn import Rounding

BLOCK_COLUMNS = 128
MAX_DAMP_RETRIES = 6


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: QuantConfig,
    damp: float = 0.01,
    act_order: bool = True,
    workers: int = 1,
) -> QuantizedTensor:
    """Quantize `weight` (rows, columns) given the input Hessian (columns, columns), float32.

    Rows are independent given H, so with `workers` > 1 the rows are split into that many parts,
    each solved by its own single-threaded column loop on its own core; the result is the same.

    Raises:
        SchemeError: the weight holds NaN or infinite values.
    """
    rows, columns = weight.shape
    if not torch.isfinite(weight).all():
        raise SchemeError("a weight contains NaN or infinite values and cannot be quantized.")
    group_size = config.group_size_for(columns)
    w = weight.to(torch.float32, copy=True)
    h = hessian.to(torch.float32, copy=True)
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights never matter
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(columns)
    rounding = Rounding(config, w)  # from the whole weight: nvfp4's global scale is the tensor's
    static = _group_grids(w, rounding, group_size) if act_order or group_size == columns else None
    h_inv = _inverse_cholesky(h[order][:, order], damp)
    parts = [p for p in torch.arange(rows).tensor_split(max(1, min(workers, rows // 16 or 1))) if len(p)]

    def solve(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.set_num_threads(1)  # the column loop is latency-bound: one part per core beats shared cores
        grids = None if static is None else (static[0][part], static[1][part])
        return _solve_rows(w[part][:, order], h_inv, order, grids, rounding, group_size)

    if len(parts) == 1:
        solved = [_solve_rows(w[:, order], h_inv, order, static, rounding, group_size)]
    else:
        threads = torch.get_num_threads()
        try:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                solved = list(pool.map(solve, parts))
        finally:
            torch.set_num_threads(threads)  # `solve` also set the count every new thread starts with: restore it
    codes, scales, zeros = (torch.cat(x) for x in zip(*solved))
    return QuantizedTensor(
        codes=codes[:, torch.argsort(order)].to(torch.uint8).contiguous(),
        bits=config.bits,
        group_size=group_size,
        shape=(rows, columns),
        dtype=weight.dtype,
        **rounding.stored(scales, zeros),
    )


def _solve_rows(
    w: torch.Tensor,
    h_inv: torch.Tensor,
    order: torch.Tensor,
    static: tuple[torch.Tensor, torch.Tensor] | None,
    rounding: Rounding,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over some rows of the weight, its columns already in visiting order: the
    codes (rows, columns, in that order, as float32), and each group's scale and zero point (rows, groups)."""
    rows, columns = w.shape
    groups = -(-columns // group_size)
    grids = static or (torch.zeros(rows, groups), torch.zeros(rows, groups))
    scales_t, zeros_t = grids[0].T.contiguous(), grids[1].T.contiguous()  # (groups, rows)
    # Work on Wᵀ: a weight column is then a contiguous row, which makes the per-column updates cheap.
    wt = w.T.contiguous()
    codes_t = torch.empty(columns, rows)
    visit = order.tolist()
    step = BLOCK_COLUMNS if static is not None else block_columns_for(group_size)
    for start in range(0, columns, step):
        end = min(start + step, columns)
        block, inv = wt[start:end], h_inv[start:end, start:end]
        pivots = torch.diagonal(inv).tolist()
        errors = torch.empty_like(block)
        for i in range(end - start):
            group = visit[start + i] // group_size
            if static is None and visit[start + i] % group_size == 0:  # a group's first column
                span = block[i : i + group_size]  # within this block: blocks hold whole groups
                scales_t[group], zeros_t[group] = _group_grid(span.T, rounding)
            x, scale, zero = block[i], scales_t[group], zeros_t[group]
            q = rounding.codes(x.unsqueeze(1), scale, zero)
            codes_t[start + i] = q.squeeze(1)
            error = x.sub(rounding.values(q, scale, zero).squeeze(1)).div_(pivots[i])
            block[i:].addr_(inv[i, i:], error, alpha=-1)
            errors[i] = error
        wt[end:].addmm_(h_inv[start:end, end:].T, errors, alpha=-1)
    return codes_t.T, scales_t.T.contiguous(), zeros_t.T.contiguous()


def block_columns_for(group_size: int) -> int:
    """Columns per lazy-update block: a multiple of the group size, so no group straddles two blocks."""
    return group_size * max(1, BLOCK_COLUMNS // group_size) if group_size <= BLOCK_COLUMNS else group_size


def _group_grid(columns: torch.Tensor, rounding: Rounding) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = torch.aminmax(columns, dim=1)
    return rounding.fit(low.clamp(max=0), high.clamp(min=0))


def _group_grids(w: torch.Tensor, rounding: Rounding, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's grid from the original weights (per-channel, or act-order's static groups)."""
    rows, columns = w.shape
    groups = -(-columns // group_size)
    padded = torch.nn.functional.pad(w, (0, groups * group_size - columns)).view(rows, groups, group_size)
    low, high = torch.aminmax(padded, dim=-1)  # zero padding never changes a range that includes 0
    return rounding.fit(low.clamp(max=0), high.clamp(min=0))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ tenfold until H is positive definite.

    Dampening keeps the inverse well conditioned; an ill-conditioned H (few samples, dead inputs)
    gets more of it rather than a crash. Past the last retry H is replaced by the identity, which
    makes GPTQ plain round-to-nearest for this layer.
    """
    mean_diagonal = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0])
    for attempt in range(MAX_DAMP_RETRIES):
        lam = (damp if attempt == 0 else max(damp, 1e-4) * 10**attempt) * mean_diagonal
        factor, info = torch.linalg.cholesky_ex(h + lam * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    return eye


@register("gptq")
class GPTQQuantizer(CalibratedQuantizer):
    description = "GPTQ: error-compensating column-by-column rounding from calibration activations"
    # Activation order is on by default, as in llm-compressor (its "static" order): on SmolLM2 int4 g64
    # (32 x 512 calibration tokens) it took perplexity from 22.17 to 20.73 (symmetric: 26.24 for rtn).
    # sequential: each linear from the inputs the quantized linears before it give, in one pass per block
    # (`calibration/sequential.py`); false: every linear from the block's own inputs, as qat's start is.
    options = {"damp": 0.01, "act_order": True, "sequential": True}

    @property
    def sequential(self) -> bool:
        return bool(self.settings["sequential"])

    def quantize_linear(self, name: str, weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig):
        return gptq_quantize(
            weight,
            hessian,
            config,
            self.settings["damp"],
            self.settings["act_order"],
            workers=max(1, torch.get_num_threads()),
        )

    def quantize_block(self, block) -> dict[str, QuantizedTensor]:
        """Every selected linear from the float block's own inputs (qat's start; the pipeline runs
        gptq sequentially instead, see `calibration/sequential.py`)."""
        return {
            name: self.quantize_linear(name, block.weight(name), hessian, block.configs[name])
            for names, hessian in block.input_hessians()
            for name in names
        }
