"""The functional API: ``distill_loss(method, ...)`` and one function per method of the table (``kd_loss`` ...,
written by scripts/method_api.py from it), plus ``cakd_feature_loss``.

Every call checks its arguments (arguments.py: errors name the argument), flattens the leading dimensions into
rows, picks a backend and reduces. No host synchronisation happens on accelerator tensors, but for a temperature
tensor, whose value is read once per call.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from . import backends
from .arguments import check_float_tensor, check_temperature_device, full_gradient, resolve, split_temperature
from .backends.reference import compute_dtype, cross_entropy_rows
from .methods import METHODS
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
    mask: Tensor | None = None,
    backend: str = "auto",
    **options,
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
        mask: optional bool or 0/1 tensor [...]: rows where it is 0 are left out, as ignored rows are (a token mask
            besides ``target`` and ``ignore_index``).
        backend: "auto", "reference", or a compiled backend as listed by ``kdkernels.available_backends()``.
        **options: the loss options (arguments.LossOptions, defaults there) and the method's hyperparameters, by
            name, e.g. ``beta=0.5`` for jsd:
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
        standardize: logit standardization (Sun et al., CVPR 2024): each row of both logits is z-scored over its
            unmasked classes, (x - mean) / (std + 1e-7) with Bessel's correction, before the temperature; the
            gradient flows through the z-score. The cross-entropy term keeps the raw logits. Dense teachers only.

    Returns:
        float32 loss (float64 for float64 inputs): 0-d, or leading shape for reduction="none"; a ``LossParts`` of
        such tensors with ``return_parts``.
    """
    temperature, temperature_tensor = split_temperature(options.pop("temperature", None))
    settings = resolve(method, temperature=temperature, **options)
    _check_logits(student_logits, teacher_logits)
    leading, v = student_logits.shape[:-1], student_logits.shape[-1]
    call = settings.bind(target, leading, v, student_logits.device, mask)
    chosen = backends.select_backend(backend, student_logits)
    student = _as_rows(student_logits, v)
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
        loss, parts = chosen.full(call, student, _as_rows(teacher_logits, v), temperature_tensor)
    else:
        loss, parts = chosen.impl(call, student, _as_rows(teacher_logits, v))
    return finish(call, loss, parts, leading)


def _as_rows(x: Tensor, v: int) -> Tensor:
    """x as [N, V] rows: x itself when it is 2-D (a view is an autograd node, a measurable share of a small call)."""
    return x if x.dim() == 2 else x.reshape(-1, v)


def _sparse_loss(impl, call, student: Tensor, teacher: SparseTeacher, leading) -> tuple[Tensor, Tensor]:
    """Every backend computes the method's loss of a sparse teacher's k + 1 bins, the student folded onto them as
    "bin logits"; the cross-entropy needs the whole student row, so it is added here."""
    v = student.shape[-1]
    valid = call.valid  # (derived from the target: made once here)
    sparse = check_sparse(teacher, call, leading, v, student.device, valid)
    dtype = compute_dtype(student, sparse.values)
    bins = FoldStudent.apply(student, sparse.indices, valid, call.temperature, dtype, sparse.tail)
    distill_call = replace(call, ce_weight=0.0, distill_weight=1.0, return_parts=False)
    distill, _ = impl(distill_call, bins, teacher_bins(sparse, call.temperature, dtype, v))
    ce = None
    if call.with_ce:
        kept = valid & ~torch.isneginf(student).all(-1)
        ce = backends.reduce(cross_entropy_rows(call, student.to(dtype), call.target, kept), call)
    return backends.weigh(call, distill, ce)


def finish(call, loss: Tensor, parts: Tensor, leading) -> Tensor | LossParts:
    """The result of a loss call: the loss in the leading shape for reduction="none", with its parts if asked."""
    if call.reduction == "none":
        loss, parts = loss.reshape(leading), parts.reshape(2, *leading)
    if not call.return_parts:
        return loss
    return LossParts(loss, parts[0], parts[1] if call.labels else None)


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


# --- per-method definitions: generated by scripts/method_api.py from METHODS; do not edit ---


def kd_loss(student_logits, teacher_logits, target=None, *, temperature=4.0, t2_scale=True, **options):
    """Hinton et al. 2015, forward KL (mdistiller KD): ``distill_loss("kd", ...)`` with this method's defaults
    (docs/losses.md, kd).
    """
    return distill_loss(
        "kd", student_logits, teacher_logits, target, temperature=temperature, t2_scale=t2_scale, **options
    )


def rkl_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, t2_scale=False, **options):
    """reverse KL: ``distill_loss("rkl", ...)`` with this method's defaults (docs/losses.md, rkl)."""
    return distill_loss(
        "rkl", student_logits, teacher_logits, target, temperature=temperature, t2_scale=t2_scale, **options
    )


def jsd_loss(student_logits, teacher_logits, target=None, *, beta=0.5, temperature=1.0, t2_scale=False, **options):
    """generalized JSD (TRL GKD, Liger): ``distill_loss("jsd", ...)`` with this method's defaults (docs/losses.md,
    jsd).
    """
    return distill_loss(
        "jsd", student_logits, teacher_logits, target, beta=beta, temperature=temperature, t2_scale=t2_scale, **options
    )


