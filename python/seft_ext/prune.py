"""Pruning: which weights of a dense layer the sparse base keeps (and, for SparseGPT, with
which values).

Budget units: ``layer`` (the layer's ``round((1 - s) out in)`` best), ``row`` (each output row's
``round((1 - s) in)`` best) and ``nm`` (``n`` of every ``m`` consecutive inputs). Methods:
magnitude ``|W|``; Wanda ``|W_ij| ||X_j||_2`` (calibration input norms); SparseGPT (OBS
with ``H = X^T X + lambda I``, column blocks, error compensation on the kept weights).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import BUDGETS


def _check(weight: Tensor, sparsity: float) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"prune: weight must be a 2-D floating tensor, got {getattr(weight, 'shape', type(weight))}")
    if not torch.isfinite(weight).all():
        raise ValueError("prune: weight contains NaN or Inf")
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"prune: sparsity must be in [0, 1), got {sparsity}")


def keep_largest(score: Tensor, sparsity: float, budget: str = "layer", nm: tuple[int, int] = (2, 4)) -> Tensor:
    """Bool mask keeping the largest scores: ``round((1 - s) * out * in)`` per layer,
    ``round((1 - s) * in)`` per row, or N of every M consecutive inputs (``budget="nm"``,
    which ignores ``sparsity``). Ties go to the lower index."""
    _check(score, sparsity)
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


def magnitude_mask(weight: Tensor, sparsity: float, budget: str = "layer", nm: tuple[int, int] = (2, 4)) -> Tensor:
    """Keep the largest ``|W|`` (see :func:`keep_largest` for the scopes)."""
    _check(weight, sparsity)
    return keep_largest(weight.abs(), sparsity, budget, nm)


def wanda_mask(weight: Tensor, input_sq_norms: Tensor, sparsity: float, budget: str = "row",
               nm: tuple[int, int] = (2, 4)) -> Tensor:
    """Keep the largest ``|W_ij| * ||X_j||_2`` (Wanda). ``input_sq_norms[j] = sum_t X[t, j]^2``
    over the calibration tokens. Wanda compares within each output row (``budget="row"``, the
    default); ``layer`` and ``nm`` work too."""
    _check(weight, sparsity)
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"prune: input_sq_norms must have shape ({weight.shape[1]},), got "
                         f"{tuple(input_sq_norms.shape)}")
    if not torch.isfinite(input_sq_norms).all() or bool((input_sq_norms < 0).any()):
        raise ValueError("prune: input_sq_norms must be finite and >= 0")
    score = weight.detach().double().abs() * input_sq_norms.double().sqrt().unsqueeze(0)
    return keep_largest(score, sparsity, budget, nm)


def _pruned_upto(cols: int, inn: int, rows: int, sparsity: float) -> int:
    """How many of the first `cols` columns' entries (of `rows` rows) are pruned once they are
    done: proportional, and at the end exactly what keep_largest keeps out of rows * inn."""
    if cols >= inn:
        return rows * inn - round((1.0 - sparsity) * rows * inn)
    return min(round(sparsity * rows * cols), rows * inn - round((1.0 - sparsity) * rows * inn))


def sparsegpt_prune(weight: Tensor, hessian: Tensor, sparsity: float, budget: str = "layer",
                    nm: tuple[int, int] = (2, 4), blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """SparseGPT: prune ``weight`` (out, in) given ``hessian = X^T X`` (in, in) over calibration
    inputs. Columns are processed in blocks of ``blocksize``; within a block the pruned set is
    chosen by the OBS saliency ``w^2 / [H^-1]_jj`` at the block's start, then each column's
    pruning error is spread over the columns not yet processed (``W[:, F] -= err * H_F^-1 row``).
    Returns ``(mask, new_weight)`` in float32 (float64 for float64 input); pruned entries are 0.

    Exact counts: ``layer`` keeps ``round((1 - s) out in)``; ``row`` keeps ``round((1 - s) in)``
    per row; ``nm`` keeps n of every m (``in % m == 0``, ``m`` dividing ``blocksize``)."""
    _check(weight, sparsity)
    out, inn = weight.shape
    if hessian.shape != (inn, inn) or not torch.isfinite(hessian).all():
        raise ValueError(f"prune: hessian must be a finite ({inn}, {inn}) matrix, got {tuple(hessian.shape)}")
    if budget not in BUDGETS:
        raise ValueError(f"prune: budget must be one of {BUDGETS}, got {budget!r}")
    n_keep, m = nm
    if budget == "nm" and (not (1 <= n_keep <= m) or inn % m or blocksize % m):
        raise ValueError(f"prune: N:M = {n_keep}:{m} needs 1 <= N <= M and M dividing in_features = {inn} "
                         f"and blocksize = {blocksize}")
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
    for i1 in range(0, inn, blocksize):
        i2 = min(i1 + blocksize, inn)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(U1)
        if budget != "nm":
            sal = (W1 ** 2 / d.unsqueeze(0) ** 2).double()
            if budget == "layer":
                cnt = _pruned_upto(i2, inn, out, sparsity) - _pruned_upto(i1, inn, out, sparsity)
                idx = torch.argsort(sal.flatten(), stable=True)[:cnt]
                blk = torch.zeros(out * (i2 - i1), dtype=torch.bool, device=W.device)
                blk[idx] = True
                mask[:, i1:i2] = blk.view(out, i2 - i1)
            else:
                cnt = _pruned_upto(i2, inn, 1, sparsity) - _pruned_upto(i1, inn, 1, sparsity)
                idx = torch.argsort(sal, dim=1, stable=True)[:, :cnt]
                mask[:, i1:i2] = torch.zeros_like(sal, dtype=torch.bool).scatter_(1, idx, True)
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
