"""The CMake switch SEFT_WITH_CUDA: OFF always configures; ON fails loudly when CUDA is unusable."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cmake = shutil.which("cmake")
pytestmark = pytest.mark.skipif(cmake is None, reason="cmake not on PATH")


def configure(tmp_path, value):
    return subprocess.run([cmake, "-S", ROOT, "-B", str(tmp_path), f"-DSEFT_WITH_CUDA={value}",
                           f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True, timeout=300)


def test_cuda_off_configures_cpu_only(tmp_path):
    r = configure(tmp_path, "OFF")
    assert r.returncode == 0, r.stderr
    info = (tmp_path / "_build_info.py").read_text()
    assert 'WITH_CUDA = "OFF" == "ON"' in info


@pytest.mark.skipif(torch.version.cuda is not None and shutil.which("nvcc") is not None,
                    reason="CUDA is usable here, so ON must succeed")
def test_cuda_on_fails_loudly_without_cuda(tmp_path):
    r = configure(tmp_path, "ON")
    assert r.returncode != 0
    assert "SEFT_WITH_CUDA=ON but" in r.stdout + r.stderr
