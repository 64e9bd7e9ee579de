"""CPU benchmark of the BSR ops against dense F.linear and torch's own BSR matmul.

For blocks 4x4, 8x8, 16x16 at 70% block sparsity on 1536x576, 576x1536 and 4096x4096, at 512
and 16 tokens (fp32 by default): min / median / max milliseconds of the repeats of each, and
the ratio of the medians. Forward: bsr_spmm against F.linear; torch's BSR matmul
(torch.sparse.mm on a torch.sparse_bsr weight) is timed where torch has a CPU kernel for it
("n/a" otherwise), with the ratio bsr_spmm / torch BSR. Forward + backward: bsr_spmm +
bsr_spmm_t + bsr_sddmm (every block) against F.linear + dY W + dY^T X. Last, each weight's
bytes with bf16 values over the dense bf16 weight's, stored and with the block-column index
that bsr_spmm_t builds per call.

    python bench/bench_bsr.py                  # threads: torch's default
    python bench/bench_bsr.py --threads 2 --repeats 10
    python bench/bench_bsr.py --blocks 8x8 --tokens 512 --no-backward
    python bench/bench_bsr.py --isa avx2        # another CPU kernel set (default: the best one)
    python bench/bench_bsr.py --tokens 16 --no-backward --repeats 11 --loop 300   # short calls
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


LOOP = 1  # calls timed together per repeat (--loop), the time per call reported


def times(fn, repeats: int) -> list[float]:
    fn()
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(LOOP):
            fn()
        out.append((time.perf_counter() - t0) / LOOP)
    return sorted(out)


def med(ts) -> float:
    return ts[len(ts) // 2]


def fwd_bwd(w: BSRWeight, wd: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, repeats: int):
    """Times of the BSR and the dense forward + backward (the weight's gradient on every block)."""
    (out, inn), (r, c) = w.shape, w.block

    def bsr():
        ops.bsr_spmm(x, w.crow, w.col, w.values, out)
        ops.bsr_spmm_t(dy, w.crow, w.col, w.values, inn)
        ops.bsr_sddmm(dy, x, w.crow, w.col, r, c)

    def dense():
        F.linear(x, wd)
        dy @ wd
        dy.T @ x

    return times(bsr, repeats), times(dense, repeats)


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


def weight_bytes(w: BSRWeight) -> tuple[int, int]:
    """Bytes of w with bf16 values (what BSRWeight.nbytes counts), and of the block-column index
    bsr_spmm_t builds per call on the CPU (cpp/cpu/bsr_spmm_t_kernel.h: int32 offsets per block
    column; per block an int16 block row, int32 beyond 32767 block rows, and an int32 slot)."""
    nbr, nbc, nb = w.crow.numel() - 1, -(-w.shape[1] // w.values.shape[2]), w.nnz_blocks
    index = 4 * (nbc + 1) + (2 if nbr <= 32767 else 4) * nb + 4 * nb
    return w.to(dtype=torch.bfloat16).nbytes(), index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sparsity", type=float, default=0.7, help="fraction of blocks dropped")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--blocks", default=",".join(f"{r}x{c}" for r, c in BLOCKS), help="e.g. 8x8,16x16")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="e.g. 512,16")
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, e.g. 1536x576")
    ap.add_argument("--no-backward", action="store_true", help="time the forward only")
    ap.add_argument("--loop", type=int, default=1, help="calls timed back to back per repeat (short calls: 100s)")
    ap.add_argument("--isa", default="auto", help="CPU kernel set (seft_ext.ops.cpu_isa): auto, avx512, avx2, base")
    args = ap.parse_args()
    global LOOP
    LOOP = max(1, args.loop)
    ops.cpu_isa(args.isa)
    blocks = [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"threads {torch.get_num_threads()}, cpu_isa {ops.cpu_isa()}, dtype {args.dtype}, block sparsity "
          f"{args.sparsity}, repeats {args.repeats} x {LOOP} calls, loadavg {os.getloadavg()}")
    print("times in ms: min / median / max")
    print(f"{'shape':>10} {'block':>6} {'T':>4} | {'bsr_spmm':>27} | {'F.linear':>27} | {'ratio':>5} | "
          f"{'torch BSR':>27} | {'ratio':>5}")
    torch.manual_seed(0)
    rows, sizes = [], []
    for out, inn in shapes:
        for r, c in blocks:
            dense = torch.randn(out, inn)
            bmask = torch.rand(-(-out // r), -(-inn // c)) >= args.sparsity
            w = BSRWeight.from_dense(dense, (r, c), bmask, dtype=dtype)
            wd = w.to_dense()
            sizes.append(((out, inn), (r, c), weight_bytes(w)))
            for T in tokens:
                x = torch.randn(T, inn).to(dtype)
                dy = torch.randn(T, out).to(dtype)
                with torch.no_grad():
                    ts = times(lambda: ops.bsr_spmm(x, w.crow, w.col, w.values, out), args.repeats)
                    td = times(lambda: F.linear(x, wd), args.repeats)
                    fb = torch_bsr(w, x) if dtype == torch.float32 else None
                    tb = times(fb, args.repeats) if fb else None
                    if not args.no_backward:
                        rows.append(((out, inn), (r, c), T, fwd_bwd(w, wd, x, dy, args.repeats)))
                rt = f"{med(ts) / med(tb):5.2f}" if tb else "  n/a"
                print(f"{out:>4}x{inn:<5} {r:>2}x{c:<3} {T:>4} | {fmt(ts)} | {fmt(td)} | {med(ts) / med(td):5.2f} | "
                      f"{fmt(tb)} | {rt}", flush=True)
    if rows:
        print("forward + backward (bsr_spmm + bsr_spmm_t + bsr_sddmm | F.linear + dY W + dY^T X), ms")
        print(f"{'shape':>10} {'block':>6} {'T':>4} | {'BSR fwd+bwd':>27} | {'dense fwd+bwd':>27} | {'ratio':>5}")
        for (out, inn), (r, c), T, (ts, td) in rows:
            print(f"{out:>4}x{inn:<5} {r:>2}x{c:<3} {T:>4} | {fmt(ts)} | {fmt(td)} | {med(ts) / med(td):5.2f}")
    print("weight bytes with bf16 values over dense bf16: stored (values, block columns, block-row offsets) | "
          "with bsr_spmm_t's block-column index (built per call)")
    for (out, inn), (r, c), (stored, index) in sizes:
        dense_bytes = 2 * out * inn
        print(f"{out:>4}x{inn:<5} {r:>2}x{c:<3} | {stored / dense_bytes:6.3f} | {(stored + index) / dense_bytes:6.3f}")
    print(f"loadavg at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
