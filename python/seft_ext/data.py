"""Text and task data for the driver: the shipped default (see data/README.md) or local files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_text(spec: str) -> tuple[str, str]:
    """(train text, held-out text). ``spec``: "default" (the shipped KJV split), or local
    .txt / .jsonl files separated by commas (.jsonl: a "text" field per line); their last
    10% of characters (at a line break) is held out."""
    if spec == "default":
        return (DATA_DIR / "kjv_train.txt").read_text(), (DATA_DIR / "kjv_heldout.txt").read_text()
    parts = []
    for name in spec.split(","):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--data {name}: no such file (give .txt / .jsonl files, or 'default')")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--data {name}: cannot read it as UTF-8 text: {e}") from None
        if path.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"--data {name}: line {i} is not a JSON object with a 'text' field") from None
            raw = "\n".join(texts)
        parts.append(raw)
    text = "\n".join(parts)
    if len(text.strip()) < 100:
        raise ValueError(f"--data {spec}: the text is empty or too short ({len(text.strip())} characters)")
    cut = text.rfind("\n", 0, int(len(text) * 0.9))
    cut = cut if cut > 0 else int(len(text) * 0.9)
    return text[:cut], text[cut:]


def token_windows(tokenizer, text: str, seq_len: int, bos: bool = False) -> Tensor:
    """Non-overlapping windows of ``seq_len`` tokens, (N, seq_len) int64 (a BOS token first
    in each window when ``bos``, for models that need it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = seq_len - 1 if bos else seq_len
    n = len(ids) // body
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    t = torch.tensor(ids[:n * body], dtype=torch.long).view(n, body)
    if bos:
        t = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), t], 1)
    return t


@torch.no_grad()
def perplexity(model, windows: Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all predicted tokens of the windows."""
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def load_wordnet(split: str) -> list[dict]:
    """The shipped WordNet "which word is defined" items (split: train | heldout)."""
    with open(DATA_DIR / f"wordnet_mc_{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def mc_prompt(item: dict) -> str:
    return f'Definition: {item["definition"]}\nThe word defined is "'


@torch.no_grad()
def multiple_choice_accuracy(model, tokenizer, items: list[dict], limit: Optional[int] = None) -> float:
    """Fraction of items whose answer gets the highest summed log-likelihood of
    ``option + '"'`` after the prompt (the options of an item in one padded batch)."""
    model.eval()
    dev = next(model.parameters()).device
    items = items[:limit] if limit else items
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = 0
    for it in items:
        prompt = tokenizer(mc_prompt(it), add_special_tokens=False)["input_ids"]
        conts = [tokenizer(opt + '"', add_special_tokens=False)["input_ids"] for opt in it["options"]]
        width = len(prompt) + max(len(c) for c in conts)
        ids = torch.full((len(conts), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, c in enumerate(conts):
            ids[i, :len(prompt) + len(c)] = torch.tensor(prompt + c)
            att[i, :len(prompt) + len(c)] = 1
        # the vocabulary projection only where an option token is predicted
        hidden = model.get_decoder()(input_ids=ids.to(dev), attention_mask=att.to(dev),
                                     use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        scores = []
        for i, c in enumerate(conts):
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=dev)
            logp = head(hidden[i, pos]).float().log_softmax(-1)
            scores.append(logp[torch.arange(len(c), device=dev), torch.tensor(c, device=dev)].sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == it["answer"])
    return correct / max(1, len(items))
