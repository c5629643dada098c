"""Pure-PyTorch reference of every loss in LOSSES.md: the ground truth of the tests and the benchmarks.

Written for clarity, not speed: it materialises [N, V] temporaries and gets its gradients from autograd. It
computes in float64 when either input is float64 and in float32 otherwise.

Masked classes (logit -inf) follow the limits of the definitions: a term x log(x / y) with x = 0 is 0, and a
class whose teacher and student probabilities are both 0 contributes exactly 0. Every place where such a class
would put -inf - -inf or 0 * inf into the forward values *or the autograd graph* first swaps in a finite dummy
(`torch.where` on both sides), so gradients stay exact and finite.

A ``SparseTeacher`` (sparse.py) is evaluated directly on its k + 1 bins by ``sparse_row_losses``: the student's
log-probabilities gathered on the k classes plus a logsumexp over all the others, with gradients from autograd.
"""

from __future__ import annotations

import math

import torch

from .methods import DIVERGENCE, get_method
from .sparse import SparseTeacher, teacher_bins

NEG_INF = float("-inf")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision every backend computes in."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise a * (log a - log b), with 0 where a = 0 (also when b = 0), gradient-safe in both arguments."""
    zero_a = torch.isneginf(log_a)
    safe_a = torch.where(zero_a, 0.0, log_a)
    safe_b = torch.where(zero_a, 0.0, log_b)
    return torch.where(zero_a, 0.0, safe_a.exp() * (safe_a - safe_b))


# --------------------------------------------------------------------------------------------------------------
# Full-distribution divergences: per-row loss from teacher log-probs lp and student log-probs lq, both [N, V].
# --------------------------------------------------------------------------------------------------------------


def _log_mixture(lp: torch.Tensor, lq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), as a logsumexp."""
    return torch.logaddexp(lp + math.log(weight_p), lq + math.log1p(-weight_p))


def _abkd_terms(lp: torch.Tensor, lq: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    a, b = alpha, beta
    if a != 0 and b != 0 and a + b != 0:
        s = a + b
        return -((a * lp + b * lq).exp() - a / s * (s * lp).exp() - b / s * (s * lq).exp()) / (a * b)
    if a == 0 and b != 0:  # q^b log(q^b / p^b) as kl_terms: 0 where q = 0 < p (b > 0)
        return (kl_terms(b * lq, b * lp) - (b * lq).exp() + (b * lp).exp()) / b**2
    if b == 0 and a != 0:
        return (kl_terms(a * lp, a * lq) - (a * lp).exp() + (a * lq).exp()) / a**2
    if a != 0:  # a = -b
        return (a * (lq - lp) + (a * (lp - lq)).exp() - 1) / a**2
    return 0.5 * (lp - lq) ** 2


def divergence_rows(method: str, lp: torch.Tensor, lq: torch.Tensor, hp: dict) -> torch.Tensor:
    """Per-row loss of a divergence-family method (before the T^2 factor)."""
    absent = torch.isneginf(lp) & torch.isneginf(lq)
    lp = torch.where(absent, 0.0, lp)
    lq = torch.where(absent, 0.0, lq)
    if method == "kd" or (method == "jsd" and hp["beta"] == 0):
        terms = kl_terms(lp, lq)
    elif method == "rkl" or (method == "jsd" and hp["beta"] == 1):
        terms = kl_terms(lq, lp)
    elif method == "jsd":
        beta = hp["beta"]
        lm = _log_mixture(lp, lq, beta)
        terms = beta * kl_terms(lp, lm) + (1 - beta) * kl_terms(lq, lm)
    elif method == "skew_fkl":
        terms = kl_terms(lp, _log_mixture(lp, lq, hp["skew"]))
    elif method == "skew_rkl":
        terms = kl_terms(lq, _log_mixture(lp, lq, 1 - hp["skew"]))
    elif method == "tvd":
        terms = 0.5 * (lp.exp() - lq.exp()).abs()
    elif method == "abkd":
        terms = _abkd_terms(lp, lq, hp["alpha"], hp["beta"])
    else:
        raise ValueError(f"not a divergence-family method: {method!r}")
    return torch.where(absent, 0.0, terms).sum(-1)


# --------------------------------------------------------------------------------------------------------------
# Decoupled family: a partition of the classes into bins, bin-mass KL plus weighted in-bin KLs.
# --------------------------------------------------------------------------------------------------------------


def _bin_logsumexp(x: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """log of the bin's mass; -inf for an empty bin or one whose classes are all masked (gradient-safe)."""
    x = torch.where(member, x, NEG_INF)
    dead = torch.isneginf(x).all(-1, keepdim=True)
    safe = torch.where(dead & member, 0.0, x)
    return torch.where(dead.squeeze(-1), NEG_INF, torch.logsumexp(safe, -1))


