"""The chunked causal-LM loss against plain fp64 math on the full logits: value and gradients."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from seft_ext import SEFTConfig, convert_to_seft, seft_layers  # noqa: E402
from seft_ext.loss import causal_lm_loss, token_nll  # noqa: E402


def tiny(softcap=None, seed=0):
    torch.manual_seed(seed)
    if softcap is None:
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg).double()
    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64, final_logit_softcapping=softcap)
    return transformers.Gemma3ForCausalLM(cfg).double()


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk", [7, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_hf_loss_and_gradients(softcap, chunk, masked):
    model = tiny(softcap)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if masked:
        labels[:, :12] = -100  # an answer-only loss
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # fp64, [batch, tokens, vocab]
    y = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = -(logp * (y != -100)).sum() / (y != -100).sum()
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = causal_lm_loss(model, ids, labels, chunk_tokens=chunk)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-9, atol=1e-11, msg=n)
    _, count = token_nll(model, ids, labels)
    assert count == int((labels[:, 1:] != -100).sum())


def test_reaches_the_seft_deltas():
    model = tiny().float()
    convert_to_seft(model, SEFTConfig(sparsity=0.5, lora_rank=1))
    ids = torch.randint(0, 97, (2, 16))
    causal_lm_loss(model, ids, chunk_tokens=5).backward()
    ref = {n: m.delta.grad.clone() for n, m in seft_layers(model).items()}
    for m in seft_layers(model).values():
        m.delta.grad = None
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for n, m in seft_layers(model).items():
        torch.testing.assert_close(m.delta.grad, ref[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("masked", [False, True])
def test_frozen_head_one_pass_matches_reference(softcap, masked):
    """A frozen lm_head takes the one-pass path (loss and dh together): same value and gradients."""
    model = tiny(softcap)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    if masked:
        labels[:, :9] = -100
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    y = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = -(logp * (y != -100)).sum() / (y != -100).sum()
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = causal_lm_loss(model, ids, labels, chunk_tokens=7)
    assert loss.grad_fn is not None
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert head.weight.grad is None
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-9, atol=1e-11, msg=n)
