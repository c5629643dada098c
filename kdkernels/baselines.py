"""What a user would write instead of kdkernels: each loss as idiomatic eager PyTorch, the way its official code
writes it (mdistiller's KD and DKD, TRL's generalized JSD, DistiLLM's skew KLs, the AKL authors' sorted head, the
-1000 logit mask of mdistiller and GDKD for in-bin softmaxes), with the method's default hyperparameters.

``python -m kdkernels bench`` times these functions eagerly and under ``torch.compile`` as the baselines of every
fused backend; tests/test_baselines.py checks that each computes the same loss and gradient as
kdkernels.backends.reference, so the timings compare the same thing. Each function takes (student, teacher, target)
[N, V] / [N] and returns the batchmean loss over the rows whose target is not -100 (the bench ignores a few rows; a
user's vision code would call .mean()), computing in float32 as kdkernels does (``.float()`` first: bf16 logits are
upcast, not softmaxed in bf16).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _batchmean(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    kept = target != IGNORE_INDEX
    return torch.where(kept, rows, 0.0).sum() / kept.sum().clamp(min=1)


def _log_softmaxes(student, teacher, temperature):
    return F.log_softmax(student.float() / temperature, dim=-1), F.log_softmax(teacher.float() / temperature, dim=-1)


def _kl_rows(log_a, log_b):
    """KL(a || b) per row from log-probabilities: F.kl_div's (input, target) = (log b, log a)."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


def kd(student, teacher, target, temperature=4.0):
    """mdistiller's KD: KL(softmax(t / T) || softmax(s / T)) T^2."""
    log_q = F.log_softmax(student.float() / temperature, dim=1)
    p = F.softmax(teacher.float() / temperature, dim=1)
    return _batchmean(F.kl_div(log_q, p, reduction="none").sum(1), target) * temperature**2


def rkl(student, teacher, target, temperature=1.0):
    lq, lp = _log_softmaxes(student, teacher, temperature)
    return _batchmean(_kl_rows(lq, lp), target)