def skew_fkl_loss(student_logits, teacher_logits, target=None, *, skew=0.1, temperature=1.0, t2_scale=False, **options):
    """skew forward KL (DistiLLM): ``distill_loss("skew_fkl", ...)`` with this method's defaults (docs/losses.md,
    skew_fkl).
    """
    return distill_loss(
        "skew_fkl",
        student_logits,
        teacher_logits,
        target,
        skew=skew,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def skew_rkl_loss(student_logits, teacher_logits, target=None, *, skew=0.1, temperature=1.0, t2_scale=False, **options):
    """skew reverse KL (DistiLLM): ``distill_loss("skew_rkl", ...)`` with this method's defaults (docs/losses.md,
    skew_rkl).
    """
    return distill_loss(
        "skew_rkl",
        student_logits,
        teacher_logits,
        target,
        skew=skew,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def tvd_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, t2_scale=False, **options):
    """total variation distance: ``distill_loss("tvd", ...)`` with this method's defaults (docs/losses.md, tvd)."""
    return distill_loss(
        "tvd", student_logits, teacher_logits, target, temperature=temperature, t2_scale=t2_scale, **options
    )


def abkd_loss(
    student_logits, teacher_logits, target=None, *, alpha=0.5, beta=0.5, temperature=1.0, t2_scale=False, **options
):
    """ABKD, alpha-beta divergence (Wang et al., ICML 2025, arXiv 2505.04560): ``distill_loss("abkd", ...)`` with
    this method's defaults (docs/losses.md, abkd).
    """
    return distill_loss(
        "abkd",
        student_logits,
        teacher_logits,
        target,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def wsd_loss(student_logits, teacher_logits, target=None, *, lam=0.5, temperature=1.0, t2_scale=False, **options):
    """weighted sum of forward and reverse KL, symmetric KL at lam = 0.5 (ABKD authors' LLM code):
    ``distill_loss("wsd", ...)`` with this method's defaults (docs/losses.md, wsd).
    """
    return distill_loss(
        "wsd", student_logits, teacher_logits, target, lam=lam, temperature=temperature, t2_scale=t2_scale, **options
    )


def bdkd_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, t2_scale=False, **options):
    """entropy-weighted forward and reverse KL (ABKD authors' LLM code): ``distill_loss("bdkd", ...)`` with this
    method's defaults (docs/losses.md, bdkd).
    """
    return distill_loss(
        "bdkd", student_logits, teacher_logits, target, temperature=temperature, t2_scale=t2_scale, **options
    )


def akl_loss(student_logits, teacher_logits, target=None, *, mu=0.5, temperature=1.0, t2_scale=False, **options):
    """AKL, adaptive KL (Wu et al., COLING 2025; wutaiqiang/LLM_KD_AKL): ``distill_loss("akl", ...)`` with this
    method's defaults (docs/losses.md, akl).
    """
    return distill_loss(
        "akl", student_logits, teacher_logits, target, mu=mu, temperature=temperature, t2_scale=t2_scale, **options
    )


def dkd_loss(
    student_logits, teacher_logits, target=None, *, alpha=1.0, beta=8.0, temperature=4.0, t2_scale=True, **options
):
    """DKD, Zhao et al. 2022 (mdistiller DKD.py): ``distill_loss("dkd", ...)`` with this method's defaults
    (docs/losses.md, dkd).
    """
    return distill_loss(
        "dkd",
        student_logits,
        teacher_logits,
        target,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def gdkd_loss(
    student_logits,
    teacher_logits,
    target=None,
    *,
    k=5,
    w0=1.0,
    w1=1.0,
    w2=8.0,
    partitions=2,
    strategy="best",
    kl_type="forward",
    temperature=4.0,
    t2_scale=True,
    **options,
):
    """GDKD (arXiv 2512.04625; ZaberKo/GDKD): ``distill_loss("gdkd", ...)`` with this method's defaults
    (docs/losses.md, gdkd).
    """
    return distill_loss(
        "gdkd",
        student_logits,
        teacher_logits,
        target,
        k=k,
        w0=w0,
        w1=w1,
        w2=w2,
        partitions=partitions,
        strategy=strategy,
        kl_type=kl_type,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def cakd_loss(
    student_logits,
    teacher_logits,
    target=None,
    *,
    alpha=1.0,
    beta=8.0,
    bcd_weight=1.0,
    strong="target",
    k=5,
    tau=0.5,
    temperature=4.0,
    t2_scale=True,
    **options,
):
    """CAKD (arXiv 2410.14741): ``distill_loss("cakd", ...)`` with this method's defaults (docs/losses.md, cakd)."""
    return distill_loss(
        "cakd",
        student_logits,
        teacher_logits,
        target,
        alpha=alpha,
        beta=beta,
        bcd_weight=bcd_weight,
        strong=strong,
        k=k,
        tau=tau,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def aekt_loss(
    student_logits, teacher_logits, target=None, *, beta=8.0, max_weight=5.0, temperature=4.0, t2_scale=True, **options
):
    """AEKT (arXiv 2409.01679): ``distill_loss("aekt", ...)`` with this method's defaults (docs/losses.md, aekt)."""
    return distill_loss(
        "aekt",
        student_logits,
        teacher_logits,
        target,
        beta=beta,
        max_weight=max_weight,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


# --- end of the generated definitions ---


__all__ = ["distill_loss", *(spec.function for spec in METHODS.values()), "cakd_feature_loss", "LossParts"]
