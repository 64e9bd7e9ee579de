"""Bad input must be rejected with a message that names the argument and the problem.

Every public op (``seft_ext.ops.csr_spmm``, ``csr_spmm_t``, ``csr_sddmm``) and constructor
(``CSRWeight(...)``, ``CSRWeight.from_dense``, ``CSRWeight.from_torch_sparse``,
``SparseLinear(...)``, ``SparseLinear.from_dense``) is fed a valid input with exactly one
thing corrupted. The valid input is a 5x7 weight at 40 % density with an empty row (1) and
a full row (3).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from seft_ext import CSRWeight, SparseLinear, ops

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ERR = (RuntimeError, ValueError)
OUT, IN, BATCH = 5, 7, 3
# Row 1 is empty, row 3 is full: 14 of 35 entries (40 %). Positions of the non-zeros:
#   row 0: 0..2, row 2: 3..4, row 3: 5..11, row 4: 12..13.
ROWS = [[0, 2, 5], [], [1, 3], list(range(IN)), [4, 6]]
NNZ = sum(len(r) for r in ROWS)

# torch warns that sparse CSR is beta and that invariant checks are off; both are expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------------- helpers
def csr_parts(dtype: torch.dtype = torch.float32, col_dtype: torch.dtype = torch.int16) -> dict:
    """crow / col / values of the valid 5x7 weight."""
    crow = torch.tensor([0, *itertools.accumulate(len(r) for r in ROWS)], dtype=torch.int32)
    col = torch.tensor([c for r in ROWS for c in r], dtype=col_dtype)
    g = torch.Generator().manual_seed(0)
    mag = torch.rand(NNZ, generator=g, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(NNZ, generator=g) < 0.5, -1.0, 1.0).double()
    return {"crow": crow, "col": col, "values": (mag * sign).to(dtype)}


def dense_of(parts: dict, shape=(OUT, IN)) -> torch.Tensor:
    return CSRWeight(parts["crow"], parts["col"], parts["values"], shape).to_dense()


def op_args(dtype: torch.dtype = torch.float32) -> dict:
    """Everything the three ops take, all valid."""
    g = torch.Generator().manual_seed(1)
    p = csr_parts(dtype)
    p.update(
        x=torch.randn(BATCH, IN, generator=g, dtype=torch.float64).to(dtype),
        grad_out=torch.randn(BATCH, OUT, generator=g, dtype=torch.float64).to(dtype),
        bias=torch.randn(OUT, generator=g, dtype=torch.float64).to(dtype),
        in_features=IN,
        slots=torch.tensor([0, 2, 5, 11, 13], dtype=torch.int64),
    )
    return p


def call_spmm(a):
    return ops.csr_spmm(a["x"], a["crow"], a["col"], a["values"], a["bias"])


def call_spmm_t(a):
    return ops.csr_spmm_t(a["grad_out"], a["crow"], a["col"], a["values"], a["in_features"])


def call_sddmm(a):
    return ops.csr_sddmm(a["grad_out"], a["x"], a["crow"], a["col"], a["slots"])


OPS = {"csr_spmm": call_spmm, "csr_spmm_t": call_spmm_t, "csr_sddmm": call_sddmm}


def _set(name, idx, value):
    def f(p):
        t = p[name].clone()
        t[idx] = value
        p[name] = t
    return f


def _replace(name, fn):
    def f(p):
        p[name] = fn(p[name])
    return f


# (id, corruption of crow/col/values, regex the message must match). Each applies to the
# CSRWeight constructor and to every op (values ones: not to csr_sddmm, which takes none).
CSR_CORRUPTIONS = [
    ("col_unsorted_in_row", _set("col", slice(0, 3), torch.tensor([0, 5, 2])), r"sorted"),
    ("col_unsorted_in_full_row", _set("col", slice(5, 7), torch.tensor([1, 0])), r"sorted"),
    ("col_duplicate_in_row", _set("col", slice(3, 5), torch.tensor([1, 1])), r"unique"),
    ("col_duplicate_in_full_row", _set("col", 11, 5), r"unique"),
    ("col_eq_in", _set("col", 13, IN), r"out of range"),
    ("col_far_out_of_range", _set("col", 2, 1000), r"out of range"),
    ("col_negative_first", _set("col", 0, -1), r"out of range"),
    ("col_negative_mid_row", _set("col", 2, -3), r"out of range"),
    ("crow_first_nonzero", _set("crow", 0, 1), r"crow\[0\] must be 0"),
    ("crow_decreasing", _set("crow", 2, 2), r"crow must be non-decreasing"),
    ("crow_decreasing_to_negative", _set("crow", 1, -2), r"crow must be non-decreasing"),
    ("crow_last_lt_nnz", _set("crow", -1, NNZ - 1), r"crow\[-1\].*nnz"),
    ("crow_last_gt_nnz", _set("crow", -1, NNZ + 1), r"crow\[-1\].*nnz"),
    ("crow_int64", _replace("crow", lambda t: t.long()), r"crow must be int32"),
    ("crow_int16", _replace("crow", lambda t: t.short()), r"crow must be int32"),
    ("crow_float", _replace("crow", lambda t: t.float()), r"crow must be int32"),
    ("crow_2d", _replace("crow", lambda t: t.unsqueeze(0)), r"crow must be 1-D"),
    ("col_int64", _replace("col", lambda t: t.long()), r"col must be int16 or int32"),
    ("col_uint8", _replace("col", lambda t: t.to(torch.uint8)), r"col must be int16 or int32"),
    ("col_float", _replace("col", lambda t: t.float()), r"col must be int16 or int32"),
    ("col_2d", _replace("col", lambda t: t.unsqueeze(0)), r"col must be 1-D"),
    ("values_too_short", _replace("values", lambda t: t[:-1]), r"values has 13 entries but col has 14"),
    ("values_too_long", _replace("values", lambda t: torch.cat([t, t[:1]])), r"values has 15 entries but col has 14"),
    ("values_int32", _replace("values", lambda t: t.to(torch.int32)), r"values must be"),
    ("values_int64", _replace("values", lambda t: t.to(torch.int64)), r"values must be"),
    ("values_bool", _replace("values", lambda t: t != 0), r"values must be"),
    ("values_complex", _replace("values", lambda t: t.to(torch.complex64)), r"values must be"),
    ("values_2d", _replace("values", lambda t: t.unsqueeze(1)), r"values must be 1-D"),
]


# Corruptions that keep every dtype and length, so they can be written into existing buffers.
IN_PLACE = ("col_unsorted", "col_duplicate", "col_eq_in", "col_far", "col_negative", "crow_first", "crow_decreasing",
            "crow_last")


def _csr_cases(prefixes=None):
    return [pytest.param(f, rx, id=i) for i, f, rx in CSR_CORRUPTIONS if prefixes is None or i.startswith(prefixes)]


# ---------------------------------------------------------------------------------- sanity
def test_valid_input_is_accepted():
    """The base input is valid for every entry point (else every rejection below is moot)."""
    p = csr_parts()
    w = CSRWeight(p["crow"], p["col"], p["values"], (OUT, IN))
    assert w.nnz == NNZ and abs(w.sparsity - 0.6) < 1e-12
    dense = w.to_dense()
    assert (dense[1] == 0).all() and (dense[3] != 0).all()
    assert torch.equal(CSRWeight.from_dense(dense).to_dense(), dense)
    assert torch.equal(CSRWeight.from_dense(dense, dense != 0).to_dense(), dense)
    assert torch.equal(CSRWeight.from_torch_sparse(dense.to_sparse_csr()).to_dense(), dense)
    assert torch.equal(CSRWeight.from_torch_sparse(dense.to_sparse()).to_dense(), dense)
    a = op_args()
    for call in OPS.values():
        call(a)
    SparseLinear(w, a["bias"])(a["x"])
    lin = nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight.copy_(dense)
    SparseLinear.from_dense(lin)(a["x"])


# ---------------------------------------------------------------------------------- CSR parts
@pytest.mark.parametrize("corrupt, match", _csr_cases())
def test_csrweight_rejects(corrupt, match):
    p = csr_parts()
    corrupt(p)
    with pytest.raises(ERR, match=match):
        CSRWeight(p["crow"], p["col"], p["values"], (OUT, IN))


OP_CSR_CASES = [
    pytest.param(op, f, rx, id=f"{op}-{i}")
    for op in OPS for i, f, rx in CSR_CORRUPTIONS
    if not (op == "csr_sddmm" and i.startswith("values"))  # csr_sddmm takes no values
]


@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("op, corrupt, match", OP_CSR_CASES)
def test_ops_reject_bad_csr(op, corrupt, match, col_dtype):
    a = op_args()
    a["col"] = a["col"].to(col_dtype)
    corrupt(a)
    with pytest.raises(ERR, match=match):
        OPS[op](a)


@pytest.mark.parametrize("op", list(OPS))
def test_ops_reject_empty_crow(op):
    a = op_args()
    a["crow"] = torch.zeros(0, dtype=torch.int32)
    with pytest.raises(ERR, match=r"crow must be 1-D with out \+ 1 >= 1 entries"):
        OPS[op](a)


@pytest.mark.parametrize("op", list(OPS))
def test_ops_reject_col_beyond_in_for_int32_and_large_index(op):
    """int32 columns past the int16 range are still range-checked."""
    a = op_args()
    a["col"] = a["col"].int()
    a["col"][13] = 40000
    with pytest.raises(ERR, match=r"col index 40000 in row 4 is out of range \[0, 7\)"):
        OPS[op](a)


def test_op_message_names_first_bad_row():
    a = op_args()
    a["col"] = a["col"].clone()
    a["col"][11] = 5  # duplicate in row 3
    a["col"][13] = 9  # out of range in row 4
    with pytest.raises(ERR, match=r"row 3 must be sorted and unique, but 5 is followed by 5"):
        call_spmm(a)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((OUT + 1, IN), r"crow must have out \+ 1 = 7 entries, got 6"),
        ((OUT - 1, IN), r"crow must have out \+ 1 = 5 entries, got 6"),
        ((OUT, IN - 1), r"out of range \[0, 6\)"),
        ((OUT, 0), r"out of range \[0, 0\)"),
        ((-1, IN), r"shape must be non-negative"),
        ((OUT, -7), r"shape must be non-negative"),
    ],
    ids=["more_rows", "fewer_rows", "fewer_cols", "zero_cols", "neg_out", "neg_in"],
)
def test_csrweight_rejects_shape_mismatch(shape, match):
    p = csr_parts()
    with pytest.raises(ERR, match=match):
        CSRWeight(p["crow"], p["col"], p["values"], shape)


def test_csrweight_rejects_int16_index_for_wide_matrix():
    p = csr_parts()
    with pytest.raises(ERR, match=r"int16 col indices cannot address 40000 columns"):
        CSRWeight(p["crow"], p["col"], p["values"], (OUT, 40000))
    CSRWeight(p["crow"], p["col"].int(), p["values"], (OUT, 40000))  # int32 is fine


@pytest.mark.parametrize("name", ["crow", "col", "values"])
def test_csrweight_rejects_non_tensor(name):
    p = csr_parts()
    p[name] = p[name].tolist()
    with pytest.raises(ERR, match=rf"{name} must be a tensor"):
        CSRWeight(p["crow"], p["col"], p["values"], (OUT, IN))


@pytest.mark.parametrize("name", ["crow", "col", "values"])
def test_csrweight_rejects_device_mismatch(name):
    p = csr_parts()
    p[name] = p[name].to("meta")
    with pytest.raises(ERR, match=r"must share a device") as e:
        CSRWeight(p["crow"], p["col"], p["values"], (OUT, IN))
    assert "meta" in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pos", [0, 4, 11, NNZ - 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_csrweight_rejects_non_finite_values(bad, pos, dtype):
    p = csr_parts(dtype)
    p["values"][pos] = bad
    with pytest.raises(ERR, match=r"values contain NaN or Inf"):
        CSRWeight(p["crow"], p["col"], p["values"], (OUT, IN))


# ---------------------------------------------------------------------------------- dense operands
def _dense(name, fn):
    return _replace(name, fn)


SPMM_CASES = [
    ("x_float64", _dense("x", lambda t: t.double()), r"x has dtype Double but the weight values have dtype Float"),
    ("x_bfloat16", _dense("x", lambda t: t.bfloat16()), r"x has dtype BFloat16 but the weight values"),
    ("x_int", _dense("x", lambda t: t.int()), r"x has dtype Int but the weight values"),
    ("x_0d", _dense("x", lambda t: t[0, 0]), r"x must have at least 1 dimension"),
    ("x_last_dim_too_small", _dense("x", lambda t: t[:, :4]), r"col index 5 in row 0 is out of range \[0, 4\)"),
    ("bias_too_short", _dense("bias", lambda t: t[:-1]), r"bias must have last dimension 5, got shape \[4\]"),
    ("bias_too_long", _dense("bias", lambda t: torch.cat([t, t[:1]])), r"bias must have last dimension 5"),
    ("bias_2d", _dense("bias", lambda t: t.unsqueeze(0)), r"bias must be 1-D of size out = 5"),
    ("bias_0d", _dense("bias", lambda t: t[0]), r"bias must be 1-D of size out = 5"),
    ("bias_float64", _dense("bias", lambda t: t.double()), r"bias has dtype Double but the weight values"),
    ("bias_int", _dense("bias", lambda t: t.long()), r"bias has dtype Long but the weight values"),
    # crow one row longer than bias: crow's length is the op's out.
    ("crow_longer_than_bias", _dense("crow", lambda t: torch.cat([t, t[-1:]])), r"bias must have last dimension 6"),
]

SPMM_T_CASES = [
    ("grad_out_too_short", _dense("grad_out", lambda t: t[:, :-1]),
     r"grad_out must have last dimension 5, got shape \[3, 4\]"),
    ("grad_out_too_long", _dense("grad_out", lambda t: torch.cat([t, t[:, :1]], 1)),
     r"grad_out must have last dimension 5"),
    ("grad_out_float64", _dense("grad_out", lambda t: t.double()), r"grad_out has dtype Double but the weight values"),
    ("grad_out_half", _dense("grad_out", lambda t: t.half()), r"grad_out has dtype Half but the weight values"),
    ("grad_out_int", _dense("grad_out", lambda t: t.int()), r"grad_out has dtype Int but the weight values"),
    ("grad_out_0d", _dense("grad_out", lambda t: t[0, 0]), r"grad_out must have at least 1 dimension"),
    ("in_features_too_small", lambda a: a.update(in_features=IN - 1), r"out of range \[0, 6\)"),
    ("in_features_zero", lambda a: a.update(in_features=0), r"out of range \[0, 0\)"),
    ("in_features_negative", lambda a: a.update(in_features=-1), r"in_features must be >= 0"),
    ("crow_longer_than_grad_out", _dense("crow", lambda t: torch.cat([t, t[-1:]])),
     r"grad_out must have last dimension 6"),
]

SDDMM_CASES = [
    ("grad_out_too_short", _dense("grad_out", lambda t: t[:, :-1]), r"grad_out must have last dimension 5"),
    ("grad_out_float64", _dense("grad_out", lambda t: t.double()), r"grad_out has dtype Double but the weight values"),
    ("grad_out_int", _dense("grad_out", lambda t: t.int()), r"grad_out has dtype Int"),
    ("grad_out_leading_dims", _dense("grad_out", lambda t: torch.cat([t, t[:1]])), r"same leading dimensions"),
    ("grad_out_extra_dim", _dense("grad_out", lambda t: t.unsqueeze(0)), r"same leading dimensions"),
    ("x_int", lambda a: a.update(x=a["x"].int(), grad_out=a["grad_out"].int()), r"x must be float32, float64"),
    ("x_bool", lambda a: a.update(x=a["x"] > 0, grad_out=a["grad_out"] > 0), r"x must be float32, float64"),
    ("x_0d", _dense("x", lambda t: t[0, 0]), r"x must have at least 1 dimension"),
    ("x_last_dim_too_small", _dense("x", lambda t: t[:, :4]), r"col index 5 in row 0 is out of range \[0, 4\)"),
    ("crow_longer_than_grad_out", _dense("crow", lambda t: torch.cat([t, t[-1:]])),
     r"grad_out must have last dimension 6"),
    ("slots_unsorted", _dense("slots", lambda t: t.flip(0)), r"slots must be strictly increasing"),
    ("slots_duplicate", _dense("slots", lambda t: torch.tensor([0, 2, 2, 5])), r"slots must be strictly increasing"),
    ("slots_eq_nnz", _dense("slots", lambda t: torch.tensor([0, NNZ])), r"slots\[1\] = 14 is out of range \[0, 14\)"),
    ("slots_large", _dense("slots", lambda t: torch.tensor([2**40])), r"out of range \[0, 14\)"),
    ("slots_negative", _dense("slots", lambda t: torch.tensor([-1, 3])), r"slots\[0\] = -1 is out of range"),
    ("slots_int32", _dense("slots", lambda t: t.int()), r"slots must be int64"),
    ("slots_int16", _dense("slots", lambda t: t.short()), r"slots must be int64"),
    ("slots_float", _dense("slots", lambda t: t.float()), r"slots must be int64"),
    ("slots_bool", _dense("slots", lambda t: torch.ones(NNZ, dtype=torch.bool)), r"slots must be int64"),
    ("slots_2d", _dense("slots", lambda t: t.unsqueeze(0)), r"slots must be 1-D"),
    ("slots_0d", _dense("slots", lambda t: t[1]), r"slots must be 1-D"),
]


def _cases(cases):
    return [pytest.param(f, rx, id=i) for i, f, rx in cases]


@pytest.mark.parametrize("corrupt, match", _cases(SPMM_CASES))
def test_csr_spmm_rejects(corrupt, match):
    a = op_args()
    corrupt(a)
    with pytest.raises(ERR, match=match):
        call_spmm(a)


@pytest.mark.parametrize("corrupt, match", _cases(SPMM_T_CASES))
def test_csr_spmm_t_rejects(corrupt, match):
    a = op_args()
    corrupt(a)
    with pytest.raises(ERR, match=match):
        call_spmm_t(a)


@pytest.mark.parametrize("corrupt, match", _cases(SDDMM_CASES))
def test_csr_sddmm_rejects(corrupt, match):
    a = op_args()
    corrupt(a)
    with pytest.raises(ERR, match=match):
        call_sddmm(a)


def test_csr_spmm_rejects_bad_input_under_autograd():
    """Same checks when gradients are wanted (the autograd wrapper must not bypass them)."""
    a = op_args()
    a["values"] = a["values"].clone().requires_grad_()
    a["x"] = a["x"].clone().requires_grad_()
    a["col"] = a["col"].clone()
    a["col"][0:3] = torch.tensor([0, 5, 2])
    with pytest.raises(ERR, match=r"sorted"):
        call_spmm(a)


@pytest.mark.parametrize("name", ["crow", "col"])
@pytest.mark.parametrize("op", list(OPS))
def test_ops_reject_none_index(op, name):
    a = op_args()
    a[name] = None
    with pytest.raises(ERR, match=r"crow and col must be tensors"):
        OPS[op](a)


@pytest.mark.parametrize("name", ["x", "crow", "values"])
def test_csr_spmm_rejects_sparse_layout(name):
    """No kernel for sparse layouts: the dispatcher's NotImplementedError (a RuntimeError) names the backend."""
    a = op_args()
    a[name] = a[name].to_sparse()
    with pytest.raises(ERR, match=r"SparseCPU"):
        call_spmm(a)


