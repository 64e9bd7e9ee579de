"""Checkpoints at the library level: what resume restores (the RNG states included) and that a
checkpoint which does not fit changes nothing."""
import json

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from seft_ext import SEFTConfig, SEFTController, checkpoint, convert_to_seft  # noqa: E402

CFG = SEFTConfig(sparsity=0.5, lora_rank=1, update_interval=3, grow_accumulation=2, scan_sketch=0)


def dense_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 8, dtype=torch.float64))


def setup():
    model = dense_model()
    convert_to_seft(model, CFG)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt, SEFTController(model, opt, CFG, total_steps=12)


def train(model, opt, ctl, steps):
    for _ in range(steps):
        model(torch.randn(4, 12, dtype=torch.float64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ctl.step()


def saved_run(tmp_path, steps=2):
    model, opt, ctl = setup()
    train(model, opt, ctl, steps)
    data_rng = torch.Generator().manual_seed(5)
    torch.randint(0, 9, (7,), generator=data_rng)
    checkpoint.save(tmp_path, steps, model, opt, ctl, data_rng, {"run_id": "r", "args": {}, "summary": {}})
    return model, data_rng


def test_resume_restores_the_global_and_data_rng(tmp_path):
    """The global torch RNG (dropout draws from it) and the data RNG continue where they were."""
    torch.manual_seed(123)
    saved_run(tmp_path)
    expected_global = torch.rand(5)
    model, opt, ctl = setup()
    data_rng = torch.Generator().manual_seed(0)
    torch.manual_seed(999)  # a new process starts elsewhere
    info, st = checkpoint.latest(tmp_path)
    model = dense_model()
    tensors = checkpoint.restore(info, st, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl = SEFTController(model, opt, CFG, total_steps=12)
    checkpoint.restore_training(info, tensors, opt, ctl, data_rng, st)
    assert torch.equal(torch.rand(5), expected_global)
    ref = torch.Generator().manual_seed(5)
    torch.randint(0, 9, (7,), generator=ref)
    assert torch.equal(torch.randint(0, 9, (20,), generator=data_rng), torch.randint(0, 9, (20,), generator=ref))


def test_restore_changes_nothing_when_a_later_layer_is_bad(tmp_path):
    saved_run(tmp_path)
    st = tmp_path / "checkpoints" / "step-2.safetensors"
    with safe_open(str(st), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(st))
    tensors["model.2.delta_slots"] = tensors["model.2.delta_slots"].flip(0).contiguous()  # the last layer
    save_file(tensors, str(st), metadata=meta)
    info = json.loads(meta["seft_checkpoint"])
    model = dense_model()
    before = [type(m) for m in model]
    with pytest.raises(checkpoint.CheckpointError, match=r"step-2.safetensors: layer '2': delta_slots"):
        checkpoint.restore(info, st, model)
    assert [type(m) for m in model] == before  # layer 0 was fine and is not swapped either


def test_restore_refuses_a_model_without_that_linear(tmp_path):
    saved_run(tmp_path)
    info, st = checkpoint.latest(tmp_path)
    model = dense_model()
    model[2] = nn.Linear(16, 9, dtype=torch.float64)
    with pytest.raises(checkpoint.CheckpointError, match=r"layer '2': the model has no nn.Linear \(8, 16\)"):
        checkpoint.restore(info, st, model)
    assert isinstance(model[0], nn.Linear)
