"""CPU benchmark of bsr_spmm (forward) against dense F.linear and torch's own BSR matmul.

For blocks 4x4, 8x8, 16x16 at 70% block sparsity on 1536x576, 576x1536 and 4096x4096, at 512
and 16 tokens (fp32 by default): min / median / max seconds of the repeats of each, and the
ratio of the medians bsr_spmm / F.linear. torch's BSR matmul (torch.sparse.mm on a
torch.sparse_bsr weight) is timed where torch has a CPU kernel for it ("n/a" otherwise).

    python bench/bench_bsr.py                  # threads: torch's default
    python bench/bench_bsr.py --threads 2 --repeats 10
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from seft_ext import BSRWeight, ops

SHAPES = [(4096, 4096), (1536, 576), (576, 1536)]
BLOCKS = [(4, 4), (8, 8), (16, 16)]
TOKENS = [512, 16]


def times(fn, repeats: int) -> list[float]:
    fn()
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return sorted(out)


def fmt(ts) -> str:
    if ts is None:
        return "n/a"
    return f"{ts[0] * 1e3:7.2f} / {ts[len(ts) // 2] * 1e3:7.2f} / {ts[-1] * 1e3:7.2f}"


def torch_bsr(w: BSRWeight, x: torch.Tensor):
    """torch.sparse.mm(W_bsr, x^T), or None when torch has no CPU kernel for it."""
    t = w.to_torch_sparse()
    xt = x.T.contiguous()
    try:
        torch.sparse.mm(t, xt)
    except (RuntimeError, NotImplementedError):
        return None
    return lambda: torch.sparse.mm(t, xt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sparsity", type=float, default=0.7, help="fraction of blocks dropped")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"threads {torch.get_num_threads()}, cpu_isa {ops.cpu_isa()}, dtype {args.dtype}, block sparsity "
          f"{args.sparsity}, repeats {args.repeats}, loadavg {os.getloadavg()}")
    print("times in ms: min / median / max")
    print(f"{'shape':>10} {'block':>6} {'T':>4} | {'bsr_spmm':>27} | {'F.linear':>27} | {'ratio':>5} | "
          f"{'torch BSR':>27}")
    torch.manual_seed(0)
    for out, inn in SHAPES:
        for r, c in BLOCKS:
            dense = torch.randn(out, inn)
            bmask = torch.rand(-(-out // r), -(-inn // c)) >= args.sparsity
            w = BSRWeight.from_dense(dense, (r, c), bmask, dtype=dtype)
            wd = w.to_dense()
            for T in TOKENS:
                x = torch.randn(T, inn).to(dtype)
                with torch.no_grad():
                    ts = times(lambda: ops.bsr_spmm(x, w.crow, w.col, w.values, out), args.repeats)
                    td = times(lambda: F.linear(x, wd), args.repeats)
                    fb = torch_bsr(w, x) if dtype == torch.float32 else None
                    tb = times(fb, args.repeats) if fb else None
                ratio = ts[len(ts) // 2] / td[len(td) // 2]
                print(f"{out:>4}x{inn:<5} {r:>2}x{c:<3} {T:>4} | {fmt(ts)} | {fmt(td)} | {ratio:5.2f} | {fmt(tb)}",
                      flush=True)
    print(f"loadavg at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
