"""The CUDA ops against the CPU ops (same inputs) and against dense float64 math, on every
kernel path (auto, forced tensor cores, forced CUDA cores).

Skipped without a CUDA device (and without a library built with CUDA kernels).
"""
from __future__ import annotations

import pytest
import torch

from cuda_env import require_cuda_build

require_cuda_build()

ops = torch.ops.seft
DEV = "cuda"

# dtype -> (rtol, atol) against dense fp64 math; the CPU/CUDA comparison uses the same.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def random_csr(out: int, inn: int, density: float, idx_dtype, val_dtype, seed: int, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out, inn, generator=g) < density
    for r in empty_rows:
        mask[r] = False
    crow = torch.zeros(out + 1, dtype=torch.int32)
    crow[1:] = mask.sum(1).cumsum(0).to(torch.int32)
    col = mask.nonzero()[:, 1].to(idx_dtype)  # row-major, sorted within rows
    vals = torch.randn(int(mask.sum()), generator=g).to(val_dtype)
    return crow, col, vals


def dense_of(crow, col, vals, inn):
    out = crow.numel() - 1
    w = torch.zeros(out, inn, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(out), (crow[1:] - crow[:-1]).long())
    w[rows, col.long()] = vals.double()
    return w


def to_dev(*ts):
    return [t.to(DEV) if t is not None else None for t in ts]


def assert_close(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol)


PATHS = ["auto", "tensor_core", "cuda_core"]


@pytest.fixture(params=PATHS)
def path(request):
    """Forces a kernel path for one test (tensor_core applies to bf16 / fp16 only: for fp32 /
    fp64 it is the cuda_core path again, and is skipped)."""
    dtype = request.node.callspec.params.get("dtype")
    if request.param == "tensor_core" and dtype in (torch.float32, torch.float64):
        pytest.skip("no tensor-core path for this dtype (the cuda_core case covers it)")
    ops.cuda_path(request.param)
    yield request.param
    ops.cuda_path("auto")


DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
IDX = [torch.int16, torch.int32]
# (leading dims of the dense operands, out, in, density)
SHAPES = [((5,), 37, 53, 0.2), ((2, 3), 64, 40, 0.5), ((1,), 8, 300, 0.05), ((0,), 16, 16, 0.3),
          ((33,), 70, 129, 0.1), ((), 12, 9, 0.4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", IDX, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
@pytest.mark.parametrize("with_bias", [False, True])
def test_spmm(path, dtype, idx, shape, with_bias):
    lead, out, inn, dens = shape
    crow, col, vals = random_csr(out, inn, dens, idx, dtype, seed=out * 7 + inn, empty_rows=(0, out // 2))
    x = torch.randn(*lead, inn).to(dtype)
    bias = torch.randn(out).to(dtype) if with_bias else None
    y_cpu = ops.csr_spmm(x, crow, col, vals, bias)
    y_gpu = ops.csr_spmm(*to_dev(x, crow, col, vals, bias))
    assert y_gpu.device.type == "cuda" and y_gpu.dtype == dtype and y_gpu.shape == (*lead, out)
    want = x.double() @ dense_of(crow, col, vals, inn).T
    if bias is not None:
        want = want + bias.double()
    assert_close(y_gpu, want, dtype)
    assert_close(y_gpu, y_cpu, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", IDX, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
def test_spmm_t(path, dtype, idx, shape):
    lead, out, inn, dens = shape
    crow, col, vals = random_csr(out, inn, dens, idx, dtype, seed=out * 5 + inn, empty_rows=(1,))
    dy = torch.randn(*lead, out).to(dtype)
    dx_cpu = ops.csr_spmm_t(dy, crow, col, vals, inn)
    dx_gpu = ops.csr_spmm_t(*to_dev(dy, crow, col, vals), inn)
    assert dx_gpu.device.type == "cuda" and dx_gpu.dtype == dtype and dx_gpu.shape == (*lead, inn)
    want = dy.double() @ dense_of(crow, col, vals, inn)
    assert_close(dx_gpu, want, dtype)
    assert_close(dx_gpu, dx_cpu, dtype)
    # deterministic: bitwise the same on a second call
    assert torch.equal(dx_gpu, ops.csr_spmm_t(*to_dev(dy, crow, col, vals), inn))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", IDX, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
@pytest.mark.parametrize("use_slots", [False, True])
def test_sddmm(path, dtype, idx, shape, use_slots):
    lead, out, inn, dens = shape
    crow, col, _ = random_csr(out, inn, dens, idx, dtype, seed=out * 3 + inn, empty_rows=(out - 1,))
    nnz = col.numel()
    x = torch.randn(*lead, inn).to(dtype)
    dy = torch.randn(*lead, out).to(dtype)
    slots = None
    if use_slots:
        g = torch.Generator().manual_seed(nnz)
        slots = torch.nonzero(torch.rand(nnz, generator=g) < 0.4).flatten()
    g_cpu = ops.csr_sddmm(dy, x, crow, col, slots)
    g_gpu = ops.csr_sddmm(*to_dev(dy, x, crow, col, slots))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = nnz if slots is None else slots.numel()
    assert g_gpu.device.type == "cuda" and g_gpu.dtype == acc and g_gpu.shape == (n,)
    full = (dy.double().reshape(-1, out).T @ x.double().reshape(-1, inn))  # (out, in)
    rows = torch.repeat_interleave(torch.arange(out), (crow[1:] - crow[:-1]).long())
    want = full[rows, col.long()]
    if slots is not None:
        want = want[slots]
    # Inputs are exact in fp64, so only the accumulation type's rounding remains.
    assert_close(g_gpu, want, acc)
    assert_close(g_gpu, g_cpu, acc)


def test_empty_weight():
    crow = torch.zeros(5, dtype=torch.int32, device=DEV)
    col = torch.zeros(0, dtype=torch.int32, device=DEV)
    vals = torch.zeros(0, device=DEV)
    x = torch.randn(3, 7, device=DEV)
    assert torch.equal(ops.csr_spmm(x, crow, col, vals, None), torch.zeros(3, 4, device=DEV))
    assert torch.equal(ops.csr_spmm_t(torch.randn(3, 4, device=DEV), crow, col, vals, 7), torch.zeros(3, 7, device=DEV))
    assert ops.csr_sddmm(torch.randn(3, 4, device=DEV), x, crow, col, None).shape == (0,)
    # out == 0
    crow0 = torch.zeros(1, dtype=torch.int32, device=DEV)
    assert ops.csr_spmm(x, crow0, col, vals, None).shape == (3, 0)
    # in_features == 0
    assert ops.csr_spmm_t(torch.randn(3, 4, device=DEV), crow, col, vals, 0).shape == (3, 0)


def test_non_contiguous_inputs():
    crow, col, vals = random_csr(20, 30, 0.3, torch.int32, torch.float32, seed=1)
    x = torch.randn(30, 6).T  # (6, 30), non-contiguous
    y = ops.csr_spmm(*to_dev(x, crow, col, vals, None))
    assert_close(y, x.double() @ dense_of(crow, col, vals, 30).T, torch.float32)


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
)
def test_invalid_structure_same_message_as_cpu(crow, col, msg):
    crow = torch.tensor(crow, dtype=torch.int32)
    col = torch.tensor(col, dtype=torch.int32)
    vals = torch.ones(col.numel())
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match=msg) as cpu_err:
        ops.csr_spmm(x, crow, col, vals, None)
    with pytest.raises(RuntimeError, match=msg) as gpu_err:
        ops.csr_spmm(*to_dev(x, crow, col, vals, None))
    assert str(cpu_err.value).splitlines()[0] == str(gpu_err.value).splitlines()[0]
    with pytest.raises(RuntimeError, match=msg):
        ops.csr_spmm_t(*to_dev(torch.randn(4, 2), crow, col, vals), 10)
    with pytest.raises(RuntimeError, match=msg):
        ops.csr_sddmm(*to_dev(torch.randn(4, 2), x, crow, col, None))


@pytest.mark.parametrize("slots", [[0, 0], [1, 0], [-1], [3]])
def test_invalid_slots(slots):
    crow = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEV)
    col = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV)
    s = torch.tensor(slots, dtype=torch.int64, device=DEV)
    with pytest.raises(RuntimeError, match="slots"):
        ops.csr_sddmm(torch.randn(4, 2, device=DEV), torch.randn(4, 5, device=DEV), crow, col, s)


def test_mixed_devices_rejected():
    crow, col, vals = random_csr(8, 8, 0.5, torch.int32, torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="is on"):
        ops.csr_spmm(torch.randn(2, 8, device=DEV), crow, col.to(DEV), vals.to(DEV), None)


def test_runs_on_current_stream():
    crow, col, vals = random_csr(64, 64, 0.3, torch.int32, torch.float32, seed=3)
    x = torch.randn(16, 64)
    want = ops.csr_spmm(x, crow, col, vals, None)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        args = to_dev(x, crow, col, vals, None)
        y = ops.csr_spmm(*args)
    s.synchronize()
    assert_close(y, want, torch.float32)


# Many tokens and several 128-wide tiles / 32-deep slices in every direction; in % 8 != 0
# and odd token counts take the kernels' scalar-load branches.
BIG = [(200, 300, 260, 0.3), (130, 129, 1000, 0.05), (64, 256, 256, 0.95), (257, 136, 259, 0.5), (96, 33, 7, 0.6)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("idx", IDX, ids=str)
@pytest.mark.parametrize("shape", BIG, ids=lambda s: f"T{s[0]}-{s[1]}x{s[2]}-d{s[3]}")
def test_many_tokens_all_ops(path, dtype, idx, shape):
    T, out, inn, dens = shape
    crow, col, vals = random_csr(out, inn, dens, idx, dtype, seed=T + out + inn, empty_rows=(0, out - 1))
    x = torch.randn(T, inn).to(dtype)
    dy = torch.randn(T, out).to(dtype)
    bias = torch.randn(out).to(dtype)
    W = dense_of(crow, col, vals, inn)
    X, DY, C, COL, V, B = to_dev(x, dy, crow, col, vals, bias)
    y = ops.csr_spmm(X, C, COL, V, B)
    assert_close(y, x.double() @ W.T + bias.double(), dtype)
    assert_close(y, ops.csr_spmm(x, crow, col, vals, bias), dtype)
    dx = ops.csr_spmm_t(DY, C, COL, V, inn)
    assert_close(dx, dy.double() @ W, dtype)
    assert_close(dx, ops.csr_spmm_t(dy, crow, col, vals, inn), dtype)
    rows = torch.repeat_interleave(torch.arange(out), (crow[1:] - crow[:-1]).long())
    want_g = (dy.double().T @ x.double())[rows, col.long()]
    g = ops.csr_sddmm(DY, X, C, COL, None)
    assert_close(g, want_g, torch.float32)
    slots = torch.arange(1, col.numel(), 3)
    assert_close(ops.csr_sddmm(DY, X, C, COL, slots.to(DEV)), want_g[slots], torch.float32)
    # deterministic on every path: bitwise the same on a second call
    assert torch.equal(y, ops.csr_spmm(X, C, COL, V, B))
    assert torch.equal(dx, ops.csr_spmm_t(DY, C, COL, V, inn))
    assert torch.equal(g, ops.csr_sddmm(DY, X, C, COL, None))


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 9, 17])
def test_few_tokens_split_rows(T):
    """Few tokens and many rows: csr_spmm_t splits the rows across blocks and sums the splits."""
    crow, col, vals = random_csr(3000, 300, 0.2, torch.int16, torch.bfloat16, seed=T)
    dy = torch.randn(T, 3000).to(torch.bfloat16)
    x = torch.randn(T, 300).to(torch.bfloat16)
    W = dense_of(crow, col, vals, 300)
    DY, X, C, COL, V = to_dev(dy, x, crow, col, vals)
    assert_close(ops.csr_spmm_t(DY, C, COL, V, 300), dy.double() @ W, torch.bfloat16)
    assert_close(ops.csr_spmm(X, C, COL, V, None), x.double() @ W.T, torch.bfloat16)


