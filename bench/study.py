"""The study: does SEFT repair a Wanda-pruned SmolLM2-135M better than what users pick instead?

    python bench/study.py --setting task --sparsities 0.5 --seeds 0 1 2 --out /tmp/study \
        --methods seft lora spiel fixed --lrs seft=2e-4,6e-4,2e-3 lora=3e-4,1e-3,3e-3 \
        spiel=6e-4,2e-3 fixed=6e-4,2e-3

Per sparsity the model is pruned once (`seft prune`, Wanda, calibration seed 0); every method
then trains that pruned model with `seft train` (seeds vary the data order, the initial delta
positions and the scan's sketch). Each method's learning rate is chosen on the validation part
(`--val-items`: WordNet training items, or training windows of the text) on the first seed:
the best validation accuracy (task), then the lowest validation loss; the other seeds run at
that rate. masked-dense (the same algorithm as
seft with dense compute) runs once, at seft's rate. LoRA is reported twice: merged then
re-masked to the pruning mask (sparse, what is exported) and unmerged (a dense adapter beside
the sparse base). Each run's summary.json and log.jsonl are kept in --keep (committed), and a
run kept there is not run again: an interrupted study continues where it stopped, and
--report-only rebuilds the report from them. Writes --md (every run, then mean +- std over seeds per method)
and a PNG beside it (loss curves of the first seed, and the main metric per method).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

METHODS = ["fixed", "spiel", "seft", "lora"]
SETTINGS = {  # --data and the options that differ between the two settings
    "task": ["--data", "wordnet", "--seq-len", "128", "--batch-size", "8"],
    "general": ["--data", "general", "--seq-len", "256", "--batch-size", "4"],
}
VAL = {"task": 200, "general": 16}  # validation items (WordNet) or windows (text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=list(SETTINGS), required=True)
    ap.add_argument("--sparsities", nargs="+", default=["0.5"], help="0.5, 0.7, ... or 2:4")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--once", nargs="*", default=["masked-dense"], help="methods run for the first seed only, "
                    "at seft's learning rate")
    ap.add_argument("--lrs", nargs="*", default=[], metavar="METHOD=LR,LR",
                    help="learning rates swept on the first seed (a method not named: --lr)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--task-items", type=int, default=500, help="held-out WordNet items scored")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder of the run folders (models, checkpoints: large)")
    ap.add_argument("--keep", default="bench/results/study_runs",
                    help="where each run's summary.json and log.jsonl are kept (small; a run kept there is "
                         "not run again)")
    ap.add_argument("--report-only", action="store_true", help="report the kept runs, run nothing")
    ap.add_argument("--md", default=None, help="default bench/results/study_SETTING.md")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args()
    grid = {m: [args.lr] for m in args.methods + args.once}
    for spec in args.lrs:
        m, _, lrs = spec.partition("=")
        if m not in grid or not lrs:
            ap.error(f"--lrs {spec}: expected METHOD=LR,LR with METHOD among {sorted(grid)}")
        grid[m] = [float(x) for x in lrs.split(",")]
    study = Study(args, grid)
    rows = [r for s in args.sparsities for r in study.sparsity(s)]
    if args.dry_run or not rows:
        return 0
    md = Path(args.md or f"bench/results/study_{args.setting}.md")
    md.write_text("\n".join(report(args, rows)) + "\n")
    plot(rows, md.with_suffix(".png"), args.setting)
    print(md.read_text())
    return 0


class Study:
    def __init__(self, args, grid: dict):
        self.a, self.grid, self.out, self.keep = args, grid, Path(args.out).resolve(), Path(args.keep)

    def common(self) -> list[str]:
        a = self.a
        return [*SETTINGS[a.setting], "--task-items", str(a.task_items), "--eval-windows", str(a.eval_windows),
                "--val-items", str(VAL[a.setting]), "--threads", str(a.threads), "--no-progress"]

    def pruned(self, s: str) -> tuple[str, dict]:
        """The sparsity's tag and its pruned model's run (pruned once, Wanda, calibration seed 0):
        the dense and pruned models' metrics."""
        tag = s.replace(":", "of") if ":" in s else f"s{round(float(s) * 100)}"
        self.pattern = ["--pattern", s] if ":" in s else []
        self.prune_args = ["prune", *(self.pattern or ["--sparsity", s]), "--seed", "0"]
        self.pruned_name = f"{self.a.setting}_{tag}_pruned"
        before = self.run(self.prune_args, self.pruned_name)
        return tag, {f"{k}_{stage}": before.get(f"{k}_{stage}") for k, _, _ in COLUMNS for stage in ("dense", "pruned")}

    def sparsity(self, s: str) -> list[dict]:
        """The pruned model, the sweep on the first seed, then the other seeds at the chosen rates."""
        tag, before = self.pruned(s)
        rows, chosen = [], {}
        first, rest = self.a.seeds[0], self.a.seeds[1:]
        for m in self.a.methods:
            sweep = [self.train(tag, m, lr, first) for lr in self.grid[m]]
            done = [r for r in sweep if r]
            if done:
                best = min(done, key=self.selection_key)
                chosen[m] = best["lr"]
                rows += [dict(r, chosen=r is best) for r in done]
        for m in self.a.once:
            if "seft" in chosen or "seft" not in self.a.methods:
                rows.append(dict(self.train(tag, m, chosen.get("seft", self.grid[m][0]), first), chosen=True))
        for seed in rest:
            rows += [dict(self.train(tag, m, chosen[m], seed), chosen=True) for m in self.a.methods if m in chosen]
        return [dict(r, **before) for r in rows if "method" in r]

    def selection_key(self, r: dict) -> tuple:
        """The learning rate's choice: the best validation accuracy (task), then validation loss."""
        acc = r.get("acc_val_final") if self.a.setting == "task" else None
        return (-(acc or 0.0), r.get("val_loss_final") or float("inf"))

    def train(self, tag: str, method: str, lr: float, seed: int, variant: str = "", extra: tuple = ()) -> dict:
        """One `seft train` of the pruned model; a variant (an ablation) adds its options to the run
        and its name to the run's folder."""
        name = f"{self.a.setting}_{tag}_{method}_lr{lr:g}_seed{seed}" + (f"_{variant}" if variant else "")
        if not self.kept(name) and not self.a.report_only:
            self.ensure_pruned()
        args = ["train", "--model", str(self.out / self.pruned_name / "dense"), "--method", method, "--lr", f"{lr:g}",
                "--steps", str(self.a.steps), "--seed", str(seed), "--log-every", "5", "--no-eval-before",
                "--no-export", *self.pattern, *extra]
        return self.run(args, name)

    def kept(self, name: str) -> bool:
        """Whether the run NAME is kept (done before)."""
        return (self.keep / name / "summary.json").is_file()

    def ensure_pruned(self) -> None:
        """The pruned model's folder, made again when only its kept summary is here."""
        folder = self.out / self.pruned_name
        if not (folder / "dense" / "config.json").is_file() and not self.a.dry_run:
            self.run(self.prune_args + ["--overwrite"], self.pruned_name, force=True)

    def run(self, args: list[str], name: str, force: bool = False) -> dict:
        """A `seft` command in --out/NAME; its summary.json and log.jsonl are kept in --keep/NAME,
        where a later study finds them instead of running it again."""
        kept = self.keep / name
        if (kept / "failed.txt").is_file() and not force:
            return {}
        if force or not (kept / "summary.json").is_file():
            if self.a.report_only:
                return {}
            out = self.out / name
            cmd = [sys.executable, "-m", "seft_ext.cli", *args, "--out", str(out), *self.common()]
            print(" ".join(cmd), flush=True)
            if self.a.dry_run:
                return {}
            kept.mkdir(parents=True, exist_ok=True)
            if subprocess.run(cmd).returncode != 0:  # e.g. a learning rate that diverges: kept as failed
                (kept / "failed.txt").write_text(" ".join(cmd[1:]).replace(str(self.out), "OUT") + "\n")
                return {}
            for f in ("summary.json", "log.jsonl"):  # with --out's path left out
                if (out / f).is_file():
                    (kept / f).write_text((out / f).read_text().replace(f'"{self.out}/', '"OUT/'))
        r = json.loads((kept / "summary.json").read_text())
        log = kept / "log.jsonl"
        r["curve"] = [json.loads(ln) for ln in log.read_text().splitlines()] if log.is_file() else []
        r["run"] = name
        return r


