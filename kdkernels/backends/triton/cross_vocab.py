"""The Triton kernel of the losses between two vocabularies (docs/losses.md, section 11.5): uld and GOLD's hybrid,
one program per row, the row sorted on chip where it fits (``MAX_BLOCK`` classes a side).

Per row: the two log-normalisers over the whole rows (one tile each); the compared classes' probabilities (uld: all;
hybrid: the unmatched ones, gathered through the map's lists) packed into int64 sort keys, the float bits of q~ (>= 0,
so they sort as integers) above 2^31 - 1 - class, and sorted descending by ``tl.sort``: ties rank the lower class
first (section 11.2's rule) and the class comes back with its value; the teacher's bits sort alone (a constant). One
pass over the ranks gives the sorted L1 and r = w q~ sign(q~_(i) - p~_(i)) at each rank's class; hybrid's matched
pairs give J and r (the same formulas as cross_vocab.h); then the gradient g = scale (r - q sum r) plus the
cross-entropy's is stored at each class through the same lists (a scatter: every class is written once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...methods import CrossVocab, CrossVocabParams
from .. import combine
from ..kernel_call import KernelCall
from .common import NEG_INF
from .divergence import KD, RKL

# The widest row a program sorts on chip (both sides padded to the same power of two).
MAX_BLOCK = 4096


def launch_options(block: int) -> dict:
    """The compile options of a row of ``block`` classes a side: warps enough for at most 16 keys a thread."""
    return dict(num_warps=max(4, min(32, block // 512)))


@triton.jit
def _log_partition(ptr, width, inv_t, BLOCK: tl.constexpr):
    """log sum exp(x * inv_t) over a row of ``width`` logits (one tile); -inf when all are masked."""
    cols = tl.arange(0, BLOCK)
    x = tl.load(ptr + cols, mask=cols < width, other=NEG_INF).to(tl.float32) * inv_t
    m = tl.max(x, axis=0)
    shift = tl.where(m == NEG_INF, 0.0, m)
    return shift + tl.log(tl.sum(tl.exp(x - shift), axis=0))


@triton.jit
def _matched_term(lq, lp, matched_code, mix_p, mix_q, log_mix_p, log_mix_q):
    """(J, r = q~ dJ/dq~) of matched pairs from their log q~ and log p~ (cross_vocab.h matched_term)."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    kd = tl.where(p == 0.0, 0.0, p * (lp - lq))
    rkl = tl.where(q == 0.0, 0.0, q * (lq - lp))
    a = lp + log_mix_p
    b = lq + log_mix_q
    hi = tl.maximum(a, b)
    lm = tl.where(hi == NEG_INF, hi, hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi)))
    jsd = mix_p * tl.where(p == 0.0, 0.0, p * (lp - lm)) + mix_q * tl.where(q == 0.0, 0.0, q * (lq - lm))
    loss = tl.where(matched_code == KD, kd, tl.where(matched_code == RKL, rkl, jsd))
    r_rkl = tl.where(q == 0.0, 0.0, q * (lq - lp + 1.0))
    r_jsd = tl.where(q == 0.0, 0.0, mix_q * q * (lq - lm))
    r = tl.where(matched_code == KD, -p, tl.where(matched_code == RKL, r_rkl, r_jsd))
    return loss, r


@triton.jit
def _store_grad(g_row, s_row, cls, ok, r, R, lz_x, inv_ts, grad_scale, target, lz1, ce_scale, WITH_CE: tl.constexpr):
    """g = grad_scale (r - q R) (+ the cross-entropy's) at classes ``cls`` (a scatter)."""
    s = tl.load(s_row + cls, mask=ok, other=0.0).to(tl.float32)
    g = grad_scale * (r - tl.exp(s * inv_ts - lz_x) * R)
    if WITH_CE:
        g += ce_scale * (tl.exp(s - lz1) - (cls == target).to(tl.float32))
    tl.store(g_row + cls, g.to(g_row.dtype.element_ty), mask=ok)