# ---------------------------------------------------------------------------------- device mismatch
# One tensor on 'meta', the rest on CPU. The meta kernels (the fake kernels registered in
# ops.py) win dispatch and return an (uninitialised!) tensor without checking devices.
DEVICE_CASES = [(op, name) for op, names in [
    ("csr_spmm", ["x", "crow", "col", "values", "bias"]),
    ("csr_spmm_t", ["grad_out", "crow", "col", "values"]),
    ("csr_sddmm", ["grad_out", "x", "crow", "col", "slots"]),
] for name in names]


@pytest.mark.parametrize("op, name", DEVICE_CASES, ids=[f"{o}-{n}" for o, n in DEVICE_CASES])
def test_ops_reject_device_mismatch(op, name):
    a = op_args()
    a[name] = a[name].to("meta")
    with pytest.raises(ERR, match=r"(is on|device).*meta|meta.*(is on|device)"):
        OPS[op](a)


@pytest.mark.parametrize("op", list(OPS))
def test_ops_all_meta_is_shape_inference(op):
    """All tensors on meta is legitimate (shape propagation): no error, meta output."""
    a = op_args()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            a[k] = v.to("meta")
    y = OPS[op](a)
    assert y.device.type == "meta"


# ---------------------------------------------------------------------------------- from_dense
def _dense_weight(dtype=torch.float32):
    return dense_of(csr_parts(dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [(0, 0), (3, 6), (4, 6)])
def test_from_dense_rejects_non_finite(bad, where):
    d = _dense_weight()
    d[where] = bad
    with pytest.raises(ERR, match=r"dense contains NaN or Inf"):
        CSRWeight.from_dense(d)
    with pytest.raises(ERR, match=r"dense contains NaN or Inf"):
        CSRWeight.from_dense(d, torch.ones(OUT, IN, dtype=torch.bool))


def test_from_dense_rejects_overflow_on_dtype_cast():
    d = _dense_weight(torch.float64)
    d[3, 3] = 1e6  # finite in float64, inf in float16
    with pytest.raises(ERR, match=r"NaN or Inf"):
        CSRWeight.from_dense(d, dtype=torch.float16)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d[0], r"dense must be a 2-D tensor"),
        (lambda d: d.unsqueeze(0), r"dense must be a 2-D tensor"),
        (lambda d: d.tolist(), r"dense must be a 2-D tensor"),
        (lambda d: d.long(), r"dense must be floating point"),
        (lambda d: d != 0, r"dense must be floating point"),
    ],
    ids=["1d", "3d", "list", "int64", "bool"],
)
def test_from_dense_rejects_bad_dense(make, match):
    with pytest.raises(ERR, match=match):
        CSRWeight.from_dense(make(_dense_weight()))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_from_dense_rejects_bad_value_dtype(dtype):
    with pytest.raises(ERR, match=r"values must be one of"):
        CSRWeight.from_dense(_dense_weight(), dtype=dtype)