def jsd(student, teacher, target, beta=0.5, temperature=1.0):
    """TRL's generalized_jsd_loss: the mixture's log by logsumexp, then two KLs against it."""
    lq, lp = _log_softmaxes(student, teacher, temperature)
    b = torch.tensor(beta, dtype=lq.dtype)
    mixture = torch.logsumexp(torch.stack([lq + torch.log(1 - b), lp + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(mixture, lp, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, lq, reduction="none", log_target=True)
    return _batchmean((beta * kl_teacher + (1 - beta) * kl_student).sum(-1), target)


def skew_fkl(student, teacher, target, skew=0.1, temperature=1.0):
    """DistiLLM's skewed forward KL: KL(p || skew p + (1 - skew) q), the mixture from probabilities."""
    p = F.softmax(teacher.float() / temperature, dim=-1)
    q = F.softmax(student.float() / temperature, dim=-1)
    mixed = torch.log(skew * p + (1 - skew) * q)
    return _batchmean(F.kl_div(mixed, p, reduction="none").sum(-1), target)


def skew_rkl(student, teacher, target, skew=0.1, temperature=1.0):
    """DistiLLM's skewed reverse KL: KL(q || (1 - skew) p + skew q)."""
    p = F.softmax(teacher.float() / temperature, dim=-1)
    q = F.softmax(student.float() / temperature, dim=-1)
    mixed = torch.log((1 - skew) * p + skew * q)
    return _batchmean(F.kl_div(mixed, q, reduction="none").sum(-1), target)


def tvd(student, teacher, target, temperature=1.0):
    p = F.softmax(teacher.float() / temperature, dim=-1)
    q = F.softmax(student.float() / temperature, dim=-1)
    return _batchmean(0.5 * (p - q).abs().sum(-1), target)


def abkd(student, teacher, target, alpha=0.5, beta=0.5, temperature=1.0):
    """The alpha-beta divergence from probabilities, -1/(ab) sum(p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b))."""
    p = F.softmax(teacher.float() / temperature, dim=-1)
    q = F.softmax(student.float() / temperature, dim=-1)
    s = alpha + beta
    terms = p.pow(alpha) * q.pow(beta) - alpha / s * p.pow(s) - beta / s * q.pow(s)
    return _batchmean(-terms.sum(-1) / (alpha * beta), target)


def wsd(student, teacher, target, lam=0.5, temperature=1.0):
    """(1 - lam) KL(p || q) + lam KL(q || p)."""
    lq, lp = _log_softmaxes(student, teacher, temperature)
    return _batchmean((1 - lam) * _kl_rows(lp, lq) + lam * _kl_rows(lq, lp), target)


def bdkd(student, teacher, target, temperature=1.0, weight=3.0):
    """The ABKD authors' entropy-weighted KLs: the model with the larger entropy gets its KL weighed by 3."""
    lq, lp = _log_softmaxes(student, teacher, temperature)
    entropy_p = -(lp.exp() * lp).sum(-1)
    entropy_q = -(lq.exp() * lq).sum(-1)
    w_fkl = torch.where(entropy_p > entropy_q, weight, 1.0).detach()
    w_rkl = torch.where(entropy_q > entropy_p, weight, 1.0).detach()
    return _batchmean(w_fkl * _kl_rows(lp, lq) + w_rkl * _kl_rows(lq, lp), target)


def akl(student, teacher, target, mu=0.5, temperature=1.0):
    """wutaiqiang/LLM_KD_AKL: the teacher's probabilities sorted, the head up to cumulative mass mu (and its first
    class), |p - q| summed on the head and the tail weighing KL(p || q) and KL(q || p)."""
    lq, lp = _log_softmaxes(student, teacher, temperature)
    p, q = lp.exp(), lq.exp().detach()
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
    errors = (sorted_p - q.gather(-1, order)).abs()
    tail = sorted_p.cumsum(-1) > mu
    tail[:, 0] = False
    g_head = errors.masked_fill(tail, 0.0).sum(-1)
    g_tail = errors.masked_fill(~tail, 0.0).sum(-1)
    total = g_head + g_tail
    return _batchmean((g_head * _kl_rows(lp, lq) + g_tail * _kl_rows(lq, lp)) / total, target)


def _cat_mask(probs, strong, rest):
    """mdistiller's cat_mask: the masses of the strong set and of the rest, [N, 2]."""
    return torch.stack([(probs * strong).sum(1), (probs * rest).sum(1)], dim=1)


def _decoupled(student, teacher, strong, temperature, w_mass, w_strong, w_rest, adaptive_max=None):
    """mdistiller's dkd_loss shape, per row: w_mass KL of the two bin masses, in-bin KLs by softmaxes with the other
    bin's logits pushed down by 1000 (a term of weight 0 is not computed), times T^2. With
    adaptive_max, w_mass is min(p_strong / q_strong, adaptive_max) per row (AEKT), not differentiated."""
    s, t = student.float() / temperature, teacher.float() / temperature
    rest = ~strong
    p, q = F.softmax(t, dim=1), F.softmax(s, dim=1)
    p_bins, q_bins = _cat_mask(p, strong, rest), _cat_mask(q, strong, rest)
    mass = F.kl_div(torch.log(q_bins), p_bins, reduction="none").sum(1)
    if adaptive_max is not None:
        w_mass = (p_bins[:, 0] / q_bins[:, 0]).clamp(max=adaptive_max).detach()
    rows = w_mass * mass
    for weight, outside in ((w_strong, rest), (w_rest, strong)):
        if weight:
            in_bin_p = F.softmax(t - 1000.0 * outside, dim=1)
            in_bin_log_q = F.log_softmax(s - 1000.0 * outside, dim=1)
            rows = rows + weight * F.kl_div(in_bin_log_q, in_bin_p, reduction="none").sum(1)
    return rows * temperature**2


def _target_mask(student, target):
    """mdistiller's _get_gt_mask (an ignored row's target -100 marks class 0; the row is not counted)."""
    return torch.zeros_like(student, dtype=torch.bool).scatter_(1, target.clamp(min=0).unsqueeze(1), True)


def dkd(student, teacher, target, alpha=1.0, beta=8.0, temperature=4.0):
    """mdistiller's DKD: alpha TCKD + beta NCKD."""
    return _batchmean(
        _decoupled(student, teacher, _target_mask(student, target), temperature, alpha, 0.0, beta), target
    )


def gdkd(student, teacher, target, k=5, w0=1.0, w1=1.0, w2=8.0, temperature=4.0):
    """ZaberKo/GDKD (two partitions, the teacher's top-k and the rest, forward KLs)."""
    top = torch.zeros_like(teacher, dtype=torch.bool).scatter_(1, teacher.topk(k, dim=1).indices, True)
    return _batchmean(_decoupled(student, teacher, top, temperature, w0, w1, w2), target)


def cakd(student, teacher, target, alpha=1.0, beta=8.0, bcd_weight=1.0, temperature=4.0):
    """CAKD with the labelled class as the strong set: bcd_weight BCD + alpha SCD + beta WCD."""
    return _batchmean(
        _decoupled(student, teacher, _target_mask(student, target), temperature, bcd_weight, alpha, beta), target
    )


def aekt(student, teacher, target, beta=8.0, max_weight=5.0, temperature=4.0):
    """AEKT: min(p_y / q_y, max_weight) TCKD + beta NCKD."""
    return _batchmean(
        _decoupled(
            student, teacher, _target_mask(student, target), temperature, None, 0.0, beta, adaptive_max=max_weight
        ),
        target,
    )


# Every method of kdkernels.METHODS, at its defaults.
BASELINES = {
    "kd": kd,
    "rkl": rkl,
    "jsd": jsd,
    "skew_fkl": skew_fkl,
    "skew_rkl": skew_rkl,
    "tvd": tvd,
    "abkd": abkd,
    "wsd": wsd,
    "bdkd": bdkd,
    "akl": akl,
    "dkd": dkd,
    "gdkd": gdkd,
    "cakd": cakd,
    "aekt": aekt,
}


# ---- two vocabularies: TRL's ULDLoss (GOLD), which tests/test_cross_vocab_trl.py and bench/cross_vocab.py run -----


def gold_config(**options) -> SimpleNamespace:
    """The fields of TRL's GOLDConfig that its ULDLoss reads, at GOLD's defaults but for no cross-entropy, no EOS
    skipped and positional rows (use_extended_uld=False); ``options`` override them."""
    defaults = dict(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=1.0,
        uld_teacher_temperature=1.0,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=False,
        uld_token_merge_strategy="observed",
        uld_use_hybrid_loss=False,
        uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None,
        beta=0.5,
    )
    return SimpleNamespace(**{**defaults, **options})


class Vocabulary:
    """A tokenizer as TRL's and kdkernels' vocabulary maps see it: get_vocab() only."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens

    def get_vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}


def shared_vocabularies(vs: int, vt: int, shared: int, seed: int) -> tuple[Vocabulary, Vocabulary]:
    """Two vocabularies of vs and vt strings, ``shared`` of them in both, at unrelated ids."""
    g = torch.Generator().manual_seed(seed)
    student = [f"s{i}" for i in range(vs)]
    teacher = [f"t{i}" for i in range(vt)]
    pairs = zip(torch.randperm(vs, generator=g)[:shared].tolist(), torch.randperm(vt, generator=g)[:shared].tolist())
    for k, (a, b) in enumerate(pairs):
        student[a] = teacher[b] = f"shared{k}"
    return Vocabulary(student), Vocabulary(teacher)
