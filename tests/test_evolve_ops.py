"""csr_grow_scan / csr_drop_grow_adapt_: bad input is refused with a clear message; opcheck."""
import pytest
import torch

from seft_ext import CSRWeight, ops
from seft_ext.prune import magnitude_mask


def setup(out=6, inn=8):
    torch.manual_seed(0)
    w = torch.randn(out, inn)
    base = CSRWeight.from_dense(w, magnitude_mask(w, 0.5, "nm", (2, 4)))
    slots = torch.tensor([0, 3, 5, 9])
    return base, slots


def scan_args(**over):
    base, slots = setup()
    a = dict(grad_out=torch.randn(5, 6), x=torch.randn(5, 8), crow=base.crow, col=base.col, theta=base.values,
             delta_slots=slots, num_grow=4, num_prune=4, budget="layer", nm_n=2, nm_m=4, grow_inactive=True)
    a.update(over)
    return a


def dga_args(**over):
    base, slots = setup()
    a = dict(crow=base.crow.clone(), col=base.col.clone(), theta=base.values.clone(), delta_slots=slots.clone(),
             delta=torch.randn(4), tracked=torch.tensor([1, 2, 7, 20, 33]), gsum=torch.randn(5), num_drop=2,
             in_features=8, budget="layer", nm_n=2, nm_m=4, grow_inactive=True)
    a.update(over)
    return a


SCAN_BAD = [
    ({"x": torch.randn(5, 7)}, "out of range \\[0, 7\\)"),  # in = x.size(-1)
    ({"grad_out": torch.randn(4, 6)}, "leading dimensions"),
    ({"x": torch.randn(5, 8, dtype=torch.float64)}, "dtype"),
    ({"x": torch.randint(0, 3, (5, 8))}, "float"),
    ({"theta": torch.randn(3)}, "entries"),
    ({"delta_slots": torch.tensor([3, 0])}, "strictly increasing"),
    ({"delta_slots": torch.tensor([0, 0])}, "strictly increasing"),
    ({"delta_slots": torch.tensor([0, 99])}, "out of range"),
    ({"delta_slots": torch.tensor([0, 1], dtype=torch.int32)}, "int64"),
    ({"num_grow": -1}, "num_grow"),
    ({"budget": "block"}, "budget must be"),
    ({"budget": "nm", "nm_m": 3}, "divide"),
    ({"budget": "nm", "nm_n": 5}, "N <= M"),
    ({"col": torch.tensor([7, 0] + [1] * 22, dtype=torch.int16)}, "sorted"),
]


@pytest.mark.parametrize("over, match", SCAN_BAD)
def test_scan_rejects(over, match):
    with pytest.raises(RuntimeError, match=match):
        ops.csr_grow_scan(**scan_args(**over))


DGA_BAD = [
    ({"delta": torch.randn(3)}, "one value per slot"),
    ({"delta": torch.randn(4, dtype=torch.float16)}, "float32 or float64"),
    ({"delta": torch.tensor([1.0, float("nan"), 0.0, 0.0])}, "NaN"),
    ({"gsum": torch.tensor([1.0, float("inf"), 0.0, 0.0, 0.0])}, "NaN or Inf"),
    ({"gsum": torch.randn(4)}, "one value per tracked"),
    ({"tracked": torch.tensor([1, 2, 2, 20, 33])}, "strictly increasing"),
    ({"tracked": torch.tensor([7, 2, 9, 20, 33])}, "strictly increasing"),
    ({"tracked": torch.tensor([1, 2, 7, 20, 48])}, "out of range"),
    ({"tracked": torch.tensor([-1, 2, 7, 20, 33])}, "out of range"),
    ({"tracked": torch.tensor([1, 2, 7, 20, 33], dtype=torch.int32)}, "int64"),
    ({"num_drop": 5}, "num_drop"),
    ({"num_drop": -1}, "num_drop"),
    ({"in_features": 7}, "out of range"),
    ({"budget": "nm", "nm_n": 1}, "the base is not 1:4"),  # ValueError
    ({"crow": torch.tensor([0, 4, 8, 12, 16, 20, 23], dtype=torch.int32)}, "crow"),
]


@pytest.mark.parametrize("over, match", DGA_BAD)
def test_drop_grow_adapt_rejects_and_changes_nothing(over, match):
    a = dga_args(**over)
    before = {k: v.clone() for k, v in a.items() if torch.is_tensor(v)}
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.csr_drop_grow_adapt_(**a)
    for k, v in before.items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=0, equal_nan=True, msg=f"{k} changed by a refused call")


def test_scan_nonfinite_tracks_nothing():
    a = scan_args(x=torch.full((5, 8), float("nan")))
    tracked, g, nbytes, finite = ops.csr_grow_scan(**a)
    assert not finite and tracked.numel() == 0 and g.numel() == 0


def test_scan_reports_its_workspace():
    a = scan_args(grad_out=torch.randn(64, 6), x=torch.randn(64, 8))
    _, _, nbytes, finite = ops.csr_grow_scan(**a)
    assert finite and nbytes >= 64 * 6 * 4 + 6 * 8 * 4  # dY^T copy and one tile at least


def test_opcheck():
    a = dga_args()
    torch.library.opcheck(torch.ops.seft.csr_drop_grow_adapt_.default, tuple(a.values()),
                          test_utils=("test_schema", "test_faketensor"))
    s = scan_args()
    torch.library.opcheck(torch.ops.seft.csr_grow_scan.default, tuple(s.values()),
                          test_utils=("test_schema", "test_faketensor"))


def test_slot_union_matches_a_python_merge():
    base, slots = setup()
    rows = torch.searchsorted(base.crow, slots.to(torch.int32), right=True) - 1
    slot_pos = (rows.long() * 8 + base.col[slots].long()).tolist()
    positions = torch.tensor(sorted(set(range(0, 48, 5)) - set(slot_pos)))
    crow, col, at_slots, at_pos = ops.csr_slot_union(base.crow, base.col, slots, positions, 8)
    merged = sorted(slot_pos + positions.tolist())
    assert col.dtype == base.col.dtype and crow.dtype == torch.int32
    got = CSRWeight(crow, col, torch.zeros(col.numel()), (6, 8))  # validates the pattern
    dense_pos = (got.row_indices().long() * 8 + got.col.long()).tolist()
    assert dense_pos == merged
    assert [merged[i] for i in at_slots.tolist()] == slot_pos
    assert [merged[i] for i in at_pos.tolist()] == positions.tolist()


@pytest.mark.parametrize("positions, match", [
    (torch.tensor([5, 3]), "strictly increasing"), (torch.tensor([3, 3]), "strictly increasing"),
    (torch.tensor([48]), "out of range"), (torch.tensor([-1]), "out of range"),
    (torch.tensor([1.0]), "int64"), ("slot", "both a slot"),
])
def test_slot_union_rejects(positions, match):
    base, slots = setup()
    if isinstance(positions, str):  # a position that is also a slot's
        row = int(torch.searchsorted(base.crow, base.crow.new_tensor([int(slots[1])]), right=True)) - 1
        positions = torch.tensor([row * 8 + int(base.col[slots[1]])])
    with pytest.raises(RuntimeError, match=match):
        ops.csr_slot_union(base.crow, base.col, slots, positions, 8)


def test_opcheck_slot_union():
    base, slots = setup()
    torch.library.opcheck(torch.ops.seft.csr_slot_union.default, (base.crow, base.col, slots, torch.tensor([1, 2]), 8),
                          test_utils=("test_schema", "test_faketensor"))
