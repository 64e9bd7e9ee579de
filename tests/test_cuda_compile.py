"""Every cpp/cuda/*.cu compiles with nvcc for sm_90 and sm_80, against the installed torch's
headers. Needs nvcc, not a GPU, and works with a CPU-only torch too: its wheel ships the
ATen/cuda and c10/cuda headers, all but the generated c10/cuda/impl/cuda_cmake_macros.h,
which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips (it only matters for Windows DLL exports).
Skipped where nvcc is not on PATH.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "cpp" / "cuda").glob("*.cu"))
ARCHS = ("90", "80")


def _cxx_std() -> str:
    # Same rule as CMakeLists.txt: torch >= 2.14's headers need C++20, older ones build as C++17.
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def _nvcc_command(src: pathlib.Path, obj: pathlib.Path) -> list[str]:
    includes = [str(ROOT / "cpp")] + cpp_extension.include_paths()
    cmd = [
        "nvcc", f"-std={_cxx_std()}", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}", "-DSEFT_WITH_CUDA=1",
        "--threads", "0",  # the per-arch device compilations run in parallel
    ]
    for a in ARCHS:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    torch_include = pathlib.Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():  # CPU wheels
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for inc in includes:
        cmd += ["-I", inc]
    return cmd + ["-c", str(src), "-o", str(obj)]


def test_cuda_sources_exist():
    assert CU_FILES, "cpp/cuda holds no .cu file"


@pytest.mark.parametrize("src", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(src: pathlib.Path, tmp_path: pathlib.Path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    obj = tmp_path / (src.stem + ".o")
    cmd = _nvcc_command(src, obj)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert r.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{r.stdout}\n{r.stderr}"
    assert obj.stat().st_size > 0
    # Both architectures' cubins are embedded.
    if shutil.which("cuobjdump"):
        listing = subprocess.run(["cuobjdump", "--list-elf", str(obj)], capture_output=True, text=True).stdout
        for a in ARCHS:
            assert f"sm_{a}" in listing, listing
