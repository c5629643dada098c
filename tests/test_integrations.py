"""Trainer integrations on tiny random causal LMs: every loss equals the eager recipe a user would write (full logits
from each model's own forward, then kdkernels' reference loss), value and gradients, and TRL's own losses.

The integrations need the ``llm`` extra (transformers, trl), which scripts/setup.sh installs: a missing package is an
error, not a skip, unless KDKERNELS_NO_LLM=1 says the environment has none (the GPU machine, which has no network).
"""

import copy
import json
import math
import os
import warnings

import pytest
import torch

if os.environ.get("KDKERNELS_NO_LLM") == "1":
    pytest.skip("KDKERNELS_NO_LLM=1: transformers / trl are not installed here", allow_module_level=True)

import transformers  # noqa: E402
from helpers import assert_close  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels.integrations.transformers import (  # noqa: E402
    KDConfig,
    KDTrainer,
    LMHead,
    distill_in_forward,
    final_hidden_states,
    prompts_of,
)

V = 61
SMALL = dict(
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


def causal_lm(kind="llama", hidden=16, vocab=V, seed=0, **config):
    """A tiny random causal LM: Llama, Gemma 2 (final softcap), Cohere (logit scale) or Granite (logits scaling)."""
    classes = {"llama": "Llama", "gemma2": "Gemma2", "cohere": "Cohere", "granite": "Granite"}
    name = classes[kind]
    extra = {"head_dim": 8} if kind == "gemma2" else {}
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{name}Config")(vocab_size=vocab, hidden_size=hidden, **SMALL, **extra, **config)
    model = getattr(transformers, f"{name}ForCausalLM")(cfg)
    with torch.no_grad():  # a head whose logits spread over several units (random init gives ~0.02)
        model.get_output_embeddings().weight.mul_(40)
    return model.float()


def batch(n=2, length=9, seed=1, ignored=((0, 0), (0, 1), (1, 5))):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (n, length), generator=g)
    labels = input_ids.clone()
    for row, col in ignored:
        labels[row, col] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


# The trainer's defaults (TRL / Liger's convention), where a method's own defaults differ (kd: T = 4 with T^2).
TRAINER_DEFAULTS = {"temperature": 1.0, "t2_scale": False}


def eager_loss(method, student, teacher, inputs, normalizer=None, reduction="batchmean", **options):
    """What a user writes without kdkernels' fused-linear path: both models' full logits, shifted, then the loss."""
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    s = student(**model_inputs).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**model_inputs).logits[:, :-1, : s.shape[-1]]
    return kdkernels.distill_loss(
        method,
        s.double(),
        t.double(),
        inputs["labels"][:, 1:],
        normalizer=normalizer,
        reduction=reduction,
        backend="reference",
        **{**TRAINER_DEFAULTS, **options},
    )


CONFIG_FIELDS = {"temperature", "t2_scale", "ce_weight", "distill_weight", "standardize", "log_entropy", "backend"}


def config(tmp_path, method="kd", loss_options=None, **args):
    """A KDConfig for the tests: ``loss_options`` holds KDConfig's loss fields and the method's hyperparameters."""
    options = dict(loss_options or {})
    fields = {k: options.pop(k) for k in list(options) if k in CONFIG_FIELDS}
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=2,
        disable_tqdm=True,
    )
    return KDConfig(**{**defaults, **args}, method=method, method_kwargs=options, **fields)


def trainer(student, teacher, tmp_path, method="kd", loss_options=None, train_dataset=None, eval_dataset=None, **args):
    return KDTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, method, loss_options, **args),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_step_is_eager(tr, student, teacher, inputs, method, seed=None, **options):
    """The trainer's loss on ``inputs`` and every gradient of its model equal the eager recipe's on ``student``
    (a copy of the trainer's model), both run from RNG state ``seed`` when given (dropout); returns the eager
    gradients."""
    if seed is not None:
        torch.manual_seed(seed)
    loss = tr.compute_loss(tr.model, inputs)
    loss.backward()
    if seed is not None:
        torch.manual_seed(seed)
    want = eager_loss(method, student, teacher, inputs, **options)
    want.backward()
    assert_close(loss, want.detach().numpy(), torch.float32, "loss")
    got, expected = grads(tr.model), grads(student)
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name].numpy(), torch.float32, name)
    return expected


