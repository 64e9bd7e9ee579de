"""csr_spmm against dense F.linear at 1 and 2 threads, on a busy machine: how each degrades.

    python bench/bench_threads.py [--reps 5]

One SmolLM2 layer shape (1536 x 576, 50% per row) at 1024 tokens (a 4 x 256 training step),
fp32; min / median / max seconds of ``--reps`` calls after one warm-up, per thread count, and
the load average. On an idle machine 2 threads should take about half the time of 1; where
other processes hold the cores, every parallel region waits for its slowest thread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch



def main() -> None:
    from seft_ext import ops
    from seft_ext.prune import magnitude_mask
    from seft_ext.sparse import CSRWeight

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=g)
    c = CSRWeight.from_dense(w, magnitude_mask(w, 0.5, "row"))
    x = torch.randn(1024, 576, generator=g)
    fns = {"csr_spmm": lambda: ops.csr_spmm(x, c.crow, c.col, c.values),
           "F.linear": lambda: torch.nn.functional.linear(x, w)}
    print(f"load average {os.getloadavg()}, torch {torch.__version__}")
    for th in (1, 2):
        torch.set_num_threads(th)
        for name, f in fns.items():
            f()
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            print(f"{th} thread(s) {name:9s} s: {min(ts):.4f} / {statistics.median(ts):.4f} / {max(ts):.4f}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
