"""Training checkpoints in safetensors (no pickle), written so that a kill never leaves
the newest complete checkpoint unreadable, and checked so that resume trusts nothing unchecked.

A checkpoint at step s is two files in DIR/checkpoints/: ``step-{s}.safetensors`` (every
SEFT layer's topology, base values and delta; the optimizer's per-parameter state; the
controller's in-flight window; the RNG states; and in its metadata the checkpoint's JSON)
and ``step-{s}.json`` (the same JSON: step, the run's identity, options and results so far,
the optimizer's hyper-parameters, the controller's scalars; plus the sha256 of the tensor
file). Each is written to a temporary name and renamed; the JSON goes last, so a checkpoint
exists only once both are complete. Loading picks the newest step whose tensor file matches
its recorded sha256 and whose two copies of the JSON agree (saying why it skipped any other),
then range-checks the JSON and every tensor before anything is changed; errors name the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
import torch
from torch import nn

from .config import BUDGETS, METHODS
from .convert import seft_layers
from .ops import acc_dtype
from .modules import freeze_all_but_deltas, replace_module
from .bsr import BSRWeight
from .seft_block import SEFTBlockLinear
from .seft_linear import SEFTLinear
from .window import EvolutionWindow
from .sparse import CSRWeight

LAYER_FIELDS = ("crow", "col", "theta", "delta_slots", "delta", "bias")
FORMAT = "seft-checkpoint-2"
META_KEY = "seft_checkpoint"  # the JSON's copy inside the tensor file's (hashed) metadata
OPTIM_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names its file."""


def sha256_file(path: Path) -> str:
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


def write_atomic(path: Path, write) -> None:
    """Write through a temporary name and a rename; a failed write leaves no temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, controller,
         data_rng: torch.Generator, meta: dict, keep: int = 2) -> Path:
    """Write the checkpoint of `step` (``meta``: "run_id", "args", "summary"); keep the newest
    `keep` checkpoints of the same run (others are never deleted)."""
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
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    info = {"format": FORMAT, "step": step, "meta": meta, "optimizer_groups": groups, "controller": ctl,
            "windows": win_scalars,
            "layers": {n: {"shape": [m.out_features, m.in_features], "k": m.k, "budget": m.budget,
                           "nm": [m.nm_n, m.nm_m], "method": m.method, "dense_compute": m.dense_compute,
                           "bias": m.bias is not None, "dtype": str(m.theta.dtype).replace("torch.", ""),
                           "block": None if m.block is None else list(m.block)}
                       for n, m in layers.items()}}
    info = json.loads(json.dumps(info, default=str))  # the form it is read back in
    st = folder / f"step-{step}.safetensors"
    write_atomic(st, lambda p: (save_file(tensors, str(p), metadata={META_KEY: json.dumps(info, sort_keys=True)}),
                                 _debug_kill(step)))
    write_atomic(folder / f"step-{step}.json",
                  lambda p: p.write_text(json.dumps({"sha256": sha256_file(st), **info}, indent=1)))
    _rotate(folder, meta.get("run_id"), keep)
    return st


def _rotate(folder: Path, run_id, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of run ``run_id``."""
    ours = [s for s in _steps(folder) if checkpoint_run_id(folder / f"step-{s}.json") == run_id]
    for old in sorted(ours)[:-keep]:
        for suffix in (".json", ".safetensors"):
            (folder / f"step-{old}{suffix}").unlink(missing_ok=True)


