"""SEFTBlockLinear: SEFT with an r x c block as the unit; the weight is in BSR form.

Data layout (SEFTLinear's, on the grid of blocks):
  crow, col    the block pattern of W = theta + delta (block-row offsets, block columns):
               exactly the layer's block budget;
  theta        [nblocks, r, c] frozen base blocks in the layer's dtype; all zero where a block
               pruned in the base is active only through the delta;
  delta_slots  int64 [k], strictly increasing indices of the delta's blocks in the pattern;
  delta        the trainable Parameter [k, r, c], float32 (float64 for float64 layers).
Entries beyond out / in (the padding of the last block row / column) are and stay 0.

Forward: ``bsr_spmm`` with theta + delta; backward: ``bsr_spmm_t`` for dX and ``bsr_sddmm``
over the delta's blocks. Evolution is SEFTLinear's on the block grid: the window tracks blocks
(the first pass scores each block by the norm of its gradient block) and sums their r x c
gradients; the decision is ``csr_drop_grow_adapt_`` run on the grid with block scores
(:func:`grid_scores`): drop by ``||delta||``, grow by ``||sum g||``, adapt by ``sum |theta * sum g|``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .bsr import BSRWeight, _cdiv
from .config import METHODS, SEFTConfig
from .prune import magnitude_mask
from .seft_linear import SEFTLinear, _compute_dtype, frozen_bias
from .window import EvolutionWindow

BLOCK_BUDGETS = ("layer", "row")
SCAN_TILE_BYTES = 1 << 20  # bytes of the gradient G one scan tile holds


class _SEFTBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, bias, layer):
        values = layer.effective_values(delta).to(x.dtype)  # x.dtype: the layer's, or autocast's
        y = ops.bsr_spmm(x, layer.crow, layer.col, values, layer.out_features, bias)
        # the pattern is saved too: an evolution step before backward makes it refuse (stale)
        ctx.save_for_backward(x, values, layer.crow, layer.col, layer.delta_slots)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values, crow, col, slots = ctx.saved_tensors
        layer = ctx.layer
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = ops.bsr_spmm_t(dy, crow, col, values, x.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        gd = layer.feed_window(x2, dy2)  # while a window is open: one SDDMM for both
        if gd is None and ctx.needs_input_grad[1]:
            gd = ops.bsr_sddmm(dy2, x2, crow, col, *layer.block, slots)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = dy2.sum(0)
        return gx, gd, gb, None


class SEFTBlockLinear(SEFTLinear):
    """``y = x (theta + delta)^T + b`` with W in r x c blocks: frozen base blocks, a trainable
    delta of ``k`` whole blocks that may sit on blocks pruned in the base.

    Build it with :meth:`from_linear` or from a :class:`BSRWeight`. ``budget``: ``layer`` (the
    layer keeps its block count) or ``row`` (each block row keeps its own). ``SEFTController``
    evolves it like a :class:`SEFTLinear`.
    """

    def __init__(self, base: BSRWeight, k: int, bias: Optional[Tensor] = None, budget: str = "layer",
                 method: str = "seft", seed: int = 0):
        nn.Module.__init__(self)  # SEFTLinear's own __init__ builds a CSR layer
        if not isinstance(base, BSRWeight):
            raise TypeError(f"SEFTBlockLinear: base must be a BSRWeight, got {type(base).__name__}")
        nb = base.nnz_blocks
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"SEFTBlockLinear: k (delta blocks) must be a positive int, got {k!r}")
        if k > nb:
            raise ValueError(f"SEFTBlockLinear: trainable budget k = {k} blocks exceeds the layer's {nb} blocks "
                             f"({base.shape[0]}x{base.shape[1]} in {base.block} blocks); lower k / density or the "
                             "sparsity")
        if budget not in BLOCK_BUDGETS:
            raise ValueError(f"SEFTBlockLinear: budget must be one of {BLOCK_BUDGETS} ('row': per block row; N:M "
                             f"does not apply to blocks), got {budget!r}")
        if method not in METHODS:
            raise ValueError(f"SEFTBlockLinear: method must be one of {METHODS}, got {method!r}")
        self.out_features, self.in_features = base.shape
        self.block = base.block
        self.budget, self.method = budget, method
        self.nm_n, self.nm_m = 2, 4  # unused with blocks; read by the shared save / checkpoint code
        self.register_buffer("crow", base.crow.clone())
        self.register_buffer("col", base.col.clone())
        self.register_buffer("theta", base.values.detach().clone())
        gen = torch.Generator().manual_seed(seed)
        slots = torch.randperm(nb, generator=gen)[:k].sort().values.to(base.crow.device)
        self.register_buffer("delta_slots", slots)
        self.delta = nn.Parameter(torch.zeros((k, *self.block), dtype=ops.acc_dtype(base.dtype),
                                              device=base.crow.device))
        self.register_parameter("bias", frozen_bias("SEFTBlockLinear", bias, self.out_features, base.dtype))
        self.dense_compute = False  # the masked-dense baseline is CSR only
        self.window = BlockEvolutionWindow()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: SEFTConfig, mask: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None, seed: Optional[int] = None) -> SEFTBlockLinear:
        """Prune ``linear`` to ``config.block`` blocks (``mask``: a block mask or a dense mask
        constant on every block; None: block magnitude at ``config.sparsity`` in ``config.budget``
        scope) and wrap it with a delta of ``config.trainable_blocks_for(out, in)`` blocks."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SEFTBlockLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        if not isinstance(config, SEFTConfig) or config.block is None:
            raise ValueError("SEFTBlockLinear.from_linear: config must be a SEFTConfig with block = (r, c)")
        w = linear.weight.detach()
        if mask is None:
            mask = magnitude_mask(w, config.sparsity, config.budget, block=config.block)
        base = BSRWeight.from_dense(w, config.block, mask, dtype=dtype)
        bias = None if linear.bias is None else linear.bias.detach().to(base.dtype)
        return cls(base, config.trainable_blocks_for(*w.shape), bias, config.budget, config.method,
                   config.seed if seed is None else seed)

    # ------------------------------------------------------------------ the weight
    @property
    def grid_shape(self) -> tuple[int, int]:
        """(block rows, block columns) = (ceil(out / r), ceil(in / c))."""
        return _cdiv(self.out_features, self.block[0]), _cdiv(self.in_features, self.block[1])

    @property
    def k(self) -> int:
        """Delta blocks."""
        return self.delta.shape[0]

    @property
    def nnz(self) -> int:
        """Entries inside the stored blocks (the padding beyond out / in not counted)."""
        r, c = self.block
        rows = (self.out_features - block_rows(self.crow) * r).clamp(max=r)
        cols = (self.in_features - self.col.long() * c).clamp(max=c)
        return int((rows * cols).sum())

    @property
    def nnz_blocks(self) -> int:
        return self.col.numel()

    def merged(self) -> BSRWeight:
        """``theta + delta`` as a BSR weight with exactly the layer's blocks."""
        return BSRWeight(self.crow.clone(), self.col.clone(), self.effective_values(),
                         (self.out_features, self.in_features))

    def dense_weight(self, delta: Optional[Tensor] = None) -> Tensor:
        values = self.effective_values(delta)
        return BSRWeight(self.crow, self.col, values, (self.out_features, self.in_features)).to_dense()

    def slot_positions(self) -> Tensor:
        """Grid positions (block row * block columns + block column) of the delta's blocks."""
        return grid_positions(self.crow, self.col, self.grid_shape[1])[self.delta_slots]

    # ------------------------------------------------------------------ forward / evolution
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SEFTBlockLinear: x must have last dimension in_features = {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if self.dense_compute:
            raise NotImplementedError("SEFTBlockLinear: the masked-dense baseline (dense_compute) is CSR only")
        dtype = _compute_dtype(x, self.theta.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)
        return _SEFTBlockFn.apply(x.to(dtype), self.delta, bias, self)

    @torch.no_grad()
    def evolve_(self, num_drop: int, tracked: Tensor, gsum: Tensor) -> tuple[Tensor, Tensor]:
        """One drop / grow / adapt step on the block grid, in place (see :func:`evolve_blocks_`)."""
        return evolve_blocks_(self, num_drop, tracked, gsum)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"blocks={self.nnz_blocks}, sparsity={self.sparsity:.3f}, k={self.k} blocks, "
                f"budget={self.budget}, method={self.method}, dtype={self.theta.dtype}")


