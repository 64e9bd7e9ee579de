"""Inference speed of the sparse model: SmolLM2-135M-Instruct magnitude-pruned per row to 50% and
70%, every decoder linear a SparseLinear (CSR; fp32 or bf16 values), Hugging Face ``generate``
with its KV cache, against the dense model (fp32 and bf16) in the same process.

    python bench/bench_inference.py [--threads 2] [--reps 5] [--decode-tokens 32] [--out FILE.md]
    python bench/bench_inference.py --linears [--threads 2]     # the decoder linears alone

Every repeat measures every variant once, in turn (side by side), and the ratios are taken
within a repeat, so the machine's drift hits both sides of a ratio alike. Per variant:

- prefill: tokens/s of one forward of a ``--prefill-tokens`` prompt (KV cache on);
- decode: tokens/s of the new tokens at batch 1 and 8 after a 16-token prompt, from
  ``generate(n + 1) - generate(1)`` so that the prompt's prefill is not counted;
- outside the decoder linears: the same runs on a copy whose decoder linears are stubs that
  cost nothing (they return zeros of the right shape): attention, norms, the lm_head and the
  generation loop, per token.

The bounds for decode at batch 1 (against the dense model of the same dtype): ``zero-cost`` =
dense time / outside time (decoder linears free); ``bytes`` = weight bytes read per token, dense
over sparse (decoder linears, lm_head, norms); ``combined`` = dense time / (outside time + the
dense linears' time scaled by their sparse / dense bytes): what a sparse kernel running at the
dense kernel's bandwidth would reach.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

from seft_ext.generate import sparsify_model
from seft_ext.layer import SparseLinear
from seft_ext.models import load_model
from seft_ext.prune import magnitude_mask
from seft_ext.prune_llm import decoder_layers

PROMPT = 16


def machine_header(argv: list) -> str:
    import datetime
    import platform
    import shlex
    import subprocess

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        cpu = "?"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"# seft_ext inference benchmark ({datetime.date.today()})\n\n- machine: `{cpu}`, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()}; torch {torch.__version__}, python {platform.python_version()}\n"
            f"- command: `python {shlex.join(argv)}`\n- load average (1 / 5 / 15 min) before the run: {load}")


class Stub(nn.Module):
    """A linear layer that costs nothing: zeros of the output's shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def pruned_copy(model: nn.Module, sparsity: float) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for lin in decoder_layers(m).modules():
            if isinstance(lin, nn.Linear):
                lin.weight.mul_(magnitude_mask(lin.weight, sparsity, "row"))
    return m


