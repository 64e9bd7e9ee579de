"""Hugging Face integration: a Trainer callback that survives save and resume, and sparse
export / import of the fine-tuned weights (topology + values in safetensors)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .config import SEFTConfig
from .convert import seft_layers
from .layer import SparseLinear
from .modules import replace_module
from .bsr import BSRWeight
from .sparse import CSRWeight
from .window import EvolutionWindow

try:  # transformers is optional for the rest of the package
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object


CONTROLLER_STATE = "seft_controller.safetensors"


class SEFTCallback(TrainerCallback):
    """Drives SEFT evolution inside ``transformers.Trainer``: convert the model first
    (``convert_to_seft``), then ``Trainer(..., callbacks=[SEFTCallback(config)])``.

    - The controller is built at the start of training from the Trainer's model, optimizer
      and ``max_steps`` (``total_steps`` overrides it) and steps after every optimizer step
      (once per optimizer step under gradient accumulation); ``callback.controller`` exposes it.
    - Under torchrun it shares the window statistics over the default process group, so the
      ranks keep one topology.
    - Every ``checkpoint-N`` folder gets the files of ``seft_ext.save_pretrained`` and the
      controller's state; ``resume_from_checkpoint`` restores that state, so a resumed run
      continues exactly. ``resume_from`` names the checkpoint folder when it is not
      ``output_dir/checkpoint-N``.
    """

    def __init__(self, config: SEFTConfig, total_steps: Optional[int] = None,
                 resume_from: Optional[Union[str, Path]] = None):
        if not isinstance(config, SEFTConfig):
            raise TypeError(f"SEFTCallback: config must be a SEFTConfig, got {type(config).__name__}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"SEFTCallback: total_steps must be a positive int or None, got {total_steps!r}")
        self.config, self.total_steps, self.controller = config, total_steps, None
        self.resume_from = None if resume_from is None else Path(resume_from)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from .evolve import SEFTController

        if optimizer is None:
            raise RuntimeError("SEFTCallback: the Trainer passed no optimizer to on_train_begin")
        total = self.total_steps or state.max_steps
        self.controller = SEFTController(model, optimizer, self.config, int(total), process_group="auto")
        if state.global_step > 0:
            folder = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            load_controller_state(self.controller, folder / CONTROLLER_STATE, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.step()

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.controller is None or not state.is_world_process_zero:
            return
        from .persist import save_pretrained

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_pretrained(model, folder, config=self.config)
        save_controller_state(self.controller, folder / CONTROLLER_STATE)


def save_controller_state(controller, path: Path) -> None:
    """The controller's scalars (JSON in the metadata) and in-flight windows (tensors), with the
    topology hash of its layers, in one safetensors file (written aside, then moved in)."""
    from safetensors.torch import save_file

    from .distributed import topology_hash

    state = controller.state_dict()
    windows = state.pop("windows")
    tensors, scalars = {}, {}
    for name, w in windows.items():
        scalars[name] = {k: w[k] for k in ("count", "steps", "finite", "scan_bytes")}
        tensors.update({f"{name}.{f}": w[f].cpu().contiguous() for f in EvolutionWindow.FIELDS if w[f] is not None})
    meta = {"controller": state, "windows": scalars, "topology": topology_hash(list(controller.layers.values()))}
    tensors["_format"] = torch.zeros(1)  # safetensors needs at least one tensor
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"seft_ext": "controller-v1", "state": json.dumps(meta)})
    tmp.replace(path)


def load_controller_state(controller, path: Path, step: int) -> None:
    """Restore what :func:`save_controller_state` wrote, after checking it belongs to this
    model (same topology hash) at this optimizer step."""
    from safetensors import safe_open

    from .distributed import topology_hash

    if not path.is_file():
        raise FileNotFoundError(
            f"SEFTCallback: resuming at step {step}, but {path} is missing: the checkpoint was not written by "
            "SEFTCallback, or it lies elsewhere (pass SEFTCallback(config, resume_from=CHECKPOINT_FOLDER))")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("seft_ext") != "controller-v1":
            raise ValueError(f"SEFTCallback: {path} is not a SEFT controller state")
        saved = json.loads(meta["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ctl = saved["controller"]
    if ctl["step_count"] != step:
        raise ValueError(f"SEFTCallback: {path} holds the controller at step {ctl['step_count']}, the Trainer "
                         f"resumes at step {step}")
    if saved["topology"] != topology_hash(list(controller.layers.values())):
        raise ValueError(f"SEFTCallback: {path} does not match the model's sparse topology: the model was not "
                         "restored from the same checkpoint")
    ctl["windows"] = {}
    for name, scal in saved["windows"].items():
        dev = controller.layers[name].theta.device if name in controller.layers else None
        w = {f: tensors.get(f"{name}.{f}") for f in EvolutionWindow.FIELDS}
        ctl["windows"][name] = {**{f: None if v is None else v.to(dev) for f, v in w.items()}, **scal}
    controller.load_state_dict(ctl)


def export_sparse(model: nn.Module, path: Path) -> None:
    """Every SEFT / Sparse layer's merged weight as CSR (crow, col, values, bias; BSR with values
    [nblocks, r, c] for block layers) in one safetensors file, with the shapes in its metadata."""
    from safetensors.torch import save_file

    tensors, shapes = {}, {}
    for name, m in model.named_modules():
        if hasattr(m, "merged"):
            w = m.merged()
        elif isinstance(m, SparseLinear):
            w = m.weight
        else:
            continue
        tensors[f"{name}.crow"], tensors[f"{name}.col"] = w.crow.cpu().contiguous(), w.col.cpu().contiguous()
        tensors[f"{name}.values"] = w.values.detach().cpu().contiguous()
        if getattr(m, "bias", None) is not None:
            tensors[f"{name}.bias"] = m.bias.detach().cpu().contiguous()
        shapes[name] = list(w.shape)
    if not shapes:
        raise ValueError("export_sparse: the model has no sparse layer")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"seft_ext": "sparse-v1", "shapes": json.dumps(shapes)})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def export_dense(model: nn.Module, tokenizer, folder: Path, overwrite: bool = False) -> None:
    """Replace every SEFTLinear by an nn.Linear holding theta + delta and save a plain HF folder
    (written aside, then moved into place). An existing ``folder`` is refused unless
    ``overwrite``; a failed write leaves nothing behind."""
    folder = Path(folder)
    if (folder.exists() or folder.is_symlink()) and not overwrite:
        raise FileExistsError(f"export_dense: {folder} exists; remove it or pass overwrite=True")
    for name, layer in seft_layers(model).items():
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.theta.dtype)
        with torch.no_grad():
            lin.weight.copy_(layer.to_dense())
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        replace_module(model, name, lin)
    tmp = folder.with_name(folder.name + ".tmp")
    _remove(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException:
        _remove(tmp)
        raise
    _remove(folder)
    tmp.rename(folder)


def _remove(path: Path) -> None:
    """Delete a file, a link or a folder tree, if there."""
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def load_sparse(model: nn.Module, path: Path) -> list[str]:
    """Replace the modules named in a file written by ``export_sparse`` with SparseLinear
    layers holding its weights; returns their names. Every entry is checked first (the
    target is an nn.Linear or SparseLinear of the same shape, the CSR arrays are valid), so a
    file that does not fit the model leaves it unchanged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("seft_ext") != "sparse-v1":
                raise ValueError(f"load_sparse: {path} is not a seft_ext sparse export")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        shapes = json.loads(meta["shapes"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"load_sparse: {path} is not a readable seft_ext sparse export ({e})") from None
    if not isinstance(shapes, dict) or not shapes:
        raise ValueError(f"load_sparse: {path} names no layer")
    layers = {name: _checked_sparse_layer(model, name, shape, tensors, path) for name, shape in shapes.items()}
    for name, layer in layers.items():
        replace_module(model, name, layer)
    return list(layers)


def _checked_sparse_layer(model: nn.Module, name: str, shape, tensors: dict, path) -> SparseLinear:
    """The SparseLinear for one entry of a sparse export, on the device of the module it replaces."""
    def bad(msg):
        raise ValueError(f"load_sparse: {path}: layer {name!r}: {msg}")

    try:
        target = model.get_submodule(name)
    except AttributeError:
        bad("the model has no module of that name")
    if not isinstance(target, (nn.Linear, SparseLinear)):
        bad(f"the model's module is a {type(target).__name__}, not a linear layer")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) for v in shape)):
        bad(f"bad shape {shape!r}")
    if tuple(shape) != (target.out_features, target.in_features):
        bad(f"shape {tuple(shape)} differs from the model's ({target.out_features}, {target.in_features})")
    missing = [f for f in ("crow", "col", "values") if f"{name}.{f}" not in tensors]
    if missing:
        bad(f"missing tensors {missing}")
    bias = tensors.get(f"{name}.bias")
    if (bias is None) != (target.bias is None):
        bad("has a bias where the model's layer has none" if bias is not None
            else "has no bias, the model's layer has one")
    device = target.values.device if isinstance(target, SparseLinear) else target.weight.device
    try:
        kind = BSRWeight if tensors[f"{name}.values"].dim() == 3 else CSRWeight  # blocks: [nblocks, r, c]
        w = kind(tensors[f"{name}.crow"], tensors[f"{name}.col"], tensors[f"{name}.values"], tuple(shape))
        return SparseLinear(w.to(device), None if bias is None else bias.to(device))
    except ValueError as e:
        bad(str(e))
