"""The losses between two vocabularies (docs/losses.md, section 11): the reference against the float64 oracle
(values, the student's gradient and the log scales' gradient), ties, masked classes and rows, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_close
from oracle import cross_vocab_oracle

import kdkernels
from kdkernels.cross_vocab import VocabMap


def _inputs(lead, vs, vt, dtype, seed, masked=False, log_scale=False):
    """Student [*lead, vs] and teacher [*lead, vt] logits (offset from each other), a target with one ignored row,
    a random one-to-one map of min(vs, vt) // 2 pairs and, with ``log_scale``, log scales <= 0. ``masked``: a few
    classes -inf, the same pairs in both models (so that every beta stays finite) and a few unmatched ones."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, vs, generator=g, dtype=torch.float64) * 2.5
    t = torch.randn(*lead, vt, generator=g, dtype=torch.float64) * 2.5 + 40.0
    m = min(vs, vt) // 2
    pairs = (torch.randperm(vs, generator=g)[:m], torch.randperm(vt, generator=g)[:m])
    if masked:
        s[..., pairs[0][:3]] = -math.inf
        t[..., pairs[1][:3]] = -math.inf
        free_s = torch.ones(vs, dtype=torch.bool)
        free_s[pairs[0]] = False
        s[..., free_s.nonzero()[:2, 0]] = -math.inf
    target = torch.randint(0, vs, lead, generator=g)
    target = torch.where(torch.isneginf(s.gather(-1, target.unsqueeze(-1)).squeeze(-1)), s.argmax(-1), target)
    target.view(-1)[1] = -100  # (a masked target would make the cross-entropy infinite)
    scales = [-torch.rand(lead, generator=g, dtype=torch.float64) * 3 if log_scale else None for _ in range(2)]
    return s.to(dtype), t.to(dtype), target, pairs, scales


CASES = [
    dict(method="uld", vs=37, vt=53, lead=(2, 3)),
    dict(method="uld", vs=61, vt=29, lead=(5,), temperature=2.0, teacher_temperature=0.5, log_scale=True),
    dict(method="uld", vs=40, vt=70, lead=(4,), masked=True, ce_weight=0.3),
    dict(method="hybrid", vs=37, vt=53, lead=(2, 3), beta=0.5),
    dict(method="hybrid", vs=61, vt=29, lead=(5,), beta=0.0, temperature=0.7, teacher_temperature=1.5, log_scale=True),
    dict(method="hybrid", vs=40, vt=40, lead=(6,), beta=1.0, masked=True, weights=(0.7, 0.2), ce_weight=0.5),
    dict(method="hybrid", vs=50, vt=33, lead=(3,), beta=0.3, masked=True, temperature=3.0, log_scale=True),
]


def _run(case, dtype, reduction="batchmean", grad_output=None, seed=0):
    s, t, target, pairs, scales = _inputs(
        case["lead"], case["vs"], case["vt"], dtype, seed, case.get("masked", False), case.get("log_scale", False)
    )
    hp = {}
    if case["method"] == "hybrid":
        hp = dict(beta=case["beta"], vocab_map=pairs)
        if "weights" in case:
            hp.update(matched_weight=case["weights"][0], unmatched_weight=case["weights"][1])
    options = dict(
        temperature=case.get("temperature", 1.0),
        teacher_temperature=case.get("teacher_temperature"),
        ce_weight=case.get("ce_weight", 0.0),
        distill_weight=0.8,
        reduction=reduction,
    )
    student = s.clone().requires_grad_(True)
    scale = None if scales[0] is None else scales[0].to(dtype).requires_grad_(True)
    teacher_scale = None if scales[1] is None else scales[1].to(dtype)
    loss = kdkernels.cross_vocab_loss(
        case["method"],
        student,
        t,
        target,
        student_log_scale=scale,
        teacher_log_scale=teacher_scale,
        backend="reference",
        **hp,
        **options,
    )
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(go)
    hp = {k: v for k, v in hp.items() if k != "vocab_map"}
    want = cross_vocab_oracle(
        case["method"],
        s.double().numpy(),
        t.double().numpy(),
        target.numpy(),
        vocab_map=None if case["method"] == "uld" else [x.numpy() for x in pairs],
        student_log_scale=None if scale is None else scale.detach().double().numpy(),
        teacher_log_scale=None if teacher_scale is None else teacher_scale.double().numpy(),
        grad_output=1.0 if grad_output is None else grad_output.double().numpy(),
        **hp,
        **options,
    )
    return (loss, student.grad, None if scale is None else scale.grad), want


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "lead"))
def test_reference_against_oracle(case, dtype):
    (loss, grad, scale_grad), (want_loss, want_grad, want_scale_grad) = _run(case, dtype)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, want_loss, dtype, "loss")
    assert_close(grad, want_grad, dtype, "gradient")
    if scale_grad is not None:
        assert_close(scale_grad, want_scale_grad, dtype, "log scale's gradient")


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["uld", "hybrid"])
def test_reductions_and_grad_output(case, reduction):
    grad_output = torch.tensor(2.5) if reduction == "sum" else torch.randn(case["lead"], dtype=torch.float64)
    got, want = _run(case, torch.float32, reduction, grad_output)
    assert got[0].shape == (() if reduction == "sum" else case["lead"])
    for x, y, what in zip(got, want, ("loss", "gradient", "log scale's gradient")):
        assert_close(x, y, torch.float32, what)


