"""SEFTLinear: forward and gradients against dense fp64 math; construction and bad input."""
import pytest
import torch
from torch import nn

from seft_ext import CSRWeight, SEFTConfig, SEFTLinear, convert_to_seft, seft_layers
from seft_ext.prune import magnitude_mask
from seft_ext.window import ScanPlan


def layer_and_dense(out=9, inn=16, k=15, dtype=torch.float64, bias=False):
    w = torch.randn(out, inn, dtype=torch.float64)
    mask = magnitude_mask(w, 0.5)
    b = torch.randn(out, dtype=dtype) if bias else None
    layer = SEFTLinear(CSRWeight.from_dense(w, mask, dtype=dtype), k, bias=b, seed=3)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(k, dtype=layer.delta.dtype))
    return layer, (w * mask).double()


def dense_delta(layer):
    d = torch.zeros(layer.out_features * layer.in_features, dtype=torch.float64)
    d[layer.slot_positions()] = layer.delta.detach().double()
    return d.view(layer.out_features, layer.in_features)


@pytest.mark.parametrize("collecting", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_dense(collecting, bias):
    layer, theta = layer_and_dense(bias=bias)
    if collecting:
        layer.window.open(ScanPlan(6, 6, 0, 0))
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    if bias:
        layer.bias.requires_grad_(True)
    y = layer(x)
    delta = dense_delta(layer).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    yr = xr @ (theta + delta).T + (layer.bias.detach() if bias else 0)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta.grad, delta.grad.flatten()[layer.slot_positions()], rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.bias.grad, dy.sum((0, 1)), rtol=1e-12, atol=1e-12)
    assert (layer.window.tracked is not None) == collecting


def test_gradcheck():
    layer, _ = layer_and_dense(out=5, inn=8, k=6)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d: layer(x), (x, layer.delta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype):
    layer, theta = layer_and_dense(dtype=dtype)
    x = torch.randn(7, 16, dtype=dtype)
    ref = x.double() @ layer.to_dense().double().T  # theta + delta rounded to the layer dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(layer(x).double(), ref, rtol=tol, atol=tol * 10)
    assert layer.delta.dtype == torch.float32


def test_merged_and_stale_backward():
    layer, theta = layer_and_dense()
    torch.testing.assert_close(layer.to_dense().double(), theta + dense_delta(layer), rtol=0, atol=1e-15)
    assert layer.merged().nnz == layer.nnz
    x = torch.randn(4, 16, dtype=torch.float64)
    y = layer(x)
    tracked = torch.arange(0, 144, 7)
    layer.evolve_(3, tracked, torch.randn(tracked.numel(), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_bad_construction():
    w = torch.randn(8, 12)
    base = CSRWeight.from_dense(w, magnitude_mask(w, 0.5))
    with pytest.raises(ValueError, match="exceeds the layer's 48 non-zeros"):
        SEFTLinear(base, 49)
    with pytest.raises(ValueError, match="positive int"):
        SEFTLinear(base, 0)
    with pytest.raises(ValueError, match="budget"):
        SEFTLinear(base, 4, budget="block")
    with pytest.raises(ValueError, match="method"):
        SEFTLinear(base, 4, method="rigl")
    with pytest.raises(ValueError, match="not 2:4"):
        SEFTLinear(base, 4, budget="nm")
    with pytest.raises(ValueError, match="dividing in_features"):
        SEFTLinear(CSRWeight.from_dense(torch.randn(4, 10)), 4, budget="nm")
    with pytest.raises(TypeError, match="CSRWeight"):
        SEFTLinear(w, 4)
    layer = SEFTLinear(base, 4)
    with pytest.raises(ValueError, match="last dimension in_features = 12"):
        layer(torch.randn(3, 11))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(3, 12, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"sparsity": float("nan")}, "sparsity"),
    ({"k": 0}, "k must"), ({"density": 0.0}, "density"), ({"update_interval": 0}, "update_interval"),
    ({"grow_accumulation": 0}, "grow_accumulation"), ({"drop_fraction": 1.5}, "drop_fraction"),
    ({"schedule": "step"}, "schedule"), ({"evolve_until": 2.0}, "evolve_until"), ({"budget": "col"}, "budget"),
    ({"budget": "nm", "nm_n": 5, "nm_m": 4}, "N:M"), ({"method": "rigl"}, "method"),
    ({"candidate_factor": 0.5}, "candidate_factor"), ({"lora_rank": 0}, "lora_rank"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SEFTConfig(**kwargs)


def test_config_defaults_and_help():
    c = SEFTConfig()
    assert c.trainable_for(1536, 576) == 8 * (1536 + 576)  # LoRA rank 8 equivalent
    assert SEFTConfig(k=100).trainable_for(10, 20) == 100
    assert SEFTConfig(density=0.01).trainable_for(100, 200) == 200
    assert SEFTConfig(grow_accumulation=7, update_interval=5).window_steps == 5
    text = SEFTConfig.help()
    for name in ("sparsity", "update_interval", "grow_accumulation", "drop_fraction", "schedule", "evolve_until",
                 "budget", "seed_optimizer", "method"):
        assert f"\n{name} (default" in "\n" + text


@pytest.mark.parametrize("budget", ["layer", "row", "nm"])
def test_convert_keeps_exact_sparsity(budget):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    names = convert_to_seft(model, SEFTConfig(sparsity=0.75, budget=budget, nm_n=1, nm_m=4, lora_rank=1))
    assert names == ["0", "2"]
    for name, layer in seft_layers(model).items():
        assert layer.sparsity == pytest.approx(0.75)
        assert [p.requires_grad for p in layer.parameters()] == [True] + [False] * (layer.bias is not None)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.delta", "2.delta"]
    with pytest.raises(ValueError, match="layer '0'"):
        convert_to_seft(nn.Sequential(nn.Linear(4, 4)), SEFTConfig(sparsity=0.9, lora_rank=8))
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert_to_seft(nn.Sequential(nn.ReLU()), SEFTConfig())


def test_masked_dense_baseline_matches_the_sparse_path():
    layer, _ = layer_and_dense()
    twin, _ = layer_and_dense()
    twin.load_state_dict(layer.state_dict())
    twin.dense_compute = True
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    dy = torch.randn(3, 5, 9, dtype=torch.float64)
    for m in (layer, twin):
        m.window.open(ScanPlan(8, 8, 0, 0))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [m(xx) for m, xx in zip((layer, twin), xs)]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-12, atol=1e-12)
    for y in ys:
        y.backward(dy)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta.grad, twin.delta.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.window.tracked, twin.window.tracked)
    for m in (layer, twin):
        m.evolve_(4, m.window.tracked, m.window.gsum)
    for name in ("crow", "col", "theta", "delta_slots", "delta"):
        assert torch.equal(getattr(layer, name), getattr(twin, name))