# Long: its passes (both softmaxes, the sorts, the loss and gradient) share each row's tiles in registers.
@triton.jit
def cross_vocab_kernel(
    s_ptr, t_ptr, cs_ptr, ct_ptr, target_ptr, denom_ptr, loss_ptr, ce_ptr, g_ptr, dscale_ptr,
    free_s_ptr, free_t_ptr, pair_s_ptr, pair_t_ptr,
    Vs, Vt, ns, nt, num_pairs, s_stride, t_stride, ignore_index,
    inv_ts, inv_tt, w_m, w_u, matched_code, mix_p, mix_q, log_mix_p, log_mix_q, grad_scale, scale_grad_scale, ce_scale,
    HAS_TARGET: tl.constexpr, HAS_DENOM: tl.constexpr, HAS_CS: tl.constexpr, HAS_CT: tl.constexpr, HYBRID: tl.constexpr,
    WITH_CE: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * Vs
    lz_x = _log_partition(s_row, Vs, inv_ts, BLOCK_S)
    lz_y = _log_partition(t_row, Vt, inv_tt, BLOCK_T)
    skip = (lz_x == NEG_INF) & (lz_y == NEG_INF)
    target = -1
    if HAS_TARGET:
        target = tl.load(target_ptr + row)
        skip = skip | (target == ignore_index)
    if HAS_DENOM:  # (the gradients are scaled by 1 / denominator here; the loss rows are reduced by the caller)
        inv_denom = 1.0 / tl.load(denom_ptr).to(tl.float32)
        grad_scale *= inv_denom
        scale_grad_scale *= inv_denom
        ce_scale *= inv_denom
    if skip:  # left out, or masked in both models: loss 0, gradient 0
        tl.store(loss_ptr + row, 0.0)
        if WITH_CE:
            tl.store(ce_ptr + row, 0.0)
        if WITH_GRAD:
            tl.store(dscale_ptr + row, 0.0)
            for j in range(0, Vs, BLOCK_S):
                cols = j + tl.arange(0, BLOCK_S)
                tl.store(g_row + cols, tl.zeros([BLOCK_S], g_ptr.dtype.element_ty), mask=cols < Vs)
    else:
        cs = tl.load(cs_ptr + row).to(tl.float32) if HAS_CS else 0.0
        ct = tl.load(ct_ptr + row).to(tl.float32) if HAS_CT else 0.0
        # The compared classes, sorted: keys = bits(q~) * 2^31 + (2^31 - 1 - class), padding -1 (last).
        k = tl.arange(0, BLOCK)
        ok_s = k < ns
        ok_t = k < nt
        cls_s = tl.load(free_s_ptr + k, mask=ok_s, other=0) if HYBRID else k
        cls_t = tl.load(free_t_ptr + k, mask=ok_t, other=0) if HYBRID else k
        s = tl.load(s_row + cls_s, mask=ok_s, other=NEG_INF).to(tl.float32)
        t = tl.load(t_row + cls_t, mask=ok_t, other=NEG_INF).to(tl.float32)
        q = tl.exp(s * inv_ts - lz_x + cs)
        p = tl.exp(t * inv_tt - lz_y + ct)
        key_s = q.to(tl.int32, bitcast=True).to(tl.int64) * 2147483648 + (2147483647 - cls_s).to(tl.int64)
        key_s = tl.sort(tl.where(ok_s, key_s, -1), descending=True)
        key_t = tl.sort(tl.where(ok_t, p.to(tl.int32, bitcast=True), -1), descending=True)
        ranked_ok = k < ns
        q_sorted = tl.where(ranked_ok, (key_s // 2147483648).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
        p_sorted = tl.where(k < nt, key_t.to(tl.float32, bitcast=True), 0.0)
        cls_sorted = tl.where(ranked_ok, 2147483647 - (key_s % 2147483648), 0).to(tl.int32)
        d = q_sorted - p_sorted
        sign = (d > 0).to(tl.float32) - (d < 0).to(tl.float32)
        r_sorted = w_u * q_sorted * sign
        loss = w_u * tl.sum(tl.abs(d), axis=0)
        if HYBRID:  # no term without unmatched classes on both sides
            compared = (ns > 0) & (nt > 0)
            r_sorted = tl.where(compared, r_sorted, 0.0)
            loss = tl.where(compared, loss, 0.0)
        R = tl.sum(r_sorted, axis=0)
        if HYBRID:
            m = tl.arange(0, BLOCK_M)
            ok_m = m < num_pairs
            a = tl.load(pair_s_ptr + m, mask=ok_m, other=0)
            b = tl.load(pair_t_ptr + m, mask=ok_m, other=0)
            lq = tl.load(s_row + a, mask=ok_m, other=NEG_INF).to(tl.float32) * inv_ts - lz_x + cs
            lp = tl.load(t_row + b, mask=ok_m, other=NEG_INF).to(tl.float32) * inv_tt - lz_y + ct
            term, r_m = _matched_term(lq, lp, matched_code, mix_p, mix_q, log_mix_p, log_mix_q)
            loss += w_m * tl.sum(tl.where(ok_m, term, 0.0), axis=0)
            r_m = tl.where(ok_m, w_m * r_m, 0.0)
            R += tl.sum(r_m, axis=0)
        tl.store(loss_ptr + row, loss)
        lz1 = lz_x
        if WITH_CE:
            if inv_ts != 1.0:
                lz1 = _log_partition(s_row, Vs, 1.0, BLOCK_S)
            s_target = tl.load(s_row + tl.where((target >= 0) & (target < Vs), target, 0)).to(tl.float32)
            tl.store(ce_ptr + row, lz1 - s_target)
        if WITH_GRAD:
            tl.store(dscale_ptr + row, scale_grad_scale * R)
            _store_grad(g_row, s_row, cls_sorted, ranked_ok, r_sorted, R, lz_x, inv_ts, grad_scale, target, lz1,
                        ce_scale, WITH_CE)  # fmt: skip
            if HYBRID:
                _store_grad(g_row, s_row, a, ok_m, r_m, R, lz_x, inv_ts, grad_scale, target, lz1, ce_scale, WITH_CE)


def launch_cross_vocab(
    student, teacher, student_log_scale, teacher_log_scale, target, denominator, classes, code, params, temperature,
    ignore_index, reduce, ce_weight, distill_weight, with_ce, with_grad,
):  # fmt: skip
    """The op ``kdkernels::cross_vocab_triton`` (backends/ops.py: the schema of the cross-vocabulary ops)."""
    if torch.float64 in (student.dtype, teacher.dtype):
        raise TypeError(
            "the Triton kernels compute in float32 and take float32, bfloat16 or float16 logits, not float64 "
            "(backend='reference' computes float64)"
        )
    n, vs = student.shape
    vt = teacher.shape[1]
    block = triton.next_power_of_2(max(vs, vt))
    if block > MAX_BLOCK:
        raise ValueError(
            f"backend='triton' sorts a row on chip up to {MAX_BLOCK} classes a side for now, got student_logits "
            f"[..., {vs}] and teacher_logits [..., {vt}]; use backend='reference' (or 'cpu' for CPU tensors)"
        )
    c = CrossVocabParams(*params)
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    f32 = dict(dtype=torch.float32, device=student.device)
    rows = torch.empty(n, **f32)
    ce_rows = torch.empty(n, **f32) if with_ce else None
    grad = torch.empty(n, vs, dtype=student.dtype, device=student.device) if with_grad else None
    dscale = torch.empty(n, **f32) if with_grad else None
    hybrid = code == CrossVocab.HYBRID
    pairs_s, pairs_t, free_s, free_t = [x.contiguous() for x in classes] if hybrid else [rows] * 4
    has_denom = reduce and denominator is not None
    if n:
        cross_vocab_kernel[(n,)](
            student, teacher,
            rows if student_log_scale is None else student_log_scale.contiguous(),
            rows if teacher_log_scale is None else teacher_log_scale.contiguous(),
            rows if target is None else target.contiguous(),
            denominator if has_denom else rows,
            rows, rows if ce_rows is None else ce_rows,
            rows if grad is None else grad, rows if dscale is None else dscale,
            free_s, free_t, pairs_s, pairs_t,
            vs, vt, free_s.numel() if hybrid else vs, free_t.numel() if hybrid else vt,
            pairs_s.numel() if hybrid else 0, student.stride(0), teacher.stride(0), ignore_index,
            1.0 / temperature, 1.0 / c.teacher_temperature, c.matched_weight, c.unmatched_weight, int(c.matched_code),
            c.mix_p, c.mix_q, c.log_mix_p, c.log_mix_q,
            distill_weight / temperature, distill_weight, ce_weight,
            HAS_TARGET=target is not None, HAS_DENOM=has_denom, HAS_CS=student_log_scale is not None,
            HAS_CT=teacher_log_scale is not None, HYBRID=hybrid, WITH_CE=with_ce, WITH_GRAD=with_grad,
            BLOCK_S=triton.next_power_of_2(vs), BLOCK_T=triton.next_power_of_2(vt), BLOCK=block,
            BLOCK_M=triton.next_power_of_2(max(pairs_s.numel(), 1)) if hybrid else 1,
            **launch_options(block),
        )  # fmt: skip
    denominator = denominator if has_denom else None
    terms = KernelCall(denominator=denominator, ce_weight=ce_weight, distill_weight=distill_weight, reduce=reduce)
    loss, parts = combine(terms, rows, ce_rows)
    empty = student.new_empty(0)
    return loss, parts, empty if grad is None else grad, rows.new_empty(0) if dscale is None else dscale
