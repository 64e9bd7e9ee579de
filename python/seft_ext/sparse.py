"""The CSR weight type: an (out, in) matrix as row offsets, column indices and values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

VALUE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INT16_MAX_COLUMNS = 32768  # int16 holds column indices 0 .. 32767


def index_dtype(in_features: int) -> torch.dtype:
    """int16 column indices when the row is short enough, else int32 (memory matters)."""
    return torch.int16 if in_features <= INT16_MAX_COLUMNS else torch.int32


def _fail(msg: str) -> None:
    raise ValueError(f"CSRWeight: {msg}")


@dataclass
class CSRWeight:
    """A CSR matrix of shape ``(out, in)``.

    ``crow``: int32 ``[out + 1]``, ``crow[0] == 0``, non-decreasing, ``crow[-1] == nnz``.
    ``col``: int16 (``in <= 32768``) or int32 ``[nnz]``, sorted and unique within each row.
    ``values``: float32 / float64 / bfloat16 / float16 ``[nnz]``, finite.
    The constructor validates all of it.
    """

    crow: Tensor
    col: Tensor
    values: Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dense(cls, dense: Tensor, mask: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> CSRWeight:
        """Keep ``dense[mask]`` (``mask=None``: the non-zeros of ``dense``)."""
        if not isinstance(dense, Tensor) or dense.dim() != 2:
            _fail(f"dense must be a 2-D tensor, got {getattr(dense, 'shape', type(dense))}")
        if not dense.is_floating_point():
            _fail(f"dense must be floating point, got {dense.dtype}")
        dense = dense.detach()
        if not torch.isfinite(dense).all():
            _fail("dense contains NaN or Inf")
        if mask is None:
            mask = dense != 0
        else:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                _fail(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
            if mask.shape != dense.shape:
                _fail(f"mask shape {tuple(mask.shape)} differs from dense shape {tuple(dense.shape)}")
            if mask.device != dense.device:
                _fail(f"mask is on {mask.device} but dense is on {dense.device}")
        out, in_features = dense.shape
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: rows grouped, columns sorted
        counts = torch.bincount(rows, minlength=out)
        crow = torch.zeros(out + 1, dtype=torch.int64, device=dense.device)
        torch.cumsum(counts, 0, out=crow[1:])
        values = dense[rows, cols]
        if dtype is not None:
            values = values.to(dtype)
        return cls(crow.to(torch.int32), cols.to(index_dtype(in_features)), values.contiguous(), (out, in_features))

    @classmethod
    def from_torch_sparse(cls, t: Tensor, dtype: Optional[torch.dtype] = None) -> CSRWeight:
        """From a 2-D torch sparse CSR tensor (or a COO tensor, coalesced first)."""
        if not isinstance(t, Tensor):
            _fail(f"expected a torch sparse tensor, got {type(t)}")
        if t.layout == torch.sparse_coo:
            t = t.coalesce().to_sparse_csr()
        if t.layout != torch.sparse_csr:
            _fail(f"expected layout torch.sparse_csr or torch.sparse_coo, got {t.layout}")
        if t.dim() != 2:
            _fail(f"expected a 2-D sparse tensor, got {t.dim()}-D")
        out, in_features = t.shape
        crow, col = t.crow_indices(), t.col_indices()
        nnz = col.numel()
        # range-check the wide indices before narrowing them (a cast would wrap silently)
        if nnz >= 2**31 - 1:
            _fail("more than 2^31 - 2 non-zeros")
        if crow.numel() and (int(crow.min()) < -(2**31) or int(crow.max()) >= 2**31):
            _fail(f"crow entries are out of range [0, 2^31), got [{int(crow.min())}, {int(crow.max())}]")
        if nnz and (int(col.min()) < 0 or int(col.max()) >= in_features):
            bad = int(col.min()) if int(col.min()) < 0 else int(col.max())
            _fail(f"col index {bad} is out of range [0, {in_features})")
        values = t.values()
        if dtype is not None:
            values = values.to(dtype)
        return cls(crow.to(torch.int32), col.to(index_dtype(in_features)), values.contiguous(), (out, in_features))

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        out, in_features = self.shape
        crow, col, values = self.crow, self.col, self.values
        for name, t in (("crow", crow), ("col", col), ("values", values)):
            if not isinstance(t, Tensor):
                _fail(f"{name} must be a tensor, got {type(t)}")
            if t.dim() != 1:
                _fail(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if out < 0 or in_features < 0:
            _fail(f"shape must be non-negative, got {self.shape}")
        if crow.dtype != torch.int32:
            _fail(f"crow must be int32, got {crow.dtype}")
        if col.dtype not in (torch.int16, torch.int32):
            _fail(f"col must be int16 or int32, got {col.dtype}")
        if col.dtype == torch.int16 and in_features > INT16_MAX_COLUMNS:
            _fail(f"int16 col indices cannot address {in_features} columns; use int32")
        if values.dtype not in VALUE_DTYPES:
            _fail(f"values must be one of {VALUE_DTYPES}, got {values.dtype}")
        if not (crow.device == col.device == values.device):
            _fail(f"crow ({crow.device}), col ({col.device}) and values ({values.device}) must share a device")
        if "meta" in (crow.device.type, col.device.type, values.device.type):
            _fail("meta tensors hold no indices to validate; build the weight on a real device")
        if crow.numel() != out + 1:
            _fail(f"crow must have out + 1 = {out + 1} entries, got {crow.numel()}")
        nnz = col.numel()
        if values.numel() != nnz:
            _fail(f"values has {values.numel()} entries but col has {nnz}")
        c = crow.long()
        if int(c[0]) != 0:
            _fail(f"crow[0] must be 0, got {int(c[0])}")
        if int(c[-1]) != nnz:
            _fail(f"crow[-1] = {int(c[-1])} must equal nnz = {nnz}")
        if out > 0 and bool((c[1:] < c[:-1]).any()):
            i = int(torch.nonzero(c[1:] < c[:-1])[0])
            _fail(f"crow must be non-decreasing, but crow[{i}] = {int(c[i])} > crow[{i + 1}] = {int(c[i + 1])}")
        if nnz:
            cl = col.long()
            bad = (cl < 0) | (cl >= in_features)
            if bool(bad.any()):
                p = int(torch.nonzero(bad)[0])
                _fail(f"col index {int(cl[p])} at position {p} is out of range [0, {in_features})")
            row_start = torch.zeros(nnz, dtype=torch.bool, device=col.device)
            starts = c[:-1][c[:-1] < nnz]
            row_start[starts] = True
            bad = (cl[1:] <= cl[:-1]) & ~row_start[1:]
            if bool(bad.any()):
                p = int(torch.nonzero(bad)[0]) + 1
                row = int(torch.searchsorted(c, torch.tensor(p, device=c.device), right=True)) - 1
                _fail(f"col indices of row {row} must be sorted and unique, but {int(cl[p - 1])} "
                      f"is followed by {int(cl[p])}")
            if not bool(torch.isfinite(values).all()):
                _fail("values contain NaN or Inf")

    # ------------------------------------------------------------------ views
    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def sparsity(self) -> float:
        total = self.shape[0] * self.shape[1]
        return 1.0 - self.nnz / total if total else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def row_indices(self) -> Tensor:
        """int64 row of every non-zero."""
        counts = (self.crow[1:] - self.crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device), counts)

    def to_dense(self) -> Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[self.row_indices(), self.col.long()] = self.values.detach()
        return dense

    def mask(self) -> Tensor:
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        m[self.row_indices(), self.col.long()] = True
        return m

    def nbytes(self) -> int:
        """Bytes of everything forward and backward need: values, col, crow (no transpose index)."""
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.values))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> CSRWeight:
        return CSRWeight(self.crow.to(device), self.col.to(device), self.values.to(device=device, dtype=dtype),
                         self.shape)
