"""Inference with the sparse model: a run's export loaded as SparseLinear layers, then
Hugging Face ``generate`` (KV cache) as usual.

    model, tok = load_sparse_model("seft_out")        # DIR/dense + DIR/sparse.safetensors
    ids = tok("The Lord is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=32, do_sample=False)
    print(tok.decode(out[0, ids.shape[1]:]))

The command line does the same: ``seft generate --model seft_out --prompt "The Lord is"``.

``sparsify_model(model)`` turns an already pruned dense model's decoder linears into
SparseLinear layers (their zeros dropped) without a run folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .layer import SparseLinear
from .modules import replace_module


def check_run_folder(run_dir) -> None:
    """Refuse (FileNotFoundError / ValueError, naming the folder) what is not the output folder
    of a run or an export: DIR/dense with a config and a tokenizer, DIR/sparse.safetensors
    with a seft_ext header. Reads no weight."""
    from safetensors import SafetensorError, safe_open

    run = Path(run_dir)
    hint = "give the --out folder of `seft run`, `seft train` or `seft export`"
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such folder ({hint})")
    dense, sparse = run / "dense", run / "sparse.safetensors"
    for p in (dense / "config.json", sparse):
        if not p.is_file():
            raise FileNotFoundError(f"{run}: no {p.relative_to(run)}: not a run's output folder ({hint}; "
                                    "`seft export --format peft` writes no sparse export)")
    if not any((dense / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{run}: {dense} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    try:
        with safe_open(str(sparse), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{run}: {sparse.name} is not a readable safetensors file ({e})") from None
    if meta.get("seft_ext") != "sparse-v1":
        raise ValueError(f"{run}: {sparse.name} is not a seft_ext sparse export")


def load_sparse_model(run_dir, dtype: Optional[torch.dtype] = None, progress: bool = False):
    """(model, tokenizer) of a `seft run` / `seft export` folder: ``DIR/dense`` with every
    layer of ``DIR/sparse.safetensors`` swapped in as a SparseLinear; ``dtype`` casts the
    weights (e.g. torch.bfloat16). Eval mode, no gradients."""
    from .hf import load_sparse
    from .models import load_model

    check_run_folder(run_dir)
    run = Path(run_dir)
    model, tok = load_model(str(run / "dense"), progress=progress, need_tokenizer=True)
    load_sparse(model, run / "sparse.safetensors")
    if dtype is not None:
        model.to(dtype)
    return _for_inference(model), tok


def sparsify_model(model: nn.Module, masks: Optional[dict[str, Tensor]] = None, exclude=("lm_head",),
                   block: Optional[tuple[int, int]] = None) -> list[str]:
    """Replace nn.Linear layers by SparseLinear layers, in place: each layer named in ``masks``
    keeps exactly its mask's positions; without ``masks`` every nn.Linear (but ``exclude``)
    keeps its non-zeros. ``block``: r x c blocks (BSR) instead of CSR. Returns the names."""
    names = list(masks) if masks is not None else [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(e in n for e in exclude)]
    for n in names:
        lin = model.get_submodule(n)
        keep = lin.weight.detach() != 0 if masks is None else masks[n].to(lin.weight.device)  # one layer's at a time
        replace_module(model, n, SparseLinear.from_dense(lin, keep, block=block))
    return names


def _for_inference(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def prompt_ids(tokenizer, prompt: str, chat_template: bool = True) -> torch.Tensor:
    """[1, n] token ids of ``prompt``: inside the chat template when the tokenizer has one (and
    ``chat_template``), else as it is."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32, stream: bool = False,
                  chat_template: bool = True) -> tuple[str, int]:
    """(greedy continuation of ``prompt``, number of new tokens); ``stream`` prints the text to
    stdout as it is generated."""
    ids = prompt_ids(tokenizer, prompt, chat_template)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, streamer=streamer)
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())
