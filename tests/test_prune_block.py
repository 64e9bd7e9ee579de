"""Block pruning (block=(r, c)): magnitude and Wanda against a plain-Python block reference,
SparseGPT against an explicit-inverse reference with block selection, exact block counts,
masks constant on blocks, prune_model on a tiny LLaMA, bad input."""
import math

import pytest
import torch

from seft_ext.bsr import BSRWeight
from seft_ext.prune import keep_largest, magnitude_mask, parse_block_pattern, sparsegpt_prune, wanda_mask
from tiny_llama import batches, linear_inputs, tiny_llama

SHAPES = [((8, 8), (4, 4)), ((7, 12), (2, 4)), ((9, 10), (4, 3)), ((3, 5), (4, 8)), ((6, 11), (1, 1))]
SPARSITIES = [0.0, 0.3, 0.5, 0.75]


def ref_block_mask(score, block, sparsity, budget):
    """Sum each r x c block's real entries, keep the largest blocks (ties: lower block,
    row-major) per layer or per block row, and paint each kept block into a dense mask."""
    r, c = block
    out, inn = score.shape
    vals = score.tolist()
    nbr, nbc = math.ceil(out / r), math.ceil(inn / c)
    sums = {}
    for bi in range(nbr):
        for bj in range(nbc):
            sums[bi, bj] = sum(vals[i][j] for i in range(bi * r, min(out, bi * r + r))
                               for j in range(bj * c, min(inn, bj * c + c)))
    if budget == "layer":
        groups = [[(bi, bj) for bi in range(nbr) for bj in range(nbc)]]
        keep = round((1 - sparsity) * nbr * nbc)
    else:
        groups = [[(bi, bj) for bj in range(nbc)] for bi in range(nbr)]
        keep = round((1 - sparsity) * nbc)
    mask = torch.zeros(out, inn, dtype=torch.bool)
    for g in groups:
        for bi, bj in sorted(g, key=lambda b: (-sums[b], b))[:keep]:
            mask[bi * r:bi * r + r, bj * c:bj * c + c] = True
    return mask


def block_counts(mask, block):
    """(kept blocks per block row, every block constant?) by looping over the blocks."""
    r, c = block
    out, inn = mask.shape
    per_row, constant = [], True
    for i in range(0, out, r):
        n = 0
        for j in range(0, inn, c):
            b = mask[i:i + r, j:j + c]
            constant &= bool(b.all()) or not bool(b.any())
            n += int(b.all())
        per_row.append(n)
    return per_row, constant


