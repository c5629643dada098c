"""Triton kernel of the decoupled family (docs/losses.md, "Decoupled family": bins TOP1, STRONG, REST, the KL of
the bin masses and the weighted in-bin divergences w_fkl KL(p^b || q^b) + w_rkl KL(q^b || p^b), their streaming form
and the gradient g_j = (c_b q^b_j - f_b p^b_j + r_b q^b_j (log q^b_j - log p^b_j)) / T).

Per bin b the kernel keeps online, with x = s / T and y = t / T, the teacher's (mt_b, zt_b, kt_b) and the student's
(ms_b, zs_b, ks_b), kt_b = sum_{i in b} exp(y_i - mt_b) ((y_i - mt_b) - (x_i - ms_b)) and ks_b the same with the sides
swapped (only when REVERSE), re-based as the maxes move (so they stay exact for logits offset by 1000); one exp per
element and side. The row-level math (bin masses, their KL, the gradient coefficients) runs in float64: a bin holding
nearly all the mass keeps the digits of its complement.

Passes. The partition first needs the teacher alone: a running top-k of the raw teacher logits (of their negation with
LOWEST) merged tile by tile (ties to the lower index), or their max (threshold); then one pass of bin statistics
(walking back, so pass 1's last tiles are still in L2) and one pass writing the gradient. A row that fits one tile is
loaded once. With STANDARDIZE both rows' moments come first (x and y are then the z-scores over T; the raw teacher
logits rank the same way and meet the threshold scaled by the teacher's sd), and before the gradient pass a read-only
pass sums the gradient for the z-score's Jacobian (unless the row is one tile).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...methods import Partition
from .common import (
    LOG_MIN_NORMAL,
    NEG_INF,
    TEMPERATURE,
    ce_grad,
    distilled,
    load_raw,
    nan_max,
    online_lse,
    row_block,
    row_max,
    row_zscore,
    safe_max,
    scaled,
    store_rows,
    store_teacher_tile,
    t2_of,
    target_logit,
    temperature_terms,
    unstandardize,
    weighted,
    zscore_jacobian,
    zscore_sums,
)

TARGET = tl.constexpr(int(Partition.TARGET))
TOPK = tl.constexpr(int(Partition.TOPK))
THRESHOLD = tl.constexpr(int(Partition.THRESHOLD))
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
def _topk_update(vals, idxs, t, cols, eligible):
    """Merge a tile into the running top-k [BLOCK_N, KPAD] of each row (padding slots hold +inf: never worst)."""
    wv, wi = _worst(vals, idxs)
    cand = eligible & _better(t, cols[None, :], wv[:, None], wi[:, None])
    while tl.max(cand.to(tl.int32)) > 0:
        cv = tl.max(tl.where(cand, t, NEG_INF), axis=1)
        ci = tl.min(tl.where(cand & (t == cv[:, None]), cols[None, :], BIG_INDEX), axis=1)
        slot = (vals == wv[:, None]) & (idxs == wi[:, None]) & (ci < BIG_INDEX)[:, None]
        vals = tl.where(slot, cv[:, None], vals)
        idxs = tl.where(slot, ci[:, None], idxs)
        wv, wi = _worst(vals, idxs)
        cand = cand & (cols[None, :] != ci[:, None]) & _better(t, cols[None, :], wv[:, None], wi[:, None])
    return vals, idxs


@triton.jit
def _rank(t, LOWEST: tl.constexpr):
    """The top-k's ranking value of raw teacher logits: t, or -t for the k smallest, masked classes (-inf)
    ranking last either way."""
    if LOWEST:
        t = tl.where(t == NEG_INF, t, -t)
    return t


@triton.jit
def _membership(
    t,
    cols,
    tgt,
    kth_v,
    kth_i,
    top1_i,
    t_max,
    threshold,
    PARTITION: tl.constexpr,
    SPLIT_TOP1: tl.constexpr,
    LOWEST: tl.constexpr,
):
    """(in TOP1, in STRONG) masks of a tile of raw teacher logits; REST is everything else."""
    c = cols[None, :]
    if PARTITION == TARGET:
        in_strong = c == tgt[:, None]
    elif PARTITION == TOPK:
        in_strong = _better(_rank(t, LOWEST), c, kth_v[:, None], kth_i[:, None]) | (c == kth_i[:, None])
    else:
        in_strong = (t - t_max[:, None]) >= threshold[:, None]
    if SPLIT_TOP1:
        in_top1 = c == top1_i[:, None]
        in_strong = in_strong & (c != top1_i[:, None])
    else:
        in_top1 = c < 0
    return in_top1, in_strong


@triton.jit
def _bins_max(v, in_top1, in_strong, in_rest, m_top1, m_strong, m_rest):
    n_top1 = nan_max(m_top1, row_max(tl.where(in_top1, v, NEG_INF)))
    n_strong = nan_max(m_strong, row_max(tl.where(in_strong, v, NEG_INF)))
    n_rest = nan_max(m_rest, row_max(tl.where(in_rest, v, NEG_INF)))
    return n_top1, n_strong, n_rest


@triton.jit
def _pick(in_top1, in_strong, top1, strong, rest):
    """The per-row value of each element's bin."""
    return tl.where(in_top1, top1[:, None], tl.where(in_strong, strong[:, None], rest[:, None]))


