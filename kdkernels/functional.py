"""The functional API: one function per loss of LOSSES.md, plus ``distill_loss(method, ...)``.

Every call goes through ``distill_loss``: it checks the arguments (clear errors naming the argument), flattens the
leading dimensions into rows, picks a backend and reduces. No host synchronisation happens on CUDA tensors.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch

from . import backends
from .methods import REDUCTIONS, get_method
from .reference import compute_dtype
from .sparse import FoldStudent, SparseTeacher, teacher_bins
from .sparse import check as check_sparse

Tensor = torch.Tensor


def _check_logits(student_logits: object, teacher_logits: object) -> None:
    """Checks both logits tensors; a SparseTeacher is checked later, against the method, by ``sparse.check``."""
    named = [("student_logits", student_logits)]
    if isinstance(teacher_logits, SparseTeacher):
        teacher_logits = student_logits  # only the student is checked here
    else:
        named.append(("teacher_logits", teacher_logits))
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dimension [..., V], got a 0-d tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got {student_logits.device} "
            f"and {teacher_logits.device}"
        )
    if student_logits.shape[-1] < 1:
        raise ValueError("student_logits must have at least one class (V >= 1)")


def _check_target(target: object, student_logits: Tensor, ignore_index: int, indexed: bool, v) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must have an integer dtype, got {target.dtype}")
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"target must have the logits' leading shape {tuple(student_logits.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.device != student_logits.device:
        raise ValueError(f"target must be on the logits' device {student_logits.device}, got {target.device}")
    if not indexed or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= v))
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            first = target[bad][0].item()
            raise IndexError(
                f"target must hold class indices in [0, {v}) or ignore_index={ignore_index}, found {first}"
            )
    else:
        # No host sync on accelerators: the check runs on the device and fails the stream asynchronously.
        # (v is an int, or a 0-d device tensor for a sharded vocabulary: not formatted, that would sync.)
        bound = v if isinstance(v, int) else "V"
        torch._assert_async(~bad.any(), f"target must hold class indices in [0, {bound}) or ignore_index")


def check_options(temperature, reduction, normalizer) -> None:
    """Checks of the options every method shares (also used by the modules at construction)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise TypeError(f"temperature must be a finite number, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction != "batchmean":
            raise ValueError(f"normalizer replaces the batchmean denominator; it needs reduction='batchmean', "
                             f"got reduction={reduction!r}")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.dim() != 0:
                raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or normalizer <= 0:
            raise ValueError(f"normalizer must be a positive number or a 0-d tensor, got {normalizer!r}")


def denominator(valid: Tensor, reduction: str, normalizer) -> Tensor | None:
    """The batchmean denominator as a device tensor (no sync), or None for the other reductions."""
    if reduction != "batchmean":
        return None
    if normalizer is not None:
        return torch.as_tensor(normalizer, dtype=torch.float32, device=valid.device)
    return valid.sum().clamp(min=1).to(torch.float32)


def check_arguments(method, student_logits, teacher_logits, temperature, t2_scale, reduction, normalizer,
                    hyperparameters):
    """Checks of a call that need no vocabulary size; returns (spec, hp, temperature, t2_scale) with defaults."""
    spec = get_method(method)
    hp = spec.resolve(hyperparameters)
    _check_logits(student_logits, teacher_logits)
    temperature = spec.temperature if temperature is None else temperature
    t2_scale = spec.t2_scale if t2_scale is None else bool(t2_scale)
    check_options(temperature, reduction, normalizer)
    return spec, hp, temperature, t2_scale


def check_classes(spec, hp: dict, student_logits: Tensor, target, ignore_index: int, v) -> None:
    """Checks against the vocabulary size V = ``v``: k < V, and the target (present if needed, indices in [0, V)).

    ``v`` is an int, or a 0-d tensor on the logits' accelerator (a sharded vocabulary, kdkernels.parallel), where
    the checks run on the device without a host sync.
    """
    if spec.uses_topk(hp):
        if isinstance(v, int):
            if hp["k"] >= v:
                raise ValueError(f"k must be smaller than the number of classes V={v}, got k={hp['k']}")
        else:
            torch._assert_async(v > hp["k"], f"k must be smaller than the number of classes V, got k={hp['k']}")
    indexed = spec.needs_target(hp)
    if target is None:
        if indexed:
            raise ValueError(f"{spec.name} needs target (class indices of shape {tuple(student_logits.shape[:-1])})")
    else:
        _check_target(target, student_logits, ignore_index, indexed, v)


def distill_loss(
    method: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    temperature: Optional[float] = None,
    t2_scale: Optional[bool] = None,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    normalizer=None,
    backend: str = "auto",
    **hyperparameters,
) -> Tensor:
    """Distillation loss ``method`` (a name from ``kdkernels.METHODS``) between student and teacher logits.

    Args:
        method: "kd", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "abkd", "dkd", "gdkd", "cakd" or "aekt".
        student_logits: [..., V] float tensor; the gradient flows to it.
        teacher_logits: [..., V] float tensor (any float dtype); treated as a constant. Or a ``SparseTeacher``
            (the teacher's top-k; divergence family): the loss is then taken over its k + 1 bins (sparse.py).
        target: optional integer class indices [...]; rows equal to ``ignore_index`` are ignored.
        temperature, t2_scale: default to the method's (LOSSES.md).
        reduction: "batchmean" (sum / number of rows not ignored), "sum" or "none" (per-row, leading shape).
        normalizer: a number or 0-d tensor replacing the batchmean denominator.
        backend: "auto", "reference", or a compiled backend as listed by ``kdkernels.available_backends()``.
        **hyperparameters: the method's hyperparameters (LOSSES.md), e.g. ``beta=0.5`` for jsd.

    Returns:
        float32 loss (float64 for float64 inputs): 0-d, or leading shape for reduction="none".
    """
    spec, hp, temperature, t2_scale = check_arguments(
        method, student_logits, teacher_logits, temperature, t2_scale, reduction, normalizer, hyperparameters)
    v = student_logits.shape[-1]
    check_classes(spec, hp, student_logits, target, ignore_index, v)
    impl = backends.select(backend, student_logits)
    leading = student_logits.shape[:-1]
    student = student_logits.reshape(-1, v)
    target = None if target is None else target.reshape(-1)
    valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device) if target is None \
        else target != ignore_index
    if isinstance(teacher_logits, SparseTeacher):
        # Every backend computes the loss of the k + 1 bins: the student folded onto them as "bin logits".
        sparse = check_sparse(teacher_logits, method, hp, leading, v, student.device, valid)
        dtype = compute_dtype(student, sparse.values)
        teacher = teacher_bins(sparse, float(temperature), dtype)
        student = FoldStudent.apply(student, sparse.indices, valid, float(temperature), dtype)
    else:
        teacher = teacher_logits.reshape(-1, v)
    loss = impl(backends.Problem(method, hp, student, teacher, target, float(temperature), t2_scale, ignore_index,
                                 valid, reduction, denominator(valid, reduction, normalizer)))
    return loss.reshape(leading) if reduction == "none" else loss


def _loss_function(method: str, entry=None, options=None):
    """The public function of one method: a named front of ``entry`` (default distill_loss) whose signature shows
    its defaults; ``options`` are the entry's own keyword arguments after the common ones (default: backend)."""
    spec = get_method(method)
    entry = distill_loss if entry is None else entry
    options = {"backend": "auto"} if options is None else options

    def loss(student_logits, teacher_logits, target=None, **kwargs):
        return entry(method, student_logits, teacher_logits, target, **kwargs)

    P = inspect.Parameter
    keyword = {**spec.hyperparameters, "temperature": spec.temperature, "t2_scale": spec.t2_scale,
               "reduction": "batchmean", "ignore_index": -100, "normalizer": None, **options}
    loss.__signature__ = inspect.Signature(
        [P("student_logits", P.POSITIONAL_OR_KEYWORD), P("teacher_logits", P.POSITIONAL_OR_KEYWORD),
         P("target", P.POSITIONAL_OR_KEYWORD, default=None)]
        + [P(name, P.KEYWORD_ONLY, default=value) for name, value in keyword.items()]
    )
    loss.__name__ = loss.__qualname__ = f"{method}_loss"
    loss.__doc__ = f"{spec.source} (LOSSES.md, {method}). Arguments as in ``{entry.__module__}.distill_loss``."
    return loss


kd_loss = _loss_function("kd")
rkl_loss = _loss_function("rkl")
jsd_loss = _loss_function("jsd")
skew_fkl_loss = _loss_function("skew_fkl")
skew_rkl_loss = _loss_function("skew_rkl")
tvd_loss = _loss_function("tvd")
abkd_loss = _loss_function("abkd")
dkd_loss = _loss_function("dkd")
gdkd_loss = _loss_function("gdkd")
cakd_loss = _loss_function("cakd")
aekt_loss = _loss_function("aekt")


def cakd_feature_loss(
    student_feat: Tensor,
    teacher_feat: Tensor,
    *,
    strong: str = "topk",
    k: int = 5,
    tau: float = 0.5,
    alpha: float = 1.0,
    beta: float = 8.0,
    bcd_weight: float = 1.0,
    temperature: float = 4.0,
    t2_scale: bool = True,
    reduction: str = "batchmean",
    normalizer=None,
    backend: str = "auto",
) -> Tensor:
    """CAKD on feature maps: each channel's spatial map [H*W] is one row (softmax over positions).

    Shape: student_feat and teacher_feat [B, C, H, W]; the loss averages over the B*C rows with "batchmean" and
    is [B, C] with reduction="none". ``strong`` is "topk" or "threshold" (there is no label per position).
    """
    for name, x in (("student_feat", student_feat), ("teacher_feat", teacher_feat)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if strong not in ("topk", "threshold"):
        raise ValueError(f"strong must be 'topk' or 'threshold' for feature maps, got {strong!r}")
    return distill_loss(
        "cakd", student_feat.flatten(2), teacher_feat.flatten(2), None, strong=strong, k=k, tau=tau, alpha=alpha,
        beta=beta, bcd_weight=bcd_weight, temperature=temperature, t2_scale=t2_scale, reduction=reduction,
        normalizer=normalizer, backend=backend,
    )
