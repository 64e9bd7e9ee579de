"""Typed wrappers, fake kernels and autograd for the ``torch.ops.seft`` operators.

A CSR weight of shape (out, in) is passed as (crow int32 [out + 1], col int16/int32 [nnz],
values [nnz]); see :class:`seft_ext.CSRWeight`.

Gradients: ``csr_spmm`` differentiates to x (``csr_spmm_t``), values (``csr_sddmm``) and
bias; ``csr_spmm_t`` and ``csr_sddmm`` are differentiable too (so double backward works).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _lib


def csr_spmm(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``Y = X W^T (+ bias)`` for x of shape (..., in); returns (..., out) in x's dtype."""
    _lib.require_library()
    return torch.ops.seft.csr_spmm(x, crow, col, values, bias)


def csr_spmm_t(grad_out: Tensor, crow: Tensor, col: Tensor, values: Tensor, in_features: int) -> Tensor:
    """``dX = dY W`` for grad_out of shape (..., out); returns (..., in_features). Deterministic."""
    _lib.require_library()
    return torch.ops.seft.csr_spmm_t(grad_out, crow, col, values, in_features)


def csr_sddmm(grad_out: Tensor, x: Tensor, crow: Tensor, col: Tensor, slots: Optional[Tensor] = None) -> Tensor:
    """Value gradients ``g[s] = sum_t dY[t, row(p)] * X[t, col(p)]``, ``p = slots[s]``.

    ``slots`` (int64, strictly increasing) selects non-zeros; None means all of them. The
    result is float64 for float64 inputs and float32 otherwise (the accumulation dtype).
    """
    _lib.require_library()
    return torch.ops.seft.csr_sddmm(grad_out, x, crow, col, slots)


def cpu_isa(choose: str = "") -> str:
    """The CPU kernel set in use ("avx512", "avx2" or "base"); pass one of them, or "auto" (the
    best this CPU runs), to switch."""
    _lib.require_library()
    return torch.ops.seft.cpu_isa(choose)


def cpu_cache(enable: Optional[bool] = None, *, limit_bytes: Optional[int] = None, empty: bool = False) -> dict:
    """The caching CPU allocator for blocks of 256 KiB and more (process-wide; off by default).

    On, freed CPU tensors of that size are kept and handed to later allocations of the same size
    class (up to 1/8 larger), so a training loop whose steps allocate the same shapes reuses the
    same pages instead of faulting in fresh ones. What it keeps is bounded twice: by
    ``limit_bytes`` (4 GiB by default), and so that the bytes in use plus the bytes kept never
    exceed the most ever in use at once since the last empty (the least recently freed blocks
    go first): the cache does not raise the process's peak. ``enable=False`` frees what it
    holds and passes allocations through to torch's allocator again; ``empty=True`` frees what
    it holds and restarts the high-water mark (between phases whose shapes differ). Returns the
    state: ``enabled``, ``limit_bytes``, ``cached_bytes``, ``cached_blocks``, ``hits``,
    ``misses``, ``in_use_bytes``, ``peak_in_use_bytes``. ``seft run`` turns it on; see
    docs/performance.md."""
    _lib.require_library()
    if enable is not None and not isinstance(enable, bool):
        raise TypeError(f"cpu_cache: enable must be True, False or None, got {enable!r}")
    if limit_bytes is not None and (isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int)
                                    or limit_bytes < 0):
        raise ValueError(f"cpu_cache: limit_bytes must be an int >= 0, got {limit_bytes!r}")
    r = torch.ops.seft.cpu_cache(-1 if enable is None else int(enable),
                                 -1 if limit_bytes is None else limit_bytes, bool(empty))
    state = dict(zip(("enabled", "limit_bytes", "cached_bytes", "cached_blocks", "hits", "misses", "in_use_bytes",
                      "peak_in_use_bytes"), r))
    state["enabled"] = bool(state["enabled"])
    return state


def cuda_path(choose: str = "") -> str:
    """Which CUDA kernels run: "auto" (tensor cores for bf16 / fp16 from 64 tokens, CUDA cores
    otherwise), or forced "tensor_core" / "cuda_core" (process-wide); "" reads the setting."""
    _lib.require_library()
    return torch.ops.seft.cuda_path(choose)


def csr_tile_ptr(crow: Tensor, col: Tensor, in_features: int, tile: int = 128) -> Tensor:
    """W's column-tile index, int32 [out, ceil(in / tile) + 1]: row o's non-zeros in columns
    [j * tile, (j + 1) * tile) are ``[tp[o, j], tp[o, j + 1])``. The CUDA ``csr_spmm_t`` and
    ``csr_sddmm`` use it (tile 128, cached per pattern) instead of a transposed copy of W."""
    _lib.require_library()
    return torch.ops.seft.csr_tile_ptr(crow, col, in_features, tile)


