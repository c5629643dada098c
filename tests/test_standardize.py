"""Logit standardization (standardize=True): the authors' formulas in float64, every backend and method against the
float64 oracle (tests/oracle.py _zscore), streamed rows, offset and masked logits, a constant row, the fused-linear
and module paths, and bad input. The vocabulary-parallel path is in test_parallel.py."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import CASES, case_id
from helpers import assert_close, check_against_oracle, make_inputs, run_loss, streamed_width
from oracle import oracle

import kdkernels


def normalize(logit):
    """sunshangquan/logit-standardization-KD's z-score (mdistiller/distillers/KD.py, DKD.py)."""
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def authors_kd(s, t, T):
    """Their kd_loss with logit_stand=True: KL summed over classes, mean over the batch, times T^2."""
    log_q = F.log_softmax(normalize(s) / T, dim=1)
    p = F.softmax(normalize(t) / T, dim=1)
    return F.kl_div(log_q, p, reduction="none").sum(1).mean() * T**2


def authors_dkd(s, t, target, alpha, beta, T):
    """Their dkd_loss with logit_stand=True (masks, cat_mask, the -1000 trick, T^2 / batch)."""
    s, t = normalize(s), normalize(t)
    gt = F.one_hot(target, s.shape[-1]).to(s.dtype)
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / s.shape[0]
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), F.softmax(t / T - 1000.0 * gt, 1), reduction="sum")
    return alpha * tckd + beta * nckd * T**2 / s.shape[0]


FLOAT64_BACKENDS = [b for b in ("reference", "cpu") if b in kdkernels.available_backends("cpu")]


@pytest.mark.parametrize("name", FLOAT64_BACKENDS)
@pytest.mark.parametrize("T", [2.0, 4.0])
def test_kd_matches_the_authors_code(name, T):
    s, t, _ = make_inputs((8, 100), torch.float64, seed=21, ignored=0)
    s.requires_grad_(True)
    got = kdkernels.kd_loss(s, t, temperature=T, standardize=True, backend=name)
    want = authors_kd(s, t, T)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("name", FLOAT64_BACKENDS)
