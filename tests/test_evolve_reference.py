"""The engine (CSR, streamed candidates, C++ decision) against the dense-with-mask reference."""
import math

import pytest
import torch

from seft_ext import CSRWeight, SEFTLinear
from seft_ext.prune import magnitude_mask
from seft_ext.window import ScanPlan
from evolve_reference import layer_state, ref_decide, ref_scan


def make_layer(out, inn, scope, method, k, dtype=torch.float64, seed=0):
    w = torch.randn(out, inn, dtype=torch.float64)
    mask = magnitude_mask(w, 0.6, scope, (2, 4))
    return SEFTLinear(CSRWeight.from_dense(w, mask, dtype=dtype), k, budget=scope, nm=(2, 4), method=method,
                      seed=seed)


def run_window(layer, steps, tokens, plan):
    """Backward passes with collection on; returns the dense gradients G_t = dY^T X."""
    layer.window.reset()
    layer.window.open(ScanPlan(*plan))
    grads = []
    for _ in range(steps):
        x = torch.randn(tokens, layer.in_features, dtype=layer.theta.dtype)
        dy = torch.randn(tokens, layer.out_features, dtype=layer.theta.dtype)
        layer(x).backward(dy)
        grads.append(dy.double().T @ x.double())
    layer.window.close()
    return grads


@pytest.mark.parametrize("scope", ["layer", "row", "nm"])
@pytest.mark.parametrize("method", ["seft", "spiel"])
@pytest.mark.parametrize("shape", [(12, 16), (7, 24)])
def test_engine_matches_reference(scope, method, shape):
    torch.manual_seed(1)
    out, inn = shape
    layer = make_layer(out, inn, scope, method, k=20)
    base_active = layer_state(layer)[1].clone()
    grow_inactive = method == "seft"
    for rnd in range(6):
        with torch.no_grad():
            layer.delta.copy_(torch.randn(layer.k, dtype=layer.delta.dtype))
            if rnd % 2:
                layer.delta[:3] = 0.0  # ties on |delta| are broken by position
        theta, active, delta = layer_state(layer)
        n = [6, 3, 10, 0, 20, 5][rnd]
        num_grow = math.ceil(2 * n)
        num_prune = num_grow if grow_inactive else 0
        grads = run_window(layer, 3, 9, (num_grow, num_prune, 0, 0))  # exact scan
        w = layer.window

        tracked = ref_scan(grads[0], theta, active, delta, num_grow, num_prune, scope, 4, grow_inactive)
        assert w.tracked.tolist() == tracked
        gsum_ref = sum(grads).flatten()[w.tracked]
        torch.testing.assert_close(w.gsum, gsum_ref, rtol=1e-12, atol=1e-12)
        g2_ref = sum(g * g for g in grads).flatten()[w.tracked]
        torch.testing.assert_close(w.g2sum, g2_ref, rtol=1e-12, atol=1e-12)
        assert w.count == 3

        # The same summed gradient feeds both decisions: any difference is in the decision.
        gsum = dict(zip(w.tracked.tolist(), w.gsum.tolist()))
        th_r, act_r, delta_r, counts_r = ref_decide(theta, active, delta, tracked, gsum, n, scope, 4,
                                                    grow_inactive)
        remap, counts = layer.evolve_(n, w.tracked, w.gsum)
        th_e, act_e, delta_e = layer_state(layer)
        assert counts.tolist() == counts_r
        assert torch.equal(act_e, act_r)
        assert torch.equal(th_e, th_r)
        assert delta_e == delta_r
        assert int(act_e.sum()) == int(base_active.sum())  # the budget holds exactly
        if scope != "layer":
            assert torch.equal(act_e.sum(1), base_active.sum(1))
        if scope == "nm":
            assert bool((act_e.view(out, inn // 4, 4).sum(-1) == 2).all())
        if not grow_inactive:
            assert not bool((act_e & ~base_active).any())  # spiel never re-activates
        # kept slots carry their old values
        old_pos = list(delta)
        for s, o in enumerate(remap.tolist()):
            if o >= 0:
                assert layer.slot_positions()[s].item() == old_pos[o]
        # the forward uses theta + delta
        x = torch.randn(5, inn, dtype=torch.float64)
        dense = th_r.clone()
        for p, v in delta_r.items():
            dense.view(-1)[p] += v
        torch.testing.assert_close(layer(x), x @ dense.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_layer_keeps_fp32_delta(dtype):
    torch.manual_seed(2)
    layer = make_layer(16, 32, "layer", "seft", k=40, dtype=dtype)
    assert layer.delta.dtype == torch.float32
    grads = run_window(layer, 2, 8, (20, 20, 0, 0))
    w = layer.window
    assert w.gsum.dtype == torch.float32
    ref = sum(grads).flatten()[w.tracked].float()
    torch.testing.assert_close(w.gsum, ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-1)
    nnz = layer.nnz
    remap, counts = layer.evolve_(8, w.tracked, w.gsum)
    assert layer.nnz == nnz and counts[0] == counts[1]
    layer.merged().validate()


@pytest.mark.parametrize("scope", ["layer", "row", "nm"])
def test_sketched_scan_finds_strong_candidates_and_keeps_exact_sums(scope):
    """With a CountSketch scan the tracked set is chosen from an estimate, but the sums at
    tracked positions stay exact, and the strongest grow signals are still found."""
    torch.manual_seed(4)
    out, inn, T = 48, 64, 256
    layer = make_layer(out, inn, scope, "seft", k=100, dtype=torch.float32)
    # a gradient with a few strong positions on top of noise
    grads = []
    layer.window.reset()
    layer.window.open(ScanPlan(60, 60, 32, 7))
    for step in range(3):
        x = torch.randn(T, inn) * 0.1
        dy = torch.randn(T, out) * 0.1
        x[:, :4] += torch.randn(T, 1)  # inputs 0-3 and outputs 0-9 correlate strongly
        dy[:, :10] += x[:, :1] * 2
        layer(x).backward(dy)
        grads.append(dy.double().T @ x.double())
    w = layer.window
    total = sum(grads).flatten()
    torch.testing.assert_close(w.gsum.double(), total[w.tracked], rtol=1e-4, atol=1e-3)
    theta, active, delta = layer_state(layer)
    outside = torch.ones(out * inn, dtype=torch.bool)
    outside[list(delta)] = False
    g1 = grads[0].flatten().abs()
    top = [p for p in torch.argsort(g1, descending=True).tolist() if outside[p]][:30]
    found = len(set(top) & set(w.tracked.tolist()))
    assert found >= 27, found
