"""The compiled extension kdkernels._C (csrc/): backends "cpu" (C++ kernels) and "cuda" (CUDA kernels).

Importing kdkernels._C loads the op library ``kdkernels::divergence`` / ``decoupled`` (schema in ops.py) and their
in-place siblings ``divergence_`` / ``decoupled_``, with a CPU kernel always and a CUDA kernel when the build had
a CUDA torch and nvcc. The fused CPU kernels compute float64 logits in float64, so backend="cpu" also takes float64.
When the extension is missing, both backends are registered as unavailable with the reason and the fix.
"""

from __future__ import annotations

import torch

from . import backends
from .ops import attach_family_op, attach_inplace_family_op, family_backend

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` in the repository (setup.py; needs a C++ "
              "compiler, and nvcc with a CUDA torch for the CUDA kernels)")

try:
    from . import _C  # noqa: F401  (loads the op library)
except ImportError as error:
    LOAD_ERROR: str | None = f"the compiled extension kdkernels._C could not be imported ({error}); {BUILD_HINT}"
else:
    LOAD_ERROR = None


# Which devices the build has kernels for, read once (backends.select runs inside torch.compile traces).
BUILT_FOR = {key: LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("kdkernels::divergence", key)
             for key in ("CPU", "CUDA")}


def _unavailable_on(device_type: str, dispatch_key: str):
    def unavailable(device: torch.device) -> str | None:
        if LOAD_ERROR is not None:
            return LOAD_ERROR
        if device.type != device_type:
            return f"backend={device_type!r} runs {device_type} tensors only"
        if not BUILT_FOR[dispatch_key]:
            return f"kdkernels._C was built without {device_type.upper()} kernels; {BUILD_HINT}"
        if device_type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    return unavailable


if LOAD_ERROR is None:
    _ops = {"divergence": attach_family_op("divergence"), "decoupled": attach_family_op("decoupled")}
    _inplace = {"divergence": attach_inplace_family_op("divergence_"),
                "decoupled": attach_inplace_family_op("decoupled_")}
    _cpu_impl = family_backend("cpu", _ops, float64=True)
    _cuda_impl = family_backend("cuda", _ops, float64=False)
else:
    _cpu_impl = _cuda_impl = _ops = _inplace = None

backends.register("cpu", _cpu_impl, _unavailable_on("cpu", "CPU"), _ops, _inplace)
backends.register("cuda", _cuda_impl, _unavailable_on("cuda", "CUDA"), _ops, _inplace)
