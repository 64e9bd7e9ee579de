"""The causal-LM loss without the whole ``[tokens, vocab]`` logits alive at once.

Hugging Face's ``model(input_ids, labels=...)`` builds fp32 logits for every token, then
their log-softmax and, in backward, their gradient: for SmolLM2 (vocabulary 49,152) at 4 x 256
tokens that is about 200 MB each. ``causal_lm_loss`` runs the decoder once, then the
``lm_head`` and the cross-entropy chunk by chunk of tokens under activation checkpointing,
so at most one chunk's logits exist at a time (forward and backward). Only tokens with a
label (not -100) reach the ``lm_head`` at all: an answer-only loss costs only the answers'
logits. With a frozen ``nn.Linear`` head (the SEFT and LoRA setting), each chunk's gradient
with respect to the hidden states is computed with its loss, so the logits are made once
instead of again in backward. The result is the mean next-token cross-entropy, as
``model(..., labels=...).loss``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 512


def _head_parts(model: nn.Module):
    """(decoder, lm_head, softcap) of a Hugging Face causal LM."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"causal_lm_loss: {type(model).__name__} exposes no decoder / output embeddings")
    return decoder, head, getattr(model.config, "final_logit_softcapping", None)


def _chunk_nll(head: nn.Module, softcap: Optional[float], h: Tensor, y: Tensor) -> Tensor:
    logits = head(h)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, reduction="sum")


class _FrozenHeadNLL(torch.autograd.Function):
    """Summed cross-entropy of ``softcap(h W^T + b)`` against ``y`` for a frozen head, with its
    gradient with respect to ``h`` computed in the same pass: the chunk's logits are made once
    (the checkpointed path makes them again in backward) and only dh (tokens x hidden) is kept."""

    @staticmethod
    def forward(ctx, h, weight, bias, softcap, y):
        logits = F.linear(h, weight, bias)
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        t = None
        if softcap:
            t = torch.tanh(logits / softcap)
            logits = t * softcap
        lse = torch.logsumexp(logits, -1)
        rows = torch.arange(y.numel(), device=y.device)
        nll = (lse - logits[rows, y]).sum()
        g = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of the logits
        g[rows, y] -= 1
        if t is not None:
            g.mul_(1 - t * t)
        ctx.save_for_backward((g.to(weight.dtype) @ weight).to(h.dtype))
        return nll

    @staticmethod
    def backward(ctx, grad):
        (dh,) = ctx.saved_tensors
        return dh * grad.to(dh.dtype), None, None, None, None


def _frozen_linear_head(head: nn.Module) -> bool:
    return (type(head) is nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


def token_nll(model: nn.Module, input_ids: Tensor, labels: Optional[Tensor] = None,
              chunk_tokens: int = CHUNK_TOKENS) -> tuple[Tensor, int]:
    """(summed next-token NLL, number of predicted tokens) over the labelled positions
    (``labels`` defaults to ``input_ids``; -100 marks positions without a loss)."""
    decoder, head, softcap = _head_parts(model)
    labels = input_ids if labels is None else labels
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = (y != -100).nonzero().flatten()
    if keep.numel() < y.numel():
        h, y = h.index_select(0, keep), y.index_select(0, keep)
    total = h.new_zeros((), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
    grad = torch.is_grad_enabled() and h.requires_grad
    fused = grad and _frozen_linear_head(head)
    for i in range(0, y.numel(), chunk_tokens):
        hc, yc = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
        if fused:
            nll = _FrozenHeadNLL.apply(hc, head.weight, head.bias, softcap, yc)
        elif grad:
            nll = checkpoint(_chunk_nll, head, softcap, hc, yc, use_reentrant=False)
        else:
            nll = _chunk_nll(head, softcap, hc, yc)
        total = total + nll
    return total, int(y.numel())


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Optional[Tensor] = None,
                   chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """Mean next-token cross-entropy over the labelled positions (see the module doc)."""
    total, n = token_nll(model, input_ids, labels, chunk_tokens)
    return total / max(n, 1)


class CausalLMLoss(nn.Module):
    """``causal_lm_loss`` as a module around ``model`` (so DistributedDataParallel can wrap
    it: the loss's forward is the one DDP sees)."""

    def __init__(self, model: nn.Module, chunk_tokens: int = CHUNK_TOKENS):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return causal_lm_loss(self.model, input_ids, labels, self.chunk_tokens)
