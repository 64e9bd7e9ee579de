"""Inference with the sparse model: a run's export loaded as SparseLinear layers, then
Hugging Face ``generate`` (KV cache) as usual.

    model, tok = load_sparse_model("seft_out")        # DIR/dense + DIR/sparse.safetensors
    ids = tok("The Lord is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=32, do_sample=False)

``sparsify_model(model)`` turns an already pruned dense model's decoder linears into
SparseLinear layers (their zeros dropped) without a run folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .layer import SparseLinear
from .modules import replace_module


def load_sparse_model(run_dir, dtype: Optional[torch.dtype] = None, progress: bool = False):
    """(model, tokenizer) of a `seft run` / `seft export` folder: ``DIR/dense`` with every
    layer of ``DIR/sparse.safetensors`` swapped in as a SparseLinear; ``dtype`` casts the
    values (e.g. torch.bfloat16). Eval mode, no gradients."""
    from .hf import load_sparse
    from .models import load_model

    run = Path(run_dir)
    dense, sparse = run / "dense", run / "sparse.safetensors"
    for p in (dense, sparse):
        if not p.exists():
            raise FileNotFoundError(f"{run}: no {p.name} (give the --out folder of `seft run` or `seft export`)")
    model, tok = load_model(str(dense), progress=progress)
    load_sparse(model, sparse)
    if dtype is not None:
        model.to(dtype)
    return _for_inference(model), tok


def sparsify_model(model: nn.Module, exclude=("lm_head",)) -> list[str]:
    """Replace every nn.Linear (but ``exclude``) by a SparseLinear holding its non-zeros; in
    place. Returns the names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(e in n for e in exclude)]
    for n in names:
        lin = model.get_submodule(n)
        replace_module(model, n, SparseLinear.from_dense(lin, lin.weight.detach() != 0))
    return names


def _for_inference(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` (the chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
