"""Distillation of ``transformers`` causal LMs on the fused-linear path.

``KDTrainer`` is a ``transformers.Trainer`` whose loss, per token of the shifted labels, is
``ce_weight * CE(student, label) + distill_weight * (method's loss between the student and the teacher)``, the
method any of ``kdkernels.METHODS``, its options in ``KDConfig`` (a ``TrainingArguments``). Each model runs its
backbone once (the teacher under no_grad) and the loss reads the two final hidden states and ``lm_head`` weights
through ``kdkernels.linear_distill_loss``: neither model's [tokens, V] logits tensor exists.

The pieces the trainer is made of serve other trainers too (``kdkernels.integrations.trl``): ``distill_in_forward``
runs both backbones and the loss inside the student's forward (``through_forward``: DDP, FSDP and DeepSpeed hooks
run around it), ``LMHead.of`` reads a model's output layer with its config's logit scale and final softcap, and
``lm_distill_loss`` is the loss of two heads.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from ..alignment import STRATEGIES
from ..arguments import OPTIONS, resolve
from ..backends import select_backend
from ..cross_vocab import resolve_cross_vocab
from ..linear import linear_distill_loss
from ..methods import CROSS_VOCAB_METHODS
from .cross_tokenizer import PROMPT_TEXT, CrossTokenizer, cross_tokenizer_loss, load_tokenizer, same_vocabulary

Tensor = torch.Tensor

IGNORE_INDEX = -100  # transformers' label of the tokens left out of the loss


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside its DDP / DeepSpeed / FSDP / torch.compile wrappers; a PEFT model's underlying model."""
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if hasattr(model, "peft_config") and hasattr(getattr(model, "base_model", None), "model"):
        model = model.base_model.model
    return model