@triton.jit
def _bin_sum(member, e):
    return tl.sum(tl.where(member, e, 0.0), axis=1)


@triton.jit
def _kt_update(kt, zt, rescale, mt, nt, ms, ns, member, d):
    # kt is relative to the current shifts (mt, ms); moving them to (nt, ns) subtracts zt * (dmt - dms).
    moved = (safe_max(nt) - safe_max(mt)) - (safe_max(ns) - safe_max(ms))
    return (kt - zt * moved) * rescale + _bin_sum(member, d)


@triton.jit
def _side_update(
    k1,
    k2,
    k3,
    z1,
    z2,
    z3,
    m1,
    m2,
    m3,
    n1,
    n2,
    n3,
    o1,
    o2,
    o3,
    on1,
    on2,
    on3,
    in_top1,
    in_strong,
    in_rest,
    e,
    d,
    WITH_K: tl.constexpr,
):
    """One side's per-bin (k*, z*) moved from its maxes m* to n* (the other side's from o* to on*), plus a tile's e
    = exp(v - shift) and k terms d; k* only WITH_K."""
    r1, r2, r3 = tl.exp(m1 - safe_max(n1)), tl.exp(m2 - safe_max(n2)), tl.exp(m3 - safe_max(n3))
    if WITH_K:
        k1 = _kt_update(k1, z1, r1, m1, n1, o1, on1, in_top1, d)
        k2 = _kt_update(k2, z2, r2, m2, n2, o2, on2, in_strong, d)
        k3 = _kt_update(k3, z3, r3, m3, n3, o3, on3, in_rest, d)
    return (
        k1,
        k2,
        k3,
        z1 * r1 + _bin_sum(in_top1, e),
        z2 * r2 + _bin_sum(in_strong, e),
        z3 * r3 + _bin_sum(in_rest, e),
    )


# Long: the three bins' online updates side by side, each a few lines.
@triton.jit
def _bins_update(
    x,
    y,
    in_top1,
    in_strong,
    t1,
    t2,
    t3,
    tz1,
    tz2,
    tz3,
    tk1,
    tk2,
    tk3,
    s1,
    s2,
    s3,
    sz1,
    sz2,
    sz3,
    sk1,
    sk2,
    sk3,
    REVERSE: tl.constexpr,
):
    """Online per-bin statistics of a tile (bins 1, 2, 3 = TOP1, STRONG, REST): teacher (max t*, sum tz*, tk*),
    student (max s*, sum sz*, and sk* when REVERSE)."""
    in_rest = ~(in_top1 | in_strong)
    n1, n2, n3 = _bins_max(y, in_top1, in_strong, in_rest, t1, t2, t3)
    ns1, ns2, ns3 = _bins_max(x, in_top1, in_strong, in_rest, s1, s2, s3)
    shift_t = _pick(in_top1, in_strong, safe_max(n1), safe_max(n2), safe_max(n3))
    shift_s = _pick(in_top1, in_strong, safe_max(ns1), safe_max(ns2), safe_max(ns3))
    et = tl.exp(y - shift_t)
    es = tl.exp(x - shift_s)
    # (0 where the exp is 0: a masked class, or an underflow facing a masked class, never 0 * inf)
    dt = tl.where(et == 0.0, 0.0, et * ((y - shift_t) - (x - shift_s)))
    ds = tl.where(es == 0.0, 0.0, es * ((x - shift_s) - (y - shift_t)))
    tk1, tk2, tk3, tz1, tz2, tz3 = _side_update(
        tk1,
        tk2,
        tk3,
        tz1,
        tz2,
        tz3,
        t1,
        t2,
        t3,
        n1,
        n2,
        n3,
        s1,
        s2,
        s3,
        ns1,
        ns2,
        ns3,
        in_top1,
        in_strong,
        in_rest,
        et,
        dt,
        True,
    )
    sk1, sk2, sk3, sz1, sz2, sz3 = _side_update(
        sk1,
        sk2,
        sk3,
        sz1,
        sz2,
        sz3,
        s1,
        s2,
        s3,
        ns1,
        ns2,
        ns3,
        t1,
        t2,
        t3,
        n1,
        n2,
        n3,
        in_top1,
        in_strong,
        in_rest,
        es,
        ds,
        REVERSE,
    )
    return n1, n2, n3, tz1, tz2, tz3, tk1, tk2, tk3, ns1, ns2, ns3, sz1, sz2, sz3, sk1, sk2, sk3


