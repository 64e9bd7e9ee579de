"""CPU benchmark of the SEFT evolution engine against the training step it rides on.

Per SmolLM2-135M layer shape (out x in) and sparsity, one SEFTLinear with the default
LoRA-rank-8 budget k = 8 (in + out), fp32, `--tokens` tokens per step:
  train   one training step of the layer: forward, backward (dX and d delta), AdamW step
  first   the window's first pass extra: csr_grow_scan (streamed, sketched dY^T X ->
          candidates) and one csr_sddmm over delta + tracked positions instead of the
          delta-only one
  track   each further window pass extra: the union csr_sddmm instead of the delta-only one
  decide  drop / grow / adapt (csr_drop_grow_adapt_) + optimizer state remap
  overhead = (first + (window - 1) * track + decide) / (update_interval * train)
Also an end-to-end check: `update_interval` steps through SEFTController against the same
steps with evolution off, interleaved, and the bytes the window statistics hold (between
steps, and the scan's engine-reported peak) against the layer's non-zero bytes.
Last, the scan alone on a 4096 x 11008 layer: its engine-reported peak bytes against the
dense fp32 gradient it never allocates.

    python bench/bench_evolution.py            # ~3 min on 2 idle cores
    python bench/bench_evolution.py --quick    # 2 shapes, 70% only
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import machine_header  # noqa: E402

from seft_ext import CSRWeight, SEFTConfig, SEFTController, SEFTLinear, ops  # noqa: E402
from seft_ext.prune import magnitude_mask  # noqa: E402
from seft_ext.window import ScanPlan  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576)]
SPARSITIES = [0.5, 0.7]
LIMIT = 0.10
SEED = 0


def median_ms(fn, reps: int, setup=None) -> float:
    times = []
    for i in range(reps + 2):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def make_layer(out, inn, sparsity):
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(out, inn, generator=g) / math.sqrt(inn)
    layer = SEFTLinear(CSRWeight.from_dense(w, magnitude_mask(w, sparsity)), 8 * (inn + out), seed=SEED)
    with torch.no_grad():
        layer.delta.normal_(0, 1e-3, generator=g)
    return layer


def bench_case(out, inn, sparsity, args):
    cfg = SEFTConfig(update_interval=args.interval, grow_accumulation=args.window, scan_sketch=args.sketch)
    layer = make_layer(out, inn, sparsity)
    model = nn.Sequential(layer)
    opt = torch.optim.AdamW([layer.delta], lr=1e-4)
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(args.tokens, inn, generator=g).requires_grad_(True)  # a layer inside a network: dX too
    dy = torch.randn(args.tokens, out, generator=g)

    def train_step():
        layer(x).backward(dy)
        x.grad = None
        opt.step()
        opt.zero_grad()

    layer.window.close()
    t_train = median_ms(train_step, args.reps)

    n = round(cfg.drop_fraction * layer.k)  # the largest drop count, at the first evolution
    num_grow = math.ceil(cfg.candidate_factor * n)
    plan = ScanPlan(num_grow, num_grow, cfg.scan_sketch, 0)
    xd = x.detach()

    def first_window_pass():  # the scan, the union pattern and its SDDMM
        layer.window.reset()
        layer.window.accumulate(layer, xd, dy)

    layer.window.open(plan)
    t_first = median_ms(first_window_pass, args.reps)
    w = layer.window
    t_track = median_ms(lambda: layer.window.accumulate(layer, xd, dy), args.reps)
    t_delta_sddmm = median_ms(lambda: ops.csr_sddmm(dy, xd, layer.crow, layer.col, layer.delta_slots), args.reps)
    held, scan_peak = w.nbytes(), w.scan_bytes
    tracked, gsum = w.tracked.clone(), w.gsum.clone()

    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    ostate = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[layer.delta].items()}
    ctl = SEFTController(model, opt, cfg, total_steps=10 ** 6)

    def restore():
        with torch.no_grad():
            for k, v in layer.state_dict().items():
                v.copy_(saved[k])
            for k, v in ostate.items():
                if torch.is_tensor(v):
                    opt.state[layer.delta][k].copy_(v)

    def decide():
        remap, _ = layer.evolve_(n, tracked, gsum)
        ctl._remap_optimizer(layer, remap, w)

    t_decide = median_ms(decide, args.reps, setup=restore)
    restore()
    layer.window.close()
    layer.window.reset()
    # per interval: the first window pass and (window - 1) tracking passes replace the plain
    # delta SDDMM of their steps; then one decision
    extra = (t_first - t_delta_sddmm) + (cfg.window_steps - 1) * (t_track - t_delta_sddmm) + t_decide
    overhead = extra / (cfg.update_interval * t_train)

    # End to end: update_interval steps with the controller (one evolution) vs evolution off.
    def interval(evolve: bool):
        c = SEFTController(model, opt, cfg if evolve else SEFTConfig(method="fixed"), total_steps=10 ** 6)
        for _ in range(cfg.update_interval):
            train_step()
            c.step()

    e2e = []
    for _ in range(args.e2e_reps):
        restore()
        t0 = time.perf_counter()
        interval(False)
        t_off = time.perf_counter() - t0
        restore()
        t0 = time.perf_counter()
        interval(True)
        e2e.append((time.perf_counter() - t0) / t_off - 1.0)
    restore()
    nnz_bytes = layer.theta.nbytes + layer.col.nbytes + layer.crow.nbytes
    return dict(shape=f"{out}x{inn}", sparsity=sparsity, k=layer.k, n=n, train=t_train,
                first=t_first - t_delta_sddmm, track=t_track - t_delta_sddmm, decide=t_decide, overhead=overhead,
                e2e=statistics.median(e2e), held=held / nnz_bytes, peak=scan_peak / nnz_bytes,
                tracked=tracked.numel())


def big_scan(args):
    out, inn, s = 4096, 11008, 0.7
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(out, inn, generator=g)
    base = CSRWeight.from_dense(w, magnitude_mask(w, s))
    del w
    k = 8 * (inn + out)
    slots = torch.randperm(base.nnz, generator=g)[:k].sort().values
    x = torch.randn(args.tokens, inn, generator=g)
    dy = torch.randn(args.tokens, out, generator=g)
    n = round(0.2 * k)
    t0 = time.perf_counter()
    tracked, _, peak, _ = ops.csr_grow_scan(dy, x, base.crow, base.col, base.values, slots, 2 * n, 2 * n,
                                            sketch=args.sketch)
    secs = time.perf_counter() - t0
    nnz_bytes = base.values.nbytes + base.col.nbytes + base.crow.nbytes
    held = tracked.numel() * (8 + 4 + 4 + 8) + (tracked.numel() + k) * (2 + 8) + (out + 1) * 4
    return dict(peak=peak, dense=out * inn * 4, nnz_bytes=nnz_bytes, held=held, secs=secs, tracked=tracked.numel(),
                activations=args.tokens * (inn + out) * 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--e2e-reps", type=int, default=3)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--sketch", type=int, default=SEFTConfig().scan_sketch, help="scan_sketch (0: exact scan)")
    ap.add_argument("--quick", action="store_true", help="1536x576 and 576x1536 at 70%% only, no 4096x11008")
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    today = datetime.date.today().isoformat()
    load = os.getloadavg()[0]
    header = machine_header(argparse.Namespace(target_s=0, max_repeats=args.reps, big_max_repeats=1,
                                               slow_call_s=0), today, load)
    lines = [f"# seft_ext evolution benchmark ({today})", ""] + [ln for ln in header[2:6]] + [
        f"- fp32, {args.tokens} tokens per step, k = 8 (in + out), drop fraction 0.2 (the first, largest "
        f"evolution step), candidate_factor 2, scan_sketch {args.sketch}, update_interval {args.interval}, "
        f"window {args.window}; component times are medians of {args.reps} calls after 2 warmups",
        "- train step = forward + backward (dX and the delta's SDDMM) + AdamW; first / track = what the first / "
        "each further window pass adds to it (scan + a union SDDMM instead of the delta SDDMM); decide = "
        "drop / grow / adapt + optimizer remap", ""]
    shapes = SHAPES[:2] if args.quick else SHAPES
    sparsities = [0.7] if args.quick else SPARSITIES
    rows = []
    for out, inn in shapes:
        for s in sparsities:
            r = bench_case(out, inn, s, args)
            rows.append(r)
            print(f"{r['shape']} {s:.0%}: overhead {r['overhead']:.1%} (e2e {r['e2e']:+.1%})", file=sys.stderr)
    lines += ["| layer | sparsity | k | n dropped | train step ms | first +ms | track +ms | decide ms | "
              "overhead / interval | end-to-end | window held / nnz bytes | scan peak / nnz bytes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['sparsity']:.0%} | {r['k']} | {r['n']} | {r['train']:.2f} | "
                     f"{r['first']:.2f} | {r['track']:.3f} | {r['decide']:.2f} | {r['overhead']:.1%} | "
                     f"{r['e2e']:+.1%} | {r['held']:.3f} | {r['peak']:.2f} |")
    worst = max(r["overhead"] for r in rows)
    lines += ["", f"Target: overhead <= {LIMIT:.0%} of training time averaged over the interval. "
              f"Worst layer here: {worst:.1%} -> {'met' if worst <= LIMIT else 'NOT met'}."]
    if not args.quick:
        # A SmolLM2 block: q, o 576x576; k, v 192x576; gate, up 1536x576; down 576x1536.
        block = {"576x576": 2, "192x576": 2, "1536x576": 2, "576x1536": 1}
        for s in sparsities:
            rs = [r for r in rows if r["sparsity"] == s]
            extra = sum(block[r["shape"]] * r["overhead"] * r["train"] for r in rs)
            train = sum(block[r["shape"]] * r["train"] for r in rs)
            lines.append(f"A SmolLM2-135M block (its 7 projections, weighted by their training time) at {s:.0%}: "
                         f"{extra / train:.1%}.")
    lines += [
              "End-to-end = (time of an interval with evolution) / (the same interval, evolution off) - 1, "
              f"median of {args.e2e_reps} interleaved pairs (noisier than the component sum).", ""]
    if not args.quick:
        b = big_scan(args)
        lines += [f"4096x11008 at 70%, k = {8 * (4096 + 11008)}, {args.tokens} tokens: the scan held at most "
                  f"{b['peak'] / 2**20:.1f} MiB (engine-reported, besides the caller's X and dY: "
                  f"{b['activations'] / 2**20:.1f} MiB), against {b['dense'] / 2**20:.1f} MiB for a dense fp32 "
                  "gradient and "
                  f"{b['nnz_bytes'] / 2**20:.1f} MiB of fp32 CSR weight; between steps the window holds "
                  f"{b['held'] / 2**20:.2f} MiB for {b['tracked']} tracked positions; the scan took {b['secs']:.2f} s.",
                  ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
