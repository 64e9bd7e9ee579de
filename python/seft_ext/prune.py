"""Pruning: which weights of a dense layer the sparse base keeps (and, for SparseGPT, with
which values).

Budget units: ``layer`` (the layer's ``round((1 - s) out in)`` best), ``row`` (each output row's
``round((1 - s) in)`` best) and ``nm`` (``n`` of every ``m`` consecutive inputs). Methods:
magnitude ``|W|``; Wanda ``|W_ij| ||X_j||_2`` (calibration input norms); SparseGPT (OBS
with ``H = X^T X + lambda I``, column blocks, error compensation on the kept weights).

``block=(r, c)`` prunes whole ``r x c`` blocks (``layer`` and ``row`` budgets): a block's score
is the sum of its weights' scores (over the real weights only, so a partial block at the right
or bottom edge sums fewer terms), the budget counts blocks (``round((1 - s) nblocks)`` per
layer, ``round((1 - s) ceil(in / c))`` per block row), and the mask is constant on each block.
"""
from __future__ import annotations

import numbers
import re
from typing import Optional

import torch
from torch import Tensor

from .config import BUDGETS

Block = Optional[tuple[int, int]]


def _check(weight: Tensor, sparsity: float) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"prune: weight must be a 2-D floating tensor, got {getattr(weight, 'shape', type(weight))}")
    if not torch.isfinite(weight).all():
        raise ValueError("prune: weight contains NaN or Inf")
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"prune: sparsity must be in [0, 1), got {sparsity}")


def check_block(block, budget: str) -> Block:
    """``block`` as ``(r, c)`` (or None), refused unless a pair of positive ints and a budget
    that counts blocks (``layer`` or ``row``; N:M groups have no block form)."""
    if block is None:
        return None
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in block)):
        raise ValueError(f"prune: block must be a pair of positive ints (r, c), got {block!r}")
    if budget not in ("layer", "row"):
        raise ValueError(f"prune: block={tuple(block)} needs budget 'layer' or 'row', got {budget!r} "
                         "(block and N:M cannot be combined)")
    return int(block[0]), int(block[1])


def parse_block_pattern(pattern: str) -> tuple[int, int]:
    """``"block:RxC"`` -> ``(R, C)`` (for example ``"block:8x8"`` -> ``(8, 8)``)."""
    m = re.fullmatch(r"block:(\d+)x(\d+)", pattern) if isinstance(pattern, str) else None
    if m is None:
        raise ValueError(f"pattern must be block:RxC with integers R, C >= 1 (for example block:8x8), got {pattern!r}")
    r, c = int(m.group(1)), int(m.group(2))
    if r < 1 or c < 1:
        raise ValueError(f"pattern {pattern!r}: the block sizes R and C must be >= 1")
    return r, c


