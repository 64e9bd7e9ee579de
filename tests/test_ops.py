"""csr_spmm / csr_spmm_t / csr_sddmm against dense fp64 math, gradients, opcheck, compile."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from seft_ext import ops
from reference import random_weight, spmm_ref, spmm_t_ref, sddmm_ref, tol

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (out, in): in > 128 and > 512 cross several column panels of the kernels
SHAPES = [(1, 1), (7, 5), (33, 130), (70, 600)]
TOKENS = [0, 1, 5, 16, 33, 130]


def close(actual, expected, dtype):
    rtol, atol = tol(dtype)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_spmm_spmm_t_sddmm_match_dense(isa, dtype, shape, density):
    out, inn = shape
    w = random_weight(out, inn, density, dtype)
    for T in TOKENS:
        x = torch.randn(T, inn).to(dtype)
        dy = torch.randn(T, out).to(dtype)
        bias = torch.randn(out).to(dtype)
        close(ops.csr_spmm(x, w.crow, w.col, w.values), spmm_ref(x, w), dtype)
        close(ops.csr_spmm(x, w.crow, w.col, w.values, bias), spmm_ref(x, w, bias), dtype)
        close(ops.csr_spmm_t(dy, w.crow, w.col, w.values, inn), spmm_t_ref(dy, w), dtype)
        g = ops.csr_sddmm(dy, x, w.crow, w.col)
        assert g.dtype == ops.acc_dtype(dtype)
        close(g, sddmm_ref(dy, x, w), dtype if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("index", [torch.int16, torch.int32])
def test_batch_dims_and_index_dtypes(isa, index):
    w = random_weight(20, 45, 0.4, torch.float32, index=index)
    x, dy = torch.randn(2, 3, 45), torch.randn(2, 3, 20)
    y = ops.csr_spmm(x, w.crow, w.col, w.values)
    assert y.shape == (2, 3, 20)
    close(y, spmm_ref(x, w), torch.float32)
    dx = ops.csr_spmm_t(dy, w.crow, w.col, w.values, 45)
    assert dx.shape == (2, 3, 45)
    close(dx, spmm_t_ref(dy, w), torch.float32)
    close(ops.csr_sddmm(dy, x, w.crow, w.col), sddmm_ref(dy, x, w), torch.float32)


def test_non_contiguous_inputs(isa):
    w = random_weight(20, 45, 0.4)
    x = torch.randn(45, 9).T  # (9, 45), non-contiguous
    dy = torch.randn(20, 9).T
    close(ops.csr_spmm(x, w.crow, w.col, w.values), spmm_ref(x, w), torch.float32)
    close(ops.csr_spmm_t(dy, w.crow, w.col, w.values, 45), spmm_t_ref(dy, w), torch.float32)
    close(ops.csr_sddmm(dy, x, w.crow, w.col), sddmm_ref(dy, x, w), torch.float32)


@pytest.mark.parametrize("T", [1, 7, 70])
def test_sddmm_slots(isa, T):
    w = random_weight(30, 200, 0.3)
    x, dy = torch.randn(T, 200), torch.randn(T, 30)
    for k in [0, 1, 17, w.nnz]:
        slots = torch.randperm(w.nnz)[:k].sort().values
        g = ops.csr_sddmm(dy, x, w.crow, w.col, slots)
        close(g, sddmm_ref(dy, x, w, slots), torch.float32)


def test_results_independent_of_thread_count():
    """Every op's result is independent of the number of threads (fixed reduction orders)."""
    w = random_weight(300, 700, 0.3)
    x, dy = torch.randn(100, 700), torch.randn(100, 300)
    n = torch.get_num_threads()
    results = []
    for threads in [1, 2, 3]:
        torch.set_num_threads(threads)
        results.append((ops.csr_spmm(x, w.crow, w.col, w.values), ops.csr_spmm_t(dy, w.crow, w.col, w.values, 700),
                        ops.csr_sddmm(dy, x, w.crow, w.col)))
    torch.set_num_threads(n)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def test_spmm_t_is_deterministic(isa):
    w = random_weight(200, 300, 0.5)
    dy = torch.randn(77, 200)
    first = ops.csr_spmm_t(dy, w.crow, w.col, w.values, 300)
    for _ in range(3):
        assert torch.equal(first, ops.csr_spmm_t(dy, w.crow, w.col, w.values, 300))


