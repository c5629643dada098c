"""The hard-label term: loss = distill_weight * (the method's loss) + ce_weight * CE(student, target) at T = 1, fused
into every backend's pass, against the float64 oracle; its parts; the fused-linear, sparse and parallel paths."""

import math

import pytest
import torch
from cases import CASES, case_id
from helpers import assert_close, check_against_oracle, make_inputs, run_loss

import kdkernels

WEIGHTS = {"ce_weight": 0.7, "distill_weight": 0.4}


@pytest.mark.parametrize("v", [37, 5000])  # one tile per row, and streamed rows
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_oracle(backend, device, case, reduction, v):
    """Every method with the term, T = 2 (the cross-entropy keeps T = 1 and no T^2), ignored rows, grad_output != 1,
    rows of one tile and streamed rows."""
    method, hp = case
    s, t, target = make_inputs((3, v), torch.float32, device, seed=v % 89, ignored=1)
    grad_output = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64) if reduction == "none" else 0.8
    check_against_oracle(method, hp, s, t, target, backend, reduction, grad_output, temperature=2.0, **WEIGHTS)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("kd", "jsd", "bdkd", "dkd", "gdkd")], ids=case_id)
def test_temperature_one_sum_and_normalizer(backend, device, case):
    """At T = 1 the kernels share the method's softmax with the cross-entropy; sum and a normalizer."""
    method, hp = case
    s, t, target = make_inputs((2, 3, 41), torch.float32, device, seed=3, ignored=2)
    check_against_oracle(method, hp, s, t, target, backend, "sum", 1.3, temperature=1.0, **WEIGHTS)
    check_against_oracle(
        method,
        hp,
        s,
        t,
        target,
        backend,
        "batchmean",
        -0.6,
        temperature=1.0,
        ce_weight=1.0,
        normalizer=torch.tensor(9.0, device=device),
    )


def test_parts_are_the_terms(backend, device):
    """return_parts gives (loss, distill, ce): the method's loss and the cross-entropy, unweighted, reduced like the
    loss, not differentiable; a call of each term alone gives the same values."""
    s, t, target = make_inputs((4, 50), torch.float32, device, seed=4)
    for reduction in ("batchmean", "sum", "none"):
        parts = kdkernels.dkd_loss(s, t, target, backend=backend, reduction=reduction, return_parts=True, **WEIGHTS)
        distill = kdkernels.dkd_loss(s, t, target, backend=backend, reduction=reduction)
        ce = kdkernels.kd_loss(s, t, target, backend=backend, reduction=reduction, ce_weight=1.0, distill_weight=0.0)
        assert_close(parts.distill, distill.detach().double().cpu().numpy(), torch.float32, "distill part")
        assert_close(parts.ce, ce.detach().double().cpu().numpy(), torch.float32, "ce part")
        assert_close(parts.loss, (0.4 * distill + 0.7 * ce).detach().double().cpu().numpy(), torch.float32, "loss")
        assert not parts.distill.requires_grad and not parts.ce.requires_grad
    # Without a target there is no cross-entropy: ce is None; with ce_weight = 0 it is still reported.
    assert kdkernels.kd_loss(s, t, backend=backend, return_parts=True).ce is None
    only_kd = kdkernels.kd_loss(s, t, target, backend=backend, return_parts=True)
    assert_close(only_kd.ce, ce.sum().item() / 3, torch.float32, "ce of a kd-only call")  # (one row ignored)


def test_cross_entropy_matches_torch(backend, device):
    """ce_weight = 1, distill_weight = 0 is torch's cross_entropy (ignore_index, mean over rows not ignored)."""
    s, t, target = make_inputs((6, 333), torch.float32, device, seed=5, ignored=2)
    loss, grad = run_loss("jsd", s, t, target, {}, backend, ce_weight=1.0, distill_weight=0.0, temperature=3.0)
    x = s.detach().clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(x, target, ignore_index=-100)
    want.backward()
    assert_close(loss, want.item(), torch.float32, "loss")
    assert_close(grad, x.grad.double().cpu().numpy(), torch.float32, "gradient")


def test_bad_weights_and_missing_target(backend, device):
    s, t, target = make_inputs((3, 10), torch.float32, device, seed=6)
    with pytest.raises(ValueError, match="ce_weight > 0 .* needs target"):
        kdkernels.kd_loss(s, t, ce_weight=0.5, backend=backend)
    for name, value, error in (
        ("ce_weight", -0.1, ValueError),
        ("distill_weight", math.nan, TypeError),
        ("ce_weight", "1", TypeError),
        ("distill_weight", True, TypeError),
    ):
        with pytest.raises(error, match=name):
            kdkernels.kd_loss(s, t, target, backend=backend, **{name: value})
        with pytest.raises(error, match=name):
            kdkernels.KDLoss(backend=backend, **{name: value})
    bad = target.clone()
    bad[0] = 10
    with pytest.raises(IndexError, match=r"\[0, 10\)"):  # the target is now read: it is bounds-checked
        kdkernels.kd_loss(s, t, bad, ce_weight=1.0, backend=backend)


def test_module_and_generated_function_take_the_weights(device):
    s, t, target = make_inputs((4, 12), torch.float32, device, seed=7)
    module = kdkernels.WSDLoss(lam=0.3, ce_weight=0.5, distill_weight=2.0, return_parts=True)
    got = module(s, t, target)
    want = kdkernels.wsd_loss(s, t, target, lam=0.3, ce_weight=0.5, distill_weight=2.0, return_parts=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert "ce_weight=0.5" in repr(module)


@pytest.mark.parametrize("method,hp", [("kd", {}), ("rkl", {}), ("skew_fkl", {"skew": 0.3})])
def test_sparse_teacher(backend, device, method, hp):
    """The sparse paths: the method's loss over the k + 1 bins plus the cross-entropy of the whole student row."""
    s, t, target = make_inputs((5, 16), torch.float32, device, seed=8)
    top = torch.log_softmax(t.double() / 2.0, -1).float().topk(4, -1)
    teacher = kdkernels.SparseTeacher(top.indices, top.values)
    got, grad = run_loss(method, s, teacher, target, hp, backend, temperature=2.0, **WEIGHTS)
    distill, distill_grad = run_loss(method, s, teacher, target, hp, backend, temperature=2.0)
    ce, ce_grad = run_loss(method, s, t, target, hp, "reference", ce_weight=1.0, distill_weight=0.0)
    assert_close(got, (0.4 * distill + 0.7 * ce).item(), torch.float32, "loss")
    assert_close(grad, (0.4 * distill_grad + 0.7 * ce_grad).double().cpu().numpy(), torch.float32, "gradient")


SMOOTHING = {**WEIGHTS, "label_smoothing": 0.1}


def smoothing_inputs(shape, device, seed):
    """make_inputs with class 3 masked in both models (the smoothing's mean skips it), never a target."""
    s, t, target = make_inputs(shape, torch.float32, device, seed=seed, ignored=1)
    s[..., 3] = t[..., 3] = float("-inf")
    return s, t, torch.where(target == 3, 4, target)


# Every case on rows of one tile; streamed rows for kd (the kernels' own kd path), jsd (the divergence family's) and
# dkd (the decoupled family's): label smoothing is the hard-label term's code, which the methods of a path share.
SMOOTHING_ROWS = [(case, 37) for case in CASES]
SMOOTHING_ROWS += [(c, 5000) for c in CASES if case_id(c) in ("kd", "jsd-beta=0.5", "dkd")]


@pytest.mark.parametrize(("case", "v"), SMOOTHING_ROWS, ids=[f"{case_id(c)}-{v}" for c, v in SMOOTHING_ROWS])
def test_label_smoothing_matches_oracle(backend, device, case, v):
    """label_smoothing in every backend's pass: every method, T = 2, a masked class, ignored rows, grad_output != 1."""
    method, hp = case
    s, t, target = smoothing_inputs((3, v), device, seed=v % 83)
    grad_output = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    check_against_oracle(method, hp, s, t, target, backend, "none", grad_output, temperature=2.0, **SMOOTHING)
    options = dict(temperature=1.0, standardize=True, **SMOOTHING)
    check_against_oracle(method, hp, s, t, target, backend, "batchmean", 0.8, **options)


def test_label_smoothing_is_transformers_label_smoother(backend, device):
    """ce_weight = 1, distill_weight = 0 with label_smoothing is transformers' LabelSmoother (loss and gradient)."""
    from transformers.trainer_pt_utils import LabelSmoother

    s, t, target = make_inputs((2, 5, 50), torch.float32, device, seed=9, ignored=2)
    loss, grad = run_loss("kd", s, t, target, {}, backend, ce_weight=1.0, distill_weight=0.0, label_smoothing=0.2)
    x = s.detach().clone().requires_grad_(True)
    want = LabelSmoother(epsilon=0.2)({"logits": x}, target)
    want.backward()
    assert_close(loss, want.item(), torch.float32, "loss")
    assert_close(grad, x.grad.double().cpu().numpy(), torch.float32, "gradient")


def test_label_smoothing_fused_linear_and_sparse(backend, device):
    """The fused-linear path (dense and sparse teachers) and the sparse path smooth as the dense loss does."""
    g = torch.Generator().manual_seed(10)
    h, w = torch.randn(6, 8, generator=g).to(device), torch.randn(40, 8, generator=g).to(device)
    h_t, w_t = torch.randn(6, 8, generator=g).to(device), torch.randn(40, 8, generator=g).to(device)
    target = torch.tensor([1, 5, -100, 7, 39, 0], device=device)
    options = dict(temperature=2.0, backend=backend, **SMOOTHING)
    dense = kdkernels.kd_loss(h @ w.T, h_t @ w_t.T, target, **options)
    fused = kdkernels.linear_distill_loss("kd", h, w, h_t, w_t, target, chunk_size=4, **options)
    assert_close(fused, dense.item(), torch.float32, "fused-linear")
    top = torch.log_softmax(h_t @ w_t.T / 2.0, -1).topk(4, -1)
    teacher = kdkernels.SparseTeacher(top.indices, top.values)
    sparse = kdkernels.kd_loss(h @ w.T, teacher, target, **options)
    want = 0.4 * kdkernels.kd_loss(h @ w.T, teacher, target, temperature=2.0, backend=backend)
    ce = dict(ce_weight=1.0, distill_weight=0.0, label_smoothing=0.1, backend="reference")
    want += 0.7 * kdkernels.kd_loss(h @ w.T, h_t @ w_t.T, target, **ce)
    assert_close(sparse, want.item(), torch.float32, "sparse")
    linear_sparse = kdkernels.linear_distill_loss("kd", h, w, teacher, None, target, chunk_size=4, **options)
    assert_close(linear_sparse, want.item(), torch.float32, "fused-linear, sparse")


def test_label_smoothing_bad_values(backend, device):
    s, t, target = make_inputs((3, 10), torch.float32, device, seed=6)
    for value, error, match in [
        (1.0, ValueError, r"label_smoothing must be in \[0, 1\)"),
        (-0.1, ValueError, "label_smoothing must be >= 0"),
        ("0.1", TypeError, "label_smoothing must be a finite number"),
        (float("nan"), TypeError, "label_smoothing must be a finite number"),
    ]:
        with pytest.raises(error, match=match):
            kdkernels.kd_loss(s, t, target, backend=backend, ce_weight=1.0, label_smoothing=value)
    with pytest.raises(ValueError, match="ce_weight=0 leaves out"):
        kdkernels.kd_loss(s, t, target, backend=backend, label_smoothing=0.1)
