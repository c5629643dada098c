"""Demo: distillation across two tokenizers on real text (``python -m kdkernels demo lm --cross-tokenizer``).

demo lm's protocol (kdkernels/demo_lm.py: corpus, models, optimiser, precision) at a smaller scale
(``CrossSchedule``), with the student on a tokenizer of its own; nothing is tuned per method.

- Tokenizers: the teacher's is a byte-level BPE of 8192 tokens trained on the training files (demo lm's recipe);
  the student's another one, of 4096 tokens, trained on every other training file: another vocabulary size and
  other token boundaries, so that the aligned groups hold several tokens on either side.
- Teacher: demo lm's Llama architecture (hidden 192, 3 layers), trained with cross-entropy on its own tokens.
- Students: the same architecture at half the width, on the student's tokenizer, trained on that tokenizer's
  blocks: CE only (``transformers.Trainer``), and ``KDTrainer`` with the teacher's
  tokenizer (``teacher_tokenizer``) and ``CE + method`` at T = 1 (ULD's recipe: the cross-entropy plus the
  distillation term, both weights 1), method "uld" or "hybrid" at its defaults, the "bayesian" merge. Each is
  trained from ``seeds`` seeds (initial weights and batch order); the report gives the mean and the spread.
- Result: each model's held-out perplexity on its own tokenizer (the students share one, so theirs compare), and
  the bits per byte of text, which compare across the two tokenizers (the teacher's too).
- Step cost: one training step of the student's distillation term on the same batch of real text (both models'
  forward, the loss, the backward), random initial weights, float32, in a fresh process each: kdkernels'
  aligned loss (the fused cross-vocabulary kernel, batched merge) against TRL's GOLD ``ULDLoss`` (its loop over the
  examples and groups) on the same alignment, uld and hybrid; the two losses' values are printed side by side.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from . import demo_lm
from .alignment import Tokens, aligned_cross_vocab_loss, piece_bytes
from .demo_lm import (
    QUICK,
    SEED,
    Schedule,
    causal_lm,
    corpus,
    cpu_bf16,
    in_fresh_process,
    measure_step,
    perplexity,
    train,
)
from .integrations.cross_tokenizer import CrossTokenizer

METHODS = ("uld", "hybrid")
# ULD's recipe: the student's cross-entropy plus the distillation term, at T = 1.
CROSS_OPTIONS = {"temperature": 1.0, "ce_weight": 1.0, "distill_weight": 1.0, "token_merge_strategy": "bayesian"}


@dataclass(frozen=True)
class CrossSchedule:
    # demo lm's models narrower and shallower, its blocks half as long and its vocabularies half as large: 3 seeds
    # of 3 students within minutes on a shared 2-core CPU
    base: Schedule = Schedule(
        vocab=8192,
        block=64,
        teacher_hidden=192,
        teacher_heads=3,
        student_hidden=96,
        student_heads=2,
        layers=3,
        teacher_steps=250,
        student_steps=100,
        timing_steps=1,
        corpus_bytes=6_000_000,
    )
    student_vocab: int = 4096
    seeds: int = 3


# The smoke run of the tests: seconds of training, the step costs measured in this process.
CROSS_QUICK = CrossSchedule(
    replace(
        QUICK, vocab=1024, block=32, batch=4, teacher_steps=4, student_steps=2, eval_blocks=4, corpus_bytes=300_000
    ),
    student_vocab=512,
    seeds=1,
)


def fast(tokenizer):
    """A transformers fast tokenizer around a ``tokenizers.Tokenizer`` (the trainer's processing_class)."""
    import transformers

    end = demo_lm.END_OF_TEXT
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end, pad_token=end)


def bits_per_byte(model, data: torch.Tensor, batch: int, tok) -> float:
    """The model's held-out cross-entropy in bits per byte of the predicted tokens' text (comparable across
    tokenizers): log2(perplexity) * tokens / bytes."""
    pieces = [len(piece_bytes(tok.id_to_token(i))) for i in range(tok.get_vocab_size())]
    num_bytes = torch.tensor(pieces)[data[:, 1:]].sum().item()
    return math.log2(perplexity(model, data, batch)) * data[:, 1:].numel() / num_bytes


def train_students(c: CrossSchedule, data, held_out, student_tok, teacher, teacher_tok, out: str, bar) -> dict:
    """{student: [(perplexity, bits per byte) per seed]}: CE only and one per method, each from every seed."""
    s = replace(c.base, vocab=student_tok.get_vocab_size())
    processing = {"processing_class": fast(student_tok), "teacher_tokenizer": fast(teacher_tok)}
    results = {}
    for seed in range(c.seeds):
        for method in [None, *METHODS]:
            name = method or "CE only"
            bar.set_postfix_str(f"{name}, seed {seed}")
            student = causal_lm(s, s.student_hidden, s.student_heads, SEED + 1 + seed)
            extra = {} if method is None else {"teacher": teacher, "options": CROSS_OPTIONS, **processing}
            where = os.path.join(out, f"{name}-{seed}")
            student = train(student, s, data, s.student_steps, where, bar, method, seed=SEED + seed, **extra)
            score = (perplexity(student, held_out, s.batch), bits_per_byte(student, held_out, s.batch, student_tok))
            results.setdefault(name, []).append(score)
    return results


