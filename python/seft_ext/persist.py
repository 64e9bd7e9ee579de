"""Save and load a SEFT model the PEFT way: only what SEFT owns, next to a base model.

``save_pretrained(model, dir)`` writes two files:

- ``seft_config.json``: the format, the library versions, the SEFTConfig (when the model
  was converted with one), every SEFT layer's spec (shape, k, budget, N:M, method, dtype),
  the base model's name or path and a fingerprint of it (a SHA-256 over the parameters
  and buffers outside the SEFT layers that were frozen, such as embeddings and norms), the
  names of trained parameters outside the SEFT layers, and a SHA-256 of the tensor file;
- ``seft_model.safetensors``: per SEFT layer its pattern (crow, col), theta, delta slots,
  delta and bias, plus the trained parameters outside the SEFT layers (``extra.<name>``).

``from_pretrained(base, dir)`` checks everything against ``base`` first (names, shapes,
the fingerprint) and only then swaps the layers in: the result computes bit for bit what
the saved model computed. ``merge_and_unload(model)`` folds each delta into its base.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .checkpoint import sha256_file, write_atomic
from .config import SEFTConfig
from .convert import seft_layers
from .layer import SparseLinear
from .modules import freeze_all_but_deltas, replace_module
from .bsr import BSRWeight
from .seft_block import SEFTBlockLinear
from .seft_linear import SEFTLinear
from .sparse import CSRWeight

FORMAT = "seft_ext/seft-v1"
CONFIG_NAME = "seft_config.json"
WEIGHTS_NAME = "seft_model.safetensors"
LAYER_TENSORS = ("crow", "col", "theta", "delta_slots", "delta", "bias")


# ---------------------------------------------------------------------- fingerprint
def _inside(name: str, prefixes) -> bool:
    return any(name == s or name.startswith(s + ".") for s in prefixes)


def base_tensors(model: nn.Module, exclude=None, frozen_only: bool = True) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers outside the modules named in ``exclude`` (default:
    the SEFT layers), the frozen parameters only when ``frozen_only``; by name."""
    exclude = list(seft_layers(model)) if exclude is None else list(exclude)
    params = dict(model.named_parameters())
    out = {n: p for n, p in params.items() if not _inside(n, exclude) and not (frozen_only and p.requires_grad)}
    out.update({n: b for n, b in model.state_dict().items()
                if n not in params and n not in out and not _inside(n, exclude)})
    return out


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------- save
def _layer_spec(layer: SEFTLinear) -> dict:
    return {"shape": [layer.out_features, layer.in_features], "k": layer.k, "nnz": layer.nnz,
            "budget": layer.budget, "nm": [layer.nm_n, layer.nm_m], "method": layer.method,
            "dtype": str(layer.theta.dtype).replace("torch.", ""), "bias": layer.bias is not None,
            "dense_compute": bool(layer.dense_compute), "block": None if layer.block is None else list(layer.block)}


def _versions() -> dict:
    from . import __version__

    v = {"seft_ext": __version__, "torch": torch.__version__}
    try:
        import transformers
        v["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return v


def _base_name(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or None


def save_pretrained(model: nn.Module, save_directory: Union[str, Path], base_model_name_or_path: Optional[str] = None,
                    config: Optional[SEFTConfig] = None) -> Path:
    """Write ``seft_config.json`` and ``seft_model.safetensors`` into ``save_directory``
    (created if needed; each file written aside, then moved into place). Returns the folder."""
    from safetensors.torch import save_file

    layers = seft_layers(model)
    if not layers:
        raise ValueError("save_pretrained: the model has no SEFTLinear layer (convert it with convert_to_seft)")
    config = config if config is not None else getattr(model, "seft_config", None)
    if config is not None and not isinstance(config, SEFTConfig):
        raise TypeError(f"save_pretrained: config must be a SEFTConfig, got {type(config).__name__}")
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_pretrained: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{f}": getattr(layer, f).detach().cpu().contiguous().clone()
               for name, layer in layers.items() for f in LAYER_TENSORS if getattr(layer, f) is not None}
    trained = {n: p for n, p in base_tensors(model, frozen_only=False).items()
               if isinstance(p, nn.Parameter) and p.requires_grad}  # trained outside the SEFT layers
    tensors.update({f"extra.{n}": p.detach().cpu().contiguous().clone() for n, p in trained.items()})
    write_atomic(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    info = {"format": FORMAT, "versions": _versions(),
            "seft_config": None if config is None else config.to_dict(),
            "target_modules": list(layers), "layers": {n: _layer_spec(m) for n, m in layers.items()},
            "trained_outside": sorted(trained),
            "base_model": {"name_or_path": base_model_name_or_path or _base_name(model),
                           "fingerprint": fingerprint(base_tensors(model))},
            "sha256": sha256_file(folder / WEIGHTS_NAME)}
    write_atomic(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(info, indent=1) + "\n"))
    return folder


# ---------------------------------------------------------------------- load
def read_config(directory: Union[str, Path]) -> dict:
    """The ``seft_config.json`` of a saved SEFT model, checked for its format."""
    folder = Path(directory)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} (not a folder written by seft_ext.save_pretrained)")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise ValueError(f"{path}: not a {FORMAT} file (format {found!r})")
    return info


