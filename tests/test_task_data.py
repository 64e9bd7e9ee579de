"""Task fine-tuning data (--data wordnet, prompt / completion .jsonl) and the shipped texts:
answer-only labels against a plain-Python tokenization, the loss against full fp64 logits
masked by hand, held-out and validation items kept out of training, file-and-line errors,
exact resume, and the general text's split."""
import json
import re
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import TINY_TEXT  # noqa: E402
from seft_ext import data as D  # noqa: E402
from seft_ext.cli import main  # noqa: E402
from seft_ext.loss import CausalLMLoss, causal_lm_loss  # noqa: E402

WORD = re.compile(r"\w+|[^\w\s]+")  # the Whitespace pre-tokenizer's split, in plain Python


def _wordnet_words() -> list[str]:
    items = D.load_wordnet("train") + D.load_wordnet("heldout")
    return [D.mc_prompt(it) + " ".join(o + '"' for o in it["options"]) for it in items]


@pytest.fixture(scope="module")
def wordnet_model_dir(tmp_path_factory):
    """A tiny random LLaMA whose word-level vocabulary covers every WordNet item (so that distinct
    items have distinct token ids): (folder, vocabulary)."""
    d = tmp_path_factory.mktemp("tiny_wordnet")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([TINY_TEXT] + _wordnet_words(),
                            tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "<pad>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                                pad_token="<pad>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d, fast.get_vocab()


def ref_ids(vocab: dict, text: str) -> list[int]:
    return [vocab.get(w, vocab["[UNK]"]) for w in WORD.findall(text)]


class CharTokenizer:
    """A plain-Python tokenizer: one id per character (1..96); pad 0."""

    pad_token_id, eos_token_id = 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 96 for c in text]}


# ------------------------------------------------------------------------------ labels
def test_wordnet_examples_are_what_the_evaluation_scores():
    for i, item in enumerate(D.load_wordnet("train")[:50]):
        ex = D.load_data("wordnet").train[i]
        assert ex.prompt == D.mc_prompt(item)
        assert ex.completion == item["options"][item["answer"]] + '"'  # the option the accuracy scores
        assert ex.where == f"wordnet_mc_train.jsonl:{i + 1}"


