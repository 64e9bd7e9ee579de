"""The BSR weight type: an (out, in) matrix stored as r x c blocks (block-row offsets, block
columns, block values). Shapes that are not multiples of the block are padded inside the last
block row / column with zeros that the user never sees (``to_dense`` is exactly out x in)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .sparse import VALUE_DTYPES

INT16_MAX_BLOCK_COLUMNS = 32767  # int16 block columns up to ceil(in / c) <= 32767


def block_index_dtype(block_cols: int) -> torch.dtype:
    """int16 block columns when ceil(in / c) <= 32767, else int32."""
    return torch.int16 if block_cols <= INT16_MAX_BLOCK_COLUMNS else torch.int32


def _fail(msg: str) -> None:
    raise ValueError(f"BSRWeight: {msg}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block(block) -> tuple[int, int]:
    try:
        r, c = (int(block[0]), int(block[1]))
        ok = len(block) == 2
    except (TypeError, ValueError, IndexError):
        ok = False
    if not ok or r < 1 or c < 1:
        _fail(f"block must be (r, c) with r, c >= 1, got {block!r}")
    return r, c


@dataclass
class BSRWeight:
    """A block-sparse matrix of shape ``(out, in)`` in blocks of ``r x c``.

    ``crow``: int32 ``[ceil(out / r) + 1]``, ``crow[0] == 0``, non-decreasing, ``crow[-1] == nblocks``.
    ``col``: int16 (``ceil(in / c) <= 32767``) or int32 ``[nblocks]``: block columns, sorted and
    unique within each block row. ``values``: float32 / float64 / bfloat16 / float16
    ``[nblocks, r, c]``, finite; entries beyond out / in (the padding) are zero.
    The constructor validates all of it.
    """

    crow: Tensor
    col: Tensor
    values: Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    # ------------------------------------------------------------------ shape
    @property
    def block(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def block_shape(self) -> tuple[int, int]:
        """(block rows, block columns) = (ceil(out / r), ceil(in / c))."""
        r, c = self.block
        return _cdiv(self.shape[0], r), _cdiv(self.shape[1], c)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dense(cls, dense: Tensor, block=(8, 8), mask: Optional[Tensor] = None,
                   dtype: Optional[torch.dtype] = None) -> BSRWeight:
        """Keep the blocks of ``dense`` that ``mask`` selects: a per-block bool mask
        ``[ceil(out / r), ceil(in / c)]``, or a dense bool mask ``[out, in]`` that is constant on
        every block (refused otherwise). ``mask=None``: the blocks holding a non-zero."""
        r, c = _check_block(block)
        if not isinstance(dense, Tensor) or dense.dim() != 2:
            _fail(f"dense must be a 2-D tensor, got {getattr(dense, 'shape', type(dense))}")
        if not dense.is_floating_point():
            _fail(f"dense must be floating point, got {dense.dtype}")
        dense = dense.detach()
        if not bool(torch.isfinite(dense).all()):
            _fail("dense contains NaN or Inf")
        out, inn = dense.shape
        nbr, nbc = _cdiv(out, r), _cdiv(inn, c)
        padded = dense.new_zeros(nbr * r, nbc * c)
        padded[:out, :inn] = dense
        tiles = padded.view(nbr, r, nbc, c).permute(0, 2, 1, 3)  # [nbr, nbc, r, c]
        if mask is None:
            bmask = tiles.ne(0).any(-1).any(-1)
        else:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                _fail(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
            if mask.device != dense.device:
                _fail(f"mask is on {mask.device} but dense is on {dense.device}")
            if tuple(mask.shape) == (nbr, nbc):
                bmask = mask
            elif tuple(mask.shape) == (out, inn):
                bmask = cls._block_mask_of(mask, r, c)
            else:
                _fail(f"mask must have the block shape ({nbr}, {nbc}) or the dense shape ({out}, {inn}), "
                      f"got {tuple(mask.shape)}")
        brow, bcol = bmask.nonzero(as_tuple=True)
        counts = torch.bincount(brow, minlength=nbr)
        crow = torch.zeros(nbr + 1, dtype=torch.int64, device=dense.device)
        torch.cumsum(counts, 0, out=crow[1:])
        values = tiles[brow, bcol].contiguous()
        if dtype is not None:
            values = values.to(dtype)
        return cls(crow.to(torch.int32), bcol.to(block_index_dtype(nbc)), values, (out, inn))

    @staticmethod
    def _block_mask_of(mask: Tensor, r: int, c: int) -> Tensor:
        out, inn = mask.shape
        nbr, nbc = _cdiv(out, r), _cdiv(inn, c)
        p = torch.zeros(nbr * r, nbc * c, dtype=torch.int8, device=mask.device)
        inside = torch.zeros_like(p)
        p[:out, :inn] = mask.to(torch.int8)
        inside[:out, :inn] = 1
        ones = p.view(nbr, r, nbc, c).sum((1, 3), dtype=torch.int64)
        size = inside.view(nbr, r, nbc, c).sum((1, 3), dtype=torch.int64)
        mixed = (ones != 0) & (ones != size)
        if bool(mixed.any()):
            i, j = (int(v) for v in mixed.nonzero()[0])
            _fail(f"mask is not constant on block ({i}, {j}) (rows {i * r}..{min(out, (i + 1) * r) - 1}, "
                  f"columns {j * c}..{min(inn, (j + 1) * c) - 1}); pass a mask constant per {r} x {c} block "
                  f"or a block mask of shape ({nbr}, {nbc})")
        return ones != 0

    @classmethod
    def from_torch_sparse(cls, t: Tensor, dtype: Optional[torch.dtype] = None) -> BSRWeight:
        """From a 2-D ``torch.sparse_bsr`` tensor."""
        if not isinstance(t, Tensor) or t.layout != torch.sparse_bsr:
            _fail(f"expected a torch.sparse_bsr tensor, got {getattr(t, 'layout', type(t))}")
        if t.dim() != 2:
            _fail(f"expected a 2-D sparse tensor, got {t.dim()}-D")
        out, inn = t.shape
        crow, col, values = t.crow_indices(), t.col_indices(), t.values()
        nbc = _cdiv(inn, values.shape[2]) if values.shape[2] else 0
        if col.numel() >= 2**31 - 1:
            _fail("more than 2^31 - 2 blocks")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= nbc):
            _fail(f"block column {int(col.max())} is out of range [0, {nbc})")
        if crow.numel() and (int(crow.min()) < 0 or int(crow.max()) >= 2**31):
            _fail("crow entries are out of range [0, 2^31)")
        if dtype is not None:
            values = values.to(dtype)
        return cls(crow.to(torch.int32), col.to(block_index_dtype(nbc)), values.contiguous(), (out, inn))

    def to_torch_sparse(self) -> Tensor:
        """A ``torch.sparse_bsr`` tensor (only when out % r == 0 and in % c == 0)."""
        r, c = self.block
        if self.shape[0] % r or self.shape[1] % c:
            _fail(f"torch.sparse_bsr needs out % r == 0 and in % c == 0; shape {self.shape} is not a multiple "
                  f"of the block {r} x {c}")
        return torch.sparse_bsr_tensor(self.crow.long(), self.col.long(), self.values.detach(), self.shape)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        out, inn = self.shape
        crow, col, values = self.crow, self.col, self.values
        for name, t, dim in (("crow", crow, 1), ("col", col, 1), ("values", values, 3)):
            if not isinstance(t, Tensor):
                _fail(f"{name} must be a tensor, got {type(t)}")
            if t.dim() != dim:
                _fail(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
        if out < 0 or inn < 0:
            _fail(f"shape must be non-negative, got {self.shape}")
        r, c = values.shape[1], values.shape[2]
        if r < 1 or c < 1:
            _fail(f"values must be [nblocks, r, c] with r, c >= 1, got shape {tuple(values.shape)}")
        nbr, nbc = _cdiv(out, r), _cdiv(inn, c)
        if crow.dtype != torch.int32:
            _fail(f"crow must be int32, got {crow.dtype}")
        if col.dtype not in (torch.int16, torch.int32):
            _fail(f"col must be int16 or int32, got {col.dtype}")
        if col.dtype == torch.int16 and nbc > INT16_MAX_BLOCK_COLUMNS:
            _fail(f"int16 col cannot address {nbc} block columns; use int32")
        if values.dtype not in VALUE_DTYPES:
            _fail(f"values must be one of {VALUE_DTYPES}, got {values.dtype}")
        if not (crow.device == col.device == values.device):
            _fail(f"crow ({crow.device}), col ({col.device}) and values ({values.device}) must share a device")
        if "meta" in (crow.device.type, col.device.type, values.device.type):
            _fail("meta tensors hold no indices to validate; build the weight on a real device")
        if crow.numel() != nbr + 1:
            _fail(f"crow must have ceil(out / r) + 1 = {nbr + 1} entries, got {crow.numel()}")
        nb = col.numel()
        if values.shape[0] != nb:
            _fail(f"values has {values.shape[0]} blocks but col has {nb}")
        cr = crow.long()
        if int(cr[0]) != 0:
            _fail(f"crow[0] must be 0, got {int(cr[0])}")
        if int(cr[-1]) != nb:
            _fail(f"crow[-1] = {int(cr[-1])} must equal the number of blocks {nb}")
        if nbr > 0 and bool((cr[1:] < cr[:-1]).any()):
            i = int(torch.nonzero(cr[1:] < cr[:-1])[0])
            _fail(f"crow must be non-decreasing, but crow[{i}] = {int(cr[i])} > crow[{i + 1}] = {int(cr[i + 1])}")
        if nb:
            cl = col.long()
            bad = (cl < 0) | (cl >= nbc)
            if bool(bad.any()):
                p = int(torch.nonzero(bad)[0])
                _fail(f"col (block column) {int(cl[p])} at block {p} is out of range [0, {nbc})")
            row_start = torch.zeros(nb, dtype=torch.bool, device=col.device)
            row_start[cr[:-1][cr[:-1] < nb]] = True
            bad = (cl[1:] <= cl[:-1]) & ~row_start[1:]
            if bool(bad.any()):
                p = int(torch.nonzero(bad)[0]) + 1
                br = int(torch.searchsorted(cr, torch.tensor(p, device=cr.device), right=True)) - 1
                _fail(f"block columns of block row {br} must be sorted and unique, but {int(cl[p - 1])} "
                      f"is followed by {int(cl[p])}")
            if not bool(torch.isfinite(values).all()):
                _fail("values contain NaN or Inf")

    # ------------------------------------------------------------------ views
    @property
    def nnz_blocks(self) -> int:
        return self.col.numel()

    @property
    def sparsity(self) -> float:
        """1 - (stored entries inside out x in) / (out * in): padding is not counted."""
        total = self.shape[0] * self.shape[1]
        return 1.0 - int(self.mask().sum()) / total if total else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def block_rows(self) -> Tensor:
        """int64 block row of every block."""
        counts = (self.crow[1:] - self.crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.crow.numel() - 1, device=self.crow.device), counts)

    def block_mask(self) -> Tensor:
        """bool [ceil(out / r), ceil(in / c)]: the stored blocks."""
        m = torch.zeros(self.block_shape, dtype=torch.bool, device=self.device)
        m[self.block_rows(), self.col.long()] = True
        return m

    def _padded(self, blocks: Tensor) -> Tensor:
        (r, c), (nbr, nbc) = self.block, self.block_shape
        full = blocks.new_zeros(nbr, nbc, r, c)
        full[self.block_rows(), self.col.long()] = blocks
        return full.permute(0, 2, 1, 3).reshape(nbr * r, nbc * c)[: self.shape[0], : self.shape[1]]

    def to_dense(self) -> Tensor:
        return self._padded(self.values.detach()).contiguous()

    def mask(self) -> Tensor:
        """Dense bool (out, in): the entries inside stored blocks."""
        ones = torch.ones(self.values.shape, dtype=torch.bool, device=self.device)
        return self._padded(ones).contiguous()

    def nbytes(self) -> int:
        """Bytes of values, col and crow (the padding included)."""
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.values))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> BSRWeight:
        return BSRWeight(self.crow.to(device), self.col.to(device), self.values.to(device=device, dtype=dtype),
                         self.shape)
