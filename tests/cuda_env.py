"""Shared by the CUDA test modules: skip the whole module without a CUDA device or without
a library built with CUDA kernels (a library that fails to load is an error, not a skip)."""
import pytest
import torch


def require_cuda_build() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device", allow_module_level=True)
    from seft_ext import _lib

    if _lib.load_error is not None:
        raise RuntimeError(_lib.load_error)
    if not (_lib.build_info and _lib.build_info.WITH_CUDA):
        pytest.skip("seft_ext was built without CUDA kernels", allow_module_level=True)
