"""When does re-activation pay? Ablations of SEFT on the study's task setting, and the ceiling.

    python bench/ablate.py --out /tmp/study --keep bench/results/study_runs \
        --md bench/results/ablation_task.md

The Wanda 50% model of bench/study.py (the same folders: run the study first, or this prunes it
again), seed 0, each method at the learning rate the study chose for it (--lrs). Each ablation
changes one knob of `seft train` against the study's seed-0 run: the drop fraction, the update
interval, the AdamW moments of grown slots (seeded or zero), and longer runs; `spiel` (no
re-activation) runs beside seft where the knob applies to both. The ceiling: PEFT LoRA on the
dense model (`--sparsity 0`), same items and steps. Runs are kept in --keep like the study's (a
kept run is not run again); --report-only rebuilds the report. 2:4, where spiel cannot change
the pattern and seft can, is part of the study itself (`bench/study.py --sparsities 2:4`).
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from study import COLUMNS, Study, _cpu_name, _fmt, _mean_std, _variants

CHOSEN = {"seft": 1e-3, "spiel": 6e-4, "lora": 1e-3}  # study_task.md, 50%, chosen on validation
ABLATIONS = [  # (variant, what it changes, methods, extra `seft train` options[, learning rate])
    ("spiel-lr1e-3", "spiel at seft's chosen rate", ["spiel"], [], 1e-3),
    ("drop0.05", "drop fraction 0.05 (default 0.2)", ["seft"], ["--drop-fraction", "0.05"]),
    ("drop0.5", "drop fraction 0.5", ["seft"], ["--drop-fraction", "0.5"]),
    ("interval5", "update interval 5 steps (default 10)", ["seft"], ["--update-interval", "5"]),
    ("interval30", "update interval 30 steps", ["seft"], ["--update-interval", "30"]),
    ("zero-moments", "AdamW moments of grown slots zero (default: seeded from the window)", ["seft"],
     ["--no-seed-optimizer"]),
    ("steps360", "360 steps (3x)", ["seft", "spiel"], ["--steps", "360"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", nargs="*", default=[], metavar="METHOD=LR",
                    help="learning rates (default: " + ", ".join(f"{m}={v:g}" for m, v in CHOSEN.items()) + ")")
    ap.add_argument("--only", nargs="*", default=None, help="run these variants only (and 'ceiling')")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--task-items", type=int, default=500)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder of the run folders (models, checkpoints: large)")
    ap.add_argument("--keep", default="bench/results/study_runs")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--md", default="bench/results/ablation_task.md")
    args = ap.parse_args()
    lrs = dict(CHOSEN)
    for spec in args.lrs:
        m, _, lr = spec.partition("=")
        if m not in lrs or not lr:
            ap.error(f"--lrs {spec}: expected METHOD=LR with METHOD among {sorted(lrs)}")
        lrs[m] = float(lr)
    known = {v for v, *_ in ABLATIONS} | {"ceiling"}
    if args.only is not None and not set(args.only) <= known:
        ap.error(f"--only: unknown {sorted(set(args.only) - known)}; choose among {sorted(known)}")
    args.setting, args.seeds = "task", [0]
    study = Study(args, {})
    tag, before = study.pruned("0.5")
    rows = [dict(r, variant="-", change="(the study's run)") for m in ("seft", "spiel")
            if (r := study.train(tag, m, lrs[m], 0))]
    for seed in (1, 2):  # the study's other seeds where kept: the seeds' spread, for scale
        rows += [dict(r, variant="-", change="(the study's run)") for m in ("seft", "spiel")
                 if study.kept(f"task_{tag}_{m}_lr{lrs[m]:g}_seed{seed}") and (r := study.train(tag, m, lrs[m], seed))]
    for variant, change, methods, extra, *lr in ABLATIONS:
        if args.only is None or variant in args.only:  # a rate's variant is named by its rate alone
            rows += [dict(r, variant=variant, change=change) for m in methods
                     if (r := study.train(tag, m, lr[0] if lr else lrs[m], 0, "" if lr else variant, extra))]
    if args.only is None or "ceiling" in args.only:
        rows += [dict(r, variant="ceiling", change="LoRA on the dense model") for r in [ceiling(study, lrs["lora"])]
                 if r]
    if args.dry_run or not rows:
        return 0
    md = Path(args.md)
    md.write_text("\n".join(report(args, rows, before)) + "\n")
    print(md.read_text())
    return 0


def ceiling(study: Study, lr: float) -> dict:
    """PEFT LoRA on the dense model (magnitude pruning at sparsity 0 keeps every weight)."""
    a = study.a
    args = ["train", "--model", "default", "--prune", "magnitude", "--sparsity", "0", "--method", "lora",
            "--lr", f"{lr:g}", "--steps", str(a.steps), "--seed", "0", "--log-every", "5", "--no-eval-before",
            "--no-export"]
    return study.run(args, f"task_dense_lora_lr{lr:g}_seed0")


def report(args, rows: list[dict], before: dict) -> list[str]:
    lines = [f"# Ablations: task setting, Wanda 50% (updated {datetime.date.today().isoformat()})", "",
             f"- machine: {_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
             f"- command: `python {' '.join(a for a in sys.argv if a != '--report-only')}`",
             "- SmolLM2-135M-Instruct, the study's pruned model and options (bench/results/study_task.md): "
             f"--data wordnet, {args.steps} steps of 8 items (unless the ablation changes it), seed 0, "
             "WordNet accuracy on 500 held-out items, other domain: the general text", "",
             "| ablation | method | lr | seed | " + " | ".join(c[1] for c in COLUMNS)
             + " | re-activated | adapt-pruned | train s |",
             "|---|---|---|---|" + "---|" * (len(COLUMNS) + 3),
             "| - | dense (no training) | - | - | " + " | ".join(_fmt(before.get(f"{k}_dense"), p)
                                                           for k, _, p in COLUMNS) + " | - | - | - |",
             "| - | none (pruned) | - | - | " + " | ".join(_fmt(before.get(f"{k}_pruned"), p)
                                                      for k, _, p in COLUMNS) + " | - | - | - |"]
    for r in rows:
        for label, stage in _variants(r):
            lines.append(f"| {r['change']} | {label} | {r['lr']:g} | {r['seed']} | "
                         + " | ".join(_fmt(r.get(f"{k}_{stage}"), p) for k, _, p in COLUMNS)
                         + f" | {r.get('reactivated', '-')} | {r.get('adapt_pruned', '-')} | "
                         f"{r['train_seconds']:.0f} |")
    spread = ["", "The seeds' spread of the study's runs (mean +- std), for the scale of a difference:", ""]
    for m in ("seft", "spiel"):
        runs = [r for r in rows if r["variant"] == "-" and r["method"] == m]
        if len(runs) > 1:
            spread.append(f"- {m}, {len(runs)} seeds: WordNet acc "
                          + _mean_std([r.get("acc_final") for r in runs], True)
                          + ", held-out ppl " + _mean_std([r.get("ppl_final") for r in runs])
                          + ", other-domain ppl " + _mean_std([r.get("ppl_other_final") for r in runs]))
    return lines + (spread if len(spread) > 3 else [])


if __name__ == "__main__":
    sys.exit(main())
