"""The losses between two vocabularies (docs/losses.md, section 11): every backend with cross-vocabulary kernels
against the float64 oracle (values, the student's gradient and the log scales' gradient), ties, masked classes and
rows, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DEVICE, cross_vocab_backends
from helpers import assert_close
from oracle import cross_vocab_oracle

import kdkernels
from kdkernels.backends.triton import cross_vocab as triton_cross_vocab
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


def _run(case, dtype, reduction="batchmean", grad_output=None, seed=0, backend="reference"):
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
        backend=backend,
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
def test_against_oracle(case, dtype, cross_vocab_backend):
    if cross_vocab_backend == "triton" and dtype == torch.float64:
        with pytest.raises(TypeError, match="compute in float32"):
            _run(case, dtype, backend=cross_vocab_backend)
        return
    (loss, grad, scale_grad), (want_loss, want_grad, want_scale_grad) = _run(case, dtype, backend=cross_vocab_backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, want_loss, dtype, "loss")
    assert_close(grad, want_grad, dtype, "gradient")
    if scale_grad is not None:
        assert_close(scale_grad, want_scale_grad, dtype, "log scale's gradient")


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["uld", "hybrid"])
def test_reductions_and_grad_output(case, reduction, cross_vocab_backend):
    grad_output = torch.tensor(2.5) if reduction == "sum" else torch.randn(case["lead"], dtype=torch.float64)
    got, want = _run(case, torch.float32, reduction, grad_output, backend=cross_vocab_backend)
    assert got[0].shape == (() if reduction == "sum" else case["lead"])
    for x, y, what in zip(got, want, ("loss", "gradient", "log scale's gradient")):
        assert_close(x, y, torch.float32, what)


@pytest.mark.parametrize("method", ["uld", "hybrid"])
def test_ties_follow_the_documented_rule(method, cross_vocab_backend):
    """Logits drawn from five values tie often; the gradient at ties is the oracle's (the lower class index ranked
    first, sign(0) = 0), not merely some subgradient."""
    g = torch.Generator().manual_seed(3)
    s = torch.randint(-2, 3, (6, 30), generator=g).double()
    t = torch.randint(-2, 3, (6, 45), generator=g).double()
    pairs = (torch.arange(0, 30, 2), torch.arange(1, 45, 3)[:15])
    kwargs = {} if method == "uld" else {"vocab_map": pairs}
    for dtype in (torch.float32,) if cross_vocab_backend == "triton" else (torch.float64, torch.float32):
        student = s.to(dtype).clone().requires_grad_(True)
        loss = kdkernels.cross_vocab_loss(method, student, t.to(dtype), backend=cross_vocab_backend, **kwargs)
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


def test_identical_rows_have_zero_loss_and_gradient(cross_vocab_backend):
    s = torch.randn(4, 50, dtype=torch.float32)
    student = s.clone().requires_grad_(True)
    loss = kdkernels.cross_vocab_loss("uld", student, s.clone(), reduction="sum", backend=cross_vocab_backend)
    loss.backward()
    assert loss.item() == 0 and torch.equal(student.grad, torch.zeros_like(s))


def test_masked_and_left_out_rows(cross_vocab_backend):
    s, t = torch.randn(5, 20), torch.randn(5, 30)
    s[1], t[1] = -math.inf, -math.inf  # masked in both: 0, counted
    s[2] = -math.inf  # masked in the student only: NaN
    s[3, 4] = math.nan  # left out by the mask: no leak
    mask = torch.tensor([1, 1, 1, 0, 1])
    for method, kwargs in (("uld", {}), ("hybrid", {"vocab_map": (torch.arange(5), torch.arange(5, 10))})):
        student = s.clone().requires_grad_(True)
        rows = kdkernels.cross_vocab_loss(
            method, student, t, mask=mask, reduction="none", backend=cross_vocab_backend, **kwargs
        )
        assert rows[1] == 0 and rows[3] == 0 and torch.isnan(rows[2]) and torch.isfinite(rows[[0, 4]]).all()
        rows[[0, 1, 3, 4]].sum().backward()
        assert torch.isfinite(student.grad[[0, 1, 3, 4]]).all() and (student.grad[[1, 3]] == 0).all()
        kept = [0, 4]
        batchmean = kdkernels.cross_vocab_loss(
            method, s[kept + [1]], t[kept + [1]], backend=cross_vocab_backend, **kwargs
        )
        assert torch.allclose(batchmean, rows[kept].sum() / 3)


def test_teacher_gradient_by_autograd():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 9, generator=g, dtype=torch.float64)
    t = torch.randn(3, 13, generator=g, dtype=torch.float64, requires_grad=True)
    pairs = (torch.tensor([0, 3, 4]), torch.tensor([2, 7, 12]))
    for method, kwargs in (("uld", {}), ("hybrid", {"vocab_map": pairs, "beta": 0.3})):

        def loss(teacher, method=method, kwargs=kwargs):
            return kdkernels.cross_vocab_loss(method, s, teacher, backend="reference", **kwargs)

        torch.autograd.gradcheck(loss, (t,))


def test_a_teacher_that_learns_goes_to_the_reference(cross_vocab_fused):
    """A fused backend leaves a teacher (or teacher log scale) that requires grad to the reference's autograd."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(4, 20, generator=g, requires_grad=True)
    scale = torch.rand(4, generator=g).neg().requires_grad_(True)
    grads = []
    for backend in ("reference", cross_vocab_fused):
        t = torch.randn(4, 30, generator=torch.Generator().manual_seed(7), requires_grad=True)
        loss = kdkernels.cross_vocab_loss("uld", s, t, teacher_log_scale=scale, backend=backend)
        grads.append(torch.autograd.grad(loss, (s, t, scale)))
    for got, want in zip(grads[1], grads[0]):
        assert torch.equal(got, want)


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


