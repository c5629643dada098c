"""The full gradient: a learnable temperature (a 0-d tensor that requires grad) and a teacher whose logits require
grad (docs/losses.md, "Learnable temperature and the teacher's gradient").

gradcheck in float64 on the reference and the fused CPU kernels (finite differences of the loss in the student, the
teacher and T), then every fused backend against the float64 reference's autograd on the same float32 inputs: one
row tile and rows streamed past the tile, standardize, ignored rows, grad_output != 1. d loss / d T is a sum over
the row whose terms cancel: it is held to 4 times the float32 reference's error on the same inputs, or 1e-4
relative (its float32 error varies from input to input by more than 10 times).
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES, case_id
from helpers import assert_close, make_inputs

import kdkernels

# akl's weights are constants of its gradient by definition: finite differences see more (its full gradient is
# compared with the reference's autograd below, which holds them constant too).
GRADCHECK_CASES = [c for c in CASES if c[0] != "akl"]
STREAMED_STANDARDIZE = ("kd", "jsd-beta=0.5", "dkd", "gdkd-k=3", "akl", "cakd-strong=threshold-tau=0.3")


def _loss(method, hp, s, t, temperature, target, backend, **options):
    return kdkernels.distill_loss(method, s, t, target, temperature=temperature, backend=backend, **hp, **options)


# The fused backends' backward consumes the gradient their forward computed (scaled in place), so gradcheck, which
# runs backward several times through one graph, checks the reference; the fused ones are compared with it below.
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=case_id)
@pytest.mark.parametrize("float64_backend", ["reference"])
def test_gradcheck_teacher_and_temperature(float64_backend, case, standardize):
    method, hp = case
    if method == "aekt":  # its weight min(P / Q, max_weight) is a constant by definition: keep it at its clamp
        hp = {**hp, "max_weight": 1e-3}
    s, t, target = make_inputs((3, 7), torch.float64, seed=21, ignored=1)
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    temperature = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)

    def f(s, t, temperature):
        return _loss(method, hp, s, t, temperature, target, float64_backend, reduction="none", standardize=standardize)

    assert torch.autograd.gradcheck(f, (s, t, temperature), eps=1e-6, atol=1e-6)


def _grads(method, hp, s, t, temperature, target, backend, grad_output, **options):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    temperature = temperature.detach().clone().requires_grad_(True)
    loss = _loss(method, hp, s, t, temperature, target, backend, **options)
    loss.backward(grad_output if loss.dim() else grad_output.sum())
    return loss.detach(), s.grad, t.grad, temperature.grad


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_backends_match_the_reference(case, fused, device):
    method, hp = case
    shapes = [(13, False), (13, True), (4500, False)]
    if case_id(case) in STREAMED_STANDARDIZE:
        shapes.append((4500, True))
    for v, standardize in shapes:
        s, t, target = make_inputs((3, v), seed=22, ignored=1)
        s[:, 5] = t[:, 5] = float("-inf")  # a class masked in both: no NaN in any gradient, d loss / d T included
        target[target == 5] = 6
        go = torch.tensor([0.5, -1.5, 2.0])
        _check_against_reference(method, hp, s, t, target, go, fused, device, standardize, f"V={v}")


# (Not V = 1, where every loss is 0 and its float32 rounding at T = 1.7 is held to a tolerance relative to 0.)
@pytest.mark.parametrize("v", [2, 9, 17, 257])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_short_rows(case, fused, device, v):
    """Short rows (11 of them), V around a vector's 16 float32 lanes and akl's short lists' limit (256), ignored rows
    and a class masked in both."""
    method, hp = case
    if "k" in hp and hp["k"] >= v:
        hp = {**hp, "k": 1}
    s, t, target = make_inputs((11, v), seed=23, ignored=2)
    if v > 2:
        s[:, 0] = t[:, 0] = float("-inf")
        target = torch.where(target == -100, target, 1 + target % (v - 1))
    go = torch.linspace(-1.5, 2.0, 11)
    _check_against_reference(method, hp, s, t, target, go, fused, device, False, f"V={v}")


def _check_against_reference(method, hp, s, t, target, go, fused, device, standardize, what):
    """The loss and the student's, teacher's and temperature's gradients of ``fused`` against the float64
    reference's, at T = 1.7 with the cross-entropy term."""
    temperature = torch.tensor(1.7)
    options = dict(reduction="none", standardize=standardize, ce_weight=0.3, grad_output=go)
    want = _grads(method, hp, s.double(), t.double(), temperature.double(), target, "reference", **options)
    eager = _grads(method, hp, s, t, temperature, target, "reference", **options)
    got = _grads(
        method,
        hp,
        s.to(device),
        t.to(device),
        temperature.to(device),
        target.to(device),
        fused,
        **{**options, "grad_output": go.to(device)},
    )
    what = f"{method} {hp} {what} standardize={standardize}"
    assert_close(got[0], want[0].numpy(), torch.float32, f"{what} loss")
    assert_close(got[1], want[1].numpy(), torch.float32, f"{what} student gradient")
    assert_close(got[2], want[2].numpy(), torch.float32, f"{what} teacher gradient")
    error, eager_error = (abs(float(x[3]) - float(want[3])) for x in (got, eager))
    assert error <= 4 * eager_error + 1e-4 * abs(float(want[3])) + 1e-7, (
        what,
        float(got[3]),
        float(want[3]),
        float(eager[3]),
    )