def checkpoint_run_id(json_file: Path):
    """The run id recorded in a checkpoint's JSON, or None."""
    try:
        return json.loads(Path(json_file).read_text())["meta"]["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _steps(folder: Path) -> list[int]:
    out = []
    for p in folder.glob("step-*.json"):
        try:
            out.append(int(p.stem.split("-", 1)[1]))
        except ValueError:
            pass
    return out


def newest_step(folder: Path):
    """The step of the newest checkpoint in DIR/checkpoints (unchecked), or None."""
    steps = _steps(Path(folder) / "checkpoints")
    return max(steps) if steps else None


def _embedded_info(st: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(st), framework="pt") as f:
        return json.loads((f.metadata() or {})[META_KEY])


def latest(folder: Path, option: str = "--resume") -> tuple[dict, Path]:
    """(info, tensor file) of the newest complete and intact checkpoint in DIR/checkpoints,
    its JSON checked (``check_info``); ``option`` names DIR in the errors."""
    folder = Path(folder) / "checkpoints"
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {folder.parent}: no checkpoints folder there (a run writes checkpoints "
                                "with --checkpoint-every N)")
    problems = []
    for step in sorted(_steps(folder), reverse=True):
        js, st = folder / f"step-{step}.json", folder / f"step-{step}.safetensors"
        try:
            info = json.loads(js.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"step {step}: unreadable JSON ({e})")
            continue
        if not isinstance(info, dict):
            problems.append(f"step {step}: {js.name} is not a JSON object")
            continue
        if not st.is_file():
            problems.append(f"step {step}: tensor file missing")
            continue
        if sha256_file(st) != info.pop("sha256", None):
            problems.append(f"step {step}: tensor file truncated or modified (sha256 differs)")
            continue
        try:
            embedded = _embedded_info(st)
        except Exception as e:  # noqa: BLE001 - any unreadable header is a damaged checkpoint
            problems.append(f"step {step}: no checkpoint JSON inside {st.name} ({type(e).__name__}: {e}); "
                            "written by an older seft_ext?")
            continue
        if embedded != info:
            problems.append(f"step {step}: {js.name} differs from the copy inside {st.name} (edited?)")
            continue
        if problems:
            import warnings
            warnings.warn("seft: skipped damaged checkpoints: " + "; ".join(problems), RuntimeWarning)
        check_info(info, st)
        if info["step"] != step:
            raise CheckpointError(f"checkpoint {st}: its JSON says step {info['step']}")
        return info, st
    raise FileNotFoundError(f"{option} {folder.parent}: no intact checkpoint"
                            + (f" ({'; '.join(problems)})" if problems else ""))


# ---------------------------------------------------------------------- checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _checker(path: Path):
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise CheckpointError(f"checkpoint {path}: {msg}")
    return need


def check_info(info: dict, path: Path) -> None:
    """Types and ranges of everything in a checkpoint's JSON."""
    need = _checker(path)
    need(info.get("format") == FORMAT, f"format {info.get('format')!r}, not {FORMAT!r} (another seft_ext version)")
    step = info.get("step")
    need(_is_int(step) and step >= 1, f"step {step!r} is not a positive int")
    meta = info.get("meta")
    need(isinstance(meta, dict) and isinstance(meta.get("run_id"), str) and isinstance(meta.get("args"), dict)
         and isinstance(meta.get("summary"), dict), "meta lacks run_id, args or summary")
    groups = info.get("optimizer_groups")
    need(isinstance(groups, list) and len(groups) > 0 and all(isinstance(g, dict) for g in groups),
         "optimizer_groups is not a list of objects")
    for i, g in enumerate(groups):
        _check_group(g, f"optimizer group {i}", need)
    ctl = info.get("controller")
    need(isinstance(ctl, dict), "no controller state")
    need(ctl.get("step_count") == step, f"controller step_count {ctl.get('step_count')!r} differs from step {step}")
    need(_is_int(ctl.get("total_steps")) and ctl["total_steps"] >= step,
         f"controller total_steps {ctl.get('total_steps')!r} is not an int >= step {step}")
    need(isinstance(ctl.get("config"), dict), "controller config missing")
    need(isinstance(ctl.get("warned"), list) and all(isinstance(w, str) for w in ctl["warned"]),
         "controller warned is not a list of names")
    layers = info.get("layers")
    need(isinstance(layers, dict) and len(layers) > 0, "no layers")
    for name, spec in layers.items():
        _check_layer_spec(name, spec, need)
    windows = info.get("windows")
    need(isinstance(windows, dict) and set(windows) == set(layers), "windows do not match the layers")
    for name, w in windows.items():
        need(isinstance(w, dict) and all(_is_int(w.get(k)) and w[k] >= 0 for k in ("count", "steps", "scan_bytes"))
             and isinstance(w.get("finite"), bool), f"window of {name!r}: bad count / steps / finite / scan_bytes")


def _check_group(g: dict, what: str, need) -> None:
    need(_is_real(g.get("lr")) and g["lr"] > 0, f"{what}: lr {g.get('lr')!r} is not a finite number > 0")
    betas = g.get("betas", [0.0, 0.0])
    need(isinstance(betas, list) and len(betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in betas),
         f"{what}: betas {betas!r} not in [0, 1)")
    need(_is_real(g.get("eps", 1.0)) and g.get("eps", 1.0) > 0, f"{what}: eps {g.get('eps')!r} is not > 0")
    need(_is_real(g.get("weight_decay", 0.0)) and g.get("weight_decay", 0.0) >= 0,
         f"{what}: weight_decay {g.get('weight_decay')!r} is not >= 0")


def _check_layer_spec(name: str, spec, need) -> None:
    need(isinstance(spec, dict), f"layer {name!r}: not an object")
    shape, k = spec.get("shape"), spec.get("k")
    need(isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v >= 1 for v in shape),
         f"layer {name!r}: bad shape {shape!r}")
    need(_is_int(k) and 1 <= k <= shape[0] * shape[1], f"layer {name!r}: k {k!r} out of range")
    need(spec.get("budget") in BUDGETS and spec.get("method") in METHODS, f"layer {name!r}: bad budget or method")
    nm = spec.get("nm")
    need(isinstance(nm, list) and len(nm) == 2 and all(_is_int(v) and v >= 1 for v in nm), f"layer {name!r}: bad nm")
    need(isinstance(spec.get("dense_compute"), bool) and isinstance(spec.get("bias"), bool),
         f"layer {name!r}: dense_compute / bias not booleans")
    need(spec.get("dtype") in DTYPES, f"layer {name!r}: dtype {spec.get('dtype')!r} not one of {sorted(DTYPES)}")
    block = spec.get("block")
    need(block is None or (isinstance(block, list) and len(block) == 2 and all(_is_int(v) and v >= 1 for v in block)
                           and spec["budget"] != "nm"), f"layer {name!r}: bad block {block!r}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _check_known_keys(info: dict, tensors: dict, need) -> None:
    """Every tensor in the file is one that a checkpoint holds."""
    layers = info["layers"]
    for key in tensors:
        kind, _, rest = key.partition(".")
        if kind in ("model", "window"):
            name, _, f = rest.rpartition(".")
            ok = name in layers and f in (LAYER_FIELDS if kind == "model" else EvolutionWindow.FIELDS)
        elif kind == "optim":
            i, _, f = rest.partition(".")
            ok = i.isdigit() and f in OPTIM_KEYS
        else:
            ok = key in ("rng.torch", "rng.data")
        need(ok, f"unexpected tensor {key!r}")


def _checked_layer(name: str, spec: dict, tensors: dict, target, need) -> SEFTLinear:
    """The SEFTLinear a checkpoint holds for ``name``, every tensor checked."""
    get = lambda f: tensors.get(f"model.{name}.{f}")  # noqa: E731
    out, inn = spec["shape"]
    dtype, k = DTYPES[spec["dtype"]], spec["k"]
    for f in ("crow", "col", "theta", "delta_slots", "delta"):
        need(get(f) is not None, f"layer {name!r}: tensor {f} missing")
    need((get("bias") is not None) == spec["bias"], f"layer {name!r}: bias tensor does not match the layer spec")
    need(isinstance(target, nn.Linear) and (target.out_features, target.in_features) == (out, inn)
         and (target.bias is not None) == spec["bias"],
         f"layer {name!r}: the model has no nn.Linear ({out}, {inn}){' with' if spec['bias'] else ' without'} bias "
         f"there (found {type(target).__name__})")
    need(get("theta").dtype == dtype, f"layer {name!r}: theta is {get('theta').dtype}, the spec says {dtype}")
    block = spec.get("block")
    need(block is None or (get("theta").dim() == 3 and list(get("theta").shape[1:]) == block),
         f"layer {name!r}: theta must be [blocks, {block}] for its block")
    try:
        base = CSRWeight(get("crow"), get("col"), get("theta"), (out, inn)) if block is None else \
            BSRWeight(get("crow"), get("col"), get("theta"), (out, inn))
    except ValueError as e:
        need(False, f"layer {name!r}: {e}")
    slots, delta, bias = get("delta_slots"), get("delta"), get("bias")
    units = base.col.numel()  # non-zeros, or blocks
    need(slots.dtype == torch.int64 and slots.shape == (k,), f"layer {name!r}: delta_slots must be int64 [{k}]")
    need(bool((slots[1:] > slots[:-1]).all()) and int(slots[0]) >= 0 and int(slots[-1]) < units,
         f"layer {name!r}: delta_slots not strictly increasing within [0, {units})")
    dshape = (k,) if block is None else (k, *block)
    need(delta.dtype == acc_dtype(dtype) and delta.shape == dshape and bool(torch.isfinite(delta).all()),
         f"layer {name!r}: delta must be finite {acc_dtype(dtype)} {list(dshape)}")
    need(bias is None or (bias.dtype == dtype and bias.shape == (out,)),
         f"layer {name!r}: bias must be {dtype} [{out}]")
    try:
        layer = SEFTLinear(base, k, bias, spec["budget"], tuple(spec["nm"]), spec["method"]) if block is None else \
            SEFTBlockLinear(base, k, bias, spec["budget"], spec["method"])
    except ValueError as e:
        need(False, f"layer {name!r}: {e}")
    layer.dense_compute = spec["dense_compute"]
    with torch.no_grad():
        layer.delta_slots.copy_(slots)
        layer.delta.copy_(delta)
    return layer


def restore(info: dict, tensor_file: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Put the checkpoint's SEFT layers into `model` (which holds the dense modules at those
    names) and return the remaining tensors (optimizer, window, RNG) for the caller. Every
    layer is checked before the first is replaced."""
    from safetensors.torch import load_file

    need = _checker(tensor_file)
    tensors = load_file(str(tensor_file))
    _check_known_keys(info, tensors, need)
    layers = {}
    for name, spec in info["layers"].items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = None
        layers[name] = _checked_layer(name, spec, tensors, target, need)
    for name, layer in layers.items():
        replace_module(model, name, layer)
    freeze_all_but_deltas(model)
    return tensors


def restore_training(info: dict, tensors: dict, optimizer, controller, data_rng: torch.Generator,
                     tensor_file: Path = Path("checkpoint")) -> None:
    """The optimizer's state, the controller's windows and scalars and the RNG states, all
    checked before any is set; the optimizer's hyper-parameters must equal the live ones."""
    need = _checker(tensor_file)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    _check_groups_match(info["optimizer_groups"], optimizer, need)
    states = _checked_optimizer_state(tensors, params, info["step"], need)
    windows = {name: _checked_window(name, scal, tensors, controller.layers.get(name), need)
               for name, scal in info["windows"].items()}
    need(set(windows) == set(controller.layers), "its layers differ from the model's SEFT layers")
    rng = {k: tensors.get(f"rng.{k}") for k in ("torch", "data")}
    for k, live in (("torch", torch.get_rng_state()), ("data", data_rng.get_state())):
        need(rng[k] is not None and rng[k].dtype == torch.uint8 and rng[k].shape == live.shape,
             f"RNG state rng.{k} missing or malformed")
    ctl = dict(info["controller"])
    ctl["windows"] = windows
    try:
        controller.load_state_dict(ctl)
    except (ValueError, KeyError, TypeError) as e:
        need(False, f"controller state: {e}")
    for i, state in states.items():
        optimizer.state[params[i]] = state
    torch.set_rng_state(rng["torch"])
    data_rng.set_state(rng["data"])


def _check_groups_match(saved: list, optimizer, need) -> None:
    need(len(saved) == len(optimizer.param_groups), "its optimizer has a different number of parameter groups")
    for i, (s, g) in enumerate(zip(saved, optimizer.param_groups)):
        live = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        for key in sorted(set(s) | set(live)):
            need(s.get(key) == live.get(key), f"optimizer group {i}: {key} is {s.get(key)!r} in the checkpoint, "
                                              f"{live.get(key)!r} in this run")


def _checked_optimizer_state(tensors: dict, params: list, max_step: int, need) -> dict:
    """{parameter index: state} from the optim.* tensors, shapes, dtypes and values checked."""
    states: dict = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        i, f = key.split(".", 2)[1:]
        need(int(i) < len(params), f"{key}: no such optimizer parameter")
        p = params[int(i)]
        if f == "step":
            need(v.dim() == 0 and v.is_floating_point() and bool(torch.isfinite(v)) and 0 <= float(v) <= max_step,
                 f"{key}: not a scalar in [0, {max_step}]")
        else:
            need(v.shape == p.shape and v.dtype == p.dtype and bool(torch.isfinite(v).all()),
                 f"{key}: must be finite {p.dtype} {tuple(p.shape)}")
            need(f == "exp_avg" or bool((v >= 0).all()), f"{key}: negative second moments")
            v = v.to(p.device)  # AdamW keeps "step" on the CPU
        states.setdefault(int(i), {})[f] = v
    for i, st in states.items():
        need({"step", "exp_avg", "exp_avg_sq"} <= set(st), f"optimizer state of parameter {i} incomplete")
    return states


def _checked_window(name: str, scal: dict, tensors: dict, layer, need) -> dict:
    """A layer's window state (scalars from the JSON, tensors from the file), checked."""
    need(layer is not None, f"window of {name!r}: no such SEFT layer in the model")
    w = {f: tensors.get(f"window.{name}.{f}") for f in EvolutionWindow.FIELDS}
    present = [f for f, v in w.items() if v is not None]
    need(len(present) in (0, len(w)), f"window of {name!r}: only {present} present")
    if present:
        t, k = w["tracked"], layer.k
        rows, width = (layer.out_features, layer.in_features) if layer.block is None else layer.grid_shape
        cols = rows * width
        n = t.numel()
        need(t.dtype == torch.int64 and t.dim() == 1 and (n == 0 or (bool((t[1:] > t[:-1]).all())
                                                                      and int(t[0]) >= 0 and int(t[-1]) < cols)),
             f"window of {name!r}: tracked positions not sorted and unique within [0, {cols})")
        for f in ("gsum", "g2sum"):
            need(w[f].shape == (n, *layer.delta.shape[1:]) and w[f].dtype == layer.delta.dtype,
                 f"window of {name!r}: bad {f}")
        need(w["crow"].dtype == torch.int32 and w["crow"].shape == (rows + 1,)
             and w["col"].shape == (k + n,) and int(w["crow"][-1]) == k + n, f"window of {name!r}: bad union pattern")
        for f, size in (("at_delta", k), ("at_tracked", n)):
            need(w[f].dtype == torch.int64 and w[f].shape == (size,) and (size == 0 or (int(w[f].min()) >= 0
                                                                                       and int(w[f].max()) < k + n)),
                 f"window of {name!r}: bad {f}")
        dev = layer.theta.device
        w = {f: v.to(dev) for f, v in w.items()}
    w.update(scal)
    return w
