"""The Triton kernels of the losses between two vocabularies (docs/losses.md, section 11.5): uld and GOLD's hybrid.

A row of up to ``MAX_BLOCK`` classes a side is one program of ``cross_vocab_kernel``, sorted on chip. Per row: the two
log-normalisers over the whole rows (one tile each); the compared classes' probabilities (uld: all; hybrid: the
unmatched ones, gathered through the map's lists) packed into int64 sort keys, the float bits of q~ (>= 0, so they
sort as integers) above 2^31 - 1 - class, and sorted descending by ``tl.sort``: ties rank the lower class first
(section 11.2's rule) and the class comes back with its value; the teacher's bits sort alone (a constant). One pass
over the ranks gives the sorted L1 and r = w q~ sign(q~_(i) - p~_(i)) at each rank's class; hybrid's matched pairs
give J and r (the same formulas as cross_vocab.h); then the gradient g = scale (r - q sum r) plus the
cross-entropy's is stored at each class through the same lists (a scatter: every class is written once).

Wider rows (an LLM's vocabulary) go a chunk of rows at a time through a workspace of at most ``CHUNK_ELEMENTS``
probabilities a side: ``cross_vocab_probs_kernel`` streams each row in tiles (the log-normalisers, then q~ and p~ of
the compared classes into the workspace), ``torch.sort`` sorts the chunk's rows (descending and stable: ties keep the
lower class first, the same rule), and ``cross_vocab_ranks_kernel`` makes one fused pass over the sorted ranks (the
loss, sum r), the matched pairs, then the gradient's scatter. The extra memory is the chunk's, not [N, V].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...methods import CrossVocab, CrossVocabParams
from .. import combine
from ..kernel_call import KernelCall
from .common import NEG_INF, online_lse
from .divergence import KD, RKL

# The widest row a program sorts on chip (both sides padded to the same power of two); wider rows are chunked.
MAX_BLOCK = 4096
# The chunked path: the probabilities a side of the rows sorted at once (the workspace: their float32 values, sorted
# copies and int64 orders, 16 bytes an element a side), and the tile and warps its two kernels stream a row with.
CHUNK_ELEMENTS = 1 << 22
STREAM_TILE = 2048
STREAM_WARPS = 8


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


@triton.jit
def _row_start(target_ptr, denom_ptr, row, lz_x, lz_y, ignore_index, grad_scale, scale_grad_scale, ce_scale,
               HAS_TARGET: tl.constexpr, HAS_DENOM: tl.constexpr):  # fmt: skip
    """(whether the row is skipped: left out, or masked in both models; its target; the three gradient factors over
    the denominator): the gradients are scaled by 1 / denominator here; the loss rows are reduced by the caller."""
    target = -1
    skip = (lz_x == NEG_INF) & (lz_y == NEG_INF)
    if HAS_TARGET:
        target = tl.load(target_ptr + row)
        skip = skip | (target == ignore_index)
    if HAS_DENOM:
        inv_denom = 1.0 / tl.load(denom_ptr).to(tl.float32)
        grad_scale *= inv_denom
        scale_grad_scale *= inv_denom
        ce_scale *= inv_denom
    return skip, target, grad_scale, scale_grad_scale, ce_scale


@triton.jit
def _skip_row(loss_ptr, ce_ptr, dscale_ptr, g_row, row, Vs, WITH_CE: tl.constexpr, WITH_GRAD: tl.constexpr,
              TILE: tl.constexpr):  # fmt: skip
    """A row left out, or masked in both models: loss 0, gradient 0."""
    tl.store(loss_ptr + row, 0.0)
    if WITH_CE:
        tl.store(ce_ptr + row, 0.0)
    if WITH_GRAD:
        tl.store(dscale_ptr + row, 0.0)
        for j in range(0, Vs, TILE):
            cols = j + tl.arange(0, TILE)
            tl.store(g_row + cols, tl.zeros([TILE], g_row.dtype.element_ty), mask=cols < Vs)


@triton.jit
def _rank_terms(q, p, ok_s, w_u):
    """|q~_(i) - p~_(i)| and r = w_u q~_(i) sign(q~_(i) - p~_(i)) of ranks i (0 past the student's row)."""
    d = q - p
    sign = (d > 0).to(tl.float32) - (d < 0).to(tl.float32)
    return tl.abs(d), tl.where(ok_s, w_u * q * sign, 0.0)


@triton.jit
def _matched_pairs(s_row, t_row, pair_s_ptr, pair_t_ptr, m, num_pairs, lz_x, lz_y, cs, ct, inv_ts, inv_tt, w_m,
                   matched_code, mix_p, mix_q, log_mix_p, log_mix_q):  # fmt: skip
    """Pairs ``m`` of the map: (student classes, in range, w_m J, w_m r), 0 past the pairs."""
    ok = m < num_pairs
    a = tl.load(pair_s_ptr + m, mask=ok, other=0)
    b = tl.load(pair_t_ptr + m, mask=ok, other=0)
    lq = tl.load(s_row + a, mask=ok, other=NEG_INF).to(tl.float32) * inv_ts - lz_x + cs
    lp = tl.load(t_row + b, mask=ok, other=NEG_INF).to(tl.float32) * inv_tt - lz_y + ct
    term, r = _matched_term(lq, lp, matched_code, mix_p, mix_q, log_mix_p, log_mix_q)
    return a, ok, tl.where(ok, w_m * term, 0.0), tl.where(ok, w_m * r, 0.0)


@triton.jit
def _finish_row(loss_ptr, ce_ptr, dscale_ptr, s_row, row, loss, R, target, Vs, lz1, scale_grad_scale,
                WITH_CE: tl.constexpr, WITH_GRAD: tl.constexpr):  # fmt: skip
    """Stores the row's loss, cross-entropy (from lz1, the log-normaliser at T = 1) and dl/dc_s."""
    tl.store(loss_ptr + row, loss)
    if WITH_CE:
        s_target = tl.load(s_row + tl.where((target >= 0) & (target < Vs), target, 0)).to(tl.float32)
        tl.store(ce_ptr + row, lz1 - s_target)
    if WITH_GRAD:
        tl.store(dscale_ptr + row, scale_grad_scale * R)


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
    skip, target, grad_scale, scale_grad_scale, ce_scale = _row_start(
        target_ptr, denom_ptr, row, lz_x, lz_y, ignore_index, grad_scale, scale_grad_scale, ce_scale, HAS_TARGET,
        HAS_DENOM,
    )  # fmt: skip
    if skip:
        _skip_row(loss_ptr, ce_ptr, dscale_ptr, g_row, row, Vs, WITH_CE, WITH_GRAD, BLOCK_S)
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
        q_sorted = tl.where(ok_s, (key_s // 2147483648).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
        p_sorted = tl.where(ok_t, key_t.to(tl.float32, bitcast=True), 0.0)
        cls_sorted = tl.where(ok_s, 2147483647 - (key_s % 2147483648), 0).to(tl.int32)
        d_abs, r_sorted = _rank_terms(q_sorted, p_sorted, ok_s, w_u)
        loss = w_u * tl.sum(d_abs, axis=0)
        if HYBRID:  # no term without unmatched classes on both sides
            compared = (ns > 0) & (nt > 0)
            r_sorted = tl.where(compared, r_sorted, 0.0)
            loss = tl.where(compared, loss, 0.0)
        R = tl.sum(r_sorted, axis=0)
        if HYBRID:
            a, ok_m, term, r_m = _matched_pairs(
                s_row, t_row, pair_s_ptr, pair_t_ptr, tl.arange(0, BLOCK_M), num_pairs, lz_x, lz_y, cs, ct, inv_ts,
                inv_tt, w_m, matched_code, mix_p, mix_q, log_mix_p, log_mix_q,
            )  # fmt: skip
            loss += tl.sum(term, axis=0)
            R += tl.sum(r_m, axis=0)
        lz1 = lz_x
        if WITH_CE:
            if inv_ts != 1.0:
                lz1 = _log_partition(s_row, Vs, 1.0, BLOCK_S)
        _finish_row(loss_ptr, ce_ptr, dscale_ptr, s_row, row, loss, R, target, Vs, lz1, scale_grad_scale, WITH_CE,
                    WITH_GRAD)  # fmt: skip
        if WITH_GRAD:
            _store_grad(g_row, s_row, cls_sorted, ok_s, r_sorted, R, lz_x, inv_ts, grad_scale, target, lz1,
                        ce_scale, WITH_CE)  # fmt: skip
            if HYBRID:
                _store_grad(g_row, s_row, a, ok_m, r_m, R, lz_x, inv_ts, grad_scale, target, lz1, ce_scale, WITH_CE)


@triton.jit
def _streamed_log_partition(ptr, width, inv_t, TILE: tl.constexpr):
    """log sum exp(x * inv_t) over a row of ``width`` logits, streamed in tiles; -inf when all are masked."""
    m = tl.full([1], NEG_INF, tl.float32)
    z = tl.zeros([1], tl.float32)
    for j in range(0, width, TILE):
        cols = j + tl.arange(0, TILE)
        x = tl.load(ptr + cols, mask=cols < width, other=NEG_INF).to(tl.float32) * inv_t
        m, z = online_lse(m, z, x[None, :])
    return tl.sum(tl.where(m == NEG_INF, m, m + tl.log(z)), axis=0)


@triton.jit
def _write_probs(x_row, free_ptr, out_row, n, inv_t, lz, c, HYBRID: tl.constexpr, TILE: tl.constexpr):
    """out[k] = exp(x[class k] * inv_t - lz + c) for the n compared classes (hybrid: the unmatched list's)."""
    for j in range(0, n, TILE):
        k = j + tl.arange(0, TILE)
        ok = k < n
        cls = tl.load(free_ptr + k, mask=ok, other=0) if HYBRID else k
        x = tl.load(x_row + cls, mask=ok, other=NEG_INF).to(tl.float32)
        tl.store(out_row + k, tl.exp(x * inv_t - lz + c), mask=ok)


# (first_row not specialised: a chunk starting at a row of 1 or a multiple of 16 would compile its own kernel.)
@triton.jit(do_not_specialize=["first_row"])
def cross_vocab_probs_kernel(
    s_ptr, t_ptr, cs_ptr, ct_ptr, free_s_ptr, free_t_ptr, q_ptr, p_ptr, stats_ptr,
    first_row, Vs, Vt, ns, nt, s_stride, t_stride, inv_ts, inv_tt,
    HAS_CS: tl.constexpr, HAS_CT: tl.constexpr, HYBRID: tl.constexpr, WITH_CE: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """The chunked path's first pass, a program per row of the chunk: the log-normalisers (stats: lz_x, lz_y, lz1)
    and q~ [ns], p~ [nt] of the compared classes into the workspace rows, for the sort."""
    local = tl.program_id(0).to(tl.int64)
    row = first_row + local
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    lz_x = _streamed_log_partition(s_row, Vs, inv_ts, TILE)
    lz_y = _streamed_log_partition(t_row, Vt, inv_tt, TILE)
    lz1 = lz_x
    if WITH_CE:
        if inv_ts != 1.0:
            lz1 = _streamed_log_partition(s_row, Vs, 1.0, TILE)
    tl.store(stats_ptr + local * 3, lz_x)
    tl.store(stats_ptr + local * 3 + 1, lz_y)
    tl.store(stats_ptr + local * 3 + 2, lz1)
    cs = tl.load(cs_ptr + row).to(tl.float32) if HAS_CS else 0.0
    ct = tl.load(ct_ptr + row).to(tl.float32) if HAS_CT else 0.0
    _write_probs(s_row, free_s_ptr, q_ptr + local * ns, ns, inv_ts, lz_x, cs, HYBRID, TILE)
    _write_probs(t_row, free_t_ptr, p_ptr + local * nt, nt, inv_tt, lz_y, ct, HYBRID, TILE)


# Long: the ranks' pass and the pairs' pass, each twice (the sums, then the gradient once sum r is known).
@triton.jit(do_not_specialize=["first_row"])
def cross_vocab_ranks_kernel(
    s_ptr, t_ptr, cs_ptr, ct_ptr, target_ptr, denom_ptr, loss_ptr, ce_ptr, g_ptr, dscale_ptr,
    stats_ptr, q_sorted_ptr, order_ptr, p_sorted_ptr, free_s_ptr, pair_s_ptr, pair_t_ptr,
    first_row, Vs, ns, nt, num_pairs, s_stride, t_stride, ignore_index,
    inv_ts, inv_tt, w_m, w_u, matched_code, mix_p, mix_q, log_mix_p, log_mix_q, grad_scale, scale_grad_scale, ce_scale,
    HAS_TARGET: tl.constexpr, HAS_DENOM: tl.constexpr, HAS_CS: tl.constexpr, HAS_CT: tl.constexpr, HYBRID: tl.constexpr,
    WITH_CE: tl.constexpr, WITH_GRAD: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """The chunked path's fused pass over a chunk's sorted rows (q~ with its order, p~), a program per row."""
    local = tl.program_id(0).to(tl.int64)
    row = first_row + local
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * Vs
    lz_x = tl.load(stats_ptr + local * 3)
    lz_y = tl.load(stats_ptr + local * 3 + 1)
    lz1 = tl.load(stats_ptr + local * 3 + 2)
    skip, target, grad_scale, scale_grad_scale, ce_scale = _row_start(
        target_ptr, denom_ptr, row, lz_x, lz_y, ignore_index, grad_scale, scale_grad_scale, ce_scale, HAS_TARGET,
        HAS_DENOM,
    )  # fmt: skip
    if skip:
        _skip_row(loss_ptr, ce_ptr, dscale_ptr, g_row, row, Vs, WITH_CE, WITH_GRAD, TILE)
    else:
        cs = tl.load(cs_ptr + row).to(tl.float32) if HAS_CS else 0.0
        ct = tl.load(ct_ptr + row).to(tl.float32) if HAS_CT else 0.0
        compared = (ns > 0) & (nt > 0)  # (hybrid: no term without unmatched classes on both sides)
        q_row = q_sorted_ptr + local * ns
        p_row = p_sorted_ptr + local * nt
        l1 = tl.zeros([TILE], tl.float32)
        r_sum = tl.zeros([TILE], tl.float32)
        for i in range(0, tl.maximum(ns, nt), TILE):
            k = i + tl.arange(0, TILE)
            q = tl.load(q_row + k, mask=k < ns, other=0.0)
            p = tl.load(p_row + k, mask=k < nt, other=0.0)
            d_abs, r = _rank_terms(q, p, k < ns, w_u)
            l1 += d_abs
            r_sum += r
        loss = tl.where(compared, w_u * tl.sum(l1, axis=0), 0.0)
        R = tl.where(compared, tl.sum(r_sum, axis=0), 0.0)
        if HYBRID:
            pairs_loss = tl.zeros([TILE], tl.float32)
            pairs_r = tl.zeros([TILE], tl.float32)
            for j in range(0, num_pairs, TILE):
                _a, _ok, term, r_m = _matched_pairs(
                    s_row, t_row, pair_s_ptr, pair_t_ptr, j + tl.arange(0, TILE), num_pairs, lz_x, lz_y, cs, ct,
                    inv_ts, inv_tt, w_m, matched_code, mix_p, mix_q, log_mix_p, log_mix_q,
                )  # fmt: skip
                pairs_loss += term
                pairs_r += r_m
            loss += tl.sum(pairs_loss, axis=0)
            R += tl.sum(pairs_r, axis=0)
        _finish_row(loss_ptr, ce_ptr, dscale_ptr, s_row, row, loss, R, target, Vs, lz1, scale_grad_scale, WITH_CE,
                    WITH_GRAD)  # fmt: skip
        if WITH_GRAD:
            for i in range(0, ns, TILE):
                k = i + tl.arange(0, TILE)
                ok = k < ns
                q = tl.load(q_row + k, mask=ok, other=0.0)
                _d, r = _rank_terms(q, tl.load(p_row + k, mask=k < nt, other=0.0), ok & compared, w_u)
                cls = tl.load(order_ptr + local * ns + k, mask=ok, other=0)
                if HYBRID:
                    cls = tl.load(free_s_ptr + cls, mask=ok, other=0)
                _store_grad(g_row, s_row, cls, ok, r, R, lz_x, inv_ts, grad_scale, target, lz1, ce_scale, WITH_CE)
            if HYBRID:
                for j in range(0, num_pairs, TILE):
                    a, ok_m, _t, r_m = _matched_pairs(
                        s_row, t_row, pair_s_ptr, pair_t_ptr, j + tl.arange(0, TILE), num_pairs, lz_x, lz_y, cs, ct,
                        inv_ts, inv_tt, w_m, matched_code, mix_p, mix_q, log_mix_p, log_mix_q,
                    )  # fmt: skip
                    _store_grad(g_row, s_row, a, ok_m, r_m, R, lz_x, inv_ts, grad_scale, target, lz1, ce_scale,
                                WITH_CE)  # fmt: skip


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
    # The arguments that both paths' kernels take, by name.
    args = dict(
        s_ptr=student, t_ptr=teacher,
        cs_ptr=rows if student_log_scale is None else student_log_scale.contiguous(),
        ct_ptr=rows if teacher_log_scale is None else teacher_log_scale.contiguous(),
        target_ptr=rows if target is None else target.contiguous(), denom_ptr=denominator if has_denom else rows,
        loss_ptr=rows, ce_ptr=rows if ce_rows is None else ce_rows,
        g_ptr=rows if grad is None else grad, dscale_ptr=rows if dscale is None else dscale,
        free_s_ptr=free_s, pair_s_ptr=pairs_s, pair_t_ptr=pairs_t,
        Vs=vs, ns=free_s.numel() if hybrid else vs, nt=free_t.numel() if hybrid else vt,
        num_pairs=pairs_s.numel() if hybrid else 0, s_stride=student.stride(0), t_stride=teacher.stride(0),
        ignore_index=ignore_index, inv_ts=1.0 / temperature, inv_tt=1.0 / c.teacher_temperature,
        w_m=c.matched_weight, w_u=c.unmatched_weight, matched_code=int(c.matched_code), mix_p=c.mix_p, mix_q=c.mix_q,
        log_mix_p=c.log_mix_p, log_mix_q=c.log_mix_q, grad_scale=distill_weight / temperature,
        scale_grad_scale=distill_weight, ce_scale=ce_weight,
        HAS_TARGET=target is not None, HAS_DENOM=has_denom, HAS_CS=student_log_scale is not None,
        HAS_CT=teacher_log_scale is not None, HYBRID=hybrid, WITH_CE=with_ce, WITH_GRAD=with_grad,
    )  # fmt: skip
    block = triton.next_power_of_2(max(vs, vt))
    if n and block <= MAX_BLOCK:
        cross_vocab_kernel[(n,)](
            free_t_ptr=free_t, Vt=vt, BLOCK_S=triton.next_power_of_2(vs), BLOCK_T=triton.next_power_of_2(vt),
            BLOCK=block, BLOCK_M=triton.next_power_of_2(max(pairs_s.numel(), 1)) if hybrid else 1,
            **args, **launch_options(block),
        )  # fmt: skip
    elif n:
        _launch_chunked(args, n, vt, free_t)
    denominator = denominator if has_denom else None
    terms = KernelCall(denominator=denominator, ce_weight=ce_weight, distill_weight=distill_weight, reduce=reduce)
    loss, parts = combine(terms, rows, ce_rows)
    empty = student.new_empty(0)
    return loss, parts, empty if grad is None else grad, rows.new_empty(0) if dscale is None else dscale


# The arguments of the chunked path's first kernel among launch_cross_vocab's.
_PROBS_ARGS = ("s_ptr", "t_ptr", "cs_ptr", "ct_ptr", "free_s_ptr", "Vs", "ns", "nt", "s_stride", "t_stride", "inv_ts",
               "inv_tt", "HAS_CS", "HAS_CT", "HYBRID", "WITH_CE")  # fmt: skip


def _launch_chunked(args: dict, n: int, vt: int, free_t) -> None:
    """Rows wider than MAX_BLOCK: chunks of rows through a workspace of at most CHUNK_ELEMENTS probabilities a side
    (module docstring), allocated once per call and reused by every chunk."""
    ns, nt = args["ns"], args["nt"]
    chunk = max(1, min(n, CHUNK_ELEMENTS // max(ns, nt, 1)))
    f32 = dict(dtype=torch.float32, device=args["s_ptr"].device)
    q, p, stats = torch.empty(chunk, ns, **f32), torch.empty(chunk, nt, **f32), torch.empty(chunk, 3, **f32)
    q_sorted, p_sorted = torch.empty_like(q), torch.empty_like(p)
    order, p_order = (torch.empty(chunk, width, dtype=torch.int64, device=q.device) for width in (ns, nt))
    probs_args = {name: args[name] for name in _PROBS_ARGS}
    for first in range(0, n, chunk):
        rows = min(chunk, n - first)
        cross_vocab_probs_kernel[(rows,)](
            free_t_ptr=free_t, q_ptr=q, p_ptr=p, stats_ptr=stats, first_row=first, Vt=vt, TILE=STREAM_TILE,
            num_warps=STREAM_WARPS, **probs_args,
        )  # fmt: skip
        # The segmented sort: stable, so tied probabilities keep the lower class (list position) first.
        torch.sort(q[:rows], dim=1, descending=True, stable=True, out=(q_sorted[:rows], order[:rows]))
        torch.sort(p[:rows], dim=1, descending=True, stable=True, out=(p_sorted[:rows], p_order[:rows]))
        cross_vocab_ranks_kernel[(rows,)](
            stats_ptr=stats, q_sorted_ptr=q_sorted, order_ptr=order, p_sorted_ptr=p_sorted, first_row=first,
            TILE=STREAM_TILE, num_warps=STREAM_WARPS, **args,
        )  # fmt: skip
