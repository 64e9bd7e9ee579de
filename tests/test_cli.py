"""The `seft` driver end to end on a tiny randomly initialised LLaMA (prune -> train ->
export -> reload), and its refusals."""
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from seft_ext.cli import main  # noqa: E402

@pytest.mark.parametrize("prune, pattern, method", [("wanda", "row", "seft"), ("sparsegpt", "2:4", "spiel"),
                                                    ("magnitude", "unstructured", "fixed"),
                                                    ("wanda", "row", "masked-dense")])
def test_run_end_to_end(tiny_model_dir, tmp_path, prune, pattern, method):
    d, data = tiny_model_dir
    out = tmp_path / "out"
    rc = main(["run", "--model", str(d), "--data", str(data), "--sparsity", "0.5", "--pattern", pattern,
               "--prune", prune, "--method", method, "--steps", "12", "--seq-len", "16", "--batch-size", "4",
               "--lr", "1e-2", "--update-interval", "4", "--lora-rank", "1", "--calib-windows", "8",
               "--eval-windows", "4", "--task-items", "0", "--log-every", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("method", "prune", "sparsity_target", "sparsity_final", "ppl_dense", "ppl_pruned", "ppl_final",
                "steps", "train_seconds", "peak_memory_bytes", "topology_changes"):
        assert key in s, key
    assert s["sparsity_final"] == pytest.approx(0.5)
    assert s["ppl_final"] < s["ppl_pruned"]  # 12 steps on repetitive text repair the pruned model
    logs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [4, 8, 12]
    if method == "fixed":
        assert s["topology_changes"] == 0
    # the exported dense folder reloads, keeps the sparsity and gives the final perplexity
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "dense")
    ws = [m.weight for n, m in reloaded.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    assert zeros == pytest.approx(0.5, abs=1e-3)  # (a kept weight is exactly 0 only by chance)


@pytest.mark.parametrize("method", ["seft", "spiel"])
def test_summary_sums_the_evolution_reports(tiny_model_dir, tmp_path, monkeypatch, method):
    """summary.json's grown / re-activated / adapt-pruned counts are the controller's reports
    summed over layers and steps; spiel grows on active positions only and never prunes."""
    from seft_ext.evolve import SEFTController

    reports, step = [], SEFTController.step

    def recording_step(self):
        report = step(self)
        if report:
            reports.append(report)
        return report

    monkeypatch.setattr(SEFTController, "step", recording_step)
    d, data = tiny_model_dir
    out = tmp_path / "out"
    assert main(["run", "--model", str(d), "--data", str(data), "--sparsity", "0.5", "--method", method,
                 "--steps", "12", "--seq-len", "16", "--lr", "1e-2", "--update-interval", "4", "--lora-rank", "1",
                 "--calib-windows", "8", "--eval-windows", "4", "--task-items", "0", "--no-export", "--out", str(out),
                 "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert len(reports) >= 2

    def total(count):
        return sum(r.get(count, 0) for rep in reports for r in rep.values())

    assert (s["topology_changes"], s["reactivated"], s["adapt_pruned"]) == (
        total("grown"), total("reactivated"), total("pruned"))
    assert s["topology_changes"] > 0
    if method == "spiel":
        assert s["reactivated"] == 0 and s["adapt_pruned"] == 0
    else:
        assert 0 < s["reactivated"] <= s["topology_changes"]


@pytest.mark.parametrize("args, match", [
    (["--model", "/nonexistent/model"], "no such folder"),
    (["--data", "/nonexistent.txt"], "no such file"),
    (["--sparsity", "1.0"], "sparsity"),
    (["--budget", "nm"], "needs an N:M --pattern"),
])
def test_run_refuses_bad_input(tiny_model_dir, tmp_path, capsys, args, match):
    d, data = tiny_model_dir
    base = ["run", "--model", str(d), "--data", str(data), "--steps", "1", "--seq-len", "16", "--out",
            str(tmp_path / "o"), "--no-progress", "--task-items", "0"]
    rc = main(base + args)
    msg = capsys.readouterr().err
    assert rc == 2 and msg.startswith("seft: error: ") and match in msg


def test_empty_data_file(tiny_model_dir, tmp_path, capsys):
    d, _ = tiny_model_dir
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = main(["run", "--model", str(d), "--data", str(empty), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "empty" in capsys.readouterr().err


def _run_args(d, data, out, *extra):
    return ["run", "--model", str(d), "--data", str(data), "--sparsity", "0.5", "--pattern", "row", "--prune",
            "wanda", "--method", "seft", "--steps", "12", "--seq-len", "16", "--batch-size", "4", "--lr", "1e-2",
            "--update-interval", "4", "--lora-rank", "1", "--calib-windows", "8", "--eval-windows", "4",
            "--task-items", "0", "--log-every", "2", "--out", str(out), "--no-progress", *extra]


def test_resume_from_a_checkpoint_is_exact(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file
    d, data = tiny_model_dir
    straight = tmp_path / "straight"
    assert main(_run_args(d, data, straight, "--checkpoint-every", "3")) == 0
    ckpts = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert ckpts == ["step-12.json", "step-12.safetensors", "step-9.json", "step-9.safetensors"]  # keeps 2
    straight = tmp_path / "straight2"
    assert main(_run_args(d, data, straight, "--checkpoint-every", "3", "--keep-checkpoints", "4")) == 0
    # resume a copy from step 3: an evolution window (steps 1-4, evolution at 4) is in flight
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for step in (6, 9, 12):
        for suffix in (".json", ".safetensors"):
            (resumed / "checkpoints" / f"step-{step}{suffix}").unlink()
    info = json.loads((resumed / "checkpoints" / "step-3.json").read_text())
    assert info["windows"]["model.layers.0.self_attn.q_proj"]["count"] == 3  # scanned at 1, tracked at 2, 3
    shutil.rmtree(resumed / "dense")
    assert main(_run_args(d, data, resumed, "--resume", str(resumed))) == 0
    a = load_file(str(straight / "dense" / "model.safetensors"))
    b = load_file(str(resumed / "dense" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s1 = json.loads((straight / "summary.json").read_text())
    s2 = json.loads((resumed / "summary.json").read_text())
    assert s1["ppl_final"] == s2["ppl_final"] and s1["topology_changes"] == s2["topology_changes"]


def test_resume_refuses_changed_config_and_damaged_checkpoints(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    out = tmp_path / "run"
    assert main(_run_args(d, data, out, "--checkpoint-every", "6")) == 0
    assert main(_run_args(d, data, out, "--resume", str(out), "--lr", "5e-3")) == 2
    assert "different configuration" in capsys.readouterr().err
    # a modified newest tensor file: the older intact checkpoint is used, with a warning
    newest = out / "checkpoints" / "step-12.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[-1] ^= 0xFF
    newest.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="truncated or modified"):
        assert main(_run_args(d, data, out, "--resume", str(out))) == 0
    # nothing intact left: a clear error
    (out / "checkpoints" / "step-6.safetensors").write_bytes(b"")
    assert main(_run_args(d, data, out, "--resume", str(out))) == 2
    assert "no intact checkpoint" in capsys.readouterr().err


def test_sparse_export_reloads_as_sparse_layers(tiny_model_dir, tmp_path):
    from seft_ext.hf import load_sparse
    d, data = tiny_model_dir
    out = tmp_path / "out"
    assert main(_run_args(d, data, out)) == 0
    dense = transformers.AutoModelForCausalLM.from_pretrained(out / "dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(d)  # the original dense weights
    names = load_sparse(model, out / "sparse.safetensors")
    assert len(names) == 14
    ids = torch.randint(0, 20, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    for n in names:
        assert model.get_submodule(n).sparsity == pytest.approx(0.5)


def test_prune_then_train_then_export(tiny_model_dir, tmp_path):
    d, data = tiny_model_dir
    opts = ["--data", str(data), "--seq-len", "16", "--batch-size", "4", "--calib-windows", "8", "--eval-windows",
            "4", "--task-items", "0", "--no-progress", "--sparsity", "0.5", "--pattern", "2:4"]
    assert main(["prune", "--model", str(d), "--out", str(tmp_path / "p"), *opts]) == 0
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["steps"] == 0 and s["ppl_final"] == s["ppl_pruned"]
    assert main(["train", "--model", str(tmp_path / "p" / "dense"), "--out", str(tmp_path / "t"), "--steps", "8",
                 "--lr", "1e-2", "--update-interval", "4", "--lora-rank", "1", "--checkpoint-every", "4",
                 *opts]) == 0
    t = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert t["prune"] == "existing" and t["sparsity_final"] == pytest.approx(0.5)
    assert t["ppl_dense"] == t["ppl_pruned"] == pytest.approx(s["ppl_pruned"], rel=1e-6)  # the model as given
    # without the evaluation before training: the same training, no dense / pruned stages
    assert main(["train", "--model", str(tmp_path / "p" / "dense"), "--out", str(tmp_path / "t2"), "--steps", "8",
                 "--lr", "1e-2", "--update-interval", "4", "--lora-rank", "1", "--no-eval-before", *opts]) == 0
    t2 = json.loads((tmp_path / "t2" / "summary.json").read_text())
    assert "ppl_dense" not in t2 and "ppl_pruned" not in t2
    assert t2["ppl_final"] == t["ppl_final"] and t2["topology_changes"] == t["topology_changes"]
    assert main(["export", "--run", str(tmp_path / "t"), "--out", str(tmp_path / "x"), "--no-progress"]) == 0
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "dense")
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "dense")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_bf16_run(tiny_model_dir, tmp_path):
    d, data = tiny_model_dir
    out = tmp_path / "bf16"
    assert main(_run_args(d, data, out, "--dtype", "bf16")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["sparsity_final"] == pytest.approx(0.5) and s["ppl_final"] < s["ppl_pruned"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "dense")
    assert reloaded.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device, match", [("cuda", "no CUDA device|no CUDA kernels"), ("tpu", "cpu, cuda or cuda:N"),
                                           ("bogus", "cpu, cuda or cuda:N")])
def test_rejects_unusable_device(tmp_path, capsys, device, match):
    assert main(["run", "--model", str(tmp_path), "--device", device, "--out", str(tmp_path / "o")]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
