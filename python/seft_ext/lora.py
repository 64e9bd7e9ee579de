"""PEFT LoRA on a pruned model stored dense: the baseline a user would run instead of SEFT.

The rank matches SEFT's trainable budget over the same layers. A LoRA of rank r on a layer of
shape (out, in) trains ``r * (in + out)`` values; SEFT trains ``k_l = config.trainable_for(out, in)``
delta entries on layer l. Over the decoder linears L:

    r = max(1, round(sum_l k_l / sum_l (in_l + out_l)))

which is exactly ``config.lora_rank`` with SEFT's default budget (``k = lora_rank * (in + out)``)
and the nearest rank for a ``--k`` / ``--density`` budget.

``add_lora`` wraps every decoder linear (PEFT ``target_modules``: their names), ``merge_and_remask``
folds the adapter into the weights and zeroes the pruned positions again (the sparsity a
sparse deployment needs; the adapter's values there are lost). The driver's ``--method lora``
uses ``merge_in_place`` and ``export_lora`` (the adapter saved, then the merged model exported).
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .config import SEFTConfig


def decoder_linear_names(model: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> list[str]:
    """Full names of the nn.Linear modules inside the decoder layers (those SEFT converts)."""
    from .prune_llm import decoder_layers

    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    exclude = tuple(exclude)
    return [f"{prefix}.{n}" for n, m in layers.named_modules()
            if isinstance(m, nn.Linear) and not any(e in n for e in exclude)]


def lora_rank_for(model: nn.Module, config: SEFTConfig, names: Optional[list[str]] = None) -> int:
    """The LoRA rank whose parameter count over ``names`` (default: the decoder linears) is
    nearest to SEFT's trainable budget there (see the module doc)."""
    names = decoder_linear_names(model) if names is None else names
    if not names:
        raise ValueError("lora_rank_for: the model has no decoder linears")
    shapes = [model.get_submodule(n).weight.shape for n in names]
    budget = sum(config.trainable_for(int(o), int(i)) for o, i in shapes)
    per_rank = sum(int(o) + int(i) for o, i in shapes)
    return max(1, round(budget / per_rank))


def add_lora(model: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
             names: Optional[list[str]] = None):
    """The PEFT model with a LoRA of ``rank`` on every decoder linear (``names``); only the
    adapters train. ``alpha`` defaults to ``2 * rank`` (scale 2)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover
        raise ImportError("the LoRA baseline needs peft (pip install 'peft>=0.17')") from e
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"add_lora: rank must be a positive int, got {rank!r}")
    names = decoder_linear_names(model) if names is None else names
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                     target_modules=names, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        return get_peft_model(model, cfg)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_and_remask(peft_model, masks: dict[str, Tensor]) -> nn.Module:
    """The base model with the adapter merged, then each masked layer's pruned positions set
    to 0 again (``masks``: {decoder linear name: keep mask}, as ``prune_llm.prune_model`` returns)."""
    merge_in_place(peft_model, masks)
    return peft_model.unload()


@torch.no_grad()
def merge_in_place(peft_model, masks: dict[str, Tensor]) -> None:
    """``merge_and_remask`` that keeps the adapter modules (merged: they compute with the base
    weights alone), so the adapter can still be saved; ``peft_model.unload()`` then drops them."""
    peft_model.merge_adapter()
    model = peft_model.get_base_model()
    for name, keep in masks.items():
        w = model.get_submodule(name).weight  # a PEFT layer's is its base layer's
        w.mul_(keep.to(device=w.device, dtype=w.dtype))


def masked_sparsity(model: nn.Module, names: Iterable[str]) -> float:
    """Fraction of zeros over the weights of the named linears (PEFT layers: their base weights)."""
    ws = [model.get_submodule(n).weight for n in names]
    total = sum(w.numel() for w in ws)
    return 1.0 - sum(int((w != 0).sum()) for w in ws) / total if total else 0.0


def export_lora(peft_model, masks: dict[str, Tensor], tokenizer, folder, block: Optional[tuple] = None) -> None:
    """The outputs of a LoRA run whose adapter is merged and re-masked (``merge_in_place``):
    ``folder/lora_adapter`` (the PEFT adapter, for the pruned base), ``folder/dense`` (the merged,
    re-masked model) and ``folder/sparse.safetensors`` (its decoder linears, exactly the masks'
    positions). The adapter modules leave the model."""
    from pathlib import Path

    from .generate import sparsify_model
    from .hf import export_dense, export_sparse

    folder = Path(folder)
    peft_model.save_pretrained(folder / "lora_adapter")
    model = peft_model.unload()
    export_dense(model, tokenizer, folder / "dense")
    sparsify_model(model, masks, block=block)
    export_sparse(model, folder / "sparse.safetensors")
