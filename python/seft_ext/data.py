"""Text and task data for the driver: the shipped sets (see data/README.md) or local files.

``--data`` names one of the shipped sets or lists local files:

- ``default`` / ``kjv``: the King James text (training: Genesis + Exodus; held out: Ruth, Esther,
  Jonah); ``general``: Jane Austen (training: Pride and Prejudice; held out: Persuasion,
  chapters 1-5). Text data trains on windows of ``--seq-len`` tokens.
- ``wordnet``: the 2,000 WordNet training items as prompt + answer (``mc_prompt`` and the
  answer word with its closing quote, exactly what ``multiple_choice_accuracy`` scores), the
  loss on the answer tokens only; the 500 held-out items are for evaluation only.
- local ``.txt`` / ``.jsonl`` files, comma-separated: text (``.txt``, or ``.jsonl`` lines with
  a string ``"text"``), or a task (``.jsonl`` lines with string ``"prompt"`` and
  ``"completion"``); their last 10% (of characters, or of items) is held out.

``--val-items N`` takes a validation part out of the training part, for choosing a learning
rate: the last N training items of a task, or the last N training windows of a text.
Every set also carries a held-out text of another domain (``other``): the general text's for
everything but ``general``, whose is the King James text's (the forgetting measure).
"""
from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .loss import token_nll

DATA_DIR = Path(__file__).resolve().parent / "data"
TEXTS = {"kjv": ("kjv_train.txt", "kjv_heldout.txt"), "general": ("austen_train.txt.gz", "austen_heldout.txt.gz")}
ALIASES = {"default": "kjv"}
WORDNET = ("wordnet_mc_train.jsonl", "wordnet_mc_heldout.jsonl")
NAMES = ("default", "kjv", "general", "wordnet")
CALIBRATION = "general"  # the text Wanda / SparseGPT calibrate on when the training data is a task


@dataclass(frozen=True)
class Example:
    """A prompt and its completion (the loss is on the completion's tokens); ``where``: file:line."""

    prompt: str
    completion: str
    where: str = ""


@dataclass
class DataSet:
    """What ``--data`` names, before tokenization. ``train`` / ``heldout`` / ``val``: a text
    (``kind`` "text") or examples (``kind`` "task"); a text's validation windows are cut at
    tokenization (``val_windows``)."""

    spec: str
    kind: str
    train: Union[str, list]
    heldout: Union[str, list]
    other: str  # held-out text of another domain
    other_name: str
    calibration: str  # the text pruning calibrates on
    val: Optional[list] = None  # task: the validation examples
    val_windows: int = 0  # text: training windows held out for validation
    wordnet_val: Optional[list] = None  # --data wordnet: the validation items, for their accuracy


def shipped_text(name: str) -> tuple[str, str]:
    """(train, held-out) of a shipped text: "kjv" (also "default") or "general"."""
    return tuple(_read_shipped(f) for f in TEXTS[ALIASES.get(name, name)])


def _read_shipped(name: str) -> str:
    raw = (DATA_DIR / name).read_bytes()
    return (gzip.decompress(raw) if name.endswith(".gz") else raw).decode("utf-8")


def load_text(spec: str) -> tuple[str, str]:
    """(train text, held-out text) of a text ``--data`` (see the module doc)."""
    ds = load_data(spec)
    if ds.kind != "text":
        raise ValueError(f"--data {spec}: a task (prompt / completion items), not a text")
    return ds.train, ds.heldout


def load_data(spec: str, val_items: int = 0) -> DataSet:
    """The data ``--data spec`` names (see the module doc), checked: a file that is missing, empty,
    not UTF-8 or has a bad line is refused with its name and line number."""
    name = ALIASES.get(spec, spec)
    if name == "wordnet":
        ds = _wordnet_set(spec, val_items)
    elif name in TEXTS:
        train, held = shipped_text(name)
        ds = DataSet(spec, "text", train, held, *_other(name), calibration=train, val_windows=val_items)
    else:
        ds = _file_set(spec, val_items)
    return ds


def _other(name: str) -> tuple[str, str]:
    """(held-out text, its name) of the other domain: the King James text for "general", else the general text."""
    other = "kjv" if name == "general" else "general"
    return shipped_text(other)[1], other


def _split_val(spec: str, train: list, val_items: int) -> tuple[list, list]:
    if val_items >= len(train):
        raise ValueError(f"--val-items {val_items}: --data {spec} has only {len(train)} training items")
    return (train[:len(train) - val_items], train[len(train) - val_items:]) if val_items else (train, [])


