"""convert_to_seft + prune_model + SEFT training on tiny random models of the LLaMA, Mistral,
Qwen2 and Gemma3 families; other architectures are refused clearly; conversion frees each
dense weight as soon as its sparse replacement is in place."""
import gc
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seft_ext import SEFTConfig, SEFTController, SEFTLinear, convert_to_seft  # noqa: E402
from seft_ext.prune_llm import prune_model  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {"head_dim": 8}),
}


def tiny(family):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**COMMON, **extra)).float()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_convert_train(family):
    model = tiny(family)
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    masks = prune_model(model, "wanda", 0.5, "row", calibration=[ids[:4], ids[4:]], progress=False)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    cfg = SEFTConfig(sparsity=0.5, lora_rank=1, update_interval=3, grow_accumulation=2)
    names = convert_to_seft(model, cfg, masks=masks)
    assert len(names) == 7 * COMMON["num_hidden_layers"]  # q k v o gate up down; lm_head stays dense
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    with torch.no_grad():  # the delta starts at 0: the converted model is the pruned model
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl = SEFTController(model, opt, cfg, total_steps=12)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
        losses.append(loss.item())
    assert ctl.history and losses[-1] < losses[0]
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, SEFTLinear) and layer.nnz == int(masks[name].sum())


def test_other_architectures_are_refused_clearly():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                                bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        convert_to_seft(gpt2, SEFTConfig(sparsity=0.5), target=["attn"])  # GPT-2 uses Conv1D, not nn.Linear
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(TypeError, match="hold no nn.Linear .*Conv1D.*LLaMA / Mistral / Qwen / Gemma"):
        prune_model(gpt2, "wanda", 0.5, "row", calibration=[ids], progress=False)


def test_conversion_holds_one_dense_layer_at_a_time(monkeypatch):
    model = tiny("llama")
    refs = [weakref.ref(m.weight) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    alive_at_call = []
    original = SEFTLinear.from_linear.__func__

    def counting(cls, linear, *a, **k):
        gc.collect()
        alive_at_call.append(sum(r() is not None for r in refs))
        return original(cls, linear, *a, **k)

    monkeypatch.setattr(SEFTLinear, "from_linear", classmethod(counting))
    convert_to_seft(model, SEFTConfig(sparsity=0.5, lora_rank=1))
    # at the i-th conversion the i earlier dense weights are gone: only the not yet converted remain
    assert alive_at_call == [len(refs) - i for i in range(len(refs))]
    gc.collect()
    assert all(r() is None for r in refs)
