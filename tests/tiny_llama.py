"""A tiny random LLaMA, calibration batches for it and its linears' inputs: the pruning tests' shared setup."""
import pytest
import torch


V = 64  # the vocabulary


def random_llama(seed=0):
    """2 layers, hidden 32, fp32, in training mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def tiny_llama():
    """random_llama(0) in fp64, in eval mode (the pruning references)."""
    return random_llama(0).double().eval()


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


def linear_inputs(model, names, data):
    """Inputs of the named linears over a whole-model forward, via hooks (fp64, flattened)."""
    got = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for ids in data:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}
