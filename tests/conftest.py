import pytest
import torch

import seft_ext
from seft_ext import ops

ISAS = ["base"] + (["avx2"] if "avx2" in seft_ext.build_info.CPU_ISAS.split(",") else [])


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test with each CPU kernel set built into the library."""
    try:
        ops.cpu_isa(request.param)
    except RuntimeError as e:  # built, but this CPU lacks the instructions
        pytest.skip(str(e))
    yield request.param
    ops.cpu_isa("auto")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