def block_scores(score: Tensor, block: tuple[int, int]) -> Tensor:
    """Float64 ``[ceil(out / r), ceil(in / c)]``: the sum of ``score`` over each ``r x c`` block
    (edge blocks sum their real entries only)."""
    r, c = block
    out, inn = score.shape
    nbr, nbc = -(-out // r), -(-inn // c)
    padded = torch.zeros(nbr * r, nbc * c, dtype=torch.float64, device=score.device)
    padded[:out, :inn] = score.detach().double()
    return padded.view(nbr, r, nbc, c).sum((1, 3))


def expand_blocks(bmask: Tensor, block: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """A per-block mask ``[nbr, nbc]`` as the dense ``shape`` mask constant on each block."""
    r, c = block
    return bmask.repeat_interleave(r, 0).repeat_interleave(c, 1)[:shape[0], :shape[1]].contiguous()


def keep_largest(score: Tensor, sparsity: float, budget: str = "layer", nm: tuple[int, int] = (2, 4),
                 block: Block = None) -> Tensor:
    """Bool mask keeping the largest scores: ``round((1 - s) * out * in)`` per layer,
    ``round((1 - s) * in)`` per row, or N of every M consecutive inputs (``budget="nm"``,
    which ignores ``sparsity``). Ties go to the lower index.

    ``block=(r, c)``: the same over block scores (:func:`block_scores`), counting blocks per
    layer or per block row; ties go to the lower block (row-major); the mask is constant on
    each block."""
    _check(score, sparsity)
    block = check_block(block, budget)
    if block is not None:
        return expand_blocks(keep_largest(block_scores(score, block), sparsity, budget), block, score.shape)
    out, inn = score.shape
    s = score.detach().double()
    if budget == "layer":
        keep = round((1.0 - sparsity) * out * inn)
        mask = torch.zeros(out * inn, dtype=torch.bool, device=score.device)
        mask[torch.argsort(s.flatten(), descending=True, stable=True)[:keep]] = True
        return mask.view(out, inn)
    if budget == "row":
        keep = round((1.0 - sparsity) * inn)
        idx = torch.argsort(s, dim=1, descending=True, stable=True)[:, :keep]
        return torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)
    if budget == "nm":
        n, m = nm
        if not (1 <= n <= m) or inn % m:
            raise ValueError(f"prune: N:M = {n}:{m} needs 1 <= N <= M and M dividing in_features = {inn}")
        groups = s.view(out, inn // m, m)
        idx = torch.argsort(groups, dim=2, descending=True, stable=True)[..., :n]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).view(out, inn)
    raise ValueError(f"prune: budget must be one of {BUDGETS}, got {budget!r}")


def magnitude_mask(weight: Tensor, sparsity: float, budget: str = "layer", nm: tuple[int, int] = (2, 4),
                   block: Block = None) -> Tensor:
    """Keep the largest ``|W|`` (see :func:`keep_largest` for the scopes); with ``block``, the
    blocks with the largest ``sum |W|``."""
    _check(weight, sparsity)
    check_block(block, budget)
    return keep_largest(weight.abs(), sparsity, budget, nm, block)


def wanda_mask(weight: Tensor, input_sq_norms: Tensor, sparsity: float, budget: str = "row",
               nm: tuple[int, int] = (2, 4), block: Block = None) -> Tensor:
    """Keep the largest ``|W_ij| * ||X_j||_2`` (Wanda). ``input_sq_norms[j] = sum_t X[t, j]^2``
    over the calibration tokens. Wanda compares within each output row (``budget="row"``, the
    default); ``layer`` and ``nm`` work too. With ``block``, the blocks with the largest sum of
    those scores, compared within each block row (``row``) or across the layer (``layer``)."""
    _check(weight, sparsity)
    check_block(block, budget)
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"prune: input_sq_norms must have shape ({weight.shape[1]},), got "
                         f"{tuple(input_sq_norms.shape)}")
    if not torch.isfinite(input_sq_norms).all() or bool((input_sq_norms < 0).any()):
        raise ValueError("prune: input_sq_norms must be finite and >= 0")
    score = weight.detach().double().abs() * input_sq_norms.double().sqrt().unsqueeze(0)
    return keep_largest(score, sparsity, budget, nm, block)


def _pruned_upto(cols: int, inn: int, rows: int, sparsity: float) -> int:
    """How many of the first `cols` columns' entries (of `rows` rows) are pruned once they are
    done: proportional, and at the end exactly what keep_largest keeps out of rows * inn."""
    if cols >= inn:
        return rows * inn - round((1.0 - sparsity) * rows * inn)
    return min(round(sparsity * rows * cols), rows * inn - round((1.0 - sparsity) * rows * inn))


def _chunk_pruned(W1: Tensor, d: Tensor, budget: str, sparsity: float, i1: int, i2: int, inn: int,
                  block: Block) -> Tensor:
    """The pruned set (True) of the chunk of columns ``i1:i2`` chosen at its start by the OBS
    saliency ``w^2 / [H^-1]_jj`` (per weight, or summed over each block), with the chunk's share
    of the layer's / row's (block row's) count."""
    sal = (W1 ** 2 / d.unsqueeze(0) ** 2).double()
    c = 1
    if block is not None:
        c = block[1]
        sal = block_scores(sal, block)
    rows, cols = sal.shape
    b1, b2, nbc = i1 // c, -(-i2 // c), -(-inn // c)  # chunks start on a block column
    if budget == "layer":
        cnt = _pruned_upto(b2, nbc, rows, sparsity) - _pruned_upto(b1, nbc, rows, sparsity)
        idx = torch.argsort(sal.flatten(), stable=True)[:cnt]
        pruned = torch.zeros(rows * cols, dtype=torch.bool, device=W1.device)
        pruned[idx] = True
        pruned = pruned.view(rows, cols)
    else:
        cnt = _pruned_upto(b2, nbc, 1, sparsity) - _pruned_upto(b1, nbc, 1, sparsity)
        idx = torch.argsort(sal, dim=1, stable=True)[:, :cnt]
        pruned = torch.zeros_like(sal, dtype=torch.bool).scatter_(1, idx, True)
    return pruned if block is None else expand_blocks(pruned, block, tuple(W1.shape))


