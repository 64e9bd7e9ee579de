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

from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .config import BUDGETS, METHODS, SEFTConfig
from .layer import CSRPatternMixin
from .masked_dense import MaskedDenseFn, dense_weight
from .prune import magnitude_mask
from .sparse import CSRWeight
from .window import EvolutionWindow


class _SEFTLinearFn(torch.autograd.Function):
    # The values of theta + delta are not saved for backward (a copy of the layer's non-zeros
    # for every layer, alive from forward to backward): backward sums them again from theta and
    # the delta, which autograd's version counters keep unchanged in between.
    @staticmethod
    def forward(ctx, x, delta, bias, layer):
        values = layer.effective_values(delta).to(x.dtype)  # x.dtype: the layer's, or autocast's
        y = ops.csr_spmm(x, layer.crow, layer.col, values, bias)
        # The pattern is saved too: an evolution step between forward and backward bumps its
        # version and autograd then refuses the stale backward.
        ctx.save_for_backward(x, delta, layer.theta, layer.crow, layer.col, layer.delta_slots)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, delta, theta, crow, col, slots = ctx.saved_tensors
        layer = ctx.layer
        gx = gd = gb = None
        if ctx.needs_input_grad[0]:
            values = _theta_plus_delta(theta, slots, delta).to(x.dtype)  # as in forward, bit for bit
            gx = ops.csr_spmm_t(dy, crow, col, values, x.shape[-1])
            del values
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        gd = layer.feed_window(x2, dy2)  # while a window is open: one SDDMM for both
        if gd is None and ctx.needs_input_grad[1]:
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

    block: Optional[tuple[int, int]] = None  # (r, c) for the block variant (seft_block.SEFTBlockLinear)

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
        if budget not in BUDGETS:
            raise ValueError(f"SEFTLinear: budget must be one of {BUDGETS}, got {budget!r}")
        self.budget = budget
        self.nm_n, self.nm_m = int(nm[0]), int(nm[1])
        if budget == "nm":
            _check_nm(base, self.nm_n, self.nm_m)
        if method not in METHODS:
            raise ValueError(f"SEFTLinear: method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.register_buffer("crow", base.crow.clone())
        self.register_buffer("col", base.col.clone())
        self.register_buffer("theta", base.values.detach().clone())
        gen = torch.Generator().manual_seed(seed)
        slots = torch.randperm(nnz, generator=gen)[:k].sort().values.to(base.crow.device)
        self.register_buffer("delta_slots", slots)
        self.delta = nn.Parameter(torch.zeros(k, dtype=ops.acc_dtype(base.dtype), device=base.crow.device))
        self.register_parameter("bias", frozen_bias("SEFTLinear", bias, self.out_features, base.dtype))
        self.dense_compute = False  # True: the masked-dense baseline (masked_dense.py)
        self.window = EvolutionWindow()  # opened and closed by the controller

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: SEFTConfig, mask: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None, seed: Optional[int] = None) -> SEFTLinear:
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

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()`` ...: theta and bias follow; the delta keeps its
        accumulation dtype (float32, float64 for a float64 base), converted from its exact values."""
        delta, grad = self.delta.detach().clone(), None if self.delta.grad is None else self.delta.grad.clone()
        super()._apply(fn, recurse)
        want = ops.acc_dtype(self.theta.dtype)
        if self.delta.dtype != want:
            self.delta.data = delta.to(device=self.delta.device, dtype=want)
            if grad is not None:
                self.delta.grad = grad.to(device=self.delta.device, dtype=want)
        return self

    # ------------------------------------------------------------------ the weight
    def effective_values(self, delta: Optional[Tensor] = None) -> Tensor:
        """Values of ``theta + delta`` over the pattern, in the layer's dtype."""
        return _theta_plus_delta(self.theta, self.delta_slots, self.delta if delta is None else delta)

    def merged(self) -> CSRWeight:
        """``theta + delta`` as a CSR weight with exactly the layer's budget of non-zeros."""
        return CSRWeight(self.crow.clone(), self.col.clone(), self.effective_values(),
                         (self.out_features, self.in_features))

    def to_dense(self) -> Tensor:
        return self.merged().to_dense()

    def dense_weight(self, delta: Optional[Tensor] = None) -> Tensor:
        """theta + delta as a dense (out, in) matrix in the layer's dtype."""
        return dense_weight(self, delta)

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
        dtype = _compute_dtype(x, self.theta.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)
        fn = MaskedDenseFn if self.dense_compute else _SEFTLinearFn
        return fn.apply(x.to(dtype), self.delta, bias, self)

    @property
    def grow_inactive(self) -> bool:
        return self.method == "seft"

    def feed_window(self, x2: Tensor, dy2: Tensor) -> Optional[Tensor]:
        """The backward hook: while the evolution window is open (and finite), one backward
        pass (X (T, in), dY (T, out)) goes into it and the delta's gradient comes back;
        otherwise None."""
        w = self.window
        if w.collecting and w.finite:
            return w.accumulate(self, x2, dy2)
        return None

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


def frozen_bias(who: str, bias: Optional[Tensor], out_features: int, dtype: torch.dtype) -> Optional[nn.Parameter]:
    """A copy of ``bias`` as a frozen Parameter (None stays None); it must be (out,) of ``dtype``."""
    if bias is None:
        return None
    bias = bias.detach()
    if bias.shape != (out_features,) or bias.dtype != dtype:
        raise ValueError(f"{who}: bias must be ({out_features},) {dtype}, got {tuple(bias.shape)} {bias.dtype}")
    return nn.Parameter(bias.clone(), requires_grad=False)


def _theta_plus_delta(theta: Tensor, slots: Tensor, delta: Tensor) -> Tensor:
    """theta with the delta added at its slots (summed in the delta's dtype), in theta's dtype."""
    delta = delta.detach()
    return torch.index_add(theta.to(delta.dtype), 0, slots, delta).to(theta.dtype)


def _check_nm(base: CSRWeight, n: int, m: int) -> None:
    try:
        ops.csr_check_nm(base.crow, base.col, base.shape[1], n, m)
    except ValueError as e:
        raise ValueError(f"SEFTLinear: {e}") from None


def _compute_dtype(x: Tensor, layer_dtype: torch.dtype) -> torch.dtype:
    """The dtype a forward computes in: autocast's where it is on for x's device (as for
    nn.Linear), else the layer's, which x must have."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        if dtype in (torch.bfloat16, torch.float16, torch.float32):
            return dtype
    if x.dtype != layer_dtype:
        raise ValueError(f"SEFTLinear: x has dtype {x.dtype} but the layer is {layer_dtype} (cast x, or run under "
                         "torch.autocast)")
    return layer_dtype
