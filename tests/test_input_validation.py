"""Bad input to the Python entry points is refused before any work, with a message that
names what is wrong: SEFTConfig, the layers' small cases, and the loaders (load_sparse,
load_model), which change nothing until everything is checked."""
import math

import pytest
import torch
from torch import nn

from seft_ext import CSRWeight, SEFTConfig, SEFTLinear, SparseLinear
from seft_ext.prune import magnitude_mask


# ---------------------------------------------------------------------------------- SEFTConfig
@pytest.mark.parametrize("kwargs, error, match", [
    ({"sparsity": math.inf}, ValueError, "sparsity must be finite"),
    ({"sparsity": math.nan}, ValueError, "sparsity"),
    ({"density": math.nan}, ValueError, "density must be finite"),
    ({"drop_fraction": math.nan}, ValueError, "drop_fraction must be finite"),
    ({"evolve_until": math.nan}, ValueError, "evolve_until must be finite"),
    ({"evolve_until": -math.inf}, ValueError, "evolve_until must be finite"),
    ({"candidate_factor": math.inf}, ValueError, "candidate_factor must be finite"),
    ({"lora_rank": True}, TypeError, "lora_rank must be an int, got bool"),
    ({"update_interval": False}, TypeError, "update_interval must be an int"),
    ({"k": True}, TypeError, "k must be an int"),
    ({"k": 2.0}, TypeError, "k must be an int, got float"),
    ({"seed": True}, TypeError, "seed must be an int"),
    ({"scan_sketch": "64"}, TypeError, "scan_sketch must be an int, got str"),
    ({"sparsity": "0.5"}, TypeError, "sparsity must be a real number, got str"),
    ({"sparsity": True}, TypeError, "sparsity must be a real number, got bool"),
    ({"schedule": 1}, TypeError, "schedule must be a string"),
    ({"method": None}, TypeError, "method must be a string"),
    ({"seed_optimizer": 1}, TypeError, "seed_optimizer must be a bool, got int"),
    ({"seed": 1 << 63}, ValueError, "seed must fit in int64"),
    ({"seed": -(1 << 63) - 1}, ValueError, "seed must fit in int64"),
    ({"nm_n": 0}, ValueError, "nm_n must be a positive int"),
    ({"grow_accumulation": 2.5}, TypeError, "grow_accumulation must be an int"),
])
def test_config_rejects_bad_types_and_non_finite(kwargs, error, match):
    with pytest.raises(error, match=match):
        SEFTConfig(**kwargs)


def test_config_accepts_int_reals_and_int64_seeds():
    c = SEFTConfig(sparsity=0, drop_fraction=1, seed=(1 << 63) - 1, k=None, density=None)
    assert c.sparsity == 0 and c.seed == (1 << 63) - 1
    assert SEFTConfig(seed=-(1 << 63)).seed == -(1 << 63)


def test_extreme_seed_reaches_an_evolution_step():
    """A seed at the edge of int64 is accepted and the scan's seed derived from it still fits."""
    from seft_ext import SEFTController

    w = torch.randn(8, 12, dtype=torch.float64)
    layer = SEFTLinear(CSRWeight.from_dense(w, magnitude_mask(w, 0.5)), 6)
    model = nn.Sequential(layer)
    opt = torch.optim.AdamW([layer.delta], lr=1e-2)
    ctl = SEFTController(model, opt, SEFTConfig(seed=(1 << 63) - 1, update_interval=2, grow_accumulation=1), 8)
    for _ in range(2):
        model(torch.randn(4, 12, dtype=torch.float64)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        report = ctl.step()
    assert report is not None and "grown" in report["0"]


# ---------------------------------------------------------------------------------- small cases
def test_zero_row_layer_has_sparsity_and_repr():
    w = CSRWeight(torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int16), torch.zeros(0), (0, 5))
    layer = SparseLinear(w)
    assert layer.sparsity == 0.0
    assert "sparsity=0.000" in repr(layer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_seft_linear_to_low_precision_keeps_an_fp32_delta(dtype):
    from seft_ext import SEFTController

    w = torch.randn(8, 12)
    layer = SEFTLinear(CSRWeight.from_dense(w, magnitude_mask(w, 0.5)), 6)
    with torch.no_grad():
        layer.delta.copy_(torch.linspace(-1, 1, 6) * (1 + 2 ** -20))  # not representable in bf16 / fp16
    exact = layer.delta.detach().clone()
    delta = layer.delta
    layer.to(dtype)
    assert layer.theta.dtype == dtype and layer.delta.dtype == torch.float32
    assert layer.delta is delta  # the optimizer's parameter is still the layer's
    assert torch.equal(layer.delta.detach(), exact)  # not rounded through the low precision
    layer.double()
    assert layer.delta.dtype == torch.float64 and torch.equal(layer.delta.detach(), exact.double())
    layer.to(dtype)
    assert layer.delta.dtype == torch.float32
    # the first evolution step works on the converted layer
    model = nn.Sequential(layer)
    opt = torch.optim.AdamW([layer.delta], lr=1e-2)
    ctl = SEFTController(model, opt, SEFTConfig(update_interval=2, grow_accumulation=1), 8)
    for _ in range(2):
        model(torch.randn(4, 12, dtype=dtype)).float().square().sum().backward()
        opt.step()
        opt.zero_grad()
        report = ctl.step()
    assert report is not None and "grown" in report["0"]