def test_dkd_matches_the_authors_code(name):
    """Their DKD with --logit-stand: alpha and beta times kd_weight 9, T = 2."""
    s, t, target = make_inputs((8, 100), torch.float64, seed=22, ignored=0)
    s.requires_grad_(True)
    got = kdkernels.dkd_loss(s, t, target, alpha=9.0, beta=72.0, temperature=2.0, standardize=True, backend=name)
    want = authors_dkd(s, t, target, 9.0, 72.0, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_matches_oracle(backend, device, case, reduction):
    """Every method: ignored rows, 3-D input, grad_output != 1, T != the default, the hard-label term (raw logits)."""
    method, hp = case
    dtypes = [torch.float64, torch.float32] if backend in ("reference", "cpu") else [torch.float32]
    for dtype in dtypes:
        s, t, target = make_inputs((2, 3, 37), dtype, device, seed=hash(case_id(case)) % 997, ignored=1)
        grad_output = torch.linspace(-1.5, 2.0, 6, dtype=torch.float64).reshape(2, 3) if reduction == "none" else 0.7
        check_against_oracle(
            method, hp, s, t, target, backend, reduction, grad_output, standardize=True, temperature=2.0, ce_weight=0.4
        )


STREAMED = [
    c
    for c in CASES
    if c
    in (
        ("kd", {}),
        ("rkl", {}),
        ("jsd", {"beta": 0.3}),
        ("bdkd", {}),
        ("dkd", {}),
        ("gdkd", {"k": 2, "w1": 2.0, "kl_type": "both"}),
        ("cakd", {"strong": "threshold", "tau": 0.3}),
    )
]


@pytest.mark.parametrize("case", STREAMED, ids=case_id)
def test_streamed_rows(fused, device, case):
    """A row streamed in tiles (moments merged tile by tile, the Jacobian's sums in a pass of their own)."""
    method, hp = case
    s, t, target = make_inputs((3, streamed_width(fused, device)), torch.float32, device, seed=23, ignored=1)
    check_against_oracle(method, hp, s, t, target, fused, "none", torch.tensor([0.5, -1.0, 2.0]), standardize=True)


@pytest.mark.parametrize("method,hp", [("kd", {}), ("dkd", {}), ("gdkd", {"k": 3})])
def test_offset_logits_no_worse_than_eager(backend, device, method, hp):
    """Logits offset by +-1000 (and scaled): float32 loses digits in the mean; every backend stays within
    tolerance of the float64 truth and no worse than the eager reference on the same float32 inputs."""
    s, t, target = make_inputs((4, 300), torch.float64, device, seed=24, ignored=0)
    s32, t32 = (s * 0.5 + 1000).float(), (t * 2 - 1000).float()
    spec = kdkernels.METHODS[method]
    want_loss, want_grad = oracle(
        method,
        s32.double().cpu().numpy(),
        t32.double().cpu().numpy(),
        target.cpu().numpy(),
        spec.resolve(hp),
        spec.temperature,
        spec.t2_scale,
        "none",
        standardize=True,
    )
    errors = {}
    for name in {backend, "reference"}:
        loss, grad = run_loss(method, s32, t32, target, hp, name, "none", standardize=True)
        errors[name] = [
            np.abs(got.detach().double().cpu().numpy() - want).max() / np.abs(want).max()
            for got, want in ((loss, want_loss), (grad, want_grad))
        ]
    for what, k, e in zip(("loss", "gradient"), errors[backend], errors["reference"]):
        assert k <= 1e-3, f"{what}: error {k:.3e}"
        assert k <= 2 * e + 1e-5, f"{what}: {backend} error {k:.3e} worse than the eager reference's {e:.3e}"


@pytest.mark.parametrize("case", [("kd", {}), ("jsd", {"beta": 0.3}), ("dkd", {}), ("gdkd", {"k": 3})], ids=case_id)
def test_masked_classes_are_left_out_of_the_statistics(backend, device, case):
    """-inf in both logits is the same as removing the class, row statistics included; its gradient is 0."""
    method, hp = case
    s, t, target = make_inputs(
        (4, 23), torch.float64 if backend == "reference" else torch.float32, device, seed=25, ignored=1
    )
    masked = [1, 5, 6, 22]
    keep = torch.tensor([i for i in range(23) if i not in masked], device=device)
    target = torch.where(target == -100, target, keep[torch.arange(4, device=device) % keep.numel()])
    s_masked, t_masked = s.clone(), t.clone()
    s_masked[:, masked] = t_masked[:, masked] = -math.inf
    loss, grad = run_loss(method, s_masked, t_masked, target, hp, backend, "none", standardize=True, ce_weight=0.5)
    compact = torch.where(target == -100, target, torch.searchsorted(keep, target))
    want, want_grad = run_loss(
        method, s[:, keep], t[:, keep], compact, hp, backend, "none", standardize=True, ce_weight=0.5
    )
    assert_close(loss, want.detach().double().cpu().numpy(), s.dtype, "loss")
    assert torch.equal(grad[:, masked], torch.zeros_like(grad[:, masked]))
    assert_close(grad[:, keep], want_grad.double().cpu().numpy(), s.dtype, "gradient")


def test_constant_and_one_class_rows_are_finite(backend, device):
    """std = 0 (a constant row, or a row with one unmasked class): z = 0, the std's derivative taken as 0, so a
    finite loss with a finite gradient (the authors' torch code gives NaN gradients there)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    s, t, target = make_inputs((3, 17), dtype, device, seed=26, ignored=0)
    s[0] = 2.5
    s[1, 1:] = -math.inf
    t[1, 1:] = -math.inf
    loss, grad = run_loss("kd", s, t, target, {}, backend, "none", standardize=True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want_loss, want_grad = oracle(
        "kd", s.double().cpu().numpy(), t.double().cpu().numpy(), None, {}, 4.0, True, "none", standardize=True
    )
    assert_close(loss, want_loss, dtype, "loss")
    assert_close(grad, want_grad, dtype, "gradient")


def test_partition_ranks_the_raw_teacher_logits(backend, device):
    """Two teacher logits one float32 ulp apart z-score to the same float32 value: every backend still ranks the
    raw logits (as the float64 oracle's exact z-scores do), top-k and threshold alike."""
    t = torch.tensor(
        [[1.0, float(np.nextafter(np.float32(1.0), np.float32(2.0))), -1000.0, -1000.0]] * 2, device=device
    )
    s = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 1.0, -2.0]], device=device)
    for method, hp in (("gdkd", {"k": 1}), ("cakd", {"strong": "threshold", "tau": 0.999999})):
        check_against_oracle(
            method, hp, s, t, None, backend, "none", torch.ones(2, dtype=torch.float64), standardize=True
        )


