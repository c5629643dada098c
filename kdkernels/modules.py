"""nn.Module drop-ins: hyperparameters in ``__init__``, ``forward(student_logits, teacher_logits, target=None)``.

``DistillLoss(method, ...)`` takes any method; one subclass per method of the table (``KDLoss`` ...) is generated
from it; ``LinearDistillLoss`` is the fused-linear loss; ``SerialHead`` is AEKT's serial head.
"""

from __future__ import annotations

import torch
from torch import nn

from .arguments import resolve
from .cross_vocab import cross_vocab_loss, resolve_cross_vocab
from .functional import distill_loss
from .linear import linear_distill_loss
from .methods import METHODS, get_method


class DistillLoss(nn.Module):
    """Distillation loss ``method`` as a module, e.g. ``DistillLoss("jsd", beta=0.1)``.

    Args:
        method: a name of ``kdkernels.METHODS``.
        temperature, t2_scale: default to the method's.
        reduction, ignore_index, ce_weight, distill_weight, return_parts, standardize, backend: as in
            ``kdkernels.distill_loss``
            (ce_weight > 0 adds the student's cross-entropy against the target, fused).
        **hyperparameters: the method's hyperparameters; the others keep their defaults.

    ``forward(student_logits, teacher_logits, target=None, *, normalizer=None, mask=None)``.
    """

    def __init__(
        self,
        method: str,
        *,
        temperature=None,
        t2_scale=None,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        distill_weight: float = 1.0,
        return_parts: bool = False,
        standardize: bool = False,
        backend: str = "auto",
        **hyperparameters,
    ):
        super().__init__()
        settings = resolve(
            method,
            hyperparameters,
            temperature,
            t2_scale,
            reduction,
            ignore_index,
            None,
            ce_weight,
            distill_weight,
            return_parts,
            standardize,
        )
        self.method = settings.method
        self.hyperparameters = settings.hp
        self.temperature = settings.temperature
        self.t2_scale = settings.t2_scale
        self.reduction = reduction
        self.ignore_index = settings.ignore_index
        self.ce_weight = settings.ce_weight
        self.distill_weight = settings.distill_weight
        self.return_parts = settings.return_parts
        self.standardize = settings.standardize
        self.backend = backend

    def options(self) -> dict:
        """The keyword arguments of this module's loss calls."""
        return dict(
            temperature=self.temperature,
            t2_scale=self.t2_scale,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            ce_weight=self.ce_weight,
            distill_weight=self.distill_weight,
            return_parts=self.return_parts,
            standardize=self.standardize,
            backend=self.backend,
            **self.hyperparameters,
        )

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target=None, *, normalizer=None, mask=None
    ):
        return distill_loss(
            self.method, student_logits, teacher_logits, target, normalizer=normalizer, mask=mask, **self.options()
        )

    def extra_repr(self) -> str:
        hp = "".join(f", {k}={v!r}" for k, v in self.hyperparameters.items())
        weights = f", ce_weight={self.ce_weight}, distill_weight={self.distill_weight}" if self.ce_weight else ""
        weights += ", standardize=True" if self.standardize else ""
        return (
            f"{self.method!r}{hp}, temperature={self.temperature}, t2_scale={self.t2_scale}{weights}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


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
            hyperparameters,
            temperature,
            teacher_temperature,
            reduction,
            ignore_index,
            None,
            ce_weight,
            distill_weight,
            return_parts,
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


def method_module(method: str) -> type:
    """``<Name>Loss(**hyperparameters, temperature=..., ...)``: DistillLoss with the method fixed."""
    spec = get_method(method)

    def __init__(self, **kwargs):
        DistillLoss.__init__(self, method, **kwargs)

    hp = ", ".join(f"{k}={v!r}" for k, v in spec.hyperparameters.items())
    doc = (
        f"{spec.source} as a module: ``{spec.module}({hp + ', ' if hp else ''}temperature={spec.temperature}, "
        f"t2_scale={spec.t2_scale}, reduction='batchmean', ignore_index=-100, ce_weight=0.0, distill_weight=1.0, "
        f"return_parts=False, standardize=False, backend='auto')`` (docs/losses.md, {method})."
    )
    return type(spec.module, (DistillLoss,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


LOSS_MODULES = {spec.module: method_module(name) for name, spec in METHODS.items()}
globals().update(LOSS_MODULES)


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


__all__ = ["DistillLoss", *LOSS_MODULES, "LinearDistillLoss", "CrossVocabLoss", "SerialHead"]