def _wordnet_set(spec: str, val_items: int) -> DataSet:
    items = load_wordnet("train")
    examples = [wordnet_example(it, f"{WORDNET[0]}:{i}") for i, it in enumerate(items, 1)]
    train, val = _split_val(spec, examples, val_items)
    held = [wordnet_example(it, f"{WORDNET[1]}:{i}") for i, it in enumerate(load_wordnet("heldout"), 1)]
    return DataSet(spec, "task", train, held, *_other("wordnet"), calibration=shipped_text(CALIBRATION)[0],
                   val=val, wordnet_val=items[len(train):])


def wordnet_example(item: dict, where: str = "") -> Example:
    """A WordNet item as prompt + answer, as ``multiple_choice_accuracy`` scores its options."""
    return Example(mc_prompt(item), item["options"][item["answer"]] + '"', where)


def _file_set(spec: str, val_items: int) -> DataSet:
    files = spec.split(",")
    if any(f in NAMES for f in files) and len(files) > 1:
        raise ValueError(f"--data {spec}: a shipped set ({', '.join(NAMES)}) cannot be combined with files")
    parts = [read_data_file(f) for f in files]
    kinds = {"task" if isinstance(p, list) else "text" for p in parts}
    if len(kinds) > 1:
        raise ValueError(f"--data {spec}: mixes prompt / completion files with text files")
    if kinds == {"task"}:
        return _task_set(spec, [e for p in parts for e in p], val_items)
    text = "\n".join(parts)
    if len(text.strip()) < 100:
        raise ValueError(f"--data {spec}: the text is too short ({len(text.strip())} characters)")
    cut = text.rfind("\n", 0, int(len(text) * 0.9))
    cut = cut if cut > 0 else int(len(text) * 0.9)
    return DataSet(spec, "text", text[:cut], text[cut:], *_other(spec), calibration=text[:cut],
                   val_windows=val_items)