def _check_sparsegpt(weight: Tensor, hessian: Tensor, sparsity: float, budget: str, nm: tuple[int, int],
                     blocksize: int, block) -> Block:
    _check(weight, sparsity)
    inn = weight.shape[1]
    if hessian.shape != (inn, inn) or not torch.isfinite(hessian).all():
        raise ValueError(f"prune: hessian must be a finite ({inn}, {inn}) matrix, got {tuple(hessian.shape)}")
    if budget not in BUDGETS:
        raise ValueError(f"prune: budget must be one of {BUDGETS}, got {budget!r}")
    if not isinstance(blocksize, numbers.Integral) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"prune: blocksize must be a positive int, got {blocksize!r}")
    n_keep, m = nm
    if budget == "nm" and (not (1 <= n_keep <= m) or inn % m or blocksize % m):
        raise ValueError(f"prune: N:M = {n_keep}:{m} needs 1 <= N <= M and M dividing in_features = {inn} "
                         f"and blocksize = {blocksize}")
    return check_block(block, budget)


def sparsegpt_prune(weight: Tensor, hessian: Tensor, sparsity: float, budget: str = "layer",
                    nm: tuple[int, int] = (2, 4), blocksize: int = 128,
                    percdamp: float = 0.01, block: Block = None) -> tuple[Tensor, Tensor]:
    """SparseGPT: prune ``weight`` (out, in) given ``hessian = X^T X`` (in, in) over calibration
    inputs. Columns are processed in blocks of ``blocksize``; within a block the pruned set is
    chosen by the OBS saliency ``w^2 / [H^-1]_jj`` at the block's start, then each column's
    pruning error is spread over the columns not yet processed (``W[:, F] -= err * H_F^-1 row``).
    Returns ``(mask, new_weight)`` in float32 (float64 for float64 input); pruned entries are 0.

    Exact counts: ``layer`` keeps ``round((1 - s) out in)``; ``row`` keeps ``round((1 - s) in)``
    per row; ``nm`` keeps n of every m (``in % m == 0``, ``m`` dividing ``blocksize``).

    ``block=(r, c)`` (``layer`` / ``row``): the column chunks are ``blocksize`` rounded down to a
    multiple of ``c`` (at least ``c``); at a chunk's start its ``r x c`` blocks are scored by the
    saliency summed over the block (weights as compensated so far) and the lowest pruned, the
    counts in blocks as for :func:`keep_largest`; the error compensation is unchanged.
    ``block=(1, 1)`` gives the unblocked result."""
    block = _check_sparsegpt(weight, hessian, sparsity, budget, nm, blocksize, block)
    out, inn = weight.shape
    n_keep, m = nm
    step = blocksize if block is None else max(block[1], blocksize // block[1] * block[1])
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(inn, dtype=dtype, device=H.device)
    # Upper Cholesky factor U of H^-1: row i of U is the eliminated inverse's row i over
    # columns i.. scaled by 1 / sqrt([H_F^-1]_ii), so U_ii^2 = [H_F^-1]_ii.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros(out, inn, dtype=torch.bool, device=W.device)  # True = pruned
    for i1 in range(0, inn, step):
        i2 = min(i1 + step, inn)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(U1)
        if budget != "nm":
            mask[:, i1:i2] = _chunk_pruned(W1, d, budget, sparsity, i1, i2, inn, block)
        for i in range(i2 - i1):
            w = W1[:, i]
            if budget == "nm" and i % m == 0:
                sal = (W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2).double()
                idx = torch.argsort(sal, dim=1, stable=True)[:, :m - n_keep]
                mask[:, i1 + i:i1 + i + m] = torch.zeros_like(sal, dtype=torch.bool).scatter_(1, idx, True)
            q = torch.where(mask[:, i1 + i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    keep = ~mask
    return keep, W * keep