@pytest.mark.parametrize("shape, block", SHAPES)
@pytest.mark.parametrize("budget", ["layer", "row"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_magnitude_and_wanda_blocks_match_reference(shape, block, budget, sparsity):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    sq = torch.rand(shape[1]) * 3
    got = magnitude_mask(w, sparsity, budget, block=block)
    assert torch.equal(got, ref_block_mask(w.double().abs(), block, sparsity, budget))
    score = w.double().abs() * sq.double().sqrt()
    assert torch.equal(wanda_mask(w, sq, sparsity, budget, block=block), ref_block_mask(score, block, sparsity, budget))


@pytest.mark.parametrize("budget", ["layer", "row"])
def test_ties_go_to_the_lower_block(budget):
    """Small integer weights: many blocks share a sum (exact in float64)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-2, 3, (10, 14), generator=g).double()
    w[:4, :6] = 1.0  # equal blocks
    for block in [(2, 2), (3, 4), (2, 3)]:
        for s in SPARSITIES:
            assert torch.equal(magnitude_mask(w, s, budget, block=block), ref_block_mask(w.abs(), block, s, budget))


def test_edge_blocks_score_the_sum_of_their_real_weights():
    # 2 x 2 blocks: sums 6, 5 / 4, 9 (means 1.5, 2.5 / 2, 9): the full block outranks the partial ones
    w = torch.tensor([[1.5, 1.5, 2.5], [1.5, 1.5, 2.5], [2.0, 2.0, 9.0]])
    expect = {0.5: [[1, 1, 0], [1, 1, 0], [0, 0, 1]], 0.25: [[1, 1, 1], [1, 1, 1], [0, 0, 1]]}
    for s, m in expect.items():
        assert torch.equal(magnitude_mask(w, s, "layer", block=(2, 2)), torch.tensor(m, dtype=torch.bool))
    assert torch.equal(magnitude_mask(w, 0.5, "row", block=(2, 2)), torch.tensor(expect[0.5], dtype=torch.bool))


@pytest.mark.parametrize("shape, block", [((7, 12), (2, 5)), ((9, 10), (4, 3)), ((13, 9), (5, 4))])
@pytest.mark.parametrize("budget", ["layer", "row"])
def test_edge_blocks_compete_with_full_ones(shape, block, budget):
    """Partial blocks' weights scaled up so their sums are as large as full blocks' on average:
    the ranking then depends on how edge blocks are scored."""
    torch.manual_seed(5)
    r, c = block
    w = torch.randn(*shape, dtype=torch.float64)
    w[shape[0] // r * r:] *= r / (shape[0] % r)
    w[:, shape[1] // c * c:] *= c / (shape[1] % c)
    sq = torch.rand(shape[1], dtype=torch.float64)
    for s in SPARSITIES[1:]:
        assert torch.equal(magnitude_mask(w, s, budget, block=block), ref_block_mask(w.abs(), block, s, budget))
        assert torch.equal(wanda_mask(w, sq, s, budget, block=block),
                           ref_block_mask(w.abs() * sq.sqrt(), block, s, budget))


@pytest.mark.parametrize("shape, block", SHAPES)
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_exact_block_counts_and_constant_blocks(shape, block, sparsity):
    torch.manual_seed(1)
    w = torch.randn(*shape, dtype=torch.float64)
    nbc = math.ceil(shape[1] / block[1])
    nblocks = math.ceil(shape[0] / block[0]) * nbc
    for budget in ["layer", "row"]:
        mask = magnitude_mask(w, sparsity, budget, block=block)
        per_row, constant = block_counts(mask, block)
        assert constant
        if budget == "layer":
            assert sum(per_row) == round((1 - sparsity) * nblocks)
        else:
            assert per_row == [round((1 - sparsity) * nbc)] * len(per_row)
        bsr = BSRWeight.from_dense(w, block, mask)  # accepts a mask constant on each block
        assert torch.equal(bsr.to_dense(), w * mask)


@pytest.mark.parametrize("budget", ["layer", "row"])
def test_block_one_by_one_is_unblocked(budget):
    torch.manual_seed(2)
    w = torch.randn(9, 13)
    sq = torch.rand(13)
    H = (lambda x: x.T @ x)(torch.randn(40, 13, dtype=torch.float64))
    for s in SPARSITIES:
        assert torch.equal(keep_largest(w.abs(), s, budget, block=(1, 1)), keep_largest(w.abs(), s, budget))
        assert torch.equal(wanda_mask(w, sq, s, budget, block=(1, 1)), wanda_mask(w, sq, s, budget))
        for bs in [4, 5, 128]:
            k1, w1 = sparsegpt_prune(w, H, s, budget, blocksize=bs, block=(1, 1))
            k0, w0 = sparsegpt_prune(w, H, s, budget, blocksize=bs)
            assert torch.equal(k1, k0) and torch.equal(w1, w0)


def ref_sparsegpt_block(W, H, sparsity, budget, block, blocksize, percdamp=0.01):
    """Block SparseGPT with the explicit inverse Hessian (eliminated one column at a time, no
    Cholesky, no lazy updates). Chunks of `blocksize` rounded down to a multiple of c; at a
    chunk's start each block's saliency sum w^2 / [H_F^-1]_jj picks the pruned blocks."""
    r, c = block
    W = W.double().clone()
    H = H.double().clone()
    out, inn = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(inn, dtype=torch.float64)
    E = torch.linalg.inv(H)
    diag, rows = [], []
    for i in range(inn):
        diag.append(E[i, i].item())
        rows.append(E[i].clone())
        E = E - torch.outer(E[:, i], E[i]) / E[i, i]
        E[i, :] = 0
        E[:, i] = 0
    nbr, nbc = math.ceil(out / r), math.ceil(inn / c)
    total_pruned = (nbr * nbc - round((1 - sparsity) * nbr * nbc)) if budget == "layer" else \
        (nbc - round((1 - sparsity) * nbc))
    per = nbr if budget == "layer" else 1

    def upto(bcols):  # blocks (of one block row, or of the layer) pruned after bcols block columns
        return total_pruned if bcols >= nbc else min(round(sparsity * per * bcols), total_pruned)

    pruned = torch.zeros(out, inn, dtype=torch.bool)
    step = max(c, blocksize // c * c)
    for i1 in range(0, inn, step):
        i2 = min(i1 + step, inn)
        b1, b2 = i1 // c, math.ceil(i2 / c)
        sal = {}
        for bi in range(nbr):
            for bj in range(b1, b2):
                sal[bi, bj] = sum(W[i, j].item() ** 2 / diag[j] for i in range(bi * r, min(out, bi * r + r))
                                  for j in range(bj * c, min(inn, bj * c + c)))
        groups = [list(sal)] if budget == "layer" else [[b for b in sal if b[0] == bi] for bi in range(nbr)]
        for g in groups:
            for bi, bj in sorted(g, key=lambda b: (sal[b], b))[:upto(b2) - upto(b1)]:
                pruned[bi * r:bi * r + r, bj * c:bj * c + c] = True
        for i in range(i1, i2):
            q = torch.where(pruned[:, i], torch.zeros(out, dtype=torch.float64), W[:, i])
            err = (W[:, i] - q) / diag[i]
            W[:, i:] -= torch.outer(err, rows[i][i:])
            W[:, i] = q
    return ~pruned, W


def correlated(T, inn, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inn, dtype=torch.float64) + 0.3 * torch.randn(inn, inn, dtype=torch.float64, generator=g)
    scale = torch.exp(torch.randn(inn, dtype=torch.float64, generator=g))
    return (torch.randn(T, inn, dtype=torch.float64, generator=g) @ mix) * scale


@pytest.mark.parametrize("budget", ["layer", "row"])
@pytest.mark.parametrize("block, blocksize", [((2, 4), 8), ((3, 4), 6), ((4, 3), 16), ((2, 5), 3)])
def test_sparsegpt_blocks_match_explicit_inverse_reference(budget, block, blocksize):
    torch.manual_seed(4)
    out, inn = 10, 17
    W = torch.randn(out, inn, dtype=torch.float64)
    X = correlated(60, inn, 5)
    X[:, 6] = 0  # a dead input
    H = X.T @ X
    for s in [0.3, 0.6]:
        keep, Wn = sparsegpt_prune(W, H, s, budget, blocksize=blocksize, block=block)
        keep_r, Wr = ref_sparsegpt_block(W, H, s, budget, block, blocksize)
        assert torch.equal(keep, keep_r)
        torch.testing.assert_close(Wn, Wr, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("budget", ["layer", "row"])
@pytest.mark.parametrize("block", [(4, 4), (3, 5), (8, 8)])
def test_sparsegpt_blocks_counts_and_compensation(budget, block):
    """Exact block counts, block-constant mask, pruned entries 0; the compensated weights
    reconstruct the layer output better than the same mask without compensation and than
    block magnitude pruning of the same block count."""
    torch.manual_seed(6)
    out, inn, T, s = 32, 94, 384, 0.6
    W = torch.randn(out, inn, dtype=torch.float64)
    X = correlated(T, inn, 7)
    keep, Wn = sparsegpt_prune(W, X.T @ X, s, budget, blocksize=32, block=block)
    per_row, constant = block_counts(keep, block)
    nbc = math.ceil(inn / block[1])
    assert constant and bool((Wn[~keep] == 0).all())
    if budget == "layer":
        assert sum(per_row) == round((1 - s) * len(per_row) * nbc)
    else:
        assert per_row == [round((1 - s) * nbc)] * len(per_row)
    err = lambda Wp: (X @ (W - Wp).T).norm().item()  # noqa: E731
    e_sgpt = err(Wn)
    assert e_sgpt < 0.95 * err(W * keep)
    assert e_sgpt < 0.9 * err(W * magnitude_mask(W, s, budget, block=block))


def test_parse_block_pattern():
    assert parse_block_pattern("block:8x8") == (8, 8)
    assert parse_block_pattern("block:4x16") == (4, 16)
    for bad in ["block:0x8", "block:8x0"]:
        with pytest.raises(ValueError, match=">= 1"):
            parse_block_pattern(bad)
    for bad in ["block:8", "block:axb", "8x8", "block:8x8x8", "block:-1x8", "block: 8x8", "", None]:
        with pytest.raises(ValueError, match="block:RxC"):
            parse_block_pattern(bad)


@pytest.mark.parametrize("call, match", [
    (lambda w: magnitude_mask(w, 0.5, "nm", block=(4, 4)), "N:M"),
    (lambda w: wanda_mask(w, torch.ones(8), 0.5, "nm", block=(2, 2)), "N:M"),
    (lambda w: sparsegpt_prune(w, torch.eye(8), 0.5, "nm", block=(2, 2)), "N:M"),
    (lambda w: magnitude_mask(w, 0.5, block=(0, 4)), "block"),
    (lambda w: magnitude_mask(w, 0.5, block=(4,)), "block"),
    (lambda w: magnitude_mask(w, 0.5, block="4x4"), "block"),
    (lambda w: magnitude_mask(w, 0.5, block=(4.0, 4)), "block"),
    (lambda w: magnitude_mask(w, 0.5, block=(True, 2)), "block"),
    (lambda w: keep_largest(w, 0.5, block=(2, -1)), "block"),
    (lambda w: wanda_mask(w, torch.ones(8), 0.5, block=(2, 2, 2)), "block"),
    (lambda w: sparsegpt_prune(w, torch.eye(8), 0.5, block=(0, 1)), "block"),
    (lambda w: sparsegpt_prune(w, torch.eye(8), 0.5, blocksize=0, block=(2, 2)), "blocksize"),
    (lambda w: magnitude_mask(w, 1.0, block=(2, 2)), "sparsity"),
    (lambda w: sparsegpt_prune(w, torch.eye(8), -0.1, block=(2, 2)), "sparsity"),
])
def test_block_prune_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(4, 8))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("budget, block", [("row", (4, 8)), ("layer", (3, 5))])
def test_prune_model_blocks(method, budget, block):
    from seft_ext.layer import SparseLinear
    from seft_ext.prune_llm import prune_model

    model = tiny_llama()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    data = batches()
    names0 = [n for n in original if n.startswith("model.layers.0.")]
    xs = linear_inputs(model, names0, data) if method != "magnitude" else {}
    masks = prune_model(model, method, 0.5, budget, calibration=data, progress=False, block=block)
    assert sorted(masks) == sorted(original)
    for name, mask in masks.items():
        lin = model.get_submodule(name)
        per_row, constant = block_counts(mask, block)
        nbc = math.ceil(lin.in_features / block[1])
        assert constant, name
        if budget == "layer":
            assert sum(per_row) == round(0.5 * len(per_row) * nbc), name
        else:
            assert per_row == [round(0.5 * nbc)] * len(per_row), name
        assert bool((lin.weight[~mask] == 0).all()), name
        x = torch.randn(5, lin.in_features, dtype=torch.float64)
        torch.testing.assert_close(SparseLinear.from_dense(lin, mask, block=block)(x), lin(x))
    for name in names0 if method != "magnitude" else list(original):
        w = original[name]
        if method == "magnitude":
            expect = magnitude_mask(w, 0.5, budget, block=block)
        elif method == "wanda":
            expect = wanda_mask(w, (xs[name] ** 2).sum(0), 0.5, budget, block=block)
        else:
            expect, new_w = sparsegpt_prune(w, xs[name].T @ xs[name], 0.5, budget, block=block)
            torch.testing.assert_close(model.get_submodule(name).weight, new_w, rtol=1e-9, atol=1e-9)
        assert torch.equal(masks[name], expect), name
    with torch.no_grad():
        logits = model(input_ids=data[0], use_cache=False).logits
    assert logits.shape == (2, 12, 64) and bool(torch.isfinite(logits).all())


def test_prune_model_rejects_bad_block_before_work():
    from seft_ext.prune_llm import prune_model

    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    for kwargs, match in [(dict(budget="nm", block=(4, 4)), "N:M"), (dict(block=(0, 4)), "block"),
                          (dict(block=(4, 4, 4)), "block"), (dict(block="block:4x4"), "block"),
                          (dict(budget="blocks", block=(4, 4)), "budget")]:
        for method in ["magnitude", "wanda"]:  # wanda without calibration: the block is refused first
            with pytest.raises(ValueError, match=f"prune_model: .*{match}"):
                prune_model(model, method, 0.5, progress=False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
