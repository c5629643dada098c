"""Demo: distilling a causal language model on real text (``python -m kdkernels demo lm``).

One protocol for every student; nothing is tuned per method.

- Corpus: the Python standard library's own source files (every machine with Python has them; no download), test
  packages left out. A file goes to the held-out split when crc32 of its path relative to the library is 0 mod 10.
- Tokenizer: a byte-level BPE (the ``tokenizers`` library) with a 16384-token vocabulary, trained on the training
  files. Each split is the files' tokens joined by an end-of-text token and cut into blocks of 128 tokens.
- Teacher: a Llama-architecture causal LM built from a config (hidden 256, 4 layers, 4 heads, tied embeddings:
  7.3M parameters), trained with cross-entropy by ``transformers.Trainer``.
- Students: the same architecture at hidden 160 (2 heads: 3.8M parameters, half the teacher's), all from the same
  initial weights, on the same batches in the same order with the same optimiser and schedule. The CE-only student
  is ``transformers.Trainer``'s causal-LM loss; each distilled student is
  ``kdkernels.integrations.transformers.KDTrainer`` with ``0.1 * CE + 0.9 * method`` at T = 1, the
  method's other hyperparameters at their defaults (the fused-linear path: neither model's [tokens, V] logits
  exist). Methods: kd (forward KL) and wsd (forward + reverse KL) unless ``--methods`` names others. Perplexity is
  the forward cross-entropy: mass-covering losses (forward KL) lower it, mode-seeking ones (rkl, jsd, tvd, the
  skewed KLs) trade it for sharper students, and at this budget land above the CE-only student.
- Precision: every model trains with ``bf16=True`` (autocast) where the CPU computes bfloat16 (oneDNN's check,
  ``cpu_bf16``), else in float32; the output says which. The step costs below are float32.
- Result: each model's held-out perplexity (exp of the mean next-token cross-entropy over the held-out blocks).
- Step cost: one distillation training step of the student (forward, loss, backward), in a fresh process each:
  the fused-linear path (KDTrainer's loss) against the standard one (both models' full logits, then the
  eager PyTorch loss, kdkernels' reference backend), and against full logits with the fused loss; the peak memory
  the step adds to the process's resident set, and the median time of a few steps.
- ``--quick`` (the smoke run of the tests): a small slice of the corpus, a 4096-token vocabulary, tiny models and a
  few steps: it checks the pipeline, not the result.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .bench import peak_rss_bytes
from .functional import distill_loss
from .integrations.transformers import KDConfig, KDTrainer, distill_in_forward

SEED = 0
END_OF_TEXT = "<|endoftext|>"
DEFAULT_METHODS = ("kd", "wsd")
# Every method at its defaults, except the temperature: T = 1, as LLM distillation runs (kd's default is 4).
LOSS_OPTIONS = {"temperature": 1.0, "ce_weight": 0.1, "distill_weight": 0.9}


@dataclass(frozen=True)
class Schedule:
    vocab: int = 16384
    block: int = 128  # tokens per training sequence
    batch: int = 16
    teacher_hidden: int = 256
    teacher_heads: int = 4
    student_hidden: int = 160
    student_heads: int = 2
    layers: int = 4
    teacher_steps: int = 300
    student_steps: int = 150
    lr: float = 2e-3
    eval_blocks: int = 128
    timing_steps: int = 3
    corpus_bytes: int = 0  # 0: the whole library


QUICK = Schedule(
    vocab=4096,
    block=64,
    batch=8,
    teacher_hidden=64,
    teacher_heads=2,
    student_hidden=32,
    student_heads=1,
    layers=2,
    teacher_steps=12,
    student_steps=6,
    eval_blocks=8,
    timing_steps=1,
    corpus_bytes=600_000,
)


def corpus(limit: int = 0) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of the standard library's source files, sorted by path; with ``limit``,
    every k-th file only, k such that about ``limit`` bytes remain."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
    if limit:
        files = files[:: max(1, math.ceil(sum(f.stat().st_size for f in files) / limit))]
    train, held_out = [], []
    for f in files:
        split = held_out if zlib.crc32(str(f.relative_to(root)).encode()) % 10 == 0 else train
        split.append(f.read_text(encoding="utf-8", errors="replace"))
    return train, held_out


def tokenizer(texts: Sequence[str], vocab: int):
    """A byte-level BPE tokenizer with ``vocab`` tokens trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[END_OF_TEXT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def blocks(tok, texts: Sequence[str], block: int) -> torch.Tensor:
    """The texts' tokens joined by end-of-text tokens, cut into [n, block] (the last partial block dropped)."""
    eot = tok.token_to_id(END_OF_TEXT)
    ids = []
    for encoding in tok.encode_batch(list(texts)):
        ids += encoding.ids + [eot]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).reshape(n, block)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i], "labels": self.data[i]}


