"""Cross-tokenizer distillation in KDTrainer (teacher_tokenizer) and GOLD's ULDLoss under patch_trl: a student and a
teacher on two byte-level BPE tokenizers trained here on different halves of the same text (different vocabularies,
different token boundaries), against the loss computed by hand from each model's own forward.

The tokenizers, transformers and TRL come with the ``llm`` extra, which scripts/setup.sh installs: a missing package
is an error, not a skip, unless KDKERNELS_NO_LLM=1 says the environment has none.
"""

import copy
import os

import pytest
import torch

if os.environ.get("KDKERNELS_NO_LLM") == "1":
    pytest.skip("KDKERNELS_NO_LLM=1: transformers / tokenizers / trl are not installed here", allow_module_level=True)

import transformers  # noqa: E402
from helpers import assert_close  # noqa: E402
from tokenizers import normalizers  # noqa: E402
from trl.experimental.gold.gold_trainer import ULDLoss  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels import alignment, demo_lm  # noqa: E402
from kdkernels.baselines import gold_config  # noqa: E402
from kdkernels.integrations import cross_tokenizer  # noqa: E402
from kdkernels.integrations import trl as trl_integration  # noqa: E402
from kdkernels.integrations.transformers import KDConfig, KDTrainer, prompts_of  # noqa: E402
from kdkernels.integrations.trl import patch_trl  # noqa: E402

NON_ASCII = "def naïve_café(x):  # 日本語 ≥ 0 🎉\n    return x\n"
SMALL = dict(
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


def fast(tokenizer):
    """A transformers fast tokenizer around a tokenizers.Tokenizer (end-of-text as EOS and padding)."""
    end = demo_lm.END_OF_TEXT
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end, pad_token=end)


@pytest.fixture(scope="module")
def texts_and_tokenizers():
    """(texts, student tokenizer of 450 tokens, teacher tokenizer of 550) trained on different halves of
    300 kB of the standard library's sources (under a second)."""
    train, held_out = demo_lm.corpus(300_000)
    student, teacher = demo_lm.tokenizer(train[::2], 450), demo_lm.tokenizer(train[1::2], 550)
    texts = [held_out[0][:90], NON_ASCII, train[3][40:100]]
    return texts, fast(student), fast(teacher)


def causal_lm(vocab, hidden, seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, **SMALL)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # logits that spread over several units
        model.get_output_embeddings().weight.mul_(30)
    return model.double()


def student_batch(tokenizer, texts, prompt_chars=12):
    """Each text's first ``prompt_chars`` characters are its prompt (labels -100), the rest its completion,
    tokenized separately and right-padded (labels -100, attention 0)."""
    rows = [(tokenizer.encode(t[:prompt_chars]), tokenizer.encode(t[prompt_chars:])) for t in texts]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def by_hand(method, student, teacher, inputs, tokenizers, strategy, temperature, ce_weight, eps, **hyperparameters):
    """The loss as a user would write it: each completion's text from the student's tokens (their bytes), the
    teacher's tokens of the prompt and of the completion, the groups of the two by bytes, both models' logits from
    their own forward, ``aligned_cross_vocab_loss`` (float64, the reference backend) averaged per example then over
    the examples, plus ce_weight times the student's mean cross-entropy on its labels, label-smoothed by ``eps``
    (torch's label_smoothing, in float64; test_integrations.py checks the trainer's against transformers'
    LabelSmoother, which sums in float32)."""
    student_tok, teacher_tok = tokenizers
    shift = 1 if strategy == "bayesian" else 0
    pairs, teacher_rows = ([], []), []
    for ids, labels, mask in zip(inputs["input_ids"], inputs["labels"], inputs["attention_mask"]):
        first = int((labels != -100).int().argmax())
        completion = ids[first : first + int((labels != -100).sum())].tolist()
        pieces = [alignment.piece_bytes(p) for p in student_tok.convert_ids_to_tokens(completion)]
        text = b"".join(pieces).decode()  # (strict: these tests' completions are whole characters)
        prompt = student_tok.backend_tokenizer.decode(ids[:first][mask[:first].bool()].tolist())
        teacher_prompt = teacher_tok.backend_tokenizer.encode(prompt).ids
        teacher_ids, teacher_offsets = alignment.byte_offsets(teacher_tok, text)
        ends = torch.tensor([len(p) for p in pieces]).cumsum(0).tolist()
        pairs[0].append(alignment.Tokens(completion, list(zip([0, *ends[:-1]], ends)), first - shift))
        pairs[1].append(alignment.Tokens(teacher_ids, teacher_offsets, len(teacher_prompt) - shift))
        teacher_rows.append(teacher_prompt + teacher_ids)
    built = alignment.build_alignment(*pairs, strategy)
    width = max(map(len, teacher_rows))
    teacher_ids = torch.tensor([r + [0] * (width - len(r)) for r in teacher_rows])
    teacher_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in teacher_rows])
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = student(**model_inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=teacher_ids, attention_mask=teacher_mask).logits
    hybrid = {"vocab_map": kdkernels.vocab_map(*tokenizers)} if method == "hybrid" else {}
    rows = alignment.aligned_cross_vocab_loss(
        method, logits, teacher_logits, built, temperature=temperature, reduction="none", backend="reference",
        **hybrid, **hyperparameters,
    )  # fmt: skip
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), label_smoothing=eps
    )
    return built.example_mean(rows) + ce_weight * ce, built


