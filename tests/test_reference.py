"""Properties of the pure-PyTorch reference itself: autograd gradients, identities and published formulations."""

import pytest
import torch
import torch.nn.functional as F
from cases import CASES, case_id
from helpers import make_inputs

import kdkernels
from kdkernels.backends import reference
from kdkernels.methods import DECOUPLED, Bin, DecoupledParams, Partition, Plan


# (akl's weights are constants of its gradient by definition, so finite differences see more: the float64 oracle,
# which writes that gradient out, checks it in test_kernels and test_losses.)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "akl"], ids=case_id)
def test_gradcheck(case):
    method, hp = case
    if method == "aekt":
        # a_r is detached by definition, so the true derivative differs unless a_r sits at its clamp.
        hp = {**hp, "max_weight": 1e-3}
    s, t, target = make_inputs((3, 7), torch.float64, seed=1, ignored=0)
    s.requires_grad_(True)

    def f(x):
        return kdkernels.distill_loss(method, x, t, target, backend="reference", reduction="none", **hp)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("split_top1", [False, True])
def test_decoupled_chain_rule_identity(split_top1):
    """w_mass = 1 and w_b = P_b turn the decoupled loss into KL(p || q) (the chain rule of KL)."""
    s, t, _ = make_inputs((6, 29), torch.float64, seed=2)
    s.requires_grad_(True)
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    bins = torch.randint(Bin.STRONG, Bin.REST + 1, lp.shape, generator=torch.Generator().manual_seed(5))
    bins[:, 1] = Bin.REST  # keep one bin non-empty, leave the strong bin possibly empty
    if split_top1:
        bins[:, 0] = Bin.TOP1  # a bin of one class: no in-bin KL
    masses = [torch.where(bins == b, lp.exp(), 0.0).sum(-1) for b in Bin]
    plan = Plan(
        DECOUPLED, Partition.TOPK, DecoupledParams(w_mass=1.0, w_strong=masses[Bin.STRONG], w_rest=masses[Bin.REST])
    )
    got = reference.decoupled_rows(plan, lp, lq, bins)
    want = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), s, retain_graph=True)
    (g_want,) = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def mdistiller_dkd(s, t, target, alpha, beta, T):
    """DKD as mdistiller writes it: binary masses for TCKD, a -1000 logit mask for NCKD, T^2, / batch."""
    gt = F.one_hot(target, s.shape[-1]).to(s.dtype)
    other = 1 - gt
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.cat([(ps * gt).sum(1, keepdim=True), (ps * other).sum(1, keepdim=True)], 1)
    bt = torch.cat([(pt * gt).sum(1, keepdim=True), (pt * other).sum(1, keepdim=True)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / s.shape[0]
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), F.softmax(t / T - 1000.0 * gt, 1), reduction="sum")
    return alpha * tckd + beta * nckd * T**2 / s.shape[0]


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_mdistiller(alpha, beta, T):
    s, t, target = make_inputs((8, 100), torch.float64, seed=4, ignored=0)
    s.requires_grad_(True)
    got = kdkernels.dkd_loss(s, t, target, alpha=alpha, beta=beta, temperature=T, backend="reference")
    want = mdistiller_dkd(s, t, target, alpha, beta, T)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-9, atol=1e-15)


def zaberko_gdkd(s, t, k, w0, w1, w2, T, strategy, kl_type):
    """GDKD as ZaberKo/GDKD writes it (2 partitions): the teacher's top-k ("best") or bottom-k ("worst") by
    torch.topk, bin masses from summed softmaxes, in-bin distributions by a -1000 logit mask after / T, in-bin
    divergence forward, reverse or the mean of both, each term batchmean and T^2-scaled."""
    top = torch.zeros_like(t, dtype=torch.bool).scatter_(
        1, torch.topk(t, k, 1, largest=strategy == "best").indices, True
    )
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * top).sum(1), (ps * ~top).sum(1)], 1)
    bt = torch.stack([(pt * top).sum(1), (pt * ~top).sum(1)], 1)
    loss = w0 * F.kl_div(torch.log(bs), bt, reduction="batchmean") * T**2

    def in_bin(mask_out):
        ls = F.log_softmax(s / T - 1000.0 * mask_out, 1)
        lt = F.log_softmax(t / T - 1000.0 * mask_out, 1)
        forward = F.kl_div(ls, lt, reduction="batchmean", log_target=True)
        reverse = F.kl_div(lt, ls, reduction="batchmean", log_target=True)
        return {"forward": forward, "reverse": reverse, "both": 0.5 * (forward + reverse)}[kl_type] * T**2

    return loss + w1 * in_bin(~top) + w2 * in_bin(top)


@pytest.mark.parametrize(
    "strategy,kl_type,T",
    [("best", "forward", 4.0), ("worst", "reverse", 4.0), ("best", "both", 1.0), ("worst", "both", 2.0)],
)
def test_gdkd_matches_zaberko(strategy, kl_type, T):
    s, t, _ = make_inputs((8, 100), torch.float64, seed=11, ignored=0)
    s.requires_grad_(True)
    hp = dict(k=5, w0=0.5, w1=2.0, w2=6.0)
    got = kdkernels.gdkd_loss(s, t, strategy=strategy, kl_type=kl_type, temperature=T, backend="reference", **hp)
    want = zaberko_gdkd(s, t, T=T, strategy=strategy, kl_type=kl_type, **hp)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-8, atol=1e-15)


