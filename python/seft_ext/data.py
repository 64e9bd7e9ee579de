"""Text and task data for the driver: the shipped default (see data/README.md) or local files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .loss import token_nll

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_text(spec: str) -> tuple[str, str]:
    """(train text, held-out text). ``spec``: "default" (the shipped KJV split), or local
    .txt / .jsonl files separated by commas (.jsonl: an object with a string "text" field per
    line); their last 10% of characters (at a line break) is held out. A file that is missing,
    empty, not UTF-8, or (.jsonl) has a line that is not such an object is refused with its
    name and line number."""
    if spec == "default":
        return (DATA_DIR / "kjv_train.txt").read_text(), (DATA_DIR / "kjv_heldout.txt").read_text()
    text = "\n".join(read_data_file(name) for name in spec.split(","))
    if len(text.strip()) < 100:
        raise ValueError(f"--data {spec}: the text is too short ({len(text.strip())} characters)")
    cut = text.rfind("\n", 0, int(len(text) * 0.9))
    cut = cut if cut > 0 else int(len(text) * 0.9)
    return text[:cut], text[cut:]


def data_files(spec: str) -> list[Path]:
    """The files ``--data spec`` reads (the shipped ones for "default")."""
    if spec == "default":
        return [DATA_DIR / "kjv_train.txt", DATA_DIR / "kjv_heldout.txt"]
    return [Path(name) for name in spec.split(",")]


def read_data_file(name: str) -> str:
    """The text of one --data file (.jsonl: its lines' "text" fields joined by line breaks)."""
    path = Path(name)
    if not name.strip():
        raise ValueError("--data: an empty file name in the list (a stray comma?)")
    if not path.is_file():
        raise FileNotFoundError(f"--data {name}: no such file (give .txt / .jsonl files, or 'default')")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"--data {name}: cannot read it: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"--data {name}: line {line} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if path.suffix == ".jsonl":
        text = "\n".join(_jsonl_texts(name, text))
    if not text.strip():
        raise ValueError(f"--data {name}: the file is empty")
    return text


def _jsonl_texts(name: str, raw: str) -> list[str]:
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise ValueError(f"--data {name}: line {i} is not JSON") from None
        if not isinstance(obj, dict):
            raise ValueError(f"--data {name}: line {i} is a JSON {type(obj).__name__}, not an object with a "
                             "'text' field")
        if not isinstance(obj.get("text"), str):
            what = "has no 'text' field" if "text" not in obj else \
                f"has a 'text' that is {json.dumps(obj['text'])[:20]}, not a string"
            raise ValueError(f"--data {name}: line {i} {what}")
        texts.append(obj["text"])
    return texts


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
        nll, n = token_nll(model, ids)  # the lm_head per chunk of tokens: no [tokens, vocab] logits at once
        total += nll.item()
        count += n
    try:
        return math.exp(total / count)
    except OverflowError:
        return math.inf


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
