"""What does one real evolution step cost the model, and how fast is it paid back?

For each variant, from the same pruned model and the same batches: convert with the engine,
train to the first evolution step, measure the held-out loss just before and just after it
(the step itself: dropped deltas revert, re-activated entries start at 0, adapt prunes base
weights), then again `--after` steps later.

    python bench/evolution_cost.py --model p70/dense --sparsity 0.7

Variants: spiel (no re-activation), seft with a row budget, seft with a layer budget.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a pruned HF folder (zeros = pruned positions)")
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--variants", nargs="+", default=["spiel:row", "seft:row", "seft:layer"])
    ap.add_argument("--steps", type=int, default=40, help="total_steps of the schedule")
    ap.add_argument("--after", type=int, default=9, help="steps trained after the evolution step")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seft_ext import SEFTConfig, SEFTController
    from seft_ext.convert import convert_to_seft
    from seft_ext.data import load_text, perplexity, token_windows
    from seft_ext.prune_llm import existing_masks

    tok = AutoTokenizer.from_pretrained(a.model)
    train_text, heldout = load_text("default")
    train = token_windows(tok, train_text, a.seq_len)
    held = token_windows(tok, heldout, a.seq_len)[:a.eval_windows]

    def heldout_loss(model) -> float:  # log of the driver's held-out perplexity
        return math.log(perplexity(model, held, a.batch_size))

    results = []
    for variant in a.variants:
        method, budget = variant.split(":")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        cfg = SEFTConfig(sparsity=a.sparsity, budget=budget, method=method, seed=0)
        convert_to_seft(model, cfg, masks=existing_masks(model))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
        ctl = SEFTController(model, opt, cfg, a.steps)
        g = torch.Generator().manual_seed(0)
        row = {"variant": variant}
        step = 0

        def train_step():
            nonlocal step
            step += 1
            idx = torch.randint(0, train.shape[0], (a.batch_size,), generator=g)
            model.train()
            model(input_ids=train[idx], labels=train[idx], use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ctl.is_evolution_step(step):
                model.eval()
                row["before"] = heldout_loss(model)
            report = ctl.step()
            if report:
                model.eval()
                row["after"] = heldout_loss(model)
                row["counts"] = {k: sum(r.get(k, 0) for r in report.values())
                                 for k in ("dropped", "grown", "reactivated", "pruned", "undropped")}
                row["step"] = step

        while "after" not in row:
            train_step()
        for _ in range(a.after):
            train_step()
        model.eval()
        row["later"] = heldout_loss(model)
        row["later_step"] = step
        results.append(row)
        print(f"{variant:12s} step {row['step']}: held-out loss {row['before']:.4f} -> {row['after']:.4f} "
              f"({row['after'] - row['before']:+.4f}); step {step}: {row['later']:.4f} "
              f"(ppl {math.exp(row['later']):.2f}); {row['counts']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
