"""SEFTController: window statistics, schedule, drop / grow / adapt, optimizer state remap.

Timeline (t = optimizer steps done, 1-based): an evolution step runs in ``step()`` after
optimizer step t when ``t % update_interval == 0`` and ``t <= evolve_until * total_steps``.
The backward passes of its last ``window = min(grow_accumulation, update_interval)``
optimizer steps gather the statistics: the first one scans the streamed gradient for
candidates (``csr_grow_scan``), the rest add G at them (``csr_sddmm``). The decision
(``csr_drop_grow_adapt_``) is a pure function of (tracked positions, summed G), so that
several processes can all-reduce them first and decide identically.

Optimizer state: ``torch.optim.AdamW`` / ``Adam`` layout (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``). Every per-slot state tensor follows its slot; dropped
slots lose theirs; grown slots start at 0, or with seed_optimizer, with moments whose
bias-corrected values equal the window's mean g and mean g^2:
``exp_avg = mean_g * (1 - beta1^step)``, ``exp_avg_sq = mean_g2 * (1 - beta2^step)``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from . import ops
from .config import SEFTConfig
from .seft_linear import SEFTLinear
from .window import ScanPlan

log = logging.getLogger("seft_ext")

COUNT_NAMES = ("dropped", "grown", "reactivated", "pruned", "undropped")


def _decision_bytes(layer: SEFTLinear) -> int:
    """Bytes of what a decision copies to the host for this layer."""
    w = layer.window
    ts = [getattr(layer, a) for a in SEFTController._ARRAYS] + [w.tracked, w.gsum]
    return sum(x.numel() * x.element_size() for x in ts if x is not None)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """t itself when on the CPU; else an asynchronous copy into pinned host memory (read it only
    after a synchronisation)."""
    return t if t.device.type == "cpu" else t.to("cpu", non_blocking=True)


def _wrap_int64(v: int) -> int:
    """v as a two's-complement int64 (the ops take int64 seeds); unchanged when it fits."""
    return (v + (1 << 63)) % (1 << 64) - (1 << 63)


def _nvtx_range(name: str, on: bool):
    """An NVTX range (seen by nsys) around an evolution step on CUDA; nothing otherwise."""
    return torch.cuda.nvtx.range(name) if on else contextlib.nullcontext()


def _seft_layers_of(model: nn.Module) -> OrderedDict[str, SEFTLinear]:
    """The model's SEFTLinear layers; refuses a model without any, or one sharded by FSDP / DeepSpeed."""
    layers = OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, SEFTLinear))
    if not layers:
        raise ValueError("SEFTController: the model has no SEFTLinear layer; convert it first "
                         "(seft_ext.convert_to_seft)")
    for m in model.modules():
        kind = type(m).__name__
        if kind in ("FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine") or "FSDP" in kind:
            raise NotImplementedError(f"SEFTController: {kind} is not supported yet (only "
                                      "DistributedDataParallel or a single process); the sparse buffers "
                                      "must stay whole on every rank")
    return layers


def _check_optimizer(optimizer, layers: dict) -> None:
    if optimizer is None:
        return
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, m in layers.items() if id(m.delta) not in owned]
    if missing:
        raise ValueError(f"SEFTController: the optimizer does not hold the delta of {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}")


def _check_evolution_kernels(layers: dict) -> None:
    from ._lib import has_kernels, require_library

    require_library()  # a source tree that was never built: say so, not "no kernels"
    for n, m in layers.items():
        if not has_kernels("csr_grow_scan", m.theta.device):
            raise NotImplementedError(
                f"SEFTController: {n} is on {m.theta.device}, and this build of seft_ext has no evolution "
                "kernels for that device (`python -m seft_ext` says what was built); use the CPU, a "
                "CUDA build, or method='fixed'")


