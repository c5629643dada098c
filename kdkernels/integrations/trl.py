"""TRL's distillation trainers on kdkernels' fused-linear loss, with any method of the table.

- ``patch_trl()`` makes ``trl.DistillationTrainer`` compute its loss with ``chunked_divergence_loss``, which takes
  and returns what TRL's own chunked loss (``trl.trainer.distillation_trainer._chunked_divergence_loss``) does:
  by default the generalized JSD of TRL (beta = 0 forward KL, 1 reverse KL, mixture (1 - beta) p_student + beta
  p_teacher) at ``temperature`` without T^2, summed over the completion tokens / their count (or /
  ``num_items_in_batch``), with the student's entropy summed over them for logging; ``patch_trl(method="akl")``
  puts another method in its place (TRL's trainer passes no labels: the methods that read them are refused).
- ``patch_trl()`` also makes GOLD's ``ULDLoss`` (``trl.experimental.gold``, cross-tokenizer distillation) compute
  its distillation term with ``kdkernels.alignment.aligned_cross_vocab_loss`` ("uld", or "hybrid" with
  ``uld_use_hybrid_loss``): the same groups, merge and reduction as TRL's, batched, on the fused cross-vocabulary
  kernel (``gold_distillation_loss``); the inputs it does not cover go to TRL's own code.
- ``GKDTrainer`` is ``trl.experimental.gkd.GKDTrainer`` whose ``compute_loss`` reads both models' final hidden
  states and heads instead of their full logits: by default the same loss as TRL's ``generalized_jsd_loss`` on
  the shifted logits (over the labels != -100, / their count or / ``num_items_in_batch``), value and gradients;
  ``method=`` and ``method_kwargs=`` take any method (the decoupled ones' target: the labels' tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers.modeling_outputs import CausalLMOutput
from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer
from trl.experimental.gold import gold_trainer as _gold
from trl.trainer import distillation_trainer as _distillation

from ..alignment import Alignment, Tokens, aligned_cross_vocab_loss, build_alignment
from ..arguments import resolve
from ..cross_vocab import VocabMap
from ..linear import linear_distill_loss
from .transformers import AutocastLoss, distill_in_forward, whole_tensor

Tensor = torch.Tensor

_TRL_LOSS = _distillation._chunked_divergence_loss  # TRL's own, restored by the function patch_trl returns
_TRL_ULD = _gold.ULDLoss._compute_distillation_loss  # GOLD's, likewise


def chunked_divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch: Tensor | int | None = None,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    method: str = "jsd",
    method_kwargs: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's chunked generalized JSD on ``kdkernels.linear_distill_loss`` ("jsd"): (loss, the student's entropy at
    ``temperature`` summed over the completion tokens, their count). Arguments as TRL's: hidden states [B, K, H_s]
    and [B, K, H_t], heads [V, H], ``completion_mask`` [B, K] (1 = in the loss). Another ``method`` takes its
    ``method_kwargs`` instead of ``beta`` (``trl_hyperparameters``), also at ``temperature`` without T^2."""
    # An FSDP2 head (DTensor) is gathered once, as TRL does (kdkernels reads low-precision weights as they are).
    student_lm_head_weight, teacher_lm_head_weight = map(whole_tensor, (student_lm_head_weight, teacher_lm_head_weight))
    student_lm_head_bias, teacher_lm_head_bias = map(whole_tensor, (student_lm_head_bias, teacher_lm_head_bias))
    mask = completion_mask != 0
    normalizer = None
    if num_items_in_batch is not None:
        normalizer = torch.as_tensor(num_items_in_batch, device=student_hidden_states.device).float()
    loss, entropy = linear_distill_loss(
        method,
        student_hidden_states,
        student_lm_head_weight,
        teacher_hidden_states,
        teacher_lm_head_weight,
        student_bias=student_lm_head_bias,
        teacher_bias=teacher_lm_head_bias,
        temperature=temperature,
        t2_scale=False,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping,
        mask=mask,
        normalizer=normalizer,
        return_entropy=True,
        **trl_hyperparameters(method, method_kwargs, beta),
    )
    return loss, entropy.sum(), mask.sum()


