import pytest
import torch

from seft_ext import ops
from cuda_env import CPU_ISAS, CUDA_PATHS, CUDA_SKIP_REASON, DEVICES, KERNELS, SELECTION_ERROR


def pytest_configure(config):
    if SELECTION_ERROR:
        raise pytest.UsageError(SELECTION_ERROR)


def _use(device, name):
    """Switch to one kernel set (ops.cpu_isa / ops.cuda_path); skip where this CPU lacks it."""
    try:
        (ops.cpu_isa if device == "cpu" else ops.cuda_path)(name)
    except RuntimeError as e:  # built, but this CPU lacks the instructions
        pytest.skip(str(e))


def _kernel(request):
    device, name = request.param
    dtype = request.node.callspec.params.get("dtype")
    if name == "tensor_core" and dtype in (torch.float32, torch.float64):
        pytest.skip("no tensor-core path for this dtype (the cuda_core case covers it)")
    _use(device, name)
    try:
        yield device
    finally:
        ops.cpu_isa("auto")
        ops.cuda_path("auto")


@pytest.fixture(params=KERNELS, ids=[f"{d}-{k}" for d, k in KERNELS])
def kernel(request):
    """Run a test with every kernel set of every device present; the value is the device.
    A test whose `dtype` parameter is float32 / float64 skips the forced tensor-core path
    (it exists for bfloat16 / float16 only)."""
    yield from _kernel(request)


_CUDA_KERNELS = ([pytest.param(("cuda", k), id=f"cuda-{k}") for k in CUDA_PATHS] if "cuda" in DEVICES
                 else [pytest.param(None, id="cuda", marks=pytest.mark.skip(reason=CUDA_SKIP_REASON))])


@pytest.fixture(params=_CUDA_KERNELS)
def cuda_kernel(request):
    """Every CUDA kernel path, for cases that only CUDA needs (launch-grid limits); skipped
    without CUDA. The value is the device, "cuda"."""
    yield from _kernel(request)


@pytest.fixture(params=DEVICES)
def device(request):
    """Run a test on every device present, with the default kernels."""
    return request.param


@pytest.fixture(params=CPU_ISAS)
def isa(request):
    """Run a test with each CPU kernel set built into the library."""
    _use("cpu", request.param)
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
