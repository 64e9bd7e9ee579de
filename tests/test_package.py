"""Packaging: import side effects, the torch version guard, ``python -m seft_ext``, op registration."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import seft_ext
from seft_ext import _lib, ops


def run_python(args, tmp_path, env_extra=None, timeout=300):
    """Run ``sys.executable args`` outside the source tree (so the installed package is imported)."""
    env = dict(os.environ)
    env.pop("SEFT_CPU_ISA", None)
    env.pop("PYTHONPATH", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tmp_path)


def _major_minor(v: str) -> tuple[int, int]:
    major, minor = v.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# ---------------------------------------------------------------------------------- import
def test_library_loaded():
    assert _lib.load_error is None, _lib.load_error
    assert _lib.library_path and os.path.isfile(_lib.library_path)
    _lib.require_library()


def test_public_api():
    assert seft_ext.__version__ == "0.1.0"
    for name in seft_ext.__all__:
        assert hasattr(seft_ext, name), name
    bi = seft_ext.build_info
    assert bi is not None
    for attr in ("TORCH_VERSION", "TORCH_CUDA_VERSION", "WITH_CUDA", "NVCC_VERSION", "CUDA_ARCHS", "CPU_ISAS"):
        assert hasattr(bi, attr), attr
    assert isinstance(bi.WITH_CUDA, bool)
    assert "@" not in bi.TORCH_VERSION and "@" not in bi.CPU_ISAS  # CMake substituted them
    assert _major_minor(bi.TORCH_VERSION) == _major_minor(torch.__version__)
    assert "base" in bi.CPU_ISAS.split(",")


def test_import_does_not_initialise_cuda(tmp_path):
    r = run_python(["-c", "import seft_ext, torch; print(torch.cuda.is_initialized())"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", (r.stdout, r.stderr)


def test_cpu_use_does_not_initialise_cuda(tmp_path):
    code = textwrap.dedent("""
        import torch, seft_ext
        w = seft_ext.CSRWeight.from_dense(torch.eye(4))
        layer = seft_ext.SparseLinear(w, torch.zeros(4))
        x = torch.randn(2, 4, requires_grad=True)
        layer(x).sum().backward()
        seft_ext.ops.cpu_isa()
        print(torch.cuda.is_initialized())
    """)
    r = run_python(["-c", code], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", (r.stdout, r.stderr)


# ---------------------------------------------------------------------------------- version guard
_GUARD = textwrap.dedent("""
    import sys, torch
    torch.__version__ = sys.argv[1]          # before seft_ext._lib is imported
    try:
        import seft_ext
    except ImportError as e:
        print("IMPORTERROR", e)
    else:
        print("IMPORTED", seft_ext._lib.load_error)
