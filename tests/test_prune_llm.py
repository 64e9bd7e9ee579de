"""prune_model on a tiny randomly initialised LLaMA: exact counts, and layer-by-layer
statistics equal to those gathered by hooks on the whole model."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seft_ext import SEFTConfig, convert_to_seft, seft_layers  # noqa: E402
from seft_ext.prune import sparsegpt_prune, wanda_mask  # noqa: E402
from seft_ext.prune_llm import prune_model  # noqa: E402
from tiny_llama import batches, linear_inputs, tiny_llama  # noqa: E402


LIN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
       "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_layer_by_layer_matches_whole_model_hooks(method):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    data = batches()
    masks = prune_model(model, method, 0.5, "row", calibration=data, progress=False)
    assert sorted(masks) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in LIN)
    for i in range(2):  # layer i sees the outputs of the already pruned layers before it
        names = [f"model.layers.{i}.{n}" for n in LIN]
        xs = linear_inputs(ref, names, data)
        for name in names:
            lin = ref.get_submodule(name)
            if method == "wanda":
                mask = wanda_mask(lin.weight, (xs[name] ** 2).sum(0), 0.5, "row")
                new_w = lin.weight * mask
            else:
                mask, new_w = sparsegpt_prune(lin.weight, xs[name].T @ xs[name], 0.5, "row")
            assert torch.equal(masks[name], mask), name
            torch.testing.assert_close(model.get_submodule(name).weight, new_w, rtol=1e-9, atol=1e-9)
            assert int(mask.sum()) == lin.out_features * lin.in_features // 2
        with torch.no_grad():  # prune the reference's layer i the same way before looking at layer i + 1
            for name in names:
                ref.get_submodule(name).weight.copy_(model.get_submodule(name).weight)


def test_magnitude_and_convert_keep_the_masks():
    model = tiny_llama().float()
    masks = prune_model(model, "magnitude", 0.75, "nm", nm=(1, 4), progress=False)
    convert_to_seft(model, SEFTConfig(sparsity=0.75, budget="nm", nm_n=1, nm_m=4, lora_rank=1), masks=masks)
    for name, layer in seft_layers(model).items():
        assert torch.equal(layer.merged().mask(), masks[name])
        assert layer.sparsity == pytest.approx(0.75)


def test_prune_model_rejects_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="method"):
        prune_model(model, "random", 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(model, "wanda", 1.0, calibration=batches())
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, "wanda", 0.5)
    with pytest.raises(ValueError, match="empty"):
        prune_model(model, "sparsegpt", 0.5, calibration=[])
    with pytest.raises(TypeError, match="decoder layers"):
        prune_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), "magnitude", 0.5)
