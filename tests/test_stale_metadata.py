"""Memory safety whatever the structure cache believes: CSR metadata changed in place behind the
version counter (through .data), after an op has checked and cached it. Every op either gives the
right answer for what the arrays now hold or raises a clear error; none reads out of bounds. Each
case runs in a subprocess, so that a crash fails the test instead of killing the run."""
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent("""
    import torch
    from seft_ext import CSRWeight, ops
    torch.manual_seed(0)
    dense = torch.randn(12, 20) * (torch.rand(12, 20) < 0.4)
    w = CSRWeight.from_dense(dense)
    x, dy = torch.randn(5, 20), torch.randn(5, 12)
    slots = torch.arange(0, w.nnz, 3)
    ops.csr_sddmm(dy, x, w.crow, w.col, slots)        # checked and cached for this version
    ops.csr_spmm(x, w.crow, w.col, w.values)
""")

CASES = {
    "slot_past_nnz": "slots.data[-1] = w.nnz + 100000\nops.csr_sddmm(dy, x, w.crow, w.col, slots)",
    "negative_slot": "slots.data[0] = -7\nops.csr_sddmm(dy, x, w.crow, w.col, slots)",
    "slots_out_of_order": "slots.data[2], slots.data[1] = slots[1].item(), slots[2].item()\n"
                          "ops.csr_sddmm(dy, x, w.crow, w.col, slots)",
    "column_past_in_spmm": "w.col.data[3] = 10000\nops.csr_spmm(x, w.crow, w.col, w.values)",
    "column_past_in_spmm_t": "w.col.data[3] = 10000\nops.csr_spmm_t(dy, w.crow, w.col, w.values, 20)",
    "column_past_in_sddmm": "w.col.data[3] = 10000\nops.csr_sddmm(dy, x, w.crow, w.col, slots)",
    "column_past_in_spmm_one_token": "ops.csr_spmm(x[:1], w.crow, w.col, w.values)\n"  # its check is cached
                                     "w.col.data[3] = 10000\nops.csr_spmm(x[:1], w.crow, w.col, w.values)",
    "negative_column_spmm_one_token": "ops.csr_spmm(x[:1], w.crow, w.col, w.values)\n"
                                      "w.col.data[3] = -2\nops.csr_spmm(x[:1], w.crow, w.col, w.values)",
    "offset_past_nnz": "w.crow.data[5] = w.nnz + 50\nops.csr_spmm(x, w.crow, w.col, w.values)",
    "offsets_decreasing": "w.crow.data[4] = w.crow[6].item() + 1\nops.csr_spmm_t(dy, w.crow, w.col, w.values, 20)",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stale_metadata_is_refused_not_read_out_of_bounds(name):
    code = PRELUDE + textwrap.dedent("""
        try:
    """) + textwrap.indent(CASES[name], "    ") + textwrap.dedent("""
        except (RuntimeError, ValueError) as e:
            print("REFUSED:", str(e).splitlines()[0])
        else:
            print("NO ERROR")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crashed (exit {r.returncode}):\n{r.stderr[-2000:]}"
    assert "REFUSED:" in r.stdout, r.stdout + r.stderr[-2000:]
