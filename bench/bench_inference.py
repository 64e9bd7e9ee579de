"""Inference speed of the sparse model: SmolLM2-135M-Instruct magnitude-pruned per row to 50% and
70%, every decoder linear a SparseLinear, Hugging Face ``generate`` with its KV cache, against
the dense model in the same process.

    python bench/bench_inference.py [--threads 2] [--reps 3] [--decode-tokens 32] [--out FILE.md]

Per variant: prefill tokens/s (one 512-token prompt), decode tokens/s at batch 1 and 8 (a
16-token prompt, then --decode-tokens new tokens each), min / median / max over --reps. Then,
for decode at batch 1, the time per token spent outside the decoder linears (attention,
norms, lm_head, generation overhead; measured with hooks around the linears, in a separate
pass) and the bound it leaves: dense time per token / outside time per token, the speed-up
that infinitely fast decoder linears would give.
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
from seft_ext.models import load_model
from seft_ext.prune import magnitude_mask
from seft_ext.prune_llm import decoder_layers


def machine_header() -> str:
    import datetime
    import platform
    import shlex
    import subprocess

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        cpu = "?"
    return (f"# seft_ext inference benchmark ({datetime.date.today()})\n\n- machine: `{cpu}`, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()}; torch {torch.__version__}, python {platform.python_version()}\n"
            f"- command: `python {shlex.join(sys.argv)}`\n- load average (1 min) before the run: "
            f"{os.getloadavg()[0]:.2f}")


def pruned_copy(model: nn.Module, sparsity: float) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for lin in decoder_layers(m).modules():
            if isinstance(lin, nn.Linear):
                lin.weight.mul_(magnitude_mask(lin.weight, sparsity, "row"))
    return m


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def prefill(model, tokens: int, vocab: int):
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    return lambda: model(ids, use_cache=True)


def decode(model, batch: int, new: int, vocab: int):
    ids = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(1))
    return lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=0, attention_mask=torch.ones_like(ids))


def linear_seconds(model, fn) -> tuple[float, float]:
    """(seconds of fn(), seconds of it inside the decoder linears), by forward hooks."""
    spent, start = [0.0], {}
    handles = []
    for m in decoder_layers(model).modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "SparseLinear":
            handles.append(m.register_forward_pre_hook(lambda mod, inp: start.__setitem__(mod, time.perf_counter())))
            handles.append(m.register_forward_hook(
                lambda mod, inp, out: spent.__setitem__(0, spent[0] + time.perf_counter() - start[mod])))
    try:
        t = time.perf_counter()
        fn()
        total = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    return total, spent[0]


def fmt(ts: list[float], work: float) -> str:
    rates = sorted(work / t for t in ts)
    return f"{rates[0]:.1f} / {statistics.median(rates):.1f} / {rates[-1]:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--out", help="also write the table to this markdown file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    dense, _ = load_model("default", progress=False)
    dense.eval()
    vocab = dense.config.vocab_size
    variants = [("dense fp32", dense), ("dense bf16", copy.deepcopy(dense).to(torch.bfloat16))]
    for s in (float(x) for x in a.sparsities.split(",")):
        sp = pruned_copy(dense, s)
        sparsify_model(sp)
        variants += [(f"sparse {s:.0%} fp32", sp), (f"sparse {s:.0%} bf16", copy.deepcopy(sp).to(torch.bfloat16))]
    lines = [machine_header(), "",
             f"tokens/s, min / median / max of {a.reps}; prefill: 1 x {a.prefill_tokens} tokens; decode: "
             f"16-token prompt + {a.decode_tokens} new tokens", "",
             "| model | prefill tok/s | decode b1 tok/s | decode b8 tok/s | b1 vs dense fp32 | outside linears "
             "ms/token (b1) | bound |", "|---|---|---|---|---|---|---|"]
    base_b1 = None
    for name, model in variants:
        t_pre = timed(prefill(model, a.prefill_tokens, vocab), a.reps)
        t_b1 = timed(decode(model, 1, a.decode_tokens, vocab), a.reps)
        t_b8 = timed(decode(model, 8, a.decode_tokens, vocab), a.reps)
        per_tok = statistics.median(t_b1) / a.decode_tokens
        base_b1 = base_b1 or per_tok
        total, inside = linear_seconds(model, decode(model, 1, a.decode_tokens, vocab))
        outside = (total - inside) / a.decode_tokens
        lines.append(f"| {name} | {fmt(t_pre, a.prefill_tokens)} | {fmt(t_b1, a.decode_tokens)} | "
                     f"{fmt(t_b8, 8 * a.decode_tokens)} | {base_b1 / per_tok:.2f}x | {1e3 * outside:.1f} | "
                     f"{base_b1 / outside:.2f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
