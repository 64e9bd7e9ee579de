"""Users' own training loops: transformers.Trainer with SEFTCallback on a tiny LLaMA, and the
PEFT-style save / load / merge around it."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

import seft_ext  # noqa: E402
from seft_ext import SEFTConfig, SEFTLinear, convert_to_seft, seft_layers  # noqa: E402
from seft_ext.hf import SEFTCallback  # noqa: E402

SC = SEFTConfig(sparsity=0.7, update_interval=4, grow_accumulation=2, lora_rank=2)


def tiny_config(hidden=32):
    return transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return d


def load_base(base_dir):
    return transformers.LlamaForCausalLM.from_pretrained(base_dir)


def converted(base_dir):
    model = load_base(base_dir)
    convert_to_seft(model, SC)
    return model


def dataset(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids.clone()} for _ in range(n)]


def trainer(model, out, cb, **kw):
    args = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True, seed=3)
    args.update(kw)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**args), train_dataset=dataset(),
                                callbacks=[cb])


def seft_state(model):
    return {f"{n}.{f}": getattr(m, f).detach().clone() for n, m in seft_layers(model).items()
            for f in ("crow", "col", "theta", "delta_slots", "delta")}


def logits(model, seed=5):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------- save / load
def test_save_then_from_pretrained_is_bit_identical(base_dir, tmp_path):
    model = converted(base_dir)
    trainer(model, tmp_path / "out", SEFTCallback(SC)).train()
    seft_ext.save_pretrained(model, tmp_path / "seft")
    info = json.loads((tmp_path / "seft" / "seft_config.json").read_text())
    assert info["seft_config"] == SC.to_dict() and info["target_modules"] == list(seft_layers(model))
    assert info["base_model"]["name_or_path"] == str(base_dir)
    reloaded = seft_ext.from_pretrained(load_base(base_dir), tmp_path / "seft")
    assert torch.equal(logits(model), logits(reloaded))
    for k, v in seft_state(model).items():
        assert torch.equal(v, seft_state(reloaded)[k]), k
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = seft_ext.from_pretrained(load_base(base_dir), tmp_path / "seft", is_trainable=True)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == \
        [f"{n}.delta" for n in seft_layers(trainable)]


def test_from_pretrained_refuses_other_bases_and_changes_nothing(base_dir, tmp_path):
    model = converted(base_dir)
    seft_ext.save_pretrained(model, tmp_path / "seft")
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(tiny_config())  # same shapes, other weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="differs from the one"):
        seft_ext.from_pretrained(other, tmp_path / "seft")
    assert not seft_layers(other) and all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    wider = transformers.LlamaForCausalLM(tiny_config(hidden=48))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj' is 48x48 in the base model but 32x32"):
        seft_ext.from_pretrained(wider, tmp_path / "seft")
    with pytest.raises(FileNotFoundError, match="seft_config.json"):
        seft_ext.from_pretrained(load_base(base_dir), tmp_path)
    f = tmp_path / "seft" / "seft_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or modified"):
        seft_ext.from_pretrained(load_base(base_dir), tmp_path / "seft")
    with pytest.raises(ValueError, match="no SEFTLinear"):
        seft_ext.save_pretrained(load_base(base_dir), tmp_path / "plain")


def test_merge_and_unload_and_parameter_count(base_dir, tmp_path):
    model = converted(base_dir)
    trainer(model, tmp_path / "out", SEFTCallback(SC), max_steps=6).train()
    layers = seft_layers(model)
    t, a = seft_ext.trainable_parameters(model)
    assert t == sum(m.k for m in layers.values())
    outside = sum(p.numel() for n, p in model.named_parameters() if not any(n.startswith(s + ".") for s in layers))
    assert a == sum(m.nnz + m.k for m in layers.values()) + outside
    ref = logits(model)
    nnz = {n: m.nnz for n, m in layers.items()}
    dense = seft_ext.merge_and_unload(converted_copy(model))
    sparse = seft_ext.merge_and_unload(converted_copy(model), sparse=True)
    for n, k in nnz.items():
        assert isinstance(dense.get_submodule(n), nn.Linear)
        assert int((dense.get_submodule(n).weight != 0).sum()) <= k  # theta + delta can cancel to 0
        assert sparse.get_submodule(n).nnz == k
    torch.testing.assert_close(logits(dense), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(sparse), ref, rtol=1e-5, atol=1e-5)


def converted_copy(model):
    import copy
    return copy.deepcopy(model)


# ---------------------------------------------------------------------- Trainer
def test_checkpoint_folder_loads_and_what_auto_model_does(base_dir, tmp_path):
    model = converted(base_dir)
    trainer(model, tmp_path / "out", SEFTCallback(SC), save_strategy="steps", save_steps=6).train()
    ckpt = tmp_path / "out" / "checkpoint-12"
    assert (ckpt / "seft_config.json").is_file() and (ckpt / "seft_controller.safetensors").is_file()
    reloaded = seft_ext.from_pretrained(load_base(base_dir), ckpt)
    assert torch.equal(logits(model), logits(reloaded))
    # AutoModelForCausalLM does not know the SEFT layers: it loads the base architecture and reports the
    # sparse tensors as unexpected and the dense weights as missing (freshly initialised): use
    # seft_ext.from_pretrained(base, checkpoint) instead.
    plain, info = transformers.AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    assert "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]
    assert "model.layers.0.self_attn.q_proj.crow" in info["unexpected_keys"]
    assert not torch.allclose(logits(plain), logits(model))


def test_resume_from_checkpoint_equals_straight_run(base_dir, tmp_path):
    straight = converted(base_dir)
    cb = SEFTCallback(SC)
    trainer(straight, tmp_path / "a", cb, save_strategy="steps", save_steps=7).train()
    assert [t for t, _ in cb.controller.history] == [4, 8]
    resumed = converted(base_dir)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-7", tmp_path / "b" / "checkpoint-7")  # mid-window (8 evolves)
    cb2 = SEFTCallback(SC)
    trainer(resumed, tmp_path / "b", cb2).train(resume_from_checkpoint=True)
    assert cb2.controller.step_count == 12 and [t for t, _ in cb2.controller.history] == [8]
    for k, v in seft_state(straight).items():
        assert torch.equal(v, seft_state(resumed)[k]), k


def test_resume_refuses_a_checkpoint_without_controller_state(base_dir, tmp_path):
    model = converted(base_dir)
    trainer(model, tmp_path / "a", SEFTCallback(SC), save_strategy="steps", save_steps=6, max_steps=6).train()
    (tmp_path / "a" / "checkpoint-6" / "seft_controller.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="seft_controller.safetensors is missing"):
        trainer(converted(base_dir), tmp_path / "a", SEFTCallback(SC)).train(resume_from_checkpoint=True)


def test_gradient_accumulation_steps_the_controller_once_per_optimizer_step(base_dir, tmp_path):
    model = converted(base_dir)
    cb = SEFTCallback(SC)
    trainer(model, tmp_path / "out", cb, gradient_accumulation_steps=2, per_device_train_batch_size=2).train()
    assert cb.controller.step_count == 12 and [t for t, _ in cb.controller.history] == [4, 8]
    w = [m.window for m in seft_layers(model).values()]
    assert all(x.tracked is None for x in w)  # windows closed and reset after the last evolution


def test_bf16_autocast_trains(base_dir, tmp_path):
    model = converted(base_dir)
    cb = SEFTCallback(SC)
    trainer(model, tmp_path / "out", cb, bf16=True).train()
    assert sum(r.get("grown", 0) for _, rep in cb.controller.history for r in rep.values()) > 0
    for m in seft_layers(model).values():
        assert m.delta.dtype == torch.float32 and m.theta.dtype == torch.float32
        assert torch.isfinite(m.delta).all() and m.delta.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dense_compute", [False, True])
def test_autocast_matches_nn_linear_under_autocast(dense_compute, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    layer = SEFTLinear.from_linear(lin, SEFTConfig(sparsity=0.5, k=40))
    layer.dense_compute = dense_compute
    with torch.no_grad():
        layer.delta.normal_()
    ref = nn.Linear(24, 16)
    with torch.no_grad():
        ref.weight.copy_(layer.to_dense())
        ref.bias.copy_(lin.bias)
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        yr = ref(x)
    assert y.dtype == yr.dtype == dtype
    torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.delta.grad.dtype == torch.float32 and torch.isfinite(layer.delta.grad).all()
    with pytest.raises(ValueError, match="run under torch.autocast"):
        layer(x.double())


# ---------------------------------------------------------------------- torchrun
DDP_SCRIPT = r'''
import sys, torch, transformers
from seft_ext import SEFTConfig, convert_to_seft, seft_layers
from seft_ext.distributed import topology_hash
from seft_ext.hf import SEFTCallback
base, out = sys.argv[1], sys.argv[2]
model = transformers.LlamaForCausalLM.from_pretrained(base)
sc = SEFTConfig(sparsity=0.7, update_interval=4, grow_accumulation=2, lora_rank=2)
convert_to_seft(model, sc)
g = torch.Generator().manual_seed(1)
data = [{"input_ids": (i := torch.randint(0, 64, (16,), generator=g)), "labels": i.clone()} for _ in range(64)]
args = transformers.TrainingArguments(output_dir=out, max_steps=10, per_device_train_batch_size=2, learning_rate=1e-2,
    report_to=[], save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True, seed=3)
cb = SEFTCallback(sc)
transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
rank = torch.distributed.get_rank()
grown = sum(r.get("grown", 0) for _, rep in cb.controller.history for r in rep.values())
with open(f"{out}/rank{rank}.txt", "w") as f:
    f.write(f"{topology_hash(list(seft_layers(model).values()))} {cb.controller.world} {grown}")
'''


def test_torchrun_trainer_keeps_one_topology(base_dir, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(base_dir), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [(tmp_path / f"rank{i}.txt").read_text().split() for i in range(2)]
    assert results[0][0] == results[1][0]  # same topology on both ranks
    assert results[0][1] == "2" and int(results[0][2]) > 0  # the controller used the process group; it evolved


# ---------------------------------------------------------------------- PEFT export
def test_peft_export_reloads_in_peft(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from seft_ext.peft_export import export_peft

    model = converted(base_dir)
    trainer(model, tmp_path / "out", SEFTCallback(SC), max_steps=8).train()
    ref = logits(model)
    base_dir_out, adapter = export_peft(model, None, tmp_path / "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir_out)
    for name, layer in seft_layers(model).items():  # the base holds the final theta, the delta is not in it
        w = base.get_submodule(name).weight
        assert int((w != 0).sum()) == int((layer.theta != 0).sum())
    loaded = peft.PeftModel.from_pretrained(base, adapter)
    torch.testing.assert_close(logits(loaded), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(transformers.AutoModelForCausalLM.from_pretrained(base_dir_out)), ref)
