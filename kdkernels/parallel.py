"""Vocabulary-parallel losses: each rank of a torch.distributed process group holds a shard of the classes.

Layout (Megatron tensor parallel): rank r of ``group`` holds the contiguous classes [offset_r, offset_r + V_r) of
both logits, as [..., V_r] tensors, shards in rank order, of any sizes V_r >= 1 (unequal sizes are fine; each rank
learns its offset from an all-gather of the sizes). The target (global class indices, [...]) and every other
argument are the same on every rank. Every rank returns the same loss, equal to ``kdkernels.distill_loss`` on the
full logits [..., V], V = sum_r V_r, and backward gives each rank the gradient of its own shard.

The forward computes the per-row losses and the shard's gradient together, from per-row statistics that are
reduced across ranks; nothing of the full size [N, V] exists anywhere, every temporary is shard-sized [N, V_r]
(a few at a time, as in the single-process reference, plus the stored gradient). Backward only
scales the stored gradient by grad_output: it runs no collective, so a rank may call it alone. Arithmetic is in
float32 (float64 for float64 input); the gradient is stored in the student's dtype.

Collectives per call, all of O(N) or O(N k) numbers (N rows):

- every method: an all-gather of (V_r, N) per rank (offset, V, and a check that N agrees across ranks).
- divergence family: all-reduce MAX of the row maxes of s/T and t/T, then SUM of the sums of exp: the two
  logsumexps; then SUM of the shard's row sums of the loss's statistics, and with a gradient SUM of the row sum the
  gradient needs. 4 without a gradient, 5 with one.
- the cross-entropy term (ce_weight, return_parts): MAX of the raw logits' row max, SUM of their sums of exp and
  the target's logit. 2 more.
- decoupled family: the partition first (teacher top-k: an all-gather of each shard's k largest teacher values,
  then of the counts of ties at the k-th value; threshold: all-reduce MAX of the teacher's row max; target: none,
  the rank that owns the class marks it); then all-reduce MAX of the bin maxes, SUM of the bins' sums of exp and
  SUM of the in-bin KL terms. 4 (target), 5 (threshold) or 6 (top-k) in all.
- akl: its head first: 4 all-reduces SUM of [N, 256] (8 in float64) for the radix select, then SUM and MAX at the
  threshold and an all-gather of the tie counts. 7 more (11); in the rare call where a row's summation orders
  straddle mu, 33 (65) more for the fallback's bisection, and the host reads whether to run it (one sync).
- the full gradient (a teacher that requires grad, a temperature tensor): SUM of the teacher's part of the row sum
  its gradient needs (divergence family), MAX of both rows' maxes and SUM of the terms of d loss / d T; with
  standardize SUM of the row sums of the teacher's z-score Jacobian. 3 more (2 for the decoupled family), 4 with
  standardize.
- standardize: SUM of both rows' counts and sums of their unmasked logits, then SUM of their squared deviations
  from the mean (the z-scores over the whole vocabulary), and with a gradient SUM of the row sums of the z-score's
  Jacobian. 2 more, 3 with a gradient.

Works with any backend whose collectives take tensors on the logits' device (gloo for CPU, NCCL for CUDA). On
accelerators nothing syncs with the host but akl's check of its head (whether its fallback runs): the checks that
need the global V (target in [0, V), k < V) and the agreement of N run on the device (torch._assert_async). Every
rank must make the same calls with the same arguments; a check that fails fails on every rank alike, before or right
after the first collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import backends
from .arguments import check_float_tensor, check_temperature_device, full_gradient, resolve, split_temperature
from .backends import reference
from .backends.ops import consume_full_gradients
from .backends.reference import cross_entropy_grad_of_sums, cross_entropy_of_sums, cross_entropy_sums
from .functional import finish
from .methods import DIVERGENCE, METHODS, STANDARDIZE_EPS, Bin, Divergence, Partition, Plan

Tensor = torch.Tensor
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------------------
# Collectives (in place on fresh tensors: the forward runs without autograd).
# --------------------------------------------------------------------------------------------------------------


def _all_reduce(x: Tensor, op, group) -> Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather(x: Tensor, group) -> Tensor:
    """[world, *x.shape]: x of every rank of ``group``, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


@dataclass(frozen=True)
class Shard:
    """This rank's place in the vocabulary: ints on CPU, 0-d device tensors on accelerators (no host sync)."""

    group: dist.ProcessGroup | None
    rank: int  # in the group
    offset: int | Tensor  # global index of the shard's first class
    num_classes: int | Tensor  # V, the whole vocabulary

    def classes(self, v_local: int, device: torch.device) -> Tensor:
        """Global class index of each column of the shard [V_r]."""
        return torch.arange(v_local, device=device) + self.offset


