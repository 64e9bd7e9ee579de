"""How much does pruning in whole blocks cost before any repair? Held-out perplexity of
SmolLM2-135M-Instruct magnitude-pruned (per row, or per block row) at several sparsities,
unstructured against r x c blocks.

    python bench/block_damage.py --sparsities 0.1 0.2 0.3 0.5 --blocks 4x4 8x8 16x16 [--only down_proj]

Magnitude pruning needs no calibration, so each cell is one pruning and one evaluation of
--windows held-out windows of 256 tokens of the King James text. `--only NAME` prunes only the
decoder linears whose name contains NAME (e.g. down_proj); `--per-layer` prunes one decoder
layer at a time (the first of --sparsities and --blocks) to show which layers are sensitive.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch


def main() -> int:
    from seft_ext.data import load_text, perplexity, token_windows
    from seft_ext.models import load_model
    from seft_ext.prune import magnitude_mask
    from seft_ext.prune_llm import decoder_layers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--blocks", nargs="+", default=["4x4", "8x8", "16x16"])
    ap.add_argument("--only", default="", help="prune only the linears whose name contains this")
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("default", need_tokenizer=True, progress=False)
    model.eval()
    _, held = load_text("kjv")
    windows = token_windows(tok, held, 256)[:args.windows]
    layers = decoder_layers(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def ppl(sparsity: float, block, which=None) -> float:
        for n, p in model.named_parameters():
            p.copy_(original[n])
        for i, layer in enumerate(layers):
            if which is not None and i != which:
                continue
            for name, lin in layer.named_modules():
                if isinstance(lin, torch.nn.Linear) and args.only in name:
                    lin.weight.mul_(magnitude_mask(lin.weight, sparsity, "row", block=block))
        return perplexity(model, windows)

    blocks = [None] + [tuple(int(v) for v in b.split("x")) for b in args.blocks]
    name = lambda b: "unstructured" if b is None else f"{b[0]}x{b[1]}"  # noqa: E731
    print(f"# Magnitude pruning, unstructured against blocks ({datetime.date.today().isoformat()})\n")
    print(f"- {platform.machine()}, torch {torch.__version__}, {args.threads} threads; command: "
          f"`python {' '.join(sys.argv)}`")
    print(f"- SmolLM2-135M-Instruct; held-out perplexity on {args.windows} windows of 256 tokens; dense "
          f"{ppl(0.0, None):.2f}; pruned: {args.only or 'every decoder linear'}\n")
    if args.per_layer:
        s, b = args.sparsities[0], blocks[1]
        print(f"| layer | ppl, only this layer pruned ({s:.0%}, {name(b)}) |\n|---|---|")
        for i in range(len(layers)):
            print(f"| {i} | {ppl(s, b, i):.1f} |", flush=True)
        return 0
    print("| sparsity | " + " | ".join(name(b) for b in blocks) + " |")
    print("|---|" + "---|" * len(blocks))
    for s in args.sparsities:
        print(f"| {s:.0%} | " + " | ".join(f"{ppl(s, b):,.1f}" for b in blocks) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
