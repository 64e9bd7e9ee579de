"""GPU benchmark of the seft_ext CSR ops (bf16) against cuBLAS and torch.sparse, side by side.

Per case (shape out x in, sparsity, tokens), on one device, in one process:
  forward        csr_spmm  vs  F.linear(x, W*mask) (cuBLAS)  vs  torch.sparse.mm(W_csr, x.T) (cuSPARSE)
  fwd + bwd      csr_spmm + csr_spmm_t + csr_sddmm (all non-zeros)  vs  F.linear + dY @ W + dY^T @ X
and the peak memory of one training step (forward, backward, SGD) of a stack of LLaMA-MLP
layers (down(silu(gate(x)) * up(x))), 70% sparse: seft_ext.SparseLinear vs masked dense
(dense bf16 weights * mask, dense grads). Block-sparse (BSR) weights: bsr_spmm [+ bsr_spmm_t +
bsr_sddmm over all blocks] vs the same dense calls, 16x16 and 32x32 blocks (the tensor-core
kernels from 64 tokens), 70% of the blocks pruned.

Timing: CUDA events around each call (the device timeline, launch gaps included), a 256 MiB
buffer zeroed before every call so no weight is served from L2 (as triton's do_bench does),
warmup, then the median of N calls; N chosen so a case takes about --target-s. A first call
slower than --slow-call-s is the result itself (one cold call, marked *). A time budget
(--budget-s) bounds the whole run: cases left when it is spent are marked "skip". The
Markdown file is rewritten after every case, so a run killed from outside keeps what it did.

    python bench/bench_gpu.py --out bench_gpu.md            # H200: about 2-3 min
    python bench/bench_gpu.py --smoke --out /tmp/smoke.md   # tiny shapes on the CPU (a test of the script)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import seft_ext
from seft_ext import BSRWeight, CSRWeight, SEFTConfig, SEFTController, SEFTLinear, SparseLinear, ops

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SPARSITIES = [0.5, 0.7, 0.9]
TOKENS = [1, 16, 4096]
MLP = dict(hidden=4096, inter=11008, layers=4, sparsity=0.7, tokens=4096)

SMOKE_SHAPES = [(64, 96), (172, 64)]
SMOKE_TOKENS = [1, 16, 40]
SMOKE_MLP = dict(hidden=64, inter=172, layers=4, sparsity=0.7, tokens=40)
# BSR cases: (out, in), block sparsity, blocks, tokens (4 cases, seconds in all on a GPU)
BSR = dict(shape=(4096, 4096), sparsity=0.7, blocks=[(16, 16), (32, 32)], tokens=[16, 4096])
SMOKE_BSR = dict(shape=(64, 96), sparsity=0.7, blocks=[(16, 16), (32, 32)], tokens=[16, 40])

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEED = 0
SEFT_KINDS = ("seft", "seft-masked-dense")
MEMORY_KINDS = ("sparse", "dense") + SEFT_KINDS


# ---------------------------------------------------------------------------------- timing
class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Timer:
    """Median time of fn() in seconds: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, args, budget: Budget):
        self.cuda = device.type == "cuda"
        self.device = device
        self.args = args
        self.budget = budget
        self.flush = None
        if self.cuda and args.flush_mib > 0:
            self.flush = torch.empty(args.flush_mib * 2**20 // 4, dtype=torch.int32, device=device)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall(self, fn):
        """(seconds, result) of one call, synchronized on both sides."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def measure(self, fn, max_repeats: int):
        """dict(t=median seconds, n=timed calls, cold=bool, out=first result) or dict(skip=reason)."""
        if self.budget.left() <= 0:
            return dict(skip="time budget spent")
        one, out = self.wall(fn)  # warmup 1 (module load, handles, allocator)
        if one > self.args.slow_call_s:
            return dict(t=one, n=1, cold=True, out=out)
        if one < self.args.target_s:
            one, _ = self.wall(fn)  # warmup 2, the estimate for N
        n = max(1, min(max_repeats, int(self.args.target_s / max(one, 1e-7))))
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            self.sync()
            for i in range(n):
                if self.flush is not None:
                    self.flush.zero_()
                starts[i].record()
                fn()
                ends[i].record()
            self.sync()
            times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        else:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return dict(t=statistics.median(times), n=n, cold=False, out=out)


# ---------------------------------------------------------------------------------- op cases
def make_case(device, out: int, inp: int, sparsity: float, tokens: int, dtype):
    g = torch.Generator(device=device).manual_seed(SEED + out * 7 + inp * 13 + int(sparsity * 100) + tokens)
    weight = torch.randn(out, inp, generator=g, device=device)
    mask = torch.rand(out, inp, generator=g, device=device) >= sparsity
    x = torch.randn(tokens, inp, generator=g, device=device).to(dtype)
    dy = torch.randn(tokens, out, generator=g, device=device).to(dtype)
    return weight, mask, x, dy


def rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| (Frobenius); inf when a value is not finite."""
    got, ref = got.float(), ref.float()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def errors(outs, x, dy, w_dense, mask) -> tuple[str, float]:
    """||ours - ref|| / ||ref|| of Y, dX, dV against fp32 dense math on the same (bf16) inputs."""
    y, dx, dv = outs
    xf, dyf, wf = x.float(), dy.float(), w_dense.float()
    refs = (F.linear(xf, wf), dyf @ wf, (dyf.t() @ xf)[mask])  # mask.nonzero order == CSR order
    errs = [rel_err(o, r) for o, r in zip((y, dx, dv), refs)]
    del refs
    return "/".join(f"{e:.0e}" for e in errs), max(errs)


def torch_sparse_case(w_dense, x, timer, reps, notes):
    """torch.sparse.mm(W_csr, x.T) in x's dtype; fp32 (labelled) when that dtype is unsupported."""
    first_err = None
    for dt in (x.dtype, torch.float32):
        try:
            w_csr = w_dense.to(dt).to_sparse_csr()
            xt = x.to(dt)
            torch.sparse.mm(w_csr, xt.t())
            timer.sync()
        except Exception as e:  # noqa: BLE001 - report, do not hide
            first_err = first_err or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if dt != x.dtype:
            notes.add(f"torch.sparse.mm has no {x.dtype} kernel here ({first_err}); timed in fp32, marked (fp32)")
        r = timer.measure(lambda: torch.sparse.mm(w_csr, xt.t()), reps)
        r["label"] = "" if dt == x.dtype else " (fp32)"
        r.pop("out", None)
        return r
    notes.add(f"torch.sparse.mm failed: {first_err}")
    return dict(skip="unsupported")


def run_case(device, dtype, out, inp, sp, tokens, timer, args, dense_cache, notes):
    big = out * inp > 4096 * 4096 or tokens >= 1024
    reps = args.big_max_repeats if big else args.max_repeats
    weight, mask, x, dy = make_case(device, out, inp, sp, tokens, dtype)
    w = CSRWeight.from_dense(weight, mask, dtype=dtype)
    w_dense = (weight * mask).to(dtype)
    del weight
    # the CUDA ops also keep W's column-tile index (int32 [out, ceil(in / 128) + 1]) per pattern
    w_bytes = w.nbytes() + out * ((inp + 127) // 128 + 1) * 4
    row = dict(shape=f"{out}x{inp}", out=out, inp=inp, tokens=tokens, sparsity=sp,
               bytes=w_bytes / (out * inp * w_dense.element_size()),
               fwd_bytes=w_bytes + (x.numel() + tokens * out) * x.element_size(),
               fb_flops=6.0 * tokens * out * inp)
    key = (out, inp, tokens)  # the dense cost does not depend on the mask: timed once
    if key not in dense_cache:
        d_fwd = timer.measure(lambda: F.linear(x, w_dense), reps)
        d_fb = timer.measure(lambda: (F.linear(x, w_dense), dy @ w_dense, dy.t() @ x), reps)
        d_fwd.pop("out", None)
        d_fb.pop("out", None)
        dense_cache[key] = (d_fwd, d_fb)
    row["d_fwd"], row["d_fb"] = dense_cache[key]
    row["s_fwd"] = torch_sparse_case(w_dense, x, timer, reps, notes)
    c, col, v, n_in = w.crow, w.col, w.values, w.shape[1]
    try:
        row["o_fwd"] = timer.measure(lambda: ops.csr_spmm(x, c, col, v), reps)
        row["o_fwd"].pop("out", None)
        row["o_fb"] = timer.measure(lambda: (ops.csr_spmm(x, c, col, v), ops.csr_spmm_t(dy, c, col, v, n_in),
                                             ops.csr_sddmm(dy, x, c, col)), reps)
        outs = row["o_fb"].pop("out", None)
        if outs is not None:
            row["err"], worst = errors(outs, x, dy, w_dense, mask)
            if not worst < args.max_err:
                notes.add(f"LARGE ERROR: {row['shape']} tokens={tokens} sparsity={sp:.0%}: rel err "
                          f"Y/dX/dV {row['err']} (limit {args.max_err})")
            del outs
    except Exception as e:  # noqa: BLE001 - report, do not hide
        notes.add(f"seft ops failed, {row['shape']} tokens={tokens} sparsity={sp:.0%}: {type(e).__name__}: {e}")
        traceback.print_exc()
        row.setdefault("o_fwd", dict(skip="error"))
        row.setdefault("o_fb", dict(skip="error"))
    return row


def bsr_refs(w, x, dy, w_dense):
    """fp32 dense references of Y, dX and the blocks' gradient [nblocks, r, c] (padding 0)."""
    (out, inp), (r, c), (nbr, nbc) = w.shape, w.block, w.block_shape
    xf, dyf, wf = x.float(), dy.float(), w_dense.float()
    g = dyf.new_zeros(nbr * r, nbc * c)
    g[:out, :inp] = dyf.t() @ xf
    blocks = g.view(nbr, r, nbc, c).permute(0, 2, 1, 3)[w.block_rows(), w.col.long()]
    return F.linear(xf, wf), dyf @ wf, blocks


def run_bsr_case(device, dtype, out, inp, sp, block, tokens, timer, args, dense_cache, notes):
    reps = args.big_max_repeats if tokens >= 1024 else args.max_repeats
    weight, _, x, dy = make_case(device, out, inp, sp, tokens, dtype)
    (r, c), tag = block, f"{out}x{inp} block {block[0]}x{block[1]} tokens={tokens} sparsity={sp:.0%}"
    nbr, nbc = -(-out // r), -(-inp // c)
    g = torch.Generator(device=device).manual_seed(SEED + r * 31 + c)
    w = BSRWeight.from_dense(weight, block, torch.rand(nbr, nbc, generator=g, device=device) >= sp, dtype=dtype)
    w_dense = w.to_dense()
    del weight
    # the CUDA ops also keep a block index (int32 [nbc + 1 + 2 nblocks]) per pattern
    w_bytes = w.nbytes() + 4 * (nbc + 1 + 2 * w.nnz_blocks)
    row = dict(shape=f"{out}x{inp}", block=f"{r}x{c}", tokens=tokens, sparsity=sp,
               bytes=w_bytes / (out * inp * w_dense.element_size()))
    key = (out, inp, tokens)
    if key not in dense_cache:
        d_fwd = timer.measure(lambda: F.linear(x, w_dense), reps)
        d_fb = timer.measure(lambda: (F.linear(x, w_dense), dy @ w_dense, dy.t() @ x), reps)
        d_fwd.pop("out", None)
        d_fb.pop("out", None)
        dense_cache[key] = (d_fwd, d_fb)
    row["d_fwd"], row["d_fb"] = dense_cache[key]
    cr, col, v = w.crow, w.col, w.values
    try:
        row["o_fwd"] = timer.measure(lambda: ops.bsr_spmm(x, cr, col, v, out), reps)
        row["o_fwd"].pop("out", None)
        row["o_fb"] = timer.measure(lambda: (ops.bsr_spmm(x, cr, col, v, out), ops.bsr_spmm_t(dy, cr, col, v, inp),
                                             ops.bsr_sddmm(dy, x, cr, col, r, c)), reps)
        outs = row["o_fb"].pop("out", None)
        if outs is not None:
            errs = [rel_err(o, ref) for o, ref in zip(outs, bsr_refs(w, x, dy, w_dense))]
            row["err"] = "/".join(f"{e:.0e}" for e in errs)
            if not max(errs) < args.max_err:
                notes.add(f"LARGE ERROR: BSR {tag}: rel err Y/dX/dV {row['err']} (limit {args.max_err})")
    except Exception as e:  # noqa: BLE001 - report, do not hide
        notes.add(f"seft ops failed, BSR {tag}: {type(e).__name__}: {e}")
        traceback.print_exc()
        row.setdefault("o_fwd", dict(skip="error"))
        row.setdefault("o_fb", dict(skip="error"))
    return row


def run_bsr_phase(device, dtype, cfg, timer, args, dense_cache, notes, bsr_rows, report):
    (out, inp), sp = cfg["shape"], cfg["sparsity"]
    for t in cfg["tokens"]:
        for block in cfg["blocks"]:
            print(f"[bench_gpu] BSR {out}x{inp} block {block} tokens={t} ({timer.budget.elapsed():.0f} s)",
                  file=sys.stderr, flush=True)
            if timer.budget.left() <= 0:
                bsr_rows.append(dict(shape=f"{out}x{inp}", block=f"{block[0]}x{block[1]}", tokens=t, sparsity=sp,
                                     bytes=float("nan"), o_fwd=dict(skip="time budget spent")))
                continue
            try:
                bsr_rows.append(run_bsr_case(device, dtype, out, inp, sp, block, t, timer, args, dense_cache, notes))
            except Exception as e:  # noqa: BLE001 - record, go on
                traceback.print_exc()
                notes.add(f"case BSR {out}x{inp} block {block} tokens={t} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0]}")
                bsr_rows.append(dict(shape=f"{out}x{inp}", block=f"{block[0]}x{block[1]}", tokens=t, sparsity=sp,
                                     bytes=float("nan"), o_fwd=dict(skip="error")))
            gc.collect()
            report()


def bsr_table(bsr_rows, dtype_name) -> list[str]:
    if not bsr_rows:
        return []
    lines = ["", f"## BSR ops ({dtype_name})", "",
             "ours = bsr_spmm [+ bsr_spmm_t + bsr_sddmm over all blocks]; dense = F.linear(x, W) [+ dY @ W + "
             "dY^T @ X] with the block-masked dense W; sparsity: the share of blocks pruned; bytes: values, col, "
             "crow and the CUDA ops' block index over the dense weight; rel err against fp32 dense math.", "",
             "| shape (out x in) | block | tokens | sparsity | ours fwd ms | dense fwd ms | ours/dense fwd "
             "| ours fwd+bwd ms | dense fwd+bwd ms | ours/dense fwd+bwd | rel err Y/dX/dV | bytes/dense "
             "| N (4 ms columns) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in bsr_rows:
        lines.append(
            f"| {r['shape']} | {r['block']} | {r['tokens']} | {r['sparsity']:.0%} | {fmt_ms(r.get('o_fwd'))} "
            f"| {fmt_ms(r.get('d_fwd'))} | {fmt_ratio(r.get('o_fwd'), r.get('d_fwd'))} | {fmt_ms(r.get('o_fb'))} "
            f"| {fmt_ms(r.get('d_fb'))} | {fmt_ratio(r.get('o_fb'), r.get('d_fb'))} | {r.get('err', 'n/a')} "
            f"| {fmt_bytes(r['bytes'])} "
            f"| {fmt_reps(r.get('o_fwd'), r.get('d_fwd'), r.get('o_fb'), r.get('d_fb'))} |")
    return lines


# ---------------------------------------------------------------------------------- memory
class MaskedLinear(nn.Module):
    """Masked dense baseline: a dense weight, multiplied by its mask in every forward."""

    def __init__(self, weight, mask):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask)


class MLPBlock(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x)); no bias."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def build_stack(kind, cfg, device, dtype):
    g = torch.Generator(device=device).manual_seed(SEED + 1)
    h, m = cfg["hidden"], cfg["inter"]
    blocks = []
    for _ in range(cfg["layers"]):
        lins = []
        for out, inp in ((m, h), (m, h), (h, m)):
            weight = torch.randn(out, inp, generator=g, device=device) * inp ** -0.5
            mask = torch.rand(out, inp, generator=g, device=device) >= cfg["sparsity"]
            if kind == "sparse":
                lins.append(SparseLinear(CSRWeight.from_dense(weight, mask, dtype=dtype)))
            elif kind in SEFT_KINDS:  # frozen base + delta of k = 8 (in + out) slots, layer budget
                layer = SEFTLinear(CSRWeight.from_dense(weight, mask, dtype=dtype), 8 * (inp + out), budget="layer")
                layer.dense_compute = kind == "seft-masked-dense"
                lins.append(layer)
            else:
                lins.append(MaskedLinear((weight * mask).to(dtype), mask))
            del weight, mask
        blocks.append(MLPBlock(*lins))
    return nn.Sequential(*blocks)


def memory_case(kind, cfg, device, dtype, timer, args):
    """Static and peak bytes (over what was allocated before the model) and step time of kind."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
    model = build_stack(kind, cfg, device, dtype)
    ctl = None
    if kind in SEFT_KINDS:  # AdamW over the deltas; step 1 scans (window), step 2 evolves
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ctl = SEFTController(model, opt, SEFTConfig(sparsity=cfg["sparsity"], update_interval=2,
                                                    grow_accumulation=2), total_steps=1000)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(SEED + 2)
    x = torch.randn(cfg["tokens"], cfg["hidden"], generator=g, device=device).to(dtype)
    res = dict(kind=kind, n_params=sum(p.numel() for p in model.parameters()))
    if cuda:
        torch.cuda.synchronize(device)
        res["static"] = torch.cuda.memory_allocated(device) - base

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        if ctl is not None and ctl.step():
            res["evolved"] = True
        return loss.detach()

    times, peaks = [], []
    for i in range(2):
        if i == 1 and ctl is None and (times[0] > args.slow_call_s or timer.budget.left() < 3 * times[0] + 5):
            break
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t, loss = timer.wall(step)
        times.append(t)
        if not torch.isfinite(loss):
            res["note"] = f"non-finite loss {float(loss)}"
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
            res["peak"] = max(peaks) if ctl is not None else peaks[-1]  # SEFT: the evolution step counts
    res["step_s"] = times[-1]
    res["steps"] = len(times)
    res["times"] = times
    model = opt = x = ctl = None  # free them before the next case
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------- report
def fmt_ms(r) -> str:
    if r is None:
        return "-"
    if "skip" in r:
        return "skip" if r["skip"] == "time budget spent" else f"skip ({r['skip']})"
    return f"{r['t'] * 1e3:.3f}" + ("*" if r.get("cold") else "") + r.get("label", "")


def fmt_ratio(a, b) -> str:
    if not a or not b or "t" not in a or "t" not in b:
        return "n/a"
    return f"{a['t'] / b['t']:.2f}"


def fmt_bytes(b: float) -> str:
    return "-" if b != b else f"{b:.2f}"  # nan: the case did not run


def fmt_rate(amount: float, r, ceiling, scale: float) -> str:
    """amount / time in units of `scale`, and its share of the measured ceiling."""
    if not r or "t" not in r or not amount:
        return "n/a"
    rate = amount / r["t"]
    return f"{rate / scale:.0f}" + (f" ({rate / ceiling:.0%})" if ceiling else "")


def measure_ceilings(device, timer) -> dict:
    """The device's copy bandwidth (bytes read + written) and bf16 matmul rate, measured here."""
    if device.type != "cuda":
        return {}
    a = torch.empty(2**29, dtype=torch.bfloat16, device=device)  # 1 GiB
    b = torch.empty_like(a)
    r = timer.measure(lambda: b.copy_(a), 10)
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    r2 = timer.measure(lambda: m @ m, 10)
    res = dict(copy_bps=2 * a.numel() * 2 / r["t"], mm_flops=2 * 8192.0**3 / r2["t"])
    a = b = m = None
    torch.cuda.empty_cache()
    return res


def fmt_reps(*rs) -> str:
    return "/".join("-" if (r is None or "n" not in r) else str(r["n"]) for r in rs)


def gpu_info(device):
    if device.type != "cuda":
        return f"none (CPU smoke run: {platform.processor() or platform.machine()}, {os.cpu_count()} cores)", ""
    p = torch.cuda.get_device_properties(device)
    name = f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    extra = ""
    try:
        fields = "driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu"
        q = subprocess.run(["nvidia-smi", f"--query-gpu={fields}",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        if q.returncode == 0:
            extra = q.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return name, extra


def write_report(path, args, device, dtype_name, started, rows, mem, notes, budget, done, ceil=None, bsr_rows=()):
    bi = seft_ext.build_info
    gpu, smi = gpu_info(device)
    lines = [f"# seft_ext GPU op benchmark ({started})", "",
             f"- date: {started}" + ("" if done else " (INCOMPLETE: the run was stopped or is still running)"),
             f"- GPU: {gpu}" + (f"; nvidia-smi driver, SM clock, max SM clock, power, temp: {smi}" if smi else ""),
             f"- torch {torch.__version__}, CUDA (torch) {torch.version.cuda or 'none'}, "
             f"seft_ext built with nvcc {getattr(bi, 'NVCC_VERSION', '?') or 'none'} archs "
             f"{getattr(bi, 'CUDA_ARCHS', '?') or 'none'}, python {platform.python_version()}",
             f"- command: `python {shlex.join(sys.argv)}`",
             f"- dtype {dtype_name}; seed {SEED}; random normal data (never zeros); device {device}",
             "- times: " + ("CUDA events around each call, device timeline (launch gaps included); "
                            f"{args.flush_mib} MiB zeroed before each call (L2 flushed); "
                            if device.type == "cuda" else "perf_counter (CPU smoke run); ")
             + f"median of N calls after 1-2 warmups, N about {args.target_s} s / call time, at most "
             f"{args.max_repeats} ({args.big_max_repeats} for shapes above 4096x4096 or >= 1024 tokens); "
             f"a first call slower than {args.slow_call_s} s is the result itself: one cold call, marked *",
             "- dense = F.linear(x, W*mask) (cuBLAS) [+ dY @ W + dY^T @ X]; ours = csr_spmm [+ csr_spmm_t + "
             "csr_sddmm over all non-zeros]; torch.sparse = torch.sparse.mm(W_csr int64 indices, x.T) "
             "(cuSPARSE; output left transposed); the dense times are measured once per shape/tokens",
             "- rel err: ||ours - ref|| / ||ref|| (Frobenius) of Y / dX / dV against fp32 dense math on the same "
             f"{dtype_name} inputs; bytes: our CSR weight (values, col, crow, column-tile index) over the dense "
             "weight, same dtype",
             f"- time budget {args.budget_s:.0f} s; spent {budget.elapsed():.0f} s",
             "- ceilings measured in this run: " + (
                 f"copy {ceil['copy_bps'] / 1e12:.2f} TB/s (bytes read + written, 1 GiB bf16 copy_), "
                 f"bf16 matmul {ceil['mm_flops'] / 1e12:.0f} TFLOP/s (8192^3)" if ceil else "none (CPU)"),
             "- fwd GB/s: (our weight bytes incl. the tile index + x + y) / ours fwd time, (% of the copy "
             "ceiling); fwd+bwd TFLOP/s: dense-equivalent 6 T out in / ours fwd+bwd time (% of the matmul "
             "ceiling): the tensor-core path computes dense tiles, so this is its real rate", ""]
    lines += ["## Ops", "",
              "| shape (out x in) | tokens | sparsity | ours fwd ms | dense fwd ms | torch.sparse fwd ms "
              "| ours/dense fwd | ours/sparse fwd | ours fwd+bwd ms | dense fwd+bwd ms | ours/dense fwd+bwd "
              "| rel err Y/dX/dV | bytes/dense | fwd GB/s | fwd+bwd TFLOP/s | N (5 ms columns) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(args.shapes)}
    for r in sorted(rows, key=lambda r: (order.get((r["out"], r["inp"]), 99), r["tokens"], r["sparsity"])):
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['sparsity']:.0%} | {fmt_ms(r.get('o_fwd'))} "
            f"| {fmt_ms(r.get('d_fwd'))} "
            f"| {fmt_ms(r.get('s_fwd'))} | {fmt_ratio(r.get('o_fwd'), r.get('d_fwd'))} "
            f"| {fmt_ratio(r.get('o_fwd'), r.get('s_fwd'))} | {fmt_ms(r.get('o_fb'))} | {fmt_ms(r.get('d_fb'))} "
            f"| {fmt_ratio(r.get('o_fb'), r.get('d_fb'))} | {r.get('err', 'n/a')} | {fmt_bytes(r['bytes'])} "
            f"| {fmt_rate(r.get('fwd_bytes', 0), r.get('o_fwd'), (ceil or {}).get('copy_bps'), 1e9)} "
            f"| {fmt_rate(r.get('fb_flops', 0), r.get('o_fb'), (ceil or {}).get('mm_flops'), 1e12)} "
            f"| {fmt_reps(r.get('o_fwd'), r.get('d_fwd'), r.get('s_fwd'), r.get('o_fb'), r.get('d_fb'))} |")
    lines += bsr_table(bsr_rows, dtype_name)
    cfg = args.mlp
    lines += ["", f"## Training step memory: {cfg['layers']} LLaMA-MLP layers (hidden {cfg['hidden']}, "
              f"intermediate {cfg['inter']}), {cfg['sparsity']:.0%} sparse, {cfg['tokens']} tokens, {dtype_name}", "",
              "One step = forward, loss = mean(y^2) in fp32, backward, SGD step (no optimizer state). "
              "MiB over what was allocated before the model was built (torch.cuda.memory_allocated / "
              "max_memory_allocated, peak reset before the step that is reported: the 2nd when there is time "
              "for it). Masked dense: dense weights times a bool mask in every forward, dense grads. SEFT rows: "
              "frozen CSR base + fp32 delta of k = 8 (in + out) slots per layer, AdamW on the deltas; step 1 scans "
              "the window, step 2 adds to it and runs the evolution step (peak: the larger of the two); the masked-"
              "dense SEFT row does the same steps with dense weights and dense gradients (the paper's way).", "",
              "| variant | parameters | static MiB (weights, masks, input) | peak MiB in a step | step s (steps run) |",
              "|---|---|---|---|---|"]
    for m in mem:
        name = {"sparse": "seft_ext.SparseLinear (CSR)", "dense": "masked dense",
                "seft": "SEFT: SEFTLinear, AdamW on deltas, evolution at step 2",
                "seft-masked-dense": "SEFT masked dense (dense_compute), same steps"}[m["kind"]]
        if "skip" in m:
            lines.append(f"| {name} | - | - | - | skip ({m['skip']}) |")
            continue
        mib = lambda k: f"{m[k] / 2**20:.0f}" if k in m else "n/a (CPU)"  # noqa: E731
        steps = f"{m['step_s']:.3f} ({m['steps']})"
        if m["kind"] in SEFT_KINDS:
            steps = " / ".join(f"{t:.3f}" for t in m["times"]) + " (scan / evolve)" + \
                ("" if m.get("evolved") else " NO EVOLUTION STEP RAN")
        lines.append(f"| {name} | {m['n_params'] / 1e6:.2f} M | {mib('static')} | {mib('peak')} "
                     f"| {steps} |" + (f" {m['note']}" if "note" in m else ""))
    by = {m["kind"]: m for m in mem if "peak" in m}
    for a, b in (("sparse", "dense"), ("seft", "seft-masked-dense")):
        if a in by and b in by:
            lines += ["", f"Peak ratio {a} / {b}: {by[a]['peak'] / by[b]['peak']:.2f}; "
                      f"static: {by[a]['static'] / by[b]['static']:.2f}"]
    if notes:
        lines += ["", "## Notes and problems", ""] + [f"- {n}" for n in sorted(notes)]
    text = "\n".join(lines) + "\n"
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return text


# ---------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    p.add_argument("--out", default=None, help="Markdown output (default bench/results/ops_gpu_<date>.md)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--budget-s", type=float, default=150.0, help="wall time budget for the whole run (s)")
    p.add_argument("--target-s", type=float, default=0.1, help="time aimed at per measurement (s)")
    p.add_argument("--max-repeats", type=int, default=50)
    p.add_argument("--big-max-repeats", type=int, default=10)
    p.add_argument("--slow-call-s", type=float, default=2.0, help="a first call slower than this is timed once")
    p.add_argument("--flush-mib", type=int, default=256, help="MiB zeroed before each timed call (0: none)")
    p.add_argument("--max-err", type=float, default=5e-2, help="rel err above this is flagged in the notes")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    args = p.parse_args()

    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use --smoke for a CPU run)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    args.shapes = SMOKE_SHAPES if args.smoke else SHAPES
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    args.mlp = SMOKE_MLP if args.smoke else MLP
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"ops_gpu_{datetime.date.today().isoformat()}.md")
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are true fp32
    if device.type == "cuda":
        torch.cuda.set_device(device)

    budget = Budget(args.budget_s)
    timer = Timer(device, args, budget)
    rows, mem, notes, dense_cache, bsr_rows = [], [], set(), {}, []
    ceil = measure_ceilings(device, timer)

    def report(done=False):
        return write_report(out_path, args, device, args.dtype, started, rows, mem, notes, budget, done, ceil,
                            bsr_rows)

    # Small token counts first, then BSR, the training step, then the slow 4096-token cases.
    split = max(tokens) if args.smoke else 1024  # the smoke run goes through all four phases too
    small = [t for t in tokens if t < split]
    large = [t for t in tokens if t >= split]
    phases = [("ops", small), ("bsr", None), ("memory", None), ("ops", large)]
    for phase, toks in phases:
        if phase == "bsr":
            run_bsr_phase(device, dtype, SMOKE_BSR if args.smoke else BSR, timer, args, dense_cache, notes, bsr_rows,
                          report)
            continue
        if phase == "memory":
            if args.skip_memory:
                continue
            for kind in MEMORY_KINDS:
                print(f"[bench_gpu] memory step: {kind} ({budget.elapsed():.0f} s)", file=sys.stderr, flush=True)
                if budget.left() <= 0:
                    mem.append(dict(kind=kind, skip="time budget spent"))
                    continue
                try:
                    mem.append(memory_case(kind, args.mlp, device, dtype, timer, args))
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    notes.add(f"memory step {kind} failed: {type(e).__name__}: {str(e).splitlines()[0]}")
                    mem.append(dict(kind=kind, skip="error"))
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                report()
            continue
        for t in toks:
            for out, inp in args.shapes:
                for sp in SPARSITIES:
                    print(f"[bench_gpu] {out}x{inp} tokens={t} sparsity={sp:.0%} ({budget.elapsed():.0f} s)",
                          file=sys.stderr, flush=True)
                    if budget.left() <= 0:
                        rows.append(dict(shape=f"{out}x{inp}", out=out, inp=inp, tokens=t, sparsity=sp,
                                         bytes=float("nan"), o_fwd=dict(skip="time budget spent")))
                        continue
                    try:
                        rows.append(run_case(device, dtype, out, inp, sp, t, timer, args, dense_cache, notes))
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record, go on
                        traceback.print_exc()
                        notes.add(f"case {out}x{inp} tokens={t} sparsity={sp:.0%} failed: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0]}")
                        rows.append(dict(shape=f"{out}x{inp}", out=out, inp=inp, tokens=t, sparsity=sp,
                                         bytes=float("nan"), o_fwd=dict(skip="error")))
                    gc.collect()
                    report()
    if budget.left() <= 0:
        notes.add(f"the time budget ({args.budget_s:.0f} s) ran out: cases marked skip were not run")
    text = report(done=True)
    print(text)
    print(f"[bench_gpu] wrote {out_path} in {budget.elapsed():.0f} s", file=sys.stderr)
    # torch.sparse lacking a kernel is a finding, not a failure; our ops failing or erring is.
    failed = any(n.startswith(("seft ops failed", "LARGE ERROR", "memory step", "case ")) for n in notes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
