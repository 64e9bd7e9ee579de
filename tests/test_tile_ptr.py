"""csr_tile_ptr (the column-tile index the CUDA csr_spmm_t / csr_sddmm walk W by) on every
device present against a plain Python reference; the pattern and slots checks remembered per
tensor version; _csr_adopt_pattern's checks; the cuda_path switch."""
import os
import subprocess
import sys

import pytest
import torch

from seft_ext import ops
from reference import assert_matches, random_weight


def tile_ptr_ref(crow, col, inn, tile):
    out = crow.numel() - 1
    width = (inn + tile - 1) // tile + 1
    tp = torch.empty(out, width, dtype=torch.int32)
    for o in range(out):
        lo, hi = int(crow[o]), int(crow[o + 1])
        cols = [int(c) for c in col[lo:hi]]
        for j in range(width):
            tp[o, j] = lo + sum(c < j * tile for c in cols)
    return tp


# tile 128 is the index the CUDA ops cache (csr_tile_ptr returns a copy of it); other tiles are built anew
@pytest.mark.parametrize("index", [torch.int16, torch.int32], ids=["int16", "int32"])
@pytest.mark.parametrize("shape, tile", [((7, 5), 128), ((33, 130), 128), ((20, 300), 64), ((9, 256), 128),
                                         ((5, 17), 1), ((4, 0), 128), ((0, 40), 128), ((77, 700), 1000)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"tile{v}")
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_tile_ptr_matches_reference(device, index, shape, tile, density):
    out, inn = shape
    w = random_weight(out, inn, density, torch.float32, index=index)
    tp = ops.csr_tile_ptr(w.crow.to(device), w.col.to(device), inn, tile)
    assert tp.device.type == device and tp.dtype == torch.int32 and tp.shape == (out, (inn + tile - 1) // tile + 1)
    tp = tp.cpu()
    torch.testing.assert_close(tp, tile_ptr_ref(w.crow, w.col, inn, tile), rtol=0, atol=0)
    # each segment holds exactly its tile's columns: the segments partition the row
    for o in range(out):
        assert int(tp[o, 0]) == int(w.crow[o]) and int(tp[o, -1]) == int(w.crow[o + 1])
        for j in range(tp.shape[1] - 1):
            seg = w.col[int(tp[o, j]):int(tp[o, j + 1])].long()
            assert bool(((seg >= j * tile) & (seg < (j + 1) * tile)).all())


def test_tile_ptr_rejects_bad_input(device):
    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    crow = i32([0, 2, 3])
    with pytest.raises(RuntimeError, match="sorted and unique"):
        ops.csr_tile_ptr(crow, i32([1, 0, 2]), 10)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.csr_tile_ptr(crow, i32([0, 1, 10]), 10)
    with pytest.raises(RuntimeError, match="tile must be"):
        ops.csr_tile_ptr(crow, i32([0, 1, 2]), 10, 0)
    with pytest.raises(RuntimeError, match="must equal nnz"):
        ops.csr_tile_ptr(i32([0, 2, 2]), i32([0, 1, 2]), 10)


@pytest.mark.parametrize("tile", [128, 64])
def test_tile_ptr_opcheck(device, tile):
    w = random_weight(12, 300, 0.2, torch.float32, device=device)
    torch.library.opcheck(torch.ops.seft.csr_tile_ptr.default, (w.crow, w.col, 300, tile))


def test_slots_check_is_redone_after_an_in_place_change(device):
    """The slots check is remembered per tensor version: changing slots in place re-checks."""
    w = random_weight(10, 20, 0.5, torch.float32, device=device)
    x, dy = torch.randn(4, 20, device=device), torch.randn(4, 10, device=device)
    slots = torch.arange(0, w.col.numel(), 2, device=device)
    before = ops.csr_sddmm(dy, x, w.crow, w.col, slots)
    assert torch.equal(ops.csr_sddmm(dy, x, w.crow, w.col, slots), before)  # remembered
    slots[1] = slots[0]  # in place: duplicate -> must be refused now
    with pytest.raises(RuntimeError, match="strictly increasing"):
        ops.csr_sddmm(dy, x, w.crow, w.col, slots)
    slots[1] = 2
    torch.testing.assert_close(ops.csr_sddmm(dy, x, w.crow, w.col, slots), before)
    assert torch.ops.seft.structure_cache_size() >= 1


def test_cuda_path_switch():
    assert ops.cuda_path() == "auto"
    try:
        assert ops.cuda_path("cuda_core") == "cuda_core"
        assert ops.cuda_path() == "cuda_core"
        assert ops.cuda_path("tensor_core") == "tensor_core"
        with pytest.raises(RuntimeError, match="expected"):
            ops.cuda_path("fast")
        assert ops.cuda_path() == "tensor_core"
    finally:
        ops.cuda_path("auto")


def test_evolution_step_bumps_the_pattern_versions():
    """The CUDA ops remember a checked pattern per tensor version: the in-place evolution op
    must bump the versions of the arrays it rewrites, or a changed pattern would go unchecked."""
    crow = torch.tensor([0, 2, 3], dtype=torch.int32)
    col = torch.tensor([0, 1, 1], dtype=torch.int16)
    theta = torch.randn(3)
    slots = torch.tensor([0], dtype=torch.int64)
    delta = torch.zeros(1)
    before = [t._version for t in (crow, col, theta, slots, delta)]
    ops.csr_drop_grow_adapt_(crow, col, theta, slots, delta, torch.tensor([2], dtype=torch.int64),
                             torch.tensor([5.0]), 1, 2)
    after = [t._version for t in (crow, col, theta, slots, delta)]
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_adopt_pattern_checks_the_host_copies(device):
    """_csr_adopt_pattern (the controller's way to mark an uploaded pattern as checked) checks
    the host copies in full and refuses copies that do not match the device tensors."""
    w = random_weight(6, 20, 0.5, torch.float32)
    crow, col = w.crow.to(device, copy=True), w.col.to(device, copy=True)  # the "uploaded" pattern
    adopt = torch.ops.seft._csr_adopt_pattern
    adopt(crow, col, 20, w.crow.clone(), w.col.clone())
    bad = w.col.clone()
    r = int(torch.nonzero((w.crow[1:] - w.crow[:-1]) >= 2)[0])
    bad[int(w.crow[r]) + 1] = bad[int(w.crow[r])]
    with pytest.raises(RuntimeError, match="sorted and unique"):
        adopt(crow, col, 20, w.crow.clone(), bad)
    with pytest.raises(RuntimeError, match="out of range"):
        adopt(crow, col, int(w.col.max()), w.crow.clone(), w.col.clone())
    slots_host = torch.arange(0, w.col.numel(), 2)
    slots = slots_host.to(device, copy=True)
    adopt(crow, col, 20, w.crow.clone(), w.col.clone(), slots, slots_host.clone())
    with pytest.raises(RuntimeError, match="strictly increasing"):
        adopt(crow, col, 20, w.crow.clone(), w.col.clone(), slots, slots_host.flip(0).contiguous())
    with pytest.raises(RuntimeError, match="both slots"):
        adopt(crow, col, 20, w.crow.clone(), w.col.clone(), slots, None)
    with pytest.raises(RuntimeError, match="must match"):
        adopt(crow, col, 20, w.crow.clone(), w.col.clone().to(torch.int32 if w.col.dtype == torch.int16
                                                               else torch.int16))
    # the adopted pattern is used as checked: same results as the reference
    x = torch.randn(3, 20)
    y = ops.csr_spmm(x.to(device), crow, col, w.values.to(device), None)
    assert_matches(y, x.double() @ w.to_dense().double().T, torch.float32)


def test_cuda_path_starts_from_the_environment():
    code = "import seft_ext; from seft_ext import ops; print(ops.cuda_path())"
    for value, want in (("cuda_core", "cuda_core"), ("tensor_core", "tensor_core"), ("bogus", "auto")):
        env = dict(os.environ, SEFT_CUDA_PATH=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want, (value, out.stdout, out.stderr)