BAD_MASKS = [
    ("shape_5x6", lambda m: m[:, :-1], r"mask shape \(5, 6\) differs from dense shape \(5, 7\)"),
    ("shape_transposed", lambda m: m.T, r"mask shape \(7, 5\) differs"),
    ("shape_flat", lambda m: m.flatten(), r"mask shape \(35,\) differs"),
    ("shape_3d", lambda m: m.unsqueeze(0), r"mask shape \(1, 5, 7\) differs"),
    ("dtype_uint8", lambda m: m.to(torch.uint8), r"mask must be a bool tensor, got torch.uint8"),
    ("dtype_int64", lambda m: m.long(), r"mask must be a bool tensor, got torch.int64"),
    ("dtype_float", lambda m: m.float(), r"mask must be a bool tensor, got torch.float32"),
    ("list", lambda m: m.tolist(), r"mask must be a bool tensor"),
    ("meta", lambda m: m.to("meta"), r"mask is on meta but dense is on cpu"),
]


@pytest.mark.parametrize("make, match", [pytest.param(f, rx, id=i) for i, f, rx in BAD_MASKS])
def test_from_dense_rejects_bad_mask(make, match):
    d = _dense_weight()
    with pytest.raises(ERR, match=match):
        CSRWeight.from_dense(d, make(d != 0))


