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
  logsumexps; then SUM of the shard's loss terms and of the row sum the gradient needs. 4 in all.
- decoupled family: the partition first (teacher top-k: an all-gather of each shard's k largest teacher values,
  then of the counts of ties at the k-th value; threshold: all-reduce MAX of the teacher's row max; target: none,
  the rank that owns the class marks it); then all-reduce MAX of the bin maxes, SUM of the bins' sums of exp and
  SUM of the in-bin KL terms. 4 (target), 5 (threshold) or 6 (top-k) in all.

Works with any backend whose collectives take tensors on the logits' device (gloo for CPU, NCCL for CUDA). On
accelerators nothing syncs with the host: the checks that need the global V (target in [0, V), k < V) and the
agreement of N run on the device (torch._assert_async). Every rank must make the same calls with the same
arguments; a check that fails fails on every rank alike, before or right after the first collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import backends, reference
from .functional import _loss_function, check_arguments, check_classes, denominator
from .methods import DIVERGENCE, get_method

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

    group: Optional[dist.ProcessGroup]
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
    sizes = _all_gather(torch.cat([student.new_full((1,), v_local, dtype=torch.int64),
                                   student.new_full((1,), n, dtype=torch.int64)]), group)
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


def _log_softmax(s: Tensor, t: Tensor, group) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities on the shard, normalised over the whole vocabulary."""
    maxes = _all_reduce(torch.stack([s.amax(-1), t.amax(-1)], -1), dist.ReduceOp.MAX, group)
    shift = torch.where(torch.isneginf(maxes), 0.0, maxes)  # a fully masked row: keep -inf - 0, not -inf - -inf
    sums = _all_reduce(torch.stack([(s - shift[:, :1]).exp().sum(-1), (t - shift[:, 1:]).exp().sum(-1)], -1),
                       dist.ReduceOp.SUM, group)
    # (x - max) - log(sum): the same rounding as torch.log_softmax, exact for logits offset by 1000.
    log_sums = sums.log()
    return (s - shift[:, :1]) - log_sums[:, :1], (t - shift[:, 1:]) - log_sums[:, 1:]


def _divergence(method: str, hp: dict, s: Tensor, t: Tensor, temperature: float, with_grad: bool, group):
    """Per-row losses [N] (before T^2) and the shard's gradient [N, V_r] (or None) of a divergence-family method.

    The loss is l = sum_k f(log p_k, log q_k) over the whole vocabulary, each class's term (the reference's,
    reference.divergence_rows) depending on that class alone. So d_k = dl / d(log q_k) is the gradient of the
    shard's own terms, which autograd gives locally, and the chain rule through log q = s/T - logsumexp(s/T)
    gives g_j = (d_j - q_j sum_k d_k) / T: the only cross-rank quantity is the row sum of d.
    """
    lq, lp = _log_softmax(s, t, group)
    with torch.enable_grad():
        lq.requires_grad_(with_grad)
        terms = reference.divergence_rows(method, lp, lq, hp)
        d = torch.autograd.grad(terms.sum(), lq)[0].contiguous() if with_grad else None
    if not with_grad:
        return _all_reduce(terms.detach(), dist.ReduceOp.SUM, group), None
    sums = _all_reduce(torch.stack([terms.detach(), d.sum(-1)], -1), dist.ReduceOp.SUM, group)
    grad = d.addcmul_(lq.detach().exp_(), sums[:, 1:], value=-1).div_(temperature)
    return sums[:, 0], grad


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
    ties = [y == kth[:, i:i + 1] for i in range(len(ks))]
    counts = _all_gather(torch.stack([tie.sum(-1) for tie in ties], -1), shard.group)  # [world, N, len(ks)]
    before = counts[:shard.rank].sum(0)
    masks = []
    for i, (k, tie) in enumerate(zip(ks, ties)):
        position = tie.cumsum(-1) + before[:, i:i + 1]  # 1-based position of each tie among the row's ties
        masks.append((y > kth[:, i:i + 1]) | (tie & (position <= k - above[:, i:i + 1])))
    return masks


def _partition(method: str, hp: dict, t: Tensor, target: Optional[Tensor], shard: Shard) -> tuple[Tensor, int]:
    """(bin of each class of the shard [N, V_r], number of bins), as reference.decoupled_partition defines them."""
    if method in ("dkd", "aekt") or (method == "cakd" and hp["strong"] == "target"):
        strong = shard.classes(t.shape[-1], t.device) == target.unsqueeze(-1)
    elif method == "cakd" and hp["strong"] == "threshold":
        row_max = _all_reduce(t.amax(-1), dist.ReduceOp.MAX, shard.group)
        strong = (t - row_max.unsqueeze(-1)) >= math.log(hp["tau"])
    elif method == "gdkd" and hp["partitions"] == 3:
        top1, top_k = _top_k_masks(t, (1, hp["k"]), shard)
        return torch.where(top1, 0, torch.where(top_k, 1, 2)), 3
    else:  # gdkd with 2 partitions, cakd strong="topk"
        (strong,) = _top_k_masks(t, (hp["k"],), shard)
    return (~strong).long(), 2


# For j in bin m (LOSSES.md): l = w0 KL([P_m] || [Q_m]) + sum_m w_m KL(p^m || q^m) and
#   g_j = (1/T) [w0 (Q_m - P_m) q^m_j + w_m (q^m_j [P_m > 0] - p^m_j)]
# ([P_m > 0]: a bin the teacher gives no mass has in-bin KL 0, so no gradient). Each bin's logsumexp of s/T and t/T
# comes from all-reduced bin maxes and sums of exp; the in-bin log-probs log p^m_j = t_j/T - logsumexp_{B_m}(t/T)
# are then local, and so are the in-bin KL terms, summed per bin across ranks.
def _decoupled(method: str, hp: dict, s: Tensor, t: Tensor, target: Optional[Tensor], temperature: float,
               with_grad: bool, shard: Shard):
    """Per-row losses [N] (before T^2) and the shard's gradient [N, V_r] (or None) of a decoupled-family method."""
    bins, num_bins = _partition(method, hp, t, target, shard)
    x = torch.stack([t, s])  # [2, N, V_r]: teacher, student
    index = bins.expand_as(x)
    maxes = x.new_full((2, s.shape[0], num_bins), NEG_INF).scatter_reduce_(-1, index, x, "amax")
    maxes = _all_reduce(maxes, dist.ReduceOp.MAX, shard.group)
    dead = torch.isneginf(maxes)  # an empty bin, or all its classes masked
    in_bin = x.sub_(torch.where(dead, 0.0, maxes).gather(-1, index))  # x - bin max
    sums = _all_reduce(torch.zeros_like(maxes).scatter_add_(-1, index, in_bin.exp()), dist.ReduceOp.SUM,
                       shard.group)
    log_sums = torch.where(dead, 0.0, sums.log())
    in_bin.sub_(log_sums.gather(-1, index))  # [log p^m_j, log q^m_j]; -inf for masked classes
    # log P_m relative to the row max (exact for logits offset by 1000): (max_m - max) + log sum_m, normalised.
    log_masses = torch.where(dead, NEG_INF, maxes - maxes.amax(-1, keepdim=True) + log_sums)
    log_masses = log_masses - torch.logsumexp(log_masses, -1, keepdim=True)  # [log P_m, log Q_m], [2, N, bins]
    inner = torch.zeros_like(maxes[0]).scatter_add_(-1, bins, reference.kl_terms(in_bin[0], in_bin[1]))
    inner = _all_reduce(inner, dist.ReduceOp.SUM, shard.group)
    if method == "aekt":  # w0 = a_r = min(p_y / q_y, max_weight), detached; bin 0 = {y}
        w0 = (log_masses[0, :, :1] - log_masses[1, :, :1]).exp().clamp(max=hp["max_weight"])
        weights = [0.0, hp["beta"]]
    else:
        w0, weights = reference.decoupled_weights(method, None, None, None, hp)
    # (new_full, not torch.tensor: a host-to-device copy would sync with the stream.)
    weights = torch.stack([s.new_full((), w) for w in weights])
    loss = (w0 * reference.kl_terms(log_masses[0], log_masses[1])).sum(-1) + (weights * inner).sum(-1)
    if not with_grad:
        return loss, None
    masses = log_masses.exp()
    coef = w0 * (masses[1] - masses[0]) + weights * ~dead[0]  # [N, bins]
    p_in, q_in = in_bin.exp_()
    grad = q_in.mul_(coef.gather(-1, bins)).sub_(p_in.mul_(weights[bins])).div_(temperature)
    return loss, grad


