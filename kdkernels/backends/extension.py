"""The compiled extension kdkernels._C (csrc/): backends "cpu" (C++ kernels) and "cuda" (CUDA kernels).

Importing kdkernels._C loads the op library: ``kdkernels::<family>_cpu`` and ``<family>_cuda`` and their in-place
siblings (schema in ops.py), with a CPU kernel for the first and a CUDA kernel for the second when the build had a
CUDA torch and nvcc, ``kdkernels::cross_vocab_cpu`` and ``cross_vocab_cuda`` (the losses between two vocabularies,
likewise) and ``kdkernels::scale_rows_`` (both kernels). The fused CPU kernels compute float64 logits in
float64, so backend="cpu" also takes float64. When the extension is missing, both backends are registered as
unavailable with the reason and the fix.
"""

from __future__ import annotations

import torch

from ..methods import FAMILIES
from . import Backend, reference_cross_vocab, register
from .ops import attach_cross_vocab_op, attach_family_ops, cross_vocab_entries, family_backend, full_backend

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository (setup.py; needs a C++ "
    "compiler, and nvcc with a CUDA torch for the CUDA kernels)"
)

try:
    from .. import _C  # (loads the op library)
except ImportError as error:
    LOAD_ERROR: str | None = f"the compiled extension kdkernels._C could not be imported ({error}); {BUILD_HINT}"
else:
    LOAD_ERROR = None


def release_cached_gradients() -> int:
    """Frees the gradient buffers that the CPU ops keep for reuse once their tensors are freed, and returns their
    bytes (0 without the extension). The ops keep a freed [N, V] gradient of 1 MiB or more for the next gradient it
    holds, up to the most gradient bytes in use at once and KDKERNELS_GRADIENT_CACHE_MB (read at the first gradient;
    default 2048, 0 keeps none; csrc/cpu/gradient_cache.h): fresh memory costs a page fault and the operating
    system's zeroing of every page."""
    return _C.release_cached_gradients() if LOAD_ERROR is None else 0


# Which devices the build has kernels for, read once (backend selection runs inside torch.compile traces).
BUILT_FOR = {
    backend: LOAD_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"kdkernels::divergence_{backend}", backend.upper())
    for backend in ("cpu", "cuda")
}


def _unavailable_on(backend: str):
    def unavailable(device: torch.device) -> str | None:
        if LOAD_ERROR is not None:
            return LOAD_ERROR
        if device.type != backend:
            return f"backend={backend!r} runs {backend} tensors only"
        if not BUILT_FOR[backend]:
            return f"kdkernels._C was built without {backend.upper()} kernels; {BUILD_HINT}"
        if backend == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    return unavailable


if LOAD_ERROR is None:  # (a CPU op of the fused-linear path, linear._SplitGradWeight: it writes its inputs)
    torch.library.register_fake("kdkernels::split_accumulate_")(lambda high, low, add, round: None)

for _backend in ("cpu", "cuda"):
    if LOAD_ERROR is None:
        _scale = torch.ops.kdkernels.scale_rows_.default
        _triples = {family: attach_family_ops(family, _backend, _scale) for family in FAMILIES}
        _ops = {family: ops[0] for family, ops in _triples.items()}
        _full_ops = {family: ops[2] for family, ops in _triples.items()}
        register(
            Backend(
                name=_backend,
                impl=family_backend(_backend, _ops, _scale),
                unavailable=_unavailable_on(_backend),
                full=full_backend(_full_ops, _scale),
                ops=_ops,
                inplace={family: ops[1] for family, ops in _triples.items()},
                scale_rows=_scale,
                full_ops=_full_ops,
                **cross_vocab_entries(_backend, attach_cross_vocab_op(_backend), _scale, reference_cross_vocab),
            )
        )
    else:
        register(Backend(name=_backend, impl=None, unavailable=_unavailable_on(_backend)))
