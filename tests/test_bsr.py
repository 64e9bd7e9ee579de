"""BSR storage (BSRWeight) and the bsr_spmm / bsr_spmm_t / bsr_sddmm ops on the CPU (every
instruction set), against dense fp64 math (tests/reference.py, one tolerance table); bad input,
gradients, opcheck, torch.compile, thread-count determinism, SparseLinear with blocks."""
import re

import pytest
import torch

from seft_ext import BSRWeight, SparseLinear, ops
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


@pytest.fixture
def cpu_kernel(kernel):
    if kernel != "cpu":
        pytest.skip("the BSR ops have CPU kernels only (this round)")
    return kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("block", BLOCKS, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_ops_match_dense(cpu_kernel, dtype, block, shape):
    """All three ops, with and without bias / slots, int16 and int32 block columns, every leading shape."""
    out, inn, density = shape
    for idx in IDX:
        w = random_bsr(out, inn, block, density, dtype, index=idx)
        ref, (r, c) = DenseBSR(w), block
        bias = torch.randn(out).to(dtype)
        slots = torch.nonzero(torch.rand(w.nnz_blocks) < 0.5).flatten()
        for lead in LEADS:
            x = torch.randn(*lead, inn).to(dtype)
            dy = torch.randn(*lead, out).to(dtype)
            tag = f"{dname(idx)} lead {lead}"
            y = ops.bsr_spmm(x, w.crow, w.col, w.values, out)
            assert y.dtype == dtype and y.shape == (*lead, out), tag
            assert_matches(y, ref.spmm(x), dtype, f"bsr_spmm {tag}")
            assert_matches(ops.bsr_spmm(x, w.crow, w.col, w.values, out, bias), ref.spmm(x, bias), dtype,
                           f"bsr_spmm + bias {tag}")
            dx = ops.bsr_spmm_t(dy, w.crow, w.col, w.values, inn)
            assert dx.dtype == dtype and dx.shape == (*lead, inn), tag
            assert_matches(dx, ref.spmm_t(dy), dtype, f"bsr_spmm_t {tag}")
            g = ops.bsr_sddmm(dy, x, w.crow, w.col, r, c)
            assert g.dtype == ops.acc_dtype(dtype) and g.shape == (w.nnz_blocks, r, c), tag
            assert_matches(g, ref.sddmm(dy, x), ops.acc_dtype(dtype), f"bsr_sddmm {tag}")
            gs = ops.bsr_sddmm(dy, x, w.crow, w.col, r, c, slots)
            assert gs.shape == (slots.numel(), r, c), tag
            assert_matches(gs, ref.sddmm(dy, x, slots), ops.acc_dtype(dtype), f"bsr_sddmm slots {tag}")


def test_padding_of_sddmm_is_zero():
    w = random_bsr(10, 13, (4, 4), 1.0, torch.float64, empty_rows=False)
    g = ops.bsr_sddmm(torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 13, dtype=torch.float64),
                      w.crow, w.col, 4, 4)
    full = torch.zeros(3, 4, 4, 4, dtype=torch.float64)
    full[w.block_rows(), w.col.long()] = g
    full = full.permute(0, 2, 1, 3).reshape(12, 16)
    assert torch.all(full[10:] == 0) and torch.all(full[:, 13:] == 0) and torch.all(full[:10, :13] != 0)