class _Advance(transformers.TrainerCallback):
    """Moves the demo's progress bar one step per optimiser step."""

    def __init__(self, bar):
        self.bar = bar

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)


def causal_lm(s: Schedule, hidden: int, heads: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=s.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=s.block,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(config)


def cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls (oneDNN's check: AVX-512 or newer), where bf16 autocast pays."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # (a build without oneDNN's check)
        return False


def train(
    model,
    s: Schedule,
    data: torch.Tensor,
    steps: int,
    out: str,
    bar,
    method: str | None = None,
    teacher=None,
    seed: int = SEED,
    options: dict | None = None,
    **trainer_arguments,
):
    """``steps`` AdamW steps (warm-up then cosine decay) of ``model`` on ``data`` in the order of ``seed``, with
    transformers.Trainer (CE) or, with a ``method``, KDTrainer against ``teacher`` (its loss ``options``, default
    LOSS_OPTIONS; ``trainer_arguments`` go to KDTrainer); in bf16 autocast where the CPU computes it."""
    args = dict(
        bf16=cpu_bf16(),
        output_dir=out,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=seed,
        data_seed=seed,
        per_device_train_batch_size=s.batch,
        max_steps=steps,
        learning_rate=s.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.01,
        disable_tqdm=True,
    )
    if method is None:
        trainer = transformers.Trainer(
            model=model, args=transformers.TrainingArguments(**args), train_dataset=Blocks(data)
        )
    else:
        config = KDConfig(**args, method=method, **(LOSS_OPTIONS if options is None else options))
        trainer = KDTrainer(
            model=model, teacher_model=teacher, args=config, train_dataset=Blocks(data), **trainer_arguments
        )
    trainer.remove_callback(transformers.PrinterCallback)  # (the demo's own bar instead of the logs)
    trainer.add_callback(_Advance(bar))
    trainer.train()
    return model.eval()


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch: int) -> float:
    total, tokens = 0.0, 0
    for start in range(0, data.shape[0], batch):
        x = data[start : start + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        tokens += x[:, 1:].numel()
    return math.exp(total / tokens)


def step_cost(s: Schedule, path: str) -> dict:
    """Peak resident memory added by one distillation training step of the student (kd with the hard-label term)
    and the median seconds of ``timing_steps`` more, on random tokens: ``path`` "fused-linear" (the trainer's
    loss), "full logits + eager" (kdkernels' reference backend) or "full logits + fused" (the fastest backend)."""
    torch.manual_seed(SEED)
    teacher = causal_lm(s, s.teacher_hidden, s.teacher_heads, SEED).eval().requires_grad_(False)
    student = causal_lm(s, s.student_hidden, s.student_heads, SEED + 1)
    x = torch.randint(0, s.vocab, (s.batch, s.block))

    def step():
        student.zero_grad(set_to_none=True)
        if path == "fused-linear":
            loss, _ = distill_in_forward(
                student, teacher, {"input_ids": x}, "kd", x[:, 1:], slice(None, -1), **LOSS_OPTIONS
            )
        else:
            logits = student(input_ids=x).logits[:, :-1]
            with torch.no_grad():
                teacher_logits = teacher(input_ids=x).logits[:, :-1]
            backend = "reference" if path == "full logits + eager" else "auto"
            loss = distill_loss("kd", logits, teacher_logits, x[:, 1:], backend=backend, **LOSS_OPTIONS)
        loss.backward()

    return {"path": path, **measure_step(step, s.timing_steps)}


def measure_step(step, repeats: int) -> dict:
    """``peak_mb``, the resident memory one call of ``step`` adds at its peak (after a warm-up call: the gradients'
    and allocator's first allocation is not the step's own), and ``seconds``, the median of ``repeats`` more."""
    step()
    peak = peak_rss_bytes(step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_mb": peak / 2**20, "seconds": sorted(times)[len(times) // 2]}


def in_fresh_process(code: str, what: str) -> dict:
    """The JSON object that the Python ``code`` prints last, run in a fresh interpreter (no allocator state carried
    over); its error output in the exception when it fails."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


PATHS = ("full logits + eager", "full logits + fused", "fused-linear")


def measure_paths(s: Schedule) -> list[dict]:
    """step_cost of every path, each in a fresh process."""
    code = "import json; from kdkernels.demo_lm import step_cost, Schedule; print(json.dumps(step_cost({}, {!r})))"
    schedule = f"Schedule(**{json.dumps(asdict(s))})"
    return [in_fresh_process(code.format(schedule, path), f"demo lm: measuring {path}") for path in PATHS]


def run(s: Schedule, methods: Sequence[str], out: str, progress: bool = True) -> dict:
    """Tokenizer, teacher, the CE-only student and one student per method; then the step costs."""
    started = time.perf_counter()
    train_texts, held_texts = corpus(s.corpus_bytes)
    tok = tokenizer(train_texts, s.vocab)
    train_data, held_out = blocks(tok, train_texts, s.block), blocks(tok, held_texts, s.block)[: s.eval_blocks]
    print(
        f"corpus: {len(train_texts)} training files ({train_data.numel():,} tokens), {len(held_texts)} held-out "
        f"files ({held_out.numel():,} tokens evaluated); BPE vocabulary {tok.get_vocab_size()}",
        flush=True,
    )
    total = s.teacher_steps + s.student_steps * (len(methods) + 1)
    with tqdm(total=total, desc="training", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("teacher")
        teacher = train(
            causal_lm(s, s.teacher_hidden, s.teacher_heads, SEED),
            s,
            train_data,
            s.teacher_steps,
            os.path.join(out, "teacher"),
            bar,
        )
        result = {"teacher": perplexity(teacher, held_out, s.batch), "students": {}}
        teacher.requires_grad_(False)
        for method in [None, *methods]:
            bar.set_postfix_str(method or "CE only")
            student = causal_lm(s, s.student_hidden, s.student_heads, SEED + 1)
            student = train(
                student, s, train_data, s.student_steps, os.path.join(out, method or "ce"), bar, method, teacher
            )
            result["students"][method or "CE only"] = perplexity(student, held_out, s.batch)
    result["paths"] = measure_paths(s)
    result["minutes"] = (time.perf_counter() - started) / 60
    result["parameters"] = {
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "student": sum(p.numel() for p in student.parameters()),
    }
    return result


def format_result(s: Schedule, result: dict) -> str:
    ce = result["students"]["CE only"]
    lines = [
        f"held-out perplexity (teacher {result['teacher']:.2f}, {result['parameters']['teacher'] / 1e6:.1f}M "
        f"parameters; students {result['parameters']['student'] / 1e6:.1f}M):",
        f"  {'student':<10}{'perplexity':>12}{'vs CE only':>12}",
    ]
    for name, ppl in result["students"].items():
        lines.append(f"  {name:<10}{ppl:>12.2f}{ppl / ce - 1:>+12.1%}")
    tokens = s.batch * (s.block - 1)
    base = next(p for p in result["paths"] if p["path"] == "full logits + eager")
    lines += [
        "",
        f"one distillation step of the student ({tokens} tokens, V = {s.vocab}, kd with the hard-label "
        "term; fresh process each):",
        f"  {'path':<22}{'peak MB':>10}{'ms':>10}{'x time':>10}",
    ]
    for p in result["paths"]:
        lines.append(
            f"  {p['path']:<22}{p['peak_mb']:>10.0f}{1e3 * p['seconds']:>10.0f}{base['seconds'] / p['seconds']:>10.2f}"
        )
    beat = sum(ppl < ce for name, ppl in result["students"].items() if name != "CE only")
    lines += [
        "",
        f"distilled students beat the CE-only student on held-out perplexity for {beat} of "
        f"{len(result['students']) - 1} methods ({result['minutes']:.1f} minutes in all)",
    ]
    return "\n".join(lines)


def main(args) -> int:
    """Runs ``python -m kdkernels demo lm`` (``args`` as parsed by kdkernels.__main__); returns the exit code."""
    if getattr(args, "cross_tokenizer", False):
        from .demo_cross_tokenizer import main as cross_tokenizer_main

        return cross_tokenizer_main(args)
    s = QUICK if args.quick else Schedule()
    if args.steps is not None:
        s = replace(s, student_steps=args.steps, teacher_steps=2 * args.steps)
    methods = list(dict.fromkeys(args.methods or DEFAULT_METHODS))
    print(
        f"teacher hidden {s.teacher_hidden} x {s.layers} layers, {s.teacher_steps} steps; students hidden "
        f"{s.student_hidden}, {s.student_steps} steps; batches of {s.batch} x {s.block} tokens; loss = "
        f"{LOSS_OPTIONS['ce_weight']} CE + {LOSS_OPTIONS['distill_weight']} method (T = 1) on the fused-linear "
        "path",
        flush=True,
    )
    print(
        "precision: bf16 autocast (this CPU computes bfloat16)"
        if cpu_bf16()
        else "precision: float32 (this CPU does not compute bfloat16: no bf16 autocast)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as out:
        result = run(s, methods, out, progress=not args.no_progress)
    print(format_result(s, result))
    return 0