@pytest.mark.parametrize("method", ["uld", "hybrid"])
def test_ties_follow_the_documented_rule(method):
    """Logits drawn from five values tie often; the gradient at ties is the oracle's (the lower class index ranked
    first, sign(0) = 0), not merely some subgradient."""
    g = torch.Generator().manual_seed(3)
    s = torch.randint(-2, 3, (6, 30), generator=g).double()
    t = torch.randint(-2, 3, (6, 45), generator=g).double()
    pairs = (torch.arange(0, 30, 2), torch.arange(1, 45, 3)[:15])
    kwargs = {} if method == "uld" else {"vocab_map": pairs}
    for dtype in (torch.float64, torch.float32):
        student = s.to(dtype).clone().requires_grad_(True)
        loss = kdkernels.cross_vocab_loss(method, student, t.to(dtype), backend="reference", **kwargs)
        loss.backward()
        want_loss, want_grad, _ = cross_vocab_oracle(
            method, s.numpy(), t.numpy(), vocab_map=None if method == "uld" else [x.numpy() for x in pairs]
        )
        assert_close(loss, want_loss, dtype, "loss")
        assert_close(student.grad, want_grad, dtype, "gradient at ties")
    # The rule matters: ranking ties the other way (higher index first) changes the gradient of these rows.
    flipped_loss, flipped_grad, _ = cross_vocab_oracle(
        method,
        s.flip(-1).numpy(),
        t.numpy(),
        vocab_map=None if method == "uld" else [29 - pairs[0].numpy(), pairs[1].numpy()],
    )
    assert math.isclose(flipped_loss, want_loss, rel_tol=1e-12)
    assert not np.allclose(flipped_grad[:, ::-1], want_grad)


def test_identical_rows_have_zero_loss_and_gradient():
    s = torch.randn(4, 50, dtype=torch.float32)
    student = s.clone().requires_grad_(True)
    loss = kdkernels.cross_vocab_loss("uld", student, s.clone(), reduction="sum")
    loss.backward()
    assert loss.item() == 0 and torch.equal(student.grad, torch.zeros_like(s))


def test_masked_and_left_out_rows():
    s, t = torch.randn(5, 20), torch.randn(5, 30)
    s[1], t[1] = -math.inf, -math.inf  # masked in both: 0, counted
    s[2] = -math.inf  # masked in the student only: NaN
    s[3, 4] = math.nan  # left out by the mask: no leak
    mask = torch.tensor([1, 1, 1, 0, 1])
    for method, kwargs in (("uld", {}), ("hybrid", {"vocab_map": (torch.arange(5), torch.arange(5, 10))})):
        student = s.clone().requires_grad_(True)
        rows = kdkernels.cross_vocab_loss(method, student, t, mask=mask, reduction="none", **kwargs)
        assert rows[1] == 0 and rows[3] == 0 and torch.isnan(rows[2]) and torch.isfinite(rows[[0, 4]]).all()
        rows[[0, 1, 3, 4]].sum().backward()
        assert torch.isfinite(student.grad[[0, 1, 3, 4]]).all() and (student.grad[[1, 3]] == 0).all()
        kept = [0, 4]
        batchmean = kdkernels.cross_vocab_loss(method, s[kept + [1]], t[kept + [1]], **kwargs)
        assert torch.allclose(batchmean, rows[kept].sum() / 3)


def test_teacher_gradient_by_autograd():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 9, generator=g, dtype=torch.float64)
    t = torch.randn(3, 13, generator=g, dtype=torch.float64, requires_grad=True)
    pairs = (torch.tensor([0, 3, 4]), torch.tensor([2, 7, 12]))
    for method, kwargs in (("uld", {}), ("hybrid", {"vocab_map": pairs, "beta": 0.3})):

        def loss(teacher, method=method, kwargs=kwargs):
            return kdkernels.cross_vocab_loss(method, s, teacher, **kwargs)

        torch.autograd.gradcheck(loss, (t,))


def test_module_equals_the_function():
    s, t = torch.randn(2, 3, 40), torch.randn(2, 3, 24)
    pairs = (torch.arange(10), torch.arange(10) * 2)
    module = kdkernels.CrossVocabLoss("hybrid", vocab_map=pairs, beta=0.2, temperature=2.0, reduction="sum")
    want = kdkernels.cross_vocab_loss("hybrid", s, t, vocab_map=pairs, beta=0.2, temperature=2.0, reduction="sum")
    assert torch.equal(module(s, t), want)
    assert "beta=0.2" in repr(module)


