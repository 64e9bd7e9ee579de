"""The `seft` driver refuses bad options, option combinations and data before any work (exit
status 2, `seft: error: ...` naming the option or the file and line), and `seft eval`
refuses model folders it cannot score."""
import json
import os
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from seft_ext.cli import main  # noqa: E402


def base_args(d, data, out, command="run"):
    return [command, "--model", str(d), "--data", str(data), "--sparsity", "0.5", "--pattern", "row", "--steps",
            "4", "--seq-len", "16", "--batch-size", "4", "--lr", "1e-2", "--update-interval", "2", "--lora-rank",
            "1", "--calib-windows", "4", "--eval-windows", "2", "--task-items", "0", "--log-every", "1", "--out",
            str(out), "--no-progress"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the driver gets as far as loading a model."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr("seft_ext.models.load_model", boom)


def refused(capsys, argv) -> str:
    """Runs `seft argv`; asserts exit status 2 and one `seft: error:` line; returns it."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]  # (transformers may draw its own progress bars above)
    assert last.startswith("seft: error: "), err
    return last


# ---------------------------------------------------------------------------------- options
def _unwritable_out(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return blocker / "sub"


BAD_OPTIONS = [
    (["--log-every", "0"], "--log-every"),
    (["--threads", "-1"], "--threads"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--eval-windows", "-1"], "--eval-windows"),
    (["--task-items", "-3"], "--task-items"),
    (["--sparsity", "nan"], "--sparsity"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "--pattern 2:4"),
    (["--pattern", "4:8", "--sparsity", "0.3"], "--pattern 4:8"),
    (["--calib-windows", "0"], "--calib-windows"),
    (["--seed", str(1 << 63)], "--seed"),
    (["--update-interval", "0"], "--update-interval"),
    (["--lora-rank", "0"], "--lora-rank"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--seq-len", "4"], "--seq-len"),
    (["--resume", "/nonexistent/run"], "--resume"),
    (["--drop-fraction", "1.5"], "--drop-fraction must be in [0, 1]"),
    (["--evolve-until", "nan"], "--evolve-until must be finite"),
    (["--k", "0"], "--k must be a positive int"),
]


@pytest.mark.parametrize("extra, option", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_option_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys, no_model_load, extra,
                                                      option):
    d, data = tiny_model_dir
    err = refused(capsys, base_args(d, data, tmp_path / "o") + extra)
    assert option in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make_out", ["file", "under_a_file", "proc"])
def test_unusable_out_is_refused(tiny_model_dir, tmp_path, capsys, no_model_load, make_out):
    d, data = tiny_model_dir
    if make_out == "file":
        out = tmp_path / "a_file"
        out.write_text("x")
    elif make_out == "under_a_file":
        out = _unwritable_out(tmp_path)
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        out = Path("/proc/seft-out")  # not writable, even for root
    err = refused(capsys, base_args(d, data, out))
    assert "--out" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_out_is_refused(tiny_model_dir, tmp_path, capsys, no_model_load):
    d, data = tiny_model_dir
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "cannot write" in refused(capsys, base_args(d, data, ro / "out"))
    finally:
        ro.chmod(0o700)


def test_export_refuses_unusable_out(tiny_model_dir, tmp_path, capsys):
    err = refused(capsys, ["export", "--run", str(tmp_path), "--out", str(_unwritable_out(tmp_path))])
    assert "--out" in err


def test_train_on_a_dense_model_is_refused_before_evaluation(tiny_model_dir, tmp_path, capsys, monkeypatch):
    d, data = tiny_model_dir

    def boom(*a, **k):
        raise AssertionError("evaluated before the refusal")
    monkeypatch.setattr("seft_ext.pipeline.evaluate", boom)
    err = refused(capsys, base_args(d, data, tmp_path / "o", command="train"))
    assert "--prune existing" in err and "no pruned weights" in err


# ---------------------------------------------------------------------------------- data
def _write(path: Path, content) -> Path:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


GOOD_LINE = json.dumps({"text": "the cat went to the market and saw a dog. " * 3})
BAD_DATA = [
    ("null_text.jsonl", f'{GOOD_LINE}\n{{"text": null}}\n', r"line 2 has a 'text' that is null"),
    ("number_text.jsonl", f'{GOOD_LINE}\n\n{{"text": 7}}\n', r"line 3 has a 'text' that is 7"),
    ("list_line.jsonl", f'[1, 2]\n{GOOD_LINE}\n', r"line 1 is a JSON list"),
    ("string_line.jsonl", f'{GOOD_LINE}\n"just text"\n', r"line 2 is a JSON str"),
    ("no_text.jsonl", f'{GOOD_LINE}\n{{"body": "x"}}\n', r"line 2 has no 'text' field"),
    ("broken.jsonl", f'{GOOD_LINE}\n{GOOD_LINE}\n{{"text": \n', r"line 3 is not JSON"),
    ("latin1.txt", "first line\nsecond line\nna\xefve third\n".encode("latin-1"), r"line 3 is not UTF-8"),
    ("empty.txt", "", r"empty.txt: the file is empty"),
    ("blank.jsonl", "\n  \n", r"blank.jsonl: the file is empty"),
    ("empty_texts.jsonl", '{"text": ""}\n{"text": "  "}\n', r"the file is empty"),
]


@pytest.mark.parametrize("name, content, match", BAD_DATA, ids=[n for n, _, _ in BAD_DATA])
def test_bad_data_is_refused_with_file_and_line(tiny_model_dir, tmp_path, capsys, no_model_load, name, content,
                                                match):
    import re

    d, data = tiny_model_dir
    bad = _write(tmp_path / name, content)
    err = refused(capsys, base_args(d, f"{data},{bad}", tmp_path / "o"))
    assert str(bad) in err and re.search(match, err), err


def test_jsonl_text_fields_are_what_trains(tmp_path):
    from seft_ext.data import read_data_file

    f = _write(tmp_path / "ok.jsonl", '{"text": "alpha"}\n\n{"text": "beta", "id": 3}\n')
    assert read_data_file(str(f)) == "alpha\nbeta"


# ---------------------------------------------------------------------------------- training
def test_non_finite_loss_stops_the_run_naming_the_step(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    out = tmp_path / "o"
    args = base_args(d, data, out) + ["--lr", "1e30", "--method", "fixed"]
    err = refused(capsys, args)
    assert "the loss at step 2 is nan" in err or "the loss at step 2 is inf" in err, err
    # everything in the log is JSON (no bare NaN), and the run wrote no summary
    for line in (out / "log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in log.jsonl"))
    assert not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------- seft eval
def test_eval_refuses_a_folder_without_tokenizer(tiny_model_dir, tmp_path, capsys):
    d, _ = tiny_model_dir
    bare = tmp_path / "bare"
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    model.save_pretrained(bare)
    err = refused(capsys, ["eval", "--model", str(bare), "--data", str(tiny_model_dir[1]), "--seq-len", "16",
                           "--task-items", "0", "--no-progress"])
    assert "no tokenizer" in err


def test_eval_refuses_a_folder_of_seft_state_dicts(tiny_model_dir, tmp_path, capsys):
    from seft_ext import SEFTConfig, convert_to_seft

    d, data = tiny_model_dir
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    convert_to_seft(model, SEFTConfig(lora_rank=1))
    folder = tmp_path / "seft_state"
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(d).save_pretrained(folder)
    err = refused(capsys, ["eval", "--model", str(folder), "--data", str(data), "--seq-len", "16", "--task-items",
                           "0", "--no-progress"])
    assert "SEFT layers" in err and "missing" in err