@pytest.mark.parametrize("make, match", [pytest.param(f, rx, id=i) for i, f, rx in BAD_MASKS])
def test_sparselinear_from_dense_rejects_bad_mask(make, match):
    lin = nn.Linear(IN, OUT)
    with pytest.raises(ERR, match=match):
        SparseLinear.from_dense(lin, make(lin.weight != 0))


# ---------------------------------------------------------------------------------- from_torch_sparse
def _torch_csr(p, index_dtype=torch.int64):
    return torch.sparse_csr_tensor(p["crow"].to(index_dtype), p["col"].to(index_dtype), p["values"], (OUT, IN),
                                   check_invariants=False)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("corrupt, match", _csr_cases(IN_PLACE))
def test_from_torch_sparse_rejects(corrupt, match, index_dtype):
    p = csr_parts()
    corrupt(p)
    with pytest.raises(ERR, match=match):
        CSRWeight.from_torch_sparse(_torch_csr(p, index_dtype=index_dtype))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_from_torch_sparse_rejects_col_that_wraps_in_int16(index_dtype):
    p = csr_parts()
    p["col"] = p["col"].long()
    p["col"][13] = 65536 + 6  # int16 would read 6, the original value
    with pytest.raises(ERR, match=r"out of range"):
        CSRWeight.from_torch_sparse(_torch_csr(p, index_dtype=index_dtype))


