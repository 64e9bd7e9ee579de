"""CPU benchmark of the seft_ext CSR ops against dense torch and torch.sparse.

Forward: csr_spmm vs F.linear(x, W*mask) vs torch.sparse.mm(W_csr, x.T).
Forward + backward: csr_spmm + csr_spmm_t + csr_sddmm (all non-zeros)
vs F.linear + dY @ W + dY^T @ X. Also bytes of the bf16 CSR weight vs the dense bf16 weight.

    python bench/bench_ops.py --quick      # fp32, 70%, 1536x576, 576x1536, 4096x4096
    python bench/bench_ops.py              # everything (~10-15 min on 2 idle cores, mostly the
                                           # bf16 dense baseline: dY @ W in bf16 takes minutes here)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from seft_ext import CSRWeight, ops

SHAPES = [(1536, 576), (576, 1536), (4096, 4096), (4096, 11008)]
TOKENS = [16, 512]
SPARSITIES = [0.5, 0.7, 0.9]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = 0
# (name, tokens, numerator, denominator, limit), checked at fp32 and 70% sparsity
TARGETS = [("fwd vs dense", 512, "o_fwd", "d_fwd", 0.67), ("fwd vs torch.sparse", 512, "o_fwd", "s_fwd", 0.33),
           ("fwd vs dense", 16, "o_fwd", "d_fwd", 0.5), ("fwd+bwd vs dense", 16, "o_fb", "d_fb", 0.8),
           ("fwd+bwd vs dense", 512, "o_fb", "d_fb", 0.8)]
BYTES_LIMIT = 0.65


def median_time(fn, target_s: float, max_repeats: int, slow_s: float, min_repeats: int = 3) -> tuple[float, int]:
    """(median seconds, repeats) of fn() after 2 warmup calls, repeats chosen so the case takes about
    target_s. A first call slower than slow_s is the result itself: (its time, 1)."""
    for i in range(2):
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        if i == 0 and one > slow_s:
            return one, 1
    n = max(min_repeats, min(max_repeats, int(target_s / max(one, 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n


def make_case(out: int, inp: int, sparsity: float, tokens: int, dtype: torch.dtype):
    """Random weight, mask, input and output grad (fixed seed per case)."""
    g = torch.Generator().manual_seed(SEED + out * 7 + inp * 13 + int(sparsity * 100) + tokens)
    weight = torch.randn(out, inp, generator=g)
    mask = torch.rand(out, inp, generator=g) >= sparsity
    x = torch.randn(tokens, inp, generator=g).to(dtype)
    dy = torch.randn(tokens, out, generator=g).to(dtype)
    return weight, mask, x, dy


def time_dense(w_dense, x, dy, timer):
    fwd = timer(lambda: F.linear(x, w_dense))
    fb = timer(lambda: (F.linear(x, w_dense), dy @ w_dense, dy.t() @ x))
    return fwd, fb


def time_torch_sparse(w_dense, x, timer):
    """((median, repeats), None) of torch.sparse.mm(W_csr, x.T), or (None, error text) if unsupported."""
    try:
        w_csr = w_dense.to_sparse_csr()
        torch.sparse.mm(w_csr, x.t())
    except Exception as e:  # noqa: BLE001 - report, do not hide
        return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return timer(lambda: torch.sparse.mm(w_csr, x.t())), None


def time_ours(w: CSRWeight, x, dy, timer):
    c, v = w.crow, w.values
    fwd = timer(lambda: ops.csr_spmm(x, c, w.col, v))
    fb = timer(lambda: (ops.csr_spmm(x, c, w.col, v), ops.csr_spmm_t(dy, c, w.col, v, w.shape[1]),
                        ops.csr_sddmm(dy, x, c, w.col)))
    return fwd, fb


def rel_errors(w: CSRWeight, w_dense, mask, x, dy) -> str:
    """max |ours - dense| / max |dense| of Y, dX and dV (sanity check against fp32 dense math)."""
    xf, dyf, wf = x.float(), dy.float(), w_dense.float()
    ours = (ops.csr_spmm(x, w.crow, w.col, w.values), ops.csr_spmm_t(dy, w.crow, w.col, w.values, w.shape[1]),
            ops.csr_sddmm(dy, x, w.crow, w.col))
    refs = (F.linear(xf, wf), dyf @ wf, (dyf.t() @ xf)[mask])  # mask.nonzero order = CSR order
    return "/".join(f"{float((o.float() - r).abs().max() / r.abs().max().clamp_min(1e-30)):.0e}"
                    for o, r in zip(ours, refs))


def bytes_ratios(out: int, inp: int, sparsity: float) -> tuple[float, float]:
    """(ours bf16 CSR bytes, torch CSR bf16 bytes) over dense bf16 bytes."""
    weight, mask, _, _ = make_case(out, inp, sparsity, 1, torch.bfloat16)
    w = CSRWeight.from_dense(weight, mask, dtype=torch.bfloat16)
    t = (weight * mask).to(torch.bfloat16).to_sparse_csr()
    t_bytes = sum(a.numel() * a.element_size() for a in (t.crow_indices(), t.col_indices(), t.values()))
    return w.nbytes() / (out * inp * 2), t_bytes / (out * inp * 2)


def ms(tn) -> str:
    """Milliseconds; a trailing * marks a single cold call (no warmup; see the header)."""
    return "n/a" if tn is None else f"{tn[0] * 1e3:.3f}" + ("*" if tn[1] == 1 else "")


def ratio(a, b) -> str:
    return "n/a" if a is None or b is None else f"{a[0] / b[0]:.2f}"


def run(cases, args, notes):
    rows, dense_cache = [], {}
    for dname, out, inp, tokens, sp in cases:
        dtype = DTYPES[dname]
        reps = args.big_max_repeats if out * inp > 4096 * 4096 else args.max_repeats
        timer = lambda fn: median_time(fn, args.target_s, reps, args.slow_call_s)  # noqa: E731
        print(f"[bench] {dname} {out}x{inp} tokens={tokens} sparsity={sp}", file=sys.stderr, flush=True)
        weight, mask, x, dy = make_case(out, inp, sp, tokens, dtype)
        w = CSRWeight.from_dense(weight, mask, dtype=dtype)
        w_dense = (weight * mask).to(dtype)
        key = (dname, out, inp, tokens)  # dense cost does not depend on the mask: time once
        if key not in dense_cache:
            dense_cache[key] = time_dense(w_dense, x, dy, timer)
        d_fwd, d_fb = dense_cache[key]
        s_fwd, s_info = time_torch_sparse(w_dense, x, timer)
        if s_fwd is None:
            notes.add(f"torch.sparse.mm, {dname}: {s_info}")
        try:
            o_fwd, o_fb = time_ours(w, x, dy, timer)
            err = rel_errors(w, w_dense, mask, x, dy)
        except Exception as e:  # noqa: BLE001 - report, do not hide
            notes.add(f"seft ops, {dname} {out}x{inp} tokens={tokens}: {type(e).__name__}: {e}")
            o_fwd = o_fb = err = None
        reps = "/".join("-" if tn is None else str(tn[1]) for tn in (o_fwd, d_fwd, s_fwd, o_fb, d_fb))
        rows.append(dict(dtype=dname, shape=f"{out}x{inp}", tokens=tokens, sparsity=sp, o_fwd=o_fwd,
                         d_fwd=d_fwd, s_fwd=s_fwd, o_fb=o_fb, d_fb=d_fb, err=err, reps=reps))
    return rows


def results_table(rows) -> list[str]:
    lines = ["| dtype | shape (out x in) | tokens | sparsity | ours fwd ms | dense fwd ms | torch.sparse fwd ms "
             "| ours/dense fwd | ours/sparse fwd | ours fwd+bwd ms | dense fwd+bwd ms | ours/dense fwd+bwd "
             "| rel err Y/dX/dV | repeats (5 columns of ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['shape']} | {r['tokens']} | {r['sparsity']:.0%} | {ms(r['o_fwd'])} "
                     f"| {ms(r['d_fwd'])} | {ms(r['s_fwd'])} | {ratio(r['o_fwd'], r['d_fwd'])} "
                     f"| {ratio(r['o_fwd'], r['s_fwd'])} | {ms(r['o_fb'])} | {ms(r['d_fb'])} "
                     f"| {ratio(r['o_fb'], r['d_fb'])} | {r['err'] or 'n/a'} | {r['reps']} |")
    return lines


def bytes_table(shapes, sparsities) -> tuple[list[str], dict]:
    lines = ["| shape (out x in) | sparsity | ours bf16 CSR / dense bf16 | torch CSR bf16 / dense bf16 |",
             "|---|---|---|---|"]
    ours = {}
    for out, inp in shapes:
        for sp in sparsities:
            ours[(out, inp, sp)], theirs = bytes_ratios(out, inp, sp)
            lines.append(f"| {out}x{inp} | {sp:.0%} | {ours[(out, inp, sp)]:.3f} | {theirs:.3f} |")
    return lines, ours


def targets_table(rows, byte_ratios, shapes) -> list[str]:
    lines = ["| shape (out x in) | target | measured | limit | result |", "|---|---|---|---|---|"]
    for out, inp in shapes:
        shape = f"{out}x{inp}"
        for name, tokens, num, den, limit in TARGETS:
            r = next((r for r in rows if r["dtype"] == "fp32" and r["shape"] == shape and r["tokens"] == tokens
                      and abs(r["sparsity"] - 0.7) < 1e-9), None)
            if r is None:
                continue
            value = None if r[num] is None or r[den] is None else r[num][0] / r[den][0]
            verdict = "n/a" if value is None else ("PASS" if value <= limit else "MISS")
            lines.append(f"| {shape} | {name}, {tokens} tokens | {'n/a' if value is None else f'{value:.2f}x'} "
                         f"| <= {limit}x | {verdict} |")
        b = byte_ratios.get((out, inp, 0.7))
        if b is not None:
            lines.append(f"| {shape} | bf16 bytes vs dense bf16 | {b:.3f}x | <= {BYTES_LIMIT}x "
                         f"| {'PASS' if b <= BYTES_LIMIT else 'MISS'} |")
    return lines


def machine_header(args, today, load) -> list[str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        model = "?"
    return [f"# seft_ext CPU op benchmark ({today})", "",
            f"- machine: processor `{platform.processor() or platform.machine()}`, lscpu model `{model}`, "
            f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
            f"- torch {torch.__version__}, python {platform.python_version()}, seft_ext kernel set `{ops.cpu_isa()}`",
            f"- command: `python {shlex.join(sys.argv)}`",
            f"- load average (1 min) just before the run: {load:.2f} (above ~0.5, other processes were using "
            "the cores and times are unreliable)",
            f"- seed {SEED}; median of N timed calls after 2 warmups, N chosen so a case takes about "
            f"{args.target_s} s (at least 3, at most {args.max_repeats}; at most {args.big_max_repeats} for "
            f"shapes larger than 4096x4096); a first call slower than {args.slow_call_s} s is timed once, "
            "cold, and marked * (bf16 dense matmuls on CPUs without native bf16 take minutes)",
            "- dense = F.linear(x, W*mask) [+ dY @ W + dY^T @ X]; ours = csr_spmm [+ csr_spmm_t + csr_sddmm "
            "over all non-zeros]; torch.sparse = torch.sparse.mm(W_csr, x.T) (output left transposed)",
            "- dense times are measured once per dtype/shape/tokens and reused across sparsities "
            "(the dense cost does not depend on the mask)", ""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fp32, 70%% sparsity, 1536x576, 576x1536, 4096x4096")
    p.add_argument("--out", default=None, help="Markdown output file (default bench/results/ops_cpu_<date>.md)")
    p.add_argument("--target-s", type=float, default=0.3, help="wall time aimed at per timed case (s)")
    p.add_argument("--max-repeats", type=int, default=200, help="repeat cap per case")
    p.add_argument("--big-max-repeats", type=int, default=3, help="repeat cap for shapes above 4096x4096")
    p.add_argument("--slow-call-s", type=float, default=5.0, help="time a call slower than this only once")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--isa", default="auto", help="CPU kernel set (seft_ext.ops.cpu_isa): auto, avx512, avx2, base")
    args = p.parse_args()
    ops.cpu_isa(args.isa)
    if args.threads:
        torch.set_num_threads(args.threads)
    today = datetime.date.today().isoformat()
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"ops_cpu_{today}.md")

    shapes = SHAPES[:3] if args.quick else SHAPES
    dtypes = ["fp32"] if args.quick else list(DTYPES)
    sparsities = [0.7] if args.quick else SPARSITIES
    cases = [(d, o, i, t, s) for d in dtypes for (o, i) in shapes for t in TOKENS for s in sparsities]

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    notes: set[str] = set()
    load_start, t0 = os.getloadavg()[0], time.perf_counter()
    rows = run(cases, args, notes)
    b_lines, b_ratios = bytes_table(shapes, sparsities)
    lines = machine_header(args, today, load_start)
    lines += ["## Times", ""] + results_table(rows)
    lines += ["", "## Weight bytes (bf16 values, int16/int32 col, int32 crow; no transposed index needed)", ""]
    lines += b_lines
    lines += ["", "## Targets (fp32, 70% sparsity; informational)", ""] + targets_table(rows, b_ratios, shapes)
    lines += ["", f"Total benchmark time: {time.perf_counter() - t0:.0f} s"]
    if notes:
        lines += ["", "## Problems", ""] + [f"- {n}" for n in sorted(notes)]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        f.write(text)
    print(f"[bench] wrote {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
