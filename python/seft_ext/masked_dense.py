"""The masked-dense baseline: how the paper's own code works, kept as a speed and memory
reference. ``W = theta + delta`` is a dense (out, in) matrix, the matmuls are dense and the
full dense gradient ``dY^T X`` is computed every step; the delta takes its entries of it.
Evolution uses the same window statistics and decision as SEFT (``SEFTLinear`` with
``dense_compute = True``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def dense_weight(layer, delta: Optional[Tensor] = None) -> Tensor:
    """theta + delta of a SEFTLinear as a dense (out, in) matrix in the layer's dtype."""
    w = torch.zeros(layer.out_features * layer.in_features, dtype=layer.theta.dtype, device=layer.theta.device)
    rows = torch.searchsorted(layer.crow, torch.arange(layer.nnz, dtype=layer.crow.dtype, device=layer.crow.device),
                              right=True) - 1
    w[rows.long() * layer.in_features + layer.col.long()] = layer.effective_values(delta)
    return w.view(layer.out_features, layer.in_features)


class MaskedDenseFn(torch.autograd.Function):
    """y = x W^T + b with W dense; the delta's gradient is gathered from the dense gradient."""

    @staticmethod
    def forward(ctx, x, delta, bias, layer):
        w = dense_weight(layer, delta).to(x.dtype)  # x.dtype: the layer's, or autocast's
        ctx.save_for_backward(x, w)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        layer = ctx.layer
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        gx = dy @ w if ctx.needs_input_grad[0] else None
        dense_grad = dy2.T.to(layer.delta.dtype) @ x2.to(layer.delta.dtype)  # (out, in), every step
        gd = dense_grad.view(-1)[layer.slot_positions()]
        layer.feed_window(x2, dy2)  # the same window statistics as SEFT
        gb = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gd, gb, None