def test_adaptive_weights_are_trls():
    """Without weights, w_m = M / Vt and w_u = 1 - w_m: the loss is that mix of the loss at (1, 0) and at (0, 1)."""
    s, t = torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    pairs = (torch.arange(12), torch.arange(12) + 20)
    partial = {}
    for weights in ((None, None), (1.0, 0.0), (0.0, 1.0)):
        partial[weights] = kdkernels.cross_vocab_loss(
            "hybrid", s, t, vocab_map=pairs, matched_weight=weights[0], unmatched_weight=weights[1]
        )
    w = 12 / 50
    assert torch.allclose(partial[(None, None)], w * partial[(1.0, 0.0)] + (1 - w) * partial[(0.0, 1.0)])


def test_vocab_map_checks_and_summary():
    good = VocabMap(torch.tensor([3, 1]), torch.tensor([0, 7]), 10, 20)
    assert len(good) == 2 and good.summary() == (
        "2 shared token strings: the student's of 10 (20.0%), the teacher's of 20 (10.0%)"
    )
    with pytest.raises(ValueError, match="student_ids has id 3 more than once"):
        VocabMap(torch.tensor([3, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="teacher_ids must be >= 0"):
        VocabMap(torch.tensor([3, 4]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="same length"):
        VocabMap(torch.tensor([3, 4]), torch.tensor([0]))
    with pytest.raises(TypeError, match="teacher_ids must be a 1-D integer"):
        VocabMap(torch.tensor([3]), torch.tensor([0.5]))


IDS = torch.arange(3)
ONE_PAIR = (IDS[:1], IDS[1:2])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(teacher_logits=torch.randn(3, 7)), ValueError, "same leading shape"),
        (dict(method="hybrid", vocab_map=None), ValueError, "hybrid needs vocab_map"),
        (dict(method="hybrid", vocab_map=(torch.tensor([4]), IDS[:1])), ValueError, "student id 4 is outside"),
        (dict(method="hybrid", vocab_map=(IDS[:1], torch.tensor([9]))), ValueError, "teacher id 9 is outside"),
        (dict(method="hybrid", vocab_map=(IDS[:1].repeat(2), IDS[1:3])), ValueError, "more than once"),
        (dict(method="hybrid", vocab_map=[1, 2]), TypeError, "vocab_map must be a VocabMap"),
        (dict(vocab_map=ONE_PAIR), ValueError, "vocab_map is for method='hybrid'"),
        (dict(method="hybrid", vocab_map=ONE_PAIR, matched_weight=0.5), ValueError, "go together"),
        (dict(method="hybrid", vocab_map=ONE_PAIR, beta=1.5), ValueError, "beta must be in"),
        (
            dict(method="hybrid", vocab_map=ONE_PAIR, matched_weight=-1.0, unmatched_weight=1.0),
            ValueError,
            "matched_weight must be None or",
        ),
        (dict(student_log_scale=torch.zeros(3)), ValueError, "student_log_scale must have the logits' leading"),
        (dict(teacher_log_scale=torch.zeros(2, 3, dtype=torch.long)), TypeError, "teacher_log_scale must be a float"),
        (dict(teacher_temperature=0.0), ValueError, "teacher_temperature must be a finite number > 0"),
        (dict(temperature=torch.tensor(2.0)), TypeError, "temperature must be a number"),
        (dict(method="kd"), ValueError, r"method must be one of \['hybrid', 'uld'\]"),
        (dict(beta=0.5), TypeError, "unexpected hyperparameter"),
        (dict(ce_weight=1.0), ValueError, "needs target"),
        (dict(target=torch.full((2, 3), 5)), IndexError, r"class indices in \[0, 4\)"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    call = dict(method="uld", student_logits=torch.randn(2, 3, 4), teacher_logits=torch.randn(2, 3, 8))
    call.update(kwargs)
    if "target" in kwargs:
        call["ce_weight"] = 1.0
    with pytest.raises(error, match=match):
        kdkernels.cross_vocab_loss(call.pop("method"), call.pop("student_logits"), call.pop("teacher_logits"), **call)


def test_a_backend_without_cross_vocabulary_kernels_says_so():
    fused = [b for b in kdkernels.available_backends("cpu") if b != "reference"]
    s, t = torch.randn(2, 4), torch.randn(2, 6)
    want = kdkernels.cross_vocab_loss("uld", s, t, backend="reference")
    assert torch.equal(kdkernels.cross_vocab_loss("uld", s, t), want)
    for name in fused:
        with pytest.raises(RuntimeError, match=f"backend='{name}' has no cross_vocab kernels yet"):
            kdkernels.cross_vocab_loss("uld", s, t, backend=name)
