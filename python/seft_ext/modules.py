"""Small helpers on a model's modules, shared by conversion, checkpoints, export and loading."""
from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``name`` in ``model``; returns the module it replaces.
    Raises ValueError when the model has no module of that name."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
    except AttributeError:
        raise ValueError(f"the model has no module {name!r}") from None
    setattr(parent, attr, new)
    return old


def freeze_all_but_deltas(model: nn.Module) -> None:
    """Only the SEFT deltas train: every other parameter stops requiring gradients."""
    from .seft_linear import SEFTLinear

    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, SEFTLinear):
            m.delta.requires_grad_(True)
