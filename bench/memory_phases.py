"""Peak RSS of each phase of a `seft run` job (Linux: VmHWM, reset through /proc/self/clear_refs).

    python bench/memory_phases.py [seft run options ...]

Runs the driver's phases one by one in this process (prepare = load the model and data,
prune = evaluate dense, prune, evaluate pruned, train, finish = the final evaluation, export)
and prints, for each, the RSS before it and its peak, in MiB, then the training phase's peak
above the RSS of the loaded model (after prepare). Example, the default job shortened:
``python bench/memory_phases.py --steps 4 --task-items 10 --eval-windows 8 --threads 2``.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path



def status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> dict:
    import torch

    from seft_ext import pipeline
    from seft_ext.cli import parser

    out = tempfile.mkdtemp(prefix="seft_mem_")
    a = parser().parse_args(["run", "--out", out, "--no-progress", *argv])
    if a.threads:
        torch.set_num_threads(a.threads)
    pipeline.check_options(a)
    rows, job = [], None
    can_reset = True

    def phase(name, fn):
        nonlocal can_reset
        gc.collect()
        before = status("VmRSS")
        can_reset = reset_peak() and can_reset
        t0 = time.time()
        res = fn()
        rows.append({"phase": name, "rss_before_mib": before / 2**20, "peak_mib": status("VmHWM") / 2**20,
                     "seconds": time.time() - t0})
        return res

    job = phase("prepare (load)", lambda: pipeline.prepare(a))
    loaded = status("VmRSS")
    phase("prune (+ 2 evaluations)", lambda: pipeline.prune(job))
    if job.trains:
        phase("train", lambda: pipeline.train(job))
    phase("finish (evaluation)", lambda: pipeline.finish(job))
    phase("export", lambda: pipeline.export(job))
    train = next((r for r in rows if r["phase"] == "train"), None)
    res = {"args": argv, "rows": rows, "loaded_mib": loaded / 2**20, "peak_rss_mib": status("VmHWM") / 2**20,
           "whole_run_peak_mib": max(r["peak_mib"] for r in rows),
           "train_above_loaded_mib": None if train is None else train["peak_mib"] - loaded / 2**20,
           "peak_resets": can_reset, "loadavg": os.getloadavg()}
    for r in rows:
        print(f"{r['phase']:<26} before {r['rss_before_mib']:7.0f} MiB  peak {r['peak_mib']:7.0f} MiB  "
              f"{r['seconds']:6.1f} s")
    print(f"loaded model {res['loaded_mib']:.0f} MiB; whole run peak {res['whole_run_peak_mib']:.0f} MiB; training "
          f"peak above the loaded model {res['train_above_loaded_mib'] or 0:.0f} MiB"
          + ("" if can_reset else " (peaks could not be reset: each is the run's peak so far)"))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    from seft_ext._memory import cpu_cache_on

    with cpu_cache_on():  # as the driver's run_job
        main(sys.argv[1:])
