"""Token alignment across two tokenizers (docs/losses.md, section 11.6): the rows of ``cross_vocab_loss`` when the
student and the teacher cut the same text into different tokens.

Two stages. In the data collator, per example (Python: it walks token lists; no tensor work): ``byte_offsets``
tokenizes a text for one model and gives each token's bytes [start, end); ``align_groups`` pairs the two token
sequences into groups that cover the same bytes (GOLD's walk); ``build_alignment`` turns a batch of them into an
``Alignment`` of index tensors. In the training step, batched tensor code with no loop over the batch:
``merge_groups`` gathers each group's base row and chains the probabilities of the group's other actual tokens into a
log scale (GOLD's merge), and ``aligned_cross_vocab_loss`` calls ``cross_vocab_loss`` on the merged rows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from .cross_vocab import cross_vocab_loss

Tensor = torch.Tensor
STRATEGIES = ("observed", "bayesian")
# GOLD clamps each chained token probability to at least this before multiplying (a token the model gives no mass
# would zero the group); the clamp's gradient is 0 below it.
MIN_CHAINED_PROBABILITY = 1e-8


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character that stands for each byte -> the byte. Printable bytes
    stand for themselves; the other 68 take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


BYTE_OF_CHARACTER = _byte_alphabet()


def piece_bytes(piece: str) -> bytes:
    """The bytes a byte-level BPE token stands for: one byte per character of its piece; a piece outside the
    alphabet (an added token's own text) stands for its UTF-8."""
    if all(c in BYTE_OF_CHARACTER for c in piece):
        return bytes(BYTE_OF_CHARACTER[c] for c in piece)
    return piece.encode()


def byte_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, [start, end) byte offsets into text's UTF-8) of ``text`` tokenized by a byte-level BPE tokenizer
    (a ``tokenizers.Tokenizer`` or a transformers fast tokenizer), no special tokens added. The offsets are the
    running sums of the tokens' byte lengths, which must add up to the text: a tokenizer that normalizes the text or
    adds a prefix space raises."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    encoding = backend.encode(text, add_special_tokens=False)
    pieces = [piece_bytes(piece) for piece in encoding.tokens]
    if b"".join(pieces) != text.encode():
        raise ValueError(
            "tokenizer: its tokens' bytes do not spell the text (a normalizer, a prefix space, or not a byte-level "
            "BPE): the byte offsets of cross-tokenizer alignment need a lossless byte-level tokenizer"
        )
    ends = list(itertools.accumulate(len(p) for p in pieces))
    return list(encoding.ids), list(zip([0, *ends[:-1]], ends))


def align_groups(
    student_offsets: list[tuple[int, int]], teacher_offsets: list[tuple[int, int]]
) -> list[tuple[range, range]]:
    """Groups (student token positions, teacher token positions) that cover the same bytes, in order: walk both
    sequences, advancing the side whose token ends first, and close a group where both end at the same byte (GOLD's
    _align_by_byte_offsets). Tokens left after the last common end form a last group; a group with no token on one
    side is dropped, as GOLD drops it."""
    groups = []
    s = t = s_start = t_start = 0
    while s < len(student_offsets) and t < len(teacher_offsets):
        s_end, t_end = student_offsets[s][1], teacher_offsets[t][1]
        s += s_end <= t_end
        t += t_end <= s_end
        if s_end == t_end:
            groups.append((range(s_start, s), range(t_start, t)))
            s_start, t_start = s, t
    if s_start < len(student_offsets) and t_start < len(teacher_offsets):
        groups.append((range(s_start, len(student_offsets)), range(t_start, len(teacher_offsets))))
    return groups


class Tokens(NamedTuple):
    """One example's tokens for one model: ids, byte offsets (``byte_offsets``), and the row of that model's logits
    [B, L, V] that goes with the first token (the rows of the later tokens follow). GOLD's "observed" strategy reads
    the rows at the tokens' own positions (first_row = the first token's position); "bayesian" the rows that predict
    them (one position earlier)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    first_row: int


class Side(NamedTuple):
    """One model's part of an ``Alignment`` (G groups, K chained tokens)."""

    base: Tensor  # [G, 2] (example, row) of each group's base row: its distribution is the group's
    chained: Tensor  # [K, 2] (example, row) of the rows whose actual token's probability multiplies a group
    chained_token: Tensor  # [K] that token
    chained_group: Tensor  # [K] that group

    def to(self, device) -> Side:
        return Side(*(x.to(device) for x in self))


@dataclass(frozen=True)
class Alignment:
    """A batch's aligned groups as index tensors (``build_alignment``); ``example`` [G] is each group's example."""

    student: Side
    teacher: Side
    example: Tensor
    num_examples: int

    @property
    def num_groups(self) -> int:
        return self.example.numel()

    def to(self, device) -> Alignment:
        student, teacher, example = self.student.to(device), self.teacher.to(device), self.example.to(device)
        return replace(self, student=student, teacher=teacher, example=example)

    def example_mean(self, rows: Tensor) -> Tensor:
        """TRL's reduction of the group losses [G]: each example's mean, then the mean over the examples (an
        example without groups counts 0)."""
        total = torch.zeros(self.num_examples, dtype=rows.dtype, device=rows.device).index_add(0, self.example, rows)
        count = torch.zeros_like(total).index_add(0, self.example, torch.ones_like(rows))
        return (total / count.clamp(min=1)).mean()


def build_alignment(student: list[Tokens], teacher: list[Tokens], strategy: str = "observed") -> Alignment:
    """The ``Alignment`` of a batch from each example's ``Tokens`` of both models (in the collator). ``strategy``,
    GOLD's ``uld_token_merge_strategy``: a group's base row is that of its first token ("observed": the first row's
    distribution times the probabilities of the later actual tokens at their rows) or of its last ("bayesian": the
    last row's distribution, conditioned on the earlier tokens, times their probabilities)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if len(student) != len(teacher):
        raise ValueError(f"student and teacher must hold the same examples, got {len(student)} and {len(teacher)}")
    sides = ([], [])
    example = []
    for i, pair in enumerate(zip(student, teacher)):
        for name, tokens in zip(("student", "teacher"), pair):
            if len(tokens.ids) != len(tokens.offsets):
                raise ValueError(
                    f"{name}[{i}]: ids and offsets must have one entry per token, got {len(tokens.ids)} and "
                    f"{len(tokens.offsets)}"
                )
        for student_positions, teacher_positions in align_groups(pair[0].offsets, pair[1].offsets):
            for side, tokens, positions in zip(sides, pair, (student_positions, teacher_positions)):
                base = positions[0] if strategy == "observed" else positions[-1]
                rows = [(i, tokens.first_row + k, tokens.ids[k]) for k in positions if k != base]
                side.append(((i, tokens.first_row + base), rows))
            example.append(i)
    return Alignment(*(_side(groups) for groups in sides), torch.tensor(example, dtype=torch.int64), len(student))


def _side(groups: list) -> Side:
    chained = [(*row, g) for g, (_, rows) in enumerate(groups) for row in rows]
    chained = torch.tensor(chained, dtype=torch.int64).reshape(-1, 4)
    base = torch.tensor([b for b, _ in groups], dtype=torch.int64).reshape(-1, 2)
    return Side(base, chained[:, :2], chained[:, 2], chained[:, 3])


def merge_groups(logits: Tensor, side: Side, temperature: float) -> tuple[Tensor, Tensor]:
    """(the groups' base rows [G, V] of ``logits`` [B, L, V], their log scales [G]): each group's log scale is the
    sum over its chained tokens of log max(softmax(row / T)[token], 1e-8), so that exp(log scale) softmax(base / T)
    is GOLD's merged distribution. Batched: one gather of rows, one logsumexp, one index_add."""
    base = logits[side.base[:, 0], side.base[:, 1]]
    chained = logits[side.chained[:, 0], side.chained[:, 1]]
    chained = chained.to(torch.float64 if logits.dtype == torch.float64 else torch.float32) / temperature
    token = chained.gather(-1, side.chained_token.unsqueeze(-1)).squeeze(-1)
    log_prob = (token - torch.logsumexp(chained, -1)).clamp(min=math.log(MIN_CHAINED_PROBABILITY))
    scale = torch.zeros(base.shape[0], dtype=log_prob.dtype, device=logits.device)
    return base, scale.index_add(0, side.chained_group, log_prob)


def aligned_cross_vocab_loss(
    method: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    alignment: Alignment,
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    **options,
):
    """``cross_vocab_loss(method, ...)`` on the merged groups of ``alignment`` (on the logits' device): student
    logits [B, Ls, Vs] and teacher logits [B, Lt, Vt] of whole sequences; one loss row per group. ``options`` are
    cross_vocab_loss's (reduction over the groups; TRL's per-example mean is reduction="none", then
    ``alignment.example_mean``)."""
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    student_rows, student_scale = merge_groups(student_logits, alignment.student, temperature)
    teacher_rows, teacher_scale = merge_groups(teacher_logits, alignment.teacher, teacher_temperature)
    return cross_vocab_loss(
        method,
        student_rows,
        teacher_rows,
        student_log_scale=student_scale,
        teacher_log_scale=teacher_scale,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        **options,
    )


__all__ = [
    "Alignment",
    "Tokens",
    "byte_offsets",
    "align_groups",
    "build_alignment",
    "merge_groups",
    "aligned_cross_vocab_loss",
]
