"""seft_ext: sparse fine-tuning with evolving topology (SEFT) for pruned LLMs.

Weights live in CSR form (crow int32, col int16/int32, values fp32/bf16/fp16/fp64) and
every forward and backward runs on the ``torch.ops.seft`` kernels.
"""
from . import _lib
from ._lib import build_info
from . import ops
from .sparse import CSRWeight
from .layer import SparseLinear

__version__ = "0.1.0"

__all__ = ["CSRWeight", "SparseLinear", "ops", "build_info", "__version__"]
