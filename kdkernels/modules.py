"""nn.Module drop-ins: hyperparameters in ``__init__``, ``forward(student_logits, teacher_logits, target=None)``.

``DistillLoss(method, ...)`` takes any method; one subclass per method of the table (``KDLoss`` ...) is generated
from it; ``LinearDistillLoss`` is the fused-linear loss; ``SerialHead`` is AEKT's serial head.
"""

from __future__ import annotations

import torch
from torch import nn

from .arguments import OPTIONS, LossOptions, resolve
from .cross_vocab import cross_vocab_loss, resolve_cross_vocab
from .functional import distill_loss
from .linear import linear_distill_loss
from .methods import METHODS


class DistillLoss(nn.Module):
    """Distillation loss ``method`` as a module, e.g. ``DistillLoss("jsd", beta=0.1)``.

    Args:
        method: a name of ``kdkernels.METHODS``.
        backend: as in ``kdkernels.distill_loss``.
        **options: the loss options but normalizer (arguments.LossOptions: temperature and t2_scale default to the
            method's; ce_weight > 0 adds the student's cross-entropy against the target, fused) and the method's
            hyperparameters; the others keep their defaults.

    ``forward(student_logits, teacher_logits, target=None, *, normalizer=None, mask=None)``.
    """

    def __init__(self, method: str, *, backend: str = "auto", **options):
        super().__init__()
        if "normalizer" in options:
            raise TypeError("normalizer is an argument of forward (it changes with the batch), not of the module")
        settings = resolve(method, **options)
        self.method = settings.method
        self.hyperparameters = settings.hp
        self.backend = backend
        # (the options as resolved: the method's temperature and t2_scale filled in)
        self._options = {name: getattr(settings, name) for name in OPTIONS if name != "normalizer"}

    def options(self) -> dict:
        """The keyword arguments of this module's loss calls."""
        return {**self._options, "backend": self.backend, **self.hyperparameters}

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target=None, *, normalizer=None, mask=None
    ):
        return distill_loss(
            self.method, student_logits, teacher_logits, target, normalizer=normalizer, mask=mask, **self.options()
        )

    def extra_repr(self) -> str:
        defaults = LossOptions()
        changed = {k: v for k, v in self._options.items() if v != getattr(defaults, k)}
        options = "".join(f", {k}={v!r}" for k, v in {**self.hyperparameters, **changed}.items())
        return f"{self.method!r}{options}, backend={self.backend!r}"


class LinearDistillLoss(DistillLoss):
    """Fused-linear distillation loss ``method`` as a module, e.g. ``LinearDistillLoss("kd", softcap=30.0)``.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, target=None, *, student_bias=None,
    teacher_bias=None, normalizer=None, mask=None)`` is ``kdkernels.linear_distill_loss`` with this module's
    options; besides DistillLoss's, it takes chunk_size, memory_budget, softcap, teacher_softcap,
    student_logit_scale and teacher_logit_scale.
    """

    def __init__(
        self,
        method: str,
        *,
        chunk_size=None,
        memory_budget=None,
        softcap=None,
        teacher_softcap=None,
        student_logit_scale=1.0,
        teacher_logit_scale=1.0,
        **kwargs,
    ):
        super().__init__(method, **kwargs)
        self.linear_options = {
            "chunk_size": chunk_size,
            "memory_budget": memory_budget,
            "softcap": softcap,
            "teacher_softcap": teacher_softcap,
            "student_logit_scale": student_logit_scale,
            "teacher_logit_scale": teacher_logit_scale,
        }

    def forward(
        self,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        target=None,
        *,
        student_bias=None,
        teacher_bias=None,
        normalizer=None,
        mask=None,
    ):
        return linear_distill_loss(
            self.method,
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            target,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            normalizer=normalizer,
            mask=mask,
            **self.linear_options,
            **self.options(),
        )