def run(c: CrossSchedule, out: str, progress: bool = True) -> dict:
    """Both tokenizers, the teacher, the students of every seed; then the step costs."""
    started = time.perf_counter()
    s = c.base
    train_texts, held_texts = corpus(s.corpus_bytes)
    teacher_tok = demo_lm.tokenizer(train_texts, s.vocab)
    student_tok = demo_lm.tokenizer(train_texts[1::2], c.student_vocab)
    data = {}
    for name, tok in (("teacher", teacher_tok), ("student", student_tok)):
        held_out = demo_lm.blocks(tok, held_texts, s.block)[: s.eval_blocks]
        data[name] = (demo_lm.blocks(tok, train_texts, s.block), held_out)
    shared = len(CrossTokenizer.of(fast(student_tok), fast(teacher_tok), "hybrid", "bayesian").shared)
    print(
        f"corpus: {len(train_texts)} training files, {len(held_texts)} held-out; teacher BPE "
        f"{teacher_tok.get_vocab_size()} tokens ({data['teacher'][0].numel():,} training tokens), student BPE "
        f"{student_tok.get_vocab_size()} ({data['student'][0].numel():,}); {shared} token strings shared",
        flush=True,
    )
    total = s.teacher_steps + s.student_steps * (len(METHODS) + 1) * c.seeds
    with tqdm(total=total, desc="training", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("teacher")
        teacher = causal_lm(s, s.teacher_hidden, s.teacher_heads, SEED)
        teacher = train(teacher, s, data["teacher"][0], s.teacher_steps, os.path.join(out, "teacher"), bar)
        teacher.requires_grad_(False)
        held_out = data["teacher"][1]
        scores = perplexity(teacher, held_out, s.batch), bits_per_byte(teacher, held_out, s.batch, teacher_tok)
        result = {"teacher": scores}
        result["students"] = train_students(c, *data["student"], student_tok, teacher, teacher_tok, out, bar)
    result["paths"] = measure_paths(c, out, student_tok, teacher_tok, data["student"][0][: s.batch])
    result["minutes"] = (time.perf_counter() - started) / 60
    result["shared"] = shared
    return result


PATHS = ("kdkernels uld", "TRL ULDLoss uld", "kdkernels hybrid", "TRL ULDLoss hybrid")


def measure_paths(c: CrossSchedule, out: str, student_tok, teacher_tok, batch: torch.Tensor) -> list[dict]:
    """cross_step_cost of every path on ``batch``, each in a fresh process (no allocator state carried over), or
    in this one for the quick schedule."""
    files = {"student": os.path.join(out, "student.json"), "teacher": os.path.join(out, "teacher.json")}
    student_tok.save(files["student"])
    teacher_tok.save(files["teacher"])
    files["batch"] = os.path.join(out, "batch.pt")
    torch.save(batch, files["batch"])
    if c == CROSS_QUICK:
        return [cross_step_cost(c, path, files) for path in PATHS]
    schedule = f"CrossSchedule(Schedule(**{json.dumps(asdict(c.base))}), {c.student_vocab}, {c.seeds})"
    code = (
        "import json; from kdkernels.demo_cross_tokenizer import cross_step_cost, CrossSchedule; "
        "from kdkernels.demo_lm import Schedule; print(json.dumps(cross_step_cost({}, {!r}, {})))"
    )
    what = "demo lm --cross-tokenizer: measuring {}"
    return [in_fresh_process(code.format(schedule, path, json.dumps(files)), what.format(path)) for path in PATHS]


def gold_inputs(tokens: list[Tokens], width: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GOLD's labels [B, width] (the completion's tokens, -100 elsewhere) and byte offsets [B, width, 2] of each
    example's completion ``Tokens`` (the rows a strategy reads are ``shift`` before the tokens)."""
    labels = torch.full((len(tokens), width), -100, dtype=torch.int64)
    offsets = torch.zeros(len(tokens), width, 2, dtype=torch.int64)
    for i, t in enumerate(tokens):
        start = t.first_row + shift
        labels[i, start : start + len(t.ids)] = torch.tensor(t.ids, dtype=torch.int64)
        offsets[i, start : start + len(t.ids)] = torch.tensor(t.offsets, dtype=torch.int64).reshape(-1, 2)
    return labels, offsets


def cross_step_cost(c: CrossSchedule, path: str, files: dict) -> dict:
    """Peak resident memory added by one step of the student's distillation term on the saved batch, its median
    seconds over ``timing_steps`` more, and the loss: ``path`` is kdkernels' aligned loss or TRL's ULDLoss, uld or
    hybrid, on the same alignment (bayesian merge, temperature 1)."""
    from tokenizers import Tokenizer
    from trl.experimental.gold.gold_trainer import ULDLoss

    from .baselines import gold_config

    s = c.base
    student_tok, teacher_tok = Tokenizer.from_file(files["student"]), Tokenizer.from_file(files["teacher"])
    x = torch.load(files["batch"])
    method = path.split()[-1]
    cross = CrossTokenizer.of(student_tok, teacher_tok, method, "bayesian")
    inputs = {"input_ids": x, "labels": x}
    teacher_inputs, student_tokens, teacher_tokens = cross.tokenize(inputs)
    alignment = cross.teacher_batch(inputs)[1]
    teacher = causal_lm(replace(s, vocab=teacher_tok.get_vocab_size()), s.teacher_hidden, s.teacher_heads, SEED)
    teacher.eval().requires_grad_(False)
    student = causal_lm(replace(s, vocab=student_tok.get_vocab_size()), s.student_hidden, s.student_heads, SEED + 1)
    hybrid = method == "hybrid"
    config = gold_config(use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=hybrid)
    uld = ULDLoss(config, student_tok, teacher_tok)
    s_labels, s_offsets = gold_inputs(student_tokens, x.shape[1], 1)
    t_labels, t_offsets = gold_inputs(teacher_tokens, teacher_inputs["input_ids"].shape[1], 1)
    shared = {"vocab_map": cross.shared} if method == "hybrid" else {}
    losses = []

    def step():
        student.zero_grad(set_to_none=True)
        logits = student(input_ids=x).logits
        with torch.no_grad():
            teacher_logits = teacher(**teacher_inputs).logits
        if path.startswith("kdkernels"):
            rows = aligned_cross_vocab_loss(method, logits, teacher_logits, alignment, reduction="none", **shared)
            loss = alignment.example_mean(rows)
        else:
            t_ids = teacher_inputs["input_ids"]
            loss = uld(logits, teacher_logits, s_labels, t_labels, x, t_ids, s_offsets, t_offsets)
        loss.backward()
        losses.append(loss.item())

    return {"path": path, **measure_step(step, s.timing_steps), "loss": losses[0]}


def spread(values: Sequence[float], digits: int = 2) -> str:
    """mean, and ± the sample standard deviation over the seeds when there are several."""
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def format_result(c: CrossSchedule, result: dict) -> str:
    ce = statistics.fmean(p for p, _ in result["students"]["CE only"])
    teacher_ppl, teacher_bpb = result["teacher"]
    lines = [
        f"held-out, {c.seeds} seed(s) per student (mean ± sample std); teacher {teacher_ppl:.2f} perplexity on its "
        f"tokenizer, {teacher_bpb:.3f} bits/byte:",
        f"  {'student':<10}{'perplexity':>18}{'vs CE only':>12}{'bits/byte':>16}",
    ]
    for name, scores in result["students"].items():
        ppl = [p for p, _ in scores]
        lines.append(
            f"  {name:<10}{spread(ppl):>18}{statistics.fmean(ppl) / ce - 1:>+12.1%}"
            f"{spread([b for _, b in scores], 3):>16}"
        )
    tokens = c.base.batch * (c.base.block - 1)
    lines += [
        "",
        f"one step of the student's distillation term ({c.base.batch} x {c.base.block} student tokens of real text, "
        f"about {tokens} aligned rows; {'this process' if c == CROSS_QUICK else 'a fresh process each'}):",
        f"  {'path':<22}{'peak MB':>10}{'ms':>10}{'loss':>12}",
    ]
    for p in result["paths"]:
        lines.append(f"  {p['path']:<22}{p['peak_mb']:>10.0f}{1e3 * p['seconds']:>10.0f}{p['loss']:>12.6f}")
    lines += ["", f"({result['minutes']:.1f} minutes in all)"]
    return "\n".join(lines)


def main(args) -> int:
    """Runs ``python -m kdkernels demo lm --cross-tokenizer``; returns the exit code."""
    import tempfile

    c = CROSS_QUICK if args.quick else CrossSchedule()
    if args.steps is not None:
        c = replace(c, base=replace(c.base, student_steps=args.steps, teacher_steps=2 * args.steps))
    if args.seeds is not None:
        c = replace(c, seeds=args.seeds)
    s = c.base
    print(
        f"teacher hidden {s.teacher_hidden} x {s.layers} layers, {s.teacher_steps} steps, BPE {s.vocab}; students "
        f"hidden {s.student_hidden}, {s.student_steps} steps, BPE {c.student_vocab}; batches of {s.batch} x "
        f"{s.block} tokens; loss = CE + method (T = 1, bayesian merge) through KDTrainer(teacher_tokenizer=...)",
        flush=True,
    )
    print("precision: bf16 autocast" if cpu_bf16() else "precision: float32 (no bf16 on this CPU)", flush=True)
    with tempfile.TemporaryDirectory() as out:
        result = run(c, out, progress=not args.no_progress)
    print(format_result(c, result))
    return 0