def kd_config(tmp_path, method, **fields):
    defaults = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    defaults.update(per_device_train_batch_size=3, max_steps=1, learning_rate=0.5, optim="sgd")
    defaults.update(lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)
    return KDConfig(**{**defaults, **fields}, method=method)


def dataset_of(inputs):
    return [{k: v[i] for k, v in inputs.items()} for i in range(inputs["input_ids"].shape[0])]


def assert_sgd_step(trained, student, lr=0.5):
    """Every parameter of ``trained`` moved by -lr times the gradient ``student`` holds."""
    moved = dict(trained.named_parameters())
    for name, p in student.named_parameters():
        assert_close(moved[name].detach() - p.detach(), (-lr * p.grad).numpy(), torch.float64, name)


@pytest.mark.parametrize(
    "method, strategy, options",
    [
        ("uld", "bayesian", dict(temperature=1.0, ce_weight=0.3)),
        ("uld", "observed", dict(temperature=2.0, ce_weight=0.4, label_smoothing_factor=0.1)),
        ("hybrid", "observed", dict(temperature=1.5, ce_weight=0.0, method_kwargs={"beta": 0.3})),
        ("hybrid", "bayesian", dict(temperature=1.0, ce_weight=0.5, distill_weight=1.0)),
    ],
)
def test_off_policy_step_equals_the_loss_by_hand(texts_and_tokenizers, tmp_path, method, strategy, options):
    """One SGD step of KDTrainer with a teacher_tokenizer: the loss and the update equal the hand computation's on
    the same batch (the groups include several-token ones on both sides and the non-ASCII text; the CE term with
    TrainingArguments.label_smoothing_factor as transformers smooths it)."""
    texts, student_tok, teacher_tok = texts_and_tokenizers
    student, teacher = causal_lm(len(student_tok), 16, 0), causal_lm(len(teacher_tok), 24, 1)
    inputs = student_batch(student_tok, texts)
    args = kd_config(tmp_path, method, token_merge_strategy=strategy, **options)
    tr = KDTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, processing_class=student_tok,
                   teacher_tokenizer=teacher_tok, train_dataset=dataset_of(inputs))  # fmt: skip
    loss = tr.compute_loss(tr.model, inputs)
    kwargs = options.get("method_kwargs", {})
    want, built = by_hand(method, student, teacher, inputs, (student_tok, teacher_tok), strategy,
                          options["temperature"], options["ce_weight"], options.get("label_smoothing_factor", 0.0),
                          **kwargs)  # fmt: skip
    assert built.student.chained.shape[0] > 0 and built.teacher.chained.shape[0] > 0  # merged groups, both sides
    assert_close(loss, want.detach().numpy(), torch.float64, "loss")
    want.backward()
    tr.train()
    assert_sgd_step(tr.model, student)