def _load_tensors(folder: Path, info: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: {WEIGHTS_NAME} is missing")
    if sha256_file(path) != info.get("sha256"):
        raise ValueError(f"{path}: truncated or modified (its SHA-256 differs from {CONFIG_NAME})")
    return load_file(str(path))


def _check_base(base: nn.Module, info: dict, folder: Path) -> None:
    """Every target is an nn.Linear of the saved shape; the fingerprint matches."""
    for name, spec in info["layers"].items():
        try:
            m = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"from_pretrained: the base model has no module {name!r} (saved in {folder})") from None
        if not isinstance(m, nn.Linear):
            raise ValueError(f"from_pretrained: {name!r} is a {type(m).__name__} in the base model, expected nn.Linear")
        if [m.out_features, m.in_features] != spec["shape"]:
            raise ValueError(f"from_pretrained: {name!r} is {m.out_features}x{m.in_features} in the base model but "
                             f"{spec['shape'][0]}x{spec['shape'][1]} in {folder}")
    saved = info["base_model"]
    probe = {n: t for n, t in base_tensors(base, exclude=info["layers"], frozen_only=False).items()
             if n not in info["trained_outside"]}
    if fingerprint(probe) != saved["fingerprint"]:
        raise ValueError(f"from_pretrained: the base model differs from the one {folder} was trained on "
                         f"({saved.get('name_or_path')!r}): its embeddings, norms or other weights outside the SEFT "
                         "layers do not match the saved fingerprint")


def _build_layer(name: str, spec: dict, tensors: dict, folder: Path) -> SEFTLinear:
    get = tensors.get
    for f in ("crow", "col", "theta", "delta_slots", "delta"):
        if f"{name}.{f}" not in tensors:
            raise ValueError(f"from_pretrained: {folder / WEIGHTS_NAME} has no {name}.{f}")
    try:
        layer = _empty_layer(spec, get(f"{name}.crow"), get(f"{name}.col"), get(f"{name}.theta"), get(f"{name}.bias"))
        if get(f"{name}.delta_slots").shape != layer.delta_slots.shape or \
                get(f"{name}.delta").shape != layer.delta.shape:
            raise ValueError("delta sizes differ from k")
        with torch.no_grad():
            layer.delta_slots.copy_(get(f"{name}.delta_slots"))
            layer.delta.copy_(get(f"{name}.delta"))
        layer.dense_compute = bool(spec.get("dense_compute", False))
        _check_slots(layer)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"from_pretrained: layer {name!r} in {folder}: {e}") from None
    return layer


def _empty_layer(spec: dict, crow, col, theta, bias) -> SEFTLinear:
    """The layer a spec describes over the saved pattern and base values (its delta still to fill)."""
    shape = tuple(spec["shape"])
    if spec.get("block") is None:
        return SEFTLinear(CSRWeight(crow, col, theta, shape), int(spec["k"]), bias, spec["budget"], tuple(spec["nm"]),
                          spec["method"])
    if theta.dim() != 3 or list(theta.shape[1:]) != list(spec["block"]):
        raise ValueError(f"theta must be [blocks, {spec['block'][0]}, {spec['block'][1]}], got {tuple(theta.shape)}")
    return SEFTBlockLinear(BSRWeight(crow, col, theta, shape), int(spec["k"]), bias, spec["budget"], spec["method"])


