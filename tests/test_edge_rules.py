"""The edge-case rules of docs/losses.md (section 10) where the backends used to disagree (issue 22, items 1-7): each
on every backend, against the float64 oracle, which implements the rules independently."""

import math

import numpy as np
import pytest
import torch
from cases import CASES, case_id
from helpers import assert_close
from oracle import oracle

import kdkernels
from kdkernels.backends.triton import common as triton_common

DIVERGENCE_CASES = [c for c in CASES if kdkernels.METHODS[c[0]].family == "divergence"]
INF, NAN = math.inf, math.nan


def _oracle_rows(method, hp, s, t, target, **options):
    """The oracle's per-row losses and gradient (reduction "none", grad_output 1)."""
    spec = kdkernels.METHODS[method]
    return oracle(
        method,
        s.double().numpy(),
        t.double().numpy(),
        None if target is None else target.numpy(),
        spec.resolve(hp),
        options.get("temperature", spec.temperature),
        options.get("t2_scale", spec.t2_scale),
        "none",
        ce_weight=options.get("ce_weight", 0.0),
        distill_weight=options.get("distill_weight", 1.0),
        standardize=options.get("standardize", False),
        float64_math=s.dtype == torch.float64,
    )


def _loss_rows(method, hp, s, t, target, backend, device, **options):
    """Per-row losses and d(sum of them)/ds from kdkernels, on ``device``."""
    x = s.to(device).clone().requires_grad_(True)
    loss = kdkernels.distill_loss(
        method,
        x,
        t.to(device),
        None if target is None else target.to(device),
        backend=backend,
        reduction="none",
        **hp,
        **options,
    )
    loss.sum().backward()
    return loss.detach().cpu(), x.grad.cpu()


def _check_rows(method, hp, s, t, target, backend, device, **options):
    """Every row's loss against the oracle (inf and NaN exactly), and the gradient of the rows whose loss is finite."""
    loss, grad = _loss_rows(method, hp, s, t, target, backend, device, **options)
    want, want_grad = _oracle_rows(method, hp, s, t, target, **options)
    assert_close(loss, want, s.dtype, f"{method} {hp} loss")
    finite = np.isfinite(want)
    assert_close(grad[torch.from_numpy(finite)], want_grad[finite], s.dtype, f"{method} {hp} gradient")
    return loss, grad


def _logits(n, v, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    return s.to(dtype), t.to(dtype)


# ---- Item 1: a term of weight 0 contributes exactly 0 -------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("method", ["kd", "dkd"])
@pytest.mark.parametrize("weights", [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)], ids=["ce0", "distill0", "both0"])
def test_a_term_of_weight_zero_contributes_nothing(backend, device, method, reduction, weights):
    """ce_weight = 0 on rows whose cross-entropy is infinite (the label masked in the student; the method's loss
    finite), distill_weight = 0 on rows whose method loss is infinite (a class the teacher gives mass masked in the
    student; the cross-entropy finite): the loss and its gradient are the other term's alone, finite (0 * inf made
    them NaN); return_parts still reports both terms as they are."""
    ce_weight, distill_weight = weights
    s, t = _logits(3, 7, seed=1)
    target = torch.tensor([1, 5, -100])
    if ce_weight == 0:  # row 0's label masked in both models: its CE infinite, the method's loss finite
        s[0, 1], t[0, 1] = -INF, -INF
    if distill_weight == 0:  # row 1's class 3 masked in the student only: the method's loss infinite, CE finite
        s[1, 3] = -INF
    options = dict(ce_weight=ce_weight, distill_weight=distill_weight, return_parts=True)
    x = s.to(device).clone().requires_grad_(True)
    parts = kdkernels.distill_loss(
        method, x, t.to(device), target.to(device), backend=backend, reduction=reduction, **options
    )
    parts.loss.sum().backward()
    spec = kdkernels.METHODS[method]
    want, want_grad = oracle(
        method,
        s.double().numpy(),
        t.double().numpy(),
        target.numpy(),
        spec.resolve({}),
        spec.temperature,
        spec.t2_scale,
        reduction,
        ce_weight=ce_weight,
        distill_weight=distill_weight,
    )
    assert np.isfinite(want).all() and np.isfinite(want_grad).all()
    assert_close(parts.loss, want, torch.float32, "loss")
    assert_close(x.grad, want_grad, torch.float32, "gradient")
    for weight, term in ((ce_weight, parts.ce), (distill_weight, parts.distill)):
        assert weight != 0 or torch.isinf(term).any()  # the term left out is itself infinite


