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


# ---------------------------------------------------------------------------------- load_sparse
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.LayerNorm(8), nn.Linear(8, 6, bias=False))


def _sparse_file(tmp_path, model, rename=None):
    """export_sparse of ``model``'s linears at 50 %, entries renamed by ``rename`` {old: new}."""
    import json

    from safetensors.torch import load_file, save_file

    from seft_ext.hf import export_sparse

    m = _mlp()
    m.load_state_dict(model.state_dict())
    for i in (0, 2):
        m[i] = SparseLinear.from_dense(m[i], magnitude_mask(m[i].weight.detach(), 0.5))
    path = tmp_path / "sparse.safetensors"
    export_sparse(m, path)
    if rename:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = json.loads(f.metadata()["shapes"])
        tensors = load_file(str(path))
        tensors = {k.replace(f"{old}.", f"{new}.", 1) if k.startswith(f"{old}.") else k: v
                   for k, v in tensors.items() for old, new in rename.items()}
        shapes = {rename.get(k, k): v for k, v in shapes.items()}
        save_file(tensors, str(path), metadata={"seft_ext": "sparse-v1", "shapes": json.dumps(shapes)})
    return path, m


def _same(model, before):
    return [type(m) for m in model] == before[0] and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), before[1].values()))


def test_load_sparse_swaps_checked_layers(tmp_path):
    from seft_ext.hf import load_sparse

    model = _mlp()
    path, sparse = _sparse_file(tmp_path, model)
    assert load_sparse(model, path) == ["0", "2"]
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), sparse(x))


def _narrower_last_layer(model):
    model[2] = nn.Linear(8, 5, bias=False)


@pytest.mark.parametrize("rename, alter, match", [
    ({"2": "1"}, None, "module is a LayerNorm, not a linear layer"),  # a norm named as the target
    ({"2": "9"}, None, "no module of that name"),
    (None, _narrower_last_layer, r"shape \(6, 8\) differs from the model's \(5, 8\)"),
])
def test_load_sparse_changes_nothing_when_an_entry_does_not_fit(tmp_path, rename, alter, match):
    from seft_ext.hf import load_sparse

    model = _mlp()
    path, _ = _sparse_file(tmp_path, model, rename)
    if alter:
        alter(model)
    before = ([type(m) for m in model], {k: v.clone() for k, v in model.state_dict().items()})
    with pytest.raises(ValueError, match=match):
        load_sparse(model, path)
    assert _same(model, before)  # no layer swapped, not even the entries that fit


def test_load_sparse_refuses_a_bias_mismatch_and_a_foreign_file(tmp_path):
    from safetensors.torch import save_file

    from seft_ext.hf import load_sparse

    model = _mlp()
    path, _ = _sparse_file(tmp_path, model)
    other = _mlp()
    other[2] = nn.Linear(8, 6, bias=True)
    with pytest.raises(ValueError, match="bias"):
        load_sparse(other, path)
    assert isinstance(other[0], nn.Linear)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a seft_ext sparse export"):
        load_sparse(model, tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable seft_ext sparse export"):
        load_sparse(model, tmp_path / "junk.safetensors")
