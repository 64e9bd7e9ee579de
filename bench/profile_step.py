"""Where one training step of SmolLM2-135M goes: torch.profiler, grouped by part of the model.

    python bench/profile_step.py [--sparsity 0.5 0.7] [--method seft] [--threads 2] [--dtype fp32]
                                 [--out FILE.md]

The default model (SmolLM2-135M-Instruct), magnitude-pruned per row (the step's cost does not
depend on which pruning chose the mask), converted to SEFTLinear as the driver does, trained
on 4 x 256 tokens of the shipped text with the driver's loss, AdamW and controller. The
controller runs with update_interval 2 and a window of 1 step, so step 2 is an evolution step
(the window's scan in its backward, the drop / grow / adapt decision after the optimizer)
and step 3 a plain one; both are profiled, step 1 is a warm-up.

Time is each profiler event's self CPU time, attributed to the innermost labelled module
whose forward ran it; a backward op goes to the module of the forward op that made its
autograd node (by sequence number). Memory: the bytes autograd saves for backward in the
forward, per part (distinct storages, the model's own parameters and buffers left out),
and the step's peak RSS above the RSS before it (VmHWM, reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = ("decoder linears", "attention (sdpa, rotary, reshapes)", "norms", "MLP activation (silu x up)",
         "residual adds, decoder glue", "embedding", "lm_head", "loss (cross-entropy, chunks)",
         "evolution decision", "optimizer (AdamW)", "other")


def label_of(name: str) -> str | None:
    """The part a module belongs to (by its name in the model), None when it is not labelled itself."""
    last = name.rsplit(".", 1)[-1]
    if last in PROJ:
        return "decoder linears"
    if last == "self_attn":
        return "attention (sdpa, rotary, reshapes)"
    if last.endswith("norm"):
        return "norms"
    if last == "mlp":
        return "MLP activation (silu x up)"
    if last.isdigit() and ".layers." in f".{name}":
        return "residual adds, decoder glue"
    if last == "embed_tokens":
        return "embedding"
    if last == "lm_head":
        return "lm_head"
    return None


class Scopes:
    """record_function ranges around the labelled modules' forwards, and the saved-tensor bytes per part."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.handles = []
        self.saved: dict[str, int] = defaultdict(int)
        self.seen: set[int] = set()
        self.own = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
        for name, mod in model.named_modules():
            lab = label_of(name)
            if lab is not None:
                self.handles.append(mod.register_forward_pre_hook(self._enter(lab)))
                self.handles.append(mod.register_forward_hook(self._exit))

    def _enter(self, lab: str):
        def hook(mod, args):
            rf = torch.autograd.profiler.record_function(f"part::{lab}")
            rf.__enter__()
            self.stack.append((lab, rf))
        return hook

    def _exit(self, mod, args, out):
        _, rf = self.stack.pop()
        rf.__exit__(None, None, None)

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.seen and ptr not in self.own:
            self.seen.add(ptr)
            lab = self.stack[-1][0] if self.stack else "loss (cross-entropy, chunks)"
            self.saved[lab] += t.untyped_storage().nbytes()
        return t

    def remove(self):
        for h in self.handles:
            h.remove()


def _part_of(ev, seq_part: dict) -> str:
    """The part of one profiler event: its innermost part:: range, else the forward op behind its
    backward node, else the optimizer / evolution range around it."""
    e = ev
    while e is not None:
        n = e.name
        if n.startswith("part::"):
            return n[6:]
        if n.startswith("autograd::engine::evaluate_function") and e.sequence_nr in seq_part:
            return seq_part[e.sequence_nr]
        if n.startswith("Optimizer.step"):
            return "optimizer (AdamW)"
        if n == "seft::evolution_decision":
            return "evolution decision"
        e = e.cpu_parent
    return "other"


def forward_parts(events) -> dict:
    """sequence number -> part, for the forward ops (those inside a part:: range)."""
    out = {}
    for ev in events:
        if ev.sequence_nr is None or ev.sequence_nr < 0 or ev.name.startswith("autograd::"):
            continue
        e = ev
        while e is not None and not e.name.startswith("part::"):
            if e.name.startswith("autograd::engine"):
                break
            e = e.cpu_parent
        if e is not None and e.name.startswith("part::"):
            out.setdefault(ev.sequence_nr, e.name[6:])
    return out


def breakdown(prof) -> tuple[dict, dict, float]:
    """(part -> self seconds, op name -> self seconds within our ops / evolution, total seconds)."""
    events = prof.events()
    seq_part = forward_parts(events)
    parts: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    total = 0.0
    for ev in events:
        t = ev.self_cpu_time_total / 1e6
        total += t
        p = _part_of(ev, seq_part)
        parts[p] += t
        if ev.name.startswith("seft::"):
            ops[ev.name] += t
    return dict(parts), dict(ops), total


def _rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return -1


