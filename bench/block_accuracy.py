"""The price of structure: SmolLM2-135M-Instruct pruned to the same sparsity unstructured and in
r x c blocks, perplexity and WordNet accuracy pruned and after the same SEFT repair.

    python bench/block_accuracy.py --patterns row block:4x4 block:8x8 block:16x16 \
        --prune wanda --sparsity 0.5 --steps 60 --out /tmp/block_runs

Each pattern is one `seft run --pattern P` with the driver's defaults otherwise (same data,
steps, seed and trainable budget; with blocks the delta and the evolution work on whole blocks);
an existing run folder is reused. `--prune-only M ...` adds `seft prune` runs (no training)
with other pruning methods, for the pruned column. Writes a markdown table (and a PNG beside
it when matplotlib is installed). The step time of each pattern: bench/bench_step.py --patterns.
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


def run_folder(out: Path, command: str, prune: str, pattern: str, args) -> dict:
    """The summary of one run, running it first unless its folder has one."""
    folder = out / f"{command}_{prune}_{pattern.replace(':', '_')}_s{int(args.sparsity * 100)}"
    if not (folder / "summary.json").is_file():
        cmd = [sys.executable, "-m", "seft_ext.cli", command, "--prune", prune, "--pattern", pattern,
               "--sparsity", str(args.sparsity), "--seed", str(args.seed), "--threads", str(args.threads),
               "--eval-windows", str(args.eval_windows), "--task-items", str(args.task_items),
               "--no-progress", "--out", str(folder)]
        if command == "run":
            cmd += ["--steps", str(args.steps), "--no-export"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((folder / "summary.json").read_text())


def table(rows: list[tuple[str, str, dict]], args) -> list[str]:
    lines = [f"# The price of structure: blocks against unstructured ({datetime.date.today().isoformat()})", "",
             f"- machine: {platform.machine()} ({args.threads} threads), torch {torch.__version__}; "
             f"command: `python {' '.join(sys.argv)}`",
             f"- SmolLM2-135M-Instruct, {args.sparsity:.0%} sparsity; `row` is unstructured with a per-row "
             "count, `block:RxC` prunes whole blocks (counted per block row); SEFT: the driver's defaults "
             f"({args.steps} steps of 4 x 256 tokens of the King James text, lr 2e-4, the same trainable "
             "budget in entries), seed " + str(args.seed),
             f"- perplexity on {args.eval_windows} held-out windows of 256 tokens; accuracy on "
             f"{args.task_items} held-out WordNet items (4 options)", "",
             "| pruning | pattern | ppl dense | ppl pruned | ppl after SEFT | acc dense | acc pruned | acc after SEFT "
             "| train s |", "|---|---|---|---|---|---|---|---|---|"]
    for prune, pattern, r in rows:
        trained = r.get("method") not in (None, "none") and r.get("steps", 0) and "ppl_final" in r
        after = f"{r['ppl_final']:.2f}" if trained else "-"
        acc_after = f"{(r.get('acc_final') or 0):.1%}" if trained else "-"
        secs = f"{r['train_seconds']:.0f}" if trained else "-"
        lines.append(f"| {prune} | {pattern} | {r['ppl_dense']:.2f} | {r['ppl_pruned']:.2f} | {after} | "
                     f"{(r.get('acc_dense') or 0):.1%} | {(r.get('acc_pruned') or 0):.1%} | {acc_after} | {secs} |")
    return lines


def plot(rows: list[tuple[str, str, dict]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    by_prune: dict[str, list] = {}
    for prune, pattern, r in rows:
        by_prune.setdefault(prune, []).append((pattern, r))
    for prune, items in by_prune.items():
        xs = [p for p, _ in items]
        ax.plot(xs, [r["ppl_pruned"] for _, r in items], "x--", label=f"{prune}, pruned")
        trained = [(p, r) for p, r in items if "ppl_final" in r and r.get("steps")]
        if trained:
            ax.plot([p for p, _ in trained], [r["ppl_final"] for _, r in trained], "o-", label=f"{prune}, after SEFT")
    ax.axhline(rows[0][2]["ppl_dense"], color="grey", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("pattern")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", nargs="+", default=["row", "block:4x4", "block:8x8", "block:16x16"])
    ap.add_argument("--prune", default="wanda")
    ap.add_argument("--prune-only", nargs="*", default=[], help="more pruning methods, pruned only (seft prune)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--task-items", type=int, default=100)
    ap.add_argument("--out", default="bench/results/block_runs")
    ap.add_argument("--md", default="bench/results/block_accuracy.md")
    args = ap.parse_args()
    out = Path(args.out)
    rows = [(args.prune, p, run_folder(out, "run", args.prune, p, args)) for p in args.patterns]
    rows += [(m, p, run_folder(out, "prune", m, p, args)) for m in args.prune_only for p in args.patterns]
    lines = table(rows, args)
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, Path(args.md).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