def test_int32_block_columns_when_needed():
    """ceil(in / c) > 32767 takes int32 block columns; the ops address them."""
    inn = 32768 + 3
    dense = torch.zeros(2, inn, dtype=torch.float64)
    dense[0, -1], dense[1, 0], dense[1, 30000] = 2.0, 3.0, 5.0
    w = BSRWeight.from_dense(dense, (1, 1))
    assert w.col.dtype == torch.int32 and w.nnz_blocks == 3
    x = torch.randn(3, inn, dtype=torch.float64)
    assert_matches(ops.bsr_spmm(x, w.crow, w.col, w.values, 2), x @ dense.T, torch.float64)
    assert torch.equal(w.to_dense(), dense)
    assert BSRWeight.from_dense(torch.ones(2, inn), (2, 2)).col.dtype == torch.int16  # 16386 block columns


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
def test_every_token_count(cpu_kernel, dtype, block):
    """0 to 130 tokens: every remainder of the token blocks (1 to 3 vectors wide) and of the token groups."""
    out, inn = 45, 83
    w = random_bsr(out, inn, block, 0.5, dtype)
    ref, (r, c) = DenseBSR(w), block
    bias = torch.randn(out, dtype=dtype)
    for T in range(131):
        x, dy = torch.randn(T, inn, dtype=dtype), torch.randn(T, out, dtype=dtype)
        assert_matches(ops.bsr_spmm(x, w.crow, w.col, w.values, out, bias), ref.spmm(x, bias), dtype, f"spmm T {T}")
        assert_matches(ops.bsr_spmm_t(dy, w.crow, w.col, w.values, inn), ref.spmm_t(dy), dtype, f"spmm_t T {T}")
        assert_matches(ops.bsr_sddmm(dy, x, w.crow, w.col, r, c), ref.sddmm(dy, x), dtype, f"sddmm T {T}")


# Large enough for several reduction panels and token groups in bsr_spmm / bsr_spmm_t and several
# block-row runs in bsr_sddmm, with empty block rows and a token count that is no multiple of a block.
LARGE = (700, 1403, 130)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("block", [(4, 4), (8, 8), (16, 16), (3, 5)], ids=_id)
def test_panels_and_token_groups(cpu_kernel, dtype, block):
    out, inn, T = LARGE
    w = random_bsr(out, inn, block, 0.3, dtype)
    ref, (r, c) = DenseBSR(w), block
    x, dy, bias = torch.randn(T, inn).to(dtype), torch.randn(T, out).to(dtype), torch.randn(out).to(dtype)
    slots = torch.nonzero(torch.rand(w.nnz_blocks) < 0.5).flatten()
    assert_matches(ops.bsr_spmm(x, w.crow, w.col, w.values, out, bias), ref.spmm(x, bias), dtype, "spmm")
    assert_matches(ops.bsr_spmm_t(dy, w.crow, w.col, w.values, inn), ref.spmm_t(dy), dtype, "spmm_t")
    acc = ops.acc_dtype(dtype)
    assert_matches(ops.bsr_sddmm(dy, x, w.crow, w.col, r, c), ref.sddmm(dy, x), acc, "sddmm")
    assert_matches(ops.bsr_sddmm(dy, x, w.crow, w.col, r, c, slots), ref.sddmm(dy, x, slots), acc, "sddmm slots")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_large_results_independent_of_thread_count(dtype):
    """Bitwise the same for 1, 2 and 3 threads with several panels, token groups and row runs."""
    out, inn, T = LARGE
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


def test_empty_weight_and_sizes():
    crow = torch.zeros(4, dtype=torch.int32)  # out 9 in blocks of 4: ceil(9 / 4) + 1 entries
    col, vals = torch.zeros(0, dtype=torch.int16), torch.zeros(0, 4, 4)
    x, dy = torch.randn(3, 7), torch.randn(3, 9)
    assert torch.equal(ops.bsr_spmm(x, crow, col, vals, 9), torch.zeros(3, 9))
    b = torch.randn(9)
    assert torch.equal(ops.bsr_spmm(x, crow, col, vals, 9, b), b.expand(3, 9))
    assert torch.equal(ops.bsr_spmm_t(dy, crow, col, vals, 7), torch.zeros(3, 7))
    assert ops.bsr_sddmm(dy, x, crow, col, 4, 4).shape == (0, 4, 4)
    crow0 = torch.zeros(1, dtype=torch.int32)  # out == 0
    assert ops.bsr_spmm(x, crow0, col, vals, 0).shape == (3, 0)
    assert ops.bsr_spmm_t(dy, crow, col, vals, 0).shape == (3, 0)  # in_features == 0


