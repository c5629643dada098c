"""kdkernels: fused kernels for knowledge-distillation losses (docs/losses.md has the exact definitions).

The per-method functions (``kd_loss`` ...) and modules (``KDLoss`` ...) are written from the method table
``METHODS`` (methods.py) by scripts/method_api.py into functional.py and modules.py.
"""

from importlib import metadata as _metadata

from . import alignment, backends, functional, modules
from .arguments import TEMPERATURE_RANGE
from .backends import available_backends
from .cross_vocab import VocabMap, cross_vocab_loss, vocab_map
from .functional import *  # noqa: F403  (distill_loss, kd_loss ..., LossParts)
from .linear import linear_cross_vocab_loss, linear_distill_loss
from .methods import METHODS
from .modules import *  # noqa: F403  (DistillLoss, KDLoss ..., LinearDistillLoss, CrossVocabLoss, SerialHead)
from .sparse import SparseTeacher
from .sparse_store import SparseTeacherWriter, load_sparse_teachers, save_sparse_teachers

try:
    from .backends import triton as _triton_backend  # noqa: F401  (registers backend "triton")
except ImportError as error:  # triton is optional: CPU-only installs run the reference (and the C++ extension)
    _reason = f"the triton package could not be imported ({error}); pip install triton"
    backends.register(backends.Backend(name="triton", impl=None, unavailable=lambda device: _reason))

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
    *functional.__all__,
    *modules.__all__,
    "linear_distill_loss",
    "SparseTeacher",
    "SparseTeacherWriter",
    "save_sparse_teachers",
    "load_sparse_teachers",
    "release_cached_gradients",
    "cross_vocab_loss",
    "linear_cross_vocab_loss",
    "VocabMap",
    "vocab_map",
    "alignment",
]
