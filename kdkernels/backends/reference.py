"""Pure-PyTorch reference of every plan of the method table (docs/losses.md): the ground truth of the tests and the
benchmarks, and the backend of last resort.

Written for clarity, not speed: it materialises [N, V] temporaries and gets its gradients from autograd. It
computes in float64 when either input is float64 and in float32 otherwise.

Masked classes (logit -inf) follow the limits of the definitions: a term x log(x / y) with x = 0 is 0, and a
class whose teacher and student probabilities are both 0 (masked, or below the least normal number of the math type:
underflowed) contributes exactly 0. Every place where such a class
would put -inf - -inf or 0 * inf into the forward values *or the autograd graph* first swaps in a finite dummy
(`torch.where` on both sides), so gradients stay exact and finite. A row whose classes are all masked in both
logits contributes 0, like an ignored row.
"""

from __future__ import annotations

import torch

from ..methods import ABKD_CODES, BDKD_TIE, DIVERGENCE, STANDARDIZE_EPS, Bin, CrossVocab, Divergence, Partition, Plan

Tensor = torch.Tensor

NEG_INF = float("-inf")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision every backend computes in."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise a * (log a - log b), with 0 where a = 0 (also when b = 0), gradient-safe in both arguments: a
    that underflows to 0 from a finite log a (near -1e38) is 0 too, whose gradient would be 0 * huge = NaN."""
    zero_a = log_a.detach().exp() == 0
    safe_a = torch.where(zero_a, 0.0, log_a)
    safe_b = torch.where(zero_a, 0.0, log_b)
    return torch.where(zero_a, 0.0, safe_a.exp() * (safe_a - safe_b))


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad [N, V] *= factor (0-d, or [N] per row), in the gradient's precision or better; a 0-d factor of exactly 1
    on the CPU skips the pass (the fused backends' kernels skip it on the device too)."""
    if factor.dim() == 0 and factor.device.type == "cpu" and bool(factor == 1):
        return
    factor = factor.reshape(-1, 1) if factor.dim() == 1 else factor
    if grad.dtype in (torch.float32, torch.float64):
        grad.mul_(factor.to(grad.dtype))
    else:  # one rounding: multiply in float32, then store
        grad.copy_(grad.float().mul_(factor.float()))


# --------------------------------------------------------------------------------------------------------------
# Divergence family: per-row loss from teacher log-probs lp and student log-probs lq, both [N, V].
# --------------------------------------------------------------------------------------------------------------


def _log_mixture(lp: torch.Tensor, lq: torch.Tensor, params) -> torch.Tensor:
    """log(mix_p p + mix_q q), as a logsumexp."""
    return torch.logaddexp(lp + params.log_mix_p, lq + params.log_mix_q)


def _abkd_terms(code: int, lp: torch.Tensor, lq: torch.Tensor, a: float, b: float) -> torch.Tensor:
    if code == Divergence.ABKD:
        s = a + b
        return -((a * lp + b * lq).exp() - a / s * (s * lp).exp() - b / s * (s * lq).exp()) / (a * b)
    if code == Divergence.ABKD_ALPHA0:  # q^b log(q^b / p^b) as kl_terms: 0 where q = 0 < p (b > 0)
        return (kl_terms(b * lq, b * lp) - (b * lq).exp() + (b * lp).exp()) / b**2
    if code == Divergence.ABKD_BETA0:
        return (kl_terms(a * lp, a * lq) - (a * lp).exp() + (a * lq).exp()) / a**2
    if code == Divergence.ABKD_OPPOSITE:  # a = -b
        return (a * (lq - lp) + (a * (lp - lq)).exp() - 1) / a**2
    return 0.5 * (lp - lq) ** 2  # ABKD_ZERO


