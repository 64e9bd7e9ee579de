"""SEFTLinear: a frozen sparse base plus a trainable sparse delta whose topology evolves.

Data layout (one CSR pattern, the delta as slots into it):
  crow, col    the pattern of W = theta + delta: exactly the layer's budget of non-zeros;
  theta        frozen base values in the layer's dtype, one per non-zero; 0 where the
               position was pruned in the base and is active only through the delta;
  delta_slots  int64 [k], strictly increasing indices into the CSR arrays;
  delta        the trainable Parameter [k], float32 (float64 for float64 layers) whatever
               the base dtype, so small updates do not vanish in bf16.
Why slots into the pattern rather than a second sparse matrix: a delta on a pruned position
must be a non-zero of W anyway, so W is one CSR and forward / input-gradient are one
csr_spmm / csr_spmm_t each; the delta's gradient is a csr_sddmm over its slots only; and an
evolution step rewrites the arrays in place without changing their sizes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .config import SEFTConfig
from .layer import CSRPatternMixin
from .prune import magnitude_mask
from .sparse import CSRWeight


class WindowStats:
    """What one layer gathers over an evolution window (see ``ops.csr_grow_scan``).

    ``tracked``: sorted flat positions outside the delta; ``crow`` / ``col``: the CSR pattern
    of the delta positions and the tracked ones together, so that one ``csr_sddmm`` per
    backward gives the delta's gradient and the window's statistics (``at_delta`` /
    ``at_tracked``: where each lands in it); ``gsum`` / ``g2sum``: sums of g and g^2 at the
    tracked positions over backward passes (``count``); ``steps``: optimizer steps covered;
    ``scan_bytes``: the scan's engine-reported peak workspace.
    """

    FIELDS = ("tracked", "crow", "col", "at_delta", "at_tracked", "gsum", "g2sum")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tracked: Optional[Tensor] = None
        self.crow = self.col = self.at_delta = self.at_tracked = self.gsum = self.g2sum = None
        self.count = 0
        self.steps = 0
        self.finite = True
        self.scan_bytes = 0

    @property
    def started(self) -> bool:
        return self.tracked is not None or not self.finite

    def nbytes(self) -> int:
        """Bytes held between backward passes."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, f) for f in self.FIELDS) if t is not None)

    def state_dict(self) -> dict:
        d = {f: None if getattr(self, f) is None else getattr(self, f).clone() for f in self.FIELDS}
        d.update(count=self.count, steps=self.steps, finite=self.finite, scan_bytes=self.scan_bytes)
        return d

    def load_state_dict(self, d: dict) -> None:
        self.reset()
        for f in self.FIELDS:
            setattr(self, f, None if d[f] is None else d[f].clone())
        self.count, self.steps, self.finite, self.scan_bytes = d["count"], d["steps"], d["finite"], d["scan_bytes"]


class _MaskedDenseFn(torch.autograd.Function):
    """The masked-dense baseline: W = theta + delta as a dense (out, in) matrix, dense matmuls
    and the full dense gradient dY^T X every step (how the paper's own code works); the delta
    takes its entries of it. Evolution uses the same window statistics and decision."""

    @staticmethod
    def forward(ctx, x, delta, bias, layer):
        w = layer.dense_weight(delta)
        ctx.save_for_backward(x, w)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        layer = ctx.layer
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        gx = dy @ w if ctx.needs_input_grad[0] else None
        dense_grad = dy2.T.to(layer.delta.dtype) @ x2.to(layer.delta.dtype)  # (out, in), every step
        gd = dense_grad.view(-1)[layer.slot_positions()]
        if layer.collecting and layer.window.finite:
            layer.accumulate_window(x2, dy2)
        gb = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gd, gb, None


