"""Export a SEFT model as a dense base model plus a PEFT SHiRA adapter.

SHiRA (PEFT's sparse high-rank adapter) stores a sparse delta of exactly ``r (in + out)``
entries per layer, with its indices in the adapter file: the budget of SEFT's default
``k = lora_rank (in + out)``. The base folder holds the final theta (adapt has pruned some
base weights, so it is not the originally pruned model); the adapter holds the delta. Where a
layer's k is not ``r (in + out)`` for the adapter's one r, the adapter is padded with zero
entries at positions outside the delta, which change nothing.
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)`` then
computes what the SEFT model computes.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from .convert import seft_layers
from .modules import replace_module
from .sparse import CSRWeight


def shira_rank(layers: dict) -> int:
    """The smallest r whose r (in + out) holds every layer's k (and fits in each layer)."""
    r = max(math.ceil(m.k / (m.in_features + m.out_features)) for m in layers.values())
    for name, m in layers.items():
        if r * (m.in_features + m.out_features) > m.in_features * m.out_features:
            raise ValueError(f"export_peft: SHiRA rank {r} does not fit layer {name!r} "
                             f"({m.out_features}x{m.in_features})")
    return r


def _padded_delta(layer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int32 [2, n], values [n]): the delta at its positions plus zero entries at the
    first positions outside it, in position order."""
    pos = layer.slot_positions().cpu()
    values = layer.delta.detach().cpu()
    extra = n - pos.numel()
    if extra > 0:
        taken = torch.zeros(layer.out_features * layer.in_features, dtype=torch.bool)
        taken[pos] = True
        pad = torch.nonzero(~taken).flatten()[:extra]
        pos = torch.cat([pos, pad])
        values = torch.cat([values, torch.zeros(extra, dtype=values.dtype)])
        pos, order = pos.sort()
        values = values[order]
    rows, cols = pos // layer.in_features, pos % layer.in_features
    return torch.stack([rows, cols]).to(torch.int), values


def _base_with_theta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose SEFT layers are dense nn.Linear layers holding theta alone."""
    base = copy.deepcopy(model)
    for name, layer in seft_layers(base).items():
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.theta.dtype)
        with torch.no_grad():
            theta = CSRWeight(layer.crow, layer.col, layer.theta.detach(), (layer.out_features, layer.in_features))
            lin.weight.copy_(theta.to_dense())
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        replace_module(base, name, lin)
    for p in base.parameters():
        p.requires_grad_(True)
    return base


def export_peft(model: nn.Module, tokenizer, folder) -> tuple[Path, Path]:
    """Write ``folder/base`` (a plain Hugging Face model with the final theta) and
    ``folder/adapter`` (a PEFT SHiRA adapter holding the delta). Returns (base, adapter)."""
    try:
        from peft import ShiraConfig, get_peft_model
    except ImportError:
        raise ModuleNotFoundError("export_peft needs PEFT >= 0.17 (SHiRA): pip install peft") from None
    layers = seft_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no SEFTLinear layer")
    blocked = [n for n, m in layers.items() if m.block is not None]
    if blocked:
        raise ValueError(f"export_peft: layer {blocked[0]!r} is in {layers[blocked[0]].block} blocks; the SHiRA "
                         "adapter holds single entries, so block layers export as a dense (hf) or sparse model only")
    folder = Path(folder)
    r = shira_rank(layers)
    base = _base_with_theta(model)
    base_dir, adapter_dir = folder / "base", folder / "adapter"
    base.save_pretrained(base_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(base_dir)
    cfg = ShiraConfig(r=r, target_modules=list(layers), init_weights=True, random_seed=0)
    peft_model = get_peft_model(base, cfg)
    for name, layer in layers.items():
        target = peft_model.base_model.model.get_submodule(name)
        idx, values = _padded_delta(layer, r * (layer.in_features + layer.out_features))
        target.shira_indices["default"] = idx.to(target.shira_weight["default"].device)
        with torch.no_grad():
            target.shira_weight["default"].copy_(values)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir
