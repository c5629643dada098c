"""The backends: which implementation computes a loss for tensors on a given device.

    reference.py   pure PyTorch, autograd gradients (any device, float64 too): the ground truth and the fallback
    ops.py         the custom ops every fused backend exposes (schema, fake functions, autograd)
    extension.py   backends "cpu" and "cuda": the compiled extension kdkernels._C (csrc/)
    triton/        backend "triton": the Triton kernels

A backend is registered with ``impl(call: LossCall, student [N, V], teacher [N, V]) -> (loss, parts)``: the loss
(reduced, or [N] for reduction="none") and, not differentiable, its two terms unweighted, [distill, ce] reduced the same
way ([2] or [2, N]; ce is 0 unless ``call.with_ce``), with ``full(call, student, teacher, temperature)`` the same
differentiable in the teacher and a 0-d ``temperature`` tensor too (the full gradient), a test of the devices it runs
on, and for a fused backend its
family ops and their in-place siblings (schema in ops.py) and its ``scale_rows`` (grad [N, V] *= factor, in place, rows
whose factor is exactly 1 left untouched), and for the losses between two vocabularies its ``cross_vocab`` (None
where it has none; kdkernels/cross_vocab.py). ``backend="auto"`` takes the first available backend in the device's
preference order that has the entry point asked for; naming a backend that cannot run raises a RuntimeError that
says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference


@dataclass(kw_only=True)
class Backend:
    name: str
    impl: Callable | None
    unavailable: Callable[[torch.device], str | None]  # None when it can run on that device, else the reason
    full: Callable | None = None  # the full gradient: impl differentiable in the teacher and temperature too
    # Fused backends: {"divergence": op, "decoupled": op} (ops.py), their in-place siblings that overwrite the
    # student logits with d loss / d student and return the loss, and the in-place row scaling of gradients.
    ops: dict | None = None
    inplace: dict | None = None
    scale_rows: Callable[[torch.Tensor, torch.Tensor], None] = reference.scale_rows_
    full_ops: dict | None = None  # fused backends: the family ops of the full gradient (ops.py FULL_SCHEMA)
    # The losses between two vocabularies (kdkernels.cross_vocab): cross_vocab(call, student [N, Vs],
    # teacher [N, Vt], log_scales, classes) -> (loss, parts) as impl; None where the backend has none yet.
    cross_vocab: Callable | None = None
    # Fused backends: the cross-vocabulary op itself (ops.py CROSS_VOCAB_SCHEMA: the loss and the student's gradient
    # from one call, which the fused-linear path calls per chunk).
    cross_vocab_op: Callable | None = None


_REGISTRY: dict[str, Backend] = {}
# Preference of backend="auto" per device type (a backend missing from the registry or unavailable is skipped).
# CUDA: Triton before the CUDA extension until a GPU benchmark (python -m kdkernels bench) measures which is faster.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` here."""
    device = torch.device(device)
    return [name for name, b in _REGISTRY.items() if b.unavailable(device) is None]


def select_backend(name: object, like: torch.Tensor, entry: str = "impl") -> Backend:
    """The backend ``name`` ("auto" or a registered name) for tensors like ``like``, one that has the entry point
    ``entry`` (a field of Backend: "impl", or "cross_vocab" for the losses between two vocabularies); raises when it
    cannot run."""
    device = like.device
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ()) + ("reference",):
            b = _REGISTRY.get(candidate)
            if b is not None and b.unavailable(device) is None and getattr(b, entry) is not None:
                return b
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    reason = _REGISTRY[name].unavailable(device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run on {device} tensors: {reason}")
    if getattr(_REGISTRY[name], entry) is None:
        having = sorted(n for n, b in _REGISTRY.items() if getattr(b, entry) is not None)
        raise RuntimeError(f"backend={name!r} has no {entry} kernels yet; use 'auto' or one of {having}")
    return _REGISTRY[name]


def reduce(rows: torch.Tensor, call) -> torch.Tensor:
    """Per-row values [..., N] reduced as ``call`` (arguments.LossCall or kernel_call.KernelCall) asks: unchanged
    unless ``call.reduce``, else summed over rows and divided by ``call.denominator`` when it has one."""
    if not call.reduce:
        return rows
    total = rows.sum(-1)
    return total if call.denominator is None else total / call.denominator


def weigh(call, distill: torch.Tensor, ce: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, parts) of ``call`` (arguments.LossCall or kernel_call.KernelCall) from its two terms, per row [N] or
    already reduced: loss = distill_weight * distill + ce_weight * ce, and parts = [distill, ce] unweighted and not
    differentiable (ce 0 without the term); a term of weight 0 adds exactly 0, even if infinite (reference.weighted).
    The one place on the host that combines the two terms."""
    loss = reference.weighted(call.distill_weight, distill)
    if ce is None:
        ce = torch.zeros_like(distill)
    elif call.ce_weight != 0:
        loss = loss + reference.weighted(call.ce_weight, ce)
    return loss, torch.stack([distill.detach(), ce.detach()])


def combine(call, distill_rows: torch.Tensor, ce_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weigh`` of the two terms' rows [N], then both reduced as ``call`` asks."""
    loss, parts = weigh(call, distill_rows, ce_rows)
    return reduce(loss, call), reduce(parts, call)


def _reference_impl(call, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return combine(call, *reference.row_losses(call, student, teacher))


def _reference_full(
    call, student: torch.Tensor, teacher: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return combine(call, *reference.row_losses(call, student, teacher, temperature))


def reference_cross_vocab(
    call, student: torch.Tensor, teacher: torch.Tensor, log_scales, classes
) -> tuple[torch.Tensor, torch.Tensor]:
    return combine(call, *reference.cross_vocab_rows(call, student, teacher, log_scales, classes))


register(
    Backend(
        name="reference",
        impl=_reference_impl,
        unavailable=lambda device: None,
        full=_reference_full,
        cross_vocab=reference_cross_vocab,
    )
)
