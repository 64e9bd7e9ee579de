"""csr_spmm / csr_spmm_t / csr_sddmm on every device present, with every kernel set (the CPU's
instruction sets; CUDA's auto, tensor_core and cuda_core paths), against dense fp64 math
(tests/reference.py, one tolerance table); gradients, opcheck, torch.compile; the CUDA-only
cases (launch-grid limits, streams, no synchronisation) are skipped without CUDA."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from seft_ext import ops
from cuda_env import DEVICES, requires_cuda
from reference import Dense, assert_matches, random_weight, sddmm_ref, spmm_ref, spmm_t_ref

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
IDX = [torch.int16, torch.int32]
# (out, in, density): 1 x 1; fewer than 8 columns; in % 8 != 0 (the CUDA kernels' scalar-load
# tails); in and out across the 32-deep slices and 128-wide tiles of the CUDA kernels and the
# column panels of the CPU kernels; all-empty and full rows.
CASES = [(1, 1, 1.0), (7, 5, 0.0), (12, 9, 0.4), (16, 16, 0.3), (37, 53, 0.2), (64, 40, 0.5), (8, 300, 0.05),
         (70, 129, 0.1), (33, 130, 1.0), (70, 600, 0.3)]
# leading dimensions of the dense operands: none, zero / one / a few tokens, 2-D, many tokens
# (>= 64: bf16 / fp16 take the tensor cores on CUDA's auto path)
LEADS = [(), (0,), (1,), (5,), (2, 3), (33,), (130,)]


def _id(case):
    return "x".join(str(v) for v in case)


def dname(dtype):
    return str(dtype).removeprefix("torch.")


def acc(dtype):
    return ops.acc_dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_ops_match_dense(kernel, dtype, case):
    """All three ops, with and without bias / slots, int16 and int32 columns, every leading shape."""
    out, inn, density = case
    for idx in IDX:
        w = random_weight(out, inn, density, dtype, index=idx)
        ref, W = Dense(w), w.to(kernel)
        bias = torch.randn(out).to(dtype)
        slots = torch.nonzero(torch.rand(w.nnz) < 0.4).flatten()
        for lead in LEADS:
            x = torch.randn(*lead, inn).to(dtype)
            dy = torch.randn(*lead, out).to(dtype)
            X, DY = x.to(kernel), dy.to(kernel)
            tag = f"{dname(idx)} lead {lead}"
            y = ops.csr_spmm(X, W.crow, W.col, W.values)
            assert y.device.type == kernel and y.dtype == dtype and y.shape == (*lead, out), tag
            assert_matches(y, ref.spmm(x), dtype, f"csr_spmm {tag}")
            assert_matches(ops.csr_spmm(X, W.crow, W.col, W.values, bias.to(kernel)), ref.spmm(x, bias), dtype,
                           f"csr_spmm + bias {tag}")
            dx = ops.csr_spmm_t(DY, W.crow, W.col, W.values, inn)
            assert dx.device.type == kernel and dx.dtype == dtype and dx.shape == (*lead, inn), tag
            assert_matches(dx, ref.spmm_t(dy), dtype, f"csr_spmm_t {tag}")
            g = ops.csr_sddmm(DY, X, W.crow, W.col)
            assert g.device.type == kernel and g.dtype == acc(dtype) and g.shape == (w.nnz,), tag
            assert_matches(g, ref.sddmm(dy, x), acc(dtype), f"csr_sddmm {tag}")
            gs = ops.csr_sddmm(DY, X, W.crow, W.col, slots.to(kernel))
            assert gs.shape == slots.shape, tag
            assert_matches(gs, ref.sddmm(dy, x, slots), acc(dtype), f"csr_sddmm slots {tag}")


# (tokens, out, in, density): many tokens and several 128-wide tiles / 32-deep slices in every
# direction; in % 8 != 0 and odd token counts take the CUDA kernels' scalar-load branches.
TILE_EDGES = [(200, 300, 260, 0.3), (130, 129, 1000, 0.05), (64, 256, 256, 0.95), (257, 136, 259, 0.5),
              (96, 33, 7, 0.6)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dname)
@pytest.mark.parametrize("case", TILE_EDGES, ids=_id)
def test_many_tokens_across_tiles(kernel, dtype, case):
    """Every op on many tokens across tile edges, and bitwise the same on a second call."""
    T, out, inn, density = case
    for idx in IDX:
        w = random_weight(out, inn, density, dtype, index=idx)
        x, dy, bias = torch.randn(T, inn).to(dtype), torch.randn(T, out).to(dtype), torch.randn(out).to(dtype)
        slots = torch.arange(1, w.nnz, 3)
        W, X, DY, B, S = w.to(kernel), x.to(kernel), dy.to(kernel), bias.to(kernel), slots.to(kernel)
        y = ops.csr_spmm(X, W.crow, W.col, W.values, B)
        dx = ops.csr_spmm_t(DY, W.crow, W.col, W.values, inn)
        g = ops.csr_sddmm(DY, X, W.crow, W.col)
        gs = ops.csr_sddmm(DY, X, W.crow, W.col, S)
        tag, ref = dname(idx), Dense(w)
        assert_matches(y, ref.spmm(x, bias), dtype, f"csr_spmm {tag}")
        assert_matches(dx, ref.spmm_t(dy), dtype, f"csr_spmm_t {tag}")
        g_ref = ref.sddmm(dy, x)
        assert_matches(g, g_ref, acc(dtype), f"csr_sddmm {tag}")
        assert_matches(gs, g_ref[slots], acc(dtype), f"csr_sddmm slots {tag}")
        # deterministic on every path: fixed summation orders
        assert torch.equal(y, ops.csr_spmm(X, W.crow, W.col, W.values, B)), tag
        assert torch.equal(dx, ops.csr_spmm_t(DY, W.crow, W.col, W.values, inn)), tag
        assert torch.equal(g, ops.csr_sddmm(DY, X, W.crow, W.col)), tag
        assert torch.equal(gs, ops.csr_sddmm(DY, X, W.crow, W.col, S)), tag


def test_few_tokens_many_rows(kernel):
    """Few tokens and many rows: CUDA's csr_spmm_t splits the rows across blocks and sums the splits."""
    w = random_weight(3000, 300, 0.2, torch.bfloat16, index=torch.int16)
    ref, W = Dense(w), w.to(kernel)
    for T in [1, 2, 3, 5, 8, 9, 17]:
        dy, x = torch.randn(T, 3000).to(torch.bfloat16), torch.randn(T, 300).to(torch.bfloat16)
        DY, X = dy.to(kernel), x.to(kernel)
        dx = ops.csr_spmm_t(DY, W.crow, W.col, W.values, 300)
        assert_matches(dx, ref.spmm_t(dy), torch.bfloat16, f"csr_spmm_t T={T}")
        assert torch.equal(dx, ops.csr_spmm_t(DY, W.crow, W.col, W.values, 300)), T
        assert_matches(ops.csr_spmm(X, W.crow, W.col, W.values), ref.spmm(x), torch.bfloat16, f"csr_spmm T={T}")
        assert_matches(ops.csr_sddmm(DY, X, W.crow, W.col), ref.sddmm(dy, x), torch.float32, f"csr_sddmm T={T}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
@pytest.mark.parametrize("T", [1, 7, 70])
def test_sddmm_slots(kernel, T, dtype):
    """No slot, one slot (CUDA's few-slots path), some, all of them."""
    w = random_weight(30, 200, 0.3, dtype)
    x, dy = torch.randn(T, 200).to(dtype), torch.randn(T, 30).to(dtype)
    W, X, DY = w.to(kernel), x.to(kernel), dy.to(kernel)
    for k in [0, 1, 17, w.nnz]:
        slots = torch.randperm(w.nnz)[:k].sort().values
        g = ops.csr_sddmm(DY, X, W.crow, W.col, slots.to(kernel))
        assert g.shape == (k,)
        assert_matches(g, sddmm_ref(dy, x, w, slots), torch.float32, f"{k} slots")


# (out, in, tokens, density, dtype, index): more than 65,535 blocks (the CUDA kernels'
# grid-stride loops) and in > 32,768 (int32 columns); inputs and fp64 reference on the GPU.
# No full row (special_rows=False): 33,000 fp32 products would exceed the tolerance table's
# ~1,000; the small cases cover empty and full rows.
LARGE = [(4096, 4096, 160, 0.3, torch.bfloat16, torch.int16), (4096, 4096, 160, 0.3, torch.float32, torch.int16),
         (2048, 33000, 300, 0.01, torch.float32, torch.int32)]


@pytest.mark.parametrize("dtype, case", [(c[4], c) for c in LARGE],
                         ids=[f"{c[0]}x{c[1]}-T{c[2]}-{dname(c[4])}-{dname(c[5])}" for c in LARGE])
def test_large_grids(cuda_kernel, dtype, case):
    out, inn, T, density, _, idx = case
    dev = cuda_kernel
    w = random_weight(out, inn, density, dtype, index=idx, special_rows=False, device=dev)
    x, dy, bias = (torch.randn(T, inn, device=dev).to(dtype), torch.randn(T, out, device=dev).to(dtype),
                   torch.randn(out, device=dev).to(dtype))
    slots = torch.nonzero(torch.rand(w.nnz, device=dev) < 0.3).flatten()
    y = ops.csr_spmm(x, w.crow, w.col, w.values, bias)
    dx = ops.csr_spmm_t(dy, w.crow, w.col, w.values, inn)
    g = ops.csr_sddmm(dy, x, w.crow, w.col)
    gs = ops.csr_sddmm(dy, x, w.crow, w.col, slots)
    ref = Dense(w)
    assert_matches(y, ref.spmm(x, bias), dtype, "csr_spmm")
    assert_matches(dx, ref.spmm_t(dy), dtype, "csr_spmm_t")
    g_ref = ref.sddmm(dy, x)
    assert_matches(g, g_ref, acc(dtype), "csr_sddmm")
    assert_matches(gs, g_ref[slots], acc(dtype), "csr_sddmm slots")
    assert torch.equal(y, ops.csr_spmm(x, w.crow, w.col, w.values, bias))
    assert torch.equal(dx, ops.csr_spmm_t(dy, w.crow, w.col, w.values, inn))
    assert torch.equal(g, ops.csr_sddmm(dy, x, w.crow, w.col))


def test_results_independent_of_thread_count():
    """Every CPU op's result is independent of the number of threads (fixed reduction orders)."""
    w = random_weight(300, 700, 0.3)
    x, dy = torch.randn(100, 700), torch.randn(100, 300)
    n = torch.get_num_threads()
    results = []
    try:
        for threads in [1, 2, 3]:
            torch.set_num_threads(threads)
            results.append((ops.csr_spmm(x, w.crow, w.col, w.values),
                            ops.csr_spmm_t(dy, w.crow, w.col, w.values, 700), ops.csr_sddmm(dy, x, w.crow, w.col)))
    finally:
        torch.set_num_threads(n)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------- edge cases, errors
def test_empty_weight(device):
    crow = torch.zeros(5, dtype=torch.int32, device=device)
    col = torch.zeros(0, dtype=torch.int32, device=device)
    vals = torch.zeros(0, device=device)
    x, dy = torch.randn(3, 7, device=device), torch.randn(3, 4, device=device)
    assert torch.equal(ops.csr_spmm(x, crow, col, vals), torch.zeros(3, 4, device=device))
    assert torch.equal(ops.csr_spmm_t(dy, crow, col, vals, 7), torch.zeros(3, 7, device=device))
    assert ops.csr_sddmm(dy, x, crow, col).shape == (0,)
    crow0 = torch.zeros(1, dtype=torch.int32, device=device)  # out == 0
    assert ops.csr_spmm(x, crow0, col, vals).shape == (3, 0)
    assert ops.csr_spmm_t(dy, crow, col, vals, 0).shape == (3, 0)  # in_features == 0


def test_non_contiguous_inputs(device):
    w = random_weight(20, 45, 0.4)
    x = torch.randn(45, 9).T  # (9, 45), non-contiguous
    dy = torch.randn(20, 9).T
    W, X, DY = w.to(device), x.to(device), dy.to(device)
    assert not X.is_contiguous() and not DY.is_contiguous()
    assert_matches(ops.csr_spmm(X, W.crow, W.col, W.values), spmm_ref(x, w), torch.float32)
    assert_matches(ops.csr_spmm_t(DY, W.crow, W.col, W.values, 45), spmm_t_ref(dy, w), torch.float32)
    assert_matches(ops.csr_sddmm(DY, X, W.crow, W.col), sddmm_ref(dy, x, w), torch.float32)


@pytest.mark.parametrize(
    "crow, col, msg",
    [
        ([1, 2, 3], [0, 1, 2], "crow\\[0\\] must be 0"),
        ([0, 2, 2], [0, 1, 2], "must equal nnz"),
        ([0, 3, 2], [0, 1], "non-decreasing|must equal nnz"),
        ([0, 2, 3], [1, 0, 2], "sorted and unique"),
        ([0, 2, 3], [0, 1, 99], "out of range"),
        ([0, 2, 3], [0, 0, 2], "sorted and unique"),
    ],
    ids=["crow0", "crow-end", "decreasing", "unsorted", "out-of-range", "duplicate"],
)
def test_invalid_structure_same_message_on_every_device(device, crow, col, msg):
    crow = torch.tensor(crow, dtype=torch.int32)
    col = torch.tensor(col, dtype=torch.int32)
    vals = torch.ones(col.numel())
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match=msg) as cpu_err:
        ops.csr_spmm(x, crow, col, vals)
    with pytest.raises(RuntimeError, match=msg):  # one token: the check cached per version, not the panels'
        ops.csr_spmm(x[:1], crow, col, vals)
    C, COL, V, X = crow.to(device), col.to(device), vals.to(device), x.to(device)
    with pytest.raises(RuntimeError, match=msg) as err:
        ops.csr_spmm(X, C, COL, V)
    assert str(err.value).splitlines()[0] == str(cpu_err.value).splitlines()[0]
    with pytest.raises(RuntimeError, match=msg):
        ops.csr_spmm_t(torch.randn(4, 2, device=device), C, COL, V, 10)
    with pytest.raises(RuntimeError, match=msg):
        ops.csr_sddmm(torch.randn(4, 2, device=device), X, C, COL)