def test_from_torch_sparse_rejects_crow_that_wraps_in_int32():
    p = csr_parts()
    p["crow"] = p["crow"].long()
    p["crow"][1] += 2**32  # crow[1] > crow[2]: decreasing; int32 would read the original value
    with pytest.raises(ERR, match=r"crow"):
        CSRWeight.from_torch_sparse(_torch_csr(p))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_from_torch_sparse_rejects_non_finite(bad, layout):
    p = csr_parts()
    p["values"][7] = bad
    t = _torch_csr(p)
    if layout == "coo":
        t = t.to_sparse_coo()
    with pytest.raises(ERR, match=r"values contain NaN or Inf"):
        CSRWeight.from_torch_sparse(t)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d.tolist(), r"expected a torch sparse tensor"),
        (lambda d: d, r"expected layout torch.sparse_csr or torch.sparse_coo, got torch.strided"),
        (lambda d: d.to_sparse_csc(), r"expected layout .* got torch.sparse_csc"),
        (lambda d: torch.stack([d, d]).to_sparse_csr(), r"expected a 2-D sparse tensor, got 3-D"),
        (lambda d: d.to_sparse_csr().to(torch.int32), r"values must be one of"),
    ],
    ids=["list", "strided", "csc", "batched", "int_values"],
)
def test_from_torch_sparse_rejects_bad_tensor(make, match):
    with pytest.raises(ERR, match=match):
        CSRWeight.from_torch_sparse(make(_dense_weight()))


