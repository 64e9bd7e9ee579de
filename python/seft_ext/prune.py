"""Pruning masks: which weights of a dense layer the sparse base keeps."""
from __future__ import annotations

import torch
from torch import Tensor


def _check(weight: Tensor, sparsity: float) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"prune: weight must be a 2-D floating tensor, got {getattr(weight, 'shape', type(weight))}")
    if not torch.isfinite(weight).all():
        raise ValueError("prune: weight contains NaN or Inf")
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"prune: sparsity must be in [0, 1), got {sparsity}")


def keep_largest(score: Tensor, sparsity: float, scope: str = "layer", nm: tuple[int, int] = (2, 4)) -> Tensor:
    """Bool mask keeping the largest scores: ``round((1 - s) * out * in)`` per layer,
    ``round((1 - s) * in)`` per row, or N of every M consecutive inputs (``scope="nm"``,
    which ignores ``sparsity``). Ties go to the lower index."""
    _check(score, sparsity)
    out, inn = score.shape
    s = score.detach().double()
    if scope == "layer":
        keep = round((1.0 - sparsity) * out * inn)
        mask = torch.zeros(out * inn, dtype=torch.bool, device=score.device)
        mask[torch.argsort(s.flatten(), descending=True, stable=True)[:keep]] = True
        return mask.view(out, inn)
    if scope == "row":
        keep = round((1.0 - sparsity) * inn)
        idx = torch.argsort(s, dim=1, descending=True, stable=True)[:, :keep]
        return torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)
    if scope == "nm":
        n, m = nm
        if not (1 <= n <= m) or inn % m:
            raise ValueError(f"prune: N:M = {n}:{m} needs 1 <= N <= M and M dividing in_features = {inn}")
        groups = s.view(out, inn // m, m)
        idx = torch.argsort(groups, dim=2, descending=True, stable=True)[..., :n]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).view(out, inn)
    raise ValueError(f"prune: scope must be 'layer', 'row' or 'nm', got {scope!r}")


def magnitude_mask(weight: Tensor, sparsity: float, scope: str = "layer", nm: tuple[int, int] = (2, 4)) -> Tensor:
    """Keep the largest ``|W|`` (see :func:`keep_largest` for the scopes)."""
    _check(weight, sparsity)
    return keep_largest(weight.abs(), sparsity, scope, nm)