@pytest.mark.parametrize("slots", [[0, 0], [1, 0], [-1], [3]], ids=["repeated", "decreasing", "negative", "past-nnz"])
def test_invalid_slots(device, slots):
    crow = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    col = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    s = torch.tensor(slots, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="slots"):
        ops.csr_sddmm(torch.randn(4, 2, device=device), torch.randn(4, 5, device=device), crow, col, s)


def test_pattern_changed_in_place_is_checked_again(device):
    """A checked pattern is remembered per tensor version (CUDA): an in-place change re-checks."""
    w = random_weight(40, 50, 0.3, index=torch.int32)
    W = w.to(device)
    W.col = W.col.clone()  # changed below; w keeps the pattern for the reference
    x = torch.randn(3, 50)
    X = x.to(device)
    ops.csr_spmm(X, W.crow, W.col, W.values)
    r = int(torch.nonzero((w.crow[1:] - w.crow[:-1]) >= 2)[0])  # a row with >= 2 non-zeros
    p = int(w.crow[r])
    W.col[p + 1] = W.col[p]  # a duplicate column: bumps col's version
    with pytest.raises(RuntimeError, match="sorted and unique"):
        ops.csr_spmm(X, W.crow, W.col, W.values)
    with pytest.raises(RuntimeError, match="sorted and unique"):
        ops.csr_spmm_t(torch.randn(3, 40, device=device), W.crow, W.col, W.values, 50)
    W.col[p + 1] = int(w.col[p + 1])  # restored: accepted again
    assert_matches(ops.csr_spmm(X, W.crow, W.col, W.values), spmm_ref(x, w), torch.float32)


