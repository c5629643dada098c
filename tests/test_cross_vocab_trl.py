"""TRL's ULDLoss (GOLD) reproduced by kdkernels.cross_vocab_loss, plain and hybrid, on the same aligned rows: values
and student gradients to float64 rounding, and the vocabulary map equal to TRL's.

TRL comes with the ``llm`` extra, which scripts/setup.sh installs: a missing package is an error, not a skip, unless
KDKERNELS_NO_LLM=1 says the environment has none.
"""

import os

import pytest
import torch
from helpers import gold_config

if os.environ.get("KDKERNELS_NO_LLM") == "1":
    pytest.skip("KDKERNELS_NO_LLM=1: trl is not installed here", allow_module_level=True)

from trl.experimental.gold.gold_trainer import ULDLoss  # noqa: E402

import kdkernels  # noqa: E402


class Vocabulary:
    """A tokenizer as TRL's and kdkernels' vocabulary maps see it: get_vocab() only."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens

    def get_vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}


def _vocabularies(vs: int, vt: int, seed: int) -> tuple[Vocabulary, Vocabulary]:
    """Two vocabularies of vs and vt strings that share about a third of the smaller one, at unrelated ids."""
    g = torch.Generator().manual_seed(seed)
    student = [f"s{i}" for i in range(vs)]
    teacher = [f"t{i}" for i in range(vt)]
    shared = min(vs, vt) // 3
    for k, (a, b) in enumerate(zip(torch.randperm(vs, generator=g)[:shared], torch.randperm(vt, generator=g)[:shared])):
        student[a] = teacher[b] = f"shared{k}"
    return Vocabulary(student), Vocabulary(teacher)


@pytest.mark.parametrize(
    "vs, vt, options",
    [
        (50, 80, {}),
        (90, 40, dict(uld_student_temperature=1.5, uld_teacher_temperature=0.8)),
        (50, 80, dict(uld_use_hybrid_loss=True)),
        (90, 40, dict(uld_use_hybrid_loss=True, beta=0.0, uld_student_temperature=2.0)),
        (60, 60, dict(uld_use_hybrid_loss=True, beta=1.0, uld_teacher_temperature=1.3)),
        (
            70,
            45,
            dict(uld_use_hybrid_loss=True, beta=0.3, uld_hybrid_matched_weight=0.6, uld_hybrid_unmatched_weight=0.25),
        ),
    ],
)
def test_uld_loss_equals_trls(vs, vt, options):
    """Examples of different lengths (TRL averages each example's rows, then the examples: reduction="none" averaged
    the same way); logits of moderate spread, so that no matched probability falls below TRL's 1e-8 clamp."""
    config = gold_config(**options)
    student_vocab, teacher_vocab = _vocabularies(vs, vt, seed=vs + vt)
    trl_loss = ULDLoss(config, student_vocab, teacher_vocab)
    g = torch.Generator().manual_seed(vs)
    batch, length, sizes = 3, 9, [8, 5, 6]  # position 0 is a prompt token; the answers follow
    student = (torch.randn(batch, length, vs, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    teacher = torch.randn(batch, length, vt, generator=g, dtype=torch.float64) * 1.5 + 7.0
    labels = torch.full((batch, length), -100)
    for i, size in enumerate(sizes):
        labels[i, 1 : 1 + size] = 1
    want = trl_loss(student, teacher, labels, labels, labels.clamp(min=0), labels.clamp(min=0))
    (want_grad,) = torch.autograd.grad(want, student)

    rows = [(i, k) for i, size in enumerate(sizes) for k in range(1, 1 + size)]
    index = torch.tensor(rows)
    hybrid = options.get("uld_use_hybrid_loss", False)
    mine = student.detach().requires_grad_(True)
    per_row = kdkernels.cross_vocab_loss(
        "hybrid" if hybrid else "uld",
        mine[index[:, 0], index[:, 1]],
        teacher[index[:, 0], index[:, 1]],
        temperature=config.uld_student_temperature,
        teacher_temperature=config.uld_teacher_temperature,
        reduction="none",
        **(
            dict(
                vocab_map=kdkernels.vocab_map(student_vocab, teacher_vocab),
                beta=config.beta,
                matched_weight=config.uld_hybrid_matched_weight,
                unmatched_weight=config.uld_hybrid_unmatched_weight,
            )
            if hybrid
            else {}
        ),
    )
    example = index[:, 0]
    loss = (torch.zeros(batch, dtype=per_row.dtype).index_add(0, example, per_row) / torch.tensor(sizes)).mean()
    (grad,) = torch.autograd.grad(loss, mine)
    assert torch.allclose(loss, want, rtol=1e-12, atol=0), (loss.item(), want.item())
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-15)


def test_vocab_map_equals_trls():
    student_vocab, teacher_vocab = _vocabularies(120, 75, seed=4)
    trl = ULDLoss(gold_config(uld_use_hybrid_loss=True), student_vocab, teacher_vocab)
    shared = kdkernels.vocab_map(student_vocab, teacher_vocab)
    assert dict(zip(shared.teacher_ids.tolist(), shared.student_ids.tolist())) == trl._vocab_mapping
    assert len(shared) == 25 and shared.summary().startswith("25 shared token strings: the student's of 120 (20.8%)")
