"""kdkernels: fused kernels for knowledge-distillation losses (see LOSSES.md for the exact definitions)."""

from . import backends
from .backends import available_backends
from .functional import (
    abkd_loss,
    aekt_loss,
    cakd_feature_loss,
    cakd_loss,
    distill_loss,
    dkd_loss,
    gdkd_loss,
    jsd_loss,
    kd_loss,
    rkl_loss,
    skew_fkl_loss,
    skew_rkl_loss,
    tvd_loss,
)
from .linear import linear_distill_loss
from .methods import METHODS
from .modules import (
    ABKDLoss,
    AEKTLoss,
    CAKDLoss,
    DistillLoss,
    DKDLoss,
    GDKDLoss,
    JSDLoss,
    KDLoss,
    LinearDistillLoss,
    RKLLoss,
    SerialHead,
    SkewFKLLoss,
    SkewRKLLoss,
    TVDLoss,
)
from .sparse import SparseTeacher

try:
    from . import triton as _triton_backend  # noqa: F401  (registers backend "triton")
except ImportError as error:  # triton is optional: CPU-only installs run the reference (and the C++ extension)
    _reason = f"the triton package could not be imported ({error}); pip install triton"
    backends.register("triton", None, lambda device, reason=_reason: reason)

from . import extension as _extension  # noqa: E402,F401  (registers backends "cpu" and "cuda", or why they are missing)

__version__ = "0.1.0"

__all__ = [
    "METHODS", "available_backends", "distill_loss", "kd_loss", "rkl_loss", "jsd_loss", "skew_fkl_loss",
    "skew_rkl_loss", "tvd_loss", "abkd_loss", "dkd_loss", "gdkd_loss", "cakd_loss", "aekt_loss",
    "cakd_feature_loss", "DistillLoss", "KDLoss", "RKLLoss", "JSDLoss", "SkewFKLLoss", "SkewRKLLoss", "TVDLoss",
    "ABKDLoss", "DKDLoss", "GDKDLoss", "CAKDLoss", "AEKTLoss", "SerialHead", "linear_distill_loss",
    "LinearDistillLoss", "SparseTeacher",
]
