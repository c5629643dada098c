"""Triton kernel of the decoupled family: dkd, gdkd (2 or 3 partitions), cakd (target / topk / threshold), aekt.

Math (LOSSES.md, "one family"). Classes fall in bins A, B, W: B is the strong set ({target}, the teacher's top-k,
or {i : p_i >= tau max p}) and W the rest; with three bins (gdkd partitions=3) A = {top-1} and B = top-2..k, else
A is empty. With x = s / T, y = t / T, per bin b the kernel keeps online (max, sum) statistics
    mt_b, zt_b = sum_{i in b} exp(y_i - mt_b),    ms_b, zs_b likewise for x,
    kt_b = sum_{i in b} exp(y_i - mt_b) ((y_i - mt_b) - (x_i - ms_b))   (re-based when a max moves),
from which, with P_b, Q_b the bin masses and p^b, q^b the in-bin distributions,
    log P_b = log_softmax over bins of (mt_b + log zt_b),  log Q_b likewise,
    KL(p^b || q^b) = kt_b / zt_b - (log zt_b - log zs_b),
    l = w0 * sum_b P_b (log P_b - log Q_b) + w_B KL(p^B || q^B) + w_W KL(p^W || q^W)
(A holds one class, so its in-bin KL is 0), and for j in bin b
    g_j = (1/T) [w0 (Q_b - P_b) q^b_j + w_b (q^b_j - p^b_j)].
Bin masses are logsumexps over the bin, never 1 - (mass of the others). aekt's w0 is min(p_y / q_y, max_weight),
computed from bin B = {y} and treated as a constant. One exp per element and side: each element is shifted by its
own bin's running max.

Passes. The teacher's top-k (a running top-k merged tile by tile, ties to the lower index) or its max (threshold)
needs a first scan of t; then one pass of bin statistics and one pass writing the gradient. A row that fits one
tile is loaded once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, load_scaled, safe_max, store_rows

BIG_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def _better(v1, i1, v2, i2):
    """Ranking of the teacher's top-k: larger logit first, then lower index (ties)."""
    return (v1 > v2) | ((v1 == v2) & (i1 < i2))


@triton.jit
def _worst(vals, idxs):
    wv = tl.min(vals, axis=1)
    wi = tl.max(tl.where(vals == wv[:, None], idxs, -1), axis=1)
    return wv, wi


@triton.jit
def _topk_update(vals, idxs, y, cols, eligible):
    """Merge a tile into the running top-k [BLOCK_N, KPAD] of each row (padding slots hold +inf: never worst)."""
    wv, wi = _worst(vals, idxs)
    cand = eligible & _better(y, cols[None, :], wv[:, None], wi[:, None])
    while tl.max(cand.to(tl.int32)) > 0:
        cv = tl.max(tl.where(cand, y, NEG_INF), axis=1)
        ci = tl.min(tl.where(cand & (y == cv[:, None]), cols[None, :], BIG_INDEX), axis=1)
        slot = (vals == wv[:, None]) & (idxs == wi[:, None]) & (ci < BIG_INDEX)[:, None]
        vals = tl.where(slot, cv[:, None], vals)
        idxs = tl.where(slot, ci[:, None], idxs)
        wv, wi = _worst(vals, idxs)
        cand = cand & (cols[None, :] != ci[:, None]) & _better(y, cols[None, :], wv[:, None], wi[:, None])
    return vals, idxs


@triton.jit
def _membership(y, cols, tgt, kth_v, kth_i, top1_i, y_max, log_tau, PARTITION: tl.constexpr,
                THREE_BINS: tl.constexpr):
    """(in A, in B) masks of a tile; W is everything else."""
    c = cols[None, :]
    if PARTITION == 0:
        in_b = c == tgt[:, None]
    elif PARTITION == 1:
        in_b = _better(y, c, kth_v[:, None], kth_i[:, None]) | (c == kth_i[:, None])
    else:
        in_b = (y - y_max[:, None]) >= log_tau
    if THREE_BINS:
        in_a = c == top1_i[:, None]
        in_b = in_b & (c != top1_i[:, None])
    else:
        in_a = c < 0
    return in_a, in_b


