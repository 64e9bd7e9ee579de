"""SEFTCallback inside transformers.Trainer on a tiny LLaMA."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from seft_ext import SEFTConfig, convert_to_seft, seft_layers  # noqa: E402
from seft_ext.hf import SEFTCallback  # noqa: E402


def test_trainer_drives_evolution(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    sc = SEFTConfig(sparsity=0.7, update_interval=4, grow_accumulation=2, lora_rank=2)
    convert_to_seft(model, sc)
    nnz = {n: m.nnz for n, m in seft_layers(model).items()}
    data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": None} for _ in range(64)]
    for d in data:
        d["labels"] = d["input_ids"].clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=100,
                                          use_cpu=True, disable_tqdm=True)
    cb = SEFTCallback(sc)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert cb.controller is not None and cb.controller.step_count == 12
    assert [t for t, _ in cb.controller.history] == [4, 8]  # 12 > 0.75 * 12
    assert sum(r.get("grown", 0) for _, rep in cb.controller.history for r in rep.values()) > 0
    for n, m in seft_layers(model).items():
        assert m.nnz == nnz[n]
