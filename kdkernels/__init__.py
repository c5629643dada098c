"""kdkernels: fused kernels for knowledge-distillation losses (docs/losses.md has the exact definitions).

The per-method functions (``kd_loss`` ...) and modules (``KDLoss`` ...) are generated from the method table
``METHODS`` (methods.py).
"""

from importlib import metadata as _metadata

from . import alignment, backends
from .arguments import TEMPERATURE_RANGE
from .backends import available_backends
from .cross_vocab import VocabMap, cross_vocab_loss, vocab_map
from .functional import LOSS_FUNCTIONS, LossParts, cakd_feature_loss, distill_loss
from .linear import linear_distill_loss
from .methods import METHODS
from .modules import LOSS_MODULES, CrossVocabLoss, DistillLoss, LinearDistillLoss, SerialHead
from .sparse import SparseTeacher
from .sparse_store import SparseTeacherWriter, load_sparse_teachers, save_sparse_teachers

globals().update(LOSS_FUNCTIONS)
globals().update(LOSS_MODULES)

try:
    from .backends import triton as _triton_backend  # noqa: F401  (registers backend "triton")
except ImportError as error:  # triton is optional: CPU-only installs run the reference (and the C++ extension)
    backends.register(
        backends.Backend(
            "triton",
            None,
            lambda device, reason=(f"the triton package could not be imported ({error}); pip install triton"): reason,
        )
    )

from .backends import extension as _extension  # noqa: E402  (registers "cpu" and "cuda", or why they are missing)

release_cached_gradients = _extension.release_cached_gradients

try:  # the one version is pyproject.toml's, read from the installed package's metadata
    __version__ = _metadata.version("kdkernels")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "METHODS",
    "TEMPERATURE_RANGE",
    "available_backends",
    "distill_loss",
    *LOSS_FUNCTIONS,
    "cakd_feature_loss",
    "DistillLoss",
    *LOSS_MODULES,
    "SerialHead",
    "linear_distill_loss",
    "LinearDistillLoss",
    "SparseTeacher",
    "SparseTeacherWriter",
    "save_sparse_teachers",
    "load_sparse_teachers",
    "LossParts",
    "release_cached_gradients",
    "cross_vocab_loss",
    "CrossVocabLoss",
    "VocabMap",
    "vocab_map",
    "alignment",
]
