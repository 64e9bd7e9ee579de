"""How much does one SEFT adapt step cost, by pruning criterion? (a diagnostic, dense math)

Re-activating a pruned position costs one base weight of the same budget unit (row): the
grown entry starts at 0, the pruned base weight is gone at once. This script measures that
immediate cost on a pruned model, for several ways to choose the base weights to prune:

  taylor     |w * sum g|            (first order; the sum over the window can cancel)
  fisher     w^2 * sum g^2           (empirical Fisher diagonal: the second-order cost)
  wanda      |w| * ||x_j||           (the pruning score that made the model)
  magnitude  |w|
  random

It sums g, g^2 and ||x_j||^2 over `--window` training batches with plain dense backward
passes (a diagnostic: the product never holds these dense gradients), picks per layer the
`round(p * k)` inactive positions of largest |sum g| to grow (as SEFT does; k = 8 (in + out)),
prunes as many active weights in each of their rows by each criterion, and reports the
held-out loss before and after. The grown entries are 0, so only the pruning changes it.

    python bench/adapt_damage.py --model p70/dense --p 0.15
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a pruned HF folder (zeros = pruned positions)")
    ap.add_argument("--p", type=float, default=0.15, help="drop fraction at this evolution step")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--criteria", nargs="+", default=["taylor", "fisher", "wanda", "magnitude", "random"])
    ap.add_argument("--scope", choices=["row", "layer"], default="row",
                    help="row: each swap prunes in the grown position's row; layer: anywhere in the layer")
    ap.add_argument("--row-cap", type=float, default=0.0,
                    help="grow at most this fraction of a row's active count (0: no cap)")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seft_ext.data import load_text, perplexity, token_windows
    from seft_ext.prune_llm import decoder_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    train_text, heldout = load_text("default")
    train = token_windows(tok, train_text, a.seq_len)
    held = token_windows(tok, heldout, a.seq_len)[:a.eval_windows]
    lins = {n: m for n, m in decoder_layers(model).named_modules() if isinstance(m, torch.nn.Linear)}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lins.values():
        m.weight.requires_grad_(True)
    stats = {n: {"g": torch.zeros_like(m.weight), "g2": torch.zeros_like(m.weight),
                 "x2": torch.zeros(m.in_features)} for n, m in lins.items()}

    def hook(name):
        def f(mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            stats[name]["x2"] += (x * x).sum(0)
        return f

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in lins.items()]
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for _ in range(a.window):
        idx = torch.randint(0, train.shape[0], (a.batch_size,), generator=g)
        model(input_ids=train[idx], labels=train[idx], use_cache=False).loss.backward()
        for n, m in lins.items():
            stats[n]["g"] += m.weight.grad
            stats[n]["g2"] += m.weight.grad ** 2
            m.weight.grad = None
    for h in hooks:
        h.remove()
    print(f"window of {a.window} passes: {time.time() - t0:.0f} s", flush=True)

    def heldout_loss() -> float:  # log of the driver's held-out perplexity
        return math.log(perplexity(model, held, a.batch_size))

    base = heldout_loss()
    print(f"held-out loss before: {base:.4f} (ppl {math.exp(base):.2f})", flush=True)
    originals = {n: m.weight.detach().clone() for n, m in lins.items()}
    results = {"model": a.model, "p": a.p, "window": a.window, "loss_before": base, "criteria": {}}
    for crit in a.criteria:
        pruned_total = 0
        conc = []
        rg = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, m in lins.items():
                w, st = m.weight, stats[n]
                active = w != 0
                k = a.lora_rank * (m.in_features + m.out_features)
                num = round(a.p * k)
                gs = st["g"].abs().masked_fill(active, -1.0)
                if a.row_cap > 0:  # at most cap grows per row: keep each row's best cap candidates
                    cap = (active.sum(1) * a.row_cap).ceil().long().clamp(min=1)
                    rk = gs.argsort(dim=1, descending=True).argsort(dim=1)
                    gs = gs.masked_fill(rk >= cap[:, None], -1.0)
                grow = torch.topk(gs.view(-1), num).indices
                per_row = torch.bincount(grow // m.in_features, minlength=m.out_features)
                conc.append((int(per_row.max()), int((per_row > 0).sum()), m.out_features,
                             float((per_row.float() / active.sum(1).clamp(min=1)).max())))
                score = {"taylor": (w * st["g"]).abs(), "fisher": w * w * st["g2"],
                         "wanda": w.abs() * st["x2"].sqrt(), "magnitude": w.abs(),
                         "random": torch.rand(w.shape, generator=rg)}[crit]
                score = score.masked_fill(~active, math.inf)
                if a.scope == "layer":
                    kill = torch.zeros(w.numel(), dtype=torch.bool)
                    kill[score.view(-1).topk(num, largest=False).indices] = True
                    kill = kill.view_as(w) & active
                    w[kill] = 0
                    pruned_total += int(kill.sum())
                    continue
                order = score.argsort(dim=1)
                ranks = torch.arange(m.in_features).expand_as(order)
                kill = torch.zeros_like(active)
                kill.scatter_(1, order, ranks < per_row[:, None])
                kill &= active
                w[kill] = 0
                pruned_total += int(kill.sum())
        after = heldout_loss()
        worst = max(conc, key=lambda c: c[3])
        results["criteria"][crit] = {"loss_after": after, "pruned": pruned_total, "worst_row_fraction": worst[3]}
        print(f"  grows per row: max {max(c[0] for c in conc)}; rows hit {sum(c[1] for c in conc)} of "
              f"{sum(c[2] for c in conc)}; worst row loses {worst[3]:.0%} of its weights", flush=True)
        print(f"{crit:10s} pruned {pruned_total:7d}: held-out loss {after:.4f} (ppl {math.exp(after):.2f}, "
              f"+{after - base:.4f})", flush=True)
        with torch.no_grad():
            for n, m in lins.items():
                m.weight.copy_(originals[n])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