# ---------------------------------------------------------------------- the grid
def block_rows(crow: Tensor) -> Tensor:
    """int64 block row of every block of a pattern."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), counts)


def grid_positions(crow: Tensor, col: Tensor, width: int) -> Tensor:
    """int64 grid position (block row * width + block column) of every block, increasing."""
    return block_rows(crow) * width + col.long()


# ---------------------------------------------------------------------- the window
class BlockEvolutionWindow(EvolutionWindow):
    """An :class:`EvolutionWindow` on the block grid: positions are grid positions, and
    ``gsum`` / ``g2sum`` hold one r x c block per tracked block."""

    @staticmethod
    def _sddmm(layer, dy2: Tensor, x2: Tensor, crow: Tensor, col: Tensor, slots: Optional[Tensor]) -> Tensor:
        return ops.bsr_sddmm(dy2, x2, crow, col, *layer.block, slots)

    def _candidates(self, layer, x2: Tensor, dy2: Tensor) -> tuple[Tensor, int, bool]:
        return scan_blocks(layer, x2, dy2, self.plan)

    @staticmethod
    def _width(layer) -> int:
        return layer.grid_shape[1]


def _sketch(x2: Tensor, dy2: Tensor, size: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """X and dY in ``dtype``, their tokens CountSketched down to ``size`` rows when more (seeded):
    the sketches' dY^T X estimates G without bias."""
    x, dy = x2.to(dtype), dy2.to(dtype)
    t = x.shape[0]
    if size <= 0 or t <= size:
        return x, dy
    gen = torch.Generator().manual_seed(seed)
    bucket = torch.randint(size, (t,), generator=gen).to(x.device)
    sign = (torch.randint(2, (t,), generator=gen) * 2 - 1).to(device=x.device, dtype=dtype)
    xs = x.new_zeros(size, x.shape[1]).index_add_(0, bucket, x * sign[:, None])
    dys = dy.new_zeros(size, dy.shape[1]).index_add_(0, bucket, dy * sign[:, None])
    return xs, dys