# --------------------------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------------------------


def _shard_rows(student, teacher, target, valid, method, hp, temperature, t2_scale, with_grad, shard):
    """Per-row losses [N] and (if with_grad) the shard's gradient of the row losses, in the student's dtype."""
    dtype = reference.compute_dtype(student, teacher)
    keep = valid.unsqueeze(-1)
    # As in the reference: ignored rows become zeros before any arithmetic (a NaN there cannot leak).
    s = torch.where(keep, student.detach().to(dtype), 0.0) / temperature
    t = torch.where(keep, teacher.detach().to(dtype), 0.0) / temperature
    if get_method(method).family == DIVERGENCE:
        loss, grad = _divergence(method, hp, s, t, temperature, with_grad, shard.group)
    else:
        target = None if target is None else torch.where(valid, target.long(), 0)
        loss, grad = _decoupled(method, hp, s, t, target, temperature, with_grad, shard)
    scale = temperature**2 if t2_scale else 1.0
    loss = torch.where(valid, loss * scale, 0.0)
    if grad is not None:
        grad = grad.mul_(keep * scale).to(student.dtype)
    return loss, grad


class _ShardLoss(torch.autograd.Function):
    """Row losses whose gradient for this rank's shard is computed with them; backward scales it, locally."""

    @staticmethod
    def forward(ctx, student, teacher, target, valid, method, hp, temperature, t2_scale, shard):
        loss, grad = _shard_rows(student, teacher, target, valid, method, hp, temperature, t2_scale, True, shard)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        grad_student = (grad * grad_rows.unsqueeze(-1)).to(grad.dtype)
        return grad_student, None, None, None, None, None, None, None, None