def test_teacher_or_temperature_alone_and_reductions(backend, device):
    """Only the temperature learns (the teacher's gradient is not stored), only the teacher does, and batchmean with a
    normalizer: each equal to the reference."""
    s, t, target = make_inputs((5, 300), seed=23, ignored=1)
    s, t, target = s.to(device), t.to(device), target.to(device)
    for teacher_grad, temperature_grad in ((False, True), (True, False)):
        tt = t.clone().requires_grad_(teacher_grad)
        temperature = torch.tensor(2.5, device=device, requires_grad=temperature_grad)
        loss = kdkernels.dkd_loss(s, tt, target, temperature=temperature, normalizer=7.0, backend=backend)
        loss.backward()
        t64 = t.double().clone().requires_grad_(teacher_grad)
        temperature64 = torch.tensor(2.5, dtype=torch.float64, requires_grad=temperature_grad)
        want = kdkernels.dkd_loss(
            s.double().cpu(), t64.cpu(), target.cpu(), temperature=temperature64, normalizer=7.0, backend="reference"
        )
        want.backward()
        assert_close(loss, want.detach().numpy(), torch.float32, "loss")
        assert (tt.grad is None) != teacher_grad and (temperature.grad is None) != temperature_grad
        if teacher_grad:
            assert_close(tt.grad, t64.grad.numpy(), torch.float32, "teacher gradient")
        else:
            assert abs(float(temperature.grad) - float(temperature64.grad)) <= 1e-4 * abs(float(temperature64.grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_gradient_backward_scales_in_place(fused, device, dtype):
    """The full gradient's backward scales the gradients its forward kept, in place, as the plain path does: with a
    per-row grad_output they equal the reference's, and a second backward through the same loss is refused."""
    s, t, target = make_inputs((6, 300), dtype, device, seed=31, ignored=1)
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    temperature = torch.tensor(1.7, device=device, requires_grad=True)
    weights = torch.tensor([0.5, 2.0, 0.0, 1.0, -3.0, 1.5], device=device)
    loss = (kdkernels.jsd_loss(s, t, target, temperature=temperature, reduction="none", backend=fused) * weights).sum()
    loss.backward(retain_graph=True)
    s64, t64 = (x.detach().double().cpu().requires_grad_(True) for x in (s, t))
    temperature64 = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    want = kdkernels.jsd_loss(s64, t64, target.cpu(), temperature=temperature64, reduction="none", backend="reference")
    (want * weights.double().cpu()).sum().backward()
    assert_close(s.grad, s64.grad.numpy(), dtype, "student gradient")
    assert_close(t.grad, t64.grad.numpy(), dtype, "teacher gradient")
    assert abs(float(temperature.grad) - float(temperature64.grad)) <= 1e-3 * abs(float(temperature64.grad)) + 1e-6
    with pytest.raises(RuntimeError, match="kdkernels: the fused loss's saved gradient was already used"):
        loss.backward()


def test_nothing_extra_without_a_gradient_to_compute(monkeypatch, backend, device):
    """With neither the teacher nor the temperature requiring grad (or under no_grad), the plain path runs."""
    chosen = kdkernels.backends.select_backend(backend, torch.empty(0, device=device))

    def refuse(*args):
        raise AssertionError("the full-gradient path ran")

    monkeypatch.setattr(chosen, "full", refuse)
    s, t, target = make_inputs((4, 50), seed=24)
    s, t = s.to(device).requires_grad_(True), t.to(device)
    kdkernels.kd_loss(s, t, target.to(device), temperature=torch.tensor(2.0, device=device), backend=backend).backward()
    with torch.no_grad():
        kdkernels.kd_loss(s, t.requires_grad_(True), target.to(device), backend=backend)
    with pytest.raises(AssertionError, match="full-gradient path"):
        kdkernels.kd_loss(s, t, target.to(device), backend=backend)


def test_bad_temperatures_and_unsupported_paths_raise(device):
    s, t, target = make_inputs((3, 8), seed=25)
    s, t, target = s.to(device), t.to(device), target.to(device)
    with pytest.raises(TypeError, match="temperature must be a number or a 0-d floating-point tensor"):
        kdkernels.kd_loss(s, t, temperature=torch.tensor([2.0], device=device))
    with pytest.raises(TypeError, match="temperature must be a number or a 0-d floating-point tensor"):
        kdkernels.kd_loss(s, t, temperature=torch.tensor(2, device=device))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kdkernels.kd_loss(s, t, temperature=torch.tensor(-1.0, device=device, requires_grad=True))
    sparse = kdkernels.SparseTeacher.from_logits(t, 3)
    with pytest.raises(ValueError, match="SparseTeacher is a constant"):
        kdkernels.kd_loss(s, sparse, temperature=torch.tensor(2.0, device=device, requires_grad=True))
    learning = kdkernels.SparseTeacher(sparse.indices, sparse.values.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="SparseTeacher is a constant: its values must not require grad"):
        kdkernels.kd_loss(s, learning)
    with pytest.raises(TypeError, match="not by the loss modules"):
        kdkernels.KDLoss(temperature=torch.tensor(2.0, device=device))
    with pytest.raises(ValueError, match="SparseTeacher is a constant"):
        kdkernels.linear_distill_loss(
            "kd",
            s,
            torch.eye(8, device=device),
            sparse,
            None,
            temperature=torch.tensor(2.0, device=device, requires_grad=True),
        )
    with pytest.raises(ValueError, match="needs a fused backend"):
        kdkernels.linear_distill_loss(
            "kd",
            s,
            torch.eye(8, device=device),
            s,
            torch.eye(8, device=device),
            temperature=torch.tensor(2.0, device=device, requires_grad=True),
            backend="reference",
        )


@pytest.mark.parametrize("learns", ["temperature", "teacher", "both"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("case", [("kd", {}), ("jsd", {"beta": 0.3}), ("dkd", {})], ids=case_id)
def test_full_gradient_in_fused_linear(case, reduction, learns, fused, device):
    """linear_distill_loss with a temperature tensor and/or a teacher whose hidden states require grad: the loss,
    d loss / d T and every gradient of both heads equal distill_loss on the full logits, over several chunks, with
    softcaps, a teacher logit scale, biases and the hard-label term."""
    method, hp = case
    g = torch.Generator().manual_seed(26)
    hidden, weight = torch.randn(11, 6, generator=g), torch.randn(40, 6, generator=g)
    t_hidden, t_weight, t_bias = torch.randn(11, 5, generator=g), torch.randn(40, 5, generator=g), torch.randn(40)
    target = torch.randint(0, 40, (11,), generator=g)
    target[3] = -100
    go = torch.linspace(0.5, 2.0, 11) if reduction == "none" else torch.tensor(1.3)
    options = dict(reduction=reduction, ce_weight=0.2, **hp)
    learn_t, learn_teacher = learns in ("temperature", "both"), learns in ("teacher", "both")
    results = []
    for linear in (True, False):
        leaves = [x.clone().to(device).requires_grad_(True) for x in (hidden, weight)]
        teacher = [x.clone().to(device).requires_grad_(learn_teacher) for x in (t_hidden, t_weight, t_bias)]
        temperature = torch.tensor(2.5, device=device, requires_grad=learn_t)
        if linear:
            loss = kdkernels.linear_distill_loss(
                method,
                *leaves,
                *teacher[:2],
                target.to(device),
                teacher_bias=teacher[2],
                temperature=temperature,
                softcap=5.0,
                teacher_softcap=7.0,
                teacher_logit_scale=1.5,
                chunk_size=4,
                backend=fused,
                **options,
            )
        else:
            student_logits = 5.0 * torch.tanh(leaves[0] @ leaves[1].t() / 5.0)
            teacher_logits = 7.0 * torch.tanh(1.5 * (teacher[0] @ teacher[1].t() + teacher[2]) / 7.0)
            loss = kdkernels.distill_loss(
                method,
                student_logits,
                teacher_logits,
                target.to(device),
                temperature=temperature,
                backend="reference",
                **options,
            )
        loss.backward(go.to(device))
        results.append([loss.detach(), *(x.grad for x in leaves), *(x.grad for x in teacher), temperature.grad])
    names = (
        "loss",
        "hidden grad",
        "weight grad",
        "teacher hidden grad",
        "teacher weight grad",
        "teacher bias grad",
        "d loss / d T",
    )
    for got, want, what in zip(*results, names):
        assert (got is None) == (want is None), what
        if got is not None:
            torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5, msg=f"{method} {reduction} {learns} {what}")
