"""The functional API: ``distill_loss(method, ...)`` and one function per method of the table (``kd_loss`` ...),
generated from it, plus ``cakd_feature_loss``.

Every call checks its arguments (arguments.py: errors name the argument), flattens the leading dimensions into
rows, picks a backend and reduces. No host synchronisation happens on accelerator tensors, but for a temperature
tensor, whose value is read once per call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch

from . import backends
from .arguments import check_float_tensor, check_temperature_device, full_gradient, resolve, split_temperature
from .backends.reference import compute_dtype, cross_entropy_rows
from .methods import METHODS, get_method
from .sparse import FoldStudent, SparseTeacher, teacher_bins
from .sparse import check as check_sparse

Tensor = torch.Tensor


class LossParts(NamedTuple):
    """What a loss call with ``return_parts=True`` returns: the loss (differentiable) and its two terms, unweighted and
    reduced like it (not differentiable, for logging): loss = distill_weight * distill + ce_weight * ce. ``ce`` is
    None without a target."""

    loss: Tensor
    distill: Tensor
    ce: Tensor | None


def _check_logits(student_logits: object, teacher_logits: object) -> None:
    """Checks both logits tensors; a SparseTeacher is checked later, against the method, by ``sparse.check``."""
    check_float_tensor("student_logits", student_logits)
    if isinstance(teacher_logits, SparseTeacher):
        return
    check_float_tensor("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got {student_logits.device} "
            f"and {teacher_logits.device}"
        )
    if student_logits.shape[-1] < 1:
        raise ValueError("student_logits must have at least one class (V >= 1)")


def distill_loss(
    method: str,
    student_logits: Tensor,
    teacher_logits: Tensor | SparseTeacher,
    target: Tensor | None = None,
    *,
    temperature: float | None = None,
    t2_scale: bool | None = None,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    normalizer=None,
    ce_weight: float = 0.0,
    distill_weight: float = 1.0,
    return_parts: bool = False,
    mask: Tensor | None = None,
    standardize: bool = False,
    backend: str = "auto",
    **hyperparameters,
) -> Tensor | LossParts:
    """Distillation loss ``method`` (a name of ``kdkernels.METHODS``) between student and teacher logits, plus the
    hard-label term: ``distill_weight * (the method's loss) + ce_weight * CE``, computed in the same pass.

    Args:
        method: the method's name, e.g. "kd", "jsd", "dkd" (docs/losses.md has every definition).
        student_logits: [..., V] float tensor; the gradient flows to it.
        teacher_logits: [..., V] float tensor (any float dtype); a constant unless it requires grad (online or
            mutual distillation: the gradient then flows to it too, from the same kernel). Or a ``SparseTeacher``
            (the teacher's top-k; divergence family): the loss is then taken over its k + 1 bins (sparse.py).
        target: optional integer class indices [...]; rows equal to ``ignore_index`` are ignored.
        temperature, t2_scale: default to the method's. temperature may be a 0-d tensor that requires grad (a
            learnable temperature, CTKD): d loss / d T then comes from the same kernel (its value is read on the
            host once per call).
        reduction: "batchmean" (sum / number of rows not ignored), "sum" or "none" (per-row, leading shape).
        ignore_index: the target value of rows to ignore (an int).
        normalizer: a positive number, or a 0-d tensor on the logits' device, replacing the batchmean denominator
            (e.g. the tokens of a whole gradient-accumulation step). A tensor is used on the device as it is, never
            read on the host: its value is not checked (0 gives an infinite loss, NaN a NaN loss).
        ce_weight: weight of CE, the student's cross-entropy against ``target`` at temperature 1 (never T^2-scaled),
            over the same rows, reduction and normalizer; > 0 requires a target.
        distill_weight: weight of the method's loss.
        return_parts: return a ``LossParts`` (loss, distill, ce) for logging, at no extra pass.
        mask: optional bool or 0/1 tensor [...]: rows where it is 0 are left out, as ignored rows are (a token mask
            besides ``target`` and ``ignore_index``).
        standardize: logit standardization (Sun et al., CVPR 2024): each row of both logits is z-scored over its
            unmasked classes, (x - mean) / (std + 1e-7) with Bessel's correction, before the temperature; the
            gradient flows through the z-score. The cross-entropy term keeps the raw logits. Dense teachers only.
        backend: "auto", "reference", or a compiled backend as listed by ``kdkernels.available_backends()``.
        **hyperparameters: the method's hyperparameters, e.g. ``beta=0.5`` for jsd.

    Returns:
        float32 loss (float64 for float64 inputs): 0-d, or leading shape for reduction="none"; a ``LossParts`` of
        such tensors with ``return_parts``.
    """
    temperature, temperature_tensor = split_temperature(temperature)
    settings = resolve(
        method,
        hyperparameters,
        temperature,
        t2_scale,
        reduction,
        ignore_index,
        normalizer,
        ce_weight,
        distill_weight,
        return_parts,
        standardize,
    )
    _check_logits(student_logits, teacher_logits)
    leading, v = student_logits.shape[:-1], student_logits.shape[-1]
    call = settings.bind(target, leading, v, student_logits.device, mask)
    chosen = backends.select_backend(backend, student_logits)
    student = student_logits.reshape(-1, v)
    full = full_gradient(teacher_logits, temperature_tensor)
    if isinstance(teacher_logits, SparseTeacher):
        if full:
            raise ValueError(
                "a SparseTeacher is a constant and its temperature too: pass a number as temperature "
                "(or dense teacher_logits for a learnable temperature)"
            )
        loss, parts = _sparse_loss(chosen.impl, call, student, teacher_logits, leading)
    elif full:
        check_temperature_device(temperature_tensor, student_logits.device)
        loss, parts = chosen.full(call, student, teacher_logits.reshape(-1, v), temperature_tensor)
    else:
        loss, parts = chosen.impl(call, student, teacher_logits.reshape(-1, v))
    return finish(call, loss, parts, leading)


def _sparse_loss(impl, call, student: Tensor, teacher: SparseTeacher, leading) -> tuple[Tensor, Tensor]:
    """Every backend computes the method's loss of a sparse teacher's k + 1 bins, the student folded onto them as
    "bin logits"; the cross-entropy needs the whole student row, so it is added here."""
    v = student.shape[-1]
    sparse = check_sparse(teacher, call, leading, v, student.device, call.valid)
    dtype = compute_dtype(student, sparse.values)
    bins = FoldStudent.apply(student, sparse.indices, call.valid, call.temperature, dtype, sparse.tail)
    distill_call = replace(call, ce_weight=0.0, distill_weight=1.0, return_parts=False)
    distill, _ = impl(distill_call, bins, teacher_bins(sparse, call.temperature, dtype, v))
    ce = None
    if call.with_ce:
        kept = call.valid & ~torch.isneginf(student).all(-1)
        ce = backends.reduce(cross_entropy_rows(student.to(dtype), call.target, kept), call)
    return backends.weigh(call, distill, ce)


def finish(call, loss: Tensor, parts: Tensor, leading) -> Tensor | LossParts:
    """The result of a loss call: the loss in the leading shape for reduction="none", with its parts if asked."""
    if call.reduction == "none":
        loss, parts = loss.reshape(leading), parts.reshape(2, *leading)
    if not call.return_parts:
        return loss
    return LossParts(loss, parts[0], parts[1] if call.labels else None)


def loss_function(method: str, entry: Callable = distill_loss, options: dict | None = None) -> Callable:
    """The public function of one method: a named front of ``entry`` (default distill_loss) whose signature shows
    the method's defaults; ``options`` are the entry's own keyword arguments after the common ones (default:
    backend)."""
    spec = get_method(method)
    options = {"backend": "auto"} if options is None else options

    def loss(student_logits, teacher_logits, target=None, **kwargs):
        return entry(method, student_logits, teacher_logits, target, **kwargs)

    P = inspect.Parameter
    keyword = {
        **spec.hyperparameters,
        "temperature": spec.temperature,
        "t2_scale": spec.t2_scale,
        "reduction": "batchmean",
        "ignore_index": -100,
        "normalizer": None,
        "ce_weight": 0.0,
        "distill_weight": 1.0,
        "return_parts": False,
        "mask": None,
        "standardize": False,
        **options,
    }
    loss.__signature__ = inspect.Signature(
        [
            P("student_logits", P.POSITIONAL_OR_KEYWORD),
            P("teacher_logits", P.POSITIONAL_OR_KEYWORD),
            P("target", P.POSITIONAL_OR_KEYWORD, default=None),
        ]
        + [P(name, P.KEYWORD_ONLY, default=value) for name, value in keyword.items()]
    )
    loss.__name__ = loss.__qualname__ = spec.function
    loss.__module__ = entry.__module__
    loss.__doc__ = (
        f"{spec.source}: ``{entry.__module__}.{entry.__name__}('{method}', ...)`` with this method's "
        f"defaults in the signature (docs/losses.md, {method})."
    )
    return loss


LOSS_FUNCTIONS = {spec.function: loss_function(name) for name, spec in METHODS.items()}
globals().update(LOSS_FUNCTIONS)


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
            raise ValueError(
                f"{name} must be a 4-d tensor [B, C, H, W], got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
    if strong not in ("topk", "threshold"):
        raise ValueError(f"strong must be 'topk' or 'threshold' for feature maps, got {strong!r}")
    return distill_loss(
        "cakd",
        student_feat.flatten(2),
        teacher_feat.flatten(2),
        None,
        strong=strong,
        k=k,
        tau=tau,
        alpha=alpha,
        beta=beta,
        bcd_weight=bcd_weight,
        temperature=temperature,
        t2_scale=t2_scale,
        reduction=reduction,
        normalizer=normalizer,
        backend=backend,
    )


__all__ = ["distill_loss", *LOSS_FUNCTIONS, "cakd_feature_loss", "LossParts"]
