"""CSRWeight and SparseLinear against masked dense nn.Linear."""
import io

import pytest
import torch
import torch.nn.functional as F

from seft_ext import CSRWeight, SparseLinear
from seft_ext.sparse import index_dtype
from reference import random_weight


def test_csrweight_round_trips():
    dense = torch.randn(9, 13)
    mask = torch.rand(9, 13) < 0.4
    w = CSRWeight.from_dense(dense, mask)
    assert torch.equal(w.to_dense(), dense * mask)
    assert torch.equal(w.mask(), mask)
    assert w.nnz == int(mask.sum()) and w.sparsity == pytest.approx(1 - mask.float().mean().item())
    for t in [(dense * mask).to_sparse_csr(), (dense * mask).to_sparse_coo()]:
        w2 = CSRWeight.from_torch_sparse(t)
        assert torch.equal(w2.to_dense(), dense * mask)
    w3 = CSRWeight.from_dense(dense * mask)  # mask = non-zeros
    assert torch.equal(w3.crow, w.crow) and torch.equal(w3.col, w.col)


def test_index_dtype_and_bytes():
    assert index_dtype(32768) == torch.int16 and index_dtype(32769) == torch.int32
    w = random_weight(64, 128, 0.3, torch.bfloat16, special_rows=False)
    assert w.col.dtype == torch.int16 and w.values.dtype == torch.bfloat16
    assert w.nbytes() == w.nnz * (2 + 2) + (64 + 1) * 4
    wide = CSRWeight.from_dense(torch.zeros(2, 40000).index_fill_(1, torch.tensor([5, 39999]), 1.0))
    assert wide.col.dtype == torch.int32 and wide.col.tolist() == [5, 39999, 5, 39999]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_matches_masked_linear(isa, bias, dtype):
    lin = torch.nn.Linear(150, 40, bias=bias).to(dtype)
    mask = torch.rand(40, 150) < 0.3
    layer = SparseLinear.from_dense(lin, mask)
    assert layer.nnz == int(mask.sum()) and layer.in_features == 150 and layer.out_features == 40
    assert torch.equal(layer.to_dense(), lin.weight.detach() * mask)
    x = torch.randn(2, 7, 150).to(dtype)
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    wd = (lin.weight.detach().double() * mask).requires_grad_()
    bd = lin.bias.detach().double().requires_grad_() if bias else None
    y = layer(xs)
    yd = F.linear(xd, wd, bd)
    dy = torch.randn_like(yd)
    y.backward(dy.to(dtype))
    yd.backward(dy)
    rtol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 1e-1)
    torch.testing.assert_close(y.double(), yd, rtol=rtol, atol=atol)
    torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.values.grad.double(), wd.grad[mask], rtol=rtol, atol=atol)
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), bd.grad, rtol=rtol, atol=atol)


def test_training_updates_only_kept_weights():
    torch.manual_seed(1)
    lin = torch.nn.Linear(30, 10)
    mask = torch.rand(10, 30) < 0.5
    layer = SparseLinear.from_dense(lin, mask)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(64, 30)
    target = x @ (torch.randn(10, 30) * mask).T  # reachable with this topology
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    dense = layer.to_dense()
    assert bool((dense[~mask] == 0).all()) and layer.nnz == int(mask.sum())


def test_to_linear_and_state_dict_round_trip():
    lin = torch.nn.Linear(20, 8)
    layer = SparseLinear.from_dense(lin, torch.rand(8, 20) < 0.5)
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer.to_linear()(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = SparseLinear.from_dense(lin, torch.rand(8, 20) < 0.5)
    if other.nnz != layer.nnz:  # a different topology: shapes must match to load
        other = SparseLinear(layer.weight, layer.bias)
        other.values.data.zero_()
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other(x), layer(x))


def test_extra_repr():
    layer = SparseLinear.from_dense(torch.nn.Linear(20, 8), torch.rand(8, 20) < 0.5)
    r = repr(layer)
    assert "in_features=20" in r and "out_features=8" in r and f"nnz={layer.nnz}" in r and "sparsity=" in r
