"""One training step of SmolLM2-135M: SEFT against masked-dense and PEFT LoRA, same pruned model.

    python bench/bench_step.py [--sparsity 0.5 0.7] [--reps 5] [--threads 2] [--gradient-checkpointing]
                               [--blocks 4x4 8x8 16x16] [--bf16] [--memory] [--allocator driver]
                               [--out FILE.md]

The default model, magnitude-pruned per row (the step's cost does not depend on which pruning
chose the mask), trained on 4 x 256 tokens of the shipped text with the driver's loss and AdamW:

- seft: the decoder linears as SEFTLinear (sparse kernels), the driver's controller and defaults;
- masked-dense: the same layers and evolution with dense weights x mask and dense gradients;
- lora: the pruned model stored dense, PEFT LoRA on every decoder linear with the rank matching
  SEFT's trainable budget (``seft_ext.lora.lora_rank_for``);
- with ``--bf16``, ``seft bf16``: the same SEFT step with the model in bf16 (``--dtype bf16``);
- with ``--blocks``, ``seft RxC``: SEFT on a model magnitude-pruned in whole R x C blocks to the
  same sparsity (SEFTBlockLinear: BSR kernels, the delta and evolution on whole blocks).

Every method runs with the same allocator settings (``--allocator``): ``driver`` (the default:
what ``seft run`` sets, ``seft_ext._memory``: glibc's mmap threshold fixed, the caching CPU
allocator on); ``cache`` (glibc's malloc as it comes, ``ops.cpu_cache(True)``: a user's own
training loop that follows docs/trainer.md); ``glibc`` (neither: a plain loop). Time: the
three in one process, their steps interleaved, ``--reps`` steps each after a warm-up step;
min / median / max seconds and of the ratios of same-round steps. The controller's evolution
steps are included at their share (update interval 10, window 5: one scan pass and one
decision every 10 steps; --reps 10 covers one interval). Memory (``--memory``): each method
in a process of its own (``--one METHOD``): the RSS once the model is ready to train (loaded,
pruned, converted; the cache emptied), then the peak RSS (VmHWM) over warm-up + 3 steps above
it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


METHODS = ("seft", "masked-dense", "lora")


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def pruned_model(sparsity: float, block=None, loaded=None):
    """(dense model with the pruned positions at 0, its keep masks, training batches); with
    ``block``, whole r x c blocks pruned. ``loaded``: an unpruned model to prune a copy of."""
    from seft_ext.data import load_text, token_windows
    from seft_ext.models import load_model
    from seft_ext.prune_llm import prune_model

    model, tok = load_model("default", torch.float32, progress=False) if loaded is None else loaded
    model = copy.deepcopy(model) if loaded is not None else model
    for p in model.parameters():
        p.requires_grad_(False)
    masks = prune_model(model, "magnitude", sparsity, "row", block=block, progress=False)
    train, _ = load_text("default")
    windows = token_windows(tok, train, 256)
    gen = torch.Generator().manual_seed(0)
    batches = [windows[torch.randint(0, windows.shape[0], (4,), generator=gen)] for _ in range(8)]
    return model, masks, batches


class Runner:
    """One method's model, loss, optimizer and controller; ``step(batch)`` is one training step."""

    def __init__(self, method: str, model, masks: dict, sparsity: float, steps: int, ckpt: bool, block=None):
        from seft_ext import SEFTConfig, SEFTController
        from seft_ext.convert import convert_to_seft
        from seft_ext.loss import CausalLMLoss

        config = SEFTConfig(sparsity=sparsity, block=block)
        self.method, self.ctl = method, None
        if method == "lora":
            from seft_ext.lora import add_lora, lora_rank_for

            self.rank = lora_rank_for(model, config)
            model = add_lora(model, self.rank)
        else:
            convert_to_seft(model, config, masks=masks, dense_compute=method == "masked-dense")
        if ckpt:
            from seft_ext.training import enable_checkpointing

            enable_checkpointing(model)
        self.model = model
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, weight_decay=0.0)
        if method != "lora":
            self.ctl = SEFTController(model, self.opt, config, steps)
        self.net = CausalLMLoss(model)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def step(self, batch) -> float:
        t0 = time.perf_counter()
        loss = self.net(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ctl is not None:
            self.ctl.step()
        return time.perf_counter() - t0


def extra_runners(sparsity: float, base, masks: dict, blocks: list, bf16: bool, reps: int, ckpt: bool) -> dict:
    """``seft bf16``: SEFT with the model in bf16 (the driver's --dtype bf16), the same masks;
    ``seft RxC``: SEFT on a model magnitude-pruned in whole blocks (the same sparsity)."""
    out = {}
    if bf16:
        model = copy.deepcopy(base).to(torch.bfloat16)
        out["seft bf16"] = Runner("seft", model, masks, sparsity, 10 * (reps + 1), ckpt)
    if not blocks:
        return out
    from seft_ext.models import load_model

    loaded = load_model("default", torch.float32, progress=False, need_tokenizer=True)
    for b in blocks:
        block = tuple(int(v) for v in b.split("x"))
        model, masks, _ = pruned_model(sparsity, block, loaded)
        out[f"seft {b}"] = Runner("seft", model, masks, sparsity, 10 * (reps + 1), ckpt, block=block)
    return out


def time_methods(sparsity: float, reps: int, ckpt: bool, blocks: list = (), bf16: bool = False) -> dict:
    base, masks, batches = pruned_model(sparsity)
    runners = {m: Runner(m, copy.deepcopy(base), masks, sparsity, 10 * (reps + 1), ckpt) for m in METHODS}
    runners.update(extra_runners(sparsity, base, masks, blocks, bf16, reps, ckpt))
    del base
    names = list(runners)
    times = {m: [] for m in names}
    for r in range(reps + 1):
        for m in names:  # the same batch for every method in a round
            t = runners[m].step(batches[r % len(batches)])
            if r:  # round 0 is the warm-up
                times[m].append(t)
    return {"times": times, "trainable": {m: runners[m].trainable for m in names},
            "lora_rank": runners["lora"].rank}


def one_method(method: str, sparsity: float, steps: int, ckpt: bool) -> dict:
    """Peak RSS above the ready-to-train model for one method (run in a process of its own)."""
    import gc

    from seft_ext._memory import new_phase

    base, masks, batches = pruned_model(sparsity)
    runner = Runner(method, base, masks, sparsity, 100, ckpt)
    del base, masks
    gc.collect()
    new_phase()  # as the driver does before training
    ready = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for i in range(steps + 1):
        runner.step(batches[i % len(batches)])
    return {"method": method, "ready_mib": ready / 2**20, "peak_mib": status("VmHWM") / 2**20,
            "above_mib": (status("VmHWM") - ready) / 2**20}


def memory(sparsity: float, ckpt: bool, allocator: str) -> dict:
    out = {}
    for m in METHODS:
        cmd = [sys.executable, __file__, "--one", m, "--sparsity", str(sparsity), "--threads",
               str(torch.get_num_threads()), "--allocator", allocator] + (["--gradient-checkpointing"] if ckpt else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[m] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _mmm(xs) -> str:
    return f"{min(xs):.3f} / {statistics.median(xs):.3f} / {max(xs):.3f}"


def _time_table(s: float, r: dict) -> list[str]:
    t = r["times"]
    lines = [f"## {s:.0%} sparsity (LoRA rank {r['lora_rank']}; trainable: "
             + ", ".join(f"{m} {n:,}" for m, n in r["trainable"].items()) + ")", "",
             "| | seconds per step (min / median / max) | seft / this (same-round ratio, min / median / max) |",
             "|---|---|---|"]
    for m in t:
        ratio = [a / b for a, b in zip(t["seft"], t[m])]
        lines.append(f"| {m} | {_mmm(t[m])} | {'-' if m == 'seft' else _mmm(ratio)} |")
    return lines


def report(res: dict, args) -> str:
    lines = ["# Training step: SEFT vs masked-dense vs PEFT LoRA (SmolLM2-135M, 4 x 256 tokens, fp32 unless named)", "",
             f"Command: `python bench/bench_step.py {' '.join(args.argv)}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; gradient checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}; allocator {args.allocator}; "
             f"load average before / after {args.load0} / {tuple(round(x, 2) for x in os.getloadavg())}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    for s, r in res.items():
        lines += _time_table(s, r) if "times" in r else [f"## {s:.0%} sparsity"]
        if "memory" in r:
            mem = r["memory"]
            lines += ["", "| | RSS ready to train MiB | peak RSS MiB | peak above ready MiB | seft / this |",
                      "|---|---|---|---|---|"]
            for m in METHODS:
                lines.append(f"| {m} | {mem[m]['ready_mib']:.0f} | {mem[m]['peak_mib']:.0f} | "
                             f"{mem[m]['above_mib']:.0f} | {mem['seft']['above_mib'] / mem[m]['above_mib']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--blocks", nargs="*", default=[], metavar="RxC",
                    help="also SEFT on models pruned in whole RxC blocks (e.g. 4x4 8x8 16x16), same sparsity")
    ap.add_argument("--bf16", action="store_true", help="also SEFT with the model in bf16 (the driver's --dtype bf16)")
    ap.add_argument("--memory", action="store_true", help="also peak memory, each method in its own process")
    ap.add_argument("--no-time", action="store_true", help="memory only")
    ap.add_argument("--allocator", choices=list(ALLOCATORS), default="driver",
                    help="driver: seft run's settings; cache: ops.cpu_cache(True) only; glibc: neither")
    ap.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    torch.set_num_threads(args.threads)
    with allocator(args.allocator):
        run(args)


ALLOCATORS = {"driver": (True, True), "cache": (False, True), "glibc": (False, False)}


@contextlib.contextmanager
def allocator(name: str):
    """The --allocator settings for the whole process: (glibc's mmap threshold fixed, cache on)."""
    from seft_ext._memory import cpu_cache_on, return_freed_memory

    fixed, cache = ALLOCATORS[name]
    if fixed:
        return_freed_memory()
    with cpu_cache_on() if cache else contextlib.nullcontext():
        yield


def run(args) -> None:
    if args.one:
        print(json.dumps(one_method(args.one, args.sparsity[0], 3, args.gradient_checkpointing)))
        return
    args.load0 = tuple(round(x, 2) for x in os.getloadavg())
    res = {}
    for s in args.sparsity:
        res[s] = time_methods(s, args.reps, args.gradient_checkpointing, args.blocks, args.bf16) \
            if not args.no_time else {}
        if args.memory:
            res[s]["memory"] = memory(s, args.gradient_checkpointing, args.allocator)
    text = report(res, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
