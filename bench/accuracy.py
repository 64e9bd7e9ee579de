"""The accuracy study: SmolLM2-135M-Instruct pruned by Wanda, repaired by each method under
the same steps, data, seed and trainable budget; held-out perplexity and WordNet accuracy.

    python bench/accuracy.py --sparsities 0.5 0.7 --steps 40 --seeds 0 1 --once masked-dense \
        --eval-windows 16 --task-items 100 --out /tmp/acc_runs

Each (sparsity, seed, method) is one `seft run` with the driver's defaults (its folder keeps
summary.json and log.jsonl; an existing folder is reused); `none` is the pruned model before
training (read from the runs of that sparsity and seed). Methods named by --once run for
the first seed only. Writes bench/results/accuracy.md: every run, then the mean and range
over seeds per method (and accuracy.png when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

METHODS = ["fixed", "spiel", "seft", "masked-dense"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--once", nargs="*", default=[], help="methods to run for the first seed only")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--task-items", type=int, default=100)
    ap.add_argument("--out", default="bench/results/accuracy_runs")
    ap.add_argument("--md", default="bench/results/accuracy.md")
    args = ap.parse_args()
    rows = []
    for s in args.sparsities:
        for seed in args.seeds:
            for m in args.methods:
                if m in args.once and seed != args.seeds[0]:
                    continue
                out = Path(args.out) / f"s{int(s * 100)}_{m.replace(':', '_')}_seed{seed}"
                if not (out / "summary.json").is_file():
                    method, _, budget = m.partition(":")  # e.g. seft:row = --method seft --budget row
                    cmd = [sys.executable, "-m", "seft_ext.cli", "run", "--sparsity", str(s), "--method", method,
                           *(["--budget", budget] if budget else []),
                           "--steps", str(args.steps), "--seed", str(seed), "--eval-windows", str(args.eval_windows),
                           "--task-items", str(args.task_items), "--no-export", "--no-progress", "--out", str(out)]
                    print(" ".join(cmd), flush=True)
                    subprocess.run(cmd, check=True)
                r = json.loads((out / "summary.json").read_text())
                r["method"] = m
                rows.append(r)
    lines = [f"# Accuracy study ({datetime.date.today().isoformat()})", "",
             f"- machine: {platform.machine()}, torch {torch.__version__}; command: `python {' '.join(sys.argv)}`",
             f"- SmolLM2-135M-Instruct, Wanda per row, {args.steps} steps of 4 x 256 tokens, lr 2e-4, trainable "
             "budget k = 8 (in + out) per layer, evolution keeping each layer's count (the driver's default "
             "--budget layer), seeds " + ", ".join(map(str, args.seeds)),
             f"- perplexity on {args.eval_windows} held-out windows of 256 tokens (Ruth, Esther, Jonah); accuracy "
             f"on {args.task_items} held-out WordNet items (4 options)", "",
             "| sparsity | method | seed | perplexity | WordNet accuracy | train s | grown entries |",
             "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["sparsity_target"], r["seed"])
        if key not in seen:
            seen.add(key)
            lines.append(f"| {r['sparsity_target']:.0%} | dense | {r['seed']} | {r['ppl_dense']:.2f} | "
                         f"{(r['acc_dense'] or 0):.1%} | - | - |")
            lines.append(f"| {r['sparsity_target']:.0%} | none (pruned) | {r['seed']} | {r['ppl_pruned']:.2f} | "
                         f"{(r['acc_pruned'] or 0):.1%} | - | - |")
        lines.append(f"| {r['sparsity_target']:.0%} | {r['method']} | {r['seed']} | {r['ppl_final']:.2f} | "
                     f"{(r['acc_final'] or 0):.1%} | {r['train_seconds']:.0f} | {r['topology_changes']} |")
    lines += _means(rows, args.methods)
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, m in enumerate(["none"] + args.methods):
            key = "ppl_pruned" if m == "none" else "ppl_final"
            sel = [r for r in rows if m == "none" or r["method"] == m]
            xs = sorted({r["sparsity_target"] for r in sel})
            if not xs:
                continue
            vals = [[r[key] for r in sel if r["sparsity_target"] == x] for x in xs]
            mean = [sum(v) / len(v) for v in vals]
            err = [[mu - min(v) for mu, v in zip(mean, vals)], [max(v) - mu for mu, v in zip(mean, vals)]]
            ax.errorbar([x + (i - 2) * 0.004 for x in xs], mean, yerr=err, marker="x" if m == "none" else "o",
                        linestyle="--" if m == "none" else "-", capsize=3,
                        label={"none": "none (pruned)", "seft:row": "seft, row budget"}.get(m, m))
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (Wanda, per row)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("mean over seeds, bars: range", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(args.md).with_suffix(".png"), dpi=100)
    except ImportError:
        print("(matplotlib not installed: no plot)")
    return 0


def _means(rows: list[dict], methods: list[str]) -> list[str]:
    """Mean and range over seeds per (sparsity, method)."""
    out = ["", "Mean over seeds (range in brackets):", "",
           "| sparsity | method | seeds | perplexity | WordNet accuracy |", "|---|---|---|---|---|"]
    for s in sorted({r["sparsity_target"] for r in rows}):
        at = [r for r in rows if r["sparsity_target"] == s]
        pruned = {r["seed"]: (r["ppl_pruned"], r["acc_pruned"] or 0) for r in at}
        groups = [("none (pruned)", list(pruned.values()))]
        groups += [(m, [(r["ppl_final"], r["acc_final"] or 0) for r in at if r["method"] == m]) for m in methods]
        for name, vals in groups:
            if not vals:
                continue
            p = [v[0] for v in vals]
            a = [v[1] for v in vals]
            out.append(f"| {s:.0%} | {name} | {len(vals)} | {sum(p) / len(p):.2f} [{min(p):.2f}-{max(p):.2f}] | "
                       f"{sum(a) / len(a):.1%} [{min(a):.0%}-{max(a):.0%}] |")
    return out


if __name__ == "__main__":
    sys.exit(main())
