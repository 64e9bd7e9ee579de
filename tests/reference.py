"""Independent references: dense fp64 math on the densified weight."""
import torch

from seft_ext import CSRWeight


def random_weight(out, inn, density, dtype=torch.float32, index=None, special_rows=True):
    """A CSR weight with random values; row 0 empty and row 1 full when there are >= 3 rows."""
    dense = torch.randn(out, inn, dtype=torch.float64)
    mask = torch.rand(out, inn) < density
    if special_rows and out >= 3:
        mask[0] = False
        mask[1] = True
    w = CSRWeight.from_dense(dense, mask, dtype=dtype)
    if index is not None and index != w.col.dtype:
        w = CSRWeight(w.crow, w.col.to(index), w.values, w.shape)
    return w


def dense64(w):
    return w.to_dense().double()


def spmm_ref(x, w, bias=None):
    y = x.double() @ dense64(w).T
    return y + bias.double() if bias is not None else y


def spmm_t_ref(dy, w):
    return dy.double() @ dense64(w)


def sddmm_ref(dy, x, w, slots=None):
    g = dy.double().reshape(-1, w.shape[0]).T @ x.double().reshape(-1, w.shape[1])
    vals = g[w.row_indices(), w.col.long()]
    return vals if slots is None else vals[slots]


def tol(dtype):
    """(rtol, atol) for outputs of unit-scale inputs summed over ~100s of products."""
    return {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-4),
            torch.bfloat16: (2e-2, 1e-1), torch.float16: (2e-3, 2e-2)}[dtype]