# ---- Items 2 and 6: a class whose probability underflows against a class the other model masks ----------------


@pytest.mark.parametrize("depth", [1000.0, 100.0], ids=["zero", "subnormal"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_underflow_against_a_masked_class_contributes_nothing(backend, device, case, depth):
    """A class one model masks (-inf) where the other's probability underflows, to 0 (logit 1000 below the row) or
    to a float32 subnormal (100 below: exp(-100) = 3.7e-44): both probabilities are 0 in float32, so the class
    contributes 0 and gets gradient 0, as a class masked in both does. The fused kernels gave NaN (0 * inf) and the
    reference inf for a subnormal; float64 does not underflow there, so the oracle applies the float32 rule."""
    method, hp = case
    s, t = _logits(4, 9, seed=2)
    s[:, 1], t[:, 1] = s[:, 1] - depth, -INF  # the teacher masks it; the student's probability underflows
    s[:, 5], t[:, 5] = -INF, t[:, 5] - depth  # the other way round
    loss, grad = _check_rows(method, hp, s, t, None, backend, device, temperature=1.0)
    assert torch.isfinite(loss).all()
    assert (grad[:, [1, 5]].abs() < torch.finfo(torch.float32).tiny).all()  # (0, or the reference's subnormal)


# ---- Item 3: abkd's limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hp, masked_in",
    [
        ({"alpha": 1.0, "beta": 0.0}, "teacher"),
        ({"alpha": 0.7, "beta": 0.0}, "teacher"),
        ({"alpha": 0.0, "beta": 1.0}, "student"),
        ({"alpha": 0.0, "beta": 0.6}, "student"),
    ],
)
def test_abkd_limits_finite_where_a_model_masks_a_class(backend, device, hp, masked_in):
    """abkd's beta = 0 limit (alpha > 0) is finite where the teacher masks a class the student gives mass, its
    alpha = 0 limit (beta > 0) where the student masks one (docs/losses.md, section 10): finite loss and gradient,
    the oracle's (they were NaN: 0 * -inf)."""
    s, t = _logits(3, 8, seed=3)
    (t if masked_in == "teacher" else s)[:, 2] = -INF
    loss, grad = _check_rows("abkd", hp, s, t, None, backend, device)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


# ---- Item 4: aekt with its label masked in both models ----------------------------------------------------------


@pytest.mark.parametrize("hp", [{}, {"max_weight": 0.5}])
def test_aekt_label_masked_in_both(backend, device, hp):
    """The label masked in both models: p_y = q_y = 0, so the target-class term is 0 and its weight a = 0 (a = 0
    wherever p_y = 0): the loss is beta * NCKD, finite, with a finite gradient, on every backend (the reference gave
    NaN, 0/0 = NaN ratio; CPU and Triton read the NaN ratio as max_weight)."""
    s, t = _logits(4, 6, seed=4)
    target = torch.tensor([1, 3, 1, -100])
    s[0, 1], t[0, 1] = -INF, -INF
    s[1, 3], t[1, 3] = -INF, -INF
    t[2, 1] = -INF  # p_y = 0 < q_y: a = 0 from the ratio itself
    loss, grad = _check_rows("aekt", hp, s, t, target, backend, device)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


# ---- Item 5: NaN is never hidden (Triton read a row whose maxes dropped a NaN as masked) -------------------------


@pytest.mark.parametrize("tile", [None, 32], ids=["one-tile", "streamed"])
@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("method", ["kd", "rkl", "dkd"])
def test_a_row_with_a_nan_logit_is_nan(backend, device, method, standardize, tile, monkeypatch):
    """A NaN in a row's logits makes that row's loss NaN, never 0: with standardize a NaN (or a +inf, whose mean is
    inf) turns the whole row's z-scores into NaN, and a row whose only unmasked logit is NaN: Triton's max drops
    NaN, so such rows looked masked in both logits (loss 0). ``tile``: Triton's tile, to stream a row of 97."""
    if tile is not None:
        monkeypatch.setattr(triton_common, "MAX_TILE", tile)
        monkeypatch.setattr(triton_common, "SMALL_TILE", tile)
    s, t = _logits(4, 97, seed=5)
    s, t = s + 1000, t + 1000
    s[0, 3], t[0, 7] = NAN, INF  # both rows' z-scores NaN with standardize
    s[1], t[1] = -INF, -INF
    s[1, 2] = NAN  # the only logit that is not -inf
    s[2, 5] = NAN
    target = torch.tensor([0, 2, 1, 4])
    loss, _ = _loss_rows(
        method, {}, s, t, target if method == "dkd" else None, backend, device, standardize=standardize
    )
    assert torch.isnan(loss[:3]).all(), loss
    assert torch.isfinite(loss[3]), loss


# ---- Item 6: the decoupled family's infinite cases --------------------------------------------------------------


@pytest.mark.parametrize(
    "method, hp, masked",
    [
        ("dkd", {}, "label"),
        ("aekt", {}, "label"),
        ("cakd", {"strong": "target"}, "label"),
        ("cakd", {"strong": "topk", "k": 3}, "top1"),
        ("gdkd", {"k": 3, "partitions": 3}, "top1"),
        ("gdkd", {"k": 3}, "top1"),
    ],
)
def test_decoupled_student_masks_its_label_or_top1(backend, device, method, hp, masked):
    """The student masks the label (TARGET partitions) or the teacher's top-1 class, which the teacher gives mass:
    the loss is +inf, as documented (the bin-mass KL and the in-bin KL against a bin the student gives no mass);
    the backends gave NaN (inf - inf) or inf by method. The other rows stay finite, with their gradient."""
    s, t = _logits(3, 10, seed=6)
    target = torch.tensor([2, 7, 4])
    t[:, 6] = 6.0  # the teacher's top-1
    masked_class = target[:2] if masked == "label" else torch.tensor([6, 6])
    s[torch.arange(2), masked_class] = -INF
    loss, _ = _check_rows(method, hp, s, t, target, backend, device)
    assert torch.isposinf(loss[:2]).all() and torch.isfinite(loss[2]), loss


# ---- Item 7: bdkd's weights when the entropies tie --------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 17.0], ids=["spread", "one-hot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bdkd_entropies_equal_within_rounding(backend, device, dtype, depth):
    """The student's logits a permutation of the teacher's (a 3-cycle of classes, the teacher's first among them):
    H(q) = H(p) exactly, while KL(p || q) != KL(q || p), so the weights 3 and 1 (or 1 and 3) change the loss.
    Computed, the two entropies differ by their rounding, whose sign the backends drew differently; they count as
    equal (weights 1 and 1) on every backend alike, as in the oracle (docs/losses.md, bdkd's tie). ``depth``: the
    teacher's other classes that far below its first, so that both entropies are near 0 (about 1e-6 in float32,
    1e-16 in float64, at 17 and 42) while the KLs are not."""
    g = torch.Generator().manual_seed(7)
    depth = depth * (42.0 / 17.0 if dtype == torch.float64 else 1.0)
    t = torch.randn(8, 11, generator=g, dtype=torch.float64) * (1.0 if depth == 0 else 0.3) - depth
    t[:, 0] = 0.0 if depth else t[:, 0]
    s = t[:, [2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 10]]  # classes 0, 1, 2 rotated
    s, t = s.to(dtype), t.to(dtype)
    s[7, 1:] = s[7, 1:] + 3.0  # a clear gap: H(q) > H(p), weights 1 and 3
    if backend == "triton" and dtype == torch.float64:  # (Triton computes in float32: it refuses float64 logits)
        with pytest.raises(TypeError, match="float64"):
            _loss_rows("bdkd", {}, s, t, None, backend, device)
        return
    _check_rows("bdkd", {}, s, t, None, backend, device)


# ---- Found by the randomized differential test (tests/test_differential.py) -------------------------------------


@pytest.mark.parametrize("depth", [1000.0, 100.0], ids=["zero", "subnormal"])
@pytest.mark.parametrize(
    "method, hp",
    [("dkd", {}), ("cakd", {"strong": "threshold", "tau": 0.3}), ("aekt", {})],
    ids=["dkd", "cakd", "aekt"],
)
def test_decoupled_bin_absent_in_both_contributes_nothing(backend, device, method, hp, depth):
    """A bin whose mass underflows in one model (to 0, or to a float32 subnormal) where the other masks all of it:
    the bin counts as absent, as a bin of classes masked in both does, and the loss is the other bins', finite with
    a finite gradient (docs/losses.md, section 5). Row 0: the student masks the label, whose teacher logit is
    ``depth`` below the rest (dkd's and aekt's strong bin; cakd's rest bin, the one class below its threshold);
    row 1: the other way round. The kernels gave NaN (0 * inf in the bin-mass KL), the reference +inf (the in-bin
    KL of a bin holding all of its own mass), and so did the oracle."""
    s, t = _logits(3, 9, seed=8)
    t[:2] *= 0.1  # (within cakd's threshold of the top class: its rest bin is the one class below)
    target = torch.tensor([4, 4, 2])
    s[0, 4], t[0, 4] = -INF, t[0].max() - depth
    t[1, 4], s[1, 4] = -INF, s[1].max() - depth
    loss, grad = _check_rows(method, hp, s, t, target, backend, device, temperature=1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), loss


@pytest.mark.parametrize("masked", ["student", "teacher"])
@pytest.mark.parametrize("method, hp", [("aekt", {}), ("dkd", {"alpha": 0.0})], ids=["aekt", "dkd-alpha=0"])
def test_decoupled_row_masked_in_one_model_is_nan(backend, device, method, hp, masked):
    """A row one model masks entirely has no distribution for it: its loss is NaN (section 10), also where the
    bin-mass KL that carries the NaN has weight 0 (aekt's a = 0 with the label masked in both, dkd with alpha = 0).
    The fused kernels gave +inf there: the in-bin KL against a bin the masked model gives no mass."""
    s, t = _logits(2, 8, seed=9)
    target = torch.tensor([3, 3])
    (s if masked == "student" else t)[0] = -INF
    s[0, 3], t[0, 3] = -INF, -INF
    loss, _ = _loss_rows(method, hp, s, t, target, backend, device)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1]), loss


def test_cross_entropy_exact_for_offset_logits(backend, device):
    """The hard-label term on logits near 1e4, where an ulp is 9.8e-4: the reference took its gradient
    softmax(s) - onehot(y) through logsumexp, whose rounding there moved every probability by up to 5e-4 relative
    (25x the float32 tolerance), and the kernels its loss as (max + log z) - s_y, off by as much; both now take the
    difference of the two large logits first, which is exact."""
    s, t = _logits(8, 40, seed=10)
    s, t = s + 1e4, t + 1e4
    target = torch.arange(8)
    _check_rows("kd", {}, s, t, target, backend, device, ce_weight=1.0, distill_weight=0.0)
