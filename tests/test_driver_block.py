"""The `seft` driver with --pattern block:RxC on a tiny randomly initialised LLaMA: run, prune
-> train -> export, exact resume, the sparse export in blocks, and the refusals."""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from seft_ext.cli import main  # noqa: E402


def _opts(d, data, out, *extra):
    return ["run", "--model", str(d), "--data", str(data), "--sparsity", "0.5", "--pattern", "block:4x4",
            "--prune", "wanda", "--method", "seft", "--steps", "12", "--seq-len", "16", "--batch-size", "4",
            "--lr", "1e-2", "--update-interval", "4", "--lora-rank", "2", "--calib-windows", "8",
            "--eval-windows", "4", "--task-items", "0", "--log-every", "4", "--out", str(out), "--no-progress",
            *extra]


def _decoder_weights(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "layers." in n}


def _block_nonzero(w, r=4, c=4):
    """bool [out / r, in / c]: the blocks holding a non-zero (the tiny model's shapes divide by 4)."""
    out, inn = w.shape
    return (w != 0).view(out // r, r, inn // c, c).any(3).any(1)


def _assert_block_structured(weights, sparsity, per_row):
    for n, w in weights.items():
        nz = _block_nonzero(w)
        # every kept block is whole: zeros only inside pruned blocks (a kept weight is 0 only by chance)
        kept_weights = nz.repeat_interleave(4, 0).repeat_interleave(4, 1)
        assert int(((w == 0) & kept_weights).sum()) <= 1, n
        if per_row:  # pruned: the same number of blocks in every block row
            counts = nz.sum(1)
            assert int(counts.min()) == int(counts.max()) == round((1 - sparsity) * nz.shape[1]), n
        else:  # trained with the layer budget: the layer's block count is kept
            assert int(nz.sum()) == nz.shape[0] * round((1 - sparsity) * nz.shape[1]), n


def test_run_with_blocks_trains_moves_blocks_and_exports(tiny_model_dir, tmp_path):
    from seft_ext import SEFTBlockLinear
    from seft_ext.hf import load_sparse

    d, data = tiny_model_dir
    out = tmp_path / "out"
    assert main(_opts(d, data, out)) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["pattern"] == "block:4x4" and s["sparsity_final"] == pytest.approx(0.5)
    assert s["ppl_final"] < s["ppl_pruned"]
    assert s["topology_changes"] > 0
    dense = _decoder_weights(out / "dense")
    _assert_block_structured(dense, 0.5, per_row=False)
    # the sparse export reloads as block layers giving the dense export's logits
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    names = load_sparse(model, out / "sparse.safetensors")
    assert len(names) == 14
    assert all(model.get_submodule(n).weight.block == (4, 4) for n in names)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out / "dense")
    ids = torch.randint(0, 20, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert SEFTBlockLinear.__name__  # the layer class the run trained (exported above as SparseLinear)


def test_block_resume_is_exact(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    d, data = tiny_model_dir
    straight = tmp_path / "straight"
    assert main(_opts(d, data, straight, "--checkpoint-every", "3", "--keep-checkpoints", "4")) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for step in (6, 9, 12):
        for suffix in (".json", ".safetensors"):
            (resumed / "checkpoints" / f"step-{step}{suffix}").unlink()
    shutil.rmtree(resumed / "dense")
    assert main(_opts(d, data, resumed, "--resume", str(resumed))) == 0
    a = load_file(str(straight / "dense" / "model.safetensors"))
    b = load_file(str(resumed / "dense" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_block_prune_then_train_then_export(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    opts = ["--data", str(data), "--seq-len", "16", "--batch-size", "4", "--calib-windows", "8", "--eval-windows",
            "4", "--task-items", "0", "--no-progress", "--sparsity", "0.75", "--pattern", "block:4x4"]
    assert main(["prune", "--model", str(d), "--out", str(tmp_path / "p"), "--prune", "magnitude", *opts]) == 0
    _assert_block_structured(_decoder_weights(tmp_path / "p" / "dense"), 0.75, per_row=True)
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "p"), "--out", str(tmp_path / "px"), "--no-progress"]) == 2
    err = capsys.readouterr().err  # a run without checkpoints is named as the option the user gave
    assert err.startswith(f"seft: error: --run {tmp_path / 'p'}: no checkpoints folder") and "--checkpoint-every" in err
    assert main(["train", "--model", str(tmp_path / "p" / "dense"), "--out", str(tmp_path / "t"), "--steps", "8",
                 "--lr", "1e-2", "--update-interval", "4", "--lora-rank", "2", "--checkpoint-every", "4", *opts]) == 0
    t = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert t["prune"] == "existing" and t["sparsity_final"] == pytest.approx(0.75)
    _assert_block_structured(_decoder_weights(tmp_path / "t" / "dense"), 0.75, per_row=False)
    assert main(["export", "--run", str(tmp_path / "t"), "--out", str(tmp_path / "x"), "--no-progress"]) == 0
    capsys.readouterr()
    rc = main(["export", "--run", str(tmp_path / "t"), "--out", str(tmp_path / "y"), "--format", "peft",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("seft: error: ") and "block" in err


def test_existing_zeros_that_are_not_blocks_are_refused(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    opts = ["--data", str(data), "--seq-len", "16", "--batch-size", "4", "--calib-windows", "8", "--eval-windows",
            "4", "--task-items", "0", "--no-progress", "--sparsity", "0.5"]
    assert main(["prune", "--model", str(d), "--out", str(tmp_path / "p"), "--pattern", "row", *opts]) == 0
    capsys.readouterr()
    rc = main(["train", "--model", str(tmp_path / "p" / "dense"), "--out", str(tmp_path / "t"), "--steps", "2",
               "--pattern", "block:4x4", *opts])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("seft: error: ") and "--prune existing --pattern block:4x4: the zeros of" in err
    assert not (tmp_path / "t" / "summary.json").exists()


@pytest.mark.parametrize("args, match", [
    (["--pattern", "block:0x4"], "--pattern"),
    (["--pattern", "block:4"], "block:RxC"),
    (["--pattern", "blocks"], "--pattern must be one of"),
    (["--pattern", "block:4x4", "--method", "masked-dense"], "masked-dense"),
    (["--pattern", "block:4x4", "--budget", "nm"], "needs an N:M --pattern"),
])
def test_block_pattern_refusals(tiny_model_dir, tmp_path, capsys, args, match):
    d, data = tiny_model_dir
    out = tmp_path / "o"
    rc = main(["run", "--model", str(d), "--data", str(data), "--steps", "1", "--seq-len", "16", "--out", str(out),
               "--no-progress", "--task-items", "0", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("seft: error: ") and match in err, err
    assert not out.exists()