def test_multiple_choice_scores_equal_unpadded_full_logits_fp64():
    """Option scores (an item's options right-padded in one batch) against each option run alone
    through the model with full fp64 logits; the accuracy against the first best option of those
    scores."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    tok = CharTokenizer()
    items = D.load_wordnet("heldout")[:7]
    items[2] = dict(items[2], options=items[2]["options"][:3], answer=min(items[2]["answer"], 2))  # 3 options
    ref, right = [], 0
    for it in items:
        prompt = tok(D.mc_prompt(it))["input_ids"]
        scores = []
        for opt in it["options"]:
            cont = tok(opt + '"')["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([prompt + cont])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont)))
        ref += scores
        right += int(scores.index(max(scores)) == it["answer"])
    got = torch.cat([D._option_scores(model, tok, it) for it in items])
    torch.testing.assert_close(got, torch.tensor(ref, dtype=got.dtype), rtol=1e-9, atol=1e-9)
    together = torch.cat(D._items_option_scores(model, tok, items))  # items of different lengths in one batch
    torch.testing.assert_close(together, torch.tensor(ref, dtype=got.dtype), rtol=1e-9, atol=1e-9)
    acc = D.multiple_choice_accuracy(model, tok, items)
    assert acc == pytest.approx(right / len(items))
    for per_batch in (1, 3):
        assert D.multiple_choice_accuracy(model, tok, items, items_per_batch=per_batch) == acc
    flipped = [dict(it, answer=(it["answer"] + 1) % len(it["options"])) for it in items]
    assert D.multiple_choice_accuracy(model, tok, flipped) != acc or acc == 0


def test_answer_only_labels_cover_exactly_the_completion_tokens(wordnet_model_dir):
    d, vocab = wordnet_model_dir
    tok = transformers.AutoTokenizer.from_pretrained(d)
    items = D.load_wordnet("train")[:24]
    batches = D.task_batches(tok, [D.wordnet_example(it) for it in items], seq_len=128)
    for start in range(0, 24, 8):
        ids, labels = batches.batch(torch.arange(start, start + 8))
        seqs = [ref_ids(vocab, D.mc_prompt(it)) + ref_ids(vocab, it["options"][it["answer"]] + '"')
                for it in items[start:start + 8]]
        assert ids.shape[1] == max(len(s) for s in seqs)  # padded to the longest of the batch only
        for r, it in enumerate(items[start:start + 8]):
            p = ref_ids(vocab, D.mc_prompt(it))
            c = ref_ids(vocab, it["options"][it["answer"]] + '"')
            assert ids[r, :len(p) + len(c)].tolist() == p + c
            assert ids[r, len(p) + len(c):].eq(vocab["<pad>"]).all()
            assert labels[r].tolist() == [-100] * len(p) + c + [-100] * (ids.shape[1] - len(p) - len(c))


def test_a_long_prompt_is_cut_from_the_left_and_a_long_completion_refused():
    tok = CharTokenizer()
    ex = D.Example("abcdefghij", "XYZ", "f.jsonl:3")
    ids, n_prompt = D.encode_example(tok, ex, seq_len=8)
    assert ids == tok("fghij")["input_ids"] + tok("XYZ")["input_ids"] and n_prompt == 5
    with pytest.raises(ValueError, match=r"f\.jsonl:3: the completion is 3 tokens; --seq-len 3"):
        D.encode_example(tok, ex, seq_len=3)


# ------------------------------------------------------------------------------ loss
def _tiny_fp64():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).double()


def test_task_loss_equals_full_logits_masked_by_hand_fp64():
    model = _tiny_fp64()
    tok = CharTokenizer()
    examples = [D.Example("the cat sat", " on the mat."), D.Example("2+2=", "4"),
                D.Example("a much longer prompt than the others", " and its answer")]
    ids, labels = D.task_batches(tok, examples, seq_len=64).batch([0, 1, 2])
    # reference: each example alone (no padding), the full [tokens, vocab] logits, the completion picked by hand
    total, count = torch.zeros((), dtype=torch.float64), 0
    for ex in examples:
        p, c = tok(ex.prompt)["input_ids"], tok(ex.completion)["input_ids"]
        logits = model(input_ids=torch.tensor([p + c]), use_cache=False).logits[0]
        logp = torch.log_softmax(logits, -1)
        for j, t in enumerate(c):
            total -= logp[len(p) + j - 1, t]  # position len(p)+j-1 predicts completion token j
        count += len(c)
    ref = total / count
    ref.backward()
    g_ref = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    loss = CausalLMLoss(model)(ids, labels)  # what the training step calls
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for n, q in model.named_parameters():
        torch.testing.assert_close(q.grad, g_ref[n], rtol=1e-9, atol=1e-11, msg=n)
    assert D.mean_nll(model, D.task_batches(tok, examples, 64), batch_size=2) == pytest.approx(ref.item(), 1e-12)
    assert causal_lm_loss(model, ids, labels).item() == pytest.approx(ref.item(), rel=1e-12)


# ------------------------------------------------------------------------------ the driver
def _wordnet_args(d, out, *extra):
    return ["run", "--model", str(d), "--data", "wordnet", "--val-items", "200", "--sparsity", "0.5", "--pattern",
            "row", "--prune", "wanda", "--method", "seft", "--steps", "8", "--seq-len", "64", "--batch-size", "8",
            "--lr", "1e-2", "--update-interval", "4", "--lora-rank", "1", "--calib-windows", "4", "--eval-windows",
            "2", "--task-items", "5", "--log-every", "2", "--out", str(out), "--no-progress", *extra]


def test_wordnet_trains_on_training_items_only(wordnet_model_dir, tmp_path, monkeypatch):
    d, vocab = wordnet_model_dir
    seen = []
    forward = CausalLMLoss.forward

    def record(self, input_ids, labels=None):
        seen.append((input_ids.clone(), labels.clone()))
        return forward(self, input_ids, labels)

    monkeypatch.setattr(CausalLMLoss, "forward", record)
    assert main(_wordnet_args(d, tmp_path / "out")) == 0

    def key(it):
        return tuple(ref_ids(vocab, D.mc_prompt(it)) + ref_ids(vocab, it["options"][it["answer"]] + '"'))

    train = D.load_wordnet("train")
    allowed = {key(it) for it in train[:1800]}
    forbidden = {key(it) for it in train[1800:] + D.load_wordnet("heldout")}
    assert len(seen) == 8 and not allowed & forbidden
    for ids, labels in seen:
        assert ids.shape[0] == 8
        for row, lab in zip(ids, labels):
            end = int((lab != -100).nonzero().max()) + 1
            seq = tuple(row[:end].tolist())
            assert seq in allowed and seq not in forbidden
            first = int((lab != -100).nonzero().min())
            assert lab[first:end].tolist() == list(seq[first:])  # the completion, and nothing else
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["data"] == "wordnet" and s["val_items"] == 200 and s["other_data"] == "general"
    for stage in ("dense", "pruned", "final"):
        for k in ("ppl", "ppl_other", "acc", "val_loss", "acc_val"):
            assert s[f"{k}_{stage}"] is not None, (k, stage)
    assert s["val_loss_final"] < s["val_loss_pruned"]  # 8 steps on the task lower its validation loss


def test_resume_with_wordnet_is_exact(wordnet_model_dir, tmp_path):
    from safetensors.torch import load_file

    d, _ = wordnet_model_dir
    straight = tmp_path / "straight"
    assert main(_wordnet_args(d, straight, "--checkpoint-every", "3", "--keep-checkpoints", "4")) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for step in (6, 8):
        for suffix in (".json", ".safetensors"):
            (resumed / "checkpoints" / f"step-{step}{suffix}").unlink()
    shutil.rmtree(resumed / "dense")
    assert main(_wordnet_args(d, resumed, "--resume", str(resumed))) == 0
    a = load_file(str(straight / "dense" / "model.safetensors"))
    b = load_file(str(resumed / "dense" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s1, s2 = (json.loads((p / "summary.json").read_text()) for p in (straight, resumed))
    for k in ("ppl_final", "ppl_other_final", "val_loss_final", "acc_val_final", "topology_changes", "reactivated",
              "adapt_pruned"):
        assert s1[k] == s2[k], k
    losses = [[json.loads(ln)["loss"] for ln in (p / "log.jsonl").read_text().splitlines()]
              for p in (straight, resumed)]
    assert losses[0] == losses[1]
    # a resume with another validation split is refused
    assert main(_wordnet_args(d, resumed, "--resume", str(resumed)) + ["--val-items", "100"]) == 2


# ------------------------------------------------------------------------------ .jsonl tasks
def _refused(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("seft: error: "), err
    return last


def _task_args(d, data, out):
    return ["run", "--model", str(d), "--data", str(data), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
            "--calib-windows", "2", "--eval-windows", "1", "--task-items", "0", "--lora-rank", "1", "--out", str(out),
            "--no-progress"]


GOOD = json.dumps({"prompt": "the cat went to the", "completion": " market"})
BAD_TASKS = [
    ("no_completion.jsonl", f'{GOOD}\n{{"prompt": "x"}}\n', r"line 2 has no 'completion' field"),
    ("no_prompt.jsonl", f'{GOOD}\n\n{{"completion": "x"}}\n', r"line 3 has no 'prompt' field"),
    ("empty_completion.jsonl", f'{GOOD}\n{{"prompt": "the dog", "completion": "  "}}\n',
     r"line 2 has an empty 'completion'"),
    ("empty_prompt.jsonl", f'{{"prompt": "", "completion": "x"}}\n{GOOD}\n', r"line 1 has an empty 'prompt'"),
    ("number.jsonl", f'{GOOD}\n{{"prompt": "a", "completion": 3}}\n', r"line 2 has a 'completion' that is 3"),
    ("text_line.jsonl", f'{GOOD}\n{{"text": "a b c"}}\n', r"line 2 has no 'prompt' field"),
    ("broken.jsonl", f'{GOOD}\n{{"prompt": \n', r"line 2 is not JSON"),
    ("one.jsonl", f'{GOOD}\n', r"1 prompt / completion item\(s\); at least 2"),
]


@pytest.mark.parametrize("name, content, match", BAD_TASKS, ids=[n for n, _, _ in BAD_TASKS])
def test_bad_task_jsonl_is_refused_with_file_and_line(tiny_model_dir, tmp_path, capsys, monkeypatch, name, content,
                                                      match):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("seft_ext.models.load_model", boom)
    d, _ = tiny_model_dir
    bad = tmp_path / name
    bad.write_text(content)
    err = _refused(capsys, _task_args(d, bad, tmp_path / "o"))
    assert str(bad) in err and re.search(match, err), err


def test_task_and_text_files_do_not_mix_and_names_stand_alone(tiny_model_dir, tmp_path, capsys):
    d, text = tiny_model_dir
    task = tmp_path / "task.jsonl"
    task.write_text(f"{GOOD}\n{GOOD}\n")
    assert "mixes prompt / completion files with text files" in _refused(capsys, _task_args(d, f"{task},{text}",
                                                                                           tmp_path / "o"))
    assert "cannot be combined with files" in _refused(capsys, _task_args(d, f"wordnet,{task}", tmp_path / "o"))
    assert "--val-items 2: --data" in _refused(capsys, _task_args(d, task, tmp_path / "o") + ["--val-items", "2"])
    assert "--val-items must be an int >= 0" in _refused(capsys, _task_args(d, task, tmp_path / "o")
                                                         + ["--val-items", "-1"])


def test_a_completion_longer_than_seq_len_is_refused_naming_the_line(tiny_model_dir, tmp_path, capsys):
    d, _ = tiny_model_dir
    f = tmp_path / "long.jsonl"
    f.write_text(f"{GOOD}\n{GOOD}\n" + json.dumps({"prompt": "the", "completion": " cat" * 20}) + "\n" + GOOD + "\n")
    err = _refused(capsys, _task_args(d, f, tmp_path / "o"))
    assert f"{f}:3: the completion is 20 tokens; --seq-len 16" in err


def test_jsonl_task_trains_and_holds_out_its_last_tenth(tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir
    words = ("cat", "dog", "bird", "fish")
    lines = [json.dumps({"prompt": f"the {a} went to the", "completion": f" {b}", "id": i})
             for i, (a, b) in enumerate((a, b) for a in words for b in ("market", "river", "garden", "house"))]
    f = tmp_path / "task.jsonl"
    f.write_text("\n".join(lines) + "\n")
    ds = D.load_data(str(f), val_items=3)
    assert [e.where for e in ds.heldout] == [f"{f}:16"]  # 16 items: the last one held out
    assert [e.where for e in ds.val] == [f"{f}:{i}" for i in (13, 14, 15)]
    assert [e.where for e in ds.train] == [f"{f}:{i}" for i in range(1, 13)]
    assert ds.other_name == "general"
    assert main(_task_args(d, f, tmp_path / "o") + ["--val-items", "3"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["val_loss_final"] is not None and s["ppl_other_final"] is not None


# ------------------------------------------------------------------------------ the shipped texts
def test_general_text_loads_and_its_parts_do_not_overlap():
    train, held = D.shipped_text("general")
    assert train.startswith("It is a truth universally acknowledged") and len(train) > 600_000
    assert held.startswith("Sir Walter Elliot, of Kellynch Hall") and len(held) > 50_000
    kjv_train, kjv_held = D.shipped_text("kjv")
    assert D.shipped_text("default") == (kjv_train, kjv_held)
    assert "LORD" not in train + held and "Elizabeth" in train
    paragraphs = {p for p in train.splitlines() if len(p) > 40}
    assert not any(p in paragraphs for p in held.splitlines() if len(p) > 40)
    assert D.load_data("general").other == kjv_held and D.load_data("general").other_name == "kjv"
    for spec in ("default", "kjv", "wordnet"):
        assert D.load_data(spec).other == held and D.load_data(spec).other_name == "general"
    assert D.load_text("general") == (train, held)


def test_text_validation_windows_are_the_last_training_windows():
    tok = CharTokenizer()
    ds = D.load_data("default", val_items=5)
    everything = D.token_windows(tok, ds.train, 256)
    batches, calib, val = D.train_batches(tok, ds, 256)
    assert torch.equal(torch.cat([batches.windows, val]), everything) and val.shape[0] == 5
    assert torch.equal(calib, batches.windows)
    ids, labels = batches.batch(torch.tensor([0, 3]))
    assert labels is None and torch.equal(ids, everything[[0, 3]])
    with pytest.raises(ValueError, match="--val-items 99999: --data default has only"):
        D.train_batches(tok, D.load_data("default", val_items=99999), 256)


@pytest.mark.parametrize("spec, other", [("general", "kjv"), ("wordnet", "general")])
def test_eval_reports_the_other_domain(tiny_model_dir, capsys, spec, other):
    d, _ = tiny_model_dir
    assert main(["eval", "--model", str(d), "--data", spec, "--seq-len", "32", "--eval-windows", "2",
                 "--task-items", "3", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["other_data"] == other and res["ppl"] > 1 and 0 <= res["acc"] <= 1
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    windows = D.token_windows(tok, D.shipped_text(other)[1], 32)[:2]
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].double()
    nll = -torch.log_softmax(logits, -1).gather(-1, windows[:, 1:, None]).mean()
    assert res["ppl_other"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)
