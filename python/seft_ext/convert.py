"""Turn a model's nn.Linear layers into SEFTLinear (frozen sparse base + trainable delta)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .config import SEFTConfig
from .modules import freeze_all_but_deltas, replace_module
from .seft_block import SEFTBlockLinear
from .seft_linear import SEFTLinear


def linear_names(model: nn.Module, target: Optional[Iterable[str]] = None,
                 exclude: Iterable[str] = ("lm_head",)) -> list[str]:
    """Names of the nn.Linear modules to convert: those whose name contains one of
    ``target`` (None: all) and none of ``exclude``."""
    target = None if target is None else tuple(target)
    exclude = tuple(exclude)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and (target is None or any(t in n for t in target)) and not any(e in n for e in exclude)]


def convert_to_seft(model: nn.Module, config: SEFTConfig, target: Optional[Iterable[str]] = None,
                    exclude: Iterable[str] = ("lm_head",), masks: Optional[dict[str, Tensor]] = None,
                    dtype: Optional[torch.dtype] = None, freeze: bool = True,
                    dense_compute: bool = False) -> list[str]:
    """Replace the selected nn.Linear modules in place; returns their names.

    Each layer is pruned by ``masks[name]`` when given, else by magnitude at
    ``config.sparsity`` in ``config.budget`` scope, and gets ``config.trainable_for(out, in)``
    delta slots (positions drawn from seed ``config.seed + layer index``). With ``freeze``
    every other parameter of the model stops requiring gradients: only the deltas train.
    ``dense_compute``: the masked-dense baseline (same layers and evolution, dense matmuls and
    dense gradients).

    With ``config.block = (r, c)`` the layers are :class:`SEFTBlockLinear` (weights in r x c
    blocks, a delta of ``config.trainable_blocks_for(out, in)`` whole blocks): a mask is then a
    block mask ``[ceil(out / r), ceil(in / c)]`` or a dense mask constant on every block, and
    magnitude pruning scores a block by ``sum |w|``.
    """
    if not isinstance(config, SEFTConfig):
        raise TypeError(f"convert_to_seft: config must be a SEFTConfig, got {type(config).__name__}")
    if config.block is not None and dense_compute:
        raise ValueError("convert_to_seft: dense_compute (the masked-dense baseline) is CSR only; it cannot be "
                         f"combined with config.block = {config.block}")
    kind = SEFTLinear if config.block is None else SEFTBlockLinear
    names = linear_names(model, target, exclude)
    if not names:
        raise ValueError(f"convert_to_seft: no nn.Linear matches target={target} exclude={tuple(exclude)}")
    masks = masks or {}
    unknown = set(masks) - set(names)
    if unknown:
        raise ValueError(f"convert_to_seft: masks given for layers that are not converted: {sorted(unknown)[:3]}")
    # One layer at a time, holding no other reference to the dense modules: each dense weight
    # is freed as soon as its sparse replacement is in place (unless the caller holds it).
    for i, name in enumerate(names):
        try:
            layer = kind.from_linear(model.get_submodule(name), config, masks.get(name), dtype=dtype,
                                           seed=config.seed + i)
        except ValueError as e:
            raise ValueError(f"convert_to_seft: layer {name!r}: {e}") from None
        layer.dense_compute = dense_compute
        replace_module(model, name, layer)
        del layer
    if freeze:
        freeze_all_but_deltas(model)
    model.seft_config = config  # what save_pretrained records
    from .persist import keep_sparse_buffers_out_of_ddp

    keep_sparse_buffers_out_of_ddp(model)
    return names


def seft_layers(model: nn.Module) -> dict[str, SEFTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SEFTLinear)}


def model_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over the SEFT layers, or (none converted) over the decoder's nn.Linear weights."""
    layers = seft_layers(model)
    if layers:
        nnz, total = sum(m.nnz for m in layers.values()), sum(m.out_features * m.in_features for m in layers.values())
    else:
        from .prune_llm import decoder_layers

        ws = [m.weight for m in decoder_layers(model).modules() if isinstance(m, nn.Linear)]
        nnz, total = sum(int((w != 0).sum()) for w in ws), sum(w.numel() for w in ws)
    return 1.0 - nnz / total if total else 0.0