# ------------------------------------------------------------------------------- gradients
def test_gradcheck_spmm(isa):
    w = random_weight(6, 9, 0.5, torch.float64)
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    f = lambda x, v, b: ops.csr_spmm(x, w.crow, w.col, v, b)
    assert torch.autograd.gradcheck(f, (x, v, b))
    assert torch.autograd.gradgradcheck(f, (x, v, b))


def test_gradcheck_spmm_t_and_sddmm(isa):
    w = random_weight(6, 9, 0.5, torch.float64)
    dy = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_()
    slots = torch.tensor([0, 3, 4, w.nnz - 1])
    assert torch.autograd.gradcheck(lambda dy, v: ops.csr_spmm_t(dy, w.crow, w.col, v, 9), (dy, v))
    assert torch.autograd.gradcheck(lambda dy, x: ops.csr_sddmm(dy, x, w.crow, w.col), (dy, x))
    assert torch.autograd.gradcheck(lambda dy, x: ops.csr_sddmm(dy, x, w.crow, w.col, slots), (dy, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_masked_dense(isa, dtype):
    """Gradients to x, values and bias equal those of F.linear with the masked dense weight."""
    w = random_weight(40, 150, 0.3, dtype)
    x = torch.randn(3, 30, 150, dtype=torch.float64).to(dtype)
    dy = torch.randn(3, 30, 40, dtype=torch.float64).to(dtype)
    xs = x.clone().requires_grad_()
    v = w.values.clone().requires_grad_()
    b = torch.randn(40).to(dtype).requires_grad_()
    ops.csr_spmm(xs, w.crow, w.col, v, b).backward(dy)
    xd = x.double().requires_grad_()
    wd = w.to_dense().double().requires_grad_()
    bd = b.detach().double().requires_grad_()
    torch.nn.functional.linear(xd, wd, bd).backward(dy.double())
    close(xs.grad, xd.grad, dtype)
    close(v.grad, wd.grad[w.row_indices(), w.col.long()], dtype)
    close(b.grad, bd.grad, dtype)


# ------------------------------------------------------------------------------- opcheck / compile
def _samples():
    for dtype in [torch.float32, torch.float64, torch.bfloat16]:
        w = random_weight(12, 40, 0.3, dtype)
        x = torch.randn(2, 5, 40).to(dtype).requires_grad_()
        dy = torch.randn(2, 5, 12).to(dtype).requires_grad_()
        v = w.values.clone().requires_grad_(dtype != torch.bfloat16)
        yield "csr_spmm", (x, w.crow, w.col, v, torch.randn(12).to(dtype))
        yield "csr_spmm", (x, w.crow, w.col, v, None)
        yield "csr_spmm_t", (dy, w.crow, w.col, v, 40)
        yield "csr_sddmm", (dy, x, w.crow, w.col, None)
        yield "csr_sddmm", (dy, x, w.crow, w.col, torch.tensor([1, 4, 7]))


@pytest.mark.parametrize("i", range(15))
def test_opcheck(i):
    name, args = list(_samples())[i]
    torch.library.opcheck(getattr(torch.ops.seft, name).default, args)


def test_compile_fullgraph():
    from seft_ext import SparseLinear

    lin = torch.nn.Linear(64, 32)
    layer = SparseLinear.from_dense(lin, torch.rand(32, 64) < 0.3)
    x = torch.randn(4, 64, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    gx, gv = x.grad.clone(), layer.values.grad.clone()
    x.grad = None
    layer.values.grad = None
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(layer.values.grad, gv)


# ------------------------------------------------------------------------------- property test
@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40), inn=st.integers(1, 300), T=st.integers(0, 70),
       density=st.sampled_from([0.0, 0.05, 0.5, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_fp64(out, inn, T, density, seed):
    torch.manual_seed(seed)
    w = random_weight(out, inn, density, torch.float64)
    x, dy = torch.randn(T, inn, dtype=torch.float64), torch.randn(T, out, dtype=torch.float64)
    close(ops.csr_spmm(x, w.crow, w.col, w.values), spmm_ref(x, w), torch.float64)
    close(ops.csr_spmm_t(dy, w.crow, w.col, w.values, inn), spmm_t_ref(dy, w), torch.float64)
    close(ops.csr_sddmm(dy, x, w.crow, w.col), sddmm_ref(dy, x, w), torch.float64)
