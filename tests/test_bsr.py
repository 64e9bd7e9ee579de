"""BSR storage (BSRWeight) and the bsr_spmm / bsr_spmm_t / bsr_sddmm ops on every device present
(the CPU's instruction sets; CUDA's auto, tensor_core and cuda_core paths: tests/cuda_env.py),
against dense fp64 math (tests/reference.py, one tolerance table); the tensor-core block shapes
across tile edges, bad input (the same messages on every device), gradients, opcheck,
torch.compile, determinism, SparseLinear with blocks. The CUDA-only cases (launch-grid limits,
no synchronisation) are skipped without CUDA."""
import re

import pytest
import torch

import seft_ext
from seft_ext import BSRWeight, SparseLinear, ops
from cuda_env import CPU_ISAS, requires_cuda
from reference import DenseBSR, assert_matches, random_bsr

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
IDX = [torch.int16, torch.int32]
BLOCKS = [(4, 4), (8, 8), (16, 16), (3, 5), (1, 1)]
# (out, in, block density): not multiples of any block; a single entry; fewer columns than a
# block; empty / full block rows (random_bsr); every block present.
SHAPES = [(37, 53, 0.4), (1, 1, 1.0), (5, 3, 1.0), (70, 129, 0.3), (48, 32, 0.0)]
LEADS = [(), (0,), (1,), (17,), (2, 3), (130,)]


def dname(dtype):
    return str(dtype).removeprefix("torch.")


