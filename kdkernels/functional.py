"""The functional API: ``distill_loss(method, ...)`` and one function per method of the table (``kd_loss`` ...),
generated from it, plus ``cakd_feature_loss``.

Every call checks its arguments (arguments.py: errors name the argument), flattens the leading dimensions into
rows, picks a backend and reduces. No host synchronisation happens on accelerator tensors.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from . import backends
from .arguments import check_float_tensor, resolve
from .backends.reference import compute_dtype
from .methods import METHODS, get_method
from .sparse import FoldStudent, SparseTeacher, teacher_bins
from .sparse import check as check_sparse

Tensor = torch.Tensor


def _check_logits(student_logits: object, teacher_logits: object) -> None:
    """Checks both logits tensors; a SparseTeacher is checked later, against the method, by ``sparse.check``."""
    check_float_tensor("student_logits", student_logits)
    if isinstance(teacher_logits, SparseTeacher):
        return
    check_float_tensor("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits and teacher_logits must be on the same device, got {student_logits.device} "
                         f"and {teacher_logits.device}")
    if student_logits.shape[-1] < 1:
        raise ValueError("student_logits must have at least one class (V >= 1)")


def distill_loss(
    method: str,
    student_logits: Tensor,
    teacher_logits: Tensor | SparseTeacher,
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
    """Distillation loss ``method`` (a name of ``kdkernels.METHODS``) between student and teacher logits.

    Args:
        method: the method's name, e.g. "kd", "jsd", "dkd" (docs/losses.md has every definition).
        student_logits: [..., V] float tensor; the gradient flows to it.
        teacher_logits: [..., V] float tensor (any float dtype); treated as a constant. Or a ``SparseTeacher``
            (the teacher's top-k; divergence family): the loss is then taken over its k + 1 bins (sparse.py).
        target: optional integer class indices [...]; rows equal to ``ignore_index`` are ignored.
        temperature, t2_scale: default to the method's.
        reduction: "batchmean" (sum / number of rows not ignored), "sum" or "none" (per-row, leading shape).
        ignore_index: the target value of rows to ignore (an int).
        normalizer: a positive number, or a 0-d tensor on the logits' device, replacing the batchmean denominator
            (e.g. the tokens of a whole gradient-accumulation step). A tensor is used on the device as it is, never
            read on the host: its value is not checked (0 gives an infinite loss, NaN a NaN loss).
        backend: "auto", "reference", or a compiled backend as listed by ``kdkernels.available_backends()``.
        **hyperparameters: the method's hyperparameters, e.g. ``beta=0.5`` for jsd.

    Returns:
        float32 loss (float64 for float64 inputs): 0-d, or leading shape for reduction="none".
    """
    settings = resolve(method, hyperparameters, temperature, t2_scale, reduction, ignore_index, normalizer)
    _check_logits(student_logits, teacher_logits)
    leading, v = student_logits.shape[:-1], student_logits.shape[-1]
    call = settings.bind(target, leading, v, student_logits.device)
    impl = backends.select_backend(backend, student_logits).impl
    student = student_logits.reshape(-1, v)
    if isinstance(teacher_logits, SparseTeacher):
        # Every backend computes the loss of the k + 1 bins: the student folded onto them as "bin logits".
        sparse = check_sparse(teacher_logits, settings.method, settings.plan, leading, v, student.device, call.valid)
        dtype = compute_dtype(student, sparse.values)
        teacher = teacher_bins(sparse, call.temperature, dtype, v)
        student = FoldStudent.apply(student, sparse.indices, call.valid, call.temperature, dtype)
    else:
        teacher = teacher_logits.reshape(-1, v)
    loss = impl(call, student, teacher)
    return loss.reshape(leading) if reduction == "none" else loss


def loss_function(method: str, entry: Callable = distill_loss, options: dict | None = None) -> Callable:
    """The public function of one method: a named front of ``entry`` (default distill_loss) whose signature shows
    the method's defaults; ``options`` are the entry's own keyword arguments after the common ones (default:
    backend)."""
    spec = get_method(method)
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
    loss.__name__ = loss.__qualname__ = spec.function
    loss.__module__ = entry.__module__
    loss.__doc__ = (f"{spec.source}: ``{entry.__module__}.{entry.__name__}('{method}', ...)`` with this method's "
                    f"defaults in the signature (docs/losses.md, {method}).")
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
            raise ValueError(f"{name} must be a 4-d tensor [B, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if strong not in ("topk", "threshold"):
        raise ValueError(f"strong must be 'topk' or 'threshold' for feature maps, got {strong!r}")
    return distill_loss(
        "cakd", student_feat.flatten(2), teacher_feat.flatten(2), None, strong=strong, k=k, tau=tau, alpha=alpha,
        beta=beta, bcd_weight=bcd_weight, temperature=temperature, t2_scale=t2_scale, reduction=reduction,
        normalizer=normalizer, backend=backend,
    )


__all__ = ["distill_loss", *LOSS_FUNCTIONS, "cakd_feature_loss"]