def decoupled_rows(
    lp: torch.Tensor,
    lq: torch.Tensor,
    bins: torch.Tensor,
    num_bins: int,
    mass_weight: torch.Tensor | float,
    bin_weights: list,
) -> torch.Tensor:
    """l = w0 * KL([P_m] || [Q_m]) + sum_m w_m * KL(p^m || q^m), per row.

    Args:
        lp, lq: teacher and student log-probabilities [N, V].
        bins: bin index of every class [N, V], values in [0, num_bins).
        mass_weight: w0, a number or a per-row tensor [N].
        bin_weights: w_m for each bin, numbers or per-row tensors [N].
    """
    masses_p, masses_q, inner = [], [], []
    for m in range(num_bins):
        member = bins == m
        log_pm = _bin_logsumexp(lp, member)
        log_qm = _bin_logsumexp(lq, member)
        masses_p.append(log_pm)
        masses_q.append(log_qm)
        shift_p = torch.where(torch.isneginf(log_pm), 0.0, log_pm).unsqueeze(-1)
        shift_q = torch.where(torch.isneginf(log_qm), 0.0, log_qm).unsqueeze(-1)
        in_bin = kl_terms(torch.where(member, lp - shift_p, NEG_INF), torch.where(member, lq - shift_q, 0.0))
        inner.append(in_bin.sum(-1))
    loss = mass_weight * kl_terms(torch.stack(masses_p, -1), torch.stack(masses_q, -1)).sum(-1)
    for weight, kl in zip(bin_weights, inner):
        loss = loss + weight * kl
    return loss


def top_k_indices(teacher_scaled: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] indices of each row's k largest values, ties to the lower class index (a stable descending sort:
    torch.topk picks among ties in no documented order)."""
    return torch.sort(teacher_scaled, dim=-1, descending=True, stable=True).indices[:, :k]


def _top_k_mask(teacher_scaled: torch.Tensor, k: int) -> torch.Tensor:
    idx = top_k_indices(teacher_scaled, k)
    return torch.zeros_like(teacher_scaled, dtype=torch.bool).scatter_(-1, idx, True)


def decoupled_partition(method: str, t_scaled: torch.Tensor, target: torch.Tensor | None, hp: dict):
    """(bins [N, V], number of bins) of a decoupled-family method, from the teacher's scaled logits t / T."""
    n, v = t_scaled.shape
    if method in ("dkd", "aekt") or (method == "cakd" and hp["strong"] == "target"):
        strong = torch.arange(v, device=t_scaled.device) == target.unsqueeze(-1)
    elif method == "cakd" and hp["strong"] == "threshold":
        strong = (t_scaled - t_scaled.amax(-1, keepdim=True)) >= math.log(hp["tau"])
    elif method == "gdkd" and hp["partitions"] == 3:
        ranked = top_k_indices(t_scaled, hp["k"])
        bins = torch.full((n, v), 2, dtype=torch.long, device=t_scaled.device)
        bins.scatter_(-1, ranked, 1)
        bins.scatter_(-1, ranked[:, :1], 0)
        return bins, 3
    else:  # gdkd with 2 partitions, cakd strong="topk"
        strong = _top_k_mask(t_scaled, hp["k"])
    return (~strong).long(), 2


