"""The `seft` driver with --method lora on a tiny randomly initialised LLaMA: the adapter trains
with the budget's rank, both evaluations (unmerged, merged and re-masked) equal independent
computations, the export keeps exactly the pruning mask, and the refused combinations."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("tokenizers")

from seft_ext.cli import main  # noqa: E402

COMMON = ["--data", None, "--sparsity", "0.5", "--prune", "wanda", "--steps", "12", "--seq-len", "16",
          "--batch-size", "4", "--lr", "1e-2", "--lora-rank", "2", "--calib-windows", "8", "--eval-windows", "4",
          "--task-items", "0", "--log-every", "4", "--no-progress"]


def _opts(command, d, data, out, *extra, pattern="row"):
    common = [str(data) if x is None else x for x in COMMON]
    return [command, "--model", str(d), *common, "--pattern", pattern, "--out", str(out), *extra]


def _lora(d, data, out, *extra, pattern="row"):
    return _opts("run", d, data, out, "--method", "lora", *extra, pattern=pattern)


def _decoder_weights(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "layers." in n}


def _summary(out):
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """(lora run folder, pruned model folder): a LoRA run and `seft prune` with the same options."""
    d, data = tiny_model_dir
    root = tmp_path_factory.mktemp("lora")
    assert main(_lora(d, data, root / "lora")) == 0
    assert main(_opts("prune", d, data, root / "pruned")) == 0
    return root / "lora", root / "pruned" / "dense"


def _evaluate(model, d, data):
    from seft_ext.data import load_data
    from seft_ext.models import load_tokenizer
    from seft_ext.pipeline import evaluate, evaluation_sets, options

    a = options("run", data=str(data), seq_len=16, batch_size=4, eval_windows=4, task_items=0)
    tok = load_tokenizer(d)
    with torch.no_grad():
        return evaluate(model.eval(), tok, evaluation_sets(model, tok, load_data(a.data), a), a)


def test_lora_trains_with_the_budget_rank(runs, tiny_model_dir):
    from seft_ext import SEFTConfig
    from seft_ext.lora import lora_rank_for
    from safetensors.torch import load_file

    out, pruned = runs
    s = _summary(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir[0])
    assert s["method"] == "lora" and s["lora_rank"] == lora_rank_for(model, SEFTConfig(lora_rank=2)) == 2
    assert s["ppl_final_unmerged"] < s["ppl_pruned"] and s["ppl_final"] < s["ppl_pruned"]
    assert s["topology_changes"] == 0 and s["sparsity_final"] == pytest.approx(0.5)
    assert s["train_seconds"] > 0 and s["peak_memory_bytes"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12] and all(r["topology_changes"] == 0 for r in log)
    cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and len(cfg["target_modules"]) == 14
    adapter = load_file(str(out / "lora_adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(bool(v.abs().sum() > 0) for v in lora_b)  # PEFT starts B at 0


def test_export_keeps_exactly_the_pruning_mask(runs, tmp_path):
    from seft_ext.hf import load_sparse

    out, pruned = runs
    tuned, base = _decoder_weights(out / "dense"), _decoder_weights(pruned)
    assert tuned.keys() == base.keys() and len(tuned) == 14
    for n in tuned:
        assert torch.equal(tuned[n] == 0, base[n] == 0), n
        assert not torch.equal(tuned[n], base[n]), n
    # the sparse export: exactly the mask's positions, computing what the dense export computes
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned)
    names = load_sparse(model, out / "sparse.safetensors")
    assert sorted(names) == sorted(tuned)
    assert all(model.get_submodule(n).nnz == int((base[n] != 0).sum()) for n in names)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out / "dense")
    ids = torch.randint(0, 20, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "3", "--no-progress",
                 "--no-stream"]) == 0


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT on transformers 5
def test_both_evaluations_equal_independent_computations(runs, tiny_model_dir):
    """Unmerged: PEFT's own model of the adapter on the pruned base. Re-masked: that adapter merged
    by PEFT and the pruned positions zeroed by hand, a plain dense model."""
    out, pruned = runs
    d, data = tiny_model_dir
    s = _summary(out)
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(pruned),
                                           out / "lora_adapter")
    unmerged = _evaluate(model, d, data)
    assert unmerged["ppl"] == pytest.approx(s["ppl_final_unmerged"], rel=1e-6)
    assert unmerged["ppl_other"] == pytest.approx(s["ppl_other_final_unmerged"], rel=1e-6)
    merged = model.merge_and_unload()
    base = _decoder_weights(pruned)
    with torch.no_grad():
        for n, w in base.items():
            merged.get_submodule(n).weight.mul_(w != 0)
    exported = _decoder_weights(out / "dense")
    for n in base:
        torch.testing.assert_close(merged.get_submodule(n).weight, exported[n], rtol=0, atol=1e-7)
    remasked = _evaluate(merged, d, data)
    assert remasked["ppl"] == pytest.approx(s["ppl_final"], rel=1e-5)
    assert remasked["ppl_other"] == pytest.approx(s["ppl_other_final"], rel=1e-5)


@pytest.mark.parametrize("pattern", ["2:4", "block:4x4"])
def test_lora_on_nm_and_blocks_keeps_the_pattern(tiny_model_dir, tmp_path, pattern):
    from seft_ext.hf import load_sparse
    from seft_ext.ops import csr_check_nm

    d, data = tiny_model_dir
    out = tmp_path / "out"
    assert main(_lora(d, data, out, "--steps", "4", pattern=pattern)) == 0
    assert _summary(out)["sparsity_final"] == pytest.approx(0.5)
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    for n in load_sparse(model, out / "sparse.safetensors"):
        w = model.get_submodule(n).weight
        if pattern == "2:4":
            csr_check_nm(w.crow, w.col, w.shape[1], 2, 4)
        else:
            assert w.block == (4, 4)


def test_lora_bf16_with_a_density_budget(tiny_model_dir, tmp_path):
    from seft_ext import SEFTConfig
    from seft_ext.lora import lora_rank_for

    d, data = tiny_model_dir
    out = tmp_path / "out"
    assert main(_lora(d, data, out, "--steps", "3", "--dtype", "bf16", "--density", "0.3")) == 0
    s = _summary(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    rank = lora_rank_for(model, SEFTConfig(density=0.3))
    assert rank != 2 and s["lora_rank"] == rank
    assert json.loads((out / "lora_adapter" / "adapter_config.json").read_text())["r"] == rank
    assert s["sparsity_final"] == pytest.approx(0.5) and s["ppl_final"] is not None


@pytest.mark.parametrize("extra, named", [
    (["--checkpoint-every", "4"], "--checkpoint-every"),
    (["--resume", "somewhere"], "--resume"),
])
def test_lora_refuses_checkpoints_and_resume(tiny_model_dir, tmp_path, capsys, extra, named):
    d, data = tiny_model_dir
    out = tmp_path / "out"
    assert main(_lora(d, data, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"seft: error: {named}") and "--method lora" in err[0]
    assert not out.exists()  # refused before anything was written


def test_lora_under_torchrun_matches_one_process(tiny_model_dir, tmp_path):
    """2 ranks of 2 windows each: the global batch of one process with 4 (DDP averages the adapter's
    gradients); only rank 0 writes."""
    d, data = tiny_model_dir
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(_lora(d, data, single)) == 0
    args = _lora(d, data, ddp)
    args[args.index("--batch-size") + 1] = "2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "seft_ext.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _summary(single), _summary(ddp)
    assert b["world_size"] == 2 and b["lora_rank"] == a["lora_rank"]
    assert b["ppl_final"] == pytest.approx(a["ppl_final"], rel=1e-3)
    assert b["ppl_final_unmerged"] == pytest.approx(a["ppl_final_unmerged"], rel=1e-3)
    assert len((ddp / "log.jsonl").read_text().splitlines()) == 3


def test_interrupt_message_says_lora_cannot_resume(tmp_path):
    from seft_ext.cli import _interrupted
    from seft_ext.pipeline import options

    a = options("run", method="lora", out=str(tmp_path))
    line = _interrupted(a, ["run", "--method", "lora"], 5)
    assert line == "seft: interrupted after step 5; --method lora writes no checkpoints, so the run cannot be resumed"
