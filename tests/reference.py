"""The one reference of the op tests: dense fp64 math on the densified weight, and the one
tolerance table they compare with."""
import torch

from seft_ext import BSRWeight, CSRWeight


def random_weight(out, inn, density, dtype=torch.float32, index=None, special_rows=True, device="cpu"):
    """A CSR weight with random values, built on `device`. With special_rows: row 0 empty,
    row 1 full (>= 3 rows), the last row empty (>= 4 rows) and a middle one (>= 5 rows)."""
    dense = torch.randn(out, inn, dtype=torch.float64, device=device)
    mask = torch.rand(out, inn, device=device) < density
    if special_rows and out >= 3:
        mask[0] = False
        mask[1] = True
    if special_rows and out >= 4:
        mask[-1] = False
    if special_rows and out >= 5:
        mask[out // 2] = False
    w = CSRWeight.from_dense(dense, mask, dtype=dtype)
    if index is not None and index != w.col.dtype:
        w = CSRWeight(w.crow, w.col.to(index), w.values, w.shape)
    return w


def dense64(w):
    return w.to_dense().double()


class Dense:
    """A CSR weight densified once, in fp64, with the reference of every op on it."""

    def __init__(self, w):
        self.shape = w.shape
        self.w = dense64(w)
        self.rows, self.cols = w.row_indices(), w.col.long()

    def spmm(self, x, bias=None):  # Y = X W^T (+ b)
        y = x.double() @ self.w.T
        return y + bias.double() if bias is not None else y

    def spmm_t(self, dy):  # dX = dY W
        return dy.double() @ self.w

    def sddmm(self, dy, x, slots=None):  # (dY^T X) at the non-zeros (the slots)
        g = dy.double().reshape(-1, self.shape[0]).T @ x.double().reshape(-1, self.shape[1])
        vals = g[self.rows, self.cols]
        return vals if slots is None else vals[slots]


def random_bsr(out, inn, block, density, dtype=torch.float32, index=None, empty_rows=True, device="cpu"):
    """A BSR weight with random values in blocks of `block`. With empty_rows: block row 0 empty,
    block row 1 full (>= 3 block rows), the last block row empty (>= 4 block rows)."""
    r, c = block
    nbr, nbc = -(-out // r), -(-inn // c)
    dense = torch.randn(out, inn, dtype=torch.float64, device=device)
    bmask = torch.rand(nbr, nbc, device=device) < density
    if empty_rows and nbr >= 3:
        bmask[0] = False
        bmask[1] = True
    if empty_rows and nbr >= 4:
        bmask[-1] = False
    w = BSRWeight.from_dense(dense, block, bmask, dtype=dtype)
    if index is not None and index != w.col.dtype:
        w = BSRWeight(w.crow, w.col.to(index), w.values, w.shape)
    return w


class DenseBSR:
    """A BSR weight densified once, in fp64, with the reference of every BSR op on it."""

    def __init__(self, w):
        self.shape, self.block, self.w = w.shape, w.block, dense64(w)
        self.brows, self.bcols = w.block_rows(), w.col.long()

    def spmm(self, x, bias=None):
        return Dense.spmm(self, x, bias)

    def spmm_t(self, dy):
        return Dense.spmm_t(self, dy)

    def sddmm(self, dy, x, slots=None):  # (dY^T X) on the blocks (padding 0), [n, r, c]
        (out, inn), (r, c) = self.shape, self.block
        g = dy.double().reshape(-1, out).T @ x.double().reshape(-1, inn)
        nbr, nbc = -(-out // r), -(-inn // c)
        p = g.new_zeros(nbr * r, nbc * c)
        p[:out, :inn] = g
        blocks = p.view(nbr, r, nbc, c).permute(0, 2, 1, 3)[self.brows, self.bcols]
        return blocks if slots is None else blocks[slots]


def spmm_ref(x, w, bias=None):
    return Dense(w).spmm(x, bias)


def spmm_t_ref(dy, w):
    return Dense(w).spmm_t(dy)


def sddmm_ref(dy, x, w, slots=None):
    return Dense(w).sddmm(dy, x, slots)


# (rtol, atol) for outputs of unit-scale inputs summed over up to ~1000 products, on every
# device and kernel path. The inputs are exact in fp64, so what remains is the accumulation's
# rounding (fp32 for the 16-bit dtypes, on the tensor-core path too: bf16 / fp16 products are
# exact in its fp32 accumulators) and the one rounding of the result to its dtype. csr_sddmm
# returns the accumulation dtype: compare it with acc_dtype's row.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-4),
       torch.bfloat16: (2e-2, 1e-1), torch.float16: (2e-3, 2e-2)}


def tol(dtype):
    return TOL[dtype]


def assert_matches(actual, expected, dtype, msg=""):
    """actual (any device, any dtype) against the fp64 reference, with dtype's tolerances."""
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)