@requires_cuda
def test_mixed_devices_rejected():
    w = random_weight(8, 8, 0.5)
    with pytest.raises(RuntimeError, match="is on"):
        ops.csr_spmm(torch.randn(2, 8, device="cuda"), w.crow, w.col.cuda(), w.values.cuda())


@requires_cuda
def test_runs_on_current_stream():
    w = random_weight(64, 64, 0.3)
    x = torch.randn(16, 64)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        W, X = w.to("cuda"), x.to("cuda")
        y = ops.csr_spmm(X, W.crow, W.col, W.values)
    s.synchronize()
    assert_matches(y, spmm_ref(x, w), torch.float32)


@requires_cuda
def test_training_step_does_not_synchronise():
    """After the first call has checked the pattern (and slots), the CUDA ops read nothing back."""
    W = random_weight(256, 384, 0.3, torch.bfloat16, index=torch.int16).to("cuda")
    slots = torch.arange(0, W.nnz, 5, device="cuda")
    for T in (4, 256):  # both paths
        x = torch.randn(T, 384, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
        ops.csr_spmm(x, W.crow, W.col, W.values)
        ops.csr_spmm_t(dy, W.crow, W.col, W.values, 384)
        ops.csr_sddmm(dy, x, W.crow, W.col, slots)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.csr_spmm(x, W.crow, W.col, W.values)
            ops.csr_spmm_t(dy, W.crow, W.col, W.values, 384)
            ops.csr_sddmm(dy, x, W.crow, W.col, slots)
            ops.csr_sddmm(dy, x, W.crow, W.col)
        finally:
            torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype", [torch.float64], ids=dname)
def test_gradcheck_spmm(kernel, dtype):
    w = random_weight(6, 9, 0.5, dtype).to(kernel)
    x = torch.randn(2, 4, 9, dtype=dtype, device=kernel, requires_grad=True)
    v = w.values.clone().requires_grad_()
    b = torch.randn(6, dtype=dtype, device=kernel, requires_grad=True)
    def f(x, v, b):
        return ops.csr_spmm(x, w.crow, w.col, v, b)

    assert torch.autograd.gradcheck(f, (x, v, b))
    assert torch.autograd.gradgradcheck(f, (x, v, b))


@pytest.mark.parametrize("dtype", [torch.float64], ids=dname)
def test_gradcheck_spmm_t_and_sddmm(kernel, dtype):
    w = random_weight(6, 9, 0.5, dtype).to(kernel)
    dy = torch.randn(5, 6, dtype=dtype, device=kernel, requires_grad=True)
    x = torch.randn(5, 9, dtype=dtype, device=kernel, requires_grad=True)
    v = w.values.clone().requires_grad_()
    slots = torch.tensor([0, 3, 4, w.nnz - 1], device=kernel)
    assert torch.autograd.gradcheck(lambda dy, v: ops.csr_spmm_t(dy, w.crow, w.col, v, 9), (dy, v))
    assert torch.autograd.gradcheck(lambda dy, x: ops.csr_sddmm(dy, x, w.crow, w.col), (dy, x))
    assert torch.autograd.gradcheck(lambda dy, x: ops.csr_sddmm(dy, x, w.crow, w.col, slots), (dy, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
def test_backward_matches_masked_dense(kernel, dtype):
    """Gradients to x, values and bias equal those of F.linear with the masked dense weight."""
    w = random_weight(40, 150, 0.3, dtype)
    x = torch.randn(3, 30, 150, dtype=torch.float64).to(dtype)
    dy = torch.randn(3, 30, 40, dtype=torch.float64).to(dtype)
    b = torch.randn(40).to(dtype)
    W = w.to(kernel)
    xs = x.to(kernel, copy=True).requires_grad_()
    v = W.values.clone().requires_grad_()
    bs = b.to(kernel, copy=True).requires_grad_()
    ops.csr_spmm(xs, W.crow, W.col, v, bs).backward(dy.to(kernel))
    xd = x.double().requires_grad_()
    wd = w.to_dense().double().requires_grad_()
    bd = b.double().requires_grad_()
    torch.nn.functional.linear(xd, wd, bd).backward(dy.double())
    assert_matches(xs.grad, xd.grad, dtype, "x")
    assert_matches(v.grad, wd.grad[w.row_indices(), w.col.long()], dtype, "values")
    assert_matches(bs.grad, bd.grad, dtype, "bias")


# ------------------------------------------------------------------------------- opcheck / compile
OPCHECK = [(op, dtype, variant) for dtype in [torch.float32, torch.float64, torch.bfloat16]
           for op, variant in [("csr_spmm", "bias"), ("csr_spmm", ""), ("csr_spmm_t", ""), ("csr_sddmm", ""),
                               ("csr_sddmm", "slots")]]


def _opcheck_args(op, dtype, variant, device):
    w = random_weight(12, 40, 0.3, dtype).to(device)
    x = torch.randn(2, 5, 40, device=device).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, 12, device=device).to(dtype).requires_grad_()
    v = w.values.clone().requires_grad_(dtype != torch.bfloat16)
    if op == "csr_spmm":
        return (x, w.crow, w.col, v, torch.randn(12, device=device).to(dtype) if variant == "bias" else None)
    if op == "csr_spmm_t":
        return (dy, w.crow, w.col, v, 40)
    return (dy, x, w.crow, w.col, torch.tensor([1, 4, 7], device=device) if variant == "slots" else None)


@pytest.mark.parametrize("op, dtype, variant", OPCHECK,
                         ids=["-".join(filter(None, (op, dname(d), v))) for op, d, v in OPCHECK])
def test_opcheck(device, op, dtype, variant):
    torch.library.opcheck(getattr(torch.ops.seft, op).default, _opcheck_args(op, dtype, variant, device))


def test_compile_fullgraph(device):
    from seft_ext import SparseLinear

    lin = torch.nn.Linear(64, 32)
    layer = SparseLinear.from_dense(lin, torch.rand(32, 64) < 0.3).to(device)
    x = torch.randn(4, 64, device=device, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    gx, gv = x.grad.clone(), layer.values.grad.clone()
    assert_matches(eager, spmm_ref(x.detach(), layer.weight, layer.bias.detach()), torch.float32)
    x.grad = None
    layer.values.grad = None
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(layer.values.grad, gv)


# ------------------------------------------------------------------------------- property test
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40), inn=st.integers(1, 300), T=st.integers(0, 70),
       density=st.sampled_from([0.0, 0.05, 0.5, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_fp64(device, out, inn, T, density, seed):
    torch.manual_seed(seed)
    w = random_weight(out, inn, density, torch.float64)
    x, dy = torch.randn(T, inn, dtype=torch.float64), torch.randn(T, out, dtype=torch.float64)
    W, X, DY = w.to(device), x.to(device), dy.to(device)
    assert_matches(ops.csr_spmm(X, W.crow, W.col, W.values), spmm_ref(x, w), torch.float64)
    assert_matches(ops.csr_spmm_t(DY, W.crow, W.col, W.values, inn), spmm_t_ref(dy, w), torch.float64)
    assert_matches(ops.csr_sddmm(DY, X, W.crow, W.col), sddmm_ref(dy, x, w), torch.float64)