class _SEFTLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, bias, layer):
        values = layer.effective_values(delta)
        y = ops.csr_spmm(x, layer.crow, layer.col, values, bias)
        # The pattern is saved too: an evolution step between forward and backward bumps its
        # version and autograd then refuses the stale backward.
        ctx.save_for_backward(x, values, layer.crow, layer.col, layer.delta_slots)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values, crow, col, slots = ctx.saved_tensors
        layer = ctx.layer
        gx = gd = gb = None
        if ctx.needs_input_grad[0]:
            gx = ops.csr_spmm_t(dy, crow, col, values, x.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        if layer.collecting and layer.window.finite:
            gd = layer.accumulate_window(x2, dy2)  # one SDDMM: the delta's gradient and the window's
        elif ctx.needs_input_grad[1]:
            gd = ops.csr_sddmm(dy2, x2, crow, col, slots)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = dy2.sum(0)
        return gx, gd, gb, None


class SEFTLinear(CSRPatternMixin, nn.Module):
    """``y = x (theta + delta)^T + b``: frozen sparse base, trainable sparse delta (k slots).

    Build it with :meth:`from_linear` (magnitude pruning) or :meth:`from_csr`. Only
    ``delta`` is trainable (the bias is frozen unless you set ``bias.requires_grad``).
    ``SEFTController`` evolves the topology; the layer holds exactly its budget throughout.
    """

    def __init__(self, base: CSRWeight, k: int, bias: Optional[Tensor] = None, budget: str = "layer",
                 nm: tuple[int, int] = (2, 4), method: str = "seft", seed: int = 0):
        super().__init__()
        if not isinstance(base, CSRWeight):
            raise TypeError(f"SEFTLinear: base must be a CSRWeight, got {type(base).__name__}")
        self.out_features, self.in_features = base.shape
        nnz = base.nnz
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"SEFTLinear: k must be a positive int, got {k}")
        if k > nnz:
            raise ValueError(f"SEFTLinear: trainable budget k = {k} exceeds the layer's {nnz} non-zeros "
                             f"({self.out_features}x{self.in_features}); lower k / density or the sparsity")
        if budget not in ("layer", "row", "nm"):
            raise ValueError(f"SEFTLinear: budget must be 'layer', 'row' or 'nm', got {budget!r}")
        self.budget = budget
        self.nm_n, self.nm_m = int(nm[0]), int(nm[1])
        if budget == "nm":
            _check_nm(base, self.nm_n, self.nm_m)
        if method not in ("seft", "spiel", "fixed"):
            raise ValueError(f"SEFTLinear: method must be 'seft', 'spiel' or 'fixed', got {method!r}")
        self.method = method
        self.register_buffer("crow", base.crow.clone())
        self.register_buffer("col", base.col.clone())
        self.register_buffer("theta", base.values.detach().clone())
        gen = torch.Generator().manual_seed(seed)
        slots = torch.randperm(nnz, generator=gen)[:k].sort().values.to(base.crow.device)
        self.register_buffer("delta_slots", slots)
        self.delta = nn.Parameter(torch.zeros(k, dtype=ops.acc_dtype(base.dtype), device=base.crow.device))
        if bias is not None:
            bias = bias.detach()
            if bias.shape != (self.out_features,) or bias.dtype != base.dtype:
                raise ValueError(f"SEFTLinear: bias must be ({self.out_features},) {base.dtype}, got "
                                 f"{tuple(bias.shape)} {bias.dtype}")
            self.bias = nn.Parameter(bias.clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.collecting = False
        self.dense_compute = False  # True: the masked-dense baseline (dense matmuls and gradients)
        self.sync_group = None  # a process group: the window statistics are shared (distributed.py)
        self.plan = (0, 0, 0, 0)  # (num_grow, num_prune, sketch, seed) for the window's scan
        self.window = WindowStats()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: SEFTConfig, mask: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None, seed: Optional[int] = None) -> "SEFTLinear":
        """Prune ``linear`` (``mask``, or magnitude at ``config.sparsity`` in ``config.budget``
        scope) and wrap it with a delta of ``config.trainable_for(out, in)`` slots."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SEFTLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if mask is None:
            mask = magnitude_mask(w, config.sparsity, config.budget, (config.nm_n, config.nm_m))
        base = CSRWeight.from_dense(w, mask, dtype=dtype)
        bias = None if linear.bias is None else linear.bias.detach().to(base.dtype)
        k = config.trainable_for(*w.shape)
        return cls(base, k, bias, config.budget, (config.nm_n, config.nm_m), config.method,
                   config.seed if seed is None else seed)

    # ------------------------------------------------------------------ the weight
    def effective_values(self, delta: Optional[Tensor] = None) -> Tensor:
        """Values of ``theta + delta`` over the pattern, in the layer's dtype."""
        delta = self.delta.detach() if delta is None else delta.detach()
        summed = torch.index_add(self.theta.to(delta.dtype), 0, self.delta_slots, delta)
        return summed.to(self.theta.dtype)

    def merged(self) -> CSRWeight:
        """``theta + delta`` as a CSR weight with exactly the layer's budget of non-zeros."""
        return CSRWeight(self.crow.clone(), self.col.clone(), self.effective_values(),
                         (self.out_features, self.in_features))

    def to_dense(self) -> Tensor:
        return self.merged().to_dense()

    def dense_weight(self, delta: Optional[Tensor] = None) -> Tensor:
        """theta + delta as a dense (out, in) matrix in the layer's dtype (masked-dense baseline)."""
        w = torch.zeros(self.out_features * self.in_features, dtype=self.theta.dtype, device=self.theta.device)
        rows = torch.searchsorted(self.crow, torch.arange(self.nnz, dtype=self.crow.dtype, device=self.crow.device),
                                  right=True) - 1
        w[rows.long() * self.in_features + self.col.long()] = self.effective_values(delta)
        return w.view(self.out_features, self.in_features)

    def slot_positions(self) -> Tensor:
        """Flat positions (row * in + col) of the delta slots."""
        rows = torch.searchsorted(self.crow, self.delta_slots.to(self.crow.dtype), right=True) - 1
        return rows.long() * self.in_features + self.col[self.delta_slots].long()

    @property
    def k(self) -> int:
        return self.delta.numel()

    # ------------------------------------------------------------------ forward / window
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SEFTLinear: x must have last dimension in_features = {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != self.theta.dtype:
            raise ValueError(f"SEFTLinear: x has dtype {x.dtype} but the layer is {self.theta.dtype}")
        fn = _MaskedDenseFn if self.dense_compute else _SEFTLinearFn
        return fn.apply(x, self.delta, self.bias, self)

    @property
    def grow_inactive(self) -> bool:
        return self.method == "seft"

    def accumulate_window(self, x2: Tensor, dy2: Tensor) -> Tensor:
        """Add one backward pass (X (T, in), dY (T, out)) to the window statistics; returns
        the delta's gradient. The first pass of a window scans for the tracked positions."""
        w = self.window
        if w.tracked is None:
            num_grow, num_prune, sketch, seed = self.plan
            tracked, _, nbytes, finite = ops.csr_grow_scan(
                dy2, x2, self.crow, self.col, self.theta, self.delta_slots, num_grow, num_prune, self.budget,
                self.nm_n, self.nm_m, self.grow_inactive, sketch, seed)
            w.scan_bytes = max(w.scan_bytes, int(nbytes))
            if self.sync_group is not None:  # every rank tracks the same positions (distributed.py)
                from . import distributed

                finite = distributed.all_agree(finite, self.sync_group)
                if finite:
                    tracked = distributed.union_positions(tracked, self.sync_group)
            if not finite:
                w.finite = False
                return ops.csr_sddmm(dy2, x2, self.crow, self.col, self.delta_slots)
            w.crow, w.col, w.at_delta, w.at_tracked = ops.csr_slot_union(
                self.crow, self.col, self.delta_slots, tracked, self.in_features)
            w.tracked = tracked
            w.gsum = torch.zeros(tracked.numel(), dtype=self.delta.dtype, device=tracked.device)
            w.g2sum = torch.zeros_like(w.gsum)
        g = ops.csr_sddmm(dy2, x2, w.crow, w.col)
        gt = g[w.at_tracked]
        w.gsum += gt
        w.g2sum += gt * gt
        w.count += 1
        return g[w.at_delta]

    @torch.no_grad()
    def evolve_(self, num_drop: int, tracked: Tensor, gsum: Tensor) -> tuple[Tensor, Tensor]:
        """One drop / grow / adapt step in place (see ``ops.csr_drop_grow_adapt_``)."""
        return ops.csr_drop_grow_adapt_(self.crow, self.col, self.theta, self.delta_slots, self.delta.detach(),
                                        tracked, gsum, num_drop, self.in_features, self.budget, self.nm_n,
                                        self.nm_m, self.grow_inactive)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, k={self.k}, budget={self.budget}"
                + (f" {self.nm_n}:{self.nm_m}" if self.budget == "nm" else "")
                + f", method={self.method}, dtype={self.theta.dtype}")


def _check_nm(base: CSRWeight, n: int, m: int) -> None:
    try:
        ops.csr_check_nm(base.crow, base.col, base.shape[1], n, m)
    except ValueError as e:
        raise ValueError(f"SEFTLinear: {e}") from None