def _sparsity_name(r: dict) -> str:
    return r["pattern"] if ":" in str(r.get("pattern")) else f"{r['sparsity_target']:.0%}"


def _variants(r: dict) -> list[tuple[str, str]]:
    """(label, summary stage) of a run: LoRA gives its merged+re-masked and unmerged models."""
    if r["method"] == "lora":
        return [("lora (merged, re-masked)", "final"), ("lora (unmerged)", "final_unmerged")]
    return [(r["method"], "final")]


def _fmt(v, pct=False) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.1%}" if pct else f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def _mean_std(vals: list, pct=False) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return _fmt(vals[0], pct)
    mu, sd = statistics.mean(vals), statistics.stdev(vals)
    if all(isinstance(v, int) for v in vals):  # counts
        return f"{mu:.0f} +- {sd:.0f}"
    if pct:
        return f"{mu:.1%} +- {sd:.1%}"
    return f"{mu:.0f} +- {sd:.0f}" if abs(mu) >= 1000 else f"{mu:.2f} +- {sd:.2f}"


COLUMNS = [("ppl", "held-out ppl", False), ("ppl_other", "other-domain ppl", False), ("acc", "WordNet acc", True),
           ("acc_val", "val acc", True), ("val_loss", "val loss", False)]


def report(args, rows: list[dict]) -> list[str]:
    r0 = rows[0]
    lines = [f"# Study: {args.setting} setting ({datetime.date.today().isoformat()})", "",
             f"- machine: {_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
             f"- command: `python {' '.join(a for a in sys.argv if a != '--report-only')}`"
             + (" (this report: with --report-only, from the kept runs)" if args.report_only else ""),
             f"- SmolLM2-135M-Instruct pruned by Wanda (calibration seed 0), then `seft train` per method: "
             f"--data {r0['data']}, {args.steps} steps of {r0['batch_size']} x {r0['seq_len']} tokens "
             f"(task items: up to), validation part {VAL[args.setting]} "
             f"{'items' if args.setting == 'task' else 'windows'} taken out of training; other domain: "
             f"{r0.get('other_data')}; WordNet accuracy on {args.task_items} held-out items", "",
             "## Every run", "",
             "| sparsity | method | lr | seed | " + " | ".join(c[1] for c in COLUMNS)
             + " | re-activated | adapt-pruned | train s |",
             "|---|---|---|---|" + "---|" * (len(COLUMNS) + 3)]
    for s in dict.fromkeys(_sparsity_name(r) for r in rows):
        at = [r for r in rows if _sparsity_name(r) == s]
        for label, stage in (("dense", "dense"), ("none (pruned)", "pruned")):
            lines.append(f"| {s} | {label} | - | - | "
                         + " | ".join(_fmt(at[0].get(f"{k}_{stage}"), pct) for k, _, pct in COLUMNS)
                         + " | - | - | - |")
        for r in at:
            for label, stage in _variants(r):
                swept = len({x["lr"] for x in at if x["method"] == r["method"]}) > 1
                mark = " (chosen)" if r["chosen"] and swept else ""
                lines.append(f"| {s} | {label} | {r['lr']:g}{mark} | {r['seed']} | "
                             + " | ".join(_fmt(r.get(f"{k}_{stage}"), pct) for k, _, pct in COLUMNS)
                             + f" | {r.get('reactivated', '-')} | {r.get('adapt_pruned', '-')} | "
                             f"{r['train_seconds']:.0f} |")
    lines += ["", "## Mean +- std over seeds (chosen learning rates)", "",
              "| sparsity | method | lr | seeds | " + " | ".join(c[1] for c in COLUMNS) + " | re-activated |",
              "|---|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for s in dict.fromkeys(_sparsity_name(r) for r in rows):
        at = [r for r in rows if _sparsity_name(r) == s and r["chosen"]]
        for label, stage in (("dense", "dense"), ("none (pruned)", "pruned")):
            lines.append(f"| {s} | {label} | - | - | "
                         + " | ".join(_fmt(at[0].get(f"{k}_{stage}"), pct) for k, _, pct in COLUMNS) + " | - |")
        for m in dict.fromkeys(r["method"] for r in at):
            runs = [r for r in at if r["method"] == m]
            for label, stage in _variants(runs[0]):
                lines.append(f"| {s} | {label} | {runs[0]['lr']:g} | {len(runs)} | "
                             + " | ".join(_mean_std([r.get(f"{k}_{stage}") for r in runs], pct)
                                          for k, _, pct in COLUMNS)
                             + f" | {_mean_std([r.get('reactivated') for r in runs])} |")
    return lines


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def plot(rows: list[dict], path: Path, setting: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    names = list(dict.fromkeys(_sparsity_name(r) for r in rows))
    key, ylabel = ("acc", "WordNet accuracy (held-out)") if setting == "task" else ("ppl", "held-out perplexity")
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.4 * len(names)), squeeze=False)
    for (ax_loss, ax_bar), s in zip(axes, names):
        at = [r for r in rows if _sparsity_name(r) == s and r["chosen"]]
        first = min(r["seed"] for r in at)
        for r in at:
            if r["seed"] == first and r["curve"]:
                losses = [c["loss"] for c in r["curve"]]
                smooth = [statistics.mean(losses[max(0, i - 4):i + 1]) for i in range(len(losses))]
                ax_loss.plot([c["step"] for c in r["curve"]], smooth, label=r["method"])
        ax_loss.set_title(f"{s}: training loss, mean of the last 5 logged steps (seed {first}, chosen lr)",
                          fontsize=9)
        ax_loss.set_xlabel("step")
        ax_loss.legend(fontsize=8)
        bars = [("dense", [at[0].get(f"{key}_dense")]), ("pruned", [at[0].get(f"{key}_pruned")])]
        for m in dict.fromkeys(r["method"] for r in at):
            runs = [r for r in at if r["method"] == m]
            bars += [(label, [r.get(f"{key}_{stage}") for r in runs]) for label, stage in _variants(runs[0])]
        bars = [(label, [v for v in vals if v is not None]) for label, vals in bars]
        bars = [(label, vals) for label, vals in bars if vals]
        means = [statistics.mean(v) for _, v in bars]
        sds = [statistics.stdev(v) if len(v) > 1 else 0 for _, v in bars]
        ax_bar.bar(range(len(bars)), means, yerr=sds, capsize=3)
        labels = [b[0].replace(" (merged, ", "\n(").replace(" (", "\n(") for b in bars]
        ax_bar.set_xticks(range(len(bars)), labels, fontsize=7)
        ax_bar.set_title(f"{s}: {ylabel}, mean +- std over seeds", fontsize=9)
        if key == "ppl":
            ax_bar.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
