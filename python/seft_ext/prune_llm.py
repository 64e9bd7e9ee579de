"""Prune a Hugging Face causal LM layer by layer on calibration text.

For Wanda and SparseGPT the decoder layers are processed in order: the calibration hidden
states entering layer i are cached, the statistics of layer i's linears (``sum_t X_tj^2``
for Wanda, ``H = X^T X`` for SparseGPT) are gathered by running that one layer, its
linears are pruned in place, and the layer is run again to give the (pruned) inputs of
layer i + 1. Memory beyond the model: the cached hidden states and one layer's statistics.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .config import BUDGETS
from .prune import check_block, magnitude_mask, sparsegpt_prune, wanda_mask

METHODS = ("magnitude", "wanda", "sparsegpt")


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA / Mistral / Qwen / Gemma-style causal LM."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod
    raise TypeError(f"prune_model: cannot find the decoder layers of {type(model).__name__} "
                    "(expected model.model.layers as in LLaMA / Mistral / Qwen / Gemma)")


def _require_linears(model: nn.Module, layers: nn.ModuleList, exclude: tuple[str, ...]) -> None:
    if not _linears(layers[0], exclude):
        kinds = sorted({type(m).__name__ for m in layers[0].modules()} - {type(layers[0]).__name__})
        raise TypeError(f"prune_model: the decoder layers of {type(model).__name__} hold no nn.Linear (they hold "
                        f"{', '.join(kinds[:6])}); supported: LLaMA / Mistral / Qwen / Gemma-style models")


def _linears(layer: nn.Module, exclude: tuple[str, ...]) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and not any(e in n for e in exclude)}


def _capture_layer0_inputs(model: nn.Module, layers: nn.ModuleList, batches: Iterable[Tensor]):
    """(args, kwargs) of the first decoder layer for each calibration batch."""
    cached = []

    def hook(module, args, kwargs):
        cached.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return cached


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sparsity: float, budget: str = "row", nm: tuple[int, int] = (2, 4),
                calibration: Optional[Iterable[Tensor]] = None, exclude: Iterable[str] = (),
                progress: bool = True, block: Optional[tuple[int, int]] = None) -> dict[str, Tensor]:
    """Prune every nn.Linear inside the decoder layers in place (pruned weights set to 0;
    SparseGPT also updates the kept ones). Returns ``{module name: keep mask}``.

    ``calibration``: token-id batches (LongTensor (B, L)), needed by wanda / sparsegpt.
    ``budget``: layer | row | nm (see seft_ext.prune). ``block=(r, c)``: prune whole r x c
    blocks (layer or row budget; the masks are constant on each block)."""
    if method not in METHODS:
        raise ValueError(f"prune_model: method must be one of {METHODS}, got {method!r}")
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"prune_model: sparsity must be in [0, 1), got {sparsity}")
    if budget not in BUDGETS:
        raise ValueError(f"prune_model: budget must be one of {BUDGETS}, got {budget!r}")
    try:
        block = check_block(block, budget)
    except ValueError as e:
        raise ValueError(f"prune_model: {str(e).removeprefix('prune: ')}") from None
    layers = decoder_layers(model)
    exclude = tuple(exclude)
    _require_linears(model, layers, exclude)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    masks: dict[str, Tensor] = {}
    if method == "magnitude":
        for i, layer in enumerate(layers):
            for name, lin in _linears(layer, exclude).items():
                mask = magnitude_mask(lin.weight, sparsity, budget, nm, block)
                lin.weight.mul_(mask)
                masks[f"{prefix}.{i}.{name}"] = mask
        return masks
    if calibration is None:
        raise ValueError(f"prune_model: {method} needs calibration batches")
    batches = list(calibration)
    if not batches:
        raise ValueError("prune_model: the calibration data is empty")
    cached = _capture_layer0_inputs(model, layers, batches)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = enumerate(layers)
    if progress and tqdm is not None:
        it = tqdm(it, total=len(layers), desc=f"prune {method} {sparsity:.0%}", unit="layer")
    for i, layer in it:
        lins = _linears(layer, exclude)
        stats = {}

        def make_hook(name, lin):
            def hook(module, args, output):
                x = args[0].detach().reshape(-1, lin.in_features).double()
                if method == "wanda":
                    stats[name] = stats.get(name, 0) + (x * x).sum(0)
                else:
                    stats[name] = stats.get(name, 0) + x.T @ x
            return hook

        handles = [lin.register_forward_hook(make_hook(n, lin)) for n, lin in lins.items()]
        try:
            for args, kwargs in cached:
                layer(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, lin in lins.items():
            if name not in stats:
                raise RuntimeError(f"prune_model: {prefix}.{i}.{name} saw no calibration input")
            if method == "wanda":
                mask = wanda_mask(lin.weight, stats[name], sparsity, budget, nm, block)
                lin.weight.mul_(mask)
            else:
                mask, new_w = sparsegpt_prune(lin.weight, stats[name], sparsity, budget, nm, block=block)
                lin.weight.copy_(new_w.to(lin.weight.dtype))
            masks[f"{prefix}.{i}.{name}"] = mask
        stats = None  # free the layer's statistics
        nxt = []
        for args, kwargs in cached:  # the pruned layer's outputs feed the next layer
            out = layer(*args, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
            nxt.append(_with_hidden(args, kwargs, h.detach()))
        cached = nxt
    return masks


def complete_nm(mask: Tensor, n: int, m: int) -> Tensor:
    """An existing N:M mask with exactly ``n`` kept positions per group of ``m`` inputs: a group
    with fewer non-zeros (a kept weight that is exactly 0, as a quantized model has) gets its
    first zeros back as kept (stored zeros). Raises ValueError on a group with more than ``n``."""
    out, inp = mask.shape
    if inp % m:
        raise ValueError(f"{m} does not divide in_features = {inp}")
    groups = mask.reshape(out, inp // m, m)
    count = groups.sum(-1, keepdim=True)
    if bool((count > n).any()):
        row, g = (count[..., 0] > n).nonzero()[0].tolist()
        raise ValueError(f"row {row}, group {g} has {int(count[row, g, 0])} non-zeros, more than {n}")
    zero_rank = (~groups).cumsum(-1)  # 1, 2, ... over each group's zeros
    return (groups | (~groups & (zero_rank <= n - count))).reshape(out, inp)


def existing_masks(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, Tensor]:
    """The non-zeros of every nn.Linear inside the decoder layers, as keep masks (for a model
    pruned before and saved densely)."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return {f"{prefix}.{i}.{name}": lin.weight.detach() != 0
            for i, layer in enumerate(layers) for name, lin in _linears(layer, tuple(exclude)).items()}
