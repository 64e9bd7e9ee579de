"""Training checkpoints in safetensors (no pickle), written so that a kill never leaves
the newest complete checkpoint unreadable.

A checkpoint at step s is two files in DIR/checkpoints/: ``step-{s}.safetensors`` (every
SEFT layer's topology, base values and delta; the optimizer's per-parameter state; the
controller's in-flight window; the RNG states) and ``step-{s}.json`` (step, the run's
options, the results so far, the optimizer's hyper-parameters, the controller's scalars and
the sha256 of the tensor file). Each is written to a temporary name and renamed; the JSON
goes last, so a checkpoint exists only once both are complete. Loading picks the newest
step whose tensor file matches its recorded sha256 and says why it skipped any other.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
import torch
from torch import nn

from .convert import seft_layers
from .modules import freeze_all_but_deltas, replace_module
from .seft_linear import SEFTLinear
from .window import EvolutionWindow
from .sparse import CSRWeight

LAYER_FIELDS = ("crow", "col", "theta", "delta_slots", "delta", "bias")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _debug_kill(step: int) -> None:
    """SEFT_DEBUG_KILL_IN_SAVE=N: SIGKILL this process while writing the checkpoint of step N,
    after its tensor file's temporary copy is written (for the crash tests)."""
    if os.environ.get("SEFT_DEBUG_KILL_IN_SAVE") == str(step):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, controller,
         data_rng: torch.Generator, meta: dict, keep: int = 2) -> Path:
    """Write the checkpoint of `step`; keep the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    folder = Path(folder) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers = seft_layers(model)
    for name, layer in layers.items():
        for f in LAYER_FIELDS:
            t = getattr(layer, f)
            if t is not None:
                tensors[f"model.{name}.{f}"] = t.detach().cpu().contiguous().clone()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, val in optimizer.state.get(p, {}).items():
            tensors[f"optim.{i}.{key}"] = val.detach().cpu().contiguous().clone() if torch.is_tensor(val) \
                else torch.tensor(val)
    ctl = controller.state_dict()
    windows = ctl.pop("windows")
    win_scalars = {}
    for name, w in windows.items():
        win_scalars[name] = {k: w[k] for k in ("count", "steps", "finite", "scan_bytes")}
        for f in EvolutionWindow.FIELDS:
            if w[f] is not None:
                tensors[f"window.{name}.{f}"] = w[f].cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = data_rng.get_state()
    st = folder / f"step-{step}.safetensors"
    _write_atomic(st, lambda p: (save_file(tensors, str(p)), _debug_kill(step)))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    info = {"step": step, "meta": meta, "sha256": _sha256(st), "optimizer_groups": groups, "controller": ctl,
            "windows": win_scalars, "layers": {n: {"shape": [l.out_features, l.in_features], "k": l.k,
                                                   "budget": l.budget, "nm": [l.nm_n, l.nm_m],
                                                   "method": l.method, "dense_compute": l.dense_compute}
                                               for n, l in layers.items()}}
    _write_atomic(folder / f"step-{step}.json", lambda p: p.write_text(json.dumps(info, indent=1, default=str)))
    for old in sorted(_steps(folder))[:-keep]:
        for suffix in (".json", ".safetensors"):
            (folder / f"step-{old}{suffix}").unlink(missing_ok=True)
    return st


def _steps(folder: Path) -> list[int]:
    out = []
    for p in folder.glob("step-*.json"):
        try:
            out.append(int(p.stem.split("-", 1)[1]))
        except ValueError:
            pass
    return out


def latest(folder: Path) -> tuple[dict, Path]:
    """(info, tensor file) of the newest complete and intact checkpoint in DIR/checkpoints."""
    folder = Path(folder) / "checkpoints"
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume {folder.parent}: no checkpoints folder there")
    problems = []
    for step in sorted(_steps(folder), reverse=True):
        js, st = folder / f"step-{step}.json", folder / f"step-{step}.safetensors"
        try:
            info = json.loads(js.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"step {step}: unreadable JSON ({e})")
            continue
        if not st.is_file():
            problems.append(f"step {step}: tensor file missing")
            continue
        if _sha256(st) != info.get("sha256"):
            problems.append(f"step {step}: tensor file truncated or modified (sha256 differs)")
            continue
        if problems:
            import warnings
            warnings.warn("seft: skipped damaged checkpoints: " + "; ".join(problems), RuntimeWarning)
        return info, st
    raise FileNotFoundError(f"--resume {folder.parent}: no intact checkpoint"
                            + (f" ({'; '.join(problems)})" if problems else ""))


def restore(info: dict, tensor_file: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Put the checkpoint's SEFT layers into `model` (which holds the dense modules at those
    names) and return the remaining tensors (optimizer, window, RNG) for the caller."""
    from safetensors.torch import load_file

    tensors = load_file(str(tensor_file))
    for name, spec in info["layers"].items():
        get = lambda f: tensors.get(f"model.{name}.{f}")  # noqa: E731
        base = CSRWeight(get("crow"), get("col"), get("theta"), tuple(spec["shape"]))
        layer = SEFTLinear(base, spec["k"], get("bias"), spec["budget"], tuple(spec["nm"]), spec["method"])
        layer.dense_compute = bool(spec.get("dense_compute", False))
        with torch.no_grad():
            layer.delta_slots.copy_(get("delta_slots"))
            layer.delta.copy_(get("delta"))
        try:
            replace_module(model, name, layer)
        except ValueError:
            raise ValueError(f"checkpoint layer {name!r} does not exist in this model") from None
    freeze_all_but_deltas(model)
    return tensors


def restore_training(info: dict, tensors: dict, optimizer, controller, data_rng: torch.Generator) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for g, saved in zip(optimizer.param_groups, info["optimizer_groups"]):
        g.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
    for i, p in enumerate(params):
        # the moments follow their parameter's device; AdamW keeps "step" on the CPU
        state = {k.split(".", 2)[2]: v if k.endswith(".step") else v.to(p.device)
                 for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
        if state:
            optimizer.state[p] = state
    ctl = dict(info["controller"])
    windows = {}
    for name, scal in info["windows"].items():
        dev = controller.layers[name].theta.device if name in controller.layers else None
        w = {f: tensors.get(f"window.{name}.{f}") for f in EvolutionWindow.FIELDS}
        w = {f: v if v is None or dev is None else v.to(dev) for f, v in w.items()}
        w.update(scal)
        windows[name] = w
    ctl["windows"] = windows
    controller.load_state_dict(ctl)
    torch.set_rng_state(tensors["rng.torch"])
    data_rng.set_state(tensors["rng.data"])