def trl_hyperparameters(method: str, method_kwargs: dict | None, beta: float | None = None) -> dict:
    """The hyperparameters of ``method`` in a TRL trainer, checked: jsd's is the trainer's own ``beta`` (its
    config's), so ``method_kwargs`` must not set it; the other methods' are ``method_kwargs``."""
    if method == "jsd" and method_kwargs:
        raise ValueError(
            f"method_kwargs: jsd's beta is the TRL config's beta, got {method_kwargs!r}; set the config's beta"
        )
    hyperparameters = {"beta": 0.5 if beta is None else beta} if method == "jsd" else dict(method_kwargs or {})
    resolve(method, temperature=1.0, t2_scale=False, **hyperparameters)
    return hyperparameters


def patch_trl(method: str = "jsd", **method_kwargs) -> Callable[[], None]:
    """Makes ``trl.DistillationTrainer`` compute its loss with ``chunked_divergence_loss`` and ``method`` (its
    hyperparameters as keyword arguments; jsd's beta is ``DistillationConfig.beta``), checked now, and GOLD's
    ``ULDLoss`` its distillation term with ``gold_distillation_loss``; returns the function that puts TRL's own
    back. TRL's trainer passes its loss no labels: a method that reads them (dkd,
    the decoupled family split at the target) is refused."""
    if resolve(method, **trl_hyperparameters(method, method_kwargs)).plan.needs_target:
        raise ValueError(
            f"method={method!r} reads each token's label, which trl.DistillationTrainer does not pass to its "
            "loss: use kdkernels' KDTrainer (lmbda=1 for on-policy) or GKDTrainer, or a method without a target"
        )
    _distillation._chunked_divergence_loss = functools.partial(
        chunked_divergence_loss, method=method, method_kwargs=method_kwargs
    )
    _gold.ULDLoss._compute_distillation_loss = gold_distillation_loss

    def unpatch() -> None:
        _distillation._chunked_divergence_loss = _TRL_LOSS
        _gold.ULDLoss._compute_distillation_loss = _TRL_ULD

    return unpatch


def gold_distillation_loss(
    self,
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_labels: Tensor,
    teacher_labels: Tensor,
    student_input_ids: Tensor,
    teacher_input_ids: Tensor,
    student_byte_offsets: Tensor | None = None,
    teacher_byte_offsets: Tensor | None = None,
) -> Tensor:
    """``ULDLoss._compute_distillation_loss`` (``self``: the ULDLoss) on ``aligned_cross_vocab_loss``: the same
    answer spans, groups (byte offsets with ``use_extended_uld``, else the first min(sizes) positions), merge
    strategy, temperatures, hybrid split and weights, and reduction (each example's mean over its groups, then the
    mean over the examples), times ``uld_distillation_weight``. TRL's own code takes the batches it handles
    differently: a "bayesian" answer at position 0, no answer token at all, a vocabulary map that is not one to one,
    hybrid weights given by half."""
    args = (student_logits, teacher_logits, student_labels, teacher_labels, student_input_ids, teacher_input_ids)
    offsets = (student_byte_offsets, teacher_byte_offsets)
    keywords = {"student_byte_offsets": student_byte_offsets, "teacher_byte_offsets": teacher_byte_offsets}
    alignment = _gold_alignment(self, student_labels, teacher_labels, student_input_ids, teacher_input_ids, offsets)
    hybrid = _gold_hybrid(self) if self.use_hybrid_loss and self._vocab_mapping is not None else {}
    if alignment is None or hybrid is None:
        return _TRL_ULD(self, *args, **keywords)
    alignment = alignment.to(student_logits.device)
    rows = aligned_cross_vocab_loss(
        "hybrid" if hybrid else "uld",
        student_logits,
        teacher_logits,
        alignment,
        temperature=self.student_temperature,
        teacher_temperature=self.teacher_temperature,
        reduction="none",
        **hybrid,
    )
    return self.distillation_weight * alignment.example_mean(rows)