class CrossVocabLoss(nn.Module):
    """A loss between two vocabularies as a module, e.g. ``CrossVocabLoss("hybrid", vocab_map=kdkernels.vocab_map(
    student_tokenizer, teacher_tokenizer), beta=0.5)``.

    Args: method ("uld" or "hybrid"), vocab_map, temperature, teacher_temperature, reduction, ignore_index,
    ce_weight, distill_weight, return_parts, backend and the method's hyperparameters, as in
    ``kdkernels.cross_vocab_loss``.

    ``forward(student_logits, teacher_logits, target=None, *, student_log_scale=None, teacher_log_scale=None,
    normalizer=None, mask=None)``.
    """

    def __init__(
        self,
        method: str,
        *,
        vocab_map=None,
        temperature=None,
        teacher_temperature=None,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        distill_weight: float = 1.0,
        return_parts: bool = False,
        backend: str = "auto",
        **hyperparameters,
    ):
        super().__init__()
        settings = resolve_cross_vocab(
            method,
            teacher_temperature=teacher_temperature,
            temperature=temperature,
            reduction=reduction,
            ignore_index=ignore_index,
            ce_weight=ce_weight,
            distill_weight=distill_weight,
            return_parts=return_parts,
            **hyperparameters,
        )
        self.method = settings.method
        self.vocab_map = vocab_map
        self._options = dict(
            temperature=settings.temperature,
            teacher_temperature=settings.plan.params.teacher_temperature,
            reduction=reduction,
            ignore_index=settings.ignore_index,
            ce_weight=settings.ce_weight,
            distill_weight=settings.distill_weight,
            return_parts=settings.return_parts,
            backend=backend,
            **settings.hp,
        )

    def options(self) -> dict:
        """The keyword arguments of this module's loss calls (vocab_map aside)."""
        return dict(self._options)

    def forward(
        self,
        student_logits,
        teacher_logits,
        target=None,
        *,
        student_log_scale=None,
        teacher_log_scale=None,
        normalizer=None,
        mask=None,
    ):
        return cross_vocab_loss(
            self.method,
            student_logits,
            teacher_logits,
            target,
            vocab_map=self.vocab_map,
            student_log_scale=student_log_scale,
            teacher_log_scale=teacher_log_scale,
            normalizer=normalizer,
            mask=mask,
            **self._options,
        )

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        shared = f", vocab_map={self.vocab_map.summary()!r}" if hasattr(self.vocab_map, "summary") else ""
        return f"{self.method!r}{shared}, {options}"


# --- per-method definitions: generated by scripts/method_api.py from METHODS; do not edit ---


class KDLoss(DistillLoss):
    """Hinton et al. 2015, forward KL (mdistiller KD) as a module: ``DistillLoss("kd", ...)`` with this method's
    defaults (docs/losses.md, kd).
    """

    def __init__(self, *, temperature=4.0, t2_scale=True, **options):
        super().__init__("kd", temperature=temperature, t2_scale=t2_scale, **options)


class RKLLoss(DistillLoss):
    """reverse KL as a module: ``DistillLoss("rkl", ...)`` with this method's defaults (docs/losses.md, rkl)."""

    def __init__(self, *, temperature=1.0, t2_scale=False, **options):
        super().__init__("rkl", temperature=temperature, t2_scale=t2_scale, **options)


class JSDLoss(DistillLoss):
    """generalized JSD (TRL GKD, Liger) as a module: ``DistillLoss("jsd", ...)`` with this method's defaults
    (docs/losses.md, jsd).
    """

    def __init__(self, *, beta=0.5, temperature=1.0, t2_scale=False, **options):
        super().__init__("jsd", beta=beta, temperature=temperature, t2_scale=t2_scale, **options)


class SkewFKLLoss(DistillLoss):
    """skew forward KL (DistiLLM) as a module: ``DistillLoss("skew_fkl", ...)`` with this method's defaults
    (docs/losses.md, skew_fkl).
    """

    def __init__(self, *, skew=0.1, temperature=1.0, t2_scale=False, **options):
        super().__init__("skew_fkl", skew=skew, temperature=temperature, t2_scale=t2_scale, **options)


class SkewRKLLoss(DistillLoss):
    """skew reverse KL (DistiLLM) as a module: ``DistillLoss("skew_rkl", ...)`` with this method's defaults
    (docs/losses.md, skew_rkl).
    """

    def __init__(self, *, skew=0.1, temperature=1.0, t2_scale=False, **options):
        super().__init__("skew_rkl", skew=skew, temperature=temperature, t2_scale=t2_scale, **options)