def test_aekt_is_dkd_with_adaptive_weight():
    """With a_r clamped at max_weight everywhere, aekt equals dkd with alpha = max_weight."""
    s, t, target = make_inputs((8, 50), torch.float64, seed=6, ignored=0)
    got = kdkernels.aekt_loss(s, t, target, max_weight=1e-4, beta=3.0, backend="reference")
    want = kdkernels.dkd_loss(s, t, target, alpha=1e-4, beta=3.0, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# The general formula divides by alpha * beta * (alpha + beta): near (0, 0) float64 cancellation needs a larger step.
@pytest.mark.parametrize(
    "alpha,beta,near,rtol",
    [
        (0.0, 0.6, (1e-7, 0.6), 1e-5),
        (0.7, 0.0, (0.7, 1e-7), 1e-5),
        (0.8, -0.8, (0.8, -0.8 + 1e-7), 1e-5),
        (0.0, 0.0, (1e-6, 2e-6), 1e-3),
    ],
)
def test_abkd_special_cases_are_limits(alpha, beta, near, rtol):
    s, t, _ = make_inputs((4, 23), torch.float64, seed=7, ignored=0)
    exact = kdkernels.abkd_loss(s, t, alpha=alpha, beta=beta, reduction="none", backend="reference")
    limit = kdkernels.abkd_loss(s, t, alpha=near[0], beta=near[1], reduction="none", backend="reference")
    torch.testing.assert_close(limit, exact, rtol=rtol, atol=0)


@pytest.mark.parametrize("alpha,beta,other", [(1.0, 0.0, "kd"), (0.0, 1.0, "rkl")])
def test_abkd_endpoints_are_the_two_kls(alpha, beta, other):
    s, t, _ = make_inputs((4, 23), torch.float64, seed=8, ignored=0)
    got = kdkernels.abkd_loss(s, t, alpha=alpha, beta=beta, temperature=2.0, backend="reference")
    want = kdkernels.distill_loss(other, s, t, temperature=2.0, t2_scale=False, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("beta,other", [(0.0, "kd"), (1.0, "rkl")])
def test_jsd_endpoints(beta, other):
    s, t, _ = make_inputs((4, 23), torch.float64, seed=9, ignored=0)
    got = kdkernels.jsd_loss(s, t, beta=beta, backend="reference")
    want = kdkernels.distill_loss(other, s, t, temperature=1.0, t2_scale=False, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_float32_inputs_compute_in_float32_and_float64_in_float64():
    s, t, _ = make_inputs((4, 23), torch.float64, seed=10, ignored=0)
    assert kdkernels.kd_loss(s, t, backend="reference").dtype == torch.float64
    assert kdkernels.kd_loss(s.float(), t.bfloat16(), backend="reference").dtype == torch.float32


def abkd_authors_two_kls(s, t, weights):
    """The ABKD authors' LLM losses (distillm/losses.py: wsd, bdkd), per row at T = 1: their forward KL is the
    cross-entropy -sum p log q (the teacher's entropy left out), their reverse KL the true KL(q || p).
    ``weights(s, t)`` gives the per-row (forward, reverse) weights."""
    p, lq, lp = torch.softmax(t, -1), torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    w_f, w_r = weights(s, t)
    return w_f * -(p * lq).sum(-1) + w_r * (lq.exp() * (lq - lp)).sum(-1)


def authors_bdkd_weights(s, t):
    def entropy(logits):  # as published: log of the probabilities + 1e-9
        probs = torch.softmax(logits, -1)
        return -(probs * torch.log(probs + 1e-9)).sum(-1)

    h_s, h_t = entropy(s).detach(), entropy(t)
    return torch.where(h_t > h_s, 3.0, 1.0), torch.where(h_s > h_t, 3.0, 1.0)


@pytest.mark.parametrize(
    "method,hp,weights",
    [
        ("wsd", {}, lambda s, t: (0.5, 0.5)),
        ("wsd", {"lam": 0.1}, lambda s, t: (0.9, 0.1)),
        ("bdkd", {}, authors_bdkd_weights),
    ],
)
def test_two_kls_match_the_abkd_authors_code(method, hp, weights):
    """Value up to the teacher-entropy constant w_f sum p log p, gradient exactly; bdkd's rows cover both
    entropy orders."""
    s, t, _ = make_inputs((16, 50), torch.float64, seed=11, ignored=0)
    s = s * torch.linspace(0.2, 2.0, 16, dtype=torch.float64)[:, None]  # students sharper and flatter than the teacher
    s.requires_grad_(True)
    got = kdkernels.distill_loss(method, s, t, reduction="none", backend="reference", **hp)
    theirs = abkd_authors_two_kls(s, t, weights)
    w_f = torch.as_tensor(weights(s, t)[0], dtype=torch.float64)
    teacher_term = w_f * (torch.softmax(t, -1) * torch.log_softmax(t, -1)).sum(-1)
    torch.testing.assert_close(got, theirs + teacher_term, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), s)[0], torch.autograd.grad(theirs.sum(), s)[0], rtol=1e-10, atol=1e-13
    )
    if method == "bdkd":
        assert 0 < int((w_f == 3).sum()) < 16


def test_bdkd_self_distillation_weighs_both_kls_once():
    """Equal entropies (the student is the teacher): neither weight is raised, and the loss and gradient are 0."""
    s, _, _ = make_inputs((4, 30), torch.float64, seed=12, ignored=0)
    s.requires_grad_(True)
    loss = kdkernels.bdkd_loss(s, s.detach().clone(), backend="reference", reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(torch.autograd.grad(loss.sum(), s)[0], torch.zeros_like(s))