def _task_set(spec: str, examples: list, val_items: int) -> DataSet:
    if len(examples) < 2:
        raise ValueError(f"--data {spec}: {len(examples)} prompt / completion item(s); at least 2 are needed "
                         "(the last 10% are held out)")
    n_held = max(1, len(examples) // 10)
    train, val = _split_val(spec, examples[:-n_held], val_items)
    return DataSet(spec, "task", train, examples[-n_held:], *_other(spec), calibration=shipped_text(CALIBRATION)[0],
                   val=val)


def data_files(spec: str) -> list[Path]:
    """The files ``--data spec`` trains on or holds out (a resume checks their contents)."""
    name = ALIASES.get(spec, spec)
    if name in TEXTS:
        return [DATA_DIR / f for f in TEXTS[name]]
    calibration = [DATA_DIR / TEXTS[CALIBRATION][0]]
    if name == "wordnet":
        return [DATA_DIR / f for f in WORDNET] + calibration
    files = [Path(f) for f in spec.split(",")]
    return files + calibration if any(f.suffix == ".jsonl" and _is_task_file(f) for f in files) else files


def _is_task_file(path: Path) -> bool:
    try:
        return isinstance(read_data_file(str(path)), list)
    except (OSError, ValueError):
        return False


def read_data_file(name: str) -> Union[str, list]:
    """One --data file: its text (.txt; .jsonl of "text" lines: those joined by line breaks), or
    its examples (.jsonl of "prompt" / "completion" lines)."""
    path = Path(name)
    if not name.strip():
        raise ValueError("--data: an empty file name in the list (a stray comma?)")
    if not path.is_file():
        raise FileNotFoundError(f"--data {name}: no such file (give .txt / .jsonl files, or one of "
                                f"{', '.join(NAMES)})")
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
        objs = _jsonl_objects(name, text)
        if objs and any(k in objs[0][1] for k in ("prompt", "completion")):
            return [_example(name, i, obj) for i, obj in objs]
        text = "\n".join(_text_field(name, i, obj) for i, obj in objs)
    if not text.strip():
        raise ValueError(f"--data {name}: the file is empty")
    return text


def _jsonl_objects(name: str, raw: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line."""
    objs = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise ValueError(f"--data {name}: line {i} is not JSON") from None
        if not isinstance(obj, dict):
            raise ValueError(f"--data {name}: line {i} is a JSON {type(obj).__name__}, not an object with a "
                             "'text' field or 'prompt' and 'completion' fields")
        objs.append((i, obj))
    if not objs:
        raise ValueError(f"--data {name}: the file is empty")
    return objs


def _text_field(name: str, i: int, obj: dict) -> str:
    if not isinstance(obj.get("text"), str):
        what = "has no 'text' field" if "text" not in obj else \
            f"has a 'text' that is {json.dumps(obj['text'])[:20]}, not a string"
        raise ValueError(f"--data {name}: line {i} {what}")
    return obj["text"]


def _example(name: str, i: int, obj: dict) -> Example:
    """A "prompt" / "completion" line (its first line decides the file's kind): both strings,
    neither empty."""
    for key in ("prompt", "completion"):
        if key not in obj:
            raise ValueError(f"--data {name}: line {i} has no '{key}' field (the file's first line has "
                             "'prompt' / 'completion'; every line needs both)")
        if not isinstance(obj[key], str):
            raise ValueError(f"--data {name}: line {i} has a '{key}' that is {json.dumps(obj[key])[:20]}, "
                             "not a string")
        if not obj[key].strip():
            raise ValueError(f"--data {name}: line {i} has an empty '{key}'")
    return Example(obj["prompt"], obj["completion"], f"{name}:{i}")


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


class TextBatches:
    """Training windows of a text: ``batch(idx)`` is (those windows, None: every token has a label)."""

    def __init__(self, windows: Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def batch(self, idx: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return self.windows[idx], None


class TaskBatches:
    """Tokenized prompt + completion examples. ``batch(idx)`` right-pads the chosen examples to the
    longest of them: (input_ids, labels), labels -100 on the prompt and the padding, so the loss
    is on the completion tokens only. Right padding needs no attention mask: a causal model's
    real tokens never see the padding after them."""

    def __init__(self, seqs: list, n_prompt: list, pad_id: int):
        self.seqs, self.n_prompt, self.pad_id = seqs, n_prompt, pad_id

    def __len__(self) -> int:
        return len(self.seqs)

    def batch(self, idx) -> tuple[Tensor, Tensor]:
        rows = [int(i) for i in idx]
        width = max(len(self.seqs[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, i in enumerate(rows):
            seq = torch.tensor(self.seqs[i], dtype=torch.long)
            ids[r, :len(seq)] = seq
            labels[r, self.n_prompt[i]:len(seq)] = seq[self.n_prompt[i]:]
        return ids, labels


def encode_example(tokenizer, ex: Example, seq_len: int) -> tuple[list, int]:
    """(prompt + completion token ids, number of prompt tokens): the two tokenized apart (as
    ``multiple_choice_accuracy`` does), the prompt cut from the left when the pair is longer than
    ``seq_len``. A completion that leaves no prompt token is refused, naming the file and line."""
    prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
    if not completion or not prompt:
        empty = "completion" if not completion else "prompt"
        raise ValueError(f"--data {ex.where}: the {empty} is no token at all")
    if len(completion) >= seq_len:
        raise ValueError(f"--data {ex.where}: the completion is {len(completion)} tokens; --seq-len {seq_len} "
                         f"leaves room for at most {seq_len - 1} after a prompt token (raise --seq-len)")
    prompt = prompt[max(0, len(prompt) + len(completion) - seq_len):]
    return prompt + completion, len(prompt)


def task_batches(tokenizer, examples: list, seq_len: int) -> TaskBatches:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [encode_example(tokenizer, ex, seq_len) for ex in examples]
    return TaskBatches([e[0] for e in enc], [e[1] for e in enc], pad if pad is not None else 0)


def train_batches(tokenizer, ds: DataSet, seq_len: int) -> tuple:
    """(training batches, calibration windows, validation: windows or TaskBatches or None). A text's
    validation windows are its last ``ds.val_windows`` training windows, kept out of both."""
    if ds.kind == "task":
        val = task_batches(tokenizer, ds.val, seq_len) if ds.val else None
        return task_batches(tokenizer, ds.train, seq_len), token_windows(tokenizer, ds.calibration, seq_len), val
    windows = token_windows(tokenizer, ds.train, seq_len)
    n_val = ds.val_windows
    if n_val and n_val >= windows.shape[0]:
        raise ValueError(f"--val-items {n_val}: --data {ds.spec} has only {windows.shape[0]} training windows "
                         f"of {seq_len} tokens")
    train, val = (windows[:-n_val], windows[-n_val:]) if n_val else (windows, None)
    return TextBatches(train), train, val


@dataclass
class EvalSets:
    """What each evaluation scores: ``heldout`` (windows, or TaskBatches of the held-out items), ``other``
    (windows of the other domain's held-out text, named ``other_name``), ``val`` (as ``heldout``, or
    None), ``wordnet_val`` (WordNet validation items, for their accuracy)."""

    heldout: Union[Tensor, TaskBatches]
    other: Tensor
    other_name: str
    val: Union[Tensor, TaskBatches, None] = None
    wordnet_val: Optional[list] = None


def eval_sets(tokenizer, ds: DataSet, seq_len: int, eval_windows: int, bos: bool = False,
              val=None) -> EvalSets:
    """The evaluation sets of ``ds`` (``eval_windows``: at most that many windows of each text, 0: all)."""
    def windows(text):
        w = token_windows(tokenizer, text, seq_len, bos=bos)
        return w[:eval_windows] if eval_windows else w

    held = task_batches(tokenizer, ds.heldout, seq_len) if ds.kind == "task" else windows(ds.heldout)
    return EvalSets(held, windows(ds.other), ds.other_name, val, ds.wordnet_val)


@torch.no_grad()
def mean_nll(model, data: Union[Tensor, TaskBatches], batch_size: int = 8) -> float:
    """Mean next-token NLL over every predicted token of windows, or over the completion tokens of
    examples (one padded batch of ``batch_size`` examples at a time)."""
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        if isinstance(data, TaskBatches):
            ids, labels = data.batch(range(i, min(i + batch_size, len(data))))
            nll, n = token_nll(model, ids.to(dev), labels.to(dev))
        else:
            nll, n = token_nll(model, data[i:i + batch_size].to(dev))  # no [tokens, vocab] logits at once
        total += nll.item()
        count += n
    return total / max(count, 1)


def exp_or_inf(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def perplexity(model, windows: Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all predicted tokens of the windows."""
    return exp_or_inf(mean_nll(model, windows, batch_size))


def load_wordnet(split: str) -> list[dict]:
    """The shipped WordNet "which word is defined" items (split: train | heldout)."""
    with open(DATA_DIR / f"wordnet_mc_{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def mc_prompt(item: dict) -> str:
    return f'Definition: {item["definition"]}\nThe word defined is "'


@torch.no_grad()
def multiple_choice_accuracy(model, tokenizer, items: list[dict], limit: Optional[int] = None,
                             items_per_batch: int = 8) -> float:
    """Fraction of items whose answer gets the highest summed log-likelihood of
    ``option + '"'`` after the prompt (first option on ties); the options of ``items_per_batch``
    items share one forward."""
    model.eval()
    items = items[:limit] if limit else items
    correct = 0
    for i in range(0, len(items), items_per_batch):
        chunk = items[i:i + items_per_batch]
        scores = _items_option_scores(model, tokenizer, chunk)
        correct += sum(int(int(sc.argmax()) == it["answer"]) for sc, it in zip(scores, chunk))
    return correct / max(1, len(items))


def _option_scores(model, tokenizer, item: dict) -> Tensor:
    """The summed log-likelihood of each option of ``item`` after its prompt."""
    return _items_option_scores(model, tokenizer, [item])[0]


def _items_option_scores(model, tokenizer, items: list[dict]) -> list[Tensor]:
    """Each item's option scores (summed log-likelihood of each option after the item's prompt).
    Every option of every item is one row of a right-padded batch: causal attention keeps the
    padding out of every scored position."""
    dev = next(model.parameters()).device
    seqs, starts, owner = [], [], []  # token ids, where the option starts, the item of each row
    for n, item in enumerate(items):
        prompt = tokenizer(mc_prompt(item), add_special_tokens=False)["input_ids"]
        for opt in item["options"]:
            seqs.append(prompt + tokenizer(opt + '"', add_special_tokens=False)["input_ids"])
            starts.append(len(prompt))
            owner.append(n)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(t) for t in seqs)
    ids = torch.tensor([t + [pad] * (width - len(t)) for t in seqs], device=dev)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    rows = torch.tensor([i for i, (t, s) in enumerate(zip(seqs, starts)) for _ in range(s, len(t))], device=dev)
    pos = torch.tensor([j for t, s in zip(seqs, starts) for j in range(s - 1, len(t) - 1)], device=dev)
    targets = torch.tensor([tok for t, s in zip(seqs, starts) for tok in t[s:]], device=dev)
    # the vocabulary projection only where an option token is predicted
    logits = model.get_output_embeddings()(hidden[rows, pos])
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    token_lp = logp[torch.arange(len(rows), device=dev), targets]
    scores = torch.zeros(len(seqs), dtype=logp.dtype, device=dev).index_add_(0, rows, token_lp).cpu()
    return list(scores.split([len(it["options"]) for it in items]))
