"""What the training step keeps alive, and activation checkpointing with SEFT's evolution window.

- ``_SEFTLinearFn`` saves no copy of the layer's values for backward; its gradients equal
  autograd's through a dense reference built from the same theta + delta.
- With the decoder layers checkpointed (the recomputed forward runs inside backward), each
  layer's window is fed exactly once per backward pass, and training with evolution ends
  bit-identical to training without checkpointing.
- The LoRA baseline's rank matches SEFT's trainable budget over the decoder linears.
"""
import pytest
import torch

from seft_ext import SEFTConfig, SEFTController, SEFTLinear, convert_to_seft, seft_layers
from seft_ext.prune import magnitude_mask
from seft_ext.sparse import CSRWeight
from seft_ext.training import enable_checkpointing

transformers = pytest.importorskip("transformers")

from tiny_llama import V  # noqa: E402
from tiny_llama import random_llama as tiny_llama  # noqa: E402


def _layer(out=24, inp=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    base = CSRWeight.from_dense(w, magnitude_mask(w, 0.6, "layer"))
    layer = SEFTLinear(base, 30, torch.randn(out, generator=g), seed=seed)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(layer.k, generator=g) * 0.1)
    return layer


def test_no_values_copy_saved_and_gradients_match_dense_reference():
    layer = _layer()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    nnz = layer.nnz
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    # saved: x, the delta (the parameter itself), theta and the pattern buffers; no fresh nnz-sized tensor
    fresh = [t for t in y.grad_fn.saved_tensors if t.numel() == nnz and t is not layer.theta
             and t.data_ptr() not in (layer.theta.data_ptr(), layer.col.data_ptr())]
    assert not fresh
    dy = torch.randn_like(y)
    y.backward(dy)
    # independent reference: the dense weight from theta and delta, autograd through F.linear
    w = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(layer.out_features), layer.crow.diff().long())
    theta_d = torch.zeros_like(w)
    theta_d[rows, layer.col.long()] = layer.theta.double()
    d = layer.delta.detach().double().clone().requires_grad_(True)
    slot_r, slot_c = rows[layer.delta_slots], layer.col.long()[layer.delta_slots]
    w = theta_d.index_put((slot_r, slot_c), d, accumulate=True)
    xr = x.detach().double().requires_grad_(True)
    yr = torch.nn.functional.linear(xr, w, layer.bias.double())
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta.grad.double(), d.grad, rtol=1e-5, atol=1e-5)


def test_stale_backward_after_theta_changes_is_refused():
    layer = _layer()
    y = layer(torch.randn(4, layer.in_features))
    with torch.no_grad():
        layer.theta.mul_(2)  # in place: the saved theta's version moves on
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _train(ckpt: bool, steps=6):
    model = tiny_llama()
    cfg = SEFTConfig(sparsity=0.6, update_interval=2, grow_accumulation=2, lora_rank=2)
    convert_to_seft(model, cfg)
    if ckpt:
        enable_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl = SEFTController(model, opt, cfg, steps)
    gen = torch.Generator().manual_seed(3)
    counts, grown = [], 0
    for _ in range(steps):
        batch = torch.randint(0, V, (4, 12), generator=gen)
        before = {n: m.window.count for n, m in seft_layers(model).items()}
        model(batch, labels=batch).loss.backward()
        counts.append({n: m.window.count - before[n] for n, m in seft_layers(model).items()})
        opt.step()
        opt.zero_grad()
        report = ctl.step()
        grown += sum(r.get("grown", 0) for r in (report or {}).values())
    return model, counts, grown, len(ctl.history)


def test_checkpointing_feeds_each_window_once_and_training_is_bit_identical():
    ref, ref_counts, ref_grown, ref_evolutions = _train(False)
    ck, counts, grown, evolutions = _train(True)
    assert ref_evolutions == evolutions >= 2 and grown == ref_grown > 0
    assert counts == ref_counts
    assert all(c in (0, 1) for step in counts for c in step.values())  # one backward pass: at most one feed
    assert any(c == 1 for step in counts for c in step.values())
    for (n, a), (_, b) in zip(seft_layers(ref).items(), seft_layers(ck).items()):
        for arr in ("crow", "col", "theta", "delta_slots", "delta"):
            assert torch.equal(getattr(a, arr), getattr(b, arr)), (n, arr)


def test_lora_rank_matches_seft_budget():
    peft = pytest.importorskip("peft")
    from seft_ext.lora import add_lora, decoder_linear_names, lora_rank_for, merge_and_remask, trainable_count

    model = tiny_llama()
    names = decoder_linear_names(model)
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    cfg = SEFTConfig(sparsity=0.5, lora_rank=3)
    assert lora_rank_for(model, cfg) == 3  # the default budget k = lora_rank * (in + out)
    per_rank = sum(sum(model.get_submodule(n).weight.shape) for n in names)
    assert lora_rank_for(model, SEFTConfig(sparsity=0.5, k=5 * per_rank // 14)) in (4, 5)
    masks = {n: magnitude_mask(model.get_submodule(n).weight.detach(), 0.5, "row") for n in names}
    pm = add_lora(model, 3)
    assert isinstance(pm, peft.PeftModel) and trainable_count(pm) == 3 * per_rank
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # a trained adapter
    merged = merge_and_remask(pm, masks)
    for n, keep in masks.items():
        w = merged.get_submodule(n).weight
        assert torch.all(w[~keep] == 0) and torch.count_nonzero(w[keep]) > 0.9 * keep.sum()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_loaded_weights_do_not_keep_the_file_mapped(tmp_path):
    import gc

    from seft_ext.models import load_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    ref = transformers.LlamaForCausalLM(cfg)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_model(str(tmp_path), progress=False)
    gc.collect()
    mapped = [line for line in open("/proc/self/maps") if str(tmp_path) in line]
    assert not mapped
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    for (n, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n


def test_return_freed_memory_respects_the_environment(monkeypatch):
    import sys

    from seft_ext._memory import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert return_freed_memory() is False  # the user's own setting wins
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert return_freed_memory() is (sys.platform.startswith("linux") and _glibc())


def _glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"
