"""Inference with a run's sparse model: `seft generate` and seft_ext.generate give the same greedy
tokens as Hugging Face `generate` on the dense model rebuilt from the sparse export by torch's own
CSR, and bad input is refused before any model loads."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
safetensors = pytest.importorskip("safetensors")

from seft_ext.cli import main  # noqa: E402
from seft_ext.generate import generate_text, load_sparse_model, prompt_ids  # noqa: E402
from seft_ext.layer import SparseLinear  # noqa: E402

PROMPT = "In the beginning God created"
NEW = 12


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """The output folder of a short `seft run` on the tiny LLaMA (70% magnitude, 4 SEFT steps)."""
    d, data = tiny_model_dir
    out = tmp_path_factory.mktemp("gen") / "run"
    rc = main(["run", "--model", str(d), "--data", str(data), "--sparsity", "0.7", "--pattern", "row", "--prune",
               "magnitude", "--steps", "4", "--seq-len", "16", "--batch-size", "4", "--lr", "1e-2",
               "--update-interval", "2", "--lora-rank", "1", "--eval-windows", "2", "--task-items", "0",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def reference_model(tiny_model_dir, run_dir):
    """The original tiny model with every layer of the sparse export written in as a dense
    weight (torch's CSR to_dense; zeros where the export has no entry)."""
    from safetensors import safe_open

    d, _ = tiny_model_dir
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    with safe_open(str(run_dir / "sparse.safetensors"), framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        for name, shape in shapes.items():
            crow, col, val = (f.get_tensor(f"{name}.{k}") for k in ("crow", "col", "values"))
            dense = torch.sparse_csr_tensor(crow.long(), col.long(), val, size=tuple(shape),
                                            check_invariants=True).to_dense()
            with torch.no_grad():
                model.get_submodule(name).weight.copy_(dense)
    assert len(shapes) == 14  # 2 layers x 7 linears
    return model


def reference_tokens(tiny_model_dir, run_dir, tok) -> torch.Tensor:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = reference_model(tiny_model_dir, run_dir).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0)
    return out[0, ids.shape[1]:]


def test_generate_matches_the_dense_masked_model(tiny_model_dir, run_dir, capsys):
    model, tok = load_sparse_model(run_dir)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14 and all(m.sparsity == pytest.approx(0.7, abs=0.02) for m in sparse)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    expect = reference_tokens(tiny_model_dir, run_dir, tok)
    assert expect.numel() == NEW and len(set(expect.tolist())) > 1  # not a degenerate repetition
    text, n = generate_text(model, tok, PROMPT, NEW)
    assert n == NEW and text == tok.decode(expect, skip_special_tokens=True)
    # the command line streams the same text
    assert main(["generate", "--model", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", str(NEW),
                 "--threads", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == text.strip()
    assert main(["generate", "--model", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", str(NEW),
                 "--no-stream"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == text.strip()
    assert "14 sparse layers" in cap.err and f"{NEW} tokens in" in cap.err


def test_generate_logits_match_the_reference(tiny_model_dir, run_dir):
    """Beyond the tokens: every step's logits agree with the dense reference."""
    model, tok = load_sparse_model(run_dir)
    ref = reference_model(tiny_model_dir, run_dir)
    ids = prompt_ids(tok, PROMPT)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        got, want = model.generate(ids, **kw), ref.generate(ids, **kw)
    torch.testing.assert_close(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [None, (2, 4)])
def test_sparsify_model_keeps_the_masks_or_the_non_zeros(tiny_model_dir, block):
    """sparsify_model with explicit masks (CSR or BSR) and without (each layer's non-zeros):
    every replaced layer's weight equals the dense weight times its mask, outputs match the
    masked dense model in fp64, and lm_head stays dense."""
    from seft_ext.bsr import BSRWeight
    from seft_ext.generate import sparsify_model

    d, _ = tiny_model_dir
    model = transformers.AutoModelForCausalLM.from_pretrained(d).double().eval()
    g = torch.Generator().manual_seed(0)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    masks = {}
    for n in names:
        w = model.get_submodule(n).weight
        coarse = torch.rand(w.shape[0] // 2, w.shape[1] // 4, generator=g) < 0.5
        masks[n] = coarse.repeat_interleave(2, 0).repeat_interleave(4, 1)  # constant on 2x4 blocks
    ref = transformers.AutoModelForCausalLM.from_pretrained(d).double().eval()
    with torch.no_grad():
        for n in names:
            ref.get_submodule(n).weight.mul_(masks[n])
    got = sparsify_model(model, masks, block=block)
    assert sorted(got) == sorted(names) and isinstance(model.lm_head, torch.nn.Linear)
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, SparseLinear)
        assert isinstance(layer.weight, BSRWeight) == (block is not None)
        assert torch.equal(layer.weight.to_dense(), ref.get_submodule(n).weight)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-10, atol=1e-10)
    # without masks: each layer's own non-zeros
    again = sparsify_model(ref)
    assert sorted(again) == sorted(names)
    for n in names:
        assert torch.equal(ref.get_submodule(n).weight.to_dense(), model.get_submodule(n).weight.to_dense())


def test_generate_bf16(run_dir):
    model, tok = load_sparse_model(run_dir, torch.bfloat16)
    assert all(m.values.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, SparseLinear))
    text, n = generate_text(model, tok, PROMPT, 4)
    assert n == 4 and isinstance(text, str)


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr("seft_ext.models.load_model", boom)


def _not_a_run(tmp_path, run_dir):
    """Folders that are not a run's output: (folder, words the refusal must contain)."""
    import shutil

    no_sparse = tmp_path / "no_sparse"
    shutil.copytree(run_dir / "dense", no_sparse / "dense")
    bad_header = tmp_path / "bad_header"
    shutil.copytree(run_dir / "dense", bad_header / "dense")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(bad_header / "sparse.safetensors"))
    garbage = tmp_path / "garbage"
    shutil.copytree(run_dir / "dense", garbage / "dense")
    (garbage / "sparse.safetensors").write_bytes(b"not a safetensors file")
    no_tok = tmp_path / "no_tok"
    (no_tok / "dense").mkdir(parents=True)
    shutil.copy(run_dir / "dense" / "config.json", no_tok / "dense")
    shutil.copy(run_dir / "sparse.safetensors", no_tok)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [(tmp_path / "missing", "no such folder"), (a_file, "no such folder"), (tmp_path, "not a run"),
            (no_sparse, "no sparse.safetensors"), (bad_header, "not a seft_ext sparse export"),
            (garbage, "not a readable safetensors"), (no_tok, "no tokenizer")]


def test_not_a_run_folder_is_refused_before_loading(run_dir, tmp_path, capsys, no_model_load):
    for folder, words in _not_a_run(tmp_path, run_dir):
        assert main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2, folder
        err = capsys.readouterr().err.strip()
        assert err.startswith("seft: error: --model ") and words in err, (folder, err)
        assert len(err.splitlines()) == 1


@pytest.mark.parametrize("extra, words", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "  \n"], "--prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be an int >= 1"),
    (["--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be an int >= 1"),
    (["--prompt", "hi", "--threads", "-1"], "--threads must be an int >= 0"),
])
def test_bad_options_are_refused_before_loading(run_dir, capsys, no_model_load, extra, words):
    assert main(["generate", "--model", str(run_dir), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seft: error: ") and len(err.splitlines()) == 1 and words in err


@pytest.mark.parametrize("extra", [["--max-new-tokens", "ten"], ["--max-new-tokens", "1.5"], ["--dtype", "fp8"],
                                   []])
def test_malformed_options_exit_2(run_dir, capsys, extra):
    args = ["generate", "--model", str(run_dir)] + (["--prompt", "hi"] if extra else []) + extra
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