@triton.jit
def _bins_max(v, in_a, in_b, in_w, ma, mb, mw):
    na = tl.maximum(ma, tl.max(tl.where(in_a, v, NEG_INF), axis=1))
    nb = tl.maximum(mb, tl.max(tl.where(in_b, v, NEG_INF), axis=1))
    nw = tl.maximum(mw, tl.max(tl.where(in_w, v, NEG_INF), axis=1))
    return na, nb, nw


@triton.jit
def _pick(in_a, in_b, a, b, w):
    """The per-row value of each element's bin."""
    return tl.where(in_a, a[:, None], tl.where(in_b, b[:, None], w[:, None]))


@triton.jit
def _bin_sum(member, e):
    return tl.sum(tl.where(member, e, 0.0), axis=1)


@triton.jit
def _kt_update(kt, zt, rescale, mt, nt, ms, ns, member, d):
    # kt is relative to the current shifts (mt, ms); moving them to (nt, ns) subtracts zt * (dmt - dms).
    moved = (safe_max(nt) - safe_max(mt)) - (safe_max(ns) - safe_max(ms))
    return (kt - zt * moved) * rescale + _bin_sum(member, d)


@triton.jit
def _bins_update(x, y, in_a, in_b, tma, tmb, tmw, tza, tzb, tzw, tka, tkb, tkw, sma, smb, smw, sza, szb, szw):
    """Online per-bin statistics of a tile: teacher (max, sum, kt), student (max, sum), where
    kt_b = sum_{i in b} exp(y_i - mt_b) ((y_i - mt_b) - (x_i - ms_b)) stays small even for logits offset by 1000."""
    in_w = ~(in_a | in_b)
    nta, ntb, ntw = _bins_max(y, in_a, in_b, in_w, tma, tmb, tmw)
    nsa, nsb, nsw = _bins_max(x, in_a, in_b, in_w, sma, smb, smw)
    shift_t = _pick(in_a, in_b, safe_max(nta), safe_max(ntb), safe_max(ntw))
    shift_s = _pick(in_a, in_b, safe_max(nsa), safe_max(nsb), safe_max(nsw))
    et = tl.exp(y - shift_t)
    es = tl.exp(x - shift_s)
    d = tl.where(y == NEG_INF, 0.0, et * ((y - shift_t) - (x - shift_s)))
    ra, rb, rw = tl.exp(tma - safe_max(nta)), tl.exp(tmb - safe_max(ntb)), tl.exp(tmw - safe_max(ntw))
    tka = _kt_update(tka, tza, ra, tma, nta, sma, nsa, in_a, d)
    tkb = _kt_update(tkb, tzb, rb, tmb, ntb, smb, nsb, in_b, d)
    tkw = _kt_update(tkw, tzw, rw, tmw, ntw, smw, nsw, in_w, d)
    tza = tza * ra + _bin_sum(in_a, et)
    tzb = tzb * rb + _bin_sum(in_b, et)
    tzw = tzw * rw + _bin_sum(in_w, et)
    sza = sza * tl.exp(sma - safe_max(nsa)) + _bin_sum(in_a, es)
    szb = szb * tl.exp(smb - safe_max(nsb)) + _bin_sum(in_b, es)
    szw = szw * tl.exp(smw - safe_max(nsw)) + _bin_sum(in_w, es)
    return nta, ntb, ntw, tza, tzb, tzw, tka, tkb, tkw, nsa, nsb, nsw, sza, szb, szw


@triton.jit
def _log_masses(ma, mb, mw, za, zb, zw):
    """log of each bin's share of the row's mass (log_softmax over the three bins)."""
    m = safe_max(tl.maximum(ma, tl.maximum(mb, mw)))
    log_total = tl.log(za * tl.exp(ma - m) + zb * tl.exp(mb - m) + zw * tl.exp(mw - m))
    return (ma - m) + tl.log(za) - log_total, (mb - m) + tl.log(zb) - log_total, (mw - m) + tl.log(zw) - log_total


@triton.jit
def _mass_kl_term(log_p, log_q):
    return tl.where(log_p == NEG_INF, 0.0, tl.exp(log_p) * (log_p - log_q))


@triton.jit
def _in_bin_kl(zt, kt, zs):
    return tl.where(zt == 0.0, 0.0, kt / zt - (tl.log(zt) - tl.log(zs)))


@triton.jit
def _in_bin_prob(v, m, z):
    """exp(v - m - log z) with 0 for masked classes (also when the whole bin is masked)."""
    return tl.where(v == NEG_INF, 0.0, tl.exp(v - m[:, None] - tl.log(z)[:, None]))


@triton.jit
def _store_grad(grad_ptr, rows64, g_stride, row_in, valid, cols, V, x, y, in_a, in_b,
                ca, cb, cw, wa, wb, ww, tma, tmb, tmw, tza, tzb, tzw, sma, smb, smw, sza, szb, szw, scale):
    # g = scale * (c_b q^b - w_b p^b), c_b = w0 (Q_b - P_b) + w_b, b the element's bin.
    def_pick = tl.where(in_a, 0, tl.where(in_b, 1, 2))
    c = tl.where(def_pick == 0, ca[:, None], tl.where(def_pick == 1, cb[:, None], cw[:, None]))
    w = tl.where(def_pick == 0, wa, tl.where(def_pick == 1, wb, ww))
    sm = tl.where(def_pick == 0, sma[:, None], tl.where(def_pick == 1, smb[:, None], smw[:, None]))
    sz = tl.where(def_pick == 0, sza[:, None], tl.where(def_pick == 1, szb[:, None], szw[:, None]))
    tm = tl.where(def_pick == 0, tma[:, None], tl.where(def_pick == 1, tmb[:, None], tmw[:, None]))
    tz = tl.where(def_pick == 0, tza[:, None], tl.where(def_pick == 1, tzb[:, None], tzw[:, None]))
    q_in = tl.where(x == NEG_INF, 0.0, tl.exp(x - sm - tl.log(sz)))
    p_in = tl.where(y == NEG_INF, 0.0, tl.exp(y - tm - tl.log(tz)))
    g = (c * q_in - w * p_in) * scale[:, None]
    store_rows(grad_ptr, rows64, g_stride, row_in, cols, V, tl.where(valid[:, None], g, 0.0))


