"""Loads the compiled operator library (seft_ext/_seft.so) and checks it matches torch.

Import never initialises CUDA. A torch whose major.minor differs from the one the library
was built against is an ImportError (its C++ ABI differs: loading would fail with undefined
symbols or, worse, crash later). A missing library is reported when an op is first used,
so that ``python -m seft_ext`` can still print diagnostics.
"""
from __future__ import annotations

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))

try:
    from . import _build_info as build_info
except ImportError:  # running from a source tree that was never built
    build_info = None


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def _check_torch_version() -> None:
    if build_info is None:
        return
    built, running = build_info.TORCH_VERSION, torch.__version__
    if _major_minor(built) != _major_minor(running):
        raise ImportError(
            f"seft_ext was built against torch {built} but torch {running} is installed. "
            "Rebuild it against the installed torch: "
            "pip install --no-build-isolation --no-deps --force-reinstall <seft_ext source>"
        )


_check_torch_version()

library_path: str | None = None
load_error: str | None = None


def _load() -> None:
    global library_path, load_error
    candidates = sorted(glob.glob(os.path.join(_HERE, "_seft*.so")))
    if not candidates:
        load_error = (
            f"the compiled library seft_ext/_seft.so is missing from {_HERE}. "
            "Install the package (pip install --no-build-isolation --no-deps .) instead of "
            "importing it from the source tree."
        )
        return
    try:
        torch.ops.load_library(candidates[0])
        library_path = candidates[0]
    except OSError as e:  # undefined symbols, wrong architecture, ...
        load_error = f"could not load {candidates[0]}: {e}"


_load()


def require_library() -> None:
    """Raise a clear error if the native library is not loaded."""
    if load_error is not None:
        raise RuntimeError(f"seft_ext: {load_error}")


def has_kernels(op: str, device) -> bool:
    """Whether seft::<op> has a kernel for ``device``'s type in this build (CPU always; CUDA
    only in a CUDA build)."""
    if load_error is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"seft::{op}", key)