def test_constant_rows_get_std_zero(backend, device):
    """A constant row whose float32 mean is inexact (7.7): the mean is corrected, std = 0, z = 0 exactly."""
    s, t, _ = make_inputs((2, 37), torch.float32, device, seed=31, ignored=0)
    s[0] = 7.7
    t[1] = -3.3
    check_against_oracle("kd", {}, s, t, None, backend, "none", torch.tensor([1.0, 0.5]), standardize=True)


def test_a_class_only_the_student_masks_stays_out_of_the_jacobian(backend, device):
    """kd where the student masks a class the teacher gives mass: the loss is infinite, but the gradient of the
    other classes is finite and the same on every backend (the z-score's sums run over the unmasked classes only,
    though the method's gradient there is -p_j, not 0)."""
    s, t, _ = make_inputs(
        (3, 29), torch.float64 if backend == "reference" else torch.float32, device, seed=32, ignored=0
    )
    s[:, 4] = -math.inf
    loss, grad = run_loss("kd", s, t, None, {}, backend, "none", standardize=True)
    _, want = run_loss("kd", s.double(), t.double(), None, {}, "reference", "none", standardize=True)
    keep = [j for j in range(29) if j != 4]
    assert torch.isinf(loss).all() and torch.isfinite(grad[:, keep]).all() and not grad[:, 4].any()
    assert_close(grad[:, keep], want[:, keep].cpu().numpy(), s.dtype, "gradient of the unmasked classes")


def test_nan_is_not_hidden(backend, device):
    """A NaN logit, or +inf (whose row mean is infinite), makes its row's loss NaN; the other rows are untouched."""
    s, t, target = make_inputs((4, 17), torch.float32, device, seed=27, ignored=0)
    s[1, 4] = math.nan
    t[2, 7] = math.inf
    loss, _ = run_loss("kd", s, t, target, {}, backend, "none", standardize=True)
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()


def test_linear_path_equals_full_logits():
    """linear_distill_loss(standardize=True) z-scores each chunk's rows: the same loss and gradients as the logits."""
    g = torch.Generator().manual_seed(28)
    hs, ht = torch.randn(37, 16, generator=g), torch.randn(37, 24, generator=g)
    ws, wt = torch.randn(300, 16, generator=g) * 0.3, torch.randn(300, 24, generator=g) * 0.3
    target = torch.randint(0, 300, (37,), generator=g)
    grads = []
    for linear in (True, False):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        if linear:
            loss = kdkernels.linear_distill_loss(
                "dkd",
                h,
                w,
                ht,
                wt,
                target,
                standardize=True,
                chunk_size=8,
                softcap=5.0,
                teacher_softcap=5.0,
                ce_weight=0.3,
            )
        else:
            logits = 5.0 * torch.tanh(h @ w.T / 5.0)
            loss = kdkernels.dkd_loss(
                logits, 5.0 * torch.tanh(ht @ wt.T / 5.0), target, standardize=True, ce_weight=0.3
            )
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


def test_module_and_repr():
    module = kdkernels.KDLoss(temperature=2.0, standardize=True)
    assert "standardize=True" in repr(module)
    s, t, _ = make_inputs((4, 10), torch.float32, seed=29)
    torch.testing.assert_close(module(s, t), kdkernels.kd_loss(s, t, temperature=2.0, standardize=True))


def test_bad_input():
    s, t, _ = make_inputs((4, 10), torch.float32, seed=30)
    with pytest.raises(TypeError, match="standardize must be True or False"):
        kdkernels.kd_loss(s, t, standardize="yes")
    with pytest.raises(TypeError, match="standardize must be True or False"):
        kdkernels.KDLoss(standardize=1)
    top = torch.log_softmax(t, -1).topk(3)
    with pytest.raises(ValueError, match="standardize z-scores the teacher's whole row"):
        kdkernels.kd_loss(s, kdkernels.SparseTeacher(top.indices, top.values), standardize=True)