def _gold_hybrid(uld) -> dict | None:
    """The hybrid options of a ULDLoss (its map made once, as a ``VocabMap``); None where TRL's own code must run."""
    matched, unmatched = uld.hybrid_matched_weight, uld.hybrid_unmatched_weight
    if matched is not None and unmatched is None:
        return None
    if getattr(uld, "_kdkernels_map", None) is None:
        teacher_ids = sorted(uld._vocab_mapping)
        student_ids = [uld._vocab_mapping[t] for t in teacher_ids]
        try:
            uld._kdkernels_map = VocabMap(torch.tensor(student_ids), torch.tensor(teacher_ids))
        except ValueError:  # (not one to one: two teacher tokens on one student id)
            uld._kdkernels_map = False
    if uld._kdkernels_map is False:
        return None
    weights = {} if matched is None else {"matched_weight": matched, "unmatched_weight": unmatched}
    return {"vocab_map": uld._kdkernels_map, "beta": uld.beta, **weights}


def _gold_alignment(uld, student_labels, teacher_labels, student_ids, teacher_ids, offsets) -> Alignment | None:
    """The ``Alignment`` of GOLD's answer spans (``ULDLoss._compute_distillation_loss``'s), or None where TRL's
    own code must run."""
    bayesian = uld.token_merge_strategy == "bayesian"
    sides = []
    for labels, skip_eos in ((student_labels, uld.skip_student_eos), (teacher_labels, uld.skip_teacher_eos)):
        starts, sizes = uld._get_start_and_size_answers(labels)
        sides.append((starts, [size - skip_eos for size in sizes]))
    (s_starts, s_sizes), (t_starts, t_sizes) = sides
    if max(s_sizes, default=0) <= 0 or max(t_sizes, default=0) <= 0:
        return None
    if uld.use_extended_uld and (offsets[0] is None or offsets[1] is None):
        return None  # (TRL raises its own error)
    pairs = ([], [])
    for i, (s_start, s_size, t_start, t_size) in enumerate(zip(s_starts, s_sizes, t_starts, t_sizes)):
        if s_size <= 0 or t_size <= 0:
            pairs[0].append(Tokens([], [], 0))
            pairs[1].append(Tokens([], [], 0))
            continue
        if bayesian and (s_start == 0 or t_start == 0):
            return None
        if not uld.use_extended_uld:
            s_size = t_size = min(s_size, t_size)
        for side, ids, start, size, spans in (
            (pairs[0], student_ids, s_start, s_size, offsets[0]),
            (pairs[1], teacher_ids, t_start, t_size, offsets[1]),
        ):
            if uld.use_extended_uld:
                spans = [tuple(o) for o in spans[i, start : start + size].tolist()]
            else:  # positional: one group per position
                spans = [(k, k + 1) for k in range(size)]
            side.append(Tokens(ids[i, start : start + size].tolist(), spans, start - bayesian))
    return build_alignment(*pairs, uld.token_merge_strategy)


class GKDTrainer(AutocastLoss, _TRLGKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` (same arguments, generation and schedule) with its loss on the
    fused-linear path: neither model's [tokens, V] logits exist (unless ``return_outputs`` asks for the
    student's, as evaluation with metrics does).

    Args:
        method: a name of ``kdkernels.METHODS`` (default "jsd", GKD's: its beta is ``GKDConfig.beta``); the
            loss is taken at temperature 1 without T^2, as GKD's (``GKDConfig.temperature`` is the sampling one).
        method_kwargs: the hyperparameters of another method, e.g. ``{"alpha": 0.3}`` for skew_rkl.
        The others: those of TRL's GKDTrainer.
    """

    def __init__(self, *args, method: str = "jsd", method_kwargs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.method_kwargs = trl_hyperparameters(method, method_kwargs, self.beta)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        normalizer = None
        if num_items_in_batch is not None:
            normalizer = torch.as_tensor(num_items_in_batch, device=inputs["input_ids"].device).float()
        # Position i predicts token i + 1; the labels' -100 leave prompt and padding out (TRL's convention), and
        # TRL's GKD loss is taken at temperature 1 (its temperature is the sampling one).
        loss, logits = distill_in_forward(
            model,
            self.teacher_model,
            model_inputs,
            self.method,
            inputs["labels"][:, 1:],
            slice(None, -1),
            return_outputs,
            temperature=1.0,
            t2_scale=False,
            normalizer=normalizer,
            **self.method_kwargs,
        )
        return (loss, CausalLMOutput(loss=loss, logits=logits)) if return_outputs else loss
