"""Distillation between a student and a teacher with different tokenizers, in ``KDTrainer`` (docs/trainers.md,
"Cross-tokenizer distillation").

Two stages, as kdkernels.alignment splits them. Per batch, in Python (the tokenization's own loop over the
examples): ``CrossTokenizer.teacher_batch`` turns each example's completion, the student's labelled tokens, back into
text (their bytes), tokenizes it and the prompt's text for the teacher, and pairs the two tokenizations into groups
that cover the same bytes (``build_alignment``). In the step, batched tensor code: ``cross_tokenizer_loss`` runs
both models, merges each group's rows and takes ``uld`` or the hybrid loss on them (``aligned_cross_vocab_loss``),
plus the student's cross-entropy on its own labels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..alignment import (
    STRATEGIES,
    Alignment,
    Tokens,
    aligned_cross_vocab_loss,
    build_alignment,
    byte_offsets,
    piece_bytes,
)
from ..cross_vocab import VocabMap, vocab_map
from ..functional import LossParts
from ..methods import CROSS_VOCAB_METHODS

Tensor = torch.Tensor
IGNORE_INDEX = -100
# The batch key of each example's prompt text (GOLD's collator's name): used for the teacher's prompt when present.
PROMPT_TEXT = "original_prompt_text"
# Text tokenized once by each tokenizer at construction: a tokenizer that is not lossless byte-level raises there.
PROBE = "class Naïve:  # ≥ 0 é\n    X = 1\n"


def load_tokenizer(tokenizer) -> tuple[object, str | None]:
    """(the tokenizer, its name or path): one given by name or local path is loaded with
    ``transformers.AutoTokenizer.from_pretrained``; an object keeps its ``name_or_path`` (None if it has none)."""
    if isinstance(tokenizer, str):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(tokenizer), tokenizer
    return tokenizer, getattr(tokenizer, "name_or_path", None) or None


def same_vocabulary(student_tokenizer, teacher_tokenizer) -> bool:
    """Whether the two tokenizers give every token string the same id (then the same-vocabulary losses apply)."""
    return student_tokenizer is teacher_tokenizer or student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()


def _backend(tokenizer, name: str):
    """The ``tokenizers.Tokenizer`` under a transformers fast tokenizer (or the tokenizer itself), checked to be
    lossless byte-level BPE on a probe text."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not callable(getattr(backend, "id_to_token", None)) or not callable(getattr(backend, "encode", None)):
        raise TypeError(
            f"{name} must be a fast tokenizer (transformers) or a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
        )
    try:
        byte_offsets(backend, PROBE)
    except ValueError as error:
        raise ValueError(f"{name}: {str(error).removeprefix('tokenizer: ')}") from None
    return backend