@triton.jit
def decoupled_kernel(
    s_ptr, t_ptr, target_ptr, denom_ptr, loss_ptr, grad_ptr,
    N, V, s_stride, t_stride, g_stride, ignore_index,
    temperature, t2, K, log_tau, w0, w_strong, w_weak, max_weight,
    PARTITION: tl.constexpr, THREE_BINS: tl.constexpr, ADAPTIVE: tl.constexpr, HAS_TARGET: tl.constexpr,
    HAS_DENOM: tl.constexpr, WITH_GRAD: tl.constexpr, SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, KPAD: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    valid = row_in
    tgt = tl.zeros([BLOCK_N], tl.int64)
    bad_target = row_in & False
    if HAS_TARGET:
        tgt = tl.load(target_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
        valid = valid & (tgt != ignore_index)
        if PARTITION == 0:
            # An index outside [0, V) is never read (membership is a comparison): the row's loss becomes NaN.
            bad_target = valid & ((tgt < 0) | (tgt >= V))
    rows64 = rows.to(tl.int64)
    g_scale = tl.zeros([BLOCK_N], tl.float32) + t2 / temperature
    if HAS_DENOM:
        g_scale = g_scale / tl.load(denom_ptr)
    cols0 = tl.arange(0, BLOCK_V)
    ninf = tl.full([BLOCK_N], NEG_INF, tl.float32)
    zero = tl.zeros([BLOCK_N], tl.float32)

    # Pass 1: what the partition needs from the teacher alone.
    kth_v = ninf
    kth_i = tl.zeros([BLOCK_N], tl.int32)
    top1_i = tl.zeros([BLOCK_N], tl.int32)
    y_max = ninf
    if PARTITION != 0:
        slots = tl.arange(0, KPAD)[None, :] + tl.zeros([BLOCK_N, KPAD], tl.int32)
        vals = tl.where(slots < K, NEG_INF, float("inf"))
        idxs = tl.where(slots < K, BIG_INDEX - 1 - slots, -1 - slots)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            y = load_scaled(t_ptr, rows64, t_stride, valid, cols, V, temperature)
            if PARTITION == 1:
                vals, idxs = _topk_update(vals, idxs, y, cols, valid[:, None] & (cols[None, :] < V))
            else:
                y_max = tl.maximum(y_max, tl.max(y, axis=1))
        if PARTITION == 1:
            kth_v, kth_i = _worst(vals, idxs)
            real = tl.where(slots < K, vals, NEG_INF)
            top_v = tl.max(real, axis=1)
            top1_i = tl.min(tl.where((slots < K) & (real == top_v[:, None]), idxs, BIG_INDEX), axis=1)

    # Pass 2: per-bin statistics of teacher and student.
    tma, tmb, tmw, tza, tzb, tzw, tka, tkb, tkw = ninf, ninf, ninf, zero, zero, zero, zero, zero, zero
    sma, smb, smw, sza, szb, szw = ninf, ninf, ninf, zero, zero, zero
    if SINGLE_TILE:
        x = load_scaled(s_ptr, rows64, s_stride, valid, cols0, V, temperature)
        y = load_scaled(t_ptr, rows64, t_stride, valid, cols0, V, temperature)
        in_a, in_b = _membership(y, cols0, tgt, kth_v, kth_i, top1_i, y_max, log_tau, PARTITION, THREE_BINS)
        tma, tmb, tmw, tza, tzb, tzw, tka, tkb, tkw, sma, smb, smw, sza, szb, szw = _bins_update(
            x, y, in_a, in_b, tma, tmb, tmw, tza, tzb, tzw, tka, tkb, tkw, sma, smb, smw, sza, szb, szw)
    else:
        for i in range(0, tl.cdiv(V, BLOCK_V)):
            cols = (tl.cdiv(V, BLOCK_V) - 1 - i) * BLOCK_V + cols0  # backwards: pass 1's last tiles are in L2
            x = load_scaled(s_ptr, rows64, s_stride, valid, cols, V, temperature)
            y = load_scaled(t_ptr, rows64, t_stride, valid, cols, V, temperature)
            in_a, in_b = _membership(y, cols, tgt, kth_v, kth_i, top1_i, y_max, log_tau, PARTITION, THREE_BINS)
            tma, tmb, tmw, tza, tzb, tzw, tka, tkb, tkw, sma, smb, smw, sza, szb, szw = _bins_update(
                x, y, in_a, in_b, tma, tmb, tmw, tza, tzb, tzw, tka, tkb, tkw, sma, smb, smw, sza, szb, szw)

    # Row loss from the statistics.
    lpa, lpb, lpw = _log_masses(tma, tmb, tmw, tza, tzb, tzw)
    lqa, lqb, lqw = _log_masses(sma, smb, smw, sza, szb, szw)
    weight = zero + w0
    if ADAPTIVE:
        ratio = tl.exp(lpb - lqb)
        weight = tl.where(ratio < max_weight, ratio, max_weight)
    mass_kl = _mass_kl_term(lpa, lqa) + _mass_kl_term(lpb, lqb) + _mass_kl_term(lpw, lqw)
    loss = weight * mass_kl + w_strong * _in_bin_kl(tzb, tkb, szb) + w_weak * _in_bin_kl(tzw, tkw, szw)
    loss = tl.where(bad_target, float("nan"), loss)
    tl.store(loss_ptr + rows, tl.where(valid, loss * t2, 0.0), mask=row_in)

    # Pass 3: the gradient.
    if WITH_GRAD:
        g_scale = tl.where(bad_target, float("nan"), g_scale)
        ca = weight * (tl.exp(lqa) - tl.exp(lpa))
        cb = weight * (tl.exp(lqb) - tl.exp(lpb)) + w_strong
        cw = weight * (tl.exp(lqw) - tl.exp(lpw)) + w_weak
        if SINGLE_TILE:
            _store_grad(grad_ptr, rows64, g_stride, row_in, valid, cols0, V, x, y, in_a, in_b,
                        ca, cb, cw, 0.0, w_strong, w_weak, tma, tmb, tmw, tza, tzb, tzw,
                        sma, smb, smw, sza, szb, szw, g_scale)
        else:
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                x = load_scaled(s_ptr, rows64, s_stride, valid, cols, V, temperature)
                y = load_scaled(t_ptr, rows64, t_stride, valid, cols, V, temperature)
                in_a, in_b = _membership(y, cols, tgt, kth_v, kth_i, top1_i, y_max, log_tau, PARTITION,
                                         THREE_BINS)
                _store_grad(grad_ptr, rows64, g_stride, row_in, valid, cols, V, x, y, in_a, in_b,
                            ca, cb, cw, 0.0, w_strong, w_weak, tma, tmb, tmw, tza, tzb, tzw,
                            sma, smb, smw, sza, szb, szw, g_scale)