def test_non_contiguous_inputs():
    w = random_bsr(20, 45, (8, 8), 0.5)
    ref = DenseBSR(w)
    x, dy = torch.randn(45, 9).T, torch.randn(20, 9).T
    vals = w.values.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x.is_contiguous() and not vals.is_contiguous()
    assert_matches(ops.bsr_spmm(x, w.crow, w.col, vals, 20), ref.spmm(x), torch.float32)
    assert_matches(ops.bsr_spmm_t(dy, w.crow, w.col, vals, 45), ref.spmm_t(dy), torch.float32)
    assert_matches(ops.bsr_sddmm(dy, x, w.crow, w.col, 8, 8), ref.sddmm(dy, x), torch.float32)


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
}


@pytest.mark.parametrize("case", list(SPMM_BAD), ids=str)
def test_bad_input_spmm(case):
    w = _w()
    make, msg = SPMM_BAD[case]
    args = dict(x=torch.randn(2, 13), crow=w.crow, col=w.col, values=w.values, out_features=10, bias=None)
    args.update(make(w))
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        ops.bsr_spmm(**args)


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
def test_bad_input_spmm_t(case):
    w = _w()
    make, msg = SPMM_T_BAD[case]
    args = dict(grad_out=torch.randn(2, 10), crow=w.crow, col=w.col, values=w.values, in_features=13)
    args.update(make(w))
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        ops.bsr_spmm_t(**args)


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
def test_bad_input_sddmm(case):
    w = _w()
    make, msg = SDDMM_BAD[case]
    args = dict(grad_out=torch.randn(2, 10), x=torch.randn(2, 13), crow=w.crow, col=w.col, r=4, c=4, slots=None)
    args.update(make(w))
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        ops.bsr_sddmm(**args)


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("block", [(4, 4), (3, 5)], ids=_id)
def test_gradcheck(cpu_kernel, block):
    r, c = block
    w = random_bsr(10, 13, block, 0.6, torch.float64, empty_rows=False)
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_()
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    slots = torch.tensor([0, 2], dtype=torch.int64)

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


def _opcheck_args(op, dtype, variant):
    w = random_bsr(12, 40, (4, 8), 0.5, dtype)
    x = torch.randn(2, 5, 40).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, 12).to(dtype).requires_grad_()
    v = w.values.clone().requires_grad_(dtype != torch.bfloat16)
    if op == "bsr_spmm":
        return (x, w.crow, w.col, v, 12, torch.randn(12).to(dtype) if variant == "bias" else None)
    if op == "bsr_spmm_t":
        return (dy, w.crow, w.col, v, 40)
    return (dy, x, w.crow, w.col, 4, 8, torch.tensor([0, 2]) if variant == "slots" else None)


@pytest.mark.parametrize("op, dtype, variant", OPCHECK,
                         ids=["-".join(filter(None, (op, dname(d), v))) for op, d, v in OPCHECK])
def test_opcheck(op, dtype, variant):
    torch.library.opcheck(getattr(torch.ops.seft, op).default, _opcheck_args(op, dtype, variant))


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


def test_isas_agree():
    """The base and AVX2 kernels agree to the fp32 tolerance (fp64 inputs: to fp64's)."""
    w = random_bsr(40, 70, (8, 8), 0.4, torch.float64)
    x, dy = torch.randn(20, 70, dtype=torch.float64), torch.randn(20, 40, dtype=torch.float64)
    results = {}
    try:
        for isa in ["base", "avx2"]:
            try:
                ops.cpu_isa(isa)
            except RuntimeError:
                pytest.skip("no AVX2 kernels on this CPU / build")
            results[isa] = (ops.bsr_spmm(x, w.crow, w.col, w.values, 40),
                            ops.bsr_spmm_t(dy, w.crow, w.col, w.values, 70), ops.bsr_sddmm(dy, x, w.crow, w.col, 8, 8))
    finally:
        ops.cpu_isa("auto")
    for a, b in zip(results["base"], results["avx2"]):
        assert_matches(a, b, torch.float64)
