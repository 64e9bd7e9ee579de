"""csr_grow_scan_tiled (the ATen-only scan that csr_grow_scan runs on CUDA) against the dense
fp64 reference scan and the CPU kernel's exact scan, on identical inputs."""
import pytest
import torch

from seft_ext import CSRWeight, SEFTLinear
from seft_ext.prune import magnitude_mask
from evolve_reference import layer_state, ref_scan


def layer_and_grads(out, inn, scope, dtype, seed):
    torch.manual_seed(seed)
    w = torch.randn(out, inn, dtype=torch.float64)
    layer = SEFTLinear(CSRWeight.from_dense(w, magnitude_mask(w, 0.6, scope, (2, 4)), dtype=dtype),
                       k=max(1, out * inn // 25), budget=scope, seed=seed)
    dy = torch.randn(13, out, dtype=dtype)
    x = torch.randn(13, inn, dtype=dtype)
    return layer, dy, x


def tiled(layer, dy, x, num_grow, num_prune, scope, grow_inactive, tile_bytes=1 << 20):
    return torch.ops.seft.csr_grow_scan_tiled(dy, x, layer.crow, layer.col, layer.theta, layer.delta_slots,
                                              num_grow, num_prune, scope, grow_inactive, tile_bytes)


@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize("grow_inactive", [True, False])
@pytest.mark.parametrize("tile_bytes", [1 << 20, 200, 8])  # one tile, a few rows per tile, one row per tile
@pytest.mark.parametrize("seed", range(3))
def test_matches_dense_reference_fp64(scope, grow_inactive, tile_bytes, seed):
    out, inn = 11, 16
    layer, dy, x = layer_and_grads(out, inn, scope, torch.float64, seed)
    theta, active, delta = layer_state(layer)
    G = dy.T @ x
    num_grow, num_prune = 9, 7
    pos, g, nbytes, finite = tiled(layer, dy, x, num_grow, num_prune, scope, grow_inactive, tile_bytes)
    assert finite and nbytes > 0
    assert pos.tolist() == ref_scan(G, theta, active, delta, num_grow, num_prune, scope, 4, grow_inactive)
    torch.testing.assert_close(g, G.flatten()[pos], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_cpu_kernel(scope, dtype):
    layer, dy, x = layer_and_grads(40, 64, scope, dtype, 7)
    a = tiled(layer, dy, x, 50, 30, scope, True)
    b = torch.ops.seft.csr_grow_scan(dy, x, layer.crow, layer.col, layer.theta, layer.delta_slots, 50, 30, scope,
                                     2, 4, True, 0, 0)
    assert torch.equal(a[0], b[0])
    assert a[1].dtype == b[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert a[3] and b[3]


def test_more_wanted_than_eligible_takes_all():
    layer, dy, x = layer_and_grads(5, 8, "layer", torch.float64, 1)
    _, active, delta = layer_state(layer)
    pos, _, _, _ = tiled(layer, dy, x, 10_000, 10_000, "layer", True)
    assert pos.numel() == 5 * 8 - len(delta)  # every position outside the delta
    pos, _, _, _ = tiled(layer, dy, x, 10_000, 0, "layer", False)
    assert pos.numel() == int(active.sum()) - len(delta)  # spiel: base-only active ones only


def test_nonfinite_tracks_nothing():
    layer, dy, x = layer_and_grads(6, 8, "row", torch.float32, 2)
    x[3, 5] = float("nan")
    pos, g, _, finite = tiled(layer, dy, x, 4, 4, "row", True)
    assert not finite and pos.numel() == 0 and g.numel() == 0


@pytest.mark.parametrize("over, match", [
    ({"scope": "nm"}, "'layer' or 'row'"),
    ({"tile_bytes": 0}, "tile_bytes"),
    ({"num_grow": -1}, ">= 0"),
])
def test_rejects(over, match):
    layer, dy, x = layer_and_grads(6, 8, "layer", torch.float32, 3)
    a = dict(num_grow=4, num_prune=4, scope="layer", grow_inactive=True, tile_bytes=1 << 20)
    a.update(over)
    with pytest.raises(RuntimeError, match=match):
        tiled(layer, dy, x, **a)


def test_rejects_unsorted_slots():
    layer, dy, x = layer_and_grads(10, 16, "layer", torch.float32, 3)
    assert layer.delta_slots.numel() > 1
    with pytest.raises(RuntimeError, match="strictly increasing"):
        torch.ops.seft.csr_grow_scan_tiled(dy, x, layer.crow, layer.col, layer.theta, layer.delta_slots.flip(0), 4,
                                           4, "layer", True, 1 << 20)


def test_opcheck():
    layer, dy, x = layer_and_grads(10, 16, "row", torch.float32, 4)
    torch.library.opcheck(torch.ops.seft.csr_grow_scan_tiled.default,
                          (dy, x, layer.crow, layer.col, layer.theta, layer.delta_slots, 6, 6, "row", True, 1 << 20),
                          test_utils=("test_schema", "test_faketensor"))