@triton.jit
def _refined(l_big, l_a, l_b, is_big):
    """log of a bin's mass; the largest bin's as log(1 - (mass of the other two)), in float64."""
    return tl.where(is_big & (l_big == l_big), tl.log(1.0 - (tl.exp(l_a) + tl.exp(l_b))), l_big)


@triton.jit
def _log_masses(m1, m2, m3, z1, z2, z3):
    """float64 log of each bin's share of the row's mass (log_softmax over the bins of m_b + log z_b), the largest
    bin's refined from the others'."""
    m1, m2, m3 = m1.to(tl.float64), m2.to(tl.float64), m3.to(tl.float64)
    m = safe_max(tl.maximum(m1, tl.maximum(m2, m3)))
    l1 = (m1 - m) + tl.log(z1.to(tl.float64))
    l2 = (m2 - m) + tl.log(z2.to(tl.float64))
    l3 = (m3 - m) + tl.log(z3.to(tl.float64))
    total = tl.log(tl.exp(l1) + tl.exp(l2) + tl.exp(l3))
    l1, l2, l3 = l1 - total, l2 - total, l3 - total
    big1 = (l1 >= l2) & (l1 >= l3)
    big2 = ~big1 & (l2 >= l3)
    return _refined(l1, l2, l3, big1), _refined(l2, l1, l3, big2), _refined(l3, l1, l2, ~(big1 | big2))


@triton.jit
def _absent(log_p, log_q):
    """Whether a bin's mass underflows in both models (or underflows in one and is masked in the other): it
    contributes 0, like a bin of classes masked in both."""
    return (log_p < LOG_MIN_NORMAL) & (log_q < LOG_MIN_NORMAL)


@triton.jit
def _mass_kl_term(log_p, log_q):
    return tl.where((log_p == NEG_INF) | _absent(log_p, log_q), 0.0, tl.exp(log_p) * (log_p - log_q))


@triton.jit
def _in_bin_kl(za, ka, zo):
    """KL(a^b || o^b) from a's sum and k term and o's sum (teacher's kt: forward; student's ks: reverse); 0 where a
    has no mass in the bin, +inf where o has none and a has."""
    za, ka, zo = za.to(tl.float64), ka.to(tl.float64), zo.to(tl.float64)
    kl = tl.where(zo == 0.0, float("inf"), ka / za - (tl.log(za) - tl.log(zo)))
    return tl.where(za == 0.0, 0.0, kl)


@triton.jit
def _in_bin_divergence(tz, tk, sz, sk, w_fkl, w_rkl, FORWARD: tl.constexpr, REVERSE: tl.constexpr):
    """(w_fkl KL(p^b || q^b) + w_rkl KL(q^b || p^b), KL(q^b || p^b)) of a bin, in float64; a direction of weight 0
    is not computed."""
    div = tl.zeros_like(tz).to(tl.float64)
    rkl = tl.zeros_like(tz).to(tl.float64)
    if FORWARD:
        div += w_fkl * _in_bin_kl(tz, tk, sz)
    if REVERSE:
        rkl = _in_bin_kl(sz, sk, tz)
        div += w_rkl * rkl
    return div, rkl


