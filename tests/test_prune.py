"""Pruning: magnitude, Wanda and SparseGPT against straightforward dense references."""
import pytest
import torch

from seft_ext.prune import keep_largest, magnitude_mask, sparsegpt_prune, wanda_mask


def ref_keep(score, keep, groups):
    """Keep the `keep` largest scores within each group of flat indices (ties: lower index)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    flat = score.flatten().tolist()
    for g in groups:
        for i in sorted(g, key=lambda i: (-flat[i], i))[:keep]:
            mask[i] = True
    return mask.view(score.shape)


def groups_of(out, inn, scope, m=4):
    if scope == "layer":
        return [list(range(out * inn))]
    if scope == "row":
        return [list(range(r * inn, (r + 1) * inn)) for r in range(out)]
    return [list(range(r * inn + g, r * inn + g + m)) for r in range(out) for g in range(0, inn, m)]


@pytest.mark.parametrize("scope", ["layer", "row", "nm"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75])
def test_magnitude_and_wanda_match_reference(scope, sparsity):
    torch.manual_seed(0)
    out, inn = 7, 12
    w = torch.randn(out, inn)
    w[0, :4] = 0.5  # ties
    sq = torch.rand(inn) * 3
    for fn, score in [(lambda: magnitude_mask(w, sparsity, scope, (2, 4)), w.abs().double()),
                      (lambda: wanda_mask(w, sq, sparsity, scope, (2, 4)), w.abs().double() * sq.double().sqrt())]:
        keep = {"layer": round((1 - sparsity) * out * inn), "row": round((1 - sparsity) * inn), "nm": 2}[scope]
        assert torch.equal(fn(), ref_keep(score, keep, groups_of(out, inn, scope)))


def ref_sparsegpt(W, H, sparsity, scope, nm, blocksize, percdamp):
    """SparseGPT with the explicit inverse Hessian: after column i is done, the inverse of
    the remaining columns' Hessian is eliminated one step (no Cholesky, no lazy updates)."""
    W = W.double().clone()
    H = H.double().clone()
    out, inn = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(inn, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    # diag of the eliminated inverse at each step (weights do not affect it)
    diag, rows, E = [], [], Hinv.clone()
    for i in range(inn):
        diag.append(E[i, i].item())
        rows.append(E[i].clone())
        E = E - torch.outer(E[:, i], E[i]) / E[i, i]
        E[i, :] = 0
        E[:, i] = 0
    pruned = torch.zeros(out, inn, dtype=torch.bool)
    n_keep, m = nm

    def upto(c, rws):
        if c >= inn:
            return rws * inn - round((1 - sparsity) * rws * inn)
        return min(round(sparsity * rws * c), rws * inn - round((1 - sparsity) * rws * inn))

    for i1 in range(0, inn, blocksize):
        i2 = min(i1 + blocksize, inn)
        sal = W[:, i1:i2] ** 2 / torch.tensor(diag[i1:i2], dtype=torch.float64)
        if scope == "layer":
            cnt = upto(i2, out) - upto(i1, out)
            flat = sal.flatten().tolist()
            for j in sorted(range(len(flat)), key=lambda j: (flat[j], j))[:cnt]:
                pruned[j // (i2 - i1), i1 + j % (i2 - i1)] = True
        elif scope == "row":
            cnt = upto(i2, 1) - upto(i1, 1)
            for r in range(out):
                vals = sal[r].tolist()
                for j in sorted(range(len(vals)), key=lambda j: (vals[j], j))[:cnt]:
                    pruned[r, i1 + j] = True
        for i in range(i1, i2):
            if scope == "nm" and (i - i1) % m == 0:
                s2 = W[:, i:i + m] ** 2 / torch.tensor(diag[i:i + m], dtype=torch.float64)
                for r in range(out):
                    vals = s2[r].tolist()
                    for j in sorted(range(m), key=lambda j: (vals[j], j))[:m - n_keep]:
                        pruned[r, i + j] = True
            q = torch.where(pruned[:, i], torch.zeros(out, dtype=torch.float64), W[:, i])
            err = (W[:, i] - q) / diag[i]
            W[:, i:] -= torch.outer(err, rows[i][i:])
            W[:, i] = q
    return ~pruned, W


@pytest.mark.parametrize("scope", ["layer", "row", "nm"])
@pytest.mark.parametrize("blocksize", [4, 8, 16])
def test_sparsegpt_matches_explicit_inverse_reference(scope, blocksize):
    torch.manual_seed(1)
    out, inn, T = 6, 16, 40
    W = torch.randn(out, inn, dtype=torch.float64)
    X = torch.randn(T, inn, dtype=torch.float64) @ torch.randn(inn, inn, dtype=torch.float64) * 0.3
    X[:, 5] = 0  # a dead input
    H = X.T @ X
    keep, Wn = sparsegpt_prune(W, H, 0.5, scope, (2, 4), blocksize, 0.01)
    keep_r, Wr = ref_sparsegpt(W, H, 0.5, scope, (2, 4), blocksize, 0.01)
    assert torch.equal(keep, keep_r)
    torch.testing.assert_close(Wn, Wr, rtol=1e-9, atol=1e-9)
    assert bool((Wn[~keep] == 0).all())
    expect = {"layer": round(0.5 * out * inn), "row": out * round(0.5 * inn), "nm": out * inn // 2}[scope]
    assert int(keep.sum()) == expect


def test_reconstruction_error_ranks_sparsegpt_wanda_magnitude():
    """On inputs whose features differ in scale (as LLM activations do), the layer output
    error after pruning ranks SparseGPT < Wanda < magnitude."""
    torch.manual_seed(2)
    out, inn, T = 32, 64, 256
    W = torch.randn(out, inn, dtype=torch.float64)
    mix = torch.eye(inn, dtype=torch.float64) + 0.3 * torch.randn(inn, inn, dtype=torch.float64)
    X = (torch.randn(T, inn, dtype=torch.float64) @ mix) * torch.exp(torch.randn(inn, dtype=torch.float64))
    err = lambda Wp: (X @ (W - Wp).T).norm().item()  # noqa: E731
    e_mag = err(W * magnitude_mask(W, 0.6, "row"))
    e_wanda = err(W * wanda_mask(W, (X * X).sum(0), 0.6, "row"))
    e_sgpt = err(sparsegpt_prune(W, X.T @ X, 0.6, "row")[1])
    assert e_sgpt < 0.95 * e_wanda < 0.95 * 0.8 * e_mag


@pytest.mark.parametrize("call, match", [
    (lambda w: magnitude_mask(w, 1.0), "sparsity"),
    (lambda w: magnitude_mask(w, 0.5, "block"), "budget"),
    (lambda w: magnitude_mask(w, 0.5, "nm", (2, 5)), "N:M"),
    (lambda w: magnitude_mask(w.new_full(w.shape, float("nan")), 0.5), "NaN"),
    (lambda w: wanda_mask(w, torch.ones(3), 0.5), "input_sq_norms"),
    (lambda w: wanda_mask(w, -torch.ones(8), 0.5), ">= 0"),
    (lambda w: sparsegpt_prune(w, torch.eye(7), 0.5), "hessian"),
    (lambda w: sparsegpt_prune(w, torch.eye(8), 0.5, "nm", (2, 3)), "N:M"),
    (lambda w: keep_largest(torch.randn(3), 0.5), "2-D"),
])
def test_prune_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(4, 8))
