import pytest
import torch

import seft_ext
from seft_ext import ops

ISAS = ["base"] + (["avx2"] if "avx2" in seft_ext.build_info.CPU_ISAS.split(",") else [])


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test with each CPU kernel set built into the library."""
    try:
        ops.cpu_isa(request.param)
    except RuntimeError as e:  # built, but this CPU lacks the instructions
        pytest.skip(str(e))
    yield request.param
    ops.cpu_isa("auto")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY_TEXT = " ".join(f"the {a} {b} went to the {c} and saw a {a}." for a in ("cat", "dog", "bird", "fish")
                     for b in ("quickly", "slowly", "happily") for c in ("market", "river", "garden", "house")) * 6


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaMA saved as a Hugging Face folder with a word-level tokenizer, and a
    text file: (folder, text file)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("tiny")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([TINY_TEXT], tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    data = d / "text.txt"
    data.write_text(TINY_TEXT.replace(". ", ".\n"))
    return d, data
