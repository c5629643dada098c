"""Distillation of ``transformers`` causal LMs on the fused-linear path.

``DistillationTrainer`` is a ``transformers.Trainer`` whose loss, per token of the shifted labels, is
``ce_weight * CE(student, label) + distill_weight * (method's loss between the student and the teacher)``, the
method any of ``kdkernels.METHODS``. Each model runs its backbone once (the teacher under no_grad) and the loss
reads the two final hidden states and ``lm_head`` weights through ``kdkernels.linear_distill_loss``: neither
model's [tokens, V] logits tensor exists.

The pieces the trainer is made of serve other trainers too (``kdkernels.integrations.trl``): ``distill_in_forward``
runs both backbones and the loss inside the student's forward (``through_forward``: DDP, FSDP and DeepSpeed hooks
run around it), ``LMHead.of`` reads a model's output layer with its config's logit scale and final softcap, and
``lm_distill_loss`` is the loss of two heads.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from ..arguments import resolve
from ..linear import linear_distill_loss

Tensor = torch.Tensor

# linear_distill_loss options a trainer takes from the user; it sets the others (target, mask, normalizer, heads).
LINEAR_OPTIONS = ("chunk_size", "memory_budget", "backend")
SETTINGS = ("temperature", "t2_scale", "ignore_index", "ce_weight", "distill_weight", "standardize")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside its DDP / DeepSpeed / FSDP / torch.compile wrappers; a PEFT model's underlying model."""
    model = extract_model_from_parallel(model)
    if hasattr(model, "peft_config") and hasattr(getattr(model, "base_model", None), "model"):
        model = model.base_model.model
    return model


def through_forward(wrapper: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run as the forward of the model inside ``wrapper``: the wrapper is called, so its
    forward hooks (DDP's, FSDP's parameter gathering, DeepSpeed's) run around the loss, and its ``forward`` is
    redirected to ``fn`` for that one call."""
    inner = extract_model_from_parallel(wrapper)
    shadowed = "forward" in inner.__dict__

    def redirected(*a, **k):
        restore()  # fn may call the model's real forward
        return fn(*a, **k)

    def restore():
        if shadowed:
            inner.forward = own
        else:
            inner.__dict__.pop("forward", None)

    own = inner.forward
    inner.forward = redirected
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()


def logit_scale(config) -> float:
    """The factor a model's config applies to its logits before any softcap: Cohere's ``logit_scale``,
    ``output_multiplier``, Falcon-H1's ``lm_head_multiplier``, Granite's and MiniCPM3's ``1 / logits_scaling``
    (HyperCLOVA X's ``logits_scaling`` itself); 1 for the others."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


@dataclass
class LMHead:
    """A causal LM's output layer as the loss reads it: logits = logit_scale * (hidden @ weight.T + bias), then
    softcap * tanh(logits / softcap) when softcap is set."""

    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V] or None
    logit_scale: float
    softcap: float | None

    def logits(self, hidden: Tensor) -> Tensor:
        """The full logits (for evaluation metrics only: the losses never form them)."""
        z = self.logit_scale * nn.functional.linear(hidden, self.weight, self.bias)
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    @classmethod
    def of(cls, model: nn.Module) -> LMHead:
        """The output layer of ``model`` (unwrapped from DDP; tied embeddings included) and its config's scaling."""
        model = _unwrapped(model)
        head = model.get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), Tensor):
            raise ValueError(
                f"{type(model).__name__} has no output embedding layer (get_output_embeddings() is "
                "None): the fused-linear loss needs a causal LM head"
            )
        weight, bias = whole_tensor(head.weight), whole_tensor(getattr(head, "bias", None))
        if hasattr(weight, "ds_id") and weight.dim() != 2:
            raise NotImplementedError(
                f"the lm_head weight of {type(model).__name__} is a DeepSpeed ZeRO-3 "
                "partition outside the layer's forward: use ZeRO-1/2, DDP or FSDP2"
            )
        config = model.config.get_text_config()
        return cls(weight, bias, logit_scale(config), getattr(config, "final_logit_softcapping", None))


def whole_tensor(weight: Tensor | None) -> Tensor | None:
    """A DTensor (FSDP2) gathered once into a plain tensor, its gradient reduced back by autograd (as TRL does);
    other tensors as they are."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if weight is not None and dtensor is not None and isinstance(weight, dtensor):
        return weight.full_tensor()
    return weight


def final_hidden_states(model: nn.Module, inputs: dict) -> Tensor:
    """The hidden states [B, L, H] the model's head reads (after the final norm), from its backbone: the head itself
    does not run. Call it inside the model's forward (``through_forward``) when the model is wrapped."""
    model = _unwrapped(model)
    backbone = model.base_model
    if backbone is model:  # a model class without a base_model_prefix
        backbone = model.model
    return backbone(**inputs, use_cache=False).last_hidden_state