@dataclass
class CrossTokenizer:
    """The two tokenizers of a cross-tokenizer run and what the loss needs of them: ``strategy`` (GOLD's
    uld_token_merge_strategy) and, for "hybrid", the ``VocabMap`` of their shared token strings."""

    student: object  # the backends (tokenizers.Tokenizer)
    teacher: object
    method: str
    strategy: str
    shared: VocabMap | None

    @classmethod
    def of(cls, student_tokenizer, teacher_tokenizer, method: str, strategy: str) -> CrossTokenizer:
        if method not in CROSS_VOCAB_METHODS:
            raise ValueError(
                f"method={method!r} compares the two models' classes one to one, which a teacher_tokenizer of "
                f"another vocabulary does not allow: use one of {sorted(CROSS_VOCAB_METHODS)}"
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"token_merge_strategy must be one of {STRATEGIES}, got {strategy!r}")
        if student_tokenizer is None:
            raise ValueError(
                "a cross-tokenizer run needs the student's tokenizer: pass it as processing_class (its tokens are "
                "turned back into text for the teacher)"
            )
        shared = None
        if method == "hybrid":
            shared = vocab_map(student_tokenizer, teacher_tokenizer)
            if not len(shared):
                raise ValueError(
                    "method='hybrid' needs token strings that both tokenizers have (its matched classes), and these "
                    "two share none (e.g. a byte-level BPE and a SentencePiece vocabulary): use method='uld'"
                )
        backends = _backend(student_tokenizer, "processing_class"), _backend(teacher_tokenizer, "teacher_tokenizer")
        return cls(*backends, method, strategy, shared)

    def teacher_batch(self, inputs: dict) -> tuple[dict, Alignment]:
        """(the teacher's inputs: ``input_ids`` and ``attention_mask``, right-padded, on the batch's device; the
        ``Alignment`` of the two tokenizations' completions) of a student batch with ``labels`` (``tokenize``)."""
        teacher_inputs, student, teacher = self.tokenize(inputs)
        return teacher_inputs, build_alignment(student, teacher, self.strategy)

    def tokenize(self, inputs: dict) -> tuple[dict, list[Tokens], list[Tokens]]:
        """(the teacher's inputs, each example's student and teacher completion ``Tokens``) of a student batch. Each
        example's completion is its run of labelled tokens (from position 1: position 0 predicts nothing); its
        prompt, the tokens before, is the batch's ``original_prompt_text`` when given, else the prompt tokens
        decoded."""
        if inputs.get("labels") is None:
            raise ValueError(
                "a cross-tokenizer run needs the batch's `labels` (-100 before and after each completion): the "
                "labelled tokens are the completion the teacher's tokens are aligned with"
            )
        ids, labels = inputs["input_ids"], inputs["labels"]
        attended = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        texts = inputs.get(PROMPT_TEXT)
        rows, pairs = [], ([], [])
        labelled = (labels != IGNORE_INDEX).tolist()
        for i, (row, mask, marks) in enumerate(zip(ids.tolist(), attended.tolist(), labelled)):
            teacher_ids, student, teacher = self._example(row, mask, marks, None if texts is None else texts[i], i)
            rows.append(teacher_ids)
            pairs[0].append(student)
            pairs[1].append(teacher)
        width = max(len(r) for r in rows)
        teacher_ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros_like(teacher_ids)
        for i, r in enumerate(rows):
            teacher_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": teacher_ids.to(ids.device), "attention_mask": mask.to(ids.device)}, *pairs

    def _example(self, ids: list, mask: list, labelled: list, prompt_text: str | None, i: int):
        """(the teacher's token ids, the student's and the teacher's completion ``Tokens``) of one example."""
        positions = [k for k in range(1, len(ids)) if labelled[k] and mask[k]]
        if positions and positions != list(range(positions[0], positions[-1] + 1)):
            raise ValueError(
                f"labels[{i}]: a cross-tokenizer run aligns one completion per example, so each row's labelled "
                "tokens must be one run (-100 before and after it only)"
            )
        first = positions[0] if positions else len(ids)
        prompt = [t for t, m in zip(ids[:first], mask[:first]) if m]
        if not prompt and positions:  # (left padding just before the completion: its first token prompts it)
            prompt, positions, first = [ids[first]], positions[1:], first + 1
        pieces = [self._piece(t) for t in ids[first : first + len(positions)]]
        start, end, completion = _decodable(pieces)
        if prompt_text is None:
            prompt_text = b"".join([*map(self._piece, prompt), *pieces[:start]]).decode("utf-8", errors="replace")
        teacher_prompt = self.teacher.encode(prompt_text, add_special_tokens=True).ids
        teacher_ids, teacher_offsets = byte_offsets(self.teacher, completion)
        ends = list(itertools.accumulate(len(piece) for piece in pieces[start:end]))
        shift = 0 if self.strategy == "observed" else 1  # bayesian: the rows that predict the tokens
        if shift and teacher_ids and not teacher_prompt:
            raise ValueError(
                f"example {i}: the 'bayesian' strategy reads the row before the completion's first token, and the "
                "teacher's tokens of the prompt are none (an empty prompt text)"
            )
        student = Tokens(ids[first + start : first + end], list(zip([0, *ends[:-1]], ends)), first + start - shift)
        teacher = Tokens(teacher_ids, teacher_offsets, len(teacher_prompt) - shift)
        return (teacher_prompt + teacher_ids) or [0], student, teacher

    def _piece(self, token: int) -> bytes:
        """The bytes of one student token (none for an id outside its tokenizer, e.g. a padded vocabulary's)."""
        return piece_bytes(self.student.id_to_token(token) or "")