def test_on_policy_step_re_tokenizes_the_students_samples(texts_and_tokenizers, tmp_path):
    """lmbda=1: the student's sampled completions are turned into text and tokenized for the teacher; the step is
    one SGD step on the hand computation's loss of the sampled batch."""
    texts, student_tok, teacher_tok = texts_and_tokenizers
    student, teacher = causal_lm(len(student_tok), 16, 0), causal_lm(len(teacher_tok), 24, 1)
    inputs = student_batch(student_tok, [t[:40] for t in texts[::2]], prompt_chars=20)
    args = kd_config(tmp_path, "uld", lmbda=1.0, max_new_tokens=6, per_device_train_batch_size=2, ce_weight=0.2)
    tr = KDTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, processing_class=student_tok,
                   teacher_tokenizer=teacher_tok, train_dataset=dataset_of(inputs))  # fmt: skip
    # Samples of whole characters (the hand computation decodes them strictly): no token with a non-ASCII byte.
    pieces = student_tok.convert_ids_to_tokens(list(range(len(student_tok))))
    tr.generation_config.suppress_tokens = [i for i, p in enumerate(pieces) if max(alignment.piece_bytes(p)) > 127]
    seen = []
    compute_loss = tr.compute_loss
    tr.compute_loss = lambda model, batch, *a, **k: seen.append(batch) or compute_loss(model, batch, *a, **k)
    torch.manual_seed(5)
    tr.train()
    ((sampled,),) = [seen]
    prompts, _ = prompts_of(inputs, student_tok.pad_token_id)
    assert sampled["input_ids"].shape[1] == prompts.shape[1] + 6 and (sampled["labels"] != -100).sum() > 6
    want, _ = by_hand("uld", student, teacher, sampled, (student_tok, teacher_tok), "bayesian", 1.0, 0.2, 0.0)
    want.backward()
    assert_sgd_step(tr.model, student)


def test_same_tokenizer_runs_the_ordinary_loss(texts_and_tokenizers, tmp_path):
    """A teacher_tokenizer with the student's vocabulary and a same-vocabulary method: the ordinary fused-linear
    step, loss for loss; its name is recorded in the config."""
    texts, student_tok, _ = texts_and_tokenizers
    student, teacher = causal_lm(len(student_tok), 16, 0), causal_lm(len(student_tok), 24, 1)
    inputs = student_batch(student_tok, texts)
    student_tok.save_pretrained(tmp_path / "tok")
    args = kd_config(tmp_path, "kd", ce_weight=0.2)
    plain = KDTrainer(model=student, teacher_model=teacher, args=args, processing_class=student_tok)
    same = KDTrainer(model=student, teacher_model=teacher, args=kd_config(tmp_path, "kd", ce_weight=0.2),
                     processing_class=student_tok, teacher_tokenizer=str(tmp_path / "tok"))  # fmt: skip
    assert same.cross is None and same.args.teacher_tokenizer == str(tmp_path / "tok")
    assert torch.equal(same.compute_loss(student, inputs), plain.compute_loss(student, inputs))


def test_refusals(texts_and_tokenizers, tmp_path):
    texts, student_tok, teacher_tok = texts_and_tokenizers
    student, teacher = causal_lm(len(student_tok), 16, 0), causal_lm(len(teacher_tok), 24, 1)

    def build(method="uld", processing_class=student_tok, teacher_tokenizer=teacher_tok, **fields):
        args = kd_config(tmp_path, method, **fields)
        return KDTrainer(model=student, teacher_model=teacher, args=args, processing_class=processing_class,
                         teacher_tokenizer=teacher_tokenizer)  # fmt: skip

    with pytest.raises(ValueError, match="needs the teacher's: pass teacher_tokenizer"):
        build(teacher_tokenizer=None)
    with pytest.raises(ValueError, match=r"method='kd' compares the two models' classes one to one"):
        build("kd")
    with pytest.raises(ValueError, match="pass it as processing_class"):
        build(processing_class=None)
    for fields, match in [
        (dict(t2_scale=True), r"does not take \['t2_scale'\]"),
        (dict(seq_kd=True, chunk_size=8), r"does not take \['chunk_size', 'seq_kd'\]"),
        (dict(token_merge_strategy="first"), "token_merge_strategy must be one of"),
        (dict(method_kwargs={"alpha": 0.1}), "alpha"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            kd_config(tmp_path, "hybrid", **fields)

    class Vocabulary:  # a tokenizer that shares no token string with the student's
        def get_vocab(self):
            return {f"piece{i}": i for i in range(10)}

    with pytest.raises(ValueError, match="share none"):
        build("hybrid", teacher_tokenizer=Vocabulary())
    lossy = copy.deepcopy(teacher_tok.backend_tokenizer)
    lossy.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match="teacher_tokenizer: its tokens' bytes do not spell the text"):
        build(teacher_tokenizer=lossy)
    tr = build()
    inputs = student_batch(student_tok, texts)
    with pytest.raises(ValueError, match="needs the batch's `labels`"):
        tr.compute_loss(tr.model, {k: v for k, v in inputs.items() if k != "labels"})
    inputs["labels"][0, -2] = -100
    with pytest.raises(ValueError, match=r"labels\[0\]: a cross-tokenizer run aligns one completion"):
        tr.compute_loss(tr.model, inputs)


def test_a_completion_cut_inside_a_character_keeps_its_whole_characters():
    """Tokens holding part of a character cut off by the block's edges (or by a bad byte inside) are left out."""
    cut = "é".encode()
    pieces = [cut[1:], b"ab", "日".encode(), b"c", cut[:1]]
    assert cross_tokenizer._decodable(pieces) == (1, 4, "ab日c")
    assert cross_tokenizer._decodable([b"x", b"\xff", b"y"]) == (0, 1, "x")
    assert cross_tokenizer._decodable([]) == (0, 0, "")


def _gold_batch(tokenizer, texts, seed, strategy, prompt=2):
    """GOLD's inputs of one model: ``prompt`` prompt tokens, each text's tokens, right-padded; labels, byte offsets
    and float64 logits, each actual token's raised at the row the strategy reads with it, so that merged matched
    probabilities stay above the 1e-8 at which TRL's hybrid clamps them (kdkernels takes their exact log)."""
    encoded = [alignment.byte_offsets(tokenizer, text) for text in texts]
    length = prompt + 1 + max(len(ids) for ids, _ in encoded)
    ids = torch.zeros(len(texts), length, dtype=torch.int64)
    labels = torch.full_like(ids, -100)
    offsets = torch.zeros(len(texts), length, 2, dtype=torch.int64)
    for i, (tokens, spans) in enumerate(encoded):
        ids[i, prompt : prompt + len(tokens)] = labels[i, prompt : prompt + len(tokens)] = torch.tensor(tokens)
        offsets[i, prompt : prompt + len(tokens)] = torch.tensor(spans)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*ids.shape, len(tokenizer), generator=g, dtype=torch.float64) * 0.5
    rows, shift = torch.arange(len(texts)).unsqueeze(-1), int(strategy == "bayesian")
    logits[rows, torch.arange(length - shift), ids[:, shift:]] += 5.0
    return ids, labels, offsets, logits