""")


def _fake_versions():
    major, minor = _major_minor(seft_ext.build_info.TORCH_VERSION)
    return {
        "next_major": f"{major + 1}.{minor}.0",
        "next_minor": f"{major}.{minor + 1}.0",
        "prev_minor": f"{major}.{minor - 1}.1+cu121" if minor else f"{major - 1}.99.1+cu121",
        "old": "1.0.0",
    }


@pytest.mark.parametrize("which", list(_fake_versions()))
def test_torch_version_guard_rejects_other_major_minor(which, tmp_path):
    fake = _fake_versions()[which]
    r = run_python(["-c", _GUARD, fake], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out.startswith("IMPORTERROR"), out
    assert "built against" in out
    assert seft_ext.build_info.TORCH_VERSION in out and fake in out  # both versions are named
    assert "Rebuild" in out


@pytest.mark.parametrize("suffix", ["99", "0+cpu", "7+cu999"])
def test_torch_version_guard_accepts_other_patch(suffix, tmp_path):
    major, minor = _major_minor(seft_ext.build_info.TORCH_VERSION)
    r = run_python(["-c", _GUARD, f"{major}.{minor}.{suffix}"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "IMPORTED None", r.stdout


# ---------------------------------------------------------------------------------- python -m seft_ext
def _diagnostics(tmp_path, env_extra=None) -> dict[str, str]:
    r = run_python(["-m", "seft_ext"], tmp_path, env_extra)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rows = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}(.*)$", line)
        assert m, f"unexpected line {line!r}"
        rows[m.group(1)] = m.group(2)
    return rows


def test_main_prints_diagnostics(tmp_path):
    rows = _diagnostics(tmp_path)
    assert rows["seft_ext"] == seft_ext.__version__
    assert rows["torch (running)"] == str(torch.__version__)
    assert rows["torch (built against)"] == seft_ext.build_info.TORCH_VERSION
    built = rows["built with CUDA"]
    if seft_ext.build_info.WITH_CUDA:
        assert built.startswith("yes (nvcc "), built
    else:
        assert built == "no"
    assert rows["CUDA available"] in ("True", "False")
    assert rows["CUDA available"] == str(torch.cuda.is_available())
    assert rows["threads (torch)"].isdigit() and int(rows["threads (torch)"]) >= 1
    assert rows["CPU kernel sets built"] == seft_ext.build_info.CPU_ISAS
    assert rows["CPU kernel set in use"] in seft_ext.build_info.CPU_ISAS.split(",")
    assert "NOT LOADED" not in rows["library"] and rows["library"].endswith(".so")


def test_main_reports_env_chosen_isa(tmp_path):
    rows = _diagnostics(tmp_path, {"SEFT_CPU_ISA": "base"})
    assert rows["CPU kernel set in use"] == "base"


# ---------------------------------------------------------------------------------- registered ops
SCHEMAS = {
    "csr_spmm": "seft::csr_spmm(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias=None) -> Tensor",
    "csr_spmm_t": ("seft::csr_spmm_t(Tensor grad_out, Tensor crow, Tensor col, Tensor values, int in_features) "
                   "-> Tensor"),
    "csr_sddmm": "seft::csr_sddmm(Tensor grad_out, Tensor x, Tensor crow, Tensor col, Tensor? slots=None) -> Tensor",
    "cpu_isa": 'seft::cpu_isa(str choose="") -> str',
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_op_registered(name):
    op = getattr(torch.ops.seft, name)
    assert str(op.default._schema) == SCHEMAS[name]


@pytest.mark.parametrize("name", ["csr_spmm", "csr_spmm_t", "csr_sddmm"])
def test_op_has_cpu_and_meta_kernels(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seft::{name}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seft::{name}", "Meta")


def test_ops_wrappers_call_registered_ops():
    w = seft_ext.CSRWeight.from_dense(torch.eye(3, dtype=torch.float64))
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(ops.csr_spmm(x, w.crow, w.col, w.values), torch.ops.seft.csr_spmm(x, w.crow, w.col, w.values))
    assert torch.equal(ops.csr_spmm(x, w.crow, w.col, w.values), x)


@pytest.mark.parametrize("bogus", ["bogus", "AVX2", "Base", "avx512f", " auto"])
def test_cpu_isa_rejects_unknown(bogus):
    before = ops.cpu_isa()
    with pytest.raises(RuntimeError, match=rf"cpu_isa: expected '', 'auto', 'base', 'avx2' or 'avx512', got '{bogus}'"):
        ops.cpu_isa(bogus)
    assert ops.cpu_isa() == before  # unchanged


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


AVX2_FLAGS = {"avx2", "fma", "f16c"}
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512vl", "avx512bw", "avx512dq"}


def test_cpu_isa_round_trip():
    built = seft_ext.build_info.CPU_ISAS.split(",")
    runs = {"avx2": "avx2" in built and AVX2_FLAGS <= _cpu_flags(),
            "avx512": "avx512" in built and AVX512_FLAGS <= _cpu_flags()}
    try:
        assert ops.cpu_isa("base") == "base"
        assert ops.cpu_isa() == "base"
        assert ops.cpu_isa("") == "base"
        auto = ops.cpu_isa("auto")
        assert auto in built
        assert ops.cpu_isa() == auto
        assert auto == ("avx512" if runs["avx512"] else "avx2" if runs["avx2"] else "base")  # the best one
        for isa, ok in runs.items():
            ops.cpu_isa("base")
            if ok:
                assert ops.cpu_isa(isa) == isa
            else:
                with pytest.raises(RuntimeError, match=r"no AVX"):
                    ops.cpu_isa(isa)
                assert ops.cpu_isa() == "base"  # unchanged
    finally:
        ops.cpu_isa("auto")
    assert ops.cpu_isa() == auto


def test_results_agree_across_isas(isa):
    """Each kernel set built (the `isa` fixture: skipped where this CPU lacks it) against fp64."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 40, generator=g) * (torch.rand(6, 40, generator=g) < 0.5)
    w = seft_ext.CSRWeight.from_dense(dense)
    x = torch.randn(3, 40, generator=g)
    y = ops.csr_spmm(x, w.crow, w.col, w.values)
    torch.testing.assert_close(y.double(), x.double() @ dense.double().T, rtol=1e-5, atol=1e-5)


def test_env_selects_base_isa(tmp_path):
    r = run_python(["-c", "import seft_ext; print(seft_ext.ops.cpu_isa())"], tmp_path, {"SEFT_CPU_ISA": "base"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "base"