@pytest.mark.parametrize(
    "method,options",
    [
        ("kd", {}),
        ("jsd", {"beta": 0.3, "ce_weight": 0.5}),
        ("dkd", {"temperature": 2.0}),
        ("rkl", {"ce_weight": 1.0, "distill_weight": 0.2}),
    ],
)
def test_compute_loss_equals_eager_recipe(method, options, tmp_path):
    """The trainer's loss and every student gradient equal the eager recipe's; the teacher gets none."""
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    inputs = batch()
    tr = trainer(copy.deepcopy(student), teacher, tmp_path, method, options)
    assert "lm_head.weight" in assert_step_is_eager(tr, student, teacher, inputs, method, **options)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_label_smoothing_factor_is_transformers_label_smoother(tmp_path):
    """TrainingArguments.label_smoothing_factor smooths the trainer's cross-entropy term as transformers' own
    LabelSmoother does on the same logits (loss and gradient); without the term it is refused at construction."""
    from transformers.trainer_pt_utils import LabelSmoother

    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    inputs = batch()
    options = {"ce_weight": 1.0, "distill_weight": 0.0}
    tr = trainer(copy.deepcopy(student), teacher, tmp_path, "kd", options, label_smoothing_factor=0.1)
    loss = tr.compute_loss(tr.model, inputs)
    loss.backward()
    logits = student(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    want = LabelSmoother(epsilon=0.1)({"logits": logits}, inputs["labels"], shift_labels=True)
    want.backward()
    assert_close(loss, want.item(), torch.float32, "loss")
    for name, g in grads(student).items():
        assert_close(grads(tr.model)[name], g.numpy(), torch.float32, name)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 smooths the cross-entropy term"):
        trainer(copy.deepcopy(student), teacher, tmp_path, "kd", label_smoothing_factor=0.1)


@pytest.mark.parametrize(
    "student_kind,teacher_kind",
    [("gemma2", "llama"), ("llama", "gemma2"), ("cohere", "granite"), ("granite", "cohere")],
)
def test_head_scaling_and_softcap_from_the_configs(student_kind, teacher_kind, tmp_path):
    """Each model's logits as its own forward computes them: Gemma 2's final softcap, Cohere's logit_scale and
    Granite's logits_scaling, read from each config (tied embeddings included: Gemma 2 and Cohere tie)."""
    config = {
        "gemma2": {"final_logit_softcapping": 2.0},
        "cohere": {"logit_scale": 0.5},
        "granite": {"logits_scaling": 4.0},
        "llama": {},
    }
    student = causal_lm(student_kind, **config[student_kind])
    teacher = causal_lm(teacher_kind, hidden=24, seed=1, **config[teacher_kind])
    inputs = batch()
    options = {"beta": 0.4, "ce_weight": 0.3, "temperature": 2.0}
    tr = trainer(copy.deepcopy(student), teacher, tmp_path, "jsd", options)
    loss = tr.compute_loss(tr.model, inputs)
    loss.backward()
    want = eager_loss("jsd", student, teacher, inputs, **options)
    want.backward()
    assert_close(loss, want.detach().numpy(), torch.float32, "loss")
    for name, g in grads(student).items():
        assert_close(grads(tr.model)[name], g.numpy(), torch.float32, name)
    head = LMHead.of(student)
    assert (head.softcap, head.logit_scale) == {
        "gemma2": (2.0, 1.0),
        "cohere": (None, 0.5),
        "granite": (None, 0.25),
        "llama": (None, 1.0),
    }[student_kind]


def test_padded_teacher_vocabulary_is_renormalised(tmp_path):
    """A teacher with more vocabulary rows than the student (padded embeddings) is read on the student's classes."""
    student, teacher = causal_lm(), causal_lm(hidden=24, vocab=V + 3, seed=1)
    inputs = batch()
    tr = trainer(copy.deepcopy(student), teacher, tmp_path, "kd")
    loss = tr.compute_loss(tr.model, inputs)
    assert_close(loss, eager_loss("kd", student, teacher, inputs).detach().numpy(), torch.float32, "loss")
    with pytest.raises(ValueError, match="teacher_model: its vocabulary \\(61 classes\\) is smaller.*\\(64\\)"):
        trainer(causal_lm(vocab=V + 3), causal_lm(hidden=24, seed=1), tmp_path, "kd")  # (at construction)


def test_final_hidden_states_feed_the_head():
    """The hidden states the loss reads are those the model's own head projects (after the final norm), and
    LMHead's logits (scale, softcap) are the model's."""
    for model in (causal_lm("gemma2", final_logit_softcapping=2.0), causal_lm("granite", logits_scaling=4.0)):
        inputs = {k: v for k, v in batch().items() if k != "labels"}
        logits = LMHead.of(model).logits(final_hidden_states(model, inputs))
        torch.testing.assert_close(logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_train_with_gradient_accumulation_equals_one_full_batch(tmp_path):
    """Trainer.train(): one optimizer step over 2 accumulated micro-batches of uneven token counts is one SGD step
    on the loss of the 4 sequences, summed over their tokens / the tokens of the whole step (num_items_in_batch)."""
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    rows = [batch(1, 9, seed=s, ignored=[(0, c) for c in range(s)]) for s in range(4)]  # 0..3 ignored labels each
    dataset = [{k: v[0] for k, v in row.items()} for row in rows]
    options = {"ce_weight": 0.5, "temperature": 2.0}
    tr = trainer(
        copy.deepcopy(student),
        teacher,
        tmp_path,
        "kd",
        options,
        train_dataset=dataset,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
    )
    tr.train()
    full = {k: torch.cat([row[k] for row in rows]) for k in rows[0]}
    tokens = (full["labels"][:, 1:] != -100).sum()
    eager_loss("kd", student, teacher, full, normalizer=float(tokens), **options).backward()
    trained = dict(tr.model.named_parameters())
    for name, p in student.named_parameters():
        assert_close(trained[name].detach() - p.detach(), (-0.5 * p.grad).numpy(), torch.float32, name)
    logged = tr.state.log_history[0]
    assert {"loss", "distill", "ce"} <= logged.keys()


def test_logged_terms_are_the_losss_parts(tmp_path):
    """The logged distill and ce of a batch are its terms as they enter the loss (here over num_items_in_batch
    tokens); the entropy is the student's mean over the batch's tokens."""
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    inputs = batch()
    tr = trainer(student, teacher, tmp_path, "kd", {"ce_weight": 0.5, "log_entropy": True})
    tr.compute_loss(tr.model, inputs, num_items_in_batch=torch.tensor(7))
    logs = {}
    tr.log(logs)
    want = eager_loss("kd", student, teacher, inputs, ce_weight=0.5, normalizer=7.0, return_parts=True)
    assert_close(torch.tensor(logs["distill"]), want.distill.detach().numpy(), torch.float32, "distill")
    assert_close(torch.tensor(logs["ce"]), want.ce.detach().numpy(), torch.float32, "ce")
    s = student(input_ids=inputs["input_ids"]).logits[:, :-1].double()
    valid = inputs["labels"][:, 1:] != -100
    entropy = torch.special.entr(torch.softmax(s, -1)).sum(-1)[valid].mean()
    assert_close(torch.tensor(logs["entropy"]), entropy.detach().numpy(), torch.float32, "entropy")


@pytest.mark.parametrize("step_normalised", [True, False])
def test_logged_loss_adds_up(step_normalised, tmp_path):
    """Over a logging window of 2 steps of 2 accumulated batches with uneven token counts (and in evaluation,
    batches of uneven token counts), the logs keep loss = ce_weight * ce + distill_weight * distill, whether the
    loss divides by the step's tokens (num_items_in_batch) or by each batch's (the Trainer then divides by the
    accumulation steps)."""
    rows = [batch(1, 9, seed=s, ignored=[(0, c) for c in range(2 * s)]) for s in range(4)]  # 8, 7, 5, 3 labels
    data = [{k: v[0] for k, v in row.items()} for row in rows]
    options = {"ce_weight": 0.3, "distill_weight": 0.7, "beta": 0.4}
    args = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2, logging_steps=2)
    tr = trainer(causal_lm(), causal_lm(hidden=24, seed=1), tmp_path, "jsd", options, data, data, **args)
    tr.model_accepts_loss_kwargs = step_normalised  # (False: the Trainer passes no num_items_in_batch)
    tr.train()
    metrics = tr.evaluate(eval_dataset=data)
    (logged,) = [log for log in tr.state.log_history if "loss" in log]
    for prefix, log in (("", logged), ("eval_", metrics)):
        parts = 0.3 * log[prefix + "ce"] + 0.7 * log[prefix + "distill"]
        assert abs(log[prefix + "loss"] - parts) <= 1e-5 * abs(parts), (prefix, log)


def test_a_batch_without_labels_warns_once(tmp_path):
    """A batch whose labels are all -100 trains nothing: the first log after it warns, once."""
    rows = [batch(1, 9, seed=s, ignored=[(0, c) for c in range(9 if s == 1 else 0)]) for s in range(4)]
    data = [{k: v[0] for k, v in row.items()} for row in rows]
    args = dict(per_device_train_batch_size=1, max_steps=4, logging_steps=1)
    tr = trainer(causal_lm(), causal_lm(hidden=24, seed=1), tmp_path, "kd", train_dataset=data, **args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.train()
    messages = [str(w.message) for w in caught if "no token with a label" in str(w.message)]
    assert messages == ["KDTrainer: 1 batch(es) had no token with a label (every label -100): their loss is 0 and "
                        "they train nothing. Check the collator's labels (prompt masking, truncation to max_length, "
                        "padding)"]  # fmt: skip


def test_evaluate_and_outputs(tmp_path):
    """Trainer.evaluate() takes the same loss (and logs its terms); return_outputs gives the student's logits."""
    student, teacher = causal_lm("gemma2", final_logit_softcapping=3.0), causal_lm(hidden=24, seed=1)
    inputs = batch()
    dataset = [{k: v[i] for k, v in inputs.items()} for i in range(2)]
    tr = trainer(
        student, teacher, tmp_path, "dkd", {"ce_weight": 0.5}, eval_dataset=dataset, per_device_eval_batch_size=2
    )
    metrics = tr.evaluate()
    want = eager_loss("dkd", student, teacher, inputs, ce_weight=0.5, return_parts=True)
    assert_close(torch.tensor(metrics["eval_loss"]), want.loss.detach().numpy(), torch.float32, "eval_loss")
    assert_close(torch.tensor(metrics["eval_ce"]), want.ce.detach().numpy(), torch.float32, "eval_ce")
    loss, outputs = tr.compute_loss(tr.model, inputs, return_outputs=True)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    torch.testing.assert_close(outputs.logits, student(**model_inputs).logits, rtol=1e-5, atol=1e-5)


def one_step_args(**args):
    """Training arguments of one plain SGD step (a parameter moves by -lr * its gradient)."""
    return dict(
        max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, **args,
    )  # fmt: skip


def dataset_of(inputs):
    return [{k: v[i] for k, v in inputs.items()} for i in range(inputs["input_ids"].shape[0])]


def record_dtype(model, seen, name):
    """Records the output dtype of the first layer's MLP down projection at each forward."""
    layer = model.get_decoder().layers[0].mlp.down_proj
    layer.register_forward_hook(lambda module, args, out: seen.setdefault(name, []).append(out.dtype))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_runs_the_layers_as_a_plain_trainer(precision, tmp_path):
    """Under bf16=True / fp16=True the student's layers compute in the dtype a plain transformers.Trainer's do
    (bfloat16 under bf16; on CPU accelerate has no fp16 autocast, so float32 there), the teacher's under the same
    autocast, and the loss is the eager recipe's under that autocast."""
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    inputs = batch()
    seen = {}
    plain_student = copy.deepcopy(student)
    record_dtype(plain_student, seen, "plain")
    plain_args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=2, **one_step_args(**{precision: True}),
    )  # fmt: skip
    transformers.Trainer(model=plain_student, args=plain_args, train_dataset=dataset_of(inputs)).train()
    args = one_step_args(**{precision: True})
    tr = trainer(student, teacher, tmp_path, "kd", {"ce_weight": 0.5}, dataset_of(inputs), **args)
    record_dtype(student, seen, "student")  # (after the construction, which runs one token through each model)
    record_dtype(teacher, seen, "teacher")
    tr.train()
    half = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen["plain"] == seen["student"] == seen["teacher"] == [half]
    with tr.compute_loss_context_manager():
        loss = tr.compute_loss(tr.model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        want = eager_loss("kd", tr.model, teacher, inputs, ce_weight=0.5)
    assert_close(loss, want.detach().numpy(), half, "loss")


def test_half_precision_models_and_heads_as_they_come(tmp_path):
    """A bfloat16 student against a float32 teacher (and the reverse): the fused-linear loss reads each model's
    hidden states and head in its own dtype; loss and gradients are the eager recipe's at bfloat16 precision."""
    for student_dtype, teacher_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        student, teacher = causal_lm().to(student_dtype), causal_lm(hidden=24, seed=1).to(teacher_dtype)
        inputs = batch()
        tr = trainer(copy.deepcopy(student), teacher, tmp_path, "jsd", {"beta": 0.3, "ce_weight": 0.5})
        loss = tr.compute_loss(tr.model, inputs)
        loss.backward()
        want = eager_loss("jsd", student, teacher, inputs, beta=0.3, ce_weight=0.5)
        want.backward()
        assert_close(loss, want.detach().numpy(), torch.bfloat16, "loss")
        got = grads(tr.model)
        for name in ("lm_head.weight", "model.layers.0.mlp.down_proj.weight"):
            assert got[name].dtype == student_dtype
            assert_close(got[name].float(), grads(student)[name].float().numpy(), torch.bfloat16, name)


def test_torch_compile_compiles_the_students_forward(tmp_path):
    """torch_compile=True: dynamo compiles the student's forward with the loss (frames compiled, no graph break),
    and the step is the uncompiled trainer's."""
    import torch._dynamo

    student, teacher = causal_lm("gemma2", final_logit_softcapping=3.0), causal_lm(hidden=24, seed=1)
    inputs = batch()
    trained = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        args = one_step_args(torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None)
        tr = trainer(copy.deepcopy(student), teacher, tmp_path, "dkd", {"ce_weight": 0.5}, dataset_of(inputs), **args)
        tr.train()
        trained.append(dict(tr.model.named_parameters()))
    counters = torch._dynamo.utils.counters
    assert counters["frames"]["ok"] >= 1 and counters["stats"]["unique_graphs"] >= 1, dict(counters["frames"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for name, p in trained[0].items():
        assert_close(trained[1][name].detach(), p.detach().numpy(), torch.float32, name)


def test_loss_path_compiles_fullgraph():
    """distill_in_forward (both backbones, heads and the fused-linear loss) compiles with fullgraph=True: no graph
    break; loss and gradients are the eager call's."""
    import torch._dynamo

    torch._dynamo.reset()
    student, teacher = causal_lm("gemma2", final_logit_softcapping=3.0), causal_lm(hidden=24, seed=1)
    inputs = batch()

    def loss(input_ids):
        target, options = inputs["labels"][:, 1:], {"ce_weight": 0.5, "temperature": 2.0}
        model_inputs = {"input_ids": input_ids}
        return distill_in_forward(student, teacher, model_inputs, "wsd", target, slice(None, -1), **options)[0]

    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(inputs["input_ids"])
    got.backward()
    compiled = grads(student)
    student.zero_grad()
    want = loss(inputs["input_ids"])
    want.backward()
    assert_close(got, want.detach().numpy(), torch.float32, "loss")
    for name, g in grads(student).items():
        assert_close(compiled[name], g.numpy(), torch.float32, name)


def peft_causal_lm(seed=0, **lora):
    """A tiny Llama wrapped by peft LoRA, its B matrices random (peft starts them at 0: no effect to test)."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    torch.manual_seed(seed + 10)
    return peft.get_peft_model(causal_lm(seed=seed), config)


def lora_parameters(model, module):
    return {name: p for name, p in model.named_parameters() if module in name and "lora_" in name}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_on_lm_head_enters_the_loss(dropout, tmp_path):
    """LoRA on q_proj and lm_head: the loss is the eager recipe's on the PeftModel's own logits (W x + scaling
    B A dropout(x), the dropout drawn as peft draws it), every adapter's gradient too, and a step moves the head's
    adapter."""
    student, teacher = peft_causal_lm(target_modules=["q_proj", "lm_head"], lora_dropout=dropout), causal_lm(seed=1)
    inputs = batch()
    tr = trainer(student, teacher, tmp_path, "akl", {"ce_weight": 0.5}, dataset_of(inputs), **one_step_args())
    expected = assert_step_is_eager(tr, copy.deepcopy(student), teacher, inputs, "akl", seed=7, ce_weight=0.5)
    assert any("lm_head.lora_B" in name for name in expected)
    tr.model.zero_grad()
    before = {name: p.detach().clone() for name, p in lora_parameters(tr.model, "lm_head").items()}
    tr.train()
    assert len(before) == 2
    for name, p in lora_parameters(tr.model, "lm_head").items():
        assert not torch.equal(p.detach(), before[name]), name


def test_peft_modules_to_save_and_peft_config(tmp_path):
    """modules_to_save=["lm_head"] trains peft's copy of the head on the PeftModel's own logits; peft_config=
    wraps a plain student as TRL's trainers do."""
    import peft

    student, teacher = peft_causal_lm(target_modules=["q_proj"], modules_to_save=["lm_head"]), causal_lm(seed=1)
    inputs = batch()
    tr = trainer(copy.deepcopy(student), teacher, tmp_path, "kd")
    assert any("modules_to_save" in name for name in assert_step_is_eager(tr, student, teacher, inputs, "kd"))

    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    wrapped = KDTrainer(causal_lm(), causal_lm(seed=1), config(tmp_path), peft_config=lora)
    assert isinstance(wrapped.model, peft.PeftModel)
    trainable = {name for name, p in wrapped.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_peft_refusals(tmp_path):
    """Prompt learning (its virtual tokens come from PeftModel.forward, which the loss replaces) and LoRA variants
    on the head (not one linear map) are refused at construction, naming what to use instead."""
    import peft

    teacher = causal_lm(seed=1)
    prompt_tuning = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    with pytest.raises(ValueError, match="prompt learning \\(PROMPT_TUNING\\)"):
        KDTrainer(causal_lm(), teacher, config(tmp_path), peft_config=prompt_tuning)
    prefix = peft.get_peft_model(causal_lm(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="prompt learning \\(PREFIX_TUNING\\)"):
        KDTrainer(prefix, teacher, config(tmp_path))
    with pytest.raises(ValueError, match="peft_config: the model already has peft adapters"):
        KDTrainer(peft_causal_lm(target_modules=["q_proj"]), teacher, config(tmp_path), peft_config=prompt_tuning)
    dora = peft_causal_lm(target_modules=["lm_head"], use_dora=True)
    with pytest.raises(ValueError, match="DoraLinearVariant.*LoRA variant.*use_dora=False"):
        KDTrainer(dora, teacher, config(tmp_path))


def test_teacher_from_a_local_directory(tmp_path):
    """teacher_model as a local path is loaded by AutoModelForCausalLM.from_pretrained with
    teacher_model_init_kwargs (no download): the loss is the eager recipe's with that teacher, in its dtype."""
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    inputs = batch()
    tr = trainer(copy.deepcopy(student), str(tmp_path / "teacher"), tmp_path, "wsd", {"ce_weight": 0.5})
    assert type(tr.teacher_model) is type(teacher) and not tr.teacher_model.training
    assert_step_is_eager(tr, student, teacher, inputs, "wsd", ce_weight=0.5)
    tr = trainer(student, str(tmp_path / "teacher"), tmp_path, teacher_model_init_kwargs={"dtype": "bfloat16"})
    assert tr.teacher_model.dtype == torch.bfloat16
    assert torch.isfinite(tr.compute_loss(tr.model, inputs))


def test_teacher_and_student_refusals(tmp_path):
    """At construction, a ValueError naming the argument, the models and sizes, and what to do: a model without an
    LM head, hidden states that cannot reach the head, a smaller teacher vocabulary, init kwargs for a model."""
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    backbone = transformers.LlamaModel(teacher.config)
    with pytest.raises(ValueError, match="teacher_model: LlamaModel has no output embedding.*AutoModelForCausalLM"):
        trainer(student, backbone, tmp_path)
    with pytest.raises(ValueError, match="model: LlamaModel has no output embedding"):
        trainer(transformers.LlamaModel(student.config), teacher, tmp_path)
    with pytest.raises(ValueError, match="teacher_model: its vocabulary \\(58 classes\\) is smaller.*\\(61\\)"):
        trainer(student, causal_lm(vocab=V - 3, seed=1), tmp_path)
    wide = causal_lm(hidden=24, seed=1)
    wide.lm_head = torch.nn.Linear(32, V, bias=False)
    with pytest.raises(ValueError, match="teacher_model: the hidden states of LlamaForCausalLM.*24 wide.*reads 32"):
        trainer(student, wide, tmp_path)
    with pytest.raises(ValueError, match="teacher_model_init_kwargs apply to a teacher_model given by model id"):
        trainer(student, teacher, tmp_path, teacher_model_init_kwargs={"dtype": "bfloat16"})


def test_prompts_of_a_batch():
    """A batch's prompts: each row's tokens before its first label (at least the first token), left-padded, its
    padding left out; a collator's prompts as they are."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 8, 0, 0], [3, 4, 5, 6, 7, 8]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, -100], [-100, 6, 7, 8, -100, -100], [3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    prompts, prompt_mask = prompts_of({"input_ids": ids, "labels": labels, "attention_mask": mask}, pad_token_id=1)
    assert prompts.tolist() == [[5, 6, 7], [1, 1, 5], [1, 1, 3]]
    assert prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1]]
    left = {"input_ids": torch.tensor([[0, 0, 5, 6, 7]]), "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])}
    shift_labels = torch.tensor([[-100, -100, -100, 7, -100]])  # (labels 6 and 7 of tokens 3 and 4)
    assert prompts_of({**left, "shift_labels": shift_labels}, 1)[0].tolist() == [[5, 6]]
    given = {"prompts": ids[:, :2], "prompt_attention_mask": mask[:, :2]}
    assert prompts_of({**given, "input_ids": ids, "labels": labels}, 1)[0] is given["prompts"]


def recorded_batches(tr):
    """Records each batch compute_loss receives in training, with the source of its completions."""
    seen = []
    compute_loss = tr.compute_loss

    def recording(model, inputs, *args, **kwargs):
        if model.training:
            seen.append((getattr(tr, "_source", None), {k: v.clone() for k, v in inputs.items()}))
        return compute_loss(model, inputs, *args, **kwargs)

    tr.compute_loss = recording
    return seen


@pytest.mark.parametrize("method,options", [("akl", {"temperature": 2.0}), ("wsd", {}), ("dkd", {"ce_weight": 0.5})])
def test_on_policy_step(method, options, tmp_path):
    """lmbda=1: the step trains on the student's own completions of the batch's prompts (max_new_tokens tokens),
    the loss on those tokens only (dkd's target: the sampled token), and the update is one SGD step on the eager
    recipe's loss of that batch."""
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    inputs = batch(ignored=((0, 0), (0, 1), (0, 2), (1, 0), (1, 5)))  # prompts of 3 and 1 tokens
    args = one_step_args(lmbda=1.0, max_new_tokens=4, sampling_temperature=0.7)
    tr = trainer(copy.deepcopy(student), teacher, tmp_path, method, options, dataset_of(inputs), **args)
    seen = recorded_batches(tr)
    tr.train()
    ((source, sampled),) = seen
    assert source == "student"
    prompts, prompt_mask = prompts_of(inputs, tr.generation_config.pad_token_id)
    assert torch.equal(sampled["input_ids"][:, :3], prompts) and sampled["input_ids"].shape == (2, 3 + 4)
    assert torch.equal(sampled["attention_mask"], torch.cat([prompt_mask, torch.ones(2, 4, dtype=torch.long)], 1))
    assert (sampled["labels"][:, :3] == -100).all()
    assert torch.equal(sampled["labels"][:, 3:], sampled["input_ids"][:, 3:])
    eager_loss(method, student, teacher, sampled, **options).backward()
    trained = dict(tr.model.named_parameters())
    for name, p in student.named_parameters():
        assert_close(trained[name].detach() - p.detach(), (-0.5 * p.grad).numpy(), torch.float32, name)


def test_sampled_completions_and_the_schedule(tmp_path):
    """The completions are the student's (or with seq_kd the teacher's) samples at sampling_temperature, as
    model.generate draws them; lmbda draws once per optimiser step (both accumulated batches alike), the other
    steps train on the teacher's samples with seq_kd."""
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    inputs = batch(4, 6, ignored=((0, 0), (1, 0), (1, 1), (2, 0), (3, 0)))
    args = dict(lmbda=0.5, seq_kd=True, max_new_tokens=3, sampling_temperature=0.7, max_steps=6)
    tr = trainer(student, teacher, tmp_path, "kd", {}, dataset_of(inputs), per_device_train_batch_size=1,
                 gradient_accumulation_steps=2, **args)  # fmt: skip
    prompts, prompt_mask = prompts_of(inputs, tr.generation_config.pad_token_id)
    for model in (student, teacher):
        torch.manual_seed(3)
        got = tr.sampled_batch(model, inputs)
        torch.manual_seed(3)
        want = model.generate(
            input_ids=prompts, attention_mask=prompt_mask, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
            max_new_tokens=3, pad_token_id=tr.generation_config.pad_token_id,
        )  # fmt: skip
        assert torch.equal(got["input_ids"], want)
    seen = recorded_batches(tr)
    tr.train()
    sources = [source for source, _ in seen]
    assert sources[::2] == sources[1::2] and set(sources) == {"student", "teacher"}, sources


def test_bad_arguments(tmp_path):
    """Every refused configuration raises at construction (KDConfig's or the trainer's), naming the argument."""
    student, teacher = causal_lm(), causal_lm(seed=1)
    with pytest.raises(ValueError, match="teacher_model"):
        trainer(student, None, tmp_path)
    with pytest.raises(ValueError, match="beta"):
        config(tmp_path, "jsd", {"beta": 2.0})
    with pytest.raises(TypeError, match="unexpected hyperparameter"):
        config(tmp_path, "kd", {"beta": 0.5})
    with pytest.raises(TypeError, match="unexpected hyperparameter.*softcap"):  # (the trainer reads it from the config)
        config(tmp_path, "kd", {"softcap": 3.0})
    with pytest.raises(ValueError, match="method must be one of"):
        config(tmp_path, "kl")
    with pytest.raises(ValueError, match="chunk_size"):
        KDConfig(output_dir=str(tmp_path), chunk_size=0)
    with pytest.raises(ValueError, match="method_kwargs"):
        KDConfig(output_dir=str(tmp_path), method="jsd", method_kwargs="beta=0.5")
    with pytest.raises(TypeError, match="linear_distill_loss.*0-d tensor"):  # a learnable temperature
        KDConfig(output_dir=str(tmp_path), temperature=torch.tensor(2.0, requires_grad=True))
    with pytest.raises(TypeError, match="args must be a kdkernels KDConfig"):
        KDTrainer(student, teacher, transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    with pytest.raises(ValueError, match="backend must be"):
        trainer(student, teacher, tmp_path, "kd", {"backend": "fast"})
    tr = trainer(student, teacher, tmp_path, "kd")
    with pytest.raises(ValueError, match="labels"):
        tr.compute_loss(tr.model, {k: v for k, v in batch().items() if k != "labels"})


def test_kd_config_round_trips_through_a_checkpoint(tmp_path):
    """The loss options live in KDConfig: saved in every checkpoint's training_args.bin and its JSON, printed with
    the arguments, parsed from the command line (method_kwargs as a JSON object); defaults T = 1 without T^2."""
    defaults = KDConfig(output_dir=str(tmp_path))
    assert (defaults.method, defaults.temperature, defaults.t2_scale, defaults.method_kwargs) == ("kd", 1.0, False, {})
    (parsed,) = transformers.HfArgumentParser(KDConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--method", "jsd", "--method_kwargs", '{"beta": 0.3}', "--ce_weight", "0.5"]
    )
    assert (parsed.method, parsed.method_kwargs, parsed.ce_weight) == ("jsd", {"beta": 0.3}, 0.5)
    options = {"beta": 0.3, "ce_weight": 0.5, "temperature": 2.0, "t2_scale": True, "distill_weight": 0.7}
    dataset = [{k: v[0] for k, v in batch(1, 9, seed=s, ignored=[(0, 0)]).items()} for s in range(2)]
    tr = trainer(
        causal_lm(), causal_lm(seed=1), tmp_path, "jsd", options, train_dataset=dataset, max_steps=1,
        save_strategy="steps", save_steps=1, chunk_size=5, per_device_train_batch_size=1,
    )  # fmt: skip
    tr.train()
    saved = torch.load(tmp_path / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert isinstance(saved, KDConfig)
    as_json = json.loads(saved.to_json_string())
    for name, value in {**{k: v for k, v in options.items() if k != "beta"}, "chunk_size": 5}.items():
        assert getattr(saved, name) == as_json[name] == value, name
    assert saved.method == as_json["method"] == "jsd"
    assert saved.method_kwargs == as_json["method_kwargs"] == {"beta": 0.3}
    assert "method_kwargs={'beta': 0.3}" in str(tr.args)


def _ddp_worker(rank, world, init_file, out_dir):
    """One DDP process (gloo): the trainer's step over its half of the batch; rank 0 saves the trained student."""
    import datetime

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    rows, options = _ddp_case()
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    dataset = [{k: v[0] for k, v in row.items()} for row in rows]
    tr = trainer(
        student,
        teacher,
        out_dir,
        "jsd",
        options,
        train_dataset=dataset,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        ddp_backend="gloo",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    assert tr.accelerator.num_processes == world
    tr.train()
    if rank == 0:
        torch.save({name: p.detach() for name, p in tr.model.named_parameters()}, os.path.join(out_dir, "student.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # (as _fsdp_worker: skip the C++ teardown at interpreter exit)


def _ddp_case():
    rows = [batch(1, 9, seed=s, ignored=[(0, c) for c in range(2 * s)]) for s in range(4)]  # 0..6 ignored labels
    return rows, {"beta": 0.3, "ce_weight": 0.5}


def test_ddp_two_processes_equal_one_full_batch(tmp_path):
    """Under DDP (2 gloo processes, 2 accumulated micro-batches each), one step is one SGD step on the 4
    sequences' loss summed over their tokens / the tokens of all processes: the per-process normalizer is right."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    trained = torch.load(tmp_path / "student.pt")
    rows, options = _ddp_case()
    student, teacher = causal_lm(), causal_lm(hidden=24, seed=1)
    full = {k: torch.cat([row[k] for row in rows]) for k in rows[0]}
    tokens = (full["labels"][:, 1:] != -100).sum()
    eager_loss("jsd", student, teacher, full, normalizer=float(tokens), **options).backward()
    for name, p in student.named_parameters():
        assert_close(trained[name] - p.detach(), (-0.5 * p.grad).numpy(), torch.float32, name)


# ---------------------------------------------------------------------------------------------------------------
# TRL.
# ---------------------------------------------------------------------------------------------------------------

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDConfig  # noqa: E402
from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer  # noqa: E402
from trl.trainer import distillation_trainer  # noqa: E402

from kdkernels.integrations.trl import GKDTrainer, chunked_divergence_loss, patch_trl  # noqa: E402

TRL_LOSS = distillation_trainer._chunked_divergence_loss


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize(
    "temperature,caps,num_items",
    [(1.0, (None, None), None), (2.0, (3.0, None), 7), (0.7, (None, 2.5), None), (1.0, (2.0, 4.0), 5)],
)
def test_trl_chunked_divergence_loss_equals_trls(beta, temperature, caps, num_items):
    """chunked_divergence_loss returns what TRL's _chunked_divergence_loss returns (loss, entropy sum, token count)
    and the same gradients of the student's hidden states, head weight and bias."""
    g = torch.Generator().manual_seed(3)
    b, k, h_s, h_t = 2, 5, 6, 4
    student = [torch.randn(b, k, h_s, generator=g), torch.randn(V, h_s, generator=g) * 1.5, torch.randn(V, generator=g)]
    teacher = [torch.randn(b, k, h_t, generator=g), torch.randn(V, h_t, generator=g) * 1.5, torch.randn(V, generator=g)]
    mask = torch.ones(b, k, dtype=torch.long)
    mask[0, :2] = mask[1, 4] = 0
    results = []
    for loss_fn in (TRL_LOSS, chunked_divergence_loss):
        params = [x.clone().requires_grad_(True) for x in student]
        loss, entropy, n = loss_fn(
            params[0],
            teacher[0],
            params[1],
            teacher[1],
            mask,
            beta,
            num_items,
            params[2],
            teacher[2],
            0.8,
            1.3,
            caps[0],
            caps[1],
            temperature,
        )
        results.append((loss, entropy, n, torch.autograd.grad(loss * 1.7, params)))
    (want, want_entropy, want_n, want_grads), (got, got_entropy, got_n, got_grads) = results
    assert got_n == want_n == 7
    assert_close(got, want.detach().numpy(), torch.float32, "loss")
    assert_close(got_entropy, want_entropy.numpy(), torch.float32, "entropy sum")
    for name, a, e in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert_close(a, e.numpy(), torch.float32, name)


def test_patch_trl_swaps_the_loss_trl_calls():
    unpatch = patch_trl()
    try:
        assert distillation_trainer._chunked_divergence_loss.func is chunked_divergence_loss
        # The trainer looks the function up in its module at every step.
        assert "_chunked_divergence_loss" in distillation_trainer.DistillationTrainer._compute_loss.__code__.co_names
    finally:
        unpatch()
    assert distillation_trainer._chunked_divergence_loss is TRL_LOSS


def test_patch_trl_with_another_method():
    """patch_trl(method="akl", ...): the loss TRL's DistillationTrainer calls is akl at TRL's temperature without
    T^2 over the completion tokens (TRL's beta ignored), with its entropy sum and token count; methods that read
    the labels TRL does not pass, jsd with a beta of its own, and bad hyperparameters are refused."""
    g = torch.Generator().manual_seed(5)
    b, k, h_s, h_t = 2, 5, 6, 4
    hidden_s, weight_s = torch.randn(b, k, h_s, generator=g).requires_grad_(True), torch.randn(V, h_s, generator=g)
    hidden_t, weight_t = torch.randn(b, k, h_t, generator=g), torch.randn(V, h_t, generator=g) * 2
    mask = torch.ones(b, k, dtype=torch.long)
    mask[0, :2] = 0
    unpatch = patch_trl(method="akl", mu=0.4)
    try:
        loss, entropy, n = distillation_trainer._chunked_divergence_loss(
            hidden_s, hidden_t, weight_s, weight_t, mask, 0.9, temperature=1.5
        )
    finally:
        unpatch()
    s, t = (hidden_s @ weight_s.T).double(), (hidden_t @ weight_t.T).double()
    rows = kdkernels.distill_loss(
        "akl", s, t, reduction="none", temperature=1.5, t2_scale=False, mu=0.4, backend="reference"
    )
    want = rows[mask.bool()].sum() / mask.sum()
    assert n == 8
    assert_close(loss, want.detach().numpy(), torch.float32, "loss")
    (got_grad,) = torch.autograd.grad(loss, hidden_s)
    (want_grad,) = torch.autograd.grad(want, hidden_s)
    assert_close(got_grad, want_grad.numpy(), torch.float32, "hidden grad")
    entropies = torch.special.entr(torch.softmax(s / 1.5, -1)).sum(-1)[mask.bool()].sum()
    assert_close(entropy, entropies.detach().numpy(), torch.float32, "entropy")
    with pytest.raises(ValueError, match="method='dkd' reads each token's label"):
        patch_trl(method="dkd")
    with pytest.raises(ValueError, match="jsd's beta is the TRL config's beta"):
        patch_trl(method="jsd", beta=0.3)
    with pytest.raises(TypeError, match="unexpected hyperparameter"):
        patch_trl(method="akl", beta=0.3)
    assert distillation_trainer._chunked_divergence_loss is TRL_LOSS


def _gkd(cls, tmp_path, trainer_kwargs=None, **args):
    from datasets import Dataset
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(V)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t1", unk_token="t0"
    )
    rows = [
        {k: v[0].tolist() for k, v in batch(1, 9, seed=s, ignored=[(0, c) for c in range(s + 2)]).items()}
        for s in range(4)
    ]

    def collate(rows):  # pre-tokenized rows, the first 3 tokens the prompt
        out = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
        return {**out, "prompts": out["input_ids"][:, :3], "prompt_attention_mask": out["attention_mask"][:, :3]}

    config = GKDConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        per_device_train_batch_size=2,
        beta=0.3,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        disable_tqdm=True,
        **{"lmbda": 0.0, **args},
    )
    trainer = cls(
        model=causal_lm("gemma2", final_logit_softcapping=3.0),
        args=config,
        processing_class=tokenizer,
        teacher_model=causal_lm(hidden=24, seed=1),
        train_dataset=Dataset.from_list(rows),
        data_collator=collate,
        **(trainer_kwargs or {}),
    )
    return trainer, collate(rows[:2])


def test_gkd_trainer_equals_trls(tmp_path):
    """kdkernels' GKDTrainer: TRL's loss and gradients at a step, and the same parameters after Trainer.train()."""
    ours, inputs = _gkd(GKDTrainer, tmp_path)
    trl_trainer, _ = _gkd(TRLGKDTrainer, tmp_path)
    for normalizer in (None, torch.tensor(9)):
        got = ours.compute_loss(ours.model, inputs, num_items_in_batch=normalizer)
        want = trl_trainer.compute_loss(trl_trainer.model, inputs, num_items_in_batch=normalizer)
        assert_close(got, want.detach().numpy(), torch.float32, "loss")
        got.backward()
        want.backward()
        for name, g in grads(trl_trainer.model).items():
            assert_close(grads(ours.model)[name], g.numpy(), torch.float32, name)
        ours.model.zero_grad()
        trl_trainer.model.zero_grad()
    ours.train()
    trl_trainer.train()
    trained = dict(ours.model.named_parameters())
    for name, p in trl_trainer.model.named_parameters():
        assert_close(trained[name].detach(), p.detach().numpy(), torch.float32, name)


def test_gkd_trainer_with_another_method(tmp_path):
    """GKDTrainer(method=...): the method's loss at T = 1 without T^2 on the labels' tokens (dkd's target: the
    label), off-policy and at an on-policy step; jsd with a beta of its own is refused."""
    ours, inputs = _gkd(GKDTrainer, tmp_path, {"method": "dkd", "method_kwargs": {"beta": 2.0}})
    student = causal_lm("gemma2", final_logit_softcapping=3.0)  # (_gkd's; a deep copy of ours.model runs ours)
    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
    assert_step_is_eager(ours, student, ours.teacher_model, model_inputs, "dkd", beta=2.0)
    on_policy, _ = _gkd(GKDTrainer, tmp_path, {"method": "wsd"}, lmbda=1.0, max_new_tokens=3)
    seen = recorded_batches(on_policy)
    on_policy.train()
    assert seen[0][1]["input_ids"].shape[1] == 3 + 3
    assert math.isfinite(on_policy.state.log_history[-1]["train_loss"])
    with pytest.raises(ValueError, match="jsd's beta is the TRL config's beta"):
        _gkd(GKDTrainer, tmp_path, {"method": "jsd", "method_kwargs": {"beta": 0.2}})


def _fsdp_worker(rank, world, init_file, out_dir):
    """One FSDP2 process (gloo, CPU): the student sharded per layer and at the root, the loss of its half of the
    batch run inside the student's forward; rank 0 saves the gathered gradients."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from kdkernels.integrations.transformers import distill_in_forward

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    mesh = init_device_mesh("cpu", (world,))
    student, teacher = causal_lm("gemma2", final_logit_softcapping=3.0), causal_lm(hidden=24, seed=1)
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    inputs = batch(4, 9)
    tokens = (inputs["labels"][:, 1:] != -100).sum().float()
    mine = {k: v[2 * rank : 2 * rank + 2] for k, v in inputs.items()}
    loss, _ = distill_in_forward(
        student,
        teacher,
        {"input_ids": mine["input_ids"]},
        "jsd",
        mine["labels"][:, 1:],
        slice(None, -1),
        beta=0.3,
        ce_weight=0.5,
        normalizer=tokens / world,
    )
    loss.backward()  # FSDP2 averages the ranks' gradients: each divides by its share of the tokens
    grads = {name: p.grad.full_tensor() for name, p in student.named_parameters()}
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, "grads.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # (C++ teardown of FSDP/gloo threads at interpreter exit aborts now and then: SIGABRT, no error)


def test_fsdp2_two_processes_equal_one_full_batch(tmp_path):
    """Under FSDP2 (fully_shard, 2 gloo processes) the loss runs inside the sharded student's forward, its head
    gathered there: the averaged gradients equal the eager recipe's on the whole batch."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "grads.pt")
    student, teacher = causal_lm("gemma2", final_logit_softcapping=3.0), causal_lm(hidden=24, seed=1)
    inputs = batch(4, 9)
    tokens = float((inputs["labels"][:, 1:] != -100).sum())
    eager_loss("jsd", student, teacher, inputs, normalizer=tokens, beta=0.3, ce_weight=0.5).backward()
    for name, p in student.named_parameters():
        assert_close(got[name], p.grad.numpy(), torch.float32, name)