def through_forward(wrapper: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run as the forward of the model inside ``wrapper``: the wrapper is called, so its
    forward hooks (DDP's, FSDP's parameter gathering, DeepSpeed's) run around the loss, and its ``forward`` is
    redirected to ``fn`` for that one call. A ``torch.compile`` wrapper compiles ``fn``: the innermost module's
    forward is the one redirected (the compiled wrapper's own forward is the compiled call of that module).

    The forward that accelerate wraps in autocast under ``bf16`` / ``fp16`` is the one replaced: the caller runs
    ``fn`` under the same autocast (``KDTrainer`` does, by ``autocast_smart_context_manager``)."""
    inner = extract_model_from_parallel(wrapper, keep_torch_compile=False)
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
    """A causal LM's output layer as the loss reads it: logits = logit_scale * (inputs @ weight.T + bias), then
    softcap * tanh(logits / softcap) when softcap is set, the inputs being the final hidden states (``inputs``).

    A peft LoRA head is one such linear map of extended inputs: its base weight and each active adapter's
    ``lora_B`` side by side ([V, H + r_1 + ...]), read by the hidden states and each adapter's
    ``scaling * lora_A(lora_dropout(hidden))`` side by side, which is peft's ``W x + scaling * B A dropout(x)``
    exactly, dropout included (``lora_bias``: ``scaling * lora_B.bias`` joins the bias)."""

    weight: Tensor  # [V, H], or [V, H + r_1 + ...] for a LoRA head
    bias: Tensor | None  # [V] or None
    logit_scale: float
    softcap: float | None
    lora: nn.Module | None = None  # the peft LoRA layer whose active adapters extend the inputs

    def inputs(self, hidden: Tensor) -> Tensor:
        """What the weight reads: the hidden states [..., H], with a LoRA head each adapter's scaled low-rank
        projection of them beside them (its dropout drawn here, as peft's forward draws it)."""
        if self.lora is None:
            return hidden
        layer = self.lora
        extra = []
        for name in _active_lora(layer):
            a = layer.lora_A[name]
            extra.append((a(layer.lora_dropout[name](hidden.to(a.weight.dtype))) * layer.scaling[name]).to(hidden))
        return torch.cat([hidden, *extra], -1)

    def logits(self, inputs: Tensor) -> Tensor:
        """The full logits of ``inputs(hidden)`` (for evaluation metrics only: the losses never form them)."""
        z = self.logit_scale * nn.functional.linear(inputs.to(self.weight.dtype), self.weight, self.bias)
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    @classmethod
    def of(cls, model: nn.Module) -> LMHead:
        """The output layer of ``model`` (unwrapped from DDP; tied embeddings included; a peft LoRA head or a
        ``modules_to_save`` copy as peft runs it) and its config's scaling."""
        model = _unwrapped(model)
        head = model.get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), Tensor):
            raise ValueError(
                f"{type(model).__name__} has no output embedding layer (get_output_embeddings() is "
                "None): the fused-linear loss needs a causal LM head, e.g. an AutoModelForCausalLM"
            )
        weight, bias = whole_tensor(head.weight), whole_tensor(getattr(head, "bias", None))
        if hasattr(weight, "ds_id") and weight.dim() != 2:
            raise NotImplementedError(
                f"the lm_head weight of {type(model).__name__} is a DeepSpeed ZeRO-3 "
                "partition outside the layer's forward: use ZeRO-1/2, DDP or FSDP2"
            )
        config = model.config.get_text_config()
        lora = head if _active_lora(head) else None
        if lora is not None:
            weight, bias = _lora_weight(lora, weight, bias)
        return cls(weight, bias, logit_scale(config), getattr(config, "final_logit_softcapping", None), lora)


def _active_lora(layer: nn.Module) -> list[str]:
    """The adapters of a peft LoRA layer that its forward adds to the base layer's output (none when the layer is
    not one, its adapters are disabled or merged into the base weight)."""
    if not hasattr(layer, "lora_A") or not hasattr(layer, "get_base_layer"):
        return []
    if layer.disable_adapters and layer.merged:
        layer.unmerge()  # (as peft's forward does with disabled adapters)
    if layer.disable_adapters or layer.merged:
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _lora_weight(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The LoRA head's weight [V, H + r_1 + ...] and bias (LMHead's docstring); refuses the LoRA variants (DoRA,
    aLoRA, ...), which are not one linear map of the hidden states."""
    names = _active_lora(layer)
    variants = {name: type(layer.lora_variant[name]).__name__ for name in names if name in layer.lora_variant}
    if variants:
        raise ValueError(
            f"the LoRA adapter(s) {variants} on the LM head are a LoRA variant (DoRA, aLoRA, ...), which the "
            "fused-linear loss cannot read as one linear head: use plain LoRA on lm_head (use_dora=False), "
            "modules_to_save=['lm_head'], or leave lm_head out of target_modules"
        )
    blocks = [weight]
    for name in names:
        b = layer.lora_B[name]
        blocks.append(whole_tensor(b.weight).to(weight.dtype))
        if b.bias is not None:
            bias = bias + layer.scaling[name] * whole_tensor(b.bias).to(bias.dtype)
    return torch.cat(blocks, 1), bias


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


def check_models(student: nn.Module, teacher: nn.Module, shared_tokenizer: bool = True) -> None:
    """Refuses, before any step, a student and teacher the loss cannot run, naming the argument and what to do:
    a model without a causal LM head, a model whose backbone's hidden states do not have its head's width (one
    token is run through each backbone to see), with ``shared_tokenizer`` a teacher vocabulary smaller than the
    student's."""
    vocabularies = []
    for role, model in (("model", student), ("teacher_model", teacher)):
        name = type(_unwrapped(model)).__name__
        try:
            LMHead.of(model)
        except ValueError as error:
            raise ValueError(f"{role}: {error}") from None
        vocabulary, width = _unwrapped(model).get_output_embeddings().weight.shape
        hidden = _hidden_width(model)
        if hidden is not None and hidden != width:
            raise ValueError(
                f"{role}: the hidden states of {name}'s backbone (base_model) are {hidden} wide and its lm_head "
                f"reads {width}: they cannot reach the head, which the fused-linear loss feeds them to; pass a "
                "causal LM whose head reads its backbone's last_hidden_state"
            )
        vocabularies.append(vocabulary)
    if shared_tokenizer and vocabularies[1] < vocabularies[0]:
        raise ValueError(
            f"teacher_model: its vocabulary ({vocabularies[1]} classes) is smaller than the student's "
            f"({vocabularies[0]}): the two models must share a tokenizer (a teacher padded past the student's "
            "vocabulary is read on the student's classes), or the teacher's tokenizer must be given "
            "(teacher_tokenizer) for a cross-tokenizer method, 'uld' or 'hybrid'"
        )


def _hidden_width(model: nn.Module) -> int | None:
    """The width of the final hidden states, from one token run through the backbone in eval mode; None where the
    model cannot run before training (meta or DeepSpeed-partitioned parameters)."""
    inner = _unwrapped(model)
    if any(p.is_meta or hasattr(p, "ds_id") for p in inner.parameters()):
        return None
    token = torch.zeros(1, 1, dtype=torch.long, device=next(inner.parameters()).device)
    training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            return final_hidden_states(model, {"input_ids": token}).shape[-1]
    except Exception as error:
        raise ValueError(
            f"{type(inner).__name__}: its backbone (base_model) did not run on one token ({error}); the "
            "fused-linear loss needs a causal LM whose base_model returns last_hidden_state"
        ) from error
    finally:
        inner.train(training)


def load_teacher(teacher: nn.Module | str, init_kwargs: dict | None) -> nn.Module:
    """The teacher, loaded as TRL loads one given by model id or local path:
    ``AutoModelForCausalLM.from_pretrained(teacher, **init_kwargs)``."""
    if isinstance(teacher, str):
        return transformers.AutoModelForCausalLM.from_pretrained(teacher, **(init_kwargs or {}))
    if init_kwargs:
        raise ValueError(
            "teacher_model_init_kwargs apply to a teacher_model given by model id or path; this teacher_model is "
            "already a model (load it with those arguments yourself)"
        )
    return teacher


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

    teacher.eval()  # (here, not in loss(): a compiled student's forward traces loss() and nothing else)

    def loss():
        head, teacher_head = LMHead.of(model), LMHead.of(teacher)
        # The head's inputs over the whole sequence: a LoRA head's dropout draws what peft's forward would.
        student_inputs = head.inputs(final_hidden_states(model, inputs))
        with torch.no_grad():
            teacher_inputs = teacher_head.inputs(through_forward(teacher, final_hidden_states, teacher, inputs))
        result = lm_distill_loss(
            method,
            head,
            teacher_head,
            student_inputs[:, rows],
            teacher_inputs[:, rows],
            target.to(student_inputs.device),
            **options,
        )
        return result, head.logits(student_inputs.detach()) if with_logits else None

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
    """``linear_distill_loss`` between two LM heads, of their inputs (``LMHead.inputs``). A teacher whose
    vocabulary is padded past the student's (more rows in its lm_head) is read on the student's V classes, i.e.
    renormalised over the shared vocabulary."""
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


def shifted_target(inputs: dict) -> tuple[dict, Tensor, slice]:
    """(the model inputs without labels, the target of each position, the positions that have one): a collator's
    ``shift_labels`` as they are, or ``labels[:, 1:]`` for positions ``[:-1]`` (position i predicts token i + 1)."""
    inputs = {k: v for k, v in inputs.items() if k not in PROMPT_KEYS}
    labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
    if shift_labels is not None:
        return inputs, shift_labels, slice(None)
    if labels is None:
        raise ValueError(
            "the batch has no `labels` (token ids, -100 on the tokens left out of the loss), e.g. "
            "from DataCollatorForLanguageModeling(tokenizer, mlm=False)"
        )
    return inputs, labels[..., 1:], slice(None, -1)


PROMPT_KEYS = ("prompts", "prompt_attention_mask")  # a collator's prompts (TRL GKD's), for generation only


def prompts_of(inputs: dict, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """(prompts [B, P] left-padded with ``pad_token_id``, their attention mask) of a batch: a collator's
    ``prompts`` and ``prompt_attention_mask`` (TRL GKD's convention), else each row's tokens before its first
    labelled one (at least its first token: a row labelled throughout, plain language modelling, is prompted by
    it), its padding (attention mask 0) left out."""
    if "prompts" in inputs:
        prompts = inputs["prompts"]
        return prompts, inputs.get("prompt_attention_mask", torch.ones_like(prompts))
    ids = inputs["input_ids"]
    if inputs.get("labels") is not None:
        labelled = inputs["labels"] != IGNORE_INDEX
    else:  # shift_labels[:, j] is the label of token j + 1
        shifted = inputs["shift_labels"] != IGNORE_INDEX
        labelled = torch.cat([torch.zeros_like(shifted[:, :1]), shifted[:, :-1]], 1)
    first = torch.where(labelled.any(-1), labelled.int().argmax(-1), ids.shape[1]).clamp(min=1)
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    keep = (torch.arange(ids.shape[1], device=ids.device) < first[:, None]) & mask
    lengths = keep.sum(-1).tolist()
    prompts = ids.new_full((ids.shape[0], max(lengths)), pad_token_id)
    prompt_mask = torch.zeros_like(prompts)
    for row, length in enumerate(lengths):
        prompts[row, prompts.shape[1] - length :] = ids[row][keep[row]]
        prompt_mask[row, prompts.shape[1] - length :] = 1
    return prompts, prompt_mask


def completions(model: nn.Module, prompts: Tensor, prompt_mask: Tensor, config) -> dict:
    """The batch of ``prompts`` followed by ``model``'s sampled completions (``model.generate`` with the
    ``transformers.GenerationConfig`` ``config``): ``input_ids``, ``attention_mask`` (a completion ends at its
    first end-of-sequence token, included), ``position_ids`` counted from the mask as generate counts them, and
    ``labels``: the completions' tokens, -100 on the prompts and past each end."""
    sequences = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=config)
    completion = sequences[:, prompts.shape[1] :]
    done = torch.ones_like(completion, dtype=torch.bool)
    if config.eos_token_id is not None:
        eos = torch.isin(completion, torch.as_tensor(config.eos_token_id, device=completion.device))
        done = (eos.int().cumsum(-1) - eos.int()) == 0  # up to the first end-of-sequence token, included
    attention_mask = torch.cat([prompt_mask, done.to(prompt_mask.dtype)], 1)
    labels = sequences.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, : prompts.shape[1]] = IGNORE_INDEX
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def sampling_config(args, model: nn.Module, processing_class=None) -> transformers.GenerationConfig:
    """The on-policy sampling (GKD's): ``args.max_new_tokens`` tokens at ``args.sampling_temperature``, plain
    sampling (no top-k / top-p), the student's end-of-sequence tokens, the tokenizer's padding."""
    generation = getattr(_unwrapped(model), "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    pad = getattr(processing_class, "pad_token_id", None)
    pad = next((p for p in (pad, getattr(generation, "pad_token_id", None)) if p is not None), None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    return transformers.GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=args.sampling_temperature,
        top_k=0,
        top_p=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=not args.gradient_checkpointing,
    )


LEARNABLE_TEMPERATURE = (
    "KDConfig.temperature must be a number: a learnable temperature needs an adversarial schedule (plain descent "
    "drives T up until both distributions are uniform), which the trainer does not run. Use the functional API in "
    "your own training step: kdkernels.linear_distill_loss(..., temperature=<a 0-d tensor that requires grad>) "
    "gives d loss / d T (`python -m kdkernels demo --learn-temperature` ascends it through a gradient reversal)"
)


@dataclass
class KDConfig(transformers.TrainingArguments):
    """``transformers.TrainingArguments`` with the loss options of ``KDTrainer``, saved with every checkpoint
    (``training_args.bin``, ``to_json_string()``) and printed with the others.

    The defaults are those of LLM distillation (TRL, Liger): temperature 1 and no T^2 factor for every method,
    whatever the method's own defaults in ``kdkernels.distill_loss`` (kd's vision convention is T = 4 with T^2).

    Args:
        method: a name of ``kdkernels.METHODS`` (default "kd", the forward KL).
        method_kwargs: the method's hyperparameters, e.g. ``{"beta": 0.5}`` for jsd (a JSON string on the command
            line); checked with the method now, not at the first step.
        temperature: T of both softmaxes (a number: see ``LEARNABLE_TEMPERATURE`` for a learnable one).
        t2_scale: multiply the distillation term by T^2.
        ce_weight, distill_weight: loss = ce_weight * CE(student, label) + distill_weight * method, per token.
        label_smoothing_factor (TrainingArguments'): smooths CE as transformers' LabelSmoother does (the loss
            option label_smoothing); needs ce_weight > 0.
        standardize: z-score each model's logits before the loss.
        log_entropy: also log the student's mean entropy at T.
        chunk_size, memory_budget, backend: those of ``kdkernels.linear_distill_loss``.
        lmbda: the probability that a step trains on the student's own samples (on-policy, GKD's schedule: drawn
            once per optimiser step): each batch's completions are replaced by the student's, sampled at
            ``sampling_temperature`` (not the loss's ``temperature``) for ``max_new_tokens`` tokens after its
            prompt, and the loss is taken on those tokens (the decoupled methods' target: the sampled token).
        seq_kd: steps that are not on-policy train on the teacher's samples instead of the dataset's (sequence-level
            KD).
        teacher_model_init_kwargs: keyword arguments of ``AutoModelForCausalLM.from_pretrained`` for a teacher
            given by model id or path (e.g. ``{"dtype": "bfloat16"}``), as TRL's ``teacher_model_init_kwargs``.
        teacher_tokenizer: the name or path of the teacher's tokenizer when it is not the student's (the
            trainer's ``teacher_tokenizer`` argument, loaded with ``AutoTokenizer.from_pretrained``; a tokenizer
            object passed to the trainer records its ``name_or_path`` here). With another vocabulary the method
            must be a cross-vocabulary one, "uld" or "hybrid" (``kdkernels.cross_vocab_loss``).
        token_merge_strategy: how a cross-tokenizer run merges a group of tokens that spans one token of the other
            model (GOLD's ``uld_token_merge_strategy``): "bayesian" (default: the row that predicts the group's last
            token, times the probabilities of its earlier tokens) or "observed" (GOLD's default: the row at the
            group's first token, times the probabilities of the later ones at their own rows).
    """

    _VALID_DICT_FIELDS = [
        *transformers.TrainingArguments._VALID_DICT_FIELDS,
        "method_kwargs",
        "teacher_model_init_kwargs",
    ]

    method: str = field(default="kd", metadata={"help": "The distillation loss: a name of kdkernels.METHODS."})
    method_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": 'The method\'s hyperparameters, e.g. {"beta": 0.5} for jsd.'}
    )
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the distillation loss."})
    t2_scale: bool = field(default=False, metadata={"help": "Multiply the distillation term by T^2."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the cross-entropy on the labels."})
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term."})
    standardize: bool = field(default=False, metadata={"help": "Z-score each model's logits before the loss."})
    log_entropy: bool = field(default=False, metadata={"help": "Also log the student's mean entropy at T."})
    chunk_size: int | None = field(default=None, metadata={"help": "Rows per chunk of the fused-linear loss."})
    memory_budget: int | None = field(
        default=None, metadata={"help": "Bytes of chunk temporaries of the fused-linear loss."}
    )
    backend: str = field(default="auto", metadata={"help": "kdkernels backend of the loss (auto, cpu, triton ...)."})
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of AutoModelForCausalLM.from_pretrained for a teacher given by name."},
    )
    lmbda: float = field(
        default=0.0, metadata={"help": "Probability that a step's completions are the student's own samples (GKD)."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens sampled per on-policy completion."})
    sampling_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the sampling (not the loss's temperature)."}
    )
    seq_kd: bool = field(
        default=False, metadata={"help": "Steps that are not on-policy train on the teacher's samples."}
    )
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={"help": "Name or path of the teacher's tokenizer, when it is not the student's (uld, hybrid)."},
    )
    token_merge_strategy: str = field(
        default="bayesian",
        metadata={"help": "Merge of a cross-tokenizer group's tokens: bayesian or observed (GOLD's)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.temperature, torch.Tensor):
            raise TypeError(LEARNABLE_TEMPERATURE)
        for name in ("method_kwargs", "teacher_model_init_kwargs"):
            if isinstance(getattr(self, name), str):  # (a non-JSON string: the parent only parses "{...}")
                raise ValueError(f"{name} must be a dict or a JSON object string, got {getattr(self, name)!r}")
        self.method_kwargs = dict(self.method_kwargs or {})
        options = set(self.method_kwargs) & set(OPTIONS)
        if options:
            raise ValueError(f"method_kwargs holds the method's hyperparameters; {sorted(options)} are KDConfig fields")
        if self.label_smoothing_factor and not self.ce_weight:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} smooths the cross-entropy term, which "
                "ce_weight=0 leaves out: set ce_weight > 0"
            )
        if self.cross_vocab:
            self._check_cross_vocab()
        else:
            resolve(
                self.method,
                temperature=self.temperature,
                t2_scale=self.t2_scale,
                ce_weight=self.ce_weight,
                label_smoothing=self.label_smoothing_factor,
                distill_weight=self.distill_weight,
                standardize=self.standardize,
                **self.method_kwargs,
            )
        for name in ("chunk_size", "memory_budget", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, (int, float)) or not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda must be a probability in [0, 1], got {self.lmbda!r}")
        temperature = self.sampling_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise ValueError(f"sampling_temperature must be a finite number > 0, got {temperature!r}")

    @property
    def cross_vocab(self) -> bool:
        """Whether the method is a cross-vocabulary one ("uld", "hybrid"): the teacher has its own tokenizer."""
        return self.method in CROSS_VOCAB_METHODS

    def _check_cross_vocab(self) -> None:
        """A cross-vocabulary method's options, checked: its hyperparameters, and none of the fused-linear path's
        options (it reads both models' logits) or of sequence-level KD (the teacher would sample its own tokens)."""
        resolve_cross_vocab(
            self.method,
            temperature=self.temperature,
            distill_weight=self.distill_weight,
            ce_weight=self.ce_weight,
            **self.method_kwargs,
        )
        unsupported = {
            "t2_scale": self.t2_scale,
            "standardize": self.standardize,
            "chunk_size": self.chunk_size,
            "memory_budget": self.memory_budget,
            "seq_kd": self.seq_kd,
        }
        unsupported = sorted(name for name, value in unsupported.items() if value)
        if unsupported:
            raise ValueError(
                f"method={self.method!r} (cross-tokenizer) does not take {unsupported}: it reads both models' "
                "logits at the aligned groups (not the fused-linear path), without T^2 or standardization, and "
                "trains on the dataset's or the student's completions (not the teacher's samples: seq_kd)"
            )
        if self.token_merge_strategy not in STRATEGIES:
            raise ValueError(f"token_merge_strategy must be one of {STRATEGIES}, got {self.token_merge_strategy!r}")

    def cross_vocab_options(self) -> dict:
        """The keyword arguments of ``cross_tokenizer_loss`` that this configuration sets."""
        names = ("temperature", "ce_weight", "distill_weight", "backend")
        return {
            **{name: getattr(self, name) for name in names},
            "ce_options": {"label_smoothing": self.label_smoothing_factor},
            **self.method_kwargs,
        }

    def loss_options(self) -> dict:
        """The keyword arguments of ``linear_distill_loss`` that this configuration sets."""
        names = ("temperature", "t2_scale", "ce_weight", "distill_weight", "standardize", "chunk_size")
        options = {name: getattr(self, name) for name in (*names, "memory_budget", "backend")}
        return {**options, "label_smoothing": self.label_smoothing_factor, **self.method_kwargs}


def peft_student(model: nn.Module, peft_config=None) -> nn.Module:
    """``model``, wrapped by ``peft_config`` when one is given (``peft.get_peft_model``, as TRL's trainers do).
    Refuses prompt learning: ``PeftModel.forward`` adds its virtual tokens, and the loss replaces that forward by
    the backbone's (``final_hidden_states``)."""
    if peft_config is not None:
        if getattr(model, "peft_config", None):
            raise ValueError(
                "peft_config: the model already has peft adapters (a PeftModel); pass the base model with "
                "peft_config, or the PeftModel without it"
            )
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    configs = getattr(model, "peft_config", None)
    prompt = sorted(
        str(getattr(c.peft_type, "value", c.peft_type))
        for c in (configs.values() if isinstance(configs, dict) else ())
        if getattr(c, "is_prompt_learning", False)
    )
    if prompt:
        raise ValueError(
            f"peft prompt learning ({', '.join(prompt)}) is not supported by the fused-linear loss: PeftModel's "
            "forward adds its virtual tokens, and the loss runs the backbone instead. Use LoRA (any module, "
            "lm_head included) or another adapter that lives in the layers"
        )
    return model


class AutocastLoss:
    """A ``transformers.Trainer`` mixin for a loss that runs the student's layers in a redirected forward
    (``through_forward``), not the forward accelerate wraps in autocast under ``bf16`` / ``fp16``: ``compute_loss``
    runs under that autocast instead (transformers' own context is empty: it leaves autocast to the wrapper), so
    the layers compute in the half dtype as a plain Trainer's do. The fused-linear loss inside ignores autocast."""

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        return self.accelerator.autocast()


class KDTrainer(AutocastLoss, transformers.Trainer):
    """``transformers.Trainer`` distilling ``teacher_model`` into ``model`` with a fused kdkernels loss.

    Args:
        model, and the other arguments of ``transformers.Trainer`` (the batches need ``labels``, or
            ``shift_labels``).
        teacher_model: a causal LM on the student's tokenizer (its vocabulary may be padded past the student's:
            it is then renormalised over the student's classes), or its model id or local path (loaded with
            ``args.teacher_model_init_kwargs``). It is put in eval mode, frozen and moved to the training device
            unless it has a ``device_map``; it may have another dtype than the student's.
        args: a ``KDConfig`` (the loss and sampling options with the training arguments; default
            ``KDConfig()``). With ``lmbda`` / ``seq_kd`` steps train on the student's / the teacher's samples.
        peft_config: a ``peft.PeftConfig`` to wrap ``model`` with (``peft.get_peft_model``), as TRL's trainers do.
            A ``PeftModel`` student may also be passed as ``model``: LoRA on any module, ``lm_head`` included
            (its adapters enter the fused-linear loss: ``LMHead``), and ``modules_to_save``; prompt learning
            (prompt tuning, prefix tuning, p-tuning) is refused, as the loss replaces the forward that adds its
            virtual tokens.
        teacher_tokenizer: the teacher's tokenizer when it is not the student's (``processing_class``): a
            tokenizer, or its name or local path (else ``args.teacher_tokenizer``). With another vocabulary the
            method is "uld" or "hybrid" (docs/trainers.md, "Cross-tokenizer distillation"): each batch's
            completion, its labelled tokens, is turned back into text and tokenized for the teacher, the two
            tokenizations aligned by bytes, and the loss read on the aligned groups of both models' logits. With
            the same vocabulary the run is the ordinary one.

    The loss is taken over every token whose shifted label is not -100, normalised as transformers
    normalises its causal LM loss: by the tokens of the whole gradient-accumulation step (``num_items_in_batch``,
    across processes when ``average_tokens_across_devices``), else by the batch's tokens. Logged besides ``loss``:
    ``distill`` and ``ce``, the two terms unweighted and averaged as ``loss`` is (per token of each step, steps
    averaged; in evaluation per token of each batch, batches averaged), so that loss = ce_weight * ce +
    distill_weight * distill in the logs; with ``log_entropy`` ``entropy``, the student's mean over the tokens.
    Batches whose labels are all -100 train nothing: the first log after one warns (once).
    Each model's logit scale and final softcap are read from its config (Gemma, Cohere, Granite, ...). Under
    ``bf16`` / ``fp16`` both models run under accelerate's autocast as a plain Trainer's model does (the
    fused-linear loss reads the hidden states and heads in their dtypes, accumulating in float32);
    ``torch_compile`` compiles the student's forward with the loss in it (one graph). Runs on
    one device, under DDP and under FSDP2 (the loss runs inside the student's forward, a sharded head gathered
    there); a DeepSpeed ZeRO-3 partitioned head raises NotImplementedError (ZeRO-1/2 run as DDP does).
    """

    def __init__(
        self,
        model=None,
        teacher_model: nn.Module | None = None,
        args: KDConfig | None = None,
        peft_config=None,
        teacher_tokenizer=None,
        **kwargs,
    ):
        if teacher_model is None:
            raise ValueError("KDTrainer needs teacher_model (a causal LM on the student's tokenizer)")
        args = KDConfig() if args is None else args
        if not isinstance(args, KDConfig):
            raise TypeError(
                f"args must be a kdkernels KDConfig (TrainingArguments with the loss options), got "
                f"{type(args).__name__}: KDConfig(**training_arguments.to_dict(), method=...) converts one"
            )
        super().__init__(model=peft_student(model, peft_config), args=args, **kwargs)
        select_backend(args.backend, torch.empty(0, device=args.device))
        teacher_model = load_teacher(teacher_model, args.teacher_model_init_kwargs)
        teacher_model.eval().requires_grad_(False)
        if not getattr(teacher_model, "hf_device_map", None):
            teacher_model.to(self.args.device)
        self.cross = self._cross_tokenizer(teacher_tokenizer)
        check_models(self.model, teacher_model, shared_tokenizer=self.cross is None)
        self.teacher_model = teacher_model
        self.generation_config = sampling_config(args, self.model, self.processing_class)
        self._source_step, self._source = None, None  # (_completions_source)
        self._sums = {"train": defaultdict(float), "eval": defaultdict(float)}  # name -> sum (_record)
        self._warned_empty = False

    def _cross_tokenizer(self, teacher_tokenizer) -> CrossTokenizer | None:
        """The ``CrossTokenizer`` of a run whose teacher has its own tokenizer (the argument, else
        ``args.teacher_tokenizer``, which then records its name); None when the teacher shares the student's
        (no teacher tokenizer, or one with the same vocabulary and a same-vocabulary method)."""
        args = self.args
        given = teacher_tokenizer if teacher_tokenizer is not None else args.teacher_tokenizer
        if given is None:
            if args.cross_vocab:
                raise ValueError(
                    f"method={args.method!r} distils across two tokenizers and needs the teacher's: pass "
                    "teacher_tokenizer (a tokenizer, or its name or path) to KDTrainer or KDConfig"
                )
            return None
        teacher_tokenizer, name = load_tokenizer(given)
        args.teacher_tokenizer = name if name is not None else args.teacher_tokenizer
        student_tokenizer = self.processing_class
        if student_tokenizer is None:
            raise ValueError(
                "teacher_tokenizer is given, so the student's tokenizer is needed too: pass it as processing_class"
            )
        if not args.cross_vocab and same_vocabulary(student_tokenizer, teacher_tokenizer):
            return None
        return CrossTokenizer.of(student_tokenizer, teacher_tokenizer, args.method, args.token_merge_strategy)

    def training_step(self, model, inputs, num_items_in_batch=None):
        source = self._completions_source()
        if source is not None:
            inputs = self.sampled_batch(model if source == "student" else self.teacher_model, inputs)
            # (num_items_in_batch counts the dataset's labels: each sampled batch is its own per-token mean, and
            # the Trainer divides it by the accumulation steps)
            num_items_in_batch = None
        return super().training_step(model, inputs, num_items_in_batch)

    def _completions_source(self) -> str | None:
        """Who writes this step's completions: "student" with probability lmbda, else "teacher" with seq_kd, else
        None (the dataset). Drawn once per optimiser step, so that a step's batches share one normalisation."""
        if self.state.global_step != self._source_step:
            self._source_step = self.state.global_step
            on_policy = random.random() < self.args.lmbda
            self._source = "student" if on_policy else ("teacher" if self.args.seq_kd else None)
        return self._source

    def sampled_batch(self, model: nn.Module, inputs: dict) -> dict:
        """``inputs`` with their completions replaced by ``model``'s samples (``completions``), sampled in eval
        mode (no dropout) under the training autocast, on the device the batch is on."""
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        prompts, prompt_mask = prompts_of(inputs, self.generation_config.pad_token_id)
        device = next(unwrapped.parameters()).device
        training = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad(), self.autocast_smart_context_manager():
                batch = completions(unwrapped, prompts.to(device), prompt_mask.to(device), self.generation_config)
        finally:
            unwrapped.train(training)
        return {name: value.to(inputs["input_ids"].device) for name, value in batch.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.cross is not None:
            return self._cross_tokenizer_loss(model, inputs, return_outputs)
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
            self.args.method,
            target,
            rows,
            return_outputs,
            normalizer=normalizer,
            return_parts=True,
            return_entropy=self.args.log_entropy,
            **self.args.loss_options(),
        )
        parts, entropy = result if self.args.log_entropy else (result, None)
        self._record("train" if model.training else "eval", parts, entropy, target, normalizer)
        if return_outputs:
            return parts.loss, CausalLMOutput(loss=parts.loss, logits=logits)
        return parts.loss

    def _cross_tokenizer_loss(self, model, inputs, return_outputs: bool):
        """compute_loss with the teacher on its own tokenizer: the batch re-tokenized for it and aligned
        (``CrossTokenizer.teacher_batch``), then ``cross_tokenizer_loss``. GOLD's normalisation, each batch its own
        (the distillation term per group of each example, then per example; CE per token): the Trainer divides it
        by the accumulation steps."""
        teacher_inputs, alignment = self.cross.teacher_batch(inputs)
        inputs, target, _ = shifted_target({k: v for k, v in inputs.items() if k not in (PROMPT_TEXT, "shift_labels")})
        self.loss_is_scaled_for_ga = False
        (parts, entropy), logits = cross_tokenizer_loss(
            model,
            self.teacher_model,
            inputs,
            teacher_inputs,
            alignment,
            target,
            self.cross,
            return_entropy=self.args.log_entropy,
            with_logits=return_outputs,
            **self.args.cross_vocab_options(),
        )
        self._record("train" if model.training else "eval", parts, entropy, target, None)
        if return_outputs:
            return parts.loss, CausalLMOutput(loss=parts.loss, logits=logits)
        return parts.loss

    def _record(self, mode: str, parts, entropy: Tensor | None, target: Tensor, normalizer) -> None:
        """Adds this batch's terms as its loss enters the logged ``loss``, so that the logs keep
        loss = ce_weight * ce + distill_weight * distill: in training the batch's share of its step's per-token
        mean (over the step's tokens, or over its own tokens / the accumulation steps, as the Trainer divides
        such a loss), in evaluation its per-token mean (``eval_loss`` is the batches' mean). ``units`` counts
        optimiser steps (a batch adds 1 / the accumulation steps) or evaluation batches."""
        sums = self._sums[mode]
        tokens = (target != IGNORE_INDEX).sum()
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        unit = 1.0 / steps if mode == "train" else 1.0
        share = unit if normalizer is None else 1.0
        sums["units"] += unit
        sums["distill"] += parts.distill.detach() * share
        if parts.ce is not None:
            sums["ce"] += parts.ce.detach() * share
        if entropy is not None:  # (a per-token mean over all the tokens)
            sums["entropy"] += entropy.sum().detach()
            sums["tokens"] += tokens.detach()
        sums["empty"] += (tokens == 0).detach()  # (checked when logging: no host sync per batch)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        sums = self._sums[mode]
        if "units" in sums:
            names = list(sums)
            totals = torch.stack([torch.as_tensor(sums[name], dtype=torch.float64) for name in names])
            totals = dict(zip(names, self.accelerator.reduce(totals.to(self.args.device), reduction="sum").tolist()))
            prefix = "eval_" if mode == "eval" else ""
            for name in ("distill", "ce"):
                if name in totals:
                    logs[prefix + name] = totals[name] / totals["units"]
            if "entropy" in totals:
                logs[prefix + "entropy"] = totals["entropy"] / max(totals["tokens"], 1.0)
            if totals["empty"] and not self._warned_empty:
                self._warned_empty = True
                warnings.warn(
                    f"KDTrainer: {int(totals['empty'])} batch(es) had no token with a label (every label -100): "
                    "their loss is 0 and they train nothing. Check the collator's labels (prompt masking, "
                    "truncation to max_length, padding)",
                    stacklevel=2,
                )
            sums.clear()
        super().log(logs, start_time)
