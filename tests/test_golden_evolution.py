"""Golden evolution results: bit-identical topology, values and optimizer state.

``tests/golden/evolution.json`` was generated once, before the evolution code was
restructured, and is never regenerated to make a change pass: a difference means the
numerics changed. For each case (method x budget) a two-layer model trains for 12
optimizer steps (AdamW with amsgrad, so every moment is covered) with an evolution step
every 3; after every evolution step the file holds the report's counts and a SHA-256 of
each layer's crow, col, theta, delta_slots, delta and optimizer moments, so a divergence
is located by step, layer and array. The CPU kernel set is pinned to "base" and torch to
one thread; inputs come from a seeded generator and the loss is ``sum(y * dY)``, so the
gradient reaching the model is exactly ``dY``.

Regenerate (only when a numerics change is intended and reviewed):
``python tests/test_golden_evolution.py --write``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from seft_ext import CSRWeight, SEFTConfig, SEFTController, SEFTLinear, ops
from seft_ext.prune import magnitude_mask

GOLDEN = Path(__file__).parent / "golden" / "evolution.json"
CASES = [(m, b) for m in ("seft", "spiel") for b in ("layer", "row", "nm")]
SHAPES = [(48, 64), (32, 48)]  # (out, in); both inputs divisible by 4 for 2:4
TOKENS, STEPS = 96, 12
ARRAYS = ("crow", "col", "theta", "delta_slots", "delta")
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _model(method: str, budget: str):
    g = torch.Generator().manual_seed(1234)
    layers = []
    for i, (out, inn) in enumerate(SHAPES):
        w = torch.randn(out, inn, generator=g)
        base = CSRWeight.from_dense(w, magnitude_mask(w, 0.5, budget, (2, 4)))
        layers.append(SEFTLinear(base, 8 * (out + inn) // 4, budget=budget, method=method, seed=i))
    return nn.Sequential(layers[0], nn.ReLU(), layers[1])


def run_case(method: str, budget: str) -> list[dict]:
    """Trains one case and returns, per evolution step, its counts and array hashes."""
    model = _model(method, budget)
    layers = [model[0], model[2]]
    cfg = SEFTConfig(update_interval=3, grow_accumulation=2, drop_fraction=0.3, evolve_until=1.0,
                     budget=budget, method=method, scan_sketch=64, seed=7)
    opt = torch.optim.AdamW([m.delta for m in layers], lr=1e-2, betas=(0.8, 0.95), amsgrad=True)
    ctl = SEFTController(model, opt, cfg, total_steps=STEPS)
    g = torch.Generator().manual_seed(99)
    out = []
    for t in range(1, STEPS + 1):
        x = torch.randn(TOKENS, SHAPES[0][1], generator=g)
        dy = torch.randn(TOKENS, SHAPES[1][0], generator=g)
        (model(x) * dy).sum().backward()
        opt.step()
        opt.zero_grad()
        report = ctl.step()
        if report is None:
            continue
        rec = {"step": t, "layers": []}
        for name, layer in zip(("0", "2"), layers):
            st = opt.state[layer.delta]
            rec["layers"].append({"counts": report[name],
                                  **{a: _sha(getattr(layer, a)) for a in ARRAYS},
                                  **{m: _sha(st[m]) for m in MOMENTS}})
        out.append(rec)
    return out


def _pinned(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ops.cpu_isa("base")
    try:
        return fn()
    finally:
        ops.cpu_isa("auto")
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method,budget", CASES)
def test_evolution_matches_golden(method, budget):
    golden = json.loads(GOLDEN.read_text())[f"{method}/{budget}"]
    got = _pinned(lambda: run_case(method, budget))
    assert [r["step"] for r in got] == [r["step"] for r in golden]
    assert sum(r["layers"][0]["counts"].get("grown", 0) for r in golden) > 0  # it did evolve
    for rg, rw in zip(got, golden):
        for i, (lg, lw) in enumerate(zip(rg["layers"], rw["layers"])):
            diff = [k for k in lw if lg[k] != lw[k]]
            assert not diff, f"step {rw['step']}, layer {i}: {diff} differ from the golden run"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.parent.mkdir(exist_ok=True)
    data = {f"{m}/{b}": _pinned(lambda: run_case(m, b)) for m, b in CASES}
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