def stub_copy(model: nn.Module) -> nn.Module:
    """``model`` with every decoder linear a Stub (the linears are not copied)."""
    layers = decoder_layers(model)
    saved = {n: m for n, m in layers.named_modules() if isinstance(m, (nn.Linear, SparseLinear))}
    for n, m in saved.items():  # stubs in place for the copy, then the originals back
        layers.set_submodule(n, Stub(m.out_features))
    try:
        return copy.deepcopy(model)
    finally:
        for n, m in saved.items():
            layers.set_submodule(n, m)


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the decoder linears, bytes of every other weight read per token: norms, lm_head)."""
    lin = other = 0
    layers = decoder_layers(model)
    for m in layers.modules():
        if isinstance(m, (nn.Linear, SparseLinear)):
            lin += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    for n, p in model.named_parameters():
        if not n.startswith("model.layers.") or "norm" in n:
            other += 0 if "embed_tokens" in n else p.numel() * p.element_size()
    head = model.get_output_embeddings().weight
    if all(head is not p for n, p in model.named_parameters() if "embed_tokens" not in n):  # tied to the embedding
        other += head.numel() * head.element_size()
    return lin, other


def prefill_fn(model, tokens: int, vocab: int):
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    return lambda: model(ids, use_cache=True)


def generate_fn(model, batch: int, new: int, vocab: int):
    ids = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    return lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                  attention_mask=torch.ones_like(ids))


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(model, a, vocab: int) -> dict:
    """One repeat of one variant: seconds of a prefill, and per decoded token at batch 1 and 8."""
    res = {"prefill": seconds(prefill_fn(model, a.prefill_tokens, vocab))}
    for b in (1, 8):
        one = seconds(generate_fn(model, b, 1, vocab))
        full = seconds(generate_fn(model, b, a.decode_tokens + 1, vocab))
        res[f"b{b}"] = max(full - one, 1e-9) / a.decode_tokens
    return res


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    xs = sorted(xs)
    return " / ".join(fmt.format(v) for v in (xs[0], statistics.median(xs), xs[-1]))


def build_variants(dense: nn.Module, sparsities: list[float]) -> dict:
    bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    variants = {"dense fp32": dense, "dense bf16": bf16, "outside fp32": stub_copy(dense),
                "outside bf16": stub_copy(bf16)}
    for s in sparsities:
        sp = pruned_copy(dense, s)
        sparsify_model(sp)
        variants[f"sparse {s:.0%} fp32"] = sp
        variants[f"sparse {s:.0%} bf16"] = copy.deepcopy(sp).to(torch.bfloat16)
    return variants


def run_all(variants: dict, a, vocab: int, report) -> dict:
    """Every repeat measures every variant in turn; ``report(runs)`` after each repeat."""
    for m in variants.values():  # warm-up: allocator, kernels, generation config
        measure(m, argparse.Namespace(prefill_tokens=32, decode_tokens=2), vocab)
    runs = {k: [] for k in variants}
    for r in range(a.reps):
        for name, m in variants.items():
            runs[name].append(measure(m, a, vocab))
        print(f"repeat {r + 1}/{a.reps} done, load {os.getloadavg()[0]:.2f}", flush=True)
        report(runs)
    return runs


def rate_table(runs: dict, a) -> list[str]:
    lines = [f"Tokens/s, min / median / max of {a.reps} repeats (prefill: 1 x {a.prefill_tokens} tokens; decode: "
             f"{a.decode_tokens} new tokens after a {PROMPT}-token prompt). Ratios: tokens/s over the dense model's "
             "in the same repeat, min / median / max.", "",
             "| model | prefill tok/s | decode b1 tok/s | decode b8 tok/s | prefill vs dense fp32 | b1 vs dense fp32 "
             "| b8 vs dense fp32 | prefill / b1 / b8 vs dense bf16 (medians) |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        rate = {k: [(a.prefill_tokens if k == "prefill" else int(k[1:])) / r[k] for r in rs]
                for k in ("prefill", "b1", "b8")}
        vs = {ref: {k: [d[k] / r[k] for r, d in zip(rs, runs[ref])] for k in rate} for ref in ("dense fp32",
                                                                                               "dense bf16")}
        bf = " / ".join(f"{statistics.median(vs['dense bf16'][k]):.2f}x" for k in rate)
        fp = " | ".join(spread(vs["dense fp32"][k], "{:.2f}x") for k in rate)
        lines.append(f"| {name} | {spread(rate['prefill'])} | {spread(rate['b1'])} | {spread(rate['b8'])} | "
                     f"{fp} | {bf} |")
    return lines


def bound_table(runs: dict, variants: dict, a) -> list[str]:
    lines = ["", "Decode at batch 1, ms per token (medians) and the bounds against the dense model of the same dtype "
             "(see the module's docstring):", "",
             "| model | ms/token | outside linears ms/token | linears ms/token | weight MB read/token | zero-cost "
             "bound | bytes bound | combined bound | measured (median of ratios) |", "|---" * 9 + "|"]
    for name, rs in runs.items():
        if name.startswith("outside"):
            continue
        dt = name.split()[-1]
        dense, out = runs[f"dense {dt}"], runs[f"outside {dt}"]
        t, t_d, t_o = (statistics.median(r["b1"] for r in x) for x in (rs, dense, out))
        lin, other = weight_bytes(variants[name])
        lin_d, other_d = weight_bytes(variants[f"dense {dt}"])
        measured = statistics.median(d["b1"] / r["b1"] for r, d in zip(rs, dense))
        combined = t_d / (t_o + max(t_d - t_o, 0.0) * lin / lin_d)
        lines.append(f"| {name} | {1e3 * t:.1f} | {1e3 * t_o:.1f} | {1e3 * max(t - t_o, 0.0):.1f} | "
                     f"{(lin + other) / 1e6:.0f} | {t_d / t_o:.2f}x | {(lin_d + other_d) / (lin + other):.2f}x | "
                     f"{combined:.2f}x | {measured:.2f}x |")
    return lines


# SmolLM2-135M's decoder linears, (out, in) and how many of each per layer; 30 layers.
SMOLLM2_LINEARS = {(576, 576): 2, (192, 576): 2, (1536, 576): 2, (576, 1536): 1}
SMOLLM2_LAYERS = 30


def per_call_us(fn, calls: int) -> float:
    """Median microseconds of one call, over ``calls`` calls (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts)