def shard_of(student: Tensor, group) -> Shard:
    """The layout of ``student`` [N, V_r] in ``group``: one all-gather of (V_r, N)."""
    n, v_local = student.shape
    # (new_full, not torch.tensor: a host-to-device copy would sync with the stream.)
    sizes = _all_gather(
        torch.cat([student.new_full((1,), v_local, dtype=torch.int64), student.new_full((1,), n, dtype=torch.int64)]),
        group,
    )
    rank = dist.get_rank(group)
    message = "student_logits must have the same number of rows (leading shape) on every rank of the group"
    if student.device.type == "cpu":
        sizes = sizes.tolist()
        if any(rows != n for _, rows in sizes):
            raise ValueError(f"{message}, got {[rows for _, rows in sizes]} rows per rank")
        return Shard(group, rank, sum(v for v, _ in sizes[:rank]), sum(v for v, _ in sizes))
    torch._assert_async((sizes[:, 1] == n).all(), message)
    return Shard(group, rank, sizes[:rank, 0].sum(), sizes[:, 0].sum())


# --------------------------------------------------------------------------------------------------------------
# Divergence family.
# --------------------------------------------------------------------------------------------------------------


def _log_softmax(s: Tensor, t: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """Student and teacher log-probabilities on the shard, normalised over the whole vocabulary, and which rows
    are masked in both on every shard."""
    maxes = _all_reduce(torch.stack([s.amax(-1), t.amax(-1)], -1), dist.ReduceOp.MAX, group)
    shift = torch.where(torch.isneginf(maxes), 0.0, maxes)  # a fully masked row: keep -inf - 0, not -inf - -inf
    sums = _all_reduce(
        torch.stack([(s - shift[:, :1]).exp().sum(-1), (t - shift[:, 1:]).exp().sum(-1)], -1), dist.ReduceOp.SUM, group
    )
    # (x - max) - log(sum): the same rounding as torch.log_softmax, exact for logits offset by 1000.
    log_sums = sums.log()
    return (s - shift[:, :1]) - log_sums[:, :1], (t - shift[:, 1:]) - log_sums[:, 1:], torch.isneginf(maxes).all(-1)


# The digit of akl's radix select on the shards: one all-reduce of a [N, 2^AKL_DIGIT_BITS] histogram per digit.
AKL_DIGIT_BITS = 8


class _Keys:
    """The order-preserving integer keys of a float dtype's values (negative floats with their magnitude bits
    flipped), as int64 tensors: csrc/divergence.h AklHead's."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.bits = dtype, torch.finfo(dtype).bits
        self.ints = torch.int32 if self.bits == 32 else torch.int64
        self.magnitude = (1 << (self.bits - 1)) - 1
        self.neg_inf, self.pos_inf = self.key_of(NEG_INF), self.key_of(-NEG_INF)

    def keys(self, values: Tensor) -> Tensor:
        key = values.view(self.ints).to(torch.int64)
        return torch.where(key < 0, key ^ self.magnitude, key)

    def value_of(self, key: Tensor) -> Tensor:
        key = key.to(self.ints)
        return torch.where(key < 0, key ^ self.magnitude, key).view(self.dtype)

    def key_of(self, value: float) -> int:
        key = int(torch.tensor(value, dtype=self.dtype).view(self.ints))
        return key ^ self.magnitude if key < 0 else key


def _akl_radix(t: Tensor, p: Tensor, mu: float, keys: _Keys, group) -> Tensor:
    """AklHead's (a) on the shards: [N] candidate values, from a radix select over the teacher logits' keys,
    AKL_DIGIT_BITS at a time from the top, each digit chosen from the all-reduced histogram of p over it of the
    classes whose higher digits are those chosen so far (-0.0 for a zero, as AklHead.candidate)."""
    key = keys.keys(t)
    n, bins = t.shape[0], 1 << AKL_DIGIT_BITS
    prefix = torch.zeros(n, 1, dtype=torch.int64, device=t.device)  # the chosen digits: key >> shift, signed
    above = torch.zeros(n, 1, dtype=p.dtype, device=t.device)  # the histograms' mass above them
    for shift in range(keys.bits - AKL_DIGIT_BITS, -1, -AKL_DIGIT_BITS):
        digit = (key >> shift) & (bins - 1)
        inside = p
        if shift == keys.bits - AKL_DIGIT_BITS:
            digit = digit ^ (bins >> 1)  # (the sign's digit, in the keys' order)
        else:
            inside = torch.where((key >> (shift + AKL_DIGIT_BITS)) == prefix, p, 0.0)
        mass = p.new_zeros(n, bins).scatter_add_(-1, digit, inside)
        from_top = _all_reduce(mass, dist.ReduceOp.SUM, group).flip(-1).cumsum(-1).flip(-1)
        # the highest digit where the mass from the top crosses mu (0 if none does), and the mass above it
        chosen = ((above + from_top > mu).sum(-1, keepdim=True) - 1).clamp(min=0)
        above = above + torch.cat([from_top[:, 1:], torch.zeros_like(above)], -1).gather(-1, chosen)
        if shift == keys.bits - AKL_DIGIT_BITS:
            prefix = chosen - (bins >> 1)
        else:
            prefix = prefix * bins + chosen
    value = keys.value_of(prefix.squeeze(-1).clamp(keys.neg_inf, keys.pos_inf))
    return torch.where(value == 0, -0.0, value)


def _akl_ties(t: Tensor, p: Tensor, value: Tensor, group) -> Tensor:
    """AklHead's (b) at [N] values u: the all-reduced [4, N] of A(u) = the mass of {t > u}, the mass of {t >= u}
    (A just below u), and the counts of {t > u} and of {t == u}."""
    u = value.unsqueeze(-1)
    above, tie = t > u, t == u
    stats = [torch.where(above, p, 0.0).sum(-1), torch.where(t >= u, p, 0.0).sum(-1), above.sum(-1), tie.sum(-1)]
    return _all_reduce(torch.stack([s.to(p.dtype) for s in stats]), dist.ReduceOp.SUM, group)


def _akl_bisect(t: Tensor, p: Tensor, mu: float, keys: _Keys, lo: Tensor, hi: Tensor, group) -> Tensor:
    """AklHead's fallback: the bisection over the keys (lo, hi] (A(lo) > mu, A(hi) <= mu) for the least key with
    A <= mu, one all-reduce per step; a row whose bracket is closed stays."""
    for _ in range(keys.bits):
        mid = (lo >> 1) + (hi >> 1) + (((lo & 1) + (hi & 1)) >> 1)  # floor((lo + hi) / 2) without overflow
        above = torch.where(t > keys.value_of(mid).unsqueeze(-1), p, 0.0).sum(-1)
        low = _all_reduce(above, dist.ReduceOp.SUM, group) <= mu
        searching = hi > lo + 1  # (lo may still be the sentinel below -inf, never probed)
        hi = torch.where(searching & low, mid, hi)
        lo = torch.where(searching & ~low, mid, lo)
    return keys.value_of(hi)


def _akl_head(t: Tensor, lp: Tensor, mu: float, shard: Shard) -> Tensor:
    """akl's head on the shard [N, V_r] (reference.akl_head over the whole vocabulary), found as the kernels find it
    (csrc/divergence.h AklHead): the least value u whose mass above, A(u) = sum of p over {t > u}, is <= mu, by a
    radix select over the raw teacher logits' keys (_akl_radix: 4 all-reduces in float32, 8 in float64) checked at
    its value (_akl_ties); only where the two summation orders straddle mu, a bisection from the right side
    (_akl_bisect: 32 all-reduces, 64), whose need the host reads (one sync on accelerators). At u the group of
    ties, whose first floor((mu - A(u)) / p_u) classes in global order join the head (at least one when no class is
    above u), placed as in _top_k_masks (an all-gather of the counts)."""
    keys, p = _Keys(t.dtype), lp.exp()
    value = _akl_radix(t, p, mu, keys, shard.group)
    mass, mass_from, count_above, size = _akl_ties(t, p, value, shard.group)
    key = keys.keys(value)
    low, low_below = mass <= mu, (key != keys.neg_inf) & (mass_from <= mu)  # (AklHead.settle)
    if not bool((low & ~low_below).all()):
        lo = torch.where(low, torch.where(low_below, keys.neg_inf - 1, key - 1), key)
        hi = torch.where(low, torch.where(low_below, key - 1, key), keys.pos_inf)
        value = _akl_bisect(t, p, mu, keys, lo, hi, shard.group)
        mass, mass_from, count_above, size = _akl_ties(t, p, value, shard.group)
    u = value.unsqueeze(-1)
    above, tie = t > u, t == u
    p_group = _all_reduce(torch.where(tie, p, 0.0).amax(-1), dist.ReduceOp.MAX, shard.group)
    room = (mu - mass) / torch.where(p_group > 0, p_group, 1.0)
    share = torch.where((p_group > 0) & (room < size), room.clamp(min=0).floor(), size)
    share = torch.where((count_above == 0) & (share == 0), 1.0, share)
    counts = _all_gather(tie.sum(-1), shard.group)  # [world, N]
    position = tie.cumsum(-1) + counts[: shard.rank].sum(0).unsqueeze(-1)  # 1-based, in global order
    return above | (tie & (position <= share.unsqueeze(-1)))


def _divergence(
    plan: Plan,
    s: Tensor,
    t: Tensor,
    t_rank: Tensor,
    temperature: float,
    with_grad: bool,
    shard: Shard,
    full: bool = False,
):
    """Per-row losses [N] (before T^2), the shard's gradients [N, V_r] of the student and (with ``full``) the teacher
    (or None), and the rows whose classes are all masked in both logits; akl ranks the raw teacher logits
    ``t_rank``.

    The loss combines a few row sums of per-class statistics (reference.divergence_sums, divergence_combine), each
    class's statistic depending on that class alone (and for akl on its head, found first). The shard's part of each
    row sum is local; their all-reduce gives the row's sums and loss. d_k = dl / d(log q_k) is then the gradient,
    through this shard's part of the sums, of the combination of the whole row's sums, which autograd gives locally,
    and the chain rule through log q = s/T - logsumexp(s/T) gives g_j = (d_j - q_j sum_k d_k) / T: sum_k d_k is the
    other cross-rank quantity. The teacher's gradient is the same through log p (0 on the classes it masks).
    """
    group = shard.group
    lq, lp, masked = _log_softmax(s, t, group)
    head = _akl_head(t_rank, lp, plan.params.mu, shard) if plan.code == Divergence.AKL else None
    with torch.enable_grad():
        lq.requires_grad_(with_grad)
        lp.requires_grad_(full)
        local = reference.divergence_sums(plan, lp, lq, head)
    total = _all_reduce(local.detach(), dist.ReduceOp.SUM, group)
    rows = reference.divergence_combine(plan, total)
    if not with_grad:
        return rows, None, None, masked
    with torch.enable_grad():
        whole = reference.divergence_combine(plan, local + (total - local.detach()))
        grads = torch.autograd.grad(whole.sum(), [lq, lp] if full else [lq])
    d = torch.stack([g.contiguous() for g in grads])  # [1 or 2, N, V_r]
    sum_d = _all_reduce(d.sum(-1, keepdim=True), dist.ReduceOp.SUM, group)
    probs = torch.stack([lq.detach(), lp.detach()][: len(grads)]).exp_()
    grad = d.addcmul_(probs, sum_d, value=-1).div_(temperature)
    teacher_grad = torch.where(torch.isneginf(t), 0.0, grad[1]) if full else None
    return rows, grad[0], teacher_grad, masked


# --------------------------------------------------------------------------------------------------------------
# Decoupled family.
# --------------------------------------------------------------------------------------------------------------


def _top_k_masks(y: Tensor, ks: tuple[int, ...], shard: Shard) -> list[Tensor]:
    """For each k of ``ks``: which classes of the shard are among the row's k largest values of ``y`` over the
    whole vocabulary [N, V_r], ties going to the lower global class index (a stable descending sort).

    The k-th largest value y_(k) is read from every shard's k largest values; the classes above it are in, and
    of the classes equal to it, the first k - #(above) in global order: each shard counts its ties and the ties
    on lower ranks (an all-gather of the counts). Exact for any ties, including masked (-inf) classes.
    """
    n, v_local = y.shape
    k_max = max(ks)
    local = torch.topk(y, min(k_max, v_local), dim=-1).values
    local = torch.cat([local, local.new_full((n, k_max - local.shape[-1]), NEG_INF)], -1)
    candidates = _all_gather(local, shard.group).transpose(0, 1).flatten(1)  # [N, world * k]
    ranked = torch.topk(candidates, k_max, dim=-1).values
    kth = torch.stack([ranked[:, k - 1] for k in ks], -1)  # [N, len(ks)]
    above = (candidates.unsqueeze(-1) > kth.unsqueeze(1)).sum(1)  # [N, len(ks)], all among the candidates
    ties = [y == kth[:, i : i + 1] for i in range(len(ks))]
    counts = _all_gather(torch.stack([tie.sum(-1) for tie in ties], -1), shard.group)  # [world, N, len(ks)]
    before = counts[: shard.rank].sum(0)
    masks = []
    for i, (k, tie) in enumerate(zip(ks, ties)):
        position = tie.cumsum(-1) + before[:, i : i + 1]  # 1-based position of each tie among the row's ties
        masks.append((y > kth[:, i : i + 1]) | (tie & (position <= k - above[:, i : i + 1])))
    return masks


def _bins(plan: Plan, t: Tensor, target: Tensor | None, temperature, shard: Shard) -> Tensor:
    """Bin of each class of the shard [N, V_r] from the raw teacher logits, as reference.decoupled_bins defines
    them over the whole vocabulary (``temperature`` scales the threshold: a number, or [N, 1])."""
    params = plan.params
    if plan.code == Partition.TARGET:
        strong = shard.classes(t.shape[-1], t.device) == target.unsqueeze(-1)
    elif plan.code == Partition.THRESHOLD:
        row_max = _all_reduce(t.amax(-1), dist.ReduceOp.MAX, shard.group)
        strong = (t - row_max.unsqueeze(-1)) >= temperature * params.log_tau
    elif params.split_top1:
        top1, strong = _top_k_masks(t, (1, params.k), shard)
        return torch.where(top1, int(Bin.TOP1), torch.where(strong, int(Bin.STRONG), int(Bin.REST)))
    else:
        (strong,) = _top_k_masks(reference.lowest_first(t) if params.lowest else t, (params.k,), shard)
    return torch.where(strong, int(Bin.STRONG), int(Bin.REST))


# For j in bin b (docs/losses.md): l = w_mass KL([P_b] || [Q_b]) + sum_b w_b (w_fkl F_b + w_rkl R_b), with
# F_b = KL(p^b || q^b), R_b = KL(q^b || p^b), and
#   g_j = (1/T) [w_mass (Q_b - P_b) q^b_j + w_b w_fkl (q^b_j [P_b > 0] - p^b_j)
#                + w_b w_rkl q^b_j (log q^b_j - log p^b_j - R_b)]
# ([P_b > 0]: a bin the teacher gives no mass has in-bin KL 0, so no gradient). Each bin's logsumexp of s/T and t/T
# comes from all-reduced bin maxes and sums of exp; the in-bin log-probs log p^b_j = t_j/T - logsumexp_b(t/T)
# are then local, and so are the in-bin KL terms, summed per bin across ranks.
def _decoupled(
    plan: Plan,
    s: Tensor,
    t: Tensor,
    bins: Tensor,
    temperature: float,
    with_grad: bool,
    shard: Shard,
    full: bool = False,
):
    """Per-row losses [N] (before T^2), the shard's gradients [N, V_r] of the student and (with ``full``) the
    teacher (or None) of a decoupled-family plan, from the logits of the shard and the bin of each class (_bins), and
    the rows whose classes are all masked in both logits."""
    params = plan.params
    x = torch.stack([t, s]) / temperature  # [2, N, V_r]: teacher, student
    index = bins.expand_as(x)
    maxes = x.new_full((2, s.shape[0], len(Bin)), NEG_INF).scatter_reduce_(-1, index, x, "amax")
    maxes = _all_reduce(maxes, dist.ReduceOp.MAX, shard.group)
    dead = torch.isneginf(maxes)  # an empty bin, or all its classes masked
    masked = dead.all(-1).all(0)
    in_bin = x.sub_(torch.where(dead, 0.0, maxes).gather(-1, index))  # x - bin max
    sums = _all_reduce(torch.zeros_like(maxes).scatter_add_(-1, index, in_bin.exp()), dist.ReduceOp.SUM, shard.group)
    log_sums = torch.where(dead, 0.0, sums.log())
    in_bin.sub_(log_sums.gather(-1, index))  # [log p^b_j, log q^b_j]; -inf for masked classes
    # log P_b relative to the row max (exact for logits offset by 1000): (max_b - max) + log sum_b, normalised.
    log_masses = torch.where(dead, NEG_INF, maxes - maxes.amax(-1, keepdim=True) + log_sums)
    log_masses = reference.refine_largest(log_masses - torch.logsumexp(log_masses, -1, keepdim=True))
    # [F_b, R_b] per row, each direction only when it is weighted.
    inner = torch.zeros_like(maxes).scatter_add_(
        -1,
        index,
        torch.stack(
            [
                reference.kl_terms(in_bin[0], in_bin[1]) if params.w_fkl else torch.zeros_like(in_bin[0]),
                reference.kl_terms(in_bin[1], in_bin[0]) if params.w_rkl else torch.zeros_like(in_bin[0]),
            ]
        ),
    )
    fkl, rkl = _all_reduce(inner, dist.ReduceOp.SUM, shard.group)
    if params.adaptive:
        strong = slice(Bin.STRONG, Bin.STRONG + 1)
        w_mass = reference.aekt_weight(params, log_masses[0, :, strong], log_masses[1, :, strong])
    else:
        w_mass = params.w_mass
    # (new_full, not torch.tensor: a host-to-device copy would sync with the stream.)
    weights = torch.stack([s.new_full((), w) for w in (0.0, params.w_strong, params.w_rest)])  # TOP1, STRONG, REST
    divergence = ((params.w_fkl * fkl) if params.w_fkl else 0.0) + ((params.w_rkl * rkl) if params.w_rkl else 0.0)
    loss = reference.weighted(w_mass, reference.kl_terms(log_masses[0], log_masses[1])).sum(-1)
    loss = loss + reference.weighted(weights, divergence).sum(-1)
    if not with_grad:
        return loss, None, None, masked
    masses = log_masses.exp()
    f = params.w_fkl * weights * ~dead[0]  # [N, bins]: f_b (0 for a bin the teacher gives no mass), r_b
    r = params.w_rkl * weights  # [bins]
    teacher_grad = None
    if full:  # gt_j = (ct_b p^b_j + f_b p^b_j (log p^b_j - log q^b_j) - r_b q^b_j) / T (docs/losses.md)
        mass_kl = reference.kl_terms(log_masses[0], log_masses[1])
        ct = w_mass * (mass_kl - masses[0] * mass_kl.sum(-1, keepdim=True)) - f * fkl + r
        p_b, q_b = in_bin.exp()
        teacher_grad = p_b * ct.gather(-1, bins) + f.gather(-1, bins) * reference.kl_terms(in_bin[0], in_bin[1])
        teacher_grad = torch.where(torch.isneginf(t), 0.0, teacher_grad - r[bins] * q_b) / temperature
    coef = w_mass * (masses[1] - masses[0]) + weights * (params.w_fkl * ~dead[0] - params.w_rkl * rkl)  # [N, bins]
    log_ratio = in_bin[1] - in_bin[0] if params.w_rkl else None  # log q^b_j - log p^b_j
    p_in, q_in = in_bin.exp_()
    if params.w_rkl:
        log_ratio = torch.where(q_in == 0, 0.0, q_in * log_ratio).mul_((params.w_rkl * weights)[bins])
    grad = q_in.mul_(coef.gather(-1, bins)).sub_(p_in.mul_((params.w_fkl * weights)[bins]))
    if params.w_rkl:
        grad.add_(log_ratio)
    return loss, grad.div_(temperature), teacher_grad, masked


# --------------------------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------------------------


def _cross_entropy(call, s: Tensor, target: Tensor, with_grad: bool, shard: Shard):
    """Per-row hard-label term at T = 1 over the whole vocabulary [N] (before masking) and its gradient on the shard
    or None, from the raw logits of the shard: the row max, then the shards' reference.cross_entropy_sums are
    all-reduced and read as the reference reads a whole row's."""
    maxes = _all_reduce(s.amax(-1), dist.ReduceOp.MAX, shard.group)
    x = s - torch.where(torch.isneginf(maxes), 0.0, maxes).unsqueeze(-1)
    owner = shard.classes(s.shape[-1], s.device) == target.unsqueeze(-1)
    sums = _all_reduce(cross_entropy_sums(x, owner), dist.ReduceOp.SUM, shard.group)
    ce = cross_entropy_of_sums(call, sums)
    return ce, cross_entropy_grad_of_sums(call, x, owner, sums) if with_grad else None


def _zscores(
    s: Tensor, t: Tensor, group
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Both shards' z-scores over the whole vocabulary (reference.standardized's definition) and each one's
    (n, sd, std) per row [N, 1] for its Jacobian (the teacher's sd also scales a threshold)."""
    x = torch.stack([s, t])
    finite = ~torch.isneginf(x)
    sums = _all_reduce(
        torch.stack([finite.sum(-1).to(x.dtype), torch.where(finite, x, 0.0).sum(-1)]), dist.ReduceOp.SUM, group
    )
    n = sums[0].unsqueeze(-1)
    centred = torch.where(finite, x - (sums[1].unsqueeze(-1) / n.clamp(min=1)), 0.0)
    # The deviations' own mean corrects the rounded mean (as reference.standardized).
    second = _all_reduce(torch.stack([centred.sum(-1), (centred * centred).sum(-1)]), dist.ReduceOp.SUM, group)
    shift = second[0].unsqueeze(-1) / n.clamp(min=1)
    m2 = (second[1].unsqueeze(-1) - n * shift * shift).clamp(min=0)
    centred = torch.where(finite, centred - shift, 0.0)
    std = torch.where(n > 1, (m2 / (n - 1).clamp(min=1)).sqrt(), 0.0)
    sd = std + STANDARDIZE_EPS
    z = torch.where(finite, centred / sd, NEG_INF)
    return z[0], z[1], (n[0], sd[0], std[0]), (n[1], sd[1], std[1])


def _through_zscore(grad: Tensor, z: Tensor, stats: tuple[Tensor, Tensor, Tensor], group) -> Tensor:
    """d loss / d s from G = d loss / d z on the shard: (G - mean G) / sd - z coef (docs/losses.md)."""
    n, sd, std = stats
    finite = ~torch.isneginf(z)
    sums = torch.stack([torch.where(finite, grad, 0.0).sum(-1), torch.where(finite, grad * z, 0.0).sum(-1)])
    sums = _all_reduce(sums, dist.ReduceOp.SUM, group).unsqueeze(-1)
    coef = torch.where(std > 0, sums[1] / ((n - 1) * std), 0.0)  # (std > 0 implies n > 1)
    return torch.where(finite, (grad - sums[0] / n) / sd - z * coef, 0.0)


def _shard_rows(call, student, teacher, with_grad, shard, full=False):
    """Per-row losses [N], their parts [2, N] ([distill, ce], ce 0 without the term) and (if with_grad) the shard's
    gradient of the row losses, in the student's dtype; with ``full`` also the teacher's (in its dtype) and
    d loss / d T per row (docs/losses.md, "Learnable temperature and the teacher's gradient"), else None."""
    dtype = reference.compute_dtype(student, teacher)
    temperature = call.temperature
    # As in the reference: ignored rows become zeros before any arithmetic (a NaN there cannot leak).
    valid = call.valid  # (derived from the target: made once here)
    s = torch.where(valid.unsqueeze(-1), student.detach().to(dtype), 0.0)
    t = torch.where(valid.unsqueeze(-1), teacher.detach().to(dtype), 0.0)
    target = None if call.target is None else torch.where(valid, call.target, 0)
    zs, zt, sd_t = s, t, 1.0
    if call.standardize:
        zs, zt, stats, teacher_stats = _zscores(s, t, shard.group)
        sd_t = teacher_stats[1]
    if call.plan.family == DIVERGENCE:
        loss, grad, teacher_grad, masked = _divergence(
            call.plan, zs / temperature, zt / temperature, t, temperature, with_grad, shard, full
        )
    else:  # (the partition ranks the raw teacher logits; the z-score's threshold in their units)
        bins = _bins(call.plan, t, target, temperature * sd_t, shard)
        loss, grad, teacher_grad, masked = _decoupled(call.plan, zs, zt, bins, temperature, with_grad, shard, full)
    kept = valid & ~masked  # a row masked in both logits on every shard is left out like an ignored one
    scale = temperature**2 if call.t2_scale else 1.0
    dtemp = None
    if full:  # -sum_j (x_j g_j + y_j gt_j) before the Jacobians, each shifted by its row max (sum_j g_j = 0)
        x, y = zs / temperature, zt / temperature
        shifts = _all_reduce(torch.stack([x.amax(-1), y.amax(-1)]), dist.ReduceOp.MAX, shard.group)
        shifts = torch.where(torch.isneginf(shifts), 0.0, shifts).unsqueeze(-1)
        terms = (
            torch.where(torch.isneginf(x), 0.0, (x - shifts[0]) * grad)
            + torch.where(torch.isneginf(y), 0.0, (y - shifts[1]) * teacher_grad)
        ).sum(-1)
        dtemp = -scale * _all_reduce(terms, dist.ReduceOp.SUM, shard.group)
        if call.t2_scale:
            dtemp = dtemp + 2 * temperature * loss
        dtemp = torch.where(kept, reference.weighted(call.distill_weight, dtemp), 0.0)
    if grad is not None and call.standardize:
        grad = _through_zscore(grad, zs, stats, shard.group)
        if teacher_grad is not None:
            teacher_grad = _through_zscore(teacher_grad, zt, teacher_stats, shard.group)
    loss = torch.where(kept, loss * scale, 0.0)
    ce = None
    if grad is not None:
        grad = reference.weighted(call.distill_weight, grad * scale)
    if call.with_ce:
        ce, ce_grad = _cross_entropy(call, s, target, with_grad and call.ce_weight != 0, shard)
        ce = torch.where(kept, ce, 0.0)
        if ce_grad is not None:
            grad = grad + call.ce_weight * ce_grad
    if grad is not None:
        grad = torch.where(kept.unsqueeze(-1), grad, 0.0).to(student.dtype)
    if teacher_grad is not None:
        teacher_grad = torch.where(
            kept.unsqueeze(-1), reference.weighted(call.distill_weight, teacher_grad * scale), 0.0
        )
        teacher_grad = teacher_grad.to(teacher.dtype)
    return *backends.weigh(call, loss, ce), grad, teacher_grad, dtemp


class _ShardLoss(torch.autograd.Function):
    """Row losses whose gradients for this rank's shard (the student's; with a teacher that requires grad or a
    temperature tensor, the teacher's and d loss / d T too) are computed with them; backward scales them in place,
    locally."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, call, shard):
        full = teacher.requires_grad or (temperature is not None and temperature.requires_grad)
        rows, parts, grad, teacher_grad, dtemp = _shard_rows(call, student, teacher, True, shard, full)
        ctx.save_for_backward(grad, teacher_grad, dtemp)
        ctx.temperature_dtype = None if temperature is None else temperature.dtype
        ctx.consumed = False
        ctx.mark_non_differentiable(parts)
        return rows, parts

    @staticmethod
    def backward(ctx, grad_rows, _grad_parts):
        return (*consume_full_gradients(ctx, grad_rows, reference.scale_rows_), None, None)


def distill_loss(
    method: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    mask: Tensor | None = None,
    **options,
) -> Tensor:
    """``kdkernels.distill_loss`` with the vocabulary sharded across the ranks of ``group`` (module docstring).

    Args:
        method, mask, **options (the loss options and the method's hyperparameters): as in
            ``kdkernels.distill_loss``, the same on every rank (standardize: the row statistics of the whole
            vocabulary, all-reduced).
        student_logits, teacher_logits: [..., V_r], this rank's contiguous shard of the classes (ranks in order).
        target: optional global class indices [...] in [0, V) (or ignore_index), the same on every rank.
        group: the process group (default: the default group); it must be initialised.

    Returns:
        The loss of the whole vocabulary, identical on every rank: float32 (float64 for float64 inputs), 0-d, or
        the leading shape for reduction="none". Its gradient reaches this rank's student_logits shard.
    """
    temperature, temperature_tensor = split_temperature(options.pop("temperature", None))
    settings = resolve(method, temperature=temperature, **options)
    check_float_tensor("student_logits", student_logits)
    check_float_tensor("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "kdkernels.parallel needs torch.distributed: call torch.distributed.init_process_group first"
        )
    leading, v_local = student_logits.shape[:-1], student_logits.shape[-1]
    student = student_logits.reshape(-1, v_local)
    teacher = teacher_logits.reshape(-1, v_local)
    shard = shard_of(student, group)
    call = settings.bind(target, leading, shard.num_classes, student.device, mask)
    if torch.is_grad_enabled() and student.requires_grad or full_gradient(teacher, temperature_tensor):
        check_temperature_device(temperature_tensor, student.device)
        rows, parts = _ShardLoss.apply(student, teacher, temperature_tensor, call, shard)
    else:
        rows, parts = _shard_rows(call, student, teacher, False, shard)[:2]
    return finish(call, backends.reduce(rows, call), backends.reduce(parts, call), leading)


# --- per-method definitions: generated by scripts/method_api.py from METHODS; do not edit ---


def kd_loss(student_logits, teacher_logits, target=None, *, temperature=4.0, t2_scale=True, **options):
    """Hinton et al. 2015, forward KL (mdistiller KD): ``distill_loss("kd", ...)`` with this method's defaults
    (docs/losses.md, kd).
    """
    return distill_loss(
        "kd", student_logits, teacher_logits, target, temperature=temperature, t2_scale=t2_scale, **options
    )


def rkl_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, t2_scale=False, **options):
    """reverse KL: ``distill_loss("rkl", ...)`` with this method's defaults (docs/losses.md, rkl)."""
    return distill_loss(
        "rkl", student_logits, teacher_logits, target, temperature=temperature, t2_scale=t2_scale, **options
    )


def jsd_loss(student_logits, teacher_logits, target=None, *, beta=0.5, temperature=1.0, t2_scale=False, **options):
    """generalized JSD (TRL GKD, Liger): ``distill_loss("jsd", ...)`` with this method's defaults (docs/losses.md,
    jsd).
    """
    return distill_loss(
        "jsd", student_logits, teacher_logits, target, beta=beta, temperature=temperature, t2_scale=t2_scale, **options
    )


def skew_fkl_loss(student_logits, teacher_logits, target=None, *, skew=0.1, temperature=1.0, t2_scale=False, **options):
    """skew forward KL (DistiLLM): ``distill_loss("skew_fkl", ...)`` with this method's defaults (docs/losses.md,
    skew_fkl).
    """
    return distill_loss(
        "skew_fkl",
        student_logits,
        teacher_logits,
        target,
        skew=skew,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def skew_rkl_loss(student_logits, teacher_logits, target=None, *, skew=0.1, temperature=1.0, t2_scale=False, **options):
    """skew reverse KL (DistiLLM): ``distill_loss("skew_rkl", ...)`` with this method's defaults (docs/losses.md,
    skew_rkl).
    """
    return distill_loss(
        "skew_rkl",
        student_logits,
        teacher_logits,
        target,
        skew=skew,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def tvd_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, t2_scale=False, **options):
    """total variation distance: ``distill_loss("tvd", ...)`` with this method's defaults (docs/losses.md, tvd)."""
    return distill_loss(
        "tvd", student_logits, teacher_logits, target, temperature=temperature, t2_scale=t2_scale, **options
    )


def abkd_loss(
    student_logits, teacher_logits, target=None, *, alpha=0.5, beta=0.5, temperature=1.0, t2_scale=False, **options
):
    """ABKD, alpha-beta divergence (Wang et al., ICML 2025, arXiv 2505.04560): ``distill_loss("abkd", ...)`` with
    this method's defaults (docs/losses.md, abkd).
    """
    return distill_loss(
        "abkd",
        student_logits,
        teacher_logits,
        target,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def wsd_loss(student_logits, teacher_logits, target=None, *, lam=0.5, temperature=1.0, t2_scale=False, **options):
    """weighted sum of forward and reverse KL, symmetric KL at lam = 0.5 (ABKD authors' LLM code):
    ``distill_loss("wsd", ...)`` with this method's defaults (docs/losses.md, wsd).
    """
    return distill_loss(
        "wsd", student_logits, teacher_logits, target, lam=lam, temperature=temperature, t2_scale=t2_scale, **options
    )


def bdkd_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, t2_scale=False, **options):
    """entropy-weighted forward and reverse KL (ABKD authors' LLM code): ``distill_loss("bdkd", ...)`` with this
    method's defaults (docs/losses.md, bdkd).
    """
    return distill_loss(
        "bdkd", student_logits, teacher_logits, target, temperature=temperature, t2_scale=t2_scale, **options
    )


def akl_loss(student_logits, teacher_logits, target=None, *, mu=0.5, temperature=1.0, t2_scale=False, **options):
    """AKL, adaptive KL (Wu et al., COLING 2025; wutaiqiang/LLM_KD_AKL): ``distill_loss("akl", ...)`` with this
    method's defaults (docs/losses.md, akl).
    """
    return distill_loss(
        "akl", student_logits, teacher_logits, target, mu=mu, temperature=temperature, t2_scale=t2_scale, **options
    )


def dkd_loss(
    student_logits, teacher_logits, target=None, *, alpha=1.0, beta=8.0, temperature=4.0, t2_scale=True, **options
):
    """DKD, Zhao et al. 2022 (mdistiller DKD.py): ``distill_loss("dkd", ...)`` with this method's defaults
    (docs/losses.md, dkd).
    """
    return distill_loss(
        "dkd",
        student_logits,
        teacher_logits,
        target,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def gdkd_loss(
    student_logits,
    teacher_logits,
    target=None,
    *,
    k=5,
    w0=1.0,
    w1=1.0,
    w2=8.0,
    partitions=2,
    strategy="best",
    kl_type="forward",
    temperature=4.0,
    t2_scale=True,
    **options,
):
    """GDKD (arXiv 2512.04625; ZaberKo/GDKD): ``distill_loss("gdkd", ...)`` with this method's defaults
    (docs/losses.md, gdkd).
    """
    return distill_loss(
        "gdkd",
        student_logits,
        teacher_logits,
        target,
        k=k,
        w0=w0,
        w1=w1,
        w2=w2,
        partitions=partitions,
        strategy=strategy,
        kl_type=kl_type,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def cakd_loss(
    student_logits,
    teacher_logits,
    target=None,
    *,
    alpha=1.0,
    beta=8.0,
    bcd_weight=1.0,
    strong="target",
    k=5,
    tau=0.5,
    temperature=4.0,
    t2_scale=True,
    **options,
):
    """CAKD (arXiv 2410.14741): ``distill_loss("cakd", ...)`` with this method's defaults (docs/losses.md, cakd)."""
    return distill_loss(
        "cakd",
        student_logits,
        teacher_logits,
        target,
        alpha=alpha,
        beta=beta,
        bcd_weight=bcd_weight,
        strong=strong,
        k=k,
        tau=tau,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


def aekt_loss(
    student_logits, teacher_logits, target=None, *, beta=8.0, max_weight=5.0, temperature=4.0, t2_scale=True, **options
):
    """AEKT (arXiv 2409.01679): ``distill_loss("aekt", ...)`` with this method's defaults (docs/losses.md, aekt)."""
    return distill_loss(
        "aekt",
        student_logits,
        teacher_logits,
        target,
        beta=beta,
        max_weight=max_weight,
        temperature=temperature,
        t2_scale=t2_scale,
        **options,
    )


# --- end of the generated definitions ---

__all__ = ["distill_loss", *(spec.function for spec in METHODS.values())]