@pytest.mark.parametrize("idx", IDX, ids=str)
def test_tile_ptr_cuda_matches_cpu(idx):
    crow, col, _ = random_csr(77, 700, 0.2, idx, torch.float32, seed=4, empty_rows=(3,))
    for tile in (1, 64, 128, 1000):
        want = ops.csr_tile_ptr(crow, col, 700, tile)
        got = ops.csr_tile_ptr(*to_dev(crow, col), 700, tile)
        assert torch.equal(got.cpu(), want)


def test_training_step_does_not_synchronise():
    """After the first call has checked the pattern (and slots), the ops read nothing back."""
    crow, col, vals = random_csr(256, 384, 0.3, torch.int16, torch.bfloat16, seed=5)
    C, COL, V = to_dev(crow, col, vals)
    slots = torch.arange(0, col.numel(), 5, device=DEV)
    for T in (4, 256):  # both paths
        x = torch.randn(T, 384, device=DEV, dtype=torch.bfloat16)
        dy = torch.randn(T, 256, device=DEV, dtype=torch.bfloat16)
        ops.csr_spmm(x, C, COL, V, None), ops.csr_spmm_t(dy, C, COL, V, 384), ops.csr_sddmm(dy, x, C, COL, slots)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.csr_spmm(x, C, COL, V, None)
            ops.csr_spmm_t(dy, C, COL, V, 384)
            ops.csr_sddmm(dy, x, C, COL, slots)
            ops.csr_sddmm(dy, x, C, COL, None)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_pattern_changed_in_place_is_checked_again():
    crow, col, vals = random_csr(40, 50, 0.3, torch.int32, torch.float32, seed=6)
    C, COL, V = to_dev(crow, col, vals)
    x = torch.randn(3, 50, device=DEV)
    ops.csr_spmm(x, C, COL, V, None)
    r = int(torch.nonzero((crow[1:] - crow[:-1]) >= 2)[0])  # a row with >= 2 non-zeros
    p = int(crow[r])
    COL[p + 1] = COL[p]  # duplicate column: bumps col's version
    with pytest.raises(RuntimeError, match="sorted and unique"):
        ops.csr_spmm(x, C, COL, V, None)
    with pytest.raises(RuntimeError, match="sorted and unique"):
        ops.csr_spmm_t(torch.randn(3, 40, device=DEV), C, COL, V, 50)
    COL[p + 1] = int(col[p + 1])  # restored: accepted again, same result as the CPU
    assert_close(ops.csr_spmm(x, C, COL, V, None), ops.csr_spmm(x.cpu(), crow, col, vals, None), torch.float32)
