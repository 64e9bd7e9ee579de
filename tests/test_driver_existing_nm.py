"""--prune existing with an N:M pattern: kept weights that are exactly 0 (a quantized model has
many) leave groups with fewer than N non-zeros; the mask gets them back as stored zeros, a
group with more than N is refused."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from seft_ext.cli import main  # noqa: E402
from seft_ext.prune_llm import complete_nm  # noqa: E402

OPTS = ["--seq-len", "16", "--batch-size", "4", "--calib-windows", "8", "--eval-windows", "4", "--task-items", "0",
        "--no-progress", "--prune", "magnitude"]


def _complete_reference(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Plain Python: each group keeps its positions, then its first zeros until it has n."""
    out = mask.clone()
    for r in range(mask.shape[0]):
        for g in range(0, mask.shape[1], m):
            need = n - int(mask[r, g:g + m].sum())
            for j in range(g, g + m):
                if need > 0 and not mask[r, j]:
                    out[r, j], need = True, need - 1
    return out


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_complete_nm_equals_a_plain_python_reference(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    mask = torch.zeros(24, 8 * m, dtype=torch.bool)
    for r in range(24):
        for gi in range(8):
            pos = torch.randperm(m, generator=g)[:n] + gi * m  # n random positions per group
            mask[r, pos] = True
    holes = torch.rand(mask.shape, generator=g) < 0.3
    partial = mask & ~holes  # groups with 0 .. n kept weights
    got = complete_nm(partial, n, m)
    assert torch.equal(got, _complete_reference(partial, n, m))
    assert torch.equal(got.reshape(24, 8, m).sum(-1), torch.full((24, 8), n))
    assert bool((got | ~partial).all())  # every kept position stays kept
    assert torch.equal(complete_nm(mask, n, m), mask)


def test_complete_nm_refuses_a_group_with_more_than_n():
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[1, 4:7] = True
    with pytest.raises(ValueError, match="row 1, group 1 has 3 non-zeros, more than 2"):
        complete_nm(mask, 2, 4)


def _zero_some_kept_weights(folder, fraction=0.1):
    """Sets a fraction of the saved model's kept decoder weights to exactly 0 (as a quantized
    model's kept weights can be); returns how many."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    g, zeroed = torch.Generator().manual_seed(0), 0
    with torch.no_grad():
        for name, lin in model.named_modules():
            if isinstance(lin, torch.nn.Linear) and "layers." in name:
                hit = (lin.weight != 0) & (torch.rand(lin.weight.shape, generator=g) < fraction)
                lin.weight[hit] = 0.0
                zeroed += int(hit.sum())
    model.save_pretrained(folder)
    return zeroed


def _groups_at_most(folder, n, m):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for name, lin in model.named_modules():
        if isinstance(lin, torch.nn.Linear) and "layers." in name:
            w = lin.weight.detach()
            assert int((w != 0).reshape(w.shape[0], -1, m).sum(-1).max()) <= n, name


def test_train_on_a_2of4_model_whose_kept_weights_include_zeros(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    opts = ["--data", str(data), *OPTS]
    assert main(["prune", "--model", str(d), "--out", str(tmp_path / "p"), "--pattern", "2:4", *opts]) == 0
    assert _zero_some_kept_weights(tmp_path / "p" / "dense") > 0
    capsys.readouterr()
    rc = main(["train", "--model", str(tmp_path / "p" / "dense"), "--out", str(tmp_path / "t"), "--steps", "8",
               "--lr", "1e-2", "--update-interval", "4", "--lora-rank", "2", "--pattern", "2:4",
               *[o for o in opts if o not in ("--prune", "magnitude")]])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert s["prune"] == "existing" and s["sparsity_target"] == pytest.approx(0.5)
    assert s["sparsity_final"] >= 0.5
    _groups_at_most(tmp_path / "t" / "dense", 2, 4)


def test_existing_zeros_with_more_than_n_per_group_are_refused(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    opts = ["--data", str(data), *OPTS]
    assert main(["prune", "--model", str(d), "--out", str(tmp_path / "p"), "--pattern", "row", "--sparsity", "0.5",
                 *opts]) == 0
    capsys.readouterr()
    rc = main(["train", "--model", str(tmp_path / "p" / "dense"), "--out", str(tmp_path / "t"), "--steps", "2",
               "--pattern", "2:4", *[o for o in opts if o not in ("--prune", "magnitude")]])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("seft: error: --prune existing --pattern 2:4: the zeros of")
    assert "more than 2" in err and not (tmp_path / "t" / "summary.json").exists()
