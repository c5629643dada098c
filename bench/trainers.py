"""One training step of the LLM distillation trainers on CPU, side by side on the same models and batch.

    python bench/trainers.py [--out DIR] [--steps 3] [--rows NAME ...]

kdkernels' ``KDTrainer`` off-policy (the dataset's completions) and on-policy (``lmbda=1``: the student's samples),
and kdkernels' ``GKDTrainer``, against TRL's own ``DistillationTrainer`` (always on-policy, its chunked loss; also
under ``patch_trl()``) and ``GKDTrainer`` (full logits; ``lmbda`` 0 and 1). Every row distils with the generalized
JSD at beta = 0.5, T = 1 (the loss every one of them has), float32, no gradient checkpointing, one process.

Models: Llama-architecture from a config, random weights with the same seeds in every row: a student of hidden 256 and
a teacher of hidden 512, 4 layers each, vocabulary V. Batch: B prompts of P random tokens; the off-policy rows train
on them followed by C random completion tokens (labels on the completions only), the on-policy rows sample C tokens
after them (plain sampling at temperature 1; an end-of-sequence token may end a completion early, TRL's rows
included, with the same small chance in each).

A step is ``trainer.training_step`` on one batch (generation where the trainer samples, both forwards, the loss,
backward; no optimiser step), the gradients dropped before it. Each row runs in a fresh process: one warm-up step,
then the resident memory one step adds at its peak (``kdkernels.bench.peak_rss_bytes``) and the median seconds of
``--steps`` more. Writes trainers.txt (the table) and trainers.csv under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

V, B, P, C = 16384, 8, 32, 64  # vocabulary, prompts per batch, prompt tokens, completion tokens
STUDENT, TEACHER, LAYERS = 256, 512, 4
ROWS = {
    "kdkernels KDTrainer, off-policy": ("kd", 0.0),
    "kdkernels KDTrainer, on-policy": ("kd", 1.0),
    "kdkernels GKDTrainer, lmbda=0": ("gkd", 0.0),
    "kdkernels GKDTrainer, lmbda=1": ("gkd", 1.0),
    "TRL GKDTrainer, lmbda=0": ("trl-gkd", 0.0),
    "TRL GKDTrainer, lmbda=1": ("trl-gkd", 1.0),
    "TRL DistillationTrainer (on-policy)": ("trl", 1.0),
    "TRL DistillationTrainer + patch_trl()": ("trl-patched", 1.0),
}


def causal_lm(hidden: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=LAYERS,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2 * (P + C),
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=1,
    )
    return transformers.LlamaForCausalLM(config)


def tokenizer():
    """A word-level tokenizer of V tokens t0 ... (t1 padding, t2 end of sequence), left padding (TRL's)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t1", eos_token="t2", unk_token="t0", padding_side="left"
    )


def rows() -> list[dict]:
    """B pre-tokenized rows: P prompt tokens then C completion tokens (labels -100 on the prompt); tokens >= 3."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (B, P + C), generator=g)
    labels = ids.clone()
    labels[:, :P] = -100
    mask = [1] * (P + C)
    return [{"input_ids": i.tolist(), "attention_mask": mask, "labels": y.tolist()} for i, y in zip(ids, labels)]


def collate(batch: list[dict]) -> dict:
    """Tensors of pre-tokenized rows, with GKD's prompts (the first P tokens)."""
    out = {k: torch.tensor([r[k] for r in batch]) for k in ("input_ids", "attention_mask", "labels")}
    return {**out, "prompts": out["input_ids"][:, :P], "prompt_attention_mask": out["attention_mask"][:, :P]}


COMMON = dict(
    report_to="none", use_cpu=True, save_strategy="no", bf16=False, per_device_train_batch_size=B,
    gradient_checkpointing=False, disable_tqdm=True, seed=0,
)  # fmt: skip


def build(kind: str, lmbda: float, out: str):
    """(trainer, one batch as its training_step takes it) for a row."""
    student, teacher = causal_lm(STUDENT, 1), causal_lm(TEACHER, 0).eval()
    if kind == "kd":
        from kdkernels.integrations.transformers import KDConfig, KDTrainer

        args = KDConfig(output_dir=out, method="jsd", method_kwargs={"beta": 0.5}, lmbda=lmbda, max_new_tokens=C,
                        **COMMON)  # fmt: skip
        trainer = KDTrainer(student, teacher, args, train_dataset=rows(), data_collator=collate)
        return trainer, collate(rows())
    if kind in ("gkd", "trl-gkd"):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig
        from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

        from kdkernels.integrations.trl import GKDTrainer

        cls = GKDTrainer if kind == "gkd" else TRLGKDTrainer
        args = GKDConfig(output_dir=out, lmbda=lmbda, beta=0.5, temperature=1.0, max_new_tokens=C, **COMMON)
        trainer = cls(model=student, teacher_model=teacher, args=args, processing_class=tokenizer(),
                      train_dataset=Dataset.from_list(rows()), data_collator=collate)  # fmt: skip
        return trainer, collate(rows())
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    if kind == "trl-patched":
        from kdkernels.integrations.trl import patch_trl

        patch_trl()
    prompts = [" ".join(f"t{i}" for i in r["input_ids"][:P]) for r in rows()]
    args = DistillationConfig(output_dir=out, beta=0.5, temperature=1.0, max_completion_length=C, learning_rate=1e-5,
                              **COMMON)  # fmt: skip
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer(),
                                  train_dataset=Dataset.from_dict({"prompt": prompts}))  # fmt: skip
    return trainer, next(iter(trainer.get_train_dataloader()))


def measure(name: str, steps: int) -> dict:
    """Peak MB a step adds and the median seconds of ``steps`` steps of row ``name`` (in this process)."""
    from kdkernels.bench import peak_rss_bytes

    kind, lmbda = ROWS[name]
    with tempfile.TemporaryDirectory() as out:
        trainer, batch = build(kind, lmbda, out)
        trainer.current_gradient_accumulation_steps = 1  # (Trainer.train sets it)
        model = trainer.model_wrapped

        def step():
            model.zero_grad(set_to_none=True)
            trainer.training_step(model, dict(batch) if isinstance(batch, dict) else list(batch), None)

        step()  # warm-up: the first allocation of the gradients and the allocator's pools
        peak = peak_rss_bytes(step)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"trainer": name, "peak_mb": peak / 2**20, "seconds": statistics.median(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/trainers")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="NAME")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # (one row, in a child process)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(args.row, args.steps)))
        return 0
    results = []
    for name in args.rows:
        done = subprocess.run(
            [sys.executable, __file__, "--row", name, "--steps", str(args.steps)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]['peak_mb']:.0f} MB, {results[-1]['seconds']:.3f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trainers.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trainer", "peak_mb", "seconds"])
        writer.writeheader()
        writer.writerows(results)
    lines = [
        f"one training step (B = {B} prompts of {P} tokens + {C} completion tokens, V = {V}; student hidden "
        f"{STUDENT}, teacher {TEACHER}, {LAYERS} layers; jsd beta 0.5, T = 1; float32; median of {args.steps})",
        f"{'trainer':<40}{'peak MB':>10}{'s / step':>10}",
    ]
    lines += [f"{r['trainer']:<40}{r['peak_mb']:>10.0f}{r['seconds']:>10.3f}" for r in results]
    with open(os.path.join(args.out, "trainers.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