def build(sparsity: float, method: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    from seft_ext import SEFTConfig, SEFTController
    from seft_ext.convert import convert_to_seft
    from seft_ext.data import load_text, token_windows
    from seft_ext.loss import CausalLMLoss
    from seft_ext.models import load_model
    from seft_ext.prune_llm import prune_model

    model, tok = load_model("default", dtype, progress=False)
    masks = prune_model(model, "magnitude", sparsity, "row")
    config = SEFTConfig(sparsity=sparsity, update_interval=2, grow_accumulation=1, seed=seed)
    convert_to_seft(model, config, masks=masks, dense_compute=method == "masked-dense")
    del masks
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    ctl = SEFTController(model, opt, config, 60)
    train, _ = load_text("default")
    windows = token_windows(tok, train, 256)
    gen = torch.Generator().manual_seed(seed)
    batches = [windows[torch.randint(0, windows.shape[0], (4,), generator=gen)] for _ in range(3)]
    return model, CausalLMLoss(model), opt, ctl, batches


def one_step(net, opt, ctl, batch, scopes=None):
    if scopes is None:
        loss = net(batch)
    else:
        with torch.autograd.graph.saved_tensors_hooks(scopes.pack, lambda t: t):
            loss = net(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.autograd.profiler.record_function("seft::evolution_decision"):
        report = ctl.step()
    return loss, report


def profile_sparsity(sparsity: float, method: str, dtype: torch.dtype) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model, net, opt, ctl, batches = build(sparsity, method, dtype)
    model.train()
    one_step(net, opt, ctl, batches[0])  # warm-up (step 1)
    res = {}
    for step, kind in ((2, "evolution step"), (3, "plain step")):
        scopes = Scopes(model)
        rss0 = _status("VmRSS")
        _rss_reset()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=False) as prof:
            _, report = one_step(net, opt, ctl, batches[step - 1], scopes)
        wall = time.perf_counter() - t0
        peak = _status("VmHWM") - rss0
        scopes.remove()
        assert (report is not None) == (step == 2), "the controller's schedule is not the expected one"
        parts, ops, total = breakdown(prof)
        res[kind] = dict(parts=parts, ops=ops, total=total, wall=wall, saved=dict(scopes.saved), peak=peak)
    # an unprofiled plain step for the profiler's overhead
    t0 = time.perf_counter()
    one_step(net, opt, ctl, batches[0])
    res["unprofiled"] = time.perf_counter() - t0
    return res


def report(all_res: dict, args) -> str:
    lines = [f"# One training step of SmolLM2-135M: where it goes ({args.method})", "",
             f"Command: `python bench/profile_step.py --sparsity {' '.join(map(str, args.sparsity))} "
             f"--method {args.method} --threads {args.threads} --dtype {args.dtype}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, 4 x 256 tokens; "
             f"load average before / after: {args.load0} / {tuple(round(x, 2) for x in os.getloadavg())}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             ""]
    for s, res in all_res.items():
        lines += [f"## {s:.0%} sparsity", "",
                  f"Wall time: evolution step {res['evolution step']['wall']:.2f} s, plain step "
                  f"{res['plain step']['wall']:.2f} s (profiled); an unprofiled plain step "
                  f"{res['unprofiled']:.2f} s.", "",
                  "| part | evolution step s | % | plain step s | % | saved for backward MiB |",
                  "|---|---|---|---|---|---|"]
        ev, pl = res["evolution step"], res["plain step"]
        for p in PARTS:
            a, b = ev["parts"].get(p, 0.0), pl["parts"].get(p, 0.0)
            mib = pl["saved"].get(p, 0) / 2**20
            if a or b or mib:
                lines.append(f"| {p} | {a:.3f} | {100 * a / ev['total']:.1f} | {b:.3f} | {100 * b / pl['total']:.1f} "
                             f"| {mib:.0f} |")
        lines.append(f"| **total** | {ev['total']:.3f} | 100 | {pl['total']:.3f} | 100 | "
                     f"{sum(pl['saved'].values()) / 2**20:.0f} |")
        lines += ["", f"Peak RSS above the RSS before the step: evolution step {ev['peak'] / 2**20:.0f} MiB, "
                  f"plain step {pl['peak'] / 2**20:.0f} MiB.", "",
                  "Our ops (self time, s; evolution step / plain step): "
                  + ", ".join(f"`{k}` {ev['ops'].get(k, 0):.3f} / {pl['ops'].get(k, 0):.3f}"
                              for k in sorted(set(ev["ops"]) | set(pl["ops"]))), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--method", choices=("seft", "masked-dense"), default="seft")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32", help="the model's dtype (the driver's --dtype)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.load0 = tuple(round(x, 2) for x in os.getloadavg())
    res = {s: profile_sparsity(s, args.method, DTYPES[args.dtype]) for s in args.sparsity}
    text = report(res, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
