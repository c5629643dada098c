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
whose factor is exactly 1 left untouched). ``backend="auto"`` takes the first available backend in the device's
preference order; naming a backend that cannot run raises a RuntimeError that says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference


@dataclass
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


def select_backend(name: object, like: torch.Tensor) -> Backend:
    """The backend ``name`` ("auto" or a registered name) for tensors like ``like``; raises when it cannot run."""
    device = like.device
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ()) + ("reference",):
            b = _REGISTRY.get(candidate)
            if b is not None and b.unavailable(device) is None:
                return b
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    reason = _REGISTRY[name].unavailable(device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run on {device} tensors: {reason}")
    return _REGISTRY[name]


def reduce(rows: torch.Tensor, reduction: str, denominator: torch.Tensor | None) -> torch.Tensor:
    """Per-row losses [..., N] to the requested reduction (the denominator of arguments.LossCall)."""
    if reduction == "none":
        return rows
    total = rows.sum(-1)
    return total if reduction == "sum" else total / denominator


def combine(
    distill_rows: torch.Tensor,
    ce_rows: torch.Tensor | None,
    reduction: str,
    denominator: torch.Tensor | None,
    ce_weight: float,
    distill_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, parts) from the two terms' row losses [N] (ce_rows None without the term, which then counts 0); a
    term of weight 0 adds exactly 0, whatever its rows hold (reference.weighted)."""
    loss = distill_rows if distill_weight == 1 else reference.weighted(distill_weight, distill_rows)
    if ce_rows is None:
        ce_rows = torch.zeros_like(distill_rows)
    elif ce_weight != 0:
        loss = loss + ce_weight * ce_rows
    parts = torch.stack([distill_rows.detach(), ce_rows.detach()])
    return reduce(loss, reduction, denominator), reduce(parts, reduction, denominator)


def _reference_impl(call, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return combine(
        *reference.row_losses(call, student, teacher),
        call.reduction,
        call.denominator,
        call.ce_weight,
        call.distill_weight,
    )


def _reference_full(
    call, student: torch.Tensor, teacher: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return combine(
        *reference.row_losses(call, student, teacher, temperature),
        call.reduction,
        call.denominator,
        call.ce_weight,
        call.distill_weight,
    )


register(Backend("reference", _reference_impl, lambda device: None, full=_reference_full))