class SEFTController:
    """Drives the topology of every :class:`SEFTLinear` in ``model``.

    Call :meth:`step` once after each ``optimizer.step()``. It returns None, or on an
    evolution step a dict ``{layer name: {dropped, grown, reactivated, pruned, undropped}}``
    (``{"skipped": reason}`` for a layer left untouched).
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], config: SEFTConfig,
                 total_steps: int, process_group=None):
        if not isinstance(config, SEFTConfig):
            raise TypeError(f"SEFTController: config must be a SEFTConfig, got {type(config).__name__}")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"SEFTController: total_steps must be a positive int, got {total_steps}")
        self.layers: OrderedDict[str, SEFTLinear] = _seft_layers_of(model)
        _check_optimizer(optimizer, self.layers)
        if config.method != "fixed":
            _check_evolution_kernels(self.layers)
        self.model, self.optimizer, self.config, self.total_steps = model, optimizer, config, total_steps
        from .distributed import resolve_group

        # process_group: None, a group, or "auto" (all ranks when torch.distributed runs): the
        # ranks then share window statistics and check that their topologies stay equal.
        self.group = resolve_group(process_group)
        self.world = 1 if self.group is None else torch.distributed.get_world_size(self.group)
        for layer in self.layers.values():
            layer.window.group = self.group
        self.step_count = 0
        self._warned: set[str] = set()
        self.history: list[tuple[int, dict]] = []
        self._arm()

    # ------------------------------------------------------------------ schedule
    def is_evolution_step(self, t: int) -> bool:
        c = self.config
        return (c.method != "fixed" and t % c.update_interval == 0 and t <= c.evolve_until * self.total_steps
                and c.drop_fraction_at(t, self.total_steps) > 0)

    def num_drop(self, layer: SEFTLinear, t: int) -> int:
        return round(self.config.drop_fraction_at(t, self.total_steps) * layer.k)

    def _next_evolution(self, t: int) -> Optional[int]:
        e = math.ceil(t / self.config.update_interval) * self.config.update_interval
        return e if self.is_evolution_step(e) else None

    def _arm(self) -> None:
        """Open or close each layer's window for the next optimizer step's backward passes."""
        t = self.step_count + 1
        e = self._next_evolution(t)
        collect = e is not None and e - t < self.config.window_steps
        for layer in self.layers.values():
            n = self.num_drop(layer, e) if collect else 0
            if n == 0:
                layer.window.close()
                continue
            num_grow = math.ceil(self.config.candidate_factor * n)
            layer.window.open(ScanPlan(num_grow, num_grow if layer.grow_inactive else 0, self.config.scan_sketch,
                                       _wrap_int64(self.config.seed * 1_000_003 + e)))

    # ------------------------------------------------------------------ the step
    def step(self) -> Optional[dict]:
        """Call after each optimizer step."""
        self.step_count += 1
        t = self.step_count
        for layer in self.layers.values():
            layer.window.count_step()
        report = None
        if self.is_evolution_step(t):
            if self.group is not None:
                self._reduce_windows()
            on_cuda = any(m.theta.is_cuda for m in self.layers.values())
            with _nvtx_range(f"seft::evolution_step {t}", on_cuda), torch.no_grad():
                report = self._evolve_all(t)
            if self.group is not None:
                from .distributed import check_same_topology

                check_same_topology(list(self.layers.values()), self.group, t)
            self.history.append((t, report))
            self._log(t, report)
        self._arm()
        return report

    def _reduce_windows(self) -> None:
        """Sum every layer's window over ranks, in layer order (the same on every rank). The
        sums are then divided by the world size: the means the ranks' DDP-averaged optimizer
        sees."""
        from .distributed import sum_over_ranks

        for layer in self.layers.values():
            w = layer.window
            if w.tracked is None or not w.finite:
                continue
            w.gsum = sum_over_ranks(w.gsum, self.group) / self.world
            w.g2sum = sum_over_ranks(w.g2sum, self.group) / self.world

    def _warn_once(self, name: str, msg: str, stacklevel: int = 3) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"SEFT: {name}: {msg} (warned once per layer)", RuntimeWarning, stacklevel=stacklevel)

    # The arrays a decision reads and rewrites, in the order of csr_drop_grow_adapt_'s arguments.
    _ARRAYS = ("crow", "col", "theta", "delta_slots", "delta")
    # Bytes of layer arrays one batch of decisions holds in pinned host memory (CUDA layers):
    # one synchronisation per batch (per device), so one per step up to this size.
    HOST_BATCH_BYTES = int(os.environ.get("SEFT_EVOLVE_HOST_BYTES", str(2 << 30)))

    def _evolve_all(self, t: int) -> OrderedDict[str, dict]:
        """Every layer's drop / grow / adapt, decided on the host by the CPU kernel, in batches
        of layers of at most HOST_BATCH_BYTES (see _decide)."""
        report: OrderedDict[str, dict] = OrderedDict()
        batch, nbytes = [], 0
        for name, layer in self.layers.items():
            n = self.num_drop(layer, t)
            if n == 0:
                report[name] = {"skipped": "nothing to drop"}
                continue
            if not layer.window.finite:
                report[name] = self._skip(name, t, "non-finite statistics")
                continue
            if layer.block is not None:  # block layers: decided one by one on the (small) block grid
                report[name] = self._decide_block(name, layer, n, t)
                continue
            report[name] = {}  # decided in _decide
            b = _decision_bytes(layer)
            if batch and nbytes + b > self.HOST_BATCH_BYTES:
                self._decide(batch, t, report)
                batch, nbytes = [], 0
            batch.append((name, layer, n))
            nbytes += b
        if batch:
            self._decide(batch, t, report)
        for layer in self.layers.values():
            layer.window.reset()
        return report

    def _decide(self, batch: list, t: int, report: dict) -> None:
        """For CUDA layers, all that the batch's decisions read (arrays, window statistics,
        finiteness flags) is copied to pinned host memory asynchronously and waited for once per
        device; the CPU kernel decides; the results go back asynchronously and the new patterns,
        checked here, are adopted (no device check at the next step)."""
        staged, devices = [], set()
        for name, layer, n in batch:
            w = layer.window
            ok = [torch.isfinite(layer.delta).all()]
            host = None
            if w.tracked is not None:
                ok.append(torch.isfinite(w.gsum).all() & torch.isfinite(w.g2sum).all())
                host = ([_to_host(getattr(layer, a).detach()) for a in self._ARRAYS], _to_host(w.tracked),
                        _to_host(w.gsum))
            staged.append((name, layer, n, _to_host(torch.stack(ok)), host))
            if layer.theta.is_cuda:
                devices.add(layer.theta.device)
        for d in sorted(devices, key=str):
            torch.cuda.current_stream(d).synchronize()  # the copies above are done
        for name, layer, n, ok, host in staged:
            if host is not None and not bool(ok[1]):
                report[name] = self._skip(name, t, "non-finite statistics", depth=1)
            elif not bool(ok[0]):
                report[name] = self._skip(name, t, "non-finite delta", depth=1)
            elif host is None:
                report[name] = self._skip(name, t, "no statistics", depth=1)
            else:
                arrays, tracked, gsum = host
                remap, counts = ops.csr_drop_grow_adapt_(*arrays, tracked, gsum, n, layer.in_features,
                                                        layer.budget, layer.nm_n, layer.nm_m, layer.grow_inactive)
                if layer.crow.device.type != "cpu":  # on the CPU the op rewrote the layer's own arrays
                    for a, h in zip(self._ARRAYS, arrays):
                        getattr(layer, a).detach().copy_(h, non_blocking=True)  # h is pinned: asynchronous
                    # the new pattern, checked here on the host: the next step needs no device check
                    ops.adopt_pattern(layer.crow, layer.col, layer.in_features, arrays[0], arrays[1],
                                      layer.delta_slots, arrays[3])
                self._remap_optimizer(layer, remap, layer.window)
                report[name] = dict(zip(COUNT_NAMES, counts.tolist()))

    def _decide_block(self, name: str, layer, n: int, t: int) -> dict:
        """A block layer's decision (``SEFTBlockLinear.evolve_``), with _decide's checks."""
        w = layer.window
        if w.tracked is not None and not bool(torch.isfinite(w.gsum).all() & torch.isfinite(w.g2sum).all()):
            return self._skip(name, t, "non-finite statistics", depth=1)
        if not bool(torch.isfinite(layer.delta).all()):
            return self._skip(name, t, "non-finite delta", depth=1)
        if w.tracked is None:
            return self._skip(name, t, "no statistics", depth=1)
        remap, counts = layer.evolve_(n, w.tracked, w.gsum)
        self._remap_optimizer(layer, remap, w)
        return dict(zip(COUNT_NAMES, counts.tolist()))

    def _skip(self, name: str, t: int, why: str, depth: int = 0) -> dict:
        msgs = {"non-finite statistics": f"NaN or Inf in the window statistics at step {t}; evolution skipped, "
                                         "topology and values untouched",
                "non-finite delta": f"NaN or Inf in the delta at step {t}; evolution skipped",
                "no statistics": f"no backward pass reached this layer in the window before step {t}; "
                                 "evolution skipped"}
        # stacklevel: _warn_once, _skip, [_decide,] _evolve_all, step, the caller of step
        self._warn_once(name, msgs[why], stacklevel=5 + depth)
        return {"skipped": why}

    @torch.no_grad()
    def _remap_optimizer(self, layer: SEFTLinear, remap: torch.Tensor, w) -> None:
        """Moves the delta's optimizer state with its slots (remap: old slot or -1 per new slot,
        on any device). Index lists are made on the host: no device -> host read."""
        p = layer.delta
        p.grad = None  # computed for the old topology
        state = self.optimizer.state.get(p) if self.optimizer is not None else None
        if not state:
            return
        remap = remap.cpu()
        grown_h = torch.nonzero(remap < 0).flatten()
        src = remap.clamp(min=0).to(p.device, non_blocking=True)
        grown = grown_h.to(p.device, non_blocking=True)
        for key, val in state.items():
            if torch.is_tensor(val) and val.shape == p.shape:
                val.copy_(val[src].index_fill_(0, grown, 0))
        if not (self.config.seed_optimizer and grown_h.numel() > 0 and "exp_avg" in state):
            return
        pos = layer.slot_positions()[grown]
        idx = torch.searchsorted(w.tracked, pos)
        steps = max(w.steps, 1)
        mean_g = w.gsum[idx] / steps
        mean_g2 = w.g2sum[idx] / w.count * (w.count / steps) ** 2  # per optimizer step
        step = float(state["step"]) if "step" in state else 0.0
        if step <= 0:
            return
        beta1, beta2 = next(g["betas"] for g in self.optimizer.param_groups if any(q is p for q in g["params"]))
        state["exp_avg"][grown] = (mean_g * (1 - beta1 ** step)).to(p.dtype)
        if "exp_avg_sq" in state:
            state["exp_avg_sq"][grown] = (mean_g2 * (1 - beta2 ** step)).to(p.dtype)
        if "max_exp_avg_sq" in state:
            state["max_exp_avg_sq"][grown] = state["exp_avg_sq"][grown]

    def _log(self, t: int, report: dict) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        tot = {k: sum(r.get(k, 0) for r in report.values()) for k in COUNT_NAMES}
        skipped = sum("skipped" in r for r in report.values())
        log.info("SEFT step %d: %s over %d layers (%d skipped)", t,
                 ", ".join(f"{k} {v}" for k, v in tot.items()), len(report), skipped)

    # ------------------------------------------------------------------ reporting / state
    def window_bytes(self) -> dict:
        """Per layer: bytes the window statistics hold now, and the scan's peak workspace."""
        return {n: {"held": m.window.nbytes(), "scan_peak": m.window.scan_bytes} for n, m in self.layers.items()}

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "config": self.config.to_dict(),
                "windows": {n: m.window.state_dict() for n, m in self.layers.items()},
                "warned": sorted(self._warned)}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.to_dict():
            raise ValueError("SEFTController.load_state_dict: the saved config differs from this controller's")
        if set(state["windows"]) != set(self.layers):
            raise ValueError("SEFTController.load_state_dict: the saved layers differ from this model's")
        self.step_count, self.total_steps = int(state["step_count"]), int(state["total_steps"])
        self._warned = set(state["warned"])
        for n, m in self.layers.items():
            m.window.load_state_dict(state["windows"][n])
        self._arm()