def _check_slots(layer: SEFTLinear) -> None:
    s = layer.delta_slots
    if s.numel() and (int(s.min()) < 0 or int(s.max()) >= layer.col.numel() or bool((s[1:] <= s[:-1]).any())):
        raise ValueError("delta_slots must be strictly increasing indices into the pattern")


def from_pretrained(base_model: nn.Module, directory: Union[str, Path], is_trainable: bool = False) -> nn.Module:
    """Rebuild the SEFT layers saved in ``directory`` on ``base_model`` (a freshly loaded copy
    of the model they were trained on), without re-pruning; returns ``base_model``.

    Everything is checked before anything changes: a base without a saved layer, with another
    shape there or with different embeddings / norms is refused, naming the first mismatch.
    ``is_trainable``: leave the deltas trainable (else every parameter is frozen, eval mode)."""
    folder = Path(directory)
    info = read_config(folder)
    tensors = _load_tensors(folder, info)
    _check_base(base_model, info, folder)
    layers = {name: _build_layer(name, spec, tensors, folder) for name, spec in info["layers"].items()}
    extra = {n[len("extra."):]: t for n, t in tensors.items() if n.startswith("extra.")}
    device = next((p.device for p in base_model.parameters()), torch.device("cpu"))
    for name, layer in layers.items():
        replace_module(base_model, name, layer.to(device))
    with torch.no_grad():
        params = dict(base_model.named_parameters())
        for n, t in extra.items():
            params[n].copy_(t)
    if info.get("seft_config") is not None:
        base_model.seft_config = SEFTConfig(**info["seft_config"])
    keep_sparse_buffers_out_of_ddp(base_model)
    freeze_all_but_deltas(base_model)
    if not is_trainable:
        for layer in seft_layers(base_model).values():
            layer.delta.requires_grad_(False)
        base_model.eval()
    return base_model


# ---------------------------------------------------------------------- merge / count / DDP
def merge_and_unload(model: nn.Module, sparse: bool = False) -> nn.Module:
    """Replace every SEFTLinear by a layer holding theta + delta (exactly the layer's
    non-zeros): a plain ``nn.Linear`` (dense storage, zeros kept), or with ``sparse=True`` a
    :class:`SparseLinear` for sparse inference (in blocks for a block layer). In place; returns
    ``model``."""
    for name, layer in seft_layers(model).items():
        if sparse:
            merged = SparseLinear(layer.merged(), None if layer.bias is None else layer.bias.detach())
        else:
            merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               dtype=layer.theta.dtype, device=layer.theta.device)
            with torch.no_grad():
                merged.weight.copy_(layer.to_dense())
                if layer.bias is not None:
                    merged.bias.copy_(layer.bias)
        replace_module(model, name, merged)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) as PEFT counts them: a SEFT layer counts its non-zeros plus its delta entries, the rest
    of the model its parameters."""
    layers = seft_layers(model)
    trainable = total = 0
    for layer in layers.values():
        total += layer.nnz + layer.delta.numel() + (layer.bias.numel() if layer.bias is not None else 0)
        trainable += layer.delta.numel() if layer.delta.requires_grad else 0
        if layer.bias is not None and layer.bias.requires_grad:
            trainable += layer.bias.numel()
    for n, p in model.named_parameters():
        if not _inside(n, list(layers)):
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints ``trainable params: T || all params: A || trainable%: P`` (PEFT's format)."""
    t, a = trainable_parameters(model)
    print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")


def keep_sparse_buffers_out_of_ddp(model: nn.Module) -> None:
    """DistributedDataParallel must not broadcast the SEFT layers' pattern buffers (their int16
    columns cannot be broadcast, and the controller keeps them equal across ranks anyway):
    they are listed in the model's ``_ddp_params_and_buffers_to_ignore``."""
    names = [f"{n}.{b}" for n, m in seft_layers(model).items() for b in ("crow", "col", "theta", "delta_slots")]
    old = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = sorted(set(old) | set(names))
