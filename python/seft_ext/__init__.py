"""seft_ext: sparse fine-tuning with evolving topology (SEFT) for pruned LLMs.

Weights live in CSR form (crow int32, col int16/int32, values fp32/bf16/fp16/fp64) and
every forward and backward runs on the ``torch.ops.seft`` kernels.
"""
from . import _lib  # noqa: F401 (loads the operator library)
from ._lib import build_info
from . import ops
from .sparse import CSRWeight
from .bsr import BSRWeight
from .layer import SparseLinear
from .config import SEFTConfig
from .seft_linear import SEFTLinear
from .seft_block import SEFTBlockLinear
from .evolve import SEFTController
from .convert import convert_to_seft, seft_layers
from .persist import from_pretrained, merge_and_unload, print_trainable_parameters, save_pretrained, \
    trainable_parameters
from . import prune

__version__ = "0.1.0"

__all__ = ["CSRWeight", "BSRWeight", "SparseLinear", "SEFTConfig", "SEFTLinear", "SEFTBlockLinear",
           "SEFTController", "convert_to_seft",
           "seft_layers", "save_pretrained", "from_pretrained", "merge_and_unload", "trainable_parameters",
           "print_trainable_parameters", "prune", "ops", "build_info", "__version__"]