def distill_in_forward(
    model: nn.Module,
    teacher: nn.Module,
    inputs: dict,
    method: str,
    target: Tensor,
    rows: slice,
    with_logits: bool = False,
    **options,
):
    """(``lm_distill_loss`` of the student ``model`` against ``teacher`` on positions ``rows`` of ``inputs``; the
    student's full logits when ``with_logits``, else None). Runs inside the student's forward, each backbone inside
    its own model's (``through_forward``), the teacher under no_grad: a wrapped model is never bypassed."""

    def loss():
        student_hidden = final_hidden_states(model, inputs)
        teacher.eval()
        with torch.no_grad():
            teacher_hidden = through_forward(teacher, final_hidden_states, teacher, inputs)
        head = LMHead.of(model)
        result = lm_distill_loss(
            method,
            head,
            LMHead.of(teacher),
            student_hidden[:, rows],
            teacher_hidden[:, rows],
            target.to(student_hidden.device),
            **options,
        )
        return result, head.logits(student_hidden.detach()) if with_logits else None

    return through_forward(model, loss)


def lm_distill_loss(
    method: str,
    student: LMHead,
    teacher: LMHead,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    target: Tensor | None,
    **options,
):
    """``linear_distill_loss`` between two LM heads. A teacher whose vocabulary is padded past the student's (more
    rows in its lm_head) is read on the student's V classes, i.e. renormalised over the shared vocabulary."""
    v = student.weight.shape[0]
    teacher_weight, teacher_bias = teacher.weight, teacher.bias
    if teacher_weight.shape[0] < v:
        raise ValueError(
            f"the teacher's vocabulary ({teacher_weight.shape[0]} classes) is smaller than the "
            f"student's ({v}): the two models must share a tokenizer"
        )
    if teacher_weight.shape[0] > v:
        teacher_weight = teacher_weight[:v]
        teacher_bias = None if teacher_bias is None else teacher_bias[:v]
    return linear_distill_loss(
        method,
        student_hidden,
        student.weight,
        teacher_hidden.to(student_hidden.device),
        teacher_weight.to(student.weight.device),
        target,
        student_bias=student.bias,
        teacher_bias=None if teacher_bias is None else teacher_bias.to(student.weight.device),
        student_logit_scale=student.logit_scale,
        teacher_logit_scale=teacher.logit_scale,
        softcap=student.softcap,
        teacher_softcap=teacher.softcap,
        **options,
    )


_TRAINER_ARGUMENTS = set(inspect.signature(transformers.Trainer.__init__).parameters)


def split_loss_options(method: str, kwargs: dict) -> dict:
    """Takes the loss's options out of a trainer's keyword arguments (every name ``transformers.Trainer`` does not
    take) and checks them now, not at the first step: a bad method, hyperparameter or option raises here."""
    options = {name: kwargs.pop(name) for name in list(kwargs) if name not in _TRAINER_ARGUMENTS}
    reserved = sorted(
        set(options)
        & {
            "target",
            "mask",
            "normalizer",
            "reduction",
            "return_parts",
            "softcap",
            "teacher_softcap",
            "student_logit_scale",
            "teacher_logit_scale",
        }
    )
    if reserved:
        raise ValueError(
            f"{reserved} are set by the trainer (from the batch and the models' configs), not by the caller"
        )
    hyperparameters = {k: v for k, v in options.items() if k not in LINEAR_OPTIONS + SETTINGS}
    resolve(method, hyperparameters, **{k: options[k] for k in SETTINGS if k in options})
    return options