def _block_scores(layer, x: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, int]:
    """From G = dY^T X, streamed through tiles of block rows: ``||G_b||`` of every grid block
    [nbr, nbc], ``sum |theta_b * G_b|`` of every stored block [nblocks], and the peak bytes."""
    (r, c), (nbr, nbc) = layer.block, layer.grid_shape
    xp = x.new_zeros(x.shape[0], nbc * c)
    xp[:, :layer.in_features] = x
    dyp = dy.new_zeros(dy.shape[0], nbr * r)
    dyp[:, :layer.out_features] = dy
    score = x.new_empty(nbr, nbc)
    sens = x.new_empty(layer.col.numel())
    brow, bcol, crow = block_rows(layer.crow), layer.col.long(), layer.crow.long().tolist()
    per_tile = max(1, SCAN_TILE_BYTES // (r * nbc * c * x.element_size()))
    for i0 in range(0, nbr, per_tile):
        i1 = min(nbr, i0 + per_tile)
        g = (dyp[:, i0 * r:i1 * r].T @ xp).view(i1 - i0, r, nbc, c)
        score[i0:i1] = torch.linalg.vector_norm(g, dim=(1, 3))
        b0, b1 = crow[i0], crow[i1]
        gb = g[brow[b0:b1] - i0, :, bcol[b0:b1], :]  # [blocks of the tile, r, c]
        sens[b0:b1] = (layer.theta[b0:b1].to(g.dtype) * gb).abs().sum((1, 2))
    tile = min(per_tile, nbr) * r * nbc * c * x.element_size()
    return score, sens, tile + (score.numel() + sens.numel() + xp.numel() + dyp.numel()) * x.element_size()


def _first_in_order(score: Tensor, n: int, descending: bool) -> Tensor:
    """Indices of the n first entries by score (ties: lower index: the inputs are in position order)."""
    return score.argsort(descending=descending, stable=True)[:n]


def scan_blocks(layer, x2: Tensor, dy2: Tensor, plan) -> tuple[Tensor, int, bool]:
    """The window's first pass on the block grid: (tracked grid positions, peak bytes, finite).

    Tracked, outside the delta: the ``plan.num_grow`` blocks with the largest ``||G_b||``
    (stored base-only blocks always, pruned ones when the method grows inactive blocks), and
    as prune candidates the stored base-only blocks with the smallest ``sum |theta_b * G_b|``:
    ``plan.num_prune`` of the layer, or ``ceil(num_prune / block rows)`` of each block row."""
    x, dy = _sketch(x2, dy2, plan.sketch, plan.seed, layer.delta.dtype)
    score, sens, nbytes = _block_scores(layer, x, dy)
    if not (bool(torch.isfinite(score).all()) and bool(torch.isfinite(sens).all())):
        return torch.empty(0, dtype=torch.int64, device=score.device), nbytes, False
    width = layer.grid_shape[1]
    pos = grid_positions(layer.crow, layer.col, width)
    base_only = torch.ones_like(pos, dtype=torch.bool).index_fill_(0, layer.delta_slots, False)
    eligible = torch.full((score.numel(),), layer.grow_inactive, dtype=torch.bool, device=pos.device)
    eligible[pos] = base_only
    cand = eligible.nonzero().flatten()
    grow = cand[_first_in_order(score.flatten()[cand], plan.num_grow, True)]
    free, fsens = pos[base_only], sens[base_only]
    if plan.num_prune <= 0:
        prune = free[:0]
    elif layer.budget == "layer":
        prune = free[_first_in_order(fsens, plan.num_prune, False)]
    else:  # each block row: its ceil(num_prune / block rows) least sensitive
        per_row = math.ceil(plan.num_prune / layer.grid_shape[0])
        by_sens = fsens.argsort(stable=True)
        order = by_sens[(free[by_sens] // width).argsort(stable=True)]  # by row, then sensitivity
        rows = free[order] // width
        first = torch.searchsorted(rows, rows)  # where each row's run starts
        prune = free[order[torch.arange(rows.numel(), device=rows.device) - first < per_row]]
    return torch.unique(torch.cat([grow, prune])), nbytes, True


# ---------------------------------------------------------------------- the decision
def grid_scores(theta: Tensor, slots: Tensor, delta: Tensor, pos: Tensor, tracked: Tensor,
                gsum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The block layer as ``csr_drop_grow_adapt_`` sees it on the grid: (per stored block a
    value standing for theta, per slot ``||delta_b||``, per tracked block ``||sum g_b||``).

    The op drops by ``|delta|``, grows by ``|gsum|``, takes a slot whose theta is 0 for a
    re-activated one, and prunes by ``|theta * gsum|``. So a slot's value is 0 exactly when its
    base block is all zero, and a tracked stored block's value is
    ``sum |theta_b * gsum_b| / ||gsum_b||``: the op's product is then the block sensitivity.
    """
    nb = theta.shape[0]
    g = gsum.double()
    grow = torch.linalg.vector_norm(g.flatten(1), dim=1)
    value = torch.ones(nb, dtype=torch.float64)
    value[slots] = theta[slots].flatten(1).ne(0).any(1).double()
    at = torch.searchsorted(pos, tracked).clamp(max=nb - 1)  # a layer holds at least k >= 1 blocks
    stored = pos[at] == tracked
    sens = (theta[at[stored]].double() * g[stored]).abs().sum((1, 2))
    gs = grow[stored]
    value[at[stored]] = torch.where(gs > 0, sens / gs.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return value, torch.linalg.vector_norm(delta.double().flatten(1), dim=1), grow


def _carry(old_pos: Tensor, values: Tensor, new_pos: Tensor) -> Tensor:
    """Values of the blocks at new_pos: those of the same position before, zeros for new ones."""
    out = values.new_zeros((new_pos.numel(), *values.shape[1:]))
    if old_pos.numel():
        at = torch.searchsorted(old_pos, new_pos).clamp(max=old_pos.numel() - 1)
        kept = old_pos[at] == new_pos
        out[kept] = values[at[kept]]
    return out


def _check_step_args(layer, num_drop, tracked, gsum) -> None:
    def bad(msg):
        raise ValueError(f"evolve_blocks_: {msg}")

    if not isinstance(num_drop, int) or isinstance(num_drop, bool) or not 0 <= num_drop <= layer.k:
        bad(f"num_drop must be an int in [0, k = {layer.k}], got {num_drop!r}")
    if not (isinstance(tracked, Tensor) and tracked.dim() == 1 and tracked.dtype == torch.int64):
        bad(f"tracked must be 1-D int64 grid positions, got {getattr(tracked, 'dtype', type(tracked))}")
    grid = layer.grid_shape[0] * layer.grid_shape[1]
    if tracked.numel() and (int(tracked.min()) < 0 or int(tracked.max()) >= grid
                            or bool((tracked[1:] <= tracked[:-1]).any())):
        bad(f"tracked must be strictly increasing grid positions in [0, {grid}) (out of range or out of order)")
    if not (isinstance(gsum, Tensor) and gsum.is_floating_point()
            and tuple(gsum.shape) == (tracked.numel(), *layer.block)):
        bad(f"gsum must be floating [{tracked.numel()}, {layer.block[0]}, {layer.block[1]}] (one block per "
            f"tracked block), got {getattr(gsum, 'shape', type(gsum))}")


@torch.no_grad()
def evolve_blocks_(layer: SEFTBlockLinear, num_drop: int, tracked: Tensor, gsum: Tensor) -> tuple[Tensor, Tensor]:
    """One drop / grow / adapt step of a block layer, in place: SEFT's rules with a block as the
    unit (csr_drop_grow_adapt_ on the grid, see :func:`grid_scores`). Returns ``(remap, counts)``
    as that op: ``remap[new slot]`` = old slot or -1 (grown, zero); counts = [dropped, grown,
    reactivated, pruned, undropped]. The layer keeps its block count (per block row for ``row``)."""
    _check_step_args(layer, num_drop, tracked, gsum)
    width = layer.grid_shape[1]
    crow, col, slots = (t.detach().cpu().clone() for t in (layer.crow, layer.col, layer.delta_slots))
    theta, delta = layer.theta.detach().cpu(), layer.delta.detach().cpu()
    tracked = tracked.cpu()
    old_pos = grid_positions(crow, col, width)
    value, dnorm, grow = grid_scores(theta, slots, delta, old_pos, tracked, gsum.cpu())
    remap, counts = ops.csr_drop_grow_adapt_(crow, col, value, slots, dnorm, tracked, grow, num_drop, width,
                                            layer.budget, 2, 4, layer.grow_inactive)
    new_theta = _carry(old_pos, theta, grid_positions(crow, col, width))
    new_delta = torch.zeros_like(delta)
    kept = remap >= 0
    new_delta[kept] = delta[remap[kept]]
    for name, t in (("crow", crow), ("col", col), ("theta", new_theta), ("delta_slots", slots)):
        getattr(layer, name).copy_(t)
    layer.delta.detach().copy_(new_delta)
    return remap, counts