class TVDLoss(DistillLoss):
    """total variation distance as a module: ``DistillLoss("tvd", ...)`` with this method's defaults (docs/losses.md,
    tvd).
    """

    def __init__(self, *, temperature=1.0, t2_scale=False, **options):
        super().__init__("tvd", temperature=temperature, t2_scale=t2_scale, **options)


class ABKDLoss(DistillLoss):
    """ABKD, alpha-beta divergence (Wang et al., ICML 2025, arXiv 2505.04560) as a module: ``DistillLoss("abkd",
    ...)`` with this method's defaults (docs/losses.md, abkd).
    """

    def __init__(self, *, alpha=0.5, beta=0.5, temperature=1.0, t2_scale=False, **options):
        super().__init__("abkd", alpha=alpha, beta=beta, temperature=temperature, t2_scale=t2_scale, **options)


class WSDLoss(DistillLoss):
    """weighted sum of forward and reverse KL, symmetric KL at lam = 0.5 (ABKD authors' LLM code) as a module:
    ``DistillLoss("wsd", ...)`` with this method's defaults (docs/losses.md, wsd).
    """

    def __init__(self, *, lam=0.5, temperature=1.0, t2_scale=False, **options):
        super().__init__("wsd", lam=lam, temperature=temperature, t2_scale=t2_scale, **options)


class BDKDLoss(DistillLoss):
    """entropy-weighted forward and reverse KL (ABKD authors' LLM code) as a module: ``DistillLoss("bdkd", ...)``
    with this method's defaults (docs/losses.md, bdkd).
    """

    def __init__(self, *, temperature=1.0, t2_scale=False, **options):
        super().__init__("bdkd", temperature=temperature, t2_scale=t2_scale, **options)


class AKLLoss(DistillLoss):
    """AKL, adaptive KL (Wu et al., COLING 2025; wutaiqiang/LLM_KD_AKL) as a module: ``DistillLoss("akl", ...)`` with
    this method's defaults (docs/losses.md, akl).
    """

    def __init__(self, *, mu=0.5, temperature=1.0, t2_scale=False, **options):
        super().__init__("akl", mu=mu, temperature=temperature, t2_scale=t2_scale, **options)


class DKDLoss(DistillLoss):
    """DKD, Zhao et al. 2022 (mdistiller DKD.py) as a module: ``DistillLoss("dkd", ...)`` with this method's defaults
    (docs/losses.md, dkd).
    """

    def __init__(self, *, alpha=1.0, beta=8.0, temperature=4.0, t2_scale=True, **options):
        super().__init__("dkd", alpha=alpha, beta=beta, temperature=temperature, t2_scale=t2_scale, **options)


class GDKDLoss(DistillLoss):
    """GDKD (arXiv 2512.04625; ZaberKo/GDKD) as a module: ``DistillLoss("gdkd", ...)`` with this method's defaults
    (docs/losses.md, gdkd).
    """

    def __init__(
        self,
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
        super().__init__(
            "gdkd",
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


class CAKDLoss(DistillLoss):
    """CAKD (arXiv 2410.14741) as a module: ``DistillLoss("cakd", ...)`` with this method's defaults (docs/losses.md,
    cakd).
    """

    def __init__(
        self,
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
        super().__init__(
            "cakd",
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


class AEKTLoss(DistillLoss):
    """AEKT (arXiv 2409.01679) as a module: ``DistillLoss("aekt", ...)`` with this method's defaults (docs/losses.md,
    aekt).
    """

    def __init__(self, *, beta=8.0, max_weight=5.0, temperature=4.0, t2_scale=True, **options):
        super().__init__(
            "aekt", beta=beta, max_weight=max_weight, temperature=temperature, t2_scale=t2_scale, **options
        )


# --- end of the generated definitions ---


class SerialHead(nn.Module):
    """AEKT's task serialization: a C x C linear layer initialised to the identity.

    The student's logits pass through it; cross-entropy goes on the student's own logits and the distillation
    loss on this head's output. Drop the head at inference.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.linear = nn.Linear(num_classes, num_classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(num_classes))
            self.linear.bias.zero_()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.linear(logits)


__all__ = [
    "DistillLoss",
    *(spec.module for spec in METHODS.values()),
    "LinearDistillLoss",
    "CrossVocabLoss",
    "SerialHead",
]