@triton.jit
def _in_bin(x, y, in_top1, in_strong, t1, t2, t3, tz1, tz2, tz3, s1, s2, s3, sz1, sz2, sz3):
    """(log q^b, log p^b, q^b, p^b) of a tile, b the element's bin; q^b (p^b) is 0 where x (y) is masked."""
    log_q = x - _pick(in_top1, in_strong, s1, s2, s3) - tl.log(_pick(in_top1, in_strong, sz1, sz2, sz3))
    log_p = y - _pick(in_top1, in_strong, t1, t2, t3) - tl.log(_pick(in_top1, in_strong, tz1, tz2, tz3))
    return log_q, log_p, tl.where(x == NEG_INF, 0.0, tl.exp(log_q)), tl.where(y == NEG_INF, 0.0, tl.exp(log_p))


@triton.jit
def _method_grad(
    in_top1, in_strong, log_q, log_p, q_in, p_in, c1, c2, c3, f2, f3, r2, r3, scale, REVERSE: tl.constexpr
):
    """g = scale * (c_b q^b - f_b p^b + r_b q^b (log q^b - log p^b)) of a tile (_in_bin), b the element's bin (f, r = 0
    in TOP1: a one-class bin has no in-bin term)."""
    c = _pick(in_top1, in_strong, c1, c2, c3)
    f = tl.where(in_top1, 0.0, tl.where(in_strong, f2[:, None], f3[:, None]))
    g = c * q_in - f * p_in
    if REVERSE:
        r = tl.where(in_top1, 0.0, tl.where(in_strong, r2[:, None], r3[:, None]))
        g += tl.where(q_in == 0.0, 0.0, r * q_in * (log_q - log_p))  # (0 where q underflows, not 0 * inf)
    return g * scale[:, None]


@triton.jit
def _teacher_grad(
    y, in_top1, in_strong, log_q, log_p, q_in, p_in, ct1, ct2, ct3, f2, f3, r2, r3, scale, REVERSE: tl.constexpr
):
    """The teacher's gt = scale * (ct_b p^b + f_b p^b (log p^b - log q^b) - r_b q^b) of a tile (the full gradient),
    0 on the classes the teacher masks."""
    ct = _pick(in_top1, in_strong, ct1, ct2, ct3)
    f = tl.where(in_top1, 0.0, tl.where(in_strong, f2[:, None], f3[:, None]))
    g = ct * p_in + tl.where(p_in == 0.0, 0.0, f * p_in * (log_p - log_q))
    if REVERSE:
        g -= tl.where(in_top1, 0.0, tl.where(in_strong, r2[:, None], r3[:, None])) * q_in
    return tl.where(y == NEG_INF, 0.0, g * scale[:, None])


@triton.jit
def _teacher_coefficient(weight, lp, lq, mass_kl, f, fkl, r):
    """ct_b = w P_b (log P_b - log Q_b - KL(P || Q)) - f_b KL(p^b || q^b) + r_b, in float32."""
    mass = tl.where((lp == NEG_INF) | _absent(lp, lq), 0.0, weight * tl.exp(lp) * (lp - lq - mass_kl))
    return (mass - weighted(f, fkl) + r).to(tl.float32)