def _id(v):
    return "x".join(str(a) for a in v)


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("block", BLOCKS, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_ops_match_dense(kernel, dtype, block, shape):
    """All three ops, with and without bias / slots, int16 and int32 block columns, every leading shape."""
    out, inn, density = shape
    for idx in IDX:
        w = random_bsr(out, inn, block, density, dtype, index=idx)
        ref, (r, c), W = DenseBSR(w), block, w.to(kernel)
        bias = torch.randn(out).to(dtype)
        slots = torch.nonzero(torch.rand(w.nnz_blocks) < 0.5).flatten()
        B, S = _to(kernel, bias, slots)
        for lead in LEADS:
            x = torch.randn(*lead, inn).to(dtype)
            dy = torch.randn(*lead, out).to(dtype)
            X, DY = _to(kernel, x, dy)
            tag = f"{dname(idx)} lead {lead}"
            y = ops.bsr_spmm(X, W.crow, W.col, W.values, out)
            assert y.device.type == kernel and y.dtype == dtype and y.shape == (*lead, out), tag
            assert_matches(y, ref.spmm(x), dtype, f"bsr_spmm {tag}")
            assert_matches(ops.bsr_spmm(X, W.crow, W.col, W.values, out, B), ref.spmm(x, bias), dtype,
                           f"bsr_spmm + bias {tag}")
            dx = ops.bsr_spmm_t(DY, W.crow, W.col, W.values, inn)
            assert dx.device.type == kernel and dx.dtype == dtype and dx.shape == (*lead, inn), tag
            assert_matches(dx, ref.spmm_t(dy), dtype, f"bsr_spmm_t {tag}")
            g = ops.bsr_sddmm(DY, X, W.crow, W.col, r, c)
            assert g.device.type == kernel and g.dtype == ops.acc_dtype(dtype), tag
            assert g.shape == (w.nnz_blocks, r, c), tag
            assert_matches(g, ref.sddmm(dy, x), ops.acc_dtype(dtype), f"bsr_sddmm {tag}")
            gs = ops.bsr_sddmm(DY, X, W.crow, W.col, r, c, S)
            assert gs.shape == (slots.numel(), r, c), tag
            assert_matches(gs, ref.sddmm(dy, x, slots), ops.acc_dtype(dtype), f"bsr_sddmm slots {tag}")


# Block shapes of the CUDA tensor-core kernels (sides multiples of 16: bands of 16, 32 and 64 rows
# or columns, several bands per block) on tokens across their 128-token tiles and 32-token slices,
# shapes that are multiples of neither the block nor the tiles; every op twice (bitwise the same).
TC_BLOCKS = [(16, 16), (32, 32), (16, 48), (64, 16), (48, 128)]
TC_CASES = [(100, 200, 0.5, 64), (70, 129, 0.6, 130), (150, 300, 0.3, 257)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dname)
@pytest.mark.parametrize("block", TC_BLOCKS, ids=_id)
def test_tensor_core_blocks(kernel, dtype, block):
    r, c = block
    for out, inn, density, T in TC_CASES:
        w = random_bsr(out, inn, block, density, dtype, index=torch.int16 if T % 2 else torch.int32)
        ref, W = DenseBSR(w), w.to(kernel)
        x, dy, bias = torch.randn(T, inn).to(dtype), torch.randn(T, out).to(dtype), torch.randn(out).to(dtype)
        slots = torch.arange(1, w.nnz_blocks, 2)
        X, DY, B, S = _to(kernel, x, dy, bias, slots)
        tag = f"{out}x{inn} T={T}"
        results = []
        for _ in range(2):
            results.append((ops.bsr_spmm(X, W.crow, W.col, W.values, out, B),
                            ops.bsr_spmm_t(DY, W.crow, W.col, W.values, inn),
                            ops.bsr_sddmm(DY, X, W.crow, W.col, r, c), ops.bsr_sddmm(DY, X, W.crow, W.col, r, c, S)))
        y, dx, g, gs = results[0]
        assert_matches(y, ref.spmm(x, bias), dtype, f"bsr_spmm {tag}")
        assert_matches(dx, ref.spmm_t(dy), dtype, f"bsr_spmm_t {tag}")
        g_ref = ref.sddmm(dy, x)
        assert_matches(g, g_ref, ops.acc_dtype(dtype), f"bsr_sddmm {tag}")
        assert_matches(gs, g_ref[slots], ops.acc_dtype(dtype), f"bsr_sddmm slots {tag}")
        for a, b in zip(results[0], results[1]):
            assert torch.equal(a, b), tag


# (out, in, block, tokens, density, dtype): a layer-sized weight, more than 65,535 thread blocks
# for bsr_sddmm's CUDA-core kernel (a grid-stride loop; test_token_tiles_past_the_grid_limit
# covers the others); inputs and the fp64 reference on the GPU. No full block row
# (empty_rows=False): the small cases cover empty and full rows.
LARGE = [(4096, 4096, (16, 16), 160, 0.3, torch.bfloat16), (4096, 4096, (16, 16), 160, 0.3, torch.float32),
         (4096, 4096, (4, 4), 160, 0.3, torch.bfloat16)]


@pytest.mark.parametrize("dtype, case", [(c[5], c) for c in LARGE],
                         ids=[f"{c[0]}x{c[1]}-{_id(c[2])}-T{c[3]}-{dname(c[5])}" for c in LARGE])
def test_large_grids(cuda_kernel, dtype, case):
    out, inn, block, T, density, _ = case
    dev, (r, c) = cuda_kernel, block
    w = random_bsr(out, inn, block, density, dtype, empty_rows=False, device=dev)
    x, dy, bias = (torch.randn(T, inn, device=dev).to(dtype), torch.randn(T, out, device=dev).to(dtype),
                   torch.randn(out, device=dev).to(dtype))
    slots = torch.nonzero(torch.rand(w.nnz_blocks, device=dev) < 0.3).flatten()
    ref = DenseBSR(w)
    y = ops.bsr_spmm(x, w.crow, w.col, w.values, out, bias)
    assert_matches(y, ref.spmm(x, bias), dtype, "bsr_spmm")
    dx = ops.bsr_spmm_t(dy, w.crow, w.col, w.values, inn)
    assert_matches(dx, ref.spmm_t(dy), dtype, "bsr_spmm_t")
    g = ops.bsr_sddmm(dy, x, w.crow, w.col, r, c)
    g_ref = ref.sddmm(dy, x)
    assert_matches(g, g_ref, ops.acc_dtype(dtype), "bsr_sddmm")
    assert_matches(ops.bsr_sddmm(dy, x, w.crow, w.col, r, c, slots), g_ref[slots], ops.acc_dtype(dtype),
                   "bsr_sddmm slots")
    assert torch.equal(y, ops.bsr_spmm(x, w.crow, w.col, w.values, out, bias))
    assert torch.equal(dx, ops.bsr_spmm_t(dy, w.crow, w.col, w.values, inn))
    assert torch.equal(g, ops.bsr_sddmm(dy, x, w.crow, w.col, r, c))


def test_token_tiles_past_the_grid_limit(cuda_kernel):
    """More than 65,535 tiles of 128 tokens (the tensor-core kernels loop over the grid's y) and
    more than 65,535 thread blocks for the CUDA-core kernels (grid-stride loops)."""
    dev, T = cuda_kernel, 65535 * 128 + 300
    w = random_bsr(48, 40, (16, 16), 0.6, torch.bfloat16, empty_rows=False, device=dev)
    x, dy = torch.randn(T, 40, device=dev).to(torch.bfloat16), torch.randn(T, 48, device=dev).to(torch.bfloat16)
    ref = DenseBSR(w)
    sel = torch.cat([torch.arange(0, 300), torch.arange(65534 * 128, T)]).to(dev)  # the first and last tiles
    y = ops.bsr_spmm(x, w.crow, w.col, w.values, 48)
    assert_matches(y[sel], ref.spmm(x[sel]), torch.bfloat16, "bsr_spmm")
    dx = ops.bsr_spmm_t(dy, w.crow, w.col, w.values, 40)
    assert_matches(dx[sel], ref.spmm_t(dy[sel]), torch.bfloat16, "bsr_spmm_t")
    g, g_ref = ops.bsr_sddmm(dy, x, w.crow, w.col, 16, 16).double(), ref.sddmm(dy, x)
    assert float((g - g_ref).norm() / g_ref.norm()) < 1e-3  # 8.4 M products per entry: fp32 sums


@pytest.mark.parametrize("block", [(4, 4), (16, 16)], ids=_id)
def test_padding_of_sddmm_is_zero(kernel, block):
    r, c = block
    w = random_bsr(10 * r // 4, 13 * c // 4, block, 1.0, torch.float64, empty_rows=False)
    out, inn = w.shape
    dtype = torch.float64 if kernel == "cpu" else torch.bfloat16  # bf16: the tensor-core path on CUDA
    x, dy = torch.randn(70, inn, dtype=dtype), torch.randn(70, out, dtype=dtype)
    g = ops.bsr_sddmm(*_to(kernel, dy, x, w.crow, w.col), r, c).double().cpu()
    full = torch.zeros(3, 4, r, c, dtype=torch.float64)
    full[w.block_rows(), w.col.long()] = g
    full = full.permute(0, 2, 1, 3).reshape(3 * r, 4 * c)
    assert torch.all(full[out:] == 0) and torch.all(full[:, inn:] == 0) and torch.all(full[:out, :inn] != 0)


def test_int32_block_columns_when_needed(device):
    """ceil(in / c) > 32767 takes int32 block columns; the ops address them."""
    inn = 32768 + 3
    dense = torch.zeros(2, inn, dtype=torch.float64)
    dense[0, -1], dense[1, 0], dense[1, 30000] = 2.0, 3.0, 5.0
    w = BSRWeight.from_dense(dense, (1, 1))
    assert w.col.dtype == torch.int32 and w.nnz_blocks == 3
    x, dy = torch.randn(3, inn, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    W, X, DY = w.to(device), *_to(device, x, dy)
    assert_matches(ops.bsr_spmm(X, W.crow, W.col, W.values, 2), x @ dense.T, torch.float64)
    assert_matches(ops.bsr_spmm_t(DY, W.crow, W.col, W.values, inn), dy @ dense, torch.float64)
    assert_matches(ops.bsr_sddmm(DY, X, W.crow, W.col, 1, 1).flatten(), (dy.T @ x)[dense != 0], torch.float64)
    assert torch.equal(w.to_dense(), dense)
    assert BSRWeight.from_dense(torch.ones(2, inn), (2, 2)).col.dtype == torch.int16  # 16386 block columns


def test_more_block_rows_than_int16(device):
    """More than 32767 block rows: bsr_spmm_t's block-column index holds int32 block rows."""
    out = 32768 + 5
    dense = torch.zeros(out, 3, dtype=torch.float64)
    dense[0, 2], dense[40, 0], dense[32770, 1], dense[-1, 0] = 2.0, 3.0, 5.0, 7.0
    w = BSRWeight.from_dense(dense, (1, 1))
    dy = torch.randn(4, out, dtype=torch.float64)
    W, (DY,) = w.to(device), _to(device, dy)
    assert_matches(ops.bsr_spmm_t(DY, W.crow, W.col, W.values, 3), dy @ dense, torch.float64)


def test_results_independent_of_thread_count():
    """Every BSR op is bitwise the same whatever the thread count (fixed summation orders)."""
    n = torch.get_num_threads()
    try:
        for block in [(16, 16), (3, 5)]:
            w = random_bsr(150, 310, block, 0.3)
            x, dy = torch.randn(45, 310), torch.randn(45, 150)
            results = []
            for threads in [1, 2, 3]:
                torch.set_num_threads(threads)
                results.append((ops.bsr_spmm(x, w.crow, w.col, w.values, 150),
                                ops.bsr_spmm_t(dy, w.crow, w.col, w.values, 310),
                                ops.bsr_sddmm(dy, x, w.crow, w.col, *block)))
            for res in results[1:]:
                for a, b in zip(results[0], res):
                    assert torch.equal(a, b), block
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dname)
@pytest.mark.parametrize("block", [(4, 4), (8, 8), (16, 16), (3, 5)], ids=_id)
def test_every_token_count(kernel, dtype, block):
    """0 to 130 tokens: every remainder of the CPU's token blocks (1 to 3 vectors wide) and token
    groups, and of the CUDA kernels' token groups."""
    out, inn = 45, 83
    w = random_bsr(out, inn, block, 0.5, dtype)
    ref, (r, c), W = DenseBSR(w), block, w.to(kernel)
    bias = torch.randn(out, dtype=dtype)
    (B,) = _to(kernel, bias)
    for T in range(131):
        x, dy = torch.randn(T, inn, dtype=dtype), torch.randn(T, out, dtype=dtype)
        X, DY = _to(kernel, x, dy)
        assert_matches(ops.bsr_spmm(X, W.crow, W.col, W.values, out, B), ref.spmm(x, bias), dtype, f"spmm T {T}")
        assert_matches(ops.bsr_spmm_t(DY, W.crow, W.col, W.values, inn), ref.spmm_t(dy), dtype, f"spmm_t T {T}")
        assert_matches(ops.bsr_sddmm(DY, X, W.crow, W.col, r, c), ref.sddmm(dy, x), dtype, f"sddmm T {T}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dname)
@pytest.mark.parametrize("block", [(13, 7), (7, 13), (12, 2), (6, 9)], ids=_id)
def test_row_tiles_of_every_width(kernel, dtype, block):
    """Block sides of 6 to 13 rows: the CPU's 8-row tiles (one token vector) and their 4-row and
    1-3-row remainders, in bsr_spmm (W's rows) and bsr_spmm_t (W's columns)."""
    out, inn = 59, 61
    w = random_bsr(out, inn, block, 0.5, dtype)
    ref, W = DenseBSR(w), w.to(kernel)
    for T in (1, 3, 8, 16, 17, 40):
        x, dy = torch.randn(T, inn, dtype=dtype), torch.randn(T, out, dtype=dtype)
        X, DY = _to(kernel, x, dy)
        assert_matches(ops.bsr_spmm(X, W.crow, W.col, W.values, out), ref.spmm(x), dtype, f"spmm T {T}")
        assert_matches(ops.bsr_spmm_t(DY, W.crow, W.col, W.values, inn), ref.spmm_t(dy), dtype, f"spmm_t T {T}")


@pytest.mark.parametrize("T", [1, 16, 32, 33, 64])
@pytest.mark.parametrize("block", [(4, 4), (8, 8), (16, 16)], ids=_id)
def test_sddmm_slots_are_rows_of_all_blocks(block, T):
    """A block's gradient does not depend on the work list (few tokens: token-major path; more:
    the lane path): slots give bitwise the rows of the all-blocks result, at 1 and 2 threads."""
    r, c = block
    w = random_bsr(70, 90, block, 0.4, torch.float32)
    x, dy = torch.randn(T, 90), torch.randn(T, 70)
    slots = torch.nonzero(torch.rand(w.nnz_blocks) < 0.5).flatten()
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            full = ops.bsr_sddmm(dy, x, w.crow, w.col, r, c)
            assert torch.equal(ops.bsr_sddmm(dy, x, w.crow, w.col, r, c, slots), full[slots])
            assert_matches(full, DenseBSR(w).sddmm(dy, x), torch.float32, f"T {T}")
    finally:
        torch.set_num_threads(n)

# Large enough for several reduction panels and token groups in the CPU's bsr_spmm / bsr_spmm_t and
# several block-row runs in its bsr_sddmm, with empty block rows and a token count that is no
# multiple of a block.
PANELS = (700, 1403, 130)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("block", [(4, 4), (8, 8), (16, 16), (3, 5)], ids=_id)
def test_panels_and_token_groups(kernel, dtype, block):
    out, inn, T = PANELS
    w = random_bsr(out, inn, block, 0.3, dtype)
    ref, (r, c), W = DenseBSR(w), block, w.to(kernel)
    x, dy, bias = torch.randn(T, inn).to(dtype), torch.randn(T, out).to(dtype), torch.randn(out).to(dtype)
    slots = torch.nonzero(torch.rand(w.nnz_blocks) < 0.5).flatten()
    X, DY, B, S = _to(kernel, x, dy, bias, slots)
    assert_matches(ops.bsr_spmm(X, W.crow, W.col, W.values, out, B), ref.spmm(x, bias), dtype, "spmm")
    assert_matches(ops.bsr_spmm_t(DY, W.crow, W.col, W.values, inn), ref.spmm_t(dy), dtype, "spmm_t")
    acc = ops.acc_dtype(dtype)
    assert_matches(ops.bsr_sddmm(DY, X, W.crow, W.col, r, c), ref.sddmm(dy, x), acc, "sddmm")
    assert_matches(ops.bsr_sddmm(DY, X, W.crow, W.col, r, c, S), ref.sddmm(dy, x, slots), acc, "sddmm slots")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_large_results_independent_of_thread_count(dtype):
    """Bitwise the same for 1, 2 and 3 threads with several panels, token groups and row runs."""
    out, inn, T = PANELS
    n = torch.get_num_threads()
    try:
        for block in [(8, 8), (3, 5)]:
            w = random_bsr(out, inn, block, 0.3, dtype)
            x, dy = torch.randn(T, inn).to(dtype), torch.randn(T, out).to(dtype)
            slots = torch.arange(1, w.nnz_blocks, 3)
            results = []
            for threads in [1, 2, 3]:
                torch.set_num_threads(threads)
                results.append((ops.bsr_spmm(x, w.crow, w.col, w.values, out),
                                ops.bsr_spmm_t(dy, w.crow, w.col, w.values, inn),
                                ops.bsr_sddmm(dy, x, w.crow, w.col, *block),
                                ops.bsr_sddmm(dy, x, w.crow, w.col, *block, slots)))
            for res in results[1:]:
                for a, b in zip(results[0], res):
                    assert torch.equal(a, b), block
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("T", [3, 70])
def test_empty_weight_and_sizes(kernel, T):
    dev = kernel
    crow = torch.zeros(4, dtype=torch.int32, device=dev)  # out 9 in blocks of 4: ceil(9 / 4) + 1 entries
    col, vals = torch.zeros(0, dtype=torch.int16, device=dev), torch.zeros(0, 4, 4, device=dev)
    x, dy = torch.randn(T, 7, device=dev), torch.randn(T, 9, device=dev)
    assert torch.equal(ops.bsr_spmm(x, crow, col, vals, 9), torch.zeros(T, 9, device=dev))
    b = torch.randn(9, device=dev)
    assert torch.equal(ops.bsr_spmm(x, crow, col, vals, 9, b), b.expand(T, 9))
    assert torch.equal(ops.bsr_spmm_t(dy, crow, col, vals, 7), torch.zeros(T, 7, device=dev))
    assert ops.bsr_sddmm(dy, x, crow, col, 4, 4).shape == (0, 4, 4)
    # 16 x 16 blocks in bf16 (the tensor-core path on CUDA from 64 tokens), every block row empty
    crow16, v16 = torch.zeros(2, dtype=torch.int32, device=dev), torch.zeros(0, 16, 16, device=dev).bfloat16()
    x16, b16 = x.bfloat16(), b.bfloat16()
    assert torch.equal(ops.bsr_spmm(x16, crow16, col, v16, 9, b16), b16.expand(T, 9))
    assert torch.equal(ops.bsr_spmm_t(dy.bfloat16(), crow16, col, v16, 7), torch.zeros_like(x16))
    crow0 = torch.zeros(1, dtype=torch.int32, device=dev)  # out == 0
    assert ops.bsr_spmm(x, crow0, col, vals, 0).shape == (T, 0)
    assert ops.bsr_spmm_t(dy, crow, col, vals, 0).shape == (T, 0)  # in_features == 0
    assert ops.bsr_spmm(x[:0], crow, col, vals, 9).shape == (0, 9)  # no tokens
    assert torch.equal(ops.bsr_sddmm(dy[:0], x[:0], *_to(dev, *_one_block()), 4, 4), torch.zeros(1, 4, 4, device=dev))


def _one_block():
    return torch.tensor([0, 1, 1, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int16)


def test_non_contiguous_inputs(device):
    w = random_bsr(20, 45, (8, 8), 0.5)
    ref = DenseBSR(w)
    x, dy = torch.randn(45, 9).T, torch.randn(20, 9).T
    vals = w.values.transpose(1, 2).contiguous().transpose(1, 2)
    X, DY, V, CROW, COL = (t.to(device).transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 1
                           else t.to(device) for t in (x, dy, vals, w.crow, w.col))
    assert not X.is_contiguous() and not V.is_contiguous()
    assert_matches(ops.bsr_spmm(X, CROW, COL, V, 20), ref.spmm(x), torch.float32)
    assert_matches(ops.bsr_spmm_t(DY, CROW, COL, V, 45), ref.spmm_t(dy), torch.float32)
    assert_matches(ops.bsr_sddmm(DY, X, CROW, COL, 8, 8), ref.sddmm(dy, x), torch.float32)


# ------------------------------------------------------------------------------- bad input
def _w():
    return random_bsr(10, 13, (4, 4), 0.6, empty_rows=False)  # 3 x 4 block grid


def _i32(*v):
    return torch.tensor(v, dtype=torch.int32)


SPMM_BAD = {
    "x-dtype": (lambda w: dict(x=torch.randn(2, 13, dtype=torch.float64)), "dtype"),
    "x-0d": (lambda w: dict(x=torch.tensor(1.0)), "x must have at least 1 dimension"),
    "x-narrow": (lambda w: dict(x=torch.randn(2, 4)), "out of range"),
    "crow-dtype": (lambda w: dict(crow=w.crow.long()), "crow must be int32"),
    "crow-length": (lambda w: dict(crow=w.crow[:-1]), "crow must have ceil(out / r) + 1"),
    "crow-first": (lambda w: dict(crow=w.crow + 1), "crow[0] must be 0"),
    "crow-last": (lambda w: dict(crow=torch.cat([w.crow[:-1], w.crow[-1:] - 1])), "crow[-1]"),
    "crow-decreasing": (lambda w: dict(crow=_i32(0, 3, 1, w.nnz_blocks)), "non-decreasing"),
    "col-dtype": (lambda w: dict(col=w.col.long()), "col must be int16 or int32"),
    "col-range": (lambda w: dict(col=torch.full_like(w.col, 4)), "out of range [0, 4)"),
    "col-negative": (lambda w: dict(col=torch.full_like(w.col, -1)), "out of range"),
    "col-unsorted": (lambda w: dict(col=w.col.flip(0)), "sorted and unique"),
    "col-length": (lambda w: dict(col=w.col[:-1]), "blocks but col has"),
    "values-1d": (lambda w: dict(values=w.values.flatten()), "values must be 3-D"),
    "values-count": (lambda w: dict(values=w.values[:-1]), "blocks but col has"),
    "values-dtype": (lambda w: dict(values=w.values.int(), x=torch.randn(2, 13).int()), "values must be float32"),
    "bias-shape": (lambda w: dict(bias=torch.randn(9)), "bias must have last dimension 10"),
    "bias-2d": (lambda w: dict(bias=torch.randn(1, 10)), "bias must be 1-D"),
    "bias-dtype": (lambda w: dict(bias=torch.randn(10, dtype=torch.float64)), "bias has dtype"),
    "out-negative": (lambda w: dict(out_features=-1), "out_features must be >= 0"),
    "out-mismatch": (lambda w: dict(out_features=13), "crow must have ceil(out / r) + 1"),
    "col-duplicate": (lambda w: dict(crow=_i32(0, 2, 2, 2), col=torch.tensor([1, 1], dtype=torch.int16),
                                     values=torch.zeros(2, 4, 4)), "sorted and unique"),
}


def _call_bad(device, fn, args, msg):
    """fn(**args) raises msg on the CPU and, with the arguments on `device`, the same first line there."""
    with pytest.raises(RuntimeError, match=re.escape(msg)) as cpu_err:
        fn(**args)
    if device != "cpu":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(RuntimeError, match=re.escape(msg)) as err:
            fn(**moved)
        assert str(err.value).splitlines()[0] == str(cpu_err.value).splitlines()[0]


@pytest.mark.parametrize("case", list(SPMM_BAD), ids=str)
def test_bad_input_spmm(device, case):
    w = _w()
    make, msg = SPMM_BAD[case]
    args = dict(x=torch.randn(2, 13), crow=w.crow, col=w.col, values=w.values, out_features=10, bias=None)
    args.update(make(w))
    _call_bad(device, ops.bsr_spmm, args, msg)


SPMM_T_BAD = {
    "grad_out-dtype": (lambda w: dict(grad_out=torch.randn(2, 10, dtype=torch.float64)), "dtype"),
    "grad_out-width": (lambda w: dict(grad_out=torch.randn(2, 13)), "crow must have ceil(out / r) + 1"),
    "in-negative": (lambda w: dict(in_features=-1), "in_features must be >= 0"),
    "in-small": (lambda w: dict(in_features=5), "out of range [0, 2)"),
    "crow-first": (lambda w: dict(crow=w.crow + 1), "crow[0] must be 0"),
    "col-range": (lambda w: dict(col=torch.full_like(w.col, 9)), "out of range"),
    "values-2d": (lambda w: dict(values=w.values[:, 0]), "values must be 3-D"),
}


@pytest.mark.parametrize("case", list(SPMM_T_BAD), ids=str)
def test_bad_input_spmm_t(device, case):
    w = _w()
    make, msg = SPMM_T_BAD[case]
    args = dict(grad_out=torch.randn(2, 10), crow=w.crow, col=w.col, values=w.values, in_features=13)
    args.update(make(w))
    _call_bad(device, ops.bsr_spmm_t, args, msg)


SDDMM_BAD = {
    "grad_out-dtype": (lambda w: dict(grad_out=torch.randn(2, 10, dtype=torch.float64)), "grad_out has dtype"),
    "grad_out-tokens": (lambda w: dict(grad_out=torch.randn(3, 10)), "same leading dimensions"),
    "x-dtype": (lambda w: dict(x=torch.randn(2, 13).int(), grad_out=torch.randn(2, 10).int()), "x must be float32"),
    "x-narrow": (lambda w: dict(x=torch.randn(2, 4)), "out of range"),
    "r-zero": (lambda w: dict(r=0), "at least 1 x 1"),
    "c-zero": (lambda w: dict(c=0), "at least 1 x 1"),
    "r-mismatch": (lambda w: dict(r=2), "crow must have ceil(out / r) + 1"),
    "crow-last": (lambda w: dict(crow=torch.cat([w.crow[:-1], w.crow[-1:] + 1])), "crow[-1]"),
    "col-unsorted": (lambda w: dict(col=w.col.flip(0)), "sorted and unique"),
    "slots-dtype": (lambda w: dict(slots=torch.tensor([0, 1], dtype=torch.int32)), "slots must be int64"),
    "slots-2d": (lambda w: dict(slots=torch.tensor([[0, 1]])), "slots must be 1-D"),
    "slots-range": (lambda w: dict(slots=torch.tensor([0, w.nnz_blocks])), "out of range"),
    "slots-negative": (lambda w: dict(slots=torch.tensor([-1])), "out of range"),
    "slots-order": (lambda w: dict(slots=torch.tensor([1, 1])), "strictly increasing"),
}


@pytest.mark.parametrize("case", list(SDDMM_BAD), ids=str)
def test_bad_input_sddmm(device, case):
    w = _w()
    make, msg = SDDMM_BAD[case]
    args = dict(grad_out=torch.randn(2, 10), x=torch.randn(2, 13), crow=w.crow, col=w.col, r=4, c=4, slots=None)
    args.update(make(w))
    _call_bad(device, ops.bsr_sddmm, args, msg)


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("block", [(4, 4), (3, 5)], ids=_id)
@pytest.mark.parametrize("dtype", [torch.float64], ids=dname)
def test_gradcheck(kernel, dtype, block):
    r, c = block
    w = random_bsr(10, 13, block, 0.6, dtype, empty_rows=False).to(kernel)
    x = torch.randn(3, 13, dtype=dtype, device=kernel, requires_grad=True)
    dy = torch.randn(3, 10, dtype=dtype, device=kernel, requires_grad=True)
    v = w.values.clone().requires_grad_()
    b = torch.randn(10, dtype=dtype, device=kernel, requires_grad=True)
    slots = torch.tensor([0, 2], dtype=torch.int64, device=kernel)

    def f(x, v, b):
        return ops.bsr_spmm(x, w.crow, w.col, v, 10, b)

    assert torch.autograd.gradcheck(f, (x, v, b))
    assert torch.autograd.gradgradcheck(f, (x, v, b))
    assert torch.autograd.gradcheck(lambda dy, v: ops.bsr_spmm_t(dy, w.crow, w.col, v, 13), (dy, v))
    assert torch.autograd.gradcheck(lambda dy, x: ops.bsr_sddmm(dy, x, w.crow, w.col, r, c), (dy, x))
    assert torch.autograd.gradcheck(lambda dy, x: ops.bsr_sddmm(dy, x, w.crow, w.col, r, c, slots), (dy, x))


OPCHECK = [(op, dtype, variant) for dtype in [torch.float32, torch.float64, torch.bfloat16]
           for op, variant in [("bsr_spmm", "bias"), ("bsr_spmm", ""), ("bsr_spmm_t", ""), ("bsr_sddmm", ""),
                               ("bsr_sddmm", "slots")]]


def _opcheck_args(op, dtype, variant, device, block=(4, 8)):
    (r, c), tokens = block, (2, 5) if block == (4, 8) else (2, 40)
    w = random_bsr(12 * r // 4, 40 * c // 8, block, 0.5, dtype).to(device)
    out, inn = w.shape
    x = torch.randn(*tokens, inn, device=device).to(dtype).requires_grad_()
    dy = torch.randn(*tokens, out, device=device).to(dtype).requires_grad_()
    v = w.values.clone().requires_grad_(dtype != torch.bfloat16)
    if op == "bsr_spmm":
        return (x, w.crow, w.col, v, out, torch.randn(out, device=device).to(dtype) if variant == "bias" else None)
    if op == "bsr_spmm_t":
        return (dy, w.crow, w.col, v, inn)
    return (dy, x, w.crow, w.col, r, c, torch.tensor([0, 2], device=device) if variant == "slots" else None)


@pytest.mark.parametrize("op, dtype, variant", OPCHECK,
                         ids=["-".join(filter(None, (op, dname(d), v))) for op, d, v in OPCHECK])
def test_opcheck(device, op, dtype, variant):
    torch.library.opcheck(getattr(torch.ops.seft, op).default, _opcheck_args(op, dtype, variant, device))
    if device == "cuda" and dtype == torch.bfloat16:  # 16 x 16 blocks and 80 tokens: the tensor-core path
        torch.library.opcheck(getattr(torch.ops.seft, op).default,
                              _opcheck_args(op, dtype, variant, device, block=(16, 16)))


# ------------------------------------------------------------------------------- SparseLinear
def test_sparse_linear_blocks_forward_backward():
    lin = torch.nn.Linear(45, 30, dtype=torch.float64)
    bmask = torch.rand(4, 6) < 0.5  # blocks of 8 x 8 over 30 x 45
    layer = SparseLinear.from_dense(lin, bmask, block=(8, 8))
    assert layer.block == (8, 8) and layer.values.shape[1:] == (8, 8) and isinstance(layer.weight, BSRWeight)
    assert "block=(8, 8)" in repr(layer)
    dense_mask = layer.weight.mask()
    assert layer.nnz == int(dense_mask.sum())
    w = (lin.weight.detach() * dense_mask).requires_grad_()
    x = torch.randn(2, 7, 45, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    xr = x.detach().clone().requires_grad_()
    yr = torch.nn.functional.linear(xr, w, lin.bias.detach())
    torch.testing.assert_close(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.bias.grad, g.reshape(-1, 30).sum(0))
    gv = BSRWeight(layer.crow, layer.col, layer.values.grad, (30, 45)).to_dense()
    torch.testing.assert_close(gv, w.grad * dense_mask)
    torch.testing.assert_close(layer.to_linear().weight, w.detach())


def test_sparse_linear_without_block_stays_csr():
    lin = torch.nn.Linear(20, 10)
    layer = SparseLinear.from_dense(lin, torch.rand(10, 20) < 0.5)
    assert layer.block is None and layer.values.dim() == 1


def test_compile_fullgraph():
    lin = torch.nn.Linear(64, 32)
    layer = SparseLinear.from_dense(lin, torch.rand(4, 8) < 0.4, block=(8, 8))
    x = torch.randn(4, 64, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    gx, gv = x.grad.clone(), layer.values.grad.clone()
    x.grad = None
    layer.values.grad = None
    y = torch.compile(layer, fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(layer.values.grad, gv)


# ------------------------------------------------------------------------------- BSRWeight
@pytest.mark.parametrize("block", BLOCKS, ids=_id)
def test_from_dense_to_dense_round_trip(block):
    r, c = block
    for out, inn in [(37, 53), (16, 32), (1, 1), (5, 3)]:
        nbr, nbc = -(-out // r), -(-inn // c)
        bmask = torch.rand(nbr, nbc) < 0.5
        dense = torch.randn(out, inn, dtype=torch.float64)
        w = BSRWeight.from_dense(dense, block, bmask)
        dmask = bmask.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inn]
        assert w.block == block and w.block_shape == (nbr, nbc)
        assert torch.equal(w.block_mask(), bmask) and torch.equal(w.mask(), dmask)
        assert torch.equal(w.to_dense(), dense * dmask) and w.to_dense().shape == (out, inn)
        assert w.nnz_blocks == int(bmask.sum())
        assert w.sparsity == pytest.approx(1 - int(dmask.sum()) / (out * inn))
        assert w.nbytes() == 4 * (nbr + 1) + 2 * w.nnz_blocks + 8 * w.nnz_blocks * r * c
        assert torch.equal(BSRWeight.from_dense(dense, block, dmask).col, w.col)  # the dense mask
        assert torch.all(w.values.reshape(-1)[~_padded_mask(w).reshape(-1)] == 0)  # zero padding
        w2 = BSRWeight.from_dense(w.to_dense(), block, dtype=torch.float32)  # mask=None: blocks with a non-zero
        assert w2.dtype == torch.float32 and set(w2.col.tolist()) <= set(w.col.tolist())


def _padded_mask(w):
    """bool [nblocks, r, c]: the entries of each block inside out x in."""
    (r, c), (out, inn) = w.block, w.shape
    rows = w.block_rows()[:, None] * r + torch.arange(r)
    cols = w.col.long()[:, None] * c + torch.arange(c)
    return (rows < out)[:, :, None] & (cols < inn)[:, None, :]


def test_from_dense_rejects_masks_not_constant_per_block():
    m = torch.ones(8, 8, dtype=torch.bool)
    m[5, 6] = False
    with pytest.raises(ValueError, match=r"mask is not constant on block \(1, 1\)"):
        BSRWeight.from_dense(torch.randn(8, 8), (4, 4), m)
    with pytest.raises(ValueError, match="mask must have the block shape"):
        BSRWeight.from_dense(torch.randn(8, 8), (4, 4), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        BSRWeight.from_dense(torch.randn(8, 8), (4, 4), torch.ones(2, 2))
    with pytest.raises(ValueError, match="block must be"):
        BSRWeight.from_dense(torch.randn(8, 8), (0, 4))
    with pytest.raises(ValueError, match="dense must be a 2-D"):
        BSRWeight.from_dense(torch.randn(8), (4, 4))
    with pytest.raises(ValueError, match="NaN"):
        BSRWeight.from_dense(torch.full((4, 4), float("nan")), (4, 4))
    # a partial last block: only the entries inside the matrix count
    m = torch.ones(6, 6, dtype=torch.bool)
    m[4:, 4:] = False
    w = BSRWeight.from_dense(torch.randn(6, 6), (4, 4), m)
    assert torch.equal(w.block_mask(), torch.tensor([[True, True], [True, False]]))


@pytest.mark.parametrize("block", [(4, 4), (2, 3)], ids=_id)
def test_torch_sparse_bsr_round_trip(block):
    r, c = block
    w = random_bsr(4 * r, 5 * c, block, 0.5, torch.float64)
    t = w.to_torch_sparse()
    assert t.layout == torch.sparse_bsr and torch.equal(t.to_dense(), w.to_dense())
    w2 = BSRWeight.from_torch_sparse(t, dtype=torch.float32)
    assert torch.equal(w2.crow, w.crow) and torch.equal(w2.col, w.col) and w2.dtype == torch.float32
    with pytest.raises(ValueError, match="multiple of the block"):
        random_bsr(10, 13, (4, 4), 0.5).to_torch_sparse()
    with pytest.raises(ValueError, match="torch.sparse_bsr tensor"):
        BSRWeight.from_torch_sparse(torch.randn(4, 4).to_sparse_csr())


def test_validation_names_the_argument():
    w = random_bsr(10, 13, (4, 4), 0.6, empty_rows=False)
    cases = [
        (dict(crow=w.crow.long()), "crow must be int32"),
        (dict(crow=w.crow[:-1]), "crow must have ceil"),
        (dict(crow=w.crow + 1), r"crow\[0\] must be 0"),
        (dict(col=w.col.float()), "col must be int16 or int32"),
        (dict(col=torch.full_like(w.col, 4)), "out of range"),
        (dict(col=w.col.flip(0)), "sorted and unique"),
        (dict(values=w.values.flatten()), "values must be 3-D"),
        (dict(values=w.values[:-1]), "blocks but col has"),
        (dict(values=w.values.int()), "values must be one of"),
        (dict(values=w.values * float("inf")), "NaN or Inf"),
        (dict(shape=(10, -1)), "non-negative"),
    ]
    for change, msg in cases:
        args = dict(crow=w.crow, col=w.col, values=w.values, shape=w.shape)
        args.update(change)
        with pytest.raises(ValueError, match=msg):
            BSRWeight(**args)
    with pytest.raises(ValueError, match="int16 col cannot address"):
        BSRWeight(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int16), torch.zeros(0, 1, 1),
                  (1, 40000))


# ------------------------------------------------------------------------------- registration
SCHEMAS = {
    "bsr_spmm": "seft::bsr_spmm(Tensor x, Tensor crow, Tensor col, Tensor values, int out_features, "
                "Tensor? bias=None) -> Tensor",
    "bsr_spmm_t": "seft::bsr_spmm_t(Tensor grad_out, Tensor crow, Tensor col, Tensor values, int in_features) "
                  "-> Tensor",
    "bsr_sddmm": "seft::bsr_sddmm(Tensor grad_out, Tensor x, Tensor crow, Tensor col, int r, int c, "
                 "Tensor? slots=None) -> Tensor",
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_op_registered_with_cpu_and_meta_kernels(name):
    assert str(getattr(torch.ops.seft, name).default._schema) == SCHEMAS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seft::{name}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seft::{name}", "Meta")
    cuda_built = bool(seft_ext.build_info and seft_ext.build_info.WITH_CUDA)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seft::{name}", "CUDA") == cuda_built


def test_isas_agree():
    """Every kernel set built and runnable here agrees with the base kernels to the fp32 tolerance
    (fp64 inputs: to fp64's)."""
    w = random_bsr(40, 70, (8, 8), 0.4, torch.float64)
    x, dy = torch.randn(20, 70, dtype=torch.float64), torch.randn(20, 40, dtype=torch.float64)
    results = {}
    try:
        for isa in CPU_ISAS:
            try:
                ops.cpu_isa(isa)
            except RuntimeError:
                continue  # built, but this CPU lacks the instructions
            results[isa] = (ops.bsr_spmm(x, w.crow, w.col, w.values, 40),
                            ops.bsr_spmm_t(dy, w.crow, w.col, w.values, 70), ops.bsr_sddmm(dy, x, w.crow, w.col, 8, 8))
    finally:
        ops.cpu_isa("auto")
    if len(results) < 2:
        pytest.skip("one CPU kernel set runs here")
    for isa, res in results.items():
        for a, b in zip(results["base"], res):
            assert_matches(a, b, torch.float64)


# ------------------------------------------------------------------------------- CUDA: checks and streams
def test_pattern_changed_in_place_is_checked_again(device):
    """A checked pattern is remembered per tensor version (CUDA): an in-place change re-checks."""
    w = random_bsr(40, 50, (8, 8), 0.5, index=torch.int32, empty_rows=False)
    W = w.to(device)
    W.col = W.col.clone()  # changed below; w keeps the pattern for the reference
    x = torch.randn(3, 50)
    X = x.to(device)
    ops.bsr_spmm(X, W.crow, W.col, W.values, 40)
    br = int(torch.nonzero((w.crow[1:] - w.crow[:-1]) >= 2)[0])  # a block row with >= 2 blocks
    p = int(w.crow[br])
    W.col[p + 1] = W.col[p]  # a duplicate block column: bumps col's version
    with pytest.raises(RuntimeError, match="sorted and unique"):
        ops.bsr_spmm(X, W.crow, W.col, W.values, 40)
    with pytest.raises(RuntimeError, match="sorted and unique"):
        ops.bsr_spmm_t(torch.randn(3, 40, device=device), W.crow, W.col, W.values, 50)
    with pytest.raises(RuntimeError, match="sorted and unique"):
        ops.bsr_sddmm(torch.randn(3, 40, device=device), X, W.crow, W.col, 8, 8)
    W.col[p + 1] = int(w.col[p + 1])  # restored: accepted again
    assert_matches(ops.bsr_spmm(X, W.crow, W.col, W.values, 40), DenseBSR(w).spmm(x), torch.float32)


@requires_cuda
def test_mixed_devices_rejected():
    w = random_bsr(8, 8, (4, 4), 0.5)
    with pytest.raises(RuntimeError, match="is on"):
        ops.bsr_spmm(torch.randn(2, 8, device="cuda"), w.crow, w.col.cuda(), w.values.cuda(), 8)


@requires_cuda
def test_runs_on_current_stream():
    w = random_bsr(64, 64, (16, 16), 0.5)
    x = torch.randn(80, 64).bfloat16()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        W, X = w.to("cuda", torch.bfloat16), x.to("cuda")
        y = ops.bsr_spmm(X, W.crow, W.col, W.values, 64)
        dx = ops.bsr_spmm_t(y, W.crow, W.col, W.values, 64)
    s.synchronize()
    ref = DenseBSR(w.to(dtype=torch.bfloat16))
    assert_matches(y, ref.spmm(x), torch.bfloat16)
    assert_matches(dx, ref.spmm_t(y.cpu()), torch.bfloat16)


@requires_cuda
def test_training_step_does_not_synchronise():
    """After the first call has checked the pattern (and slots), the CUDA ops read nothing back."""
    for block in [(16, 16), (4, 4)]:
        W = random_bsr(256, 384, block, 0.3, torch.bfloat16, index=torch.int16).to("cuda")
        slots = torch.arange(0, W.nnz_blocks, 5, device="cuda")
        for T in (4, 256):  # both paths
            x = torch.randn(T, 384, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
            calls = [lambda: ops.bsr_spmm(x, W.crow, W.col, W.values, 256),
                     lambda: ops.bsr_spmm_t(dy, W.crow, W.col, W.values, 384),
                     lambda: ops.bsr_sddmm(dy, x, W.crow, W.col, *block, slots),
                     lambda: ops.bsr_sddmm(dy, x, W.crow, W.col, *block)]
            for call in calls:
                call()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for call in calls:
                    call()
            finally:
                torch.cuda.set_sync_debug_mode(0)