def decoupled_weights(method: str, lp: torch.Tensor, lq: torch.Tensor, target: torch.Tensor | None, hp: dict):
    """(w0, [w_m]) of a decoupled-family method; aekt's w0 is the detached per-row a_r = min(p_y / q_y, max)."""
    if method == "dkd":
        return hp["alpha"], [0.0, hp["beta"]]
    if method == "gdkd":
        inner = [hp["w1"], hp["w2"]] if hp["partitions"] == 2 else [0.0, hp["w1"], hp["w2"]]
        return hp["w0"], inner
    if method == "cakd":
        return hp["bcd_weight"], [hp["alpha"], hp["beta"]]
    if method == "aekt":
        index = target.unsqueeze(-1)
        log_ratio = (lp.gather(-1, index) - lq.gather(-1, index)).squeeze(-1).detach()
        return log_ratio.exp().clamp(max=hp["max_weight"]), [0.0, hp["beta"]]
    raise ValueError(f"not a decoupled-family method: {method!r}")


# --------------------------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------------------------


def row_losses(
    method: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    hp: dict,
    temperature: float,
    t2_scale: bool,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Per-row losses [N] of ``method`` on 2-D logits; rows where ``valid`` is False are exactly 0.

    ``target`` is None or holds a class index in [0, V) on every valid row (ignored rows may hold anything).
    """
    spec = get_method(method)
    dtype = compute_dtype(student, teacher)
    keep = valid.unsqueeze(-1)
    # Ignored rows are replaced by zeros before any arithmetic, so a NaN there cannot leak into the gradient.
    s_scaled = torch.where(keep, student.to(dtype), 0.0) / temperature
    t_scaled = torch.where(keep, teacher.detach().to(dtype), 0.0) / temperature
    if target is not None:
        target = torch.where(valid, target.long(), 0)
    lq = torch.log_softmax(s_scaled, -1)
    lp = torch.log_softmax(t_scaled, -1)
    if spec.family == DIVERGENCE:
        loss = divergence_rows(method, lp, lq, hp)
    else:
        bins, num_bins = decoupled_partition(method, t_scaled, target, hp)
        mass_weight, bin_weights = decoupled_weights(method, lp, lq, target, hp)
        loss = decoupled_rows(lp, lq, bins, num_bins, mass_weight, bin_weights)
    if t2_scale:
        loss = loss * temperature**2
    return torch.where(valid, loss, 0.0)


def sparse_row_losses(method: str, student: torch.Tensor, teacher: SparseTeacher, hp: dict, temperature: float,
                      t2_scale: bool, valid: torch.Tensor) -> torch.Tensor:
    """Per-row losses [N] of a divergence-family ``method`` against a SparseTeacher (as returned by ``sparse.check``:
    [N, k], ignored rows made harmless), over its k + 1 bins; rows where ``valid`` is False are exactly 0."""
    dtype = compute_dtype(student, teacher.values)
    keep = valid.unsqueeze(-1)
    lq = torch.log_softmax(torch.where(keep, student.to(dtype), 0.0) / temperature, -1)
    rest = torch.ones_like(lq, dtype=torch.bool).scatter_(-1, teacher.indices, False)
    lq = torch.cat([lq.gather(-1, teacher.indices), _bin_logsumexp(lq, rest).unsqueeze(-1)], -1)
    lp = torch.log_softmax(teacher_bins(teacher, temperature, dtype) / temperature, -1)
    loss = divergence_rows(method, lp, lq, hp)
    if t2_scale:
        loss = loss * temperature**2
    return torch.where(valid, loss, 0.0)
