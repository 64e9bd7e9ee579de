"""The devices and kernel sets the op tests run on.

Every device present: the CPU always, CUDA when a device is visible and the library was built
with CUDA kernels. Within a device, every kernel set: on the CPU each instruction set built in
(``ops.cpu_isa``: base, avx2, avx512; a set this CPU cannot run is skipped), on CUDA each
kernel path (``ops.cuda_path``: auto, and forced
tensor_core / cuda_core).

``SEFT_TEST_DEVICES`` (e.g. ``cuda``, or ``cpu,cuda``) restricts the device-parametrised tests
to the devices named, and makes a named device that is not usable an error instead of a skip
(a GPU check then cannot pass by skipping its CUDA tests). Tests that take no device still run.
"""
from __future__ import annotations

import os

import pytest
import torch

import seft_ext

_BUILT = seft_ext.build_info.CPU_ISAS.split(",") if seft_ext.build_info else []
CPU_ISAS = ["base"] + [isa for isa in ("avx2", "avx512") if isa in _BUILT]
CUDA_PATHS = ["auto", "tensor_core", "cuda_core"]


def _cuda_state() -> tuple[bool, str]:
    """(usable, why not)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    from seft_ext import _lib

    if _lib.load_error is not None:
        return False, f"the seft_ext library did not load: {_lib.load_error}"
    if not (_lib.build_info and _lib.build_info.WITH_CUDA):
        return False, "seft_ext was built without CUDA kernels"
    return True, ""


CUDA_OK, CUDA_WHY_NOT = _cuda_state()

_REQUESTED = os.environ.get("SEFT_TEST_DEVICES", "").replace(",", " ").split()
SELECTION_ERROR = ""  # reported by conftest.py as a usage error
if any(d not in ("cpu", "cuda") for d in _REQUESTED):
    SELECTION_ERROR = f"SEFT_TEST_DEVICES={os.environ['SEFT_TEST_DEVICES']!r}: expected 'cpu' and / or 'cuda'"
elif "cuda" in _REQUESTED and not CUDA_OK:
    SELECTION_ERROR = f"SEFT_TEST_DEVICES names cuda, but CUDA cannot be tested: {CUDA_WHY_NOT}"

DEVICES = [d for d in ("cpu", "cuda") if (d == "cpu" or CUDA_OK) and (not _REQUESTED or d in _REQUESTED)]
KERNELS = [(d, k) for d in DEVICES for k in (CPU_ISAS if d == "cpu" else CUDA_PATHS)]
CUDA_SKIP_REASON = ("SEFT_TEST_DEVICES does not name cuda" if CUDA_OK else CUDA_WHY_NOT)

# A test that only makes sense on CUDA (streams, sync checks, mixed devices, launch-grid limits).
requires_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason=CUDA_SKIP_REASON)


def require_cuda_build() -> None:
    """Skip the calling module where CUDA cannot be tested (an error when SEFT_TEST_DEVICES
    names cuda; a library that fails to load is always an error, not a skip)."""
    if not torch.cuda.is_available() and "cuda" not in _REQUESTED:
        pytest.skip("no CUDA device", allow_module_level=True)
    from seft_ext import _lib

    if _lib.load_error is not None:
        raise RuntimeError(_lib.load_error)
    if SELECTION_ERROR:
        raise RuntimeError(SELECTION_ERROR)
    if "cuda" not in DEVICES:
        pytest.skip(CUDA_SKIP_REASON, allow_module_level=True)