def test_from_torch_sparse_rejects_bad_dtype_arg():
    with pytest.raises(ERR, match=r"values must be one of"):
        CSRWeight.from_torch_sparse(_dense_weight().to_sparse_csr(), dtype=torch.int64)


# ---------------------------------------------------------------------------------- SparseLinear
def _weight(dtype=torch.float32):
    p = csr_parts(dtype)
    return CSRWeight(p["crow"], p["col"], p["values"], (OUT, IN))


@pytest.mark.parametrize(
    "bias, match",
    [
        (torch.zeros(OUT - 1), r"bias must have shape \(5,\), got \(4,\)"),
        (torch.zeros(OUT + 1), r"bias must have shape \(5,\), got \(6,\)"),
        (torch.zeros(1, OUT), r"bias must have shape \(5,\), got \(1, 5\)"),
        (torch.zeros(()), r"bias must have shape \(5,\), got \(\)"),
        (torch.zeros(OUT, dtype=torch.float64), r"bias \(torch.float64, cpu\) must match the weight"),
        (torch.zeros(OUT, dtype=torch.bfloat16), r"bias \(torch.bfloat16, cpu\) must match the weight"),
        (torch.zeros(OUT, dtype=torch.int64), r"bias \(torch.int64, cpu\) must match the weight"),
        (torch.zeros(OUT, device="meta"), r"bias \(torch.float32, meta\) must match the weight \(torch.float32, cpu\)"),
    ],
    ids=["short", "long", "2d", "0d", "float64", "bfloat16", "int64", "meta"],
)
def test_sparselinear_rejects_bad_bias(bias, match):
    with pytest.raises(ERR, match=match):
        SparseLinear(_weight(), bias)


