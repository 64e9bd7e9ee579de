"""A short SEFT fine-tune of a tiny randomly initialised LLaMA (transformers)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from seft_ext import SEFTConfig, SEFTController, convert_to_seft, seft_layers  # noqa: E402

from tiny_llama import V  # noqa: E402
from tiny_llama import random_llama as tiny_llama  # noqa: E402


def chains(perm, gen, batch=8, length=16):
    """Token chains that follow a fixed permutation: learnable next-token structure."""
    x = torch.empty(batch, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (batch,), generator=gen)
    for i in range(1, length):
        x[:, i] = perm[x[:, i - 1]]
    return x


@pytest.mark.parametrize("method, budget", [("seft", "layer"), ("seft", "row"), ("spiel", "layer")])
def test_loss_falls_and_sparsity_stays_exact(method, budget):
    model = tiny_llama()
    cfg = SEFTConfig(sparsity=0.7, update_interval=5, grow_accumulation=3, lora_rank=2, method=method,
                     budget=budget)
    convert_to_seft(model, cfg)
    layers = seft_layers(model)
    assert len(layers) == 14  # 7 projections x 2 blocks; lm_head stays dense
    base = {n: (m.nnz, m.crow.clone()) for n, m in layers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    total = 80
    ctl = SEFTController(model, opt, cfg, total)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(V, generator=gen)
    losses, reactivated = [], 0
    for _ in range(total):
        batch = chains(perm, gen)
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        report = ctl.step()
        if report:
            reactivated += sum(r.get("reactivated", 0) for r in report.values())
            for n, layer in layers.items():
                assert layer.nnz == base[n][0]
                if budget == "row":
                    assert torch.equal(layer.crow, base[n][1])
                layer.merged().validate()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.25, (first, last)
    assert len(ctl.history) == 11  # steps 5, 10, ..., 55 (at 60 = 0.75 * 80 the cosine is 0)
    if method == "seft":
        assert reactivated > 0
    else:
        assert reactivated == 0
    # the merged model is a plain dense model with the same outputs
    batch = chains(perm, gen)
    with torch.no_grad():
        ref = model(batch).logits
        for name, layer in layers.items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, torch.nn.Linear(layer.in_features, layer.out_features,
                                                                       bias=False))
            getattr(model.get_submodule(parent), attr).weight.copy_(layer.to_dense())
        torch.testing.assert_close(model(batch).logits, ref, rtol=1e-4, atol=1e-4)
