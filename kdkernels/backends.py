"""Backend registry: which implementation computes a loss for tensors on a given device.

A backend is a function ``impl(problem: Problem) -> loss`` (reduced, or [N] for reduction="none"), registered with
a test of the devices it runs on. ``backend="auto"`` takes the first available backend in the
device's preference order; naming a backend that cannot run raises a RuntimeError that says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference


@dataclass(frozen=True)
class Problem:
    """One checked loss call on 2-D logits, as every backend receives it."""

    method: str
    hp: dict
    student: torch.Tensor  # [N, V]
    teacher: torch.Tensor  # [N, V]
    target: torch.Tensor | None  # [N]
    temperature: float
    t2_scale: bool
    ignore_index: int
    valid: torch.Tensor  # [N] bool: rows not ignored
    reduction: str
    denominator: torch.Tensor | None  # 0-d float32 for batchmean, else None


@dataclass
class Backend:
    name: str
    impl: Callable
    unavailable: Callable[[torch.device], str | None]  # None when it can run on that device, else the reason
    # Family ops of a fused backend, {"divergence": op, "decoupled": op} (schema in ops.py), and their in-place
    # siblings that overwrite the student logits with d loss / d student and return the loss; None for the reference.
    ops: dict | None = None
    inplace: dict | None = None


_REGISTRY: dict[str, Backend] = {}
# Preference of backend="auto" per device type (a backend missing from the registry or unavailable is skipped).
# CUDA: Triton before the CUDA extension until a GPU benchmark (python -m kdkernels bench) measures which is faster.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def register(name: str, impl: Callable, unavailable: Callable[[torch.device], str | None],
             ops: dict | None = None, inplace: dict | None = None) -> None:
    _REGISTRY[name] = Backend(name, impl, unavailable, ops, inplace)


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


def select(name: object, like: torch.Tensor) -> Callable:
    return select_backend(name, like).impl


def reduce(rows: torch.Tensor, reduction: str, denominator: torch.Tensor | None) -> torch.Tensor:
    """Per-row losses to the requested reduction (denominator from functional.denominator)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / denominator


def _reference_impl(p: Problem) -> torch.Tensor:
    rows = reference.row_losses(p.method, p.student, p.teacher, p.target, p.hp, p.temperature, p.t2_scale, p.valid)
    return reduce(rows, p.reduction, p.denominator)


register("reference", _reference_impl, lambda device: None)
