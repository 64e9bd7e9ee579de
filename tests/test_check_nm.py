"""csr_check_nm: the one N:M check (C++), against a plain-Python reference; bad input; opcheck."""
import random

import pytest
import torch

from seft_ext import CSRWeight, SEFTLinear, ops


def ref_first_bad_group(mask, n, m):
    """(row, group, count) of the first group of m inputs without exactly n non-zeros, or None."""
    out, inn = mask.shape
    for r in range(out):
        for g in range(inn // m):
            c = int(mask[r, g * m:(g + 1) * m].sum())
            if c != n:
                return r, g, c
    return None


def nm_mask(out, inn, n, m, gen):
    keys = torch.rand(out, inn // m, m, generator=gen)
    idx = keys.argsort(-1)[..., :n]
    mask = torch.zeros(out, inn // m, m, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view(out, inn)


def to_csr(mask, index_dtype):
    w = CSRWeight.from_dense(torch.randn(mask.shape) + 3.0, mask)  # no zero among the kept values
    return w.crow, w.col.to(index_dtype)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_matches_python_reference(seed, index_dtype):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n, m = rng.choice([(1, 2), (2, 4), (4, 8), (3, 4), (1, 1)])
    out, inn = rng.randint(1, 7), m * rng.randint(1, 6)
    mask = nm_mask(out, inn, n, m, gen)
    for _ in range(rng.choice([0, 0, 1, 3])):  # flip a few entries: usually no longer N:M
        mask[rng.randrange(out), rng.randrange(inn)] ^= True
    crow, col = to_csr(mask, index_dtype)
    bad = ref_first_bad_group(mask, n, m)
    if bad is None:
        assert ops.csr_check_nm(crow, col, inn, n, m) is None
    else:
        r, g, c = bad
        msg = f"the base is not {n}:{m}: row {r}, group {g} has {c} non-zeros"
        with pytest.raises(ValueError, match=msg):
            ops.csr_check_nm(crow, col, inn, n, m)


def test_empty_rows_and_empty_weight():
    crow, col = to_csr(torch.zeros(3, 8, dtype=torch.bool), torch.int16)
    with pytest.raises(ValueError, match="row 0, group 0 has 0 non-zeros"):
        ops.csr_check_nm(crow, col, 8, 2, 4)
    crow, col = to_csr(torch.zeros(0, 8, dtype=torch.bool), torch.int16)
    ops.csr_check_nm(crow, col, 8, 2, 4)  # no row: nothing to break


@pytest.mark.parametrize("n, m, inn, match", [
    (5, 4, 8, "N:M = 5:4 needs 1 <= N <= M"),
    (0, 4, 8, "N:M = 0:4 needs 1 <= N <= M"),
    (2, 0, 8, "needs 1 <= N <= M"),
    (2, 3, 8, "N:M = 2:3 needs M dividing in_features = 8"),
])
def test_bad_n_m(n, m, inn, match):
    crow, col = to_csr(nm_mask(2, 8, 2, 4, torch.Generator().manual_seed(0)), torch.int16)
    with pytest.raises(ValueError, match=match):
        ops.csr_check_nm(crow, col, inn, n, m)


@pytest.mark.parametrize("bad, match", [
    ("cols_out_of_range", "out of range"),
    ("unsorted", "sorted"),
    ("crow_end", "crow\\[-1\\]"),
    ("crow_dtype", "int32"),
])
def test_bad_pattern_is_a_runtime_error(bad, match):
    crow, col = to_csr(nm_mask(2, 8, 2, 4, torch.Generator().manual_seed(0)), torch.int32)
    inn = 8
    if bad == "cols_out_of_range":
        inn = 4
    elif bad == "unsorted":
        col = col.clone()
        col[0], col[1] = col[1].item(), col[0].item()
    elif bad == "crow_end":
        crow = crow.clone()
        crow[-1] -= 1
    elif bad == "crow_dtype":
        crow = crow.long()
    with pytest.raises(RuntimeError, match=match):
        ops.csr_check_nm(crow, col, inn, 2, 4)


def test_seft_linear_prefixes_the_message():
    mask = nm_mask(3, 8, 2, 4, torch.Generator().manual_seed(1))
    mask[1, 5] = not mask[1, 5]
    base = CSRWeight.from_dense(torch.randn(3, 8) + 3.0, mask)
    expected = ref_first_bad_group(mask, 2, 4)
    with pytest.raises(ValueError, match=f"^SEFTLinear: the base is not 2:4: row {expected[0]}, "
                                         f"group {expected[1]} has {expected[2]} non-zeros$"):
        SEFTLinear(base, 2, budget="nm")
    with pytest.raises(ValueError, match="^SEFTLinear: N:M = 2:3 needs M dividing in_features = 8$"):
        SEFTLinear(base, 2, budget="nm", nm=(2, 3))


def test_drop_grow_adapt_uses_the_same_check():
    mask = nm_mask(2, 8, 2, 4, torch.Generator().manual_seed(2))
    mask[0, 0] = not mask[0, 0]
    w = CSRWeight.from_dense(torch.randn(2, 8) + 3.0, mask)
    slots = torch.tensor([0])
    with pytest.raises(ValueError, match="csr_drop_grow_adapt_: the base is not 2:4: row 0, group 0"):
        ops.csr_drop_grow_adapt_(w.crow.clone(), w.col.clone(), w.values.clone(), slots, torch.ones(1),
                                 torch.tensor([], dtype=torch.long), torch.tensor([]), 0, 8, "nm", 2, 4, True)


def test_opcheck():
    crow, col = to_csr(nm_mask(4, 16, 2, 4, torch.Generator().manual_seed(3)), torch.int16)
    torch.library.opcheck(torch.ops.seft.csr_check_nm.default, (crow, col, 16, 2, 4))