# Long: its passes (numbered blocks) share each row's bin statistics in registers; the per-class math is in
# the helpers above.
@triton.jit
def decoupled_kernel(
    s_ptr,
    t_ptr,
    target_ptr,
    denom_ptr,
    loss_ptr,
    ce_ptr,
    grad_ptr,
    N,
    V,
    s_stride,
    t_stride,
    g_stride,
    ignore_index,
    scalars,
    k,
    threshold,
    w_mass,
    w_strong,
    w_rest,
    w_fkl,
    w_rkl,
    max_weight,
    gt_ptr,
    dtemp_ptr,
    PARTITION: tl.constexpr,
    SPLIT_TOP1: tl.constexpr,
    LOWEST: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    FORWARD: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_DENOM: tl.constexpr,
    WITH_CE: tl.constexpr,
    CE_GRAD: tl.constexpr,
    DISTILL_GRAD: tl.constexpr,
    STANDARDIZE: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    FULL: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    T2_SCALE: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    KPAD: tl.constexpr,
):
    # WITH_CE: the cross-entropy term (at T = 1), from a running (m1, z1) of the raw student logits in pass 2. FULL
    # (with WITH_GRAD): the teacher's gradient too (stored into gt_ptr with TEACHER_GRAD) and d loss / d T per row
    # into dtemp_ptr, in pass 3.
    rows, row_in, rows64, tgt, valid, g_scale, ce_scale = row_block(
        target_ptr,
        denom_ptr,
        N,
        ignore_index,
        scalars,
        HAS_TARGET,
        HAS_DENOM,
        T2_SCALE,
        BLOCK_N,
    )
    temperature = scalars[TEMPERATURE]
    s_y = 0.0
    if WITH_CE:  # (read before an in-place gradient replaces it)
        s_y, share = target_logit(s_ptr, rows64, s_stride, tgt, valid, V, scalars, BLOCK_V)
    bad_target = row_in & False
    if HAS_TARGET and PARTITION == TARGET:
        # An index outside [0, V) is never read (membership is a comparison): the row's loss becomes NaN.
        bad_target = valid & ((tgt < 0) | (tgt >= V))
    cols0 = tl.arange(0, BLOCK_V)
    ninf = tl.full([BLOCK_N], NEG_INF, tl.float32)
    zero = tl.zeros([BLOCK_N], tl.float32)

    # Pass 1: what the partition needs from the raw teacher logits alone.
    kth_v = ninf
    kth_i = tl.zeros([BLOCK_N], tl.int32)
    top1_i = tl.zeros([BLOCK_N], tl.int32)
    t_max = ninf
    if PARTITION != TARGET:
        slots = tl.arange(0, KPAD)[None, :] + tl.zeros([BLOCK_N, KPAD], tl.int32)
        vals = tl.where(slots < k, NEG_INF, float("inf"))
        idxs = tl.where(slots < k, BIG_INDEX - 1 - slots, -1 - slots)
        # threshold: an elementwise running max over the tiles, reduced once after the loop (a row max carried by
        # the loop and used more than once after it fails Triton 3.6.0's OptimizeThreadLocality pass:
        # "Assertion loopResult.hasOneUse()").
        t_run = tl.full([BLOCK_N, BLOCK_V], NEG_INF, tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            t = load_raw(t_ptr, rows64, t_stride, valid, cols, V)
            if PARTITION == TOPK:
                vals, idxs = _topk_update(vals, idxs, _rank(t, LOWEST), cols, valid[:, None] & (cols[None, :] < V))
            else:
                t_run = tl.maximum(t_run, t)
        if PARTITION == THRESHOLD:
            t_max = tl.max(t_run, axis=1)
        if PARTITION == TOPK:
            kth_v, kth_i = _worst(vals, idxs)
            real = tl.where(slots < k, vals, NEG_INF)
            top_v = tl.max(real, axis=1)
            top1_i = tl.min(tl.where((slots < k) & (real == top_v[:, None]), idxs, BIG_INDEX), axis=1)

    # (x = s / T, y = t / T; with STANDARDIZE the z-scores over T.)
    mean_s, sd_s, std_s, n_s, tau_s = row_zscore(
        s_ptr, rows64, s_stride, valid, V, temperature, STANDARDIZE, BLOCK_N, BLOCK_V
    )
    mean_t, sd_t, std_t, n_t, tau_t = row_zscore(
        t_ptr, rows64, t_stride, valid, V, temperature, STANDARDIZE, BLOCK_N, BLOCK_V
    )
    threshold = sd_t * threshold  # (z_i - max z >= T log(tau)  <=>  t_i - max t >= T log(tau) sd)

    # Pass 2: per-bin statistics of teacher and student.
    t1, t2_, t3, tz1, tz2, tz3, tk1, tk2, tk3 = ninf, ninf, ninf, zero, zero, zero, zero, zero, zero
    s1, s2, s3, sz1, sz2, sz3, sk1, sk2, sk3 = ninf, ninf, ninf, zero, zero, zero, zero, zero, zero
    m1, z1 = ninf, zero
    if SINGLE_TILE:
        s = load_raw(s_ptr, rows64, s_stride, valid, cols0, V)
        x = scaled(s, mean_s, tau_s)
        t = load_raw(t_ptr, rows64, t_stride, valid, cols0, V)
        y = scaled(t, mean_t, tau_t)
        if WITH_CE:
            m1, z1 = online_lse(m1, z1, s)
        in_top1, in_strong = _membership(
            t, cols0, tgt, kth_v, kth_i, top1_i, t_max, threshold, PARTITION, SPLIT_TOP1, LOWEST
        )
        t1, t2_, t3, tz1, tz2, tz3, tk1, tk2, tk3, s1, s2, s3, sz1, sz2, sz3, sk1, sk2, sk3 = _bins_update(
            x,
            y,
            in_top1,
            in_strong,
            t1,
            t2_,
            t3,
            tz1,
            tz2,
            tz3,
            tk1,
            tk2,
            tk3,
            s1,
            s2,
            s3,
            sz1,
            sz2,
            sz3,
            sk1,
            sk2,
            sk3,
            REVERSE,
        )
    else:
        for i in range(0, tl.cdiv(V, BLOCK_V)):
            cols = (tl.cdiv(V, BLOCK_V) - 1 - i) * BLOCK_V + cols0  # backwards: pass 1's last tiles are in L2
            s = load_raw(s_ptr, rows64, s_stride, valid, cols, V)
            x = scaled(s, mean_s, tau_s)
            t = load_raw(t_ptr, rows64, t_stride, valid, cols, V)
            if WITH_CE:
                m1, z1 = online_lse(m1, z1, s)
            in_top1, in_strong = _membership(
                t, cols, tgt, kth_v, kth_i, top1_i, t_max, threshold, PARTITION, SPLIT_TOP1, LOWEST
            )
            t1, t2_, t3, tz1, tz2, tz3, tk1, tk2, tk3, s1, s2, s3, sz1, sz2, sz3, sk1, sk2, sk3 = _bins_update(
                x,
                scaled(t, mean_t, tau_t),
                in_top1,
                in_strong,
                t1,
                t2_,
                t3,
                tz1,
                tz2,
                tz3,
                tk1,
                tk2,
                tk3,
                s1,
                s2,
                s3,
                sz1,
                sz2,
                sz3,
                sk1,
                sk2,
                sk3,
                REVERSE,
            )
    # A row whose classes are all masked in both logits is left out like an ignored row.
    kept = valid & ((nan_max(t1, nan_max(t2_, t3)) != NEG_INF) | (nan_max(s1, nan_max(s2, s3)) != NEG_INF))

    # Row loss and gradient coefficients from the statistics, in float64; a term of weight 0 adds 0, infinite or not.
    lp1, lp2, lp3 = _log_masses(t1, t2_, t3, tz1, tz2, tz3)
    lq1, lq2, lq3 = _log_masses(s1, s2, s3, sz1, sz2, sz3)
    weight = zero.to(tl.float64) + w_mass
    if ADAPTIVE:  # aekt: min(P_strong / Q_strong, max_weight), and 0 where P_strong = 0 (then 0 / 0 too)
        ratio = tl.exp(lp2 - lq2)
        weight = tl.where(lp2 == NEG_INF, 0.0, tl.where(ratio < max_weight, ratio, max_weight))
    mass_kl = _mass_kl_term(lp1, lq1) + _mass_kl_term(lp2, lq2) + _mass_kl_term(lp3, lq3)
    w_strong = tl.where(_absent(lp2, lq2), 0.0, w_strong)  # (an absent bin's in-bin terms: 0 too)
    w_rest = tl.where(_absent(lp3, lq3), 0.0, w_rest)
    div2, rkl2 = _in_bin_divergence(tz2, tk2, sz2, sk2, w_fkl, w_rkl, FORWARD, REVERSE)
    div3, rkl3 = _in_bin_divergence(tz3, tk3, sz3, sk3, w_fkl, w_rkl, FORWARD, REVERSE)
    loss = weighted(weight, mass_kl) + weighted(w_strong, div2) + weighted(w_rest, div3)
    # (A model whose classes are all masked has no distribution: NaN, whatever the weights.)
    no_distribution = ((tz1 + tz2 + tz3) == 0.0) | ((sz1 + sz2 + sz3) == 0.0)
    loss = tl.where(bad_target | no_distribution, float("nan"), loss)
    tl.store(loss_ptr + rows, tl.where(kept, loss * t2_of(scalars, T2_SCALE), 0.0).to(tl.float32), mask=row_in)
    if WITH_CE:
        tl.store(ce_ptr + rows, tl.where(kept, (m1 - s_y) + tl.log(z1), 0.0), mask=row_in)

    # Pass 3: the gradient.
    if WITH_GRAD:
        g_scale = tl.where(bad_target, float("nan"), g_scale)
        c1 = tl.where(_absent(lp1, lq1), 0.0, weight * (tl.exp(lq1) - tl.exp(lp1))).to(tl.float32)
        # (f_b = 0 for a bin the teacher gives no mass: its in-bin forward KL is 0 whatever the student does)
        f2 = tl.where(tz2 > 0.0, w_strong * w_fkl, 0.0)
        f3 = tl.where(tz3 > 0.0, w_rest * w_fkl, 0.0)
        c2 = weight * (tl.exp(lq2) - tl.exp(lp2)) + f2 - weighted(w_strong * w_rkl, rkl2)
        c3 = weight * (tl.exp(lq3) - tl.exp(lp3)) + f3 - weighted(w_rest * w_rkl, rkl3)
        c2 = tl.where(_absent(lp2, lq2), 0.0, c2).to(tl.float32)
        c3 = tl.where(_absent(lp3, lq3), 0.0, c3).to(tl.float32)
        r2 = zero + w_strong * w_rkl
        r3 = zero + w_rest * w_rkl
        lz1 = tl.log(z1)
        # The full gradient: the teacher's coefficients, and -d loss / d T before its T^2 term, shifted by the maxes.
        fkl2 = zero.to(tl.float64)
        fkl3 = zero.to(tl.float64)
        if FORWARD:
            fkl2 = _in_bin_kl(tz2, tk2, sz2)
            fkl3 = _in_bin_kl(tz3, tk3, sz3)
        ct1 = _teacher_coefficient(weight, lp1, lq1, mass_kl, 0.0, 0.0, 0.0)
        ct2 = _teacher_coefficient(weight, lp2, lq2, mass_kl, f2, fkl2, r2)
        ct3 = _teacher_coefficient(weight, lp3, lq3, mass_kl, f3, fkl3, r3)
        mx = tl.maximum(s1, tl.maximum(s2, s3))
        my = tl.maximum(t1, tl.maximum(t2_, t3))
        dtemp = zero
        if SINGLE_TILE:
            log_q, log_p, q_in, p_in = _in_bin(
                x, y, in_top1, in_strong, t1, t2_, t3, tz1, tz2, tz3, s1, s2, s3, sz1, sz2, sz3
            )
            g = _method_grad(in_top1, in_strong, log_q, log_p, q_in, p_in, c1, c2, c3, f2, f3, r2, r3, g_scale, REVERSE)
            if FULL:
                gt = _teacher_grad(
                    y, in_top1, in_strong, log_q, log_p, q_in, p_in, ct1, ct2, ct3, f2, f3, r2, r3, g_scale, REVERSE
                )
                dtemp = temperature_terms(x, mx, g, y, my, gt)
                if TEACHER_GRAD:
                    kept_t = kept & (g_scale != 0.0)  # (distill_weight = 0: a teacher gradient of 0)
                    store_teacher_tile(
                        gt_ptr, rows64, g_stride, row_in, cols0, V, gt, t, mean_t, sd_t, std_t, n_t, kept_t, STANDARDIZE
                    )
            mean_g, coef = n_s, n_s
            if STANDARDIZE:
                sum_g, sum_gz = zscore_sums(g, s, mean_s, sd_s)
                mean_g, coef = zscore_jacobian(sum_g, sum_gz, std_s, n_s)
            g = distilled(unstandardize(g, s, mean_s, sd_s, mean_g, coef, STANDARDIZE), DISTILL_GRAD)
            if CE_GRAD:
                g += ce_grad(s, cols0, tgt, m1, lz1, ce_scale, scalars, share)
            store_rows(grad_ptr, rows64, g_stride, row_in, cols0, V, tl.where(kept[:, None], g, 0.0))
        else:
            mean_g, coef = n_s, n_s
            mean_gt, coef_t = n_t, n_t
            if STANDARDIZE:  # the row sums of the z-scores' Jacobians
                sum_g, sum_gz = tl.zeros_like(n_s), tl.zeros_like(n_s)
                sum_gt, sum_gtz = tl.zeros_like(n_t), tl.zeros_like(n_t)
                for start in range(0, V, BLOCK_V):
                    cols = start + cols0
                    s = load_raw(s_ptr, rows64, s_stride, valid, cols, V)
                    t = load_raw(t_ptr, rows64, t_stride, valid, cols, V)
                    y = scaled(t, mean_t, tau_t)
                    in_top1, in_strong = _membership(
                        t, cols, tgt, kth_v, kth_i, top1_i, t_max, threshold, PARTITION, SPLIT_TOP1, LOWEST
                    )
                    log_q, log_p, q_in, p_in = _in_bin(
                        scaled(s, mean_s, tau_s),
                        y,
                        in_top1,
                        in_strong,
                        t1,
                        t2_,
                        t3,
                        tz1,
                        tz2,
                        tz3,
                        s1,
                        s2,
                        s3,
                        sz1,
                        sz2,
                        sz3,
                    )
                    g = _method_grad(
                        in_top1, in_strong, log_q, log_p, q_in, p_in, c1, c2, c3, f2, f3, r2, r3, g_scale, REVERSE
                    )
                    tile_g, tile_gz = zscore_sums(g, s, mean_s, sd_s)
                    sum_g += tile_g
                    sum_gz += tile_gz
                    if TEACHER_GRAD:
                        gt = _teacher_grad(
                            y,
                            in_top1,
                            in_strong,
                            log_q,
                            log_p,
                            q_in,
                            p_in,
                            ct1,
                            ct2,
                            ct3,
                            f2,
                            f3,
                            r2,
                            r3,
                            g_scale,
                            REVERSE,
                        )
                        tile_g, tile_gz = zscore_sums(gt, t, mean_t, sd_t)
                        sum_gt += tile_g
                        sum_gtz += tile_gz
                mean_g, coef = zscore_jacobian(sum_g, sum_gz, std_s, n_s)
                mean_gt, coef_t = zscore_jacobian(sum_gt, sum_gtz, std_t, n_t)
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                s = load_raw(s_ptr, rows64, s_stride, valid, cols, V)
                x = scaled(s, mean_s, tau_s)
                t = load_raw(t_ptr, rows64, t_stride, valid, cols, V)
                y = scaled(t, mean_t, tau_t)
                in_top1, in_strong = _membership(
                    t, cols, tgt, kth_v, kth_i, top1_i, t_max, threshold, PARTITION, SPLIT_TOP1, LOWEST
                )
                log_q, log_p, q_in, p_in = _in_bin(
                    x, y, in_top1, in_strong, t1, t2_, t3, tz1, tz2, tz3, s1, s2, s3, sz1, sz2, sz3
                )
                g = _method_grad(
                    in_top1, in_strong, log_q, log_p, q_in, p_in, c1, c2, c3, f2, f3, r2, r3, g_scale, REVERSE
                )
                if FULL:
                    gt = _teacher_grad(
                        y, in_top1, in_strong, log_q, log_p, q_in, p_in, ct1, ct2, ct3, f2, f3, r2, r3, g_scale, REVERSE
                    )
                    dtemp += temperature_terms(x, mx, g, y, my, gt)
                    if TEACHER_GRAD:
                        gt = distilled(unstandardize(gt, t, mean_t, sd_t, mean_gt, coef_t, STANDARDIZE), DISTILL_GRAD)
                        store_rows(gt_ptr, rows64, g_stride, row_in, cols, V, tl.where(kept[:, None], gt, 0.0))
                g = distilled(unstandardize(g, s, mean_s, sd_s, mean_g, coef, STANDARDIZE), DISTILL_GRAD)
                if CE_GRAD:
                    g += ce_grad(s, cols, tgt, m1, lz1, ce_scale, scalars, share)
                store_rows(grad_ptr, rows64, g_stride, row_in, cols, V, tl.where(kept[:, None], g, 0.0))
        if FULL:  # d loss / d T = 2 L / T (with T^2 scaling) - sum_j ((x_j - mx) g_j + (y_j - my) gt_j)
            if T2_SCALE:
                dtemp -= weighted(g_scale, 2.0 * loss).to(tl.float32)
            tl.store(dtemp_ptr + rows, tl.where(kept & (g_scale != 0.0), -dtemp, 0.0), mask=row_in)