@pytest.mark.parametrize("weight", [torch.zeros(OUT, IN), None, "w"], ids=["dense", "none", "str"])
def test_sparselinear_rejects_non_csrweight(weight):
    with pytest.raises(TypeError, match=r"weight must be a CSRWeight"):
        SparseLinear(weight)


@pytest.mark.parametrize("module", [nn.Conv1d(IN, OUT, 1), nn.Identity(), torch.zeros(OUT, IN)],
                         ids=["conv", "identity", "tensor"])
def test_sparselinear_from_dense_rejects_non_linear(module):
    with pytest.raises(TypeError, match=r"expected nn.Linear"):
        SparseLinear.from_dense(module)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_sparselinear_from_dense_rejects_non_finite(bad):
    lin = nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight[2, 3] = bad
    with pytest.raises(ERR, match=r"dense contains NaN or Inf"):
        SparseLinear.from_dense(lin)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(BATCH, IN, dtype=torch.float64), r"x has dtype Double but the weight values have dtype Float"),
        (torch.randn(BATCH, IN).half(), r"x has dtype Half"),
        (torch.ones(BATCH, IN, dtype=torch.int64), r"x has dtype Long"),
        (torch.tensor(1.0), r"x must have at least 1 dimension"),
    ],
    ids=["float64", "half", "int64", "0d"],
)
def test_sparselinear_forward_rejects_bad_x(x, match):
    with pytest.raises(ERR, match=match):
        SparseLinear(_weight())(x)


@pytest.mark.parametrize("width", [IN + 1, 2 * IN])
def test_sparselinear_forward_rejects_too_wide_x(width):
    with pytest.raises(ERR, match=r"\bx\b|in_features"):
        SparseLinear(_weight())(torch.randn(BATCH, width))


def test_sparselinear_forward_names_x_when_too_narrow():
    with pytest.raises(ERR, match=r"\bx\b|in_features"):
        SparseLinear(_weight())(torch.randn(BATCH, 4))


@pytest.mark.parametrize("corrupt, match", _csr_cases(IN_PLACE))
def test_sparselinear_forward_rejects_corrupted_buffers(corrupt, match):
    """If the buffers are corrupted after construction, the kernels' own checks still fire."""
    layer = SparseLinear(_weight(), torch.zeros(OUT))
    p = {"crow": layer.crow.clone(), "col": layer.col.clone()}
    corrupt(p)
    with torch.no_grad():
        layer.crow.copy_(p["crow"])
        layer.col.copy_(p["col"])
    with pytest.raises(ERR, match=match):
        layer(torch.randn(BATCH, IN))


# ---------------------------------------------------------------------------------- nothing corrupted
def _reference(x, layer):
    y = x.double() @ layer.to_dense().double().T
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y


def _rejected_calls():
    a = op_args()
    bad_col = a["col"].clone()
    bad_col[0:3] = torch.tensor([0, 5, 2])
    bad_crow = a["crow"].clone()
    bad_crow[2] = 2
    return {
        "spmm_unsorted": lambda: ops.csr_spmm(a["x"], a["crow"], bad_col, a["values"], a["bias"]),
        "spmm_crow": lambda: ops.csr_spmm(a["x"], bad_crow, a["col"], a["values"], None),
        "spmm_bias": lambda: ops.csr_spmm(a["x"], a["crow"], a["col"], a["values"], a["bias"][:-1]),
        "spmm_t_in": lambda: ops.csr_spmm_t(a["grad_out"], a["crow"], a["col"], a["values"], 3),
        "sddmm_slots": lambda: ops.csr_sddmm(a["grad_out"], a["x"], a["crow"], a["col"], torch.tensor([3, 1])),
        "csrweight_nan": lambda: CSRWeight(a["crow"], a["col"], torch.full_like(a["values"], float("nan")), (OUT, IN)),
        "from_dense_mask": lambda: CSRWeight.from_dense(torch.ones(OUT, IN), torch.ones(OUT, IN)),
        "layer_bias": lambda: SparseLinear(_weight(), torch.zeros(3)),
    }