def shifted_target(inputs: dict) -> tuple[dict, Tensor, slice]:
    """(the model inputs without labels, the target of each position, the positions that have one): a collator's
    ``shift_labels`` as they are, or ``labels[:, 1:]`` for positions ``[:-1]`` (position i predicts token i + 1)."""
    inputs = dict(inputs)
    labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
    if shift_labels is not None:
        return inputs, shift_labels, slice(None)
    if labels is None:
        raise ValueError(
            "the batch has no `labels` (token ids, -100 on the tokens left out of the loss), e.g. "
            "from DataCollatorForLanguageModeling(tokenizer, mlm=False)"
        )
    return inputs, labels[..., 1:], slice(None, -1)


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` distilling ``teacher_model`` into ``model`` with a fused kdkernels loss.

    Args:
        model, args and the other arguments of ``transformers.Trainer`` (the batches need ``labels``, or
            ``shift_labels``).
        teacher_model: a causal LM on the student's tokenizer (its vocabulary may be padded past the student's:
            it is then renormalised over the student's classes). It is put in eval mode, frozen and moved to the
            training device unless it has a ``device_map``.
        method: a name of ``kdkernels.METHODS`` (default "kd").
        **loss_options: the method's hyperparameters and ``temperature``, ``t2_scale``, ``ce_weight``,
            ``distill_weight``, ``ignore_index``, ``chunk_size``, ``memory_budget``, ``backend`` of
            ``kdkernels.linear_distill_loss``, e.g. ``method="jsd", beta=0.5, ce_weight=0.5``.
        log_entropy: also log the student's mean entropy at T (one softmax more per chunk).

    The loss is taken over every token whose shifted label is not ``ignore_index``, normalised as transformers
    normalises its causal LM loss: by the tokens of the whole gradient-accumulation step (``num_items_in_batch``,
    across processes when ``average_tokens_across_devices``), else by the batch's tokens. Logged besides ``loss``:
    ``distill`` and ``ce`` (per-token means of the two terms, unweighted) and with ``log_entropy`` ``entropy``.
    Each model's logit scale and final softcap are read from its config (Gemma, Cohere, Granite, ...). Runs on
    one device, under DDP and under FSDP2 (the loss runs inside the student's forward, a sharded head gathered
    there); a DeepSpeed ZeRO-3 partitioned head raises NotImplementedError (ZeRO-1/2 run as DDP does).
    """

    def __init__(
        self,
        model=None,
        teacher_model: nn.Module | None = None,
        args=None,
        *,
        method: str = "kd",
        log_entropy: bool = False,
        **kwargs,
    ):
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs teacher_model (a causal LM on the student's tokenizer)")
        self.method = method
        self.loss_options = split_loss_options(method, kwargs)
        self.log_entropy = log_entropy
        super().__init__(model=model, args=args, **kwargs)
        teacher_model.eval().requires_grad_(False)
        if not getattr(teacher_model, "hf_device_map", None):
            teacher_model.to(self.args.device)
        self.teacher_model = teacher_model
        self._sums = {"train": defaultdict(float), "eval": defaultdict(float)}  # name -> sum over tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs, target, rows = shifted_target(inputs)
        normalizer = None
        if num_items_in_batch is not None:
            # The tokens of the whole step; DDP averages the processes' gradients, so each divides by its share.
            normalizer = torch.as_tensor(num_items_in_batch, device=target.device).float().reshape(-1)[0]
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                normalizer = normalizer / self.accelerator.num_processes
            normalizer = normalizer.clamp(min=1.0)
        # The loss is normalised for gradient accumulation when it divides by the step's tokens.
        self.loss_is_scaled_for_ga = normalizer is not None
        result, logits = distill_in_forward(
            model,
            self.teacher_model,
            inputs,
            self.method,
            target,
            rows,
            return_outputs,
            normalizer=normalizer,
            return_parts=True,
            return_entropy=self.log_entropy,
            **self.loss_options,
        )
        parts, entropy = result if self.log_entropy else (result, None)
        self._record("train" if model.training else "eval", parts, entropy, target, normalizer)
        if return_outputs:
            return parts.loss, CausalLMOutput(loss=parts.loss, logits=logits)
        return parts.loss

    def _record(self, mode: str, parts, entropy: Tensor | None, target: Tensor, normalizer) -> None:
        """Adds this batch's token sums of the logged terms (the parts are per-token sums / the denominator)."""
        sums = self._sums[mode]
        tokens = (target != self.loss_options.get("ignore_index", -100)).sum()
        denominator = tokens.clamp(min=1) if normalizer is None else normalizer
        sums["tokens"] += tokens.detach()
        sums["distill"] += (parts.distill * denominator).detach()
        if parts.ce is not None:
            sums["ce"] += (parts.ce * denominator).detach()
        if entropy is not None:
            sums["entropy"] += entropy.sum().detach()

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        sums = self._sums[mode]
        if "tokens" in sums:
            names = [name for name in sums if name != "tokens"]
            totals = torch.stack([torch.as_tensor(sums[name], dtype=torch.float64) for name in ["tokens", *names]])
            totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum").cpu()
            prefix = "eval_" if mode == "eval" else ""
            for name, total in zip(names, totals[1:]):
                logs[prefix + name] = (total / totals[0].clamp(min=1)).item()
            sums.clear()
        super().log(logs, start_time)