def adopt_pattern(crow: Tensor, col: Tensor, in_features: int, crow_host: Tensor, col_host: Tensor,
                  slots: Optional[Tensor] = None, slots_host: Optional[Tensor] = None) -> None:
    """Internal (the controller's, after an evolution step on a GPU): ``crow`` / ``col`` (and
    ``slots``) have just been filled from the host copies on the current stream; checks the host
    copies and records the device tensors as checked, so the next op call needs no sync."""
    _lib.require_library()
    torch.ops.seft._csr_adopt_pattern(crow, col, in_features, crow_host, col_host, slots, slots_host)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_device(op: str, **tensors: Optional[Tensor]) -> None:
    # The fake (Meta) kernels also run when only one argument is on "meta": they must
    # reject mixed devices as the real kernels do.
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise RuntimeError(f"{op}: all tensors must be on one device, got "
                           + ", ".join(f"{k} on {v}" for k, v in devices.items()))


if _lib.load_error is None:

    @torch.library.register_fake("seft::csr_spmm")
    def _csr_spmm_fake(x, crow, col, values, bias=None):
        _same_device("csr_spmm", x=x, crow=crow, col=col, values=values, bias=bias)
        torch._check(x.dtype == values.dtype, lambda: "csr_spmm: x and values must have the same dtype")
        torch._check(crow.dim() == 1 and col.dim() == 1, lambda: "csr_spmm: crow and col must be 1-D")
        return x.new_empty((*x.shape[:-1], crow.shape[0] - 1))

    @torch.library.register_fake("seft::csr_spmm_t")
    def _csr_spmm_t_fake(grad_out, crow, col, values, in_features):
        _same_device("csr_spmm_t", grad_out=grad_out, crow=crow, col=col, values=values)
        torch._check(grad_out.dtype == values.dtype, lambda: "csr_spmm_t: grad_out and values dtypes differ")
        return grad_out.new_empty((*grad_out.shape[:-1], in_features))

    @torch.library.register_fake("seft::_csr_adopt_pattern")
    def _csr_adopt_pattern_fake(crow, col, in_features, crow_host, col_host, slots=None, slots_host=None):
        return None

    @torch.library.register_fake("seft::csr_tile_ptr")
    def _csr_tile_ptr_fake(crow, col, in_features, tile=128):
        _same_device("csr_tile_ptr", crow=crow, col=col)
        return crow.new_empty((crow.shape[0] - 1, (in_features + tile - 1) // tile + 1))

    @torch.library.register_fake("seft::csr_sddmm")
    def _csr_sddmm_fake(grad_out, x, crow, col, slots=None):
        _same_device("csr_sddmm", grad_out=grad_out, x=x, crow=crow, col=col, slots=slots)
        n = col.shape[0] if slots is None else slots.shape[0]
        return x.new_empty((n,), dtype=acc_dtype(x.dtype))

    # csr_spmm: y = x W^T + b
    def _spmm_setup(ctx, inputs, output):
        x, crow, col, values, bias = inputs
        ctx.save_for_backward(x, crow, col, values)
        ctx.has_bias = bias is not None

    def _spmm_backward(ctx, grad):
        x, crow, col, values = ctx.saved_tensors
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.seft.csr_spmm_t(grad, crow, col, values, x.shape[-1])
        if ctx.needs_input_grad[3]:
            gv = torch.ops.seft.csr_sddmm(grad, x, crow, col, None).to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, None, None, gv, gb

    torch.library.register_autograd("seft::csr_spmm", _spmm_backward, setup_context=_spmm_setup)

    # csr_spmm_t: dx = dy W
    def _spmm_t_setup(ctx, inputs, output):
        grad_out, crow, col, values, _ = inputs
        ctx.save_for_backward(grad_out, crow, col, values)

    def _spmm_t_backward(ctx, gg):
        grad_out, crow, col, values = ctx.saved_tensors
        g_dy = g_v = None
        if ctx.needs_input_grad[0]:
            g_dy = torch.ops.seft.csr_spmm(gg, crow, col, values, None)
        if ctx.needs_input_grad[3]:
            g_v = torch.ops.seft.csr_sddmm(grad_out, gg, crow, col, None).to(values.dtype)
        return g_dy, None, None, g_v, None

    torch.library.register_autograd("seft::csr_spmm_t", _spmm_t_backward, setup_context=_spmm_t_setup)

    # csr_sddmm: g[s] = <dy[:, row(p)], x[:, col(p)]>
    def _sddmm_setup(ctx, inputs, output):
        grad_out, x, crow, col, slots = inputs
        ctx.save_for_backward(grad_out, x, crow, col, slots)

    def _sddmm_backward(ctx, gg):
        grad_out, x, crow, col, slots = ctx.saved_tensors
        full = gg.to(x.dtype)
        if slots is not None:
            full = x.new_zeros(col.shape[0]).index_copy(0, slots, full)
        g_dy = g_x = None
        if ctx.needs_input_grad[0]:
            g_dy = torch.ops.seft.csr_spmm(x, crow, col, full, None)
        if ctx.needs_input_grad[1]:
            g_x = torch.ops.seft.csr_spmm_t(grad_out, crow, col, full, x.shape[-1])
        return g_dy, g_x, None, None, None

    torch.library.register_autograd("seft::csr_sddmm", _sddmm_backward, setup_context=_sddmm_setup)


# ---------------------------------------------------------------- BSR ops
# A BSR weight of shape (out, in) in r x c blocks is (crow int32 [ceil(out / r) + 1], col int16 /
# int32 block columns [nblocks], values [nblocks, r, c]); see :class:`seft_ext.BSRWeight`.
def bsr_spmm(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, out_features: int,
             bias: Optional[Tensor] = None) -> Tensor:
    """``Y = X W^T (+ bias)`` with W in blocks, x (..., in); returns (..., out_features) in x's dtype."""
    _lib.require_library()
    return torch.ops.seft.bsr_spmm(x, crow, col, values, out_features, bias)


def bsr_spmm_t(grad_out: Tensor, crow: Tensor, col: Tensor, values: Tensor, in_features: int) -> Tensor:
    """``dX = dY W`` with W in blocks, grad_out (..., out); returns (..., in_features). Deterministic."""
    _lib.require_library()
    return torch.ops.seft.bsr_spmm_t(grad_out, crow, col, values, in_features)


def bsr_sddmm(grad_out: Tensor, x: Tensor, crow: Tensor, col: Tensor, r: int, c: int,
              slots: Optional[Tensor] = None) -> Tensor:
    """The gradient of the blocks, ``[n, r, c]``: ``g[s, i, j] = sum_t dY[t, br * r + i] X[t, bc * c + j]``
    for block ``slots[s]`` (every block when None; int64, strictly increasing). float64 for float64
    inputs, float32 otherwise; entries in the padding (beyond out / in) are 0."""
    _lib.require_library()
    return torch.ops.seft.bsr_sddmm(grad_out, x, crow, col, r, c, slots)


if _lib.load_error is None:

    @torch.library.register_fake("seft::bsr_spmm")
    def _bsr_spmm_fake(x, crow, col, values, out_features, bias=None):
        _same_device("bsr_spmm", x=x, crow=crow, col=col, values=values, bias=bias)
        torch._check(x.dtype == values.dtype, lambda: "bsr_spmm: x and values must have the same dtype")
        torch._check(values.dim() == 3, lambda: "bsr_spmm: values must be 3-D [nblocks, r, c]")
        torch._check(crow.dim() == 1 and col.dim() == 1, lambda: "bsr_spmm: crow and col must be 1-D")
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("seft::bsr_spmm_t")
    def _bsr_spmm_t_fake(grad_out, crow, col, values, in_features):
        _same_device("bsr_spmm_t", grad_out=grad_out, crow=crow, col=col, values=values)
        torch._check(grad_out.dtype == values.dtype, lambda: "bsr_spmm_t: grad_out and values dtypes differ")
        torch._check(values.dim() == 3, lambda: "bsr_spmm_t: values must be 3-D [nblocks, r, c]")
        return grad_out.new_empty((*grad_out.shape[:-1], in_features))

    @torch.library.register_fake("seft::bsr_sddmm")
    def _bsr_sddmm_fake(grad_out, x, crow, col, r, c, slots=None):
        _same_device("bsr_sddmm", grad_out=grad_out, x=x, crow=crow, col=col, slots=slots)
        n = col.shape[0] if slots is None else slots.shape[0]
        return x.new_empty((n, r, c), dtype=acc_dtype(x.dtype))

    # bsr_spmm: y = x W^T + b
    def _bsr_spmm_setup(ctx, inputs, output):
        x, crow, col, values, out_features, bias = inputs
        ctx.save_for_backward(x, crow, col, values)
        ctx.has_bias = bias is not None

    def _bsr_spmm_backward(ctx, grad):
        x, crow, col, values = ctx.saved_tensors
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.seft.bsr_spmm_t(grad, crow, col, values, x.shape[-1])
        if ctx.needs_input_grad[3]:
            gv = torch.ops.seft.bsr_sddmm(grad, x, crow, col, values.shape[1], values.shape[2],
                                          None).to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, None, None, gv, None, gb

    torch.library.register_autograd("seft::bsr_spmm", _bsr_spmm_backward, setup_context=_bsr_spmm_setup)

    # bsr_spmm_t: dx = dy W
    def _bsr_spmm_t_setup(ctx, inputs, output):
        grad_out, crow, col, values, _ = inputs
        ctx.save_for_backward(grad_out, crow, col, values)

    def _bsr_spmm_t_backward(ctx, gg):
        grad_out, crow, col, values = ctx.saved_tensors
        g_dy = g_v = None
        if ctx.needs_input_grad[0]:
            g_dy = torch.ops.seft.bsr_spmm(gg, crow, col, values, grad_out.shape[-1], None)
        if ctx.needs_input_grad[3]:
            g_v = torch.ops.seft.bsr_sddmm(grad_out, gg, crow, col, values.shape[1], values.shape[2],
                                           None).to(values.dtype)
        return g_dy, None, None, g_v, None

    torch.library.register_autograd("seft::bsr_spmm_t", _bsr_spmm_t_backward, setup_context=_bsr_spmm_t_setup)

    # bsr_sddmm: g[s] = (dY^T X) on block slots[s]
    def _bsr_sddmm_setup(ctx, inputs, output):
        grad_out, x, crow, col, r, c, slots = inputs
        ctx.save_for_backward(grad_out, x, crow, col, slots)
        ctx.block = (r, c)

    def _bsr_sddmm_backward(ctx, gg):
        grad_out, x, crow, col, slots = ctx.saved_tensors
        r, c = ctx.block
        full = gg.to(x.dtype)
        if slots is not None:
            full = x.new_zeros((col.shape[0], r, c)).index_copy(0, slots, full)
        g_dy = g_x = None
        if ctx.needs_input_grad[0]:
            g_dy = torch.ops.seft.bsr_spmm(x, crow, col, full, grad_out.shape[-1], None)
        if ctx.needs_input_grad[1]:
            g_x = torch.ops.seft.bsr_spmm_t(grad_out, crow, col, full, x.shape[-1])
        return g_dy, g_x, None, None, None, None, None

    torch.library.register_autograd("seft::bsr_sddmm", _bsr_sddmm_backward, setup_context=_bsr_sddmm_setup)


# ---------------------------------------------------------------- evolution ops
def csr_grow_scan(grad_out: Tensor, x: Tensor, crow: Tensor, col: Tensor, theta: Tensor, delta_slots: Tensor,
                  num_grow: int, num_prune: int, budget: str = "layer", nm_n: int = 2, nm_m: int = 4,
                  grow_inactive: bool = True, sketch: int = 0, seed: int = 0) -> tuple[Tensor, Tensor, int, bool]:
    """The first step of an evolution window for one layer.

    Streams ``G = dY^T X`` through row tiles and returns ``(tracked, g, workspace_bytes,
    finite)``: the sorted flat positions (row * in + col) outside the delta that the window
    will follow (the ``num_grow`` largest ``|G|``, and prune candidates with the smallest
    ``|theta * G|``: ``num_prune`` per layer, ``ceil(num_prune / out)`` per row, or one swap
    partner per N:M group of an inactive candidate), G at them, the bytes the op held at its
    peak, and False (with nothing tracked) when G had NaN or Inf.

    ``sketch > 0`` estimates G from CountSketches of the tokens down to ``sketch`` rows
    (seeded by ``seed``; the GEMM then costs ``sketch / tokens`` of the exact one) and ``g``
    is that estimate: use ``csr_sddmm`` at the tracked positions for exact values.

    On CUDA the scan is always exact (``sketch`` is not used): one cuBLAS GEMM per row tile
    and topk selections (``csr_grow_scan_tiled``), or the CPU kernel for the nm budget.
    """
    _lib.require_library()
    return torch.ops.seft.csr_grow_scan(grad_out, x, crow, col, theta, delta_slots, num_grow, num_prune, budget,
                                        nm_n, nm_m, grow_inactive, sketch, seed)


def csr_drop_grow_adapt_(crow: Tensor, col: Tensor, theta: Tensor, delta_slots: Tensor, delta: Tensor,
                         tracked: Tensor, gsum: Tensor, num_drop: int, in_features: int, budget: str = "layer",
                         nm_n: int = 2, nm_m: int = 4, grow_inactive: bool = True) -> tuple[Tensor, Tensor]:
    """One drop / grow / adapt step, in place on (crow, col, theta, delta_slots, delta) (CPU).

    Drops the ``num_drop`` smallest ``|delta|``, grows as many at tracked positions with the
    largest ``|gsum|`` (inactive ones only by swapping out a base-only weight of the same budget
    unit), prunes the swapped-out weights with the smallest ``|theta * gsum|``; every unit keeps
    its non-zero count. Returns ``(remap, counts)``: ``remap[new_slot]`` is the old slot or -1
    for a grown one (value 0); counts = [dropped, grown, reactivated, pruned, undropped].
    The full rules are in cpp/cpu/csr_drop_grow_adapt_cpu.cpp. CUDA tensors make one round
    trip to the host, where the same CPU kernel decides.
    """
    _lib.require_library()
    return torch.ops.seft.csr_drop_grow_adapt_(crow, col, theta, delta_slots, delta, tracked, gsum, num_drop,
                                               in_features, budget, nm_n, nm_m, grow_inactive)


def csr_slot_union(crow: Tensor, col: Tensor, slots: Tensor, positions: Tensor,
                   in_features: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The CSR pattern of the slots' positions and ``positions`` (sorted, disjoint from them),
    merged. Returns ``(crow, col, at_slots, at_positions)``: the pattern and where each slot /
    position landed in it. CUDA tensors are merged on the host (once per evolution window)."""
    _lib.require_library()
    return torch.ops.seft.csr_slot_union(crow, col, slots, positions, in_features)


def csr_check_nm(crow: Tensor, col: Tensor, in_features: int, n: int, m: int) -> None:
    """Raises ValueError unless the CSR pattern is N:M: every group of ``m`` consecutive inputs
    of every row holds exactly ``n`` non-zeros ("the base is not N:M: row R, group G has C
    non-zeros"), or when ``1 <= n <= m`` fails or ``m`` does not divide ``in_features``. CUDA
    patterns are checked on host copies."""
    _lib.require_library()
    torch.ops.seft.csr_check_nm(crow, col, in_features, n, m)


if _lib.load_error is None:

    @torch.library.register_fake("seft::csr_slot_union")
    def _csr_slot_union_fake(crow, col, slots, positions, in_features):
        _same_device("csr_slot_union", crow=crow, col=col, slots=slots, positions=positions)
        n = slots.shape[0] + positions.shape[0]
        return crow.new_empty(crow.shape), col.new_empty((n,)), slots.new_empty(slots.shape), \
            positions.new_empty(positions.shape)

    @torch.library.register_fake("seft::csr_check_nm")
    def _csr_check_nm_fake(crow, col, in_features, n, m):
        _same_device("csr_check_nm", crow=crow, col=col)
        return None

    @torch.library.register_fake("seft::csr_grow_scan")
    def _csr_grow_scan_fake(grad_out, x, crow, col, theta, delta_slots, num_grow, num_prune, budget="layer",
                            nm_n=2, nm_m=4, grow_inactive=True, sketch=0, seed=0):
        _same_device("csr_grow_scan", grad_out=grad_out, x=x, crow=crow, col=col, theta=theta,
                     delta_slots=delta_slots)
        n = torch.library.get_ctx().new_dynamic_size()
        return (x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=acc_dtype(x.dtype)), 0, True)

    @torch.library.register_fake("seft::csr_grow_scan_tiled")
    def _csr_grow_scan_tiled_fake(grad_out, x, crow, col, theta, delta_slots, num_grow, num_prune, budget="layer",
                                  grow_inactive=True, tile_bytes=1 << 20):
        _same_device("csr_grow_scan_tiled", grad_out=grad_out, x=x, crow=crow, col=col, theta=theta,
                     delta_slots=delta_slots)
        n = torch.library.get_ctx().new_dynamic_size()
        return (x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=acc_dtype(x.dtype)), 0, True)

    @torch.library.register_fake("seft::csr_drop_grow_adapt_")
    def _csr_drop_grow_adapt_fake(crow, col, theta, delta_slots, delta, tracked, gsum, num_drop, in_features,
                                  budget="layer", nm_n=2, nm_m=4, grow_inactive=True):
        _same_device("csr_drop_grow_adapt_", crow=crow, col=col, theta=theta, delta_slots=delta_slots,
                     delta=delta, tracked=tracked, gsum=gsum)
        return delta_slots.new_empty(delta_slots.shape), delta_slots.new_empty((5,))