def akl_head(teacher: torch.Tensor, lp: torch.Tensor, mu: float) -> torch.Tensor:
    """[N, V] bool, akl's head: the teacher's classes ranked by raw logit, descending, ties to the lower class index
    (a stable sort; masked classes last), up to the last one whose cumulative probability is <= mu, and at least
    the first (wutaiqiang/LLM_KD_AKL's get_ratio)."""
    order = torch.sort(teacher, dim=-1, descending=True, stable=True).indices
    in_head = lp.detach().exp().gather(-1, order).cumsum(-1) <= mu
    in_head[..., 0] = True
    return torch.zeros_like(in_head).scatter_(-1, order, in_head)


def underflows(log_a: torch.Tensor) -> torch.Tensor:
    """Whether the probability exp(log_a) is 0 in the math type: below its least normal number (docs/losses.md,
    "Conventions"); not differentiated."""
    return log_a.detach().exp() < torch.finfo(log_a.dtype).tiny


def divergence_terms(plan: Plan, lp: torch.Tensor, lq: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class statistics [N, V, S] of a divergence-family plan, whose row sums its loss combines: the loss terms
    (S = 1); for bdkd the terms of KL(p || q), of KL(q || p), of H(p) - H(q) and of H(p) + H(q) (S = 4); for akl
    those of KL(p || q), KL(q || p) and |p - q| on the ``head`` (akl_head) and off it (S = 4). A class with
    p = q = 0 (masked or underflowed in both) contributes 0."""
    absent = underflows(lp) & underflows(lq)
    lp = torch.where(absent, 0.0, lp)
    lq = torch.where(absent, 0.0, lq)
    code, params = plan.code, plan.params
    if code == Divergence.KD:
        stats = [kl_terms(lp, lq)]
    elif code == Divergence.RKL:
        stats = [kl_terms(lq, lp)]
    elif code == Divergence.JSD:
        lm = _log_mixture(lp, lq, params)
        stats = [params.mix_p * kl_terms(lp, lm) + params.mix_q * kl_terms(lq, lm)]
    elif code == Divergence.SKEW_FKL:
        stats = [kl_terms(lp, _log_mixture(lp, lq, params))]
    elif code == Divergence.SKEW_RKL:
        stats = [kl_terms(lq, _log_mixture(lp, lq, params))]
    elif code == Divergence.TVD:
        stats = [0.5 * (lp.exp() - lq.exp()).abs()]
    elif code in ABKD_CODES:  # (>= 0: a class masked in one model only whose formula is inf - inf is +inf)
        terms = _abkd_terms(code, lp, lq, params.alpha, params.beta)
        one_sided = torch.isneginf(lp) | torch.isneginf(lq)
        stats = [torch.where(one_sided & torch.isnan(terms.detach()), torch.inf, terms)]
    elif code == Divergence.WSD:
        stats = [params.w_fkl * kl_terms(lp, lq) + params.w_rkl * kl_terms(lq, lp)]
    elif code == Divergence.BDKD:  # q log q - p log p and -(q log q + p log p), as kl_terms against log 1 = 0
        zero = torch.zeros_like(lp)
        q_log_q, p_log_p = kl_terms(lq, zero), kl_terms(lp, zero)
        stats = [kl_terms(lp, lq), kl_terms(lq, lp), q_log_q - p_log_p, -(q_log_q + p_log_p)]
    elif code == Divergence.AKL:
        gap = (lp.exp() - lq.exp()).abs()
        stats = [kl_terms(lp, lq), kl_terms(lq, lp), torch.where(head, gap, 0.0), torch.where(head, 0.0, gap)]
    else:
        raise ValueError(f"not a divergence code: {code!r}")
    return torch.where(absent.unsqueeze(-1), 0.0, torch.stack(stats, -1))


def divergence_sums(plan: Plan, lp: torch.Tensor, lq: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
    """The row sums [N, S] of the per-class statistics a divergence-family plan's loss combines (its terms); over a
    vocabulary shard they are the shard's part of the row's sums."""
    return divergence_terms(plan, lp, lq, head).sum(-2)


def divergence_combine(plan: Plan, sums: torch.Tensor) -> torch.Tensor:
    """Per-row loss [N] (before the T^2 factor) from the whole row's ``divergence_sums``."""
    if plan.code == Divergence.BDKD:  # the weights are not differentiated; entropies equal within the tie: 1 and 1
        forward, reverse, entropy_gap, entropy_sum = sums.unbind(-1)
        gap = entropy_gap.detach()
        gap = torch.where(gap.abs() <= BDKD_TIE * torch.finfo(gap.dtype).eps * (1 + entropy_sum.detach()), 0.0, gap)
        w_fkl = torch.where(gap > 0, plan.params.w_fkl, 1.0)
        w_rkl = torch.where(gap < 0, plan.params.w_rkl, 1.0)
        return w_fkl * forward + w_rkl * reverse
    if plan.code == Divergence.AKL:  # g_head / g and g_tail / g, not differentiated; 1/2 each where p = q (g = 0)
        forward, reverse = sums[:, 0], sums[:, 1]
        g_head, g_tail = sums[:, 2].detach(), sums[:, 3].detach()
        g = g_head + g_tail
        safe_g = torch.where(g > 0, g, 1.0)
        return torch.where(g > 0, g_head / safe_g, 0.5) * forward + torch.where(g > 0, g_tail / safe_g, 0.5) * reverse
    return sums[:, 0]


def divergence_rows(plan: Plan, lp: torch.Tensor, lq: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row loss [N] of a divergence-family plan (before the T^2 factor); akl needs its ``head``."""
    return divergence_combine(plan, divergence_sums(plan, lp, lq, head))


# --------------------------------------------------------------------------------------------------------------
# Decoupled family: bins TOP1, STRONG, REST; the KL of the bin masses plus weighted in-bin KLs.
# --------------------------------------------------------------------------------------------------------------


def _bin_logsumexp(x: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """log of the bin's mass; -inf for an empty bin or one whose classes are all masked (gradient-safe)."""
    x = torch.where(member, x, NEG_INF)
    dead = torch.isneginf(x).all(-1, keepdim=True)
    safe = torch.where(dead & member, 0.0, x)
    return torch.where(dead.squeeze(-1), NEG_INF, torch.logsumexp(safe, -1))


def refine_largest(log_masses: torch.Tensor) -> torch.Tensor:
    """Bin log-masses [..., B] with the largest one recomputed as log1p(-(mass of the others)): a bin holding nearly
    all the mass keeps the digits of its small complement (its logsumexp, a difference of two numbers near log V,
    would lose them in float32). NaN stays NaN."""
    big = log_masses.argmax(-1, keepdim=True)
    others = torch.logsumexp(log_masses.scatter(-1, big, NEG_INF), -1, keepdim=True)
    largest = log_masses.gather(-1, big)
    refined = torch.where(torch.isnan(largest), largest, torch.log1p(-others.exp()))
    return log_masses.scatter(-1, big, refined)


def top_k_indices(teacher: torch.Tensor, k: int) -> torch.Tensor:
    """[..., k] indices of each row's k largest raw teacher logits, ties to the lower class index (a stable
    descending sort: torch.topk picks among ties in no documented order)."""
    return torch.sort(teacher, dim=-1, descending=True, stable=True).indices[..., :k]


def lowest_first(teacher: torch.Tensor) -> torch.Tensor:
    """The ranking value of a top-k of the *smallest* teacher logits: -t, masked classes (-inf) still last."""
    return torch.where(torch.isneginf(teacher), teacher, -teacher)


def decoupled_bins(
    plan: Plan, teacher: torch.Tensor, target: torch.Tensor | None, temperature: float | torch.Tensor
) -> torch.Tensor:
    """Bin (Bin.TOP1, STRONG or REST) of every class [N, V], from the raw teacher logits and the target;
    ``temperature`` scales the threshold (with standardize, T sd per row [N, 1]: the z-score's threshold in raw
    units)."""
    n, v = teacher.shape
    params = plan.params
    if plan.code == Partition.TARGET:
        strong = torch.arange(v, device=teacher.device) == target.unsqueeze(-1)
    elif plan.code == Partition.THRESHOLD:  # p_i >= tau max p  <=>  t_i - max t >= T log(tau)
        strong = (teacher - teacher.amax(-1, keepdim=True)) >= temperature * params.log_tau
    else:
        ranked = top_k_indices(lowest_first(teacher) if params.lowest else teacher, params.k)
        strong = torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, ranked, True)
    bins = torch.where(strong, int(Bin.STRONG), int(Bin.REST))
    if params.split_top1:
        bins.scatter_(-1, ranked[:, :1], int(Bin.TOP1))
    return bins


def decoupled_rows(plan: Plan, lp: torch.Tensor, lq: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """l = w_mass KL([P_b] || [Q_b]) + w_strong D^STRONG + w_rest D^REST per row (before T^2), with the in-bin
    divergence D^b = w_fkl KL(p^b || q^b) + w_rkl KL(q^b || p^b), from log-probabilities [N, V] and the bin of every
    class [N, V]."""
    params = plan.params
    log_p, log_q, inner, absent = [], [], [], []
    for b in map(int, Bin):  # (ints: torch.compile mistraces a tensor compared with, or a list indexed by, an IntEnum)
        log_pb, log_qb = _bin_logsumexp(lp, bins == b), _bin_logsumexp(lq, bins == b)
        log_p.append(log_pb)
        log_q.append(log_qb)
        # A bin whose mass underflows in both models (or in one, masked in the other) contributes 0, as a bin of
        # classes masked in both does: its classes are left out of every term.
        absent.append(underflows(log_pb) & underflows(log_qb))
        member = (bins == b) & ~absent[-1].unsqueeze(-1)
        shift_p = torch.where(torch.isneginf(log_pb), 0.0, log_pb).unsqueeze(-1)
        shift_q = torch.where(torch.isneginf(log_qb), 0.0, log_qb).unsqueeze(-1)
        in_p, in_q = torch.where(member, lp - shift_p, NEG_INF), torch.where(member, lq - shift_q, NEG_INF)
        # (A term of weight 0 is left out, not multiplied by 0: it may be infinite; against a bin the other model
        # gives no mass, the in-bin KL is: its log-probabilities are -inf there.)
        divergence = 0.0
        if params.w_fkl:
            divergence = divergence + params.w_fkl * kl_terms(in_p, torch.where(member, in_q, 0.0)).sum(-1)
        if params.w_rkl:
            divergence = divergence + params.w_rkl * kl_terms(in_q, torch.where(member, in_p, 0.0)).sum(-1)
        inner.append(divergence)
    log_p, log_q = refine_largest(torch.stack(log_p, -1)), refine_largest(torch.stack(log_q, -1))
    strong = int(Bin.STRONG)
    w_mass = aekt_weight(params, log_p[:, strong], log_q[:, strong]) if params.adaptive else params.w_mass
    absent = torch.stack(absent, -1)
    loss = weighted(w_mass, kl_terms(torch.where(absent, NEG_INF, log_p), torch.where(absent, 0.0, log_q)).sum(-1))
    return loss + weighted(params.w_strong, inner[strong]) + weighted(params.w_rest, inner[int(Bin.REST)])


def aekt_weight(params, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """aekt's a = min(p_y / q_y, max_weight) from the log masses of its strong bin {y}, and 0 where p_y = 0 (the
    label masked in both models too, where the ratio is 0 / 0); not differentiated."""
    ratio = (log_p - log_q).detach().exp().clamp(max=params.max_weight)
    return torch.where(torch.isneginf(log_p.detach()), 0.0, ratio)


def weighted(weight: float | torch.Tensor, term: torch.Tensor | float) -> torch.Tensor | float:
    """weight * term, and exactly 0 where the weight is 0, whatever the term (inf and NaN too): a term of weight 0
    contributes nothing, to the loss or its gradient (docs/losses.md, "The hard-label term")."""
    if isinstance(weight, torch.Tensor):
        return torch.where(weight == 0, 0.0, weight * torch.where(weight == 0, 0.0, term))
    if weight == 1:
        return term
    if weight != 0:
        return weight * term
    # (zeros still in the autograd graph, so that a loss whose every term has weight 0 has a gradient: 0)
    return torch.where(torch.zeros_like(term, dtype=torch.bool), term, 0.0) if isinstance(term, torch.Tensor) else 0.0


# --------------------------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------------------------


def standardized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, sd): each row's z-score over its unmasked classes, (x - mean) / sd with sd = std + STANDARDIZE_EPS, std
    with Bessel's correction (0 with one class), masked classes (-inf) left -inf, and sd [N, 1]; differentiable, the
    std's gradient taken as 0 where it is 0 (docs/losses.md, "Logit standardization"). The mean is corrected by the
    mean of the deviations from it (a constant row gets std 0 exactly)."""
    finite = ~torch.isneginf(x)
    n = finite.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(finite, x, 0.0).sum(-1, keepdim=True) / n
    mean = mean + torch.where(finite, x - mean, 0.0).sum(-1, keepdim=True) / n
    centred = torch.where(finite, x - mean, 0.0)
    var = (centred * centred).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    std = torch.where(var > 0, torch.where(var > 0, var, 1.0).sqrt(), 0.0)
    sd = std + STANDARDIZE_EPS
    return torch.where(finite, centred / sd, NEG_INF), sd


def _tempered(z: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """z / T, with masked classes (-inf) kept out of the division: d(z / T) / dT = -z / T^2 would put 0 * inf = NaN
    into a temperature tensor's gradient."""
    if not isinstance(temperature, torch.Tensor):
        return z / temperature
    masked = torch.isneginf(z)
    return torch.where(masked, z, torch.where(masked, 0.0, z) / temperature)


def row_losses(
    call, student: torch.Tensor, teacher: torch.Tensor, temperature: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses [N] of ``call`` (arguments.LossCall) on 2-D logits: the method's loss (T^2 included) and,
    with ``call.with_ce``, the student's cross-entropy against the target at T = 1 (else None). Rows that are
    ignored, or whose classes are all masked in both logits, are exactly 0 (loss and gradient). The teacher is a
    constant unless it requires grad (then its classes masked by -inf stay constants); ``temperature``, a 0-d
    tensor, replaces call.temperature where the loss is differentiated (the partitions use the number)."""
    dtype = compute_dtype(student, teacher)
    teacher = torch.where(torch.isneginf(teacher), teacher.detach(), teacher) if teacher.requires_grad else teacher
    T = call.temperature if temperature is None else temperature.to(dtype)
    masked = torch.isneginf(student).all(-1) & torch.isneginf(teacher).all(-1)
    valid = call.valid  # (derived from the target: made once here)
    kept = valid & ~masked
    keep = kept.unsqueeze(-1)
    # Rows left out are replaced by zeros before any arithmetic, so a NaN there cannot leak into the gradient.
    s = torch.where(keep, student.to(dtype), 0.0)
    t = torch.where(keep, teacher.to(dtype), 0.0)
    target = None if call.target is None else torch.where(valid, call.target, 0)
    zs, zt, sd_t = s, t, 1.0
    if call.standardize:
        (zs, _), (zt, sd_t) = standardized(s), standardized(t)
    lq = torch.log_softmax(_tempered(zs, T), -1)
    lp = torch.log_softmax(_tempered(zt, T), -1)
    if call.plan.family == DIVERGENCE:
        head = akl_head(t.detach(), lp, call.plan.params.mu) if call.plan.code == Divergence.AKL else None
        loss = divergence_rows(call.plan, lp, lq, head)
    else:
        bins = decoupled_bins(
            call.plan, t.detach(), target, call.temperature * sd_t.detach() if call.standardize else call.temperature
        )
        loss = decoupled_rows(call.plan, lp, lq, bins)
    if call.t2_scale:
        loss = loss * T**2
    ce = cross_entropy_rows(call, s, target, kept) if call.with_ce else None
    loss = torch.where(kept, loss, 0.0)
    if call.distill_weight == 0:
        # A term of weight 0 adds exactly 0 (combine): its rows are kept for the parts but left out of the autograd
        # graph, where 0 times its own gradient would be NaN wherever that is; a where that passes 0 joins them to
        # the student, so that the loss has a gradient (0) even when the other weight is 0 too.
        never = torch.zeros_like(kept)
        loss = torch.where(never, torch.where(never.unsqueeze(-1), student, 0.0).sum(-1), loss.detach())
    return loss, ce


def cross_entropy_rows(call, student: Tensor, target: Tensor, kept: Tensor) -> Tensor:
    """The hard-label term per row [N] at T = 1 with ``call``'s options (cross_entropy_of_sums); 0 on rows not
    ``kept`` (whose logits and target may hold anything)."""
    x, owner = _shifted(student, target, kept)
    return torch.where(kept, cross_entropy_of_sums(call, cross_entropy_sums(x, owner)), 0.0)


def cross_entropy_rows_and_grad(call, student: Tensor, target: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """cross_entropy_rows and its gradient d / d student [N, V] (0 on rows not ``kept``), without autograd, from
    one pass of sums."""
    x, owner = _shifted(student, target, kept)
    sums = cross_entropy_sums(x, owner)
    rows = torch.where(kept, cross_entropy_of_sums(call, sums), 0.0)
    return rows, cross_entropy_grad_of_sums(call, x, owner, sums).mul_(kept.unsqueeze(-1))


def _shifted(student: Tensor, target: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """(the logits less their row's max, the target's one-hot [N, V] bool) of the rows ``kept``, zeros elsewhere."""
    s = torch.where(kept.unsqueeze(-1), student, 0.0)
    # The max is not differentiated (the loss does not depend on it): it keeps the probabilities and the loss's
    # differences free of the rounding of a log-sum-exp near a logit of 1000.
    top = s.detach().amax(-1, keepdim=True)
    classes = torch.arange(s.shape[-1], device=s.device)
    return s - torch.where(torch.isfinite(top), top, 0.0), classes == torch.where(kept, target, -1).unsqueeze(-1)


# The hard-label term (docs/losses.md, "The hard-label term") from sums over a row's classes that add up across a
# split of the row: the vocabulary-parallel path (parallel.py) all-reduces the sums of its shards and calls the same
# two functions. x: the raw logits less one shift per row (the row's max), owner: the target's one-hot.


def cross_entropy_sums(x: Tensor, owner: Tensor) -> Tensor:
    """[N, 4]: sum exp(x), the target's x, the sum and the count of the unmasked x."""
    unmasked = ~torch.isneginf(x)
    columns = (x.exp().sum(-1), torch.where(owner, x, 0.0).sum(-1), torch.where(unmasked, x, 0.0).sum(-1))
    return torch.stack([*columns, unmasked.sum(-1).to(x.dtype)], -1)


def cross_entropy_of_sums(call, sums: Tensor) -> Tensor:
    """Per row, (1 - eps) (lse - x_target) + eps (lse - the mean of the unmasked x), eps = call.label_smoothing."""
    eps = call.label_smoothing
    loss = sums[:, 0].log() - (1 - eps) * sums[:, 1]
    return loss if eps == 0 else loss - eps * (sums[:, 2] / sums[:, 3])


def cross_entropy_grad_of_sums(call, x: Tensor, owner: Tensor, sums: Tensor) -> Tensor:
    """cross_entropy_of_sums's gradient on x's classes: softmax - (1 - eps) [target] - eps / count [unmasked]."""
    eps = call.label_smoothing
    grad = x.exp().div_(sums[:, :1]).sub_(owner.to(x.dtype), alpha=1 - eps)
    return grad if eps == 0 else grad.sub_(~torch.isneginf(x) * (eps / sums[:, 3:]))


# --------------------------------------------------------------------------------------------------------------
# Two vocabularies (docs/losses.md, section 11): rows of q~ [N, Vs] and p~ [N, Vt].
# --------------------------------------------------------------------------------------------------------------


def sorted_l1(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per row [N], sum_i |q_(i) - p_(i)| of q [N, Vs] and p [N, Vt] each sorted descending, the shorter zero-padded.
    A stable sort ranks tied probabilities lower index first, and autograd scatters sign(q_(i) - p_(i)) (sign(0) = 0)
    back through it: the gradient docs/losses.md defines at ties."""
    width = max(q.shape[-1], p.shape[-1])
    ranked = [
        torch.nn.functional.pad(torch.sort(x, dim=-1, descending=True, stable=True).values, (0, width - x.shape[-1]))
        for x in (q, p)
    ]
    return (ranked[0] - ranked[1]).abs().sum(-1)


def hybrid_rows(params, lq: torch.Tensor, lp: torch.Tensor, classes) -> torch.Tensor:
    """GOLD's hybrid per row [N] from log q~ [N, Vs] and log p~ [N, Vt]: ``params.matched_plan()``'s terms on the
    map's pairs, the sorted L1 on the unmatched classes (0 when either model has none), weighted. ``classes``: the
    map's (student ids, teacher ids, unmatched student ids, unmatched teacher ids) on the logits' device."""
    student_ids, teacher_ids, free_student, free_teacher = classes
    matched = divergence_rows(params.matched_plan(), lp[:, teacher_ids], lq[:, student_ids])
    loss = params.matched_weight * matched
    if free_student.numel() and free_teacher.numel():
        unmatched = sorted_l1(lq[:, free_student].exp(), lp[:, free_teacher].exp())
        loss = loss + params.unmatched_weight * unmatched
    return loss


def cross_vocab_rows(
    call, student: torch.Tensor, teacher: torch.Tensor, log_scales, classes
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses [N] of a cross-vocabulary ``call`` on student [N, Vs] and teacher [N, Vt] logits: the method's
    loss and, with ``call.with_ce``, the student's cross-entropy (else None). ``log_scales``: (c_s, c_t), [N] each or
    None; ``classes``: hybrid_rows's (None for uld). Rows left out, or masked in both models, are exactly 0."""
    dtype = compute_dtype(student, teacher)
    masked = torch.isneginf(student).all(-1) & torch.isneginf(teacher).all(-1)
    valid = call.valid  # (derived from the target: made once here)
    kept = valid & ~masked
    keep = kept.unsqueeze(-1)
    # Rows left out are replaced by zeros before any arithmetic, so a NaN there cannot leak into the gradient.
    s = torch.where(keep, student.to(dtype), 0.0)
    t = torch.where(keep, teacher.to(dtype), 0.0)
    params = call.plan.params
    lq = torch.log_softmax(s / call.temperature, -1)
    lp = torch.log_softmax(t / params.teacher_temperature, -1)
    scaled = []
    for log_prob, scale in zip((lq, lp), log_scales):
        scaled.append(log_prob if scale is None else log_prob + torch.where(kept, scale.to(dtype), 0.0).unsqueeze(-1))
    lq, lp = scaled
    if call.plan.code == CrossVocab.ULD:
        loss = sorted_l1(lq.exp(), lp.exp())
    else:
        loss = hybrid_rows(params, lq, lp, classes)
    target = None if call.target is None else torch.where(valid, call.target, 0)
    ce = cross_entropy_rows(call, s, target, kept) if call.with_ce else None
    return torch.where(kept, loss, 0.0), ce