def distill_loss(
    method: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
    temperature: Optional[float] = None,
    t2_scale: Optional[bool] = None,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    normalizer=None,
    **hyperparameters,
) -> Tensor:
    """``kdkernels.distill_loss`` with the vocabulary sharded across the ranks of ``group`` (module docstring).

    Args:
        method, temperature, t2_scale, reduction, ignore_index, normalizer, **hyperparameters: as in
            ``kdkernels.distill_loss``, the same on every rank.
        student_logits, teacher_logits: [..., V_r], this rank's contiguous shard of the classes (ranks in order).
        target: optional global class indices [...] in [0, V) (or ignore_index), the same on every rank.
        group: the process group (default: the default group); it must be initialised.

    Returns:
        The loss of the whole vocabulary, identical on every rank: float32 (float64 for float64 inputs), 0-d, or
        the leading shape for reduction="none". Its gradient reaches this rank's student_logits shard.
    """
    spec, hp, temperature, t2_scale = check_arguments(
        method, student_logits, teacher_logits, temperature, t2_scale, reduction, normalizer, hyperparameters)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("kdkernels.parallel needs torch.distributed: call torch.distributed.init_process_group "
                           "first")
    leading, v_local = student_logits.shape[:-1], student_logits.shape[-1]
    student = student_logits.reshape(-1, v_local)
    teacher = teacher_logits.reshape(-1, v_local)
    shard = shard_of(student, group)
    check_classes(spec, hp, student_logits, target, ignore_index, shard.num_classes)
    target = None if target is None else target.reshape(-1)
    valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device) if target is None \
        else target != ignore_index
    args = (student, teacher, target, valid, method, hp, float(temperature), t2_scale, shard)
    if torch.is_grad_enabled() and student.requires_grad:
        rows = _ShardLoss.apply(*args)
    else:
        rows, _ = _shard_rows(*args[:-1], False, shard)
    loss = backends.reduce(rows, reduction, denominator(valid, reduction, normalizer))
    return loss.reshape(leading) if reduction == "none" else loss


_OPTIONS = {"group": None}
kd_loss = _loss_function("kd", distill_loss, _OPTIONS)
rkl_loss = _loss_function("rkl", distill_loss, _OPTIONS)
jsd_loss = _loss_function("jsd", distill_loss, _OPTIONS)
skew_fkl_loss = _loss_function("skew_fkl", distill_loss, _OPTIONS)
skew_rkl_loss = _loss_function("skew_rkl", distill_loss, _OPTIONS)
tvd_loss = _loss_function("tvd", distill_loss, _OPTIONS)
abkd_loss = _loss_function("abkd", distill_loss, _OPTIONS)
dkd_loss = _loss_function("dkd", distill_loss, _OPTIONS)
gdkd_loss = _loss_function("gdkd", distill_loss, _OPTIONS)
cakd_loss = _loss_function("cakd", distill_loss, _OPTIONS)
aekt_loss = _loss_function("aekt", distill_loss, _OPTIONS)

__all__ = ["distill_loss", "kd_loss", "rkl_loss", "jsd_loss", "skew_fkl_loss", "skew_rkl_loss", "tvd_loss",
           "abkd_loss", "dkd_loss", "gdkd_loss", "cakd_loss", "aekt_loss"]