# The fused backends but Triton, whose interpreter takes minutes to run the compiled graphs of three temperatures
# (its op has the same registrations, ops._cross_vocab_overload).
COMPILED = [(b, m) for b in cross_vocab_backends() if b not in ("reference", "triton") for m in ("uld", "hybrid")]


@pytest.mark.parametrize("compiled_backend, method", COMPILED)
def test_compiled_step_matches_eager(compiled_backend, method):
    """A training step through cross_vocab_loss compiles with fullgraph=True (no graph break: the fused op through
    its registered fake function and autograd, a VocabMap built outside) and matches eager: the loss, the head's
    gradients and the student log scale's, per-row weights as grad_output, an ignored row and a ce term. Temperatures
    that change every call compile twice (dynamo specializes a Python float's first value), as the one-vocabulary
    losses' (tests/test_ops.py)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(31)
    head = torch.nn.Linear(8, 27)
    x, t = torch.randn(5, 8, generator=g), torch.randn(5, 41, generator=g) * 3
    scale0 = -torch.rand(5, generator=g)
    target = torch.tensor([3, -100, 26, 0, 9])
    weights = torch.rand(5, generator=g) + 0.5
    pairs = VocabMap(torch.randperm(27, generator=g)[:11], torch.randperm(41, generator=g)[:11])
    hp = dict(vocab_map=pairs, beta=0.3) if method == "hybrid" else {}

    def step(x, scale, temperature):
        rows = kdkernels.cross_vocab_loss(
            method, head(x), t, target, student_log_scale=scale, temperature=temperature,
            teacher_temperature=2 * temperature, ce_weight=0.2, reduction="none", backend=compiled_backend, **hp,
        )  # fmt: skip
        return (rows * weights).sum()

    compiled = torch.compile(step, fullgraph=True)
    for temperature in (1.5, 0.7, 2.5):
        results = []
        for f in (compiled, step):
            head.zero_grad()
            scale = scale0.clone().requires_grad_(True)
            loss = f(x, scale, temperature)
            loss.backward()
            results.append((loss.detach(), scale.grad, *(p.grad.clone() for p in head.parameters())))
        for got, want, what in zip(*results, ("loss", "log scale's gradient", "weight's gradient", "bias's gradient")):
            assert_close(got, want.double().numpy(), torch.float32, f"compiled {what} at T = {temperature}")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


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
        (
            dict(label_smoothing=0.1, ce_weight=1.0, target=torch.zeros(2, 3, dtype=torch.long)),
            ValueError,
            "do not take label_smoothing or standardize .*got label_smoothing=0.1",
        ),
        (dict(standardize=True), ValueError, "do not take label_smoothing or standardize .*got standardize=True"),
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
    without = [b for b in kdkernels.available_backends("cpu") if b not in cross_vocab_backends()]
    s, t = torch.randn(2, 4), torch.randn(2, 6)
    want = kdkernels.cross_vocab_loss("uld", s, t, backend="reference")
    assert torch.allclose(kdkernels.cross_vocab_loss("uld", s, t), want, rtol=1e-6)
    for name in without:
        with pytest.raises(RuntimeError, match=f"backend='{name}' has no cross_vocab kernels yet"):
            kdkernels.cross_vocab_loss("uld", s, t, backend=name)


@pytest.mark.parametrize("method", ["uld", "hybrid"])
def test_fused_wide_rows_against_oracle(method, cross_vocab_fused):
    """Rows of thousands of classes (hundreds under Triton's interpreter) whose probabilities span dozens of binades
    (every digit of the CPU's radix sort moves), with ties among them (logits rounded to a coarse grid), a bf16
    teacher and a float32 student."""
    vs, vt = (3001, 4999) if cross_vocab_fused == "cpu" else (301, 499)
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(3, vs, generator=g, dtype=torch.float64) * 6).mul(4).round().div(4)
    t = (torch.randn(3, vt, generator=g, dtype=torch.float64) * 5 - 30).to(torch.bfloat16)
    pairs = (torch.randperm(vs, generator=g)[: vs * 2 // 5], torch.randperm(vt, generator=g)[: vs * 2 // 5])
    kwargs = {} if method == "uld" else {"vocab_map": pairs, "beta": 0.4}
    student = s.float().requires_grad_(True)
    loss = kdkernels.cross_vocab_loss(method, student, t, backend=cross_vocab_fused, temperature=1.3, **kwargs)
    loss.backward()
    want_loss, want_grad, _ = cross_vocab_oracle(
        method,
        s.float().double().numpy(),
        t.double().numpy(),
        vocab_map=None if method == "uld" else [x.numpy() for x in pairs],
        temperature=1.3,
        **({} if method == "uld" else {"beta": 0.4}),
    )
    assert_close(loss, want_loss, torch.float32, "loss")
    assert_close(student.grad, want_grad, torch.float32, "gradient")


def test_cpu_op_checks_the_classes():
    """The C++ op reads the classes as indices: it checks them (the Python front's VocabMap checked them already)."""
    assert "cpu" in cross_vocab_backends()
    op = torch.ops.kdkernels.cross_vocab_cpu
    s, t = torch.randn(2, 5), torch.randn(2, 7)
    classes = [torch.tensor([0]), torch.tensor([9]), torch.arange(1, 5), torch.arange(1, 7)]
    params = [1.0, 2, 0.5, 0.5, math.log(0.5), math.log(0.5), 0.5, 0.5]
    args = (None, None, classes, 1, params, 1.0, -100, True, 0.0, 1.0, False, True)
    with pytest.raises(RuntimeError, match=r"class id 9 outside \[0, 7\)"):
        op(s, t, None, None, *args)
    with pytest.raises(RuntimeError, match="hybrid needs 4 class tensors"):
        op(s, t, None, None, None, None, [], *args[3:])


def _device_shape(width: str, monkeypatch) -> tuple[int, int, int]:
    """(rows, Vs, Vt) of test_device_kernels_against_oracle. On a GPU: a vision vocabulary, or an LLM's (wider than
    the on-chip sort's 4096 classes; two chunks of the workspace, the second one partial). Under Triton's interpreter:
    small rows, its on-chip block, tile and chunk lowered for "chunked" (chunks of 2 rows or fewer, rows of several
    tiles)."""
    if DEVICE != "cpu":
        return (7, 600, 1000) if width == "fits" else (100, 32000, 50000)
    if width == "chunked":
        monkeypatch.setattr(triton_cross_vocab, "MAX_BLOCK", 16)
        monkeypatch.setattr(triton_cross_vocab, "STREAM_TILE", 32)
        monkeypatch.setattr(triton_cross_vocab, "CHUNK_ELEMENTS", 2 * 53)
    return (5, 37, 53)


# Under the interpreter the rows that fit are test_against_oracle's (Triton's on-chip sort runs there): only chunked.
@pytest.mark.parametrize("width", ["fits", "chunked"] if DEVICE != "cpu" else ["chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["uld", "hybrid"])
def test_device_kernels_against_oracle(method, dtype, width, cross_vocab_device_backend, monkeypatch):
    """The device's fused kernels (Triton; CUDA on a GPU) on rows that fit the on-chip sort and on wider rows, which
    go through the chunked path (a workspace of a chunk of rows, a segmented sort, one fused pass), against the
    oracle: ties (logits on a coarse grid), a masked class, an ignored row, log scales, the cross-entropy, two
    temperatures and grad_output != 1. Every sort of the chunked path holds at most CHUNK_ELEMENTS a side."""
    n, vs, vt = _device_shape(width, monkeypatch)
    g = torch.Generator().manual_seed(12)
    s = (torch.randn(n, vs, generator=g, dtype=torch.float64) * 4).mul(2).round().div(2)
    t = torch.randn(n, vt, generator=g, dtype=torch.float64) * 3 - 20
    s[:, 3], t[:, 5] = -math.inf, -math.inf
    target = torch.randint(4, vs, (n,), generator=g)
    target[1] = -100
    scales = [-torch.rand(n, generator=g, dtype=torch.float64) for _ in range(2)]
    m = min(vs, vt) // 3
    pairs = (torch.randperm(vs, generator=g)[:m], torch.randperm(vt, generator=g)[:m])
    hp = {} if method == "uld" else {"beta": 0.3}
    options = dict(temperature=1.3, teacher_temperature=0.8, ce_weight=0.4, reduction="none", **hp)
    sorts = []
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *a, **k: sorts.append(x.numel()) or sort(x, *a, **k))
    student = s.to(DEVICE, dtype).requires_grad_(True)
    scale = scales[0].to(DEVICE, torch.float32).requires_grad_(True)
    rows = kdkernels.cross_vocab_loss(
        method, student, t.to(DEVICE, dtype), target.to(DEVICE), student_log_scale=scale,
        teacher_log_scale=scales[1].to(DEVICE, torch.float32), backend=cross_vocab_device_backend,
        vocab_map=None if method == "uld" else tuple(x.to(DEVICE) for x in pairs), **options,
    )  # fmt: skip
    grad_output = torch.randn(n, generator=g, dtype=torch.float64)
    rows.backward(grad_output.to(DEVICE, rows.dtype))
    want = cross_vocab_oracle(
        method, s.to(dtype).double().numpy(), t.to(dtype).double().numpy(), target.numpy(),
        vocab_map=None if method == "uld" else [x.numpy() for x in pairs],
        student_log_scale=scales[0].float().double().numpy(), teacher_log_scale=scales[1].float().double().numpy(),
        grad_output=grad_output.numpy(), **options,
    )  # fmt: skip
    for got, expected, what in zip((rows, student.grad, scale.grad), want, ("loss", "gradient", "log scale's")):
        assert_close(got.cpu(), expected, dtype, what)
    chunked = max(vs, vt) > triton_cross_vocab.MAX_BLOCK
    if chunked and cross_vocab_device_backend == "triton":
        assert len(sorts) >= 4 and max(sorts) <= triton_cross_vocab.CHUNK_ELEMENTS, sorts


MEMORY_SCRIPT = """
import json, sys, torch, kdkernels
from kdkernels.backends.extension import release_cached_gradients
from kdkernels.bench import peak_rss_bytes
s, t = torch.randn(256, 32000).requires_grad_(True), torch.randn(256, 49152)
def step():
    s.grad = None
    kdkernels.cross_vocab_loss("uld", s, t, backend=sys.argv[1]).backward()
step()
s.grad = None
release_cached_gradients()
print(json.dumps({"peak": peak_rss_bytes(step), "grad": s.numel() * 4}))
"""


def _peak(backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, backend], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_kernel_has_no_n_by_v_temporary():
    """At [256, 32000] x [256, 49152] float32 the fused CPU loss + backward adds the gradient (33 MB) and row buffers,
    nothing [N, V]; the reference adds its softmaxes, sorted values and indices (a fresh process each)."""
    assert "cpu" in cross_vocab_backends()
    fused, reference = _peak("cpu"), _peak("reference")
    grad = fused["grad"]
    assert fused["peak"] <= 1.1 * grad + (16 << 20), (fused, grad)
    assert reference["peak"] >= 4 * grad, (reference, grad)
