"""SparseLinear: an nn.Linear whose weight is stored and computed in CSR form (or in r x c
blocks: BSR)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .bsr import BSRWeight
from .sparse import CSRWeight


class CSRPatternMixin:
    """nnz / sparsity of a module holding a CSR pattern in ``crow`` / ``col`` buffers."""

    out_features: int
    in_features: int

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def sparsity(self) -> float:
        total = self.out_features * self.in_features
        return 1.0 - self.nnz / total if total else 0.0


class SparseLinear(CSRPatternMixin, nn.Module):
    """``y = x W^T + b`` with W in CSR form (buffers ``crow``, ``col``; parameter ``values``).

    With a :class:`BSRWeight` the weight is in r x c blocks: ``values`` is ``[nblocks, r, c]``,
    ``block`` is ``(r, c)`` (None for CSR) and forward runs ``bsr_spmm``.
    Forward and backward run on ``torch.ops.seft`` kernels; gradients reach x, ``values``
    and ``bias``. Works under ``torch.compile(fullgraph=True)``.
    """

    def __init__(self, weight, bias: Optional[Tensor] = None):
        super().__init__()
        if not isinstance(weight, (CSRWeight, BSRWeight)):
            raise TypeError(f"SparseLinear: weight must be a CSRWeight or a BSRWeight, got {type(weight)}")
        self.block = weight.block if isinstance(weight, BSRWeight) else None
        self.out_features, self.in_features = weight.shape
        self.register_buffer("crow", weight.crow)
        self.register_buffer("col", weight.col)
        self.values = nn.Parameter(weight.values.detach().clone())
        if bias is not None:
            bias = bias.detach()
            if bias.shape != (self.out_features,):
                raise ValueError(f"SparseLinear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            if bias.dtype != weight.dtype or bias.device != weight.device:
                raise ValueError(f"SparseLinear: bias ({bias.dtype}, {bias.device}) must match the weight "
                                 f"({weight.dtype}, {weight.device})")
            self.bias = nn.Parameter(bias.clone())
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None, block=None) -> SparseLinear:
        """Keep ``linear.weight[mask]`` (``mask=None``: its non-zeros); the bias is copied.

        ``block=(r, c)``: a BSR weight of the blocks ``mask`` selects (a block mask
        ``[ceil(out / r), ceil(in / c)]`` or a dense mask constant on every block; see
        :meth:`BSRWeight.from_dense`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        if block is not None:
            return cls(BSRWeight.from_dense(linear.weight.detach(), block, mask), linear.bias)
        weight = CSRWeight.from_dense(linear.weight.detach(), mask)
        return cls(weight, linear.bias)

    @property
    def nnz(self) -> int:
        if self.block is None:
            return self.col.numel()
        return int(self.weight.mask().sum())  # entries inside the stored blocks, padding excluded

    @property
    def weight(self):
        """The CSR (or BSR) weight (shares storage with the module's tensors)."""
        if self.block is not None:
            return BSRWeight(self.crow, self.col, self.values.detach(), (self.out_features, self.in_features))
        return CSRWeight(self.crow, self.col, self.values.detach(), (self.out_features, self.in_features))

    def to_dense(self) -> Tensor:
        """The dense weight matrix (out, in)."""
        return self.weight.to_dense()

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0:
            raise ValueError("SparseLinear: x must have at least 1 dimension")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: x must have last dimension in_features = {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if self.block is not None:
            return ops.bsr_spmm(x, self.crow, self.col, self.values, self.out_features, self.bias)
        return ops.csr_spmm(x, self.crow, self.col, self.values, self.bias)

    def extra_repr(self) -> str:
        blk = "" if self.block is None else f"block={self.block}, "
        return (f"in_features={self.in_features}, out_features={self.out_features}, {blk}nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, dtype={self.values.dtype}, index={self.col.dtype}, "
                f"bias={self.bias is not None}")
