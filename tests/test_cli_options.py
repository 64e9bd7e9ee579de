"""The driver's options come from SEFTConfig; --version; a model id from the local Hugging Face
cache; `seft export --format peft`."""
import dataclasses
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seft_ext import SEFTConfig  # noqa: E402
from seft_ext.cli import parser, main  # noqa: E402
from seft_ext.pipeline import RESUME_KEYS, options, seft_config  # noqa: E402

SET_FROM_PATTERN = {"nm_n", "nm_m", "block"}


def test_every_config_field_is_an_option_with_its_default_shown(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(SEFTConfig):
        if f.name in SET_FROM_PATTERN:
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f.name in RESUME_KEYS  # a resumed run must match every SEFT option
    assert "(default: 0.2)" in text and "(default: cosine)" in text


def test_config_options_reach_the_config():
    a = parser().parse_args(["run", "--drop-fraction", "0.3", "--schedule", "linear", "--no-seed-optimizer",
                              "--k", "50", "--scan-sketch", "0", "--candidate-factor", "3", "--evolve-until", "0.5",
                              "--grow-accumulation", "2", "--pattern", "2:4", "--budget", "nm", "--method",
                              "masked-dense", "--seed", "4"])
    cfg = seft_config(a)
    expect = SEFTConfig(drop_fraction=0.3, schedule="linear", seed_optimizer=False, k=50, scan_sketch=0,
                        candidate_factor=3.0, evolve_until=0.5, grow_accumulation=2, budget="nm", nm_n=2, nm_m=4,
                        method="seft", seed=4)
    assert cfg == expect
    defaults = seft_config(options("run", budget="layer", pattern="unstructured"))
    assert defaults == SEFTConfig(budget="layer")  # the driver's defaults are SEFTConfig's
    with pytest.raises(ValueError, match="drop_fraction"):
        seft_config(options("run", budget="layer", drop_fraction=1.5))
    with pytest.raises(ValueError, match="no option"):
        options("run", no_such_option=1)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("seft_ext ")


def test_model_id_from_the_local_hub_cache(tiny_model_dir, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    d, _ = tiny_model_dir
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(d, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from seft_ext.models import load_model

    model, tok = load_model("acme/tiny")
    ref = transformers.AutoModelForCausalLM.from_pretrained(d)
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    assert tok is not None
    with pytest.raises(FileNotFoundError, match="no model id in the local Hugging Face cache"):
        load_model("acme/missing")


def test_export_peft_from_a_run(tiny_model_dir, tmp_path):
    """k = 40 is not r (in + out) for any r: the adapter is padded with zero entries."""
    peft = pytest.importorskip("peft")
    d, data = tiny_model_dir
    run = ["run", "--model", str(d), "--data", str(data), "--sparsity", "0.5", "--pattern", "row", "--steps", "8",
           "--seq-len", "16", "--batch-size", "4", "--lr", "1e-2", "--update-interval", "4", "--k", "40",
           "--calib-windows", "8", "--eval-windows", "4", "--task-items", "0", "--checkpoint-every", "8",
           "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(run) == 0
    assert main(["export", "--run", str(tmp_path / "r"), "--format", "peft", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "peft" / "base")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "x" / "peft" / "adapter")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "dense")  # theta + delta, merged
    ids = torch.randint(0, 20, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