def linears_table(a) -> list[str]:
    """The decoder linears alone at decode shapes (1 and 8 tokens): median us per call per shape,
    and the sum over one token of SmolLM2 (ms), dense against 70% CSR, at 1 and --threads threads."""
    lines = ["| threads | tokens | dtype | " + " | ".join(f"{o}x{i} dense / CSR 70% us" for o, i in SMOLLM2_LINEARS)
             + " | one token's linears, dense / CSR ms | ratio |", "|---" * (len(SMOLLM2_LINEARS) + 5) + "|"]
    for threads in sorted({1, a.threads}):
        torch.set_num_threads(threads)
        for tokens in (1, 8):
            for dt in (torch.float32, torch.bfloat16):
                cells, tot_d, tot_s = [], 0.0, 0.0
                for (o, i), count in SMOLLM2_LINEARS.items():
                    lin = nn.Linear(i, o, bias=False).to(dt)
                    sp = SparseLinear.from_dense(lin, magnitude_mask(lin.weight.float(), 0.7, "row"))
                    x = torch.randn(tokens, 1, i, dtype=dt)
                    d, sv = per_call_us(lambda: lin(x), a.calls), per_call_us(lambda: sp(x), a.calls)
                    cells.append(f"{d:.0f} / {sv:.0f}")
                    tot_d, tot_s = tot_d + count * d, tot_s + count * sv
                tot_d, tot_s = SMOLLM2_LAYERS * tot_d / 1e3, SMOLLM2_LAYERS * tot_s / 1e3
                lines.append(f"| {threads} | {tokens} | {str(dt)[6:]} | " + " | ".join(cells)
                             + f" | {tot_d:.1f} / {tot_s:.1f} | {tot_d / tot_s:.2f}x |")
                print(lines[-1], flush=True)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--out", help="also write the tables to this markdown file")
    ap.add_argument("--linears", action="store_true", help="only the decoder linears at decode shapes, without "
                    "the model: per-call times of dense and 70%% CSR layers of SmolLM2's shapes")
    ap.add_argument("--calls", type=int, default=200, help="--linears: calls per median")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    header = machine_header(sys.argv)
    if a.linears:
        text = "\n".join([header, ""] + linears_table(a)) + "\n"
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        return 0
    dense, _ = load_model("default", progress=False)
    dense.eval()
    variants = build_variants(dense, [float(x) for x in a.sparsities.split(",")])

    def report(runs):
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        done = len(next(iter(runs.values())))
        text = "\n".join([header, f"- load average after repeat {done} of {a.reps}: {load}", ""]
                         + rate_table(runs, argparse.Namespace(**{**vars(a), "reps": done}))
                         + bound_table(runs, variants, a)) + "\n"
        print(text, flush=True)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)

    run_all(variants, a, dense.config.vocab_size, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