def _decodable(pieces: list[bytes]) -> tuple[int, int, str]:
    """(first, end, text): the widest run of tokens pieces[first:end] whose bytes are UTF-8 text, leaving out the
    tokens at either end that hold part of a character cut off by the block's edge."""
    first = 0
    while first < len(pieces) and pieces[first][:1] and pieces[first][0] & 0xC0 == 0x80:
        first += 1  # (a continuation byte: the character began before the completion)
    end = len(pieces)
    while True:
        data = b"".join(pieces[first:end])
        try:
            return first, end, data.decode("utf-8")
        except UnicodeDecodeError as error:  # keep the tokens that end before the first undecodable byte
            at, kept = 0, first
            while kept < end and at + len(pieces[kept]) <= error.start:
                at += len(pieces[kept])
                kept += 1
            end = kept


def cross_tokenizer_loss(
    model: nn.Module,
    teacher: nn.Module,
    inputs: dict,
    teacher_inputs: dict,
    alignment: Alignment,
    target: Tensor,
    cross: CrossTokenizer,
    *,
    temperature: float,
    ce_weight: float,
    distill_weight: float,
    ce_options: dict | None = None,
    backend: str = "auto",
    return_entropy: bool = False,
    with_logits: bool = False,
    **hyperparameters,
):
    """(``LossParts`` of ``ce_weight * CE + distill_weight * (cross.method on the aligned groups)``, the student's
    entropies at ``temperature`` on its labelled tokens when ``return_entropy``, else None; the student's logits when
    ``with_logits``, else None). The distillation term is GOLD's reduction: each example's mean over its groups,
    then the mean over the examples; the CE term is the mean over the labelled tokens (``target``, the shifted
    labels of positions [:-1]), torch's ``cross_entropy`` with ``ce_options`` (the trainer's CE options, e.g. its
    label smoothing). Runs inside the student's forward like ``distill_in_forward``."""
    from .transformers import LMHead, final_hidden_states, through_forward

    teacher.eval()

    def loss():
        head, teacher_head = LMHead.of(model), LMHead.of(teacher)
        logits = head.logits(head.inputs(final_hidden_states(model, inputs)))
        with torch.no_grad():
            hidden = through_forward(teacher, final_hidden_states, teacher, teacher_inputs)
            teacher_logits = teacher_head.logits(teacher_head.inputs(hidden)).to(logits.device)
        shared = {} if cross.shared is None else {"vocab_map": cross.shared}
        aligned = alignment.to(logits.device)
        rows = aligned_cross_vocab_loss(
            cross.method,
            logits,
            teacher_logits,
            aligned,
            temperature=temperature,
            reduction="none",
            backend=backend,
            **shared,
            **hyperparameters,
        )
        distill = aligned.example_mean(rows)
        # (float32 CE of half-precision logits; float64 ones as they are)
        shifted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
        target_ = target.to(logits.device)
        tokens = (target_ != IGNORE_INDEX).sum().clamp(min=1)
        ce = (
            nn.functional.cross_entropy(
                shifted.flatten(0, 1),
                target_.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
                **(ce_options or {}),
            )
            / tokens
        )
        parts = LossParts(distill_weight * distill + ce_weight * ce, distill.detach(), ce.detach())
        entropy = _entropy(shifted.detach(), target_, temperature) if return_entropy else None
        return (parts, entropy), logits.detach() if with_logits else None

    return through_forward(model, loss)


def _entropy(logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """The student's entropy at ``temperature`` at each labelled row (0 elsewhere)."""
    log_q = torch.log_softmax(logits / temperature, -1)
    return -(log_q.exp() * log_q).sum(-1) * (target != IGNORE_INDEX)