@pytest.mark.parametrize("isa", ["base", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rejected", list(_rejected_calls()))
def test_valid_input_works_after_rejected_one(rejected, dtype, isa):
    before = op_args(dtype)
    snapshot = {k: v.clone() for k, v in before.items() if isinstance(v, torch.Tensor)}
    try:
        ops.cpu_isa(isa)
        with pytest.raises(ERR):
            _rejected_calls()[rejected]()
        w = CSRWeight(before["crow"], before["col"], before["values"], (OUT, IN))
        layer = SparseLinear(w, before["bias"])
        # a rejected forward on the very same layer must not disturb it either
        with pytest.raises(ERR):
            layer(before["x"][:, :4])
        x = before["x"].clone().requires_grad_()
        y = layer(x)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        assert y.dtype == dtype and y.shape == (BATCH, OUT)
        torch.testing.assert_close(y.double(), _reference(x.detach(), layer), **tol)
        # 3-D input too
        x3 = before["x"].reshape(1, BATCH, IN).expand(2, BATCH, IN)
        torch.testing.assert_close(layer(x3).double(), _reference(x3, layer), **tol)
        # backward still runs and matches dense autograd
        y.sum().backward()
        wd = layer.to_dense().double()
        torch.testing.assert_close(x.grad.double(), torch.ones(BATCH, OUT, dtype=torch.float64) @ wd, **tol)
        assert torch.isfinite(layer.values.grad).all()
    finally:
        ops.cpu_isa("auto")
    # the inputs of the valid call were not modified by anything above
    for k, v in snapshot.items():
        assert torch.equal(before[k], v), k


def test_rejected_calls_do_not_modify_their_inputs():
    a = op_args()
    a["col"] = a["col"].clone()
    a["col"][0:3] = torch.tensor([0, 5, 2])
    snapshot = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    for call in OPS.values():
        with pytest.raises(ERR):
            call(a)
    for k, v in snapshot.items():
        assert torch.equal(a[k], v), k


# ---------------------------------------------------------------------------------- zero-size weights
ZERO_CASES = [
    pytest.param(op, out, inn, id=f"{op}-{out}x{inn}")
    for op in OPS for out, inn in [(0, 0), (0, 3), (3, 0)]
]


@pytest.mark.parametrize("op, out, inn", ZERO_CASES)
def test_zero_size_weight_is_not_bad_input(op, out, inn):
    """CSRWeight accepts a (0, n) or (n, 0) weight, so the ops must too (like nn.Linear does)."""
    crow = torch.zeros(out + 1, dtype=torch.int32)
    col = torch.zeros(0, dtype=torch.int16)
    values = torch.zeros(0)
    CSRWeight(crow, col, values, (out, inn))
    x, g = torch.randn(BATCH, inn), torch.randn(BATCH, out)
    if op == "csr_spmm":
        assert torch.equal(ops.csr_spmm(x, crow, col, values, torch.ones(out)), torch.ones(BATCH, out))
    elif op == "csr_spmm_t":
        assert torch.equal(ops.csr_spmm_t(g, crow, col, values, inn), torch.zeros(BATCH, inn))
    else:
        assert ops.csr_sddmm(g, x, crow, col, None).shape == (0,)


# ---------------------------------------------------------------------------------- property
@st.composite
def maybe_bad_csr(draw):
    out = draw(st.integers(0, 5))
    in_features = draw(st.integers(1, 6))  # zero width: test_zero_size_weight_is_not_bad_input
    rows = []
    for _ in range(out):
        k = draw(st.integers(0, in_features + 1))
        cols = draw(st.lists(st.integers(-1, in_features), min_size=k, max_size=k))
        if draw(st.booleans()):
            cols = sorted(set(cols))
        rows.append(cols)
    crow = [0, *itertools.accumulate(len(r) for r in rows)]
    if out and draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, out))
        crow[i] += draw(st.sampled_from([-2, -1, 1, 2]))
    col = [c for r in rows for c in r]
    return out, in_features, crow, col


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=maybe_bad_csr(), col_dtype=st.sampled_from([torch.int16, torch.int32]))
def test_python_and_cpp_checks_agree(case, col_dtype):
    """CSRWeight's validation and the kernels' C++ checks accept exactly the same CSR structures,
    and whatever both accept computes the right product."""
    out, in_features, crow_l, col_l = case
    crow = torch.tensor(crow_l, dtype=torch.int32)
    col = torch.tensor(col_l, dtype=col_dtype)
    values = torch.arange(1, len(col_l) + 1, dtype=torch.float64)
    x = torch.randn(2, in_features, dtype=torch.float64)
    try:
        w = CSRWeight(crow, col, values, (out, in_features))
        py_err = None
    except ERR as e:
        py_err = e
    try:
        y = ops.csr_spmm(x, crow, col, values, None)
        cpp_err = None
    except ERR as e:
        cpp_err = e
    assert (py_err is None) == (cpp_err is None), (py_err, cpp_err)
    if py_err is None:
        torch.testing.assert_close(y, x @ w.to_dense().T)