@pytest.mark.parametrize(
    "options",
    [
        dict(use_extended_uld=True),
        dict(use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_student_temperature=1.3),
        dict(use_extended_uld=True, uld_use_hybrid_loss=True, beta=0.2, uld_skip_student_eos=True),
        dict(
            use_extended_uld=True,
            uld_use_hybrid_loss=True,
            uld_hybrid_matched_weight=0.7,
            uld_hybrid_unmatched_weight=0.2,
            uld_token_merge_strategy="bayesian",
            uld_distillation_weight=0.5,
        ),
        dict(use_extended_uld=False, uld_teacher_temperature=0.7),
    ],  # fmt: skip
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patch_trl_gold_uld_loss_equals_trls(texts_and_tokenizers, options, dtype, monkeypatch):
    """GOLD's ULDLoss under patch_trl() against TRL's own on the same inputs: values and the student's gradient to
    float64 rounding (float32: its tolerance), TRL's own code never called; unpatched, TRL's own code runs again."""
    texts, student_tok, teacher_tok = texts_and_tokenizers
    texts = [texts[0][:50], texts[1], texts[2][:30]]
    strategy = options.get("uld_token_merge_strategy", "observed")
    s_ids, s_labels, s_offsets, s_logits = _gold_batch(student_tok, texts, 1, strategy)
    t_ids, t_labels, t_offsets, t_logits = _gold_batch(teacher_tok, texts, 2, strategy, prompt=3)
    s_labels[1, :] = -100  # an example without an answer counts 0, as TRL counts it
    uld = ULDLoss(gold_config(**options), student_tok, teacher_tok)

    def loss_and_grad():
        logits = s_logits.to(dtype).requires_grad_(True)
        args = (logits, t_logits.to(dtype), s_labels, t_labels, s_ids, t_ids, s_offsets, t_offsets)
        loss = uld._compute_distillation_loss(*args)
        return loss, torch.autograd.grad(loss, logits)[0]

    want, want_grad = loss_and_grad()
    unpatch = patch_trl()
    try:
        with monkeypatch.context() as m:
            m.setattr(trl_integration, "_TRL_ULD", None)  # (a fallback to TRL's code would fail here)
            got, got_grad = loss_and_grad()
    finally:
        unpatch()
    again, _ = loss_and_grad()
    assert torch.equal(again, want)
    if dtype == torch.float64:
        assert torch.allclose(got, want, rtol=1e-12, atol=0), (got.item(), want.item())
        assert torch.allclose(got_grad, want_grad, rtol=1e-9, atol=1e-15)
    else:
        assert_close(got, want.detach().double().numpy(), torch.float32, "loss")
        assert_close(got_grad, want_grad.double().numpy(), torch.float32, "grad")
