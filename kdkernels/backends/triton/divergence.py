"""Triton kernel of the divergence family (docs/losses.md, "Divergence family": the per-class terms l_k and
r_k = q_k dl/dq_k of every code, and g_j = (r_j - q_j sum_k r_k) / T).

Passes. A row that fits one tile is loaded once (several short rows share a program). A longer row streams:
(A) online max / sum of x = s / T and y = t / T, (B, walking back so the freshest tiles are still in L2) the row
sums of l_k and r_k (and e_k, f_k for bdkd and akl, whose weights depend on row sums), (C) the gradient. kd knows
sum r = -1 and folds its loss into (C); rkl gets its loss l = sum r in (A) from
kq = sum exp(x - mx) ((x - mx) - (y - my)), re-based when a max moves; both read the row twice. A row whose classes
are all masked in both logits is left out like an ignored row. With STANDARDIZE a first pass takes both rows'
moments (x and y are then the z-scores over T), and before (C) a read-only pass sums the gradient for the z-score's
Jacobian (unless the row is one tile). akl finds its head between (A) and (B) (_akl_head: a radix select, 4 passes
over the teacher row, in registers when it is one tile, and one pass at the value it selects).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...methods import BDKD_TIE, Divergence
from .common import (
    LOG_MIN_NORMAL,
    NEG_INF,
    TEMPERATURE,
    ce_grad,
    distilled,
    load_raw,
    load_scaled,
    log_softmax_tile,
    logaddexp,
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

KD = tl.constexpr(int(Divergence.KD))
RKL = tl.constexpr(int(Divergence.RKL))
JSD = tl.constexpr(int(Divergence.JSD))
SKEW_FKL = tl.constexpr(int(Divergence.SKEW_FKL))
SKEW_RKL = tl.constexpr(int(Divergence.SKEW_RKL))
TVD = tl.constexpr(int(Divergence.TVD))
ABKD = tl.constexpr(int(Divergence.ABKD))
ABKD_ALPHA0 = tl.constexpr(int(Divergence.ABKD_ALPHA0))
ABKD_BETA0 = tl.constexpr(int(Divergence.ABKD_BETA0))
ABKD_OPPOSITE = tl.constexpr(int(Divergence.ABKD_OPPOSITE))
ABKD_ZERO = tl.constexpr(int(Divergence.ABKD_ZERO))
WSD = tl.constexpr(int(Divergence.WSD))
BDKD = tl.constexpr(int(Divergence.BDKD))
AKL = tl.constexpr(int(Divergence.AKL))
# akl's head (csrc/divergence.h AklHead) is searched on float32's order-preserving int32 keys (negative floats with
# their magnitude bits flipped). The radix select takes AKL_DIGIT_BITS of them at a time from the top (AKL_DIGITS
# passes); each digit's histogram of p is a row's AKL_BINS floats of the scratch mass_ptr, added to by global-memory
# atomics (Triton has no shared-memory ones). The fallback's bisection runs from below -inf (lo) to +inf (hi).
AKL_DIGIT_BITS = tl.constexpr(8)
AKL_DIGITS = tl.constexpr(4)
AKL_BINS = tl.constexpr(1 << 8)
KEY_NEG_INF = tl.constexpr(-2139095041)
KEY_POS_INF = tl.constexpr(2139095040)
# bdkd's tie (kdkernels/methods.py BDKD_TIE) in float32: entropies within this times (1 + H(p) + H(q)) are equal.
BDKD_TIE_F32 = tl.constexpr(BDKD_TIE * 1.1920928955078125e-07)


@triton.jit
def _xlogy(a, log_a, log_b):
    """a (log a - log b), 0 where a = 0 (also where it underflowed, and where b = 0)."""
    return tl.where(a == 0.0, 0.0, a * (log_a - log_b))


@triton.jit
def _key(t):
    """float32's order-preserving int32 key (negative floats have their magnitude bits flipped)."""
    bits = t.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_value(key):
    """The float32 of an order-preserving key (_key)."""
    k = key.to(tl.int32)
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


# akl's head search reads the teacher row through one tuple, `teacher`: (t_ptr, rows64, t_stride, valid, V, mean_t,
# tau_t, my, lzy, t, p), the row's pointer and layout, its z-score and log-softmax statistics, and t and p, the raw
# logits and probabilities of the row when it is one tile (in registers; unused otherwise).
@triton.jit
def _head_tile(teacher, start, SINGLE_TILE: tl.constexpr, BLOCK_V: tl.constexpr):
    """(raw teacher logits, teacher probabilities, columns) of the tile at column `start`: the registers' row when it
    is one tile, else loaded."""
    t_ptr, rows64, t_stride, valid, V, mean_t, tau_t, my, lzy, t, p = teacher
    cols = start + tl.arange(0, BLOCK_V)
    if not SINGLE_TILE:
        t = load_raw(t_ptr, rows64, t_stride, valid, cols, V)
        p = tl.exp(log_softmax_tile(scaled(t, mean_t, tau_t), my, lzy))
    return t, p, cols


@triton.jit
def _mass_above(t, p, value):
    """A tile's part of A(value) = the mass of {t > value}. Every pass that evaluates A sums it so (the same
    additions in the same order: a tile's elements at 0 where t <= value), so that A is one function of the value,
    never rising as the value rises, whichever pass computes it."""
    return tl.sum(tl.where(t > value[:, None], p, 0.0), axis=1)


@triton.jit
def _akl_histogram(teacher, mass_ptr, floor, digit_index, prefix, SINGLE_TILE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One digit of akl's radix select (AklHead (a)): adds the p of each class whose higher digits are `prefix` (the
    signed key's digits chosen so far) to its row's bin of mass_ptr for its key's digit `digit_index` from the top.
    Classes of p below `floor`, (1 - mu) / (2 V), hold less than (1 - mu) / 2 together: they are left out, as the
    mass crosses mu among the others, so that a peaked row's long tail takes no atomics."""
    rows64, valid, V = teacher[1], teacher[3], teacher[4]
    shift = (AKL_DIGITS - 1 - digit_index) * AKL_DIGIT_BITS
    first = digit_index == 0
    for start in range(0, V, BLOCK_V):
        tile_t, tile_p, cols = _head_tile(teacher, start, SINGLE_TILE, BLOCK_V)
        key = _key(tile_t)
        digit = (key >> shift) & (AKL_BINS - 1)
        digit = tl.where(first, digit ^ (AKL_BINS // 2), digit)  # (the sign's digit, in the keys' order)
        # (the first digit has no prefix; the shift is kept below 32, which int32 shifts do not take)
        within = first | ((key >> tl.minimum(shift + AKL_DIGIT_BITS, 31)) == prefix[:, None])
        binned = valid[:, None] & within & (tile_p >= floor) & (tile_p > 0.0)
        tl.atomic_add(mass_ptr + rows64[:, None] * AKL_BINS + digit, tile_p, mask=binned, sem="relaxed")


@triton.jit
def _akl_choose(mass_ptr, rows64, valid, digit_index, prefix, above, mu, BLOCK_N: tl.constexpr):
    """AklHead::choose on a digit's histograms (_akl_histogram): the highest digit where the mass from the top
    crosses mu (the lowest if none does), appended to `prefix`; `above`: the histograms' mass above the digits
    chosen. Each bin is read and zeroed for the next digit in one exchange (of its bits: Triton's interpreter
    exchanges integers only); the barriers order every thread's adds before the reads and the reads before the next
    digit's adds."""
    bins = tl.arange(0, AKL_BINS)
    bits_ptr = mass_ptr.to(tl.pointer_type(tl.int32)) + rows64[:, None] * AKL_BINS + bins[None, :]
    tl.debug_barrier()
    bits = tl.atomic_xchg(bits_ptr, tl.zeros([BLOCK_N, AKL_BINS], tl.int32), mask=valid[:, None], sem="relaxed")
    tl.debug_barrier()
    mass = bits.to(tl.float32, bitcast=True)
    from_top = tl.cumsum(tl.where(valid[:, None], mass, 0.0), axis=1, reverse=True)
    chosen = tl.max(tl.where(above[:, None] + from_top > mu, bins[None, :], 0), axis=1)
    above += tl.sum(tl.where(bins[None, :] == chosen[:, None] + 1, from_top, 0.0), axis=1)
    return tl.where(digit_index == 0, chosen - AKL_BINS // 2, prefix * AKL_BINS + chosen), above


@triton.jit
def _akl_candidate(teacher, mass_ptr, mu, SINGLE_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """AklHead (a): the radix select's value per row, a candidate (its histograms add the masses in another order
    than A, and atomics in no fixed one): AKL_DIGITS passes over the teacher row. -0.0 for a zero (the least key of
    its tie group, which a bisection finds)."""
    rows64, valid, V = teacher[1], teacher[3], teacher[4]
    prefix = tl.zeros([BLOCK_N], tl.int32)
    above = tl.zeros([BLOCK_N], tl.float32)
    floor = (1.0 - mu) / (2.0 * V)
    for digit_index in range(AKL_DIGITS):
        _akl_histogram(teacher, mass_ptr, floor, digit_index, prefix, SINGLE_TILE, BLOCK_V)
        prefix, above = _akl_choose(mass_ptr, rows64, valid, digit_index, prefix, above, mu, BLOCK_N)
    key = tl.minimum(tl.maximum(prefix, KEY_NEG_INF), KEY_POS_INF)  # (NaN keys lie beyond the infinities)
    return _key_value(tl.where(key == 0, -1, key))


@triton.jit
def _akl_at(teacher, value, SINGLE_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """AklHead (b), one pass at values u per row: (A(u), the mass of {t >= u}, which is A just below u (the same
    elements summed in the same order as _mass_above's at u's predecessor), the count above u, the tie group
    {t == u}'s size and its probability p_u)."""
    mass = tl.zeros([BLOCK_N], tl.float32)
    mass_from = tl.zeros([BLOCK_N], tl.float32)
    count_above = tl.zeros([BLOCK_N], tl.float32)
    size = tl.zeros([BLOCK_N], tl.float32)
    p_group = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, teacher[4], BLOCK_V):
        tile_t, tile_p, cols = _head_tile(teacher, start, SINGLE_TILE, BLOCK_V)
        tie = tile_t == value[:, None]
        mass += _mass_above(tile_t, tile_p, value)
        mass_from += tl.sum(tl.where(tile_t >= value[:, None], tile_p, 0.0), axis=1)
        count_above += tl.sum((tile_t > value[:, None]).to(tl.float32), axis=1)
        size += tl.sum(tie.to(tl.float32), axis=1)
        p_group = tl.maximum(p_group, tl.max(tl.where(tie, tile_p, 0.0), axis=1))
    return mass, mass_from, count_above, size, p_group


@triton.jit
def _akl_settle(teacher, mu, value, mass, mass_from, SINGLE_TILE: tl.constexpr, BLOCK_V: tl.constexpr):
    """AklHead::settle and its fallback: (the value, whether any row moved). u is the value where
    A(u) <= mu < A(below u); elsewhere (the candidate's sums rounded to the other side of mu than A's) a bisection
    over the keys on u's correct side finds the least key with A <= mu, one pass per step (ignored rows take none)."""
    valid = teacher[3]
    k = _key(value).to(tl.int64)
    low = mass <= mu
    low_below = (k != KEY_NEG_INF) & (mass_from <= mu)
    lo = tl.where(low, tl.where(low_below, KEY_NEG_INF - 1, k - 1), k)
    hi = tl.where(low, tl.where(low_below, k - 1, k), KEY_POS_INF)
    hi = tl.where(valid, hi, lo + 1)
    moved = tl.max(hi - lo) > 1
    while tl.max(hi - lo) > 1:
        mid = lo + (hi - lo) // 2
        a = tl.zeros_like(mass)
        for start in range(0, teacher[4], BLOCK_V):
            tile_t, tile_p, cols = _head_tile(teacher, start, SINGLE_TILE, BLOCK_V)
            a += _mass_above(tile_t, tile_p, _key_value(mid))
        low = a <= mu  # (not low where a is NaN: a teacher row all -inf bisects up to +inf, the empty head)
        searching = hi - lo > 1  # (lo may still be the sentinel below -inf, never probed)
        hi = tl.where(searching & low, mid, hi)
        lo = tl.where(searching & ~low, mid, lo)
    return tl.where(valid, _key_value(hi), value), moved


@triton.jit
def _akl_end(teacher, value, share, size, SINGLE_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """AklHead (c): the least index end with `share` ties {t == value} before it (V for the whole group, 0 for none),
    by bisection (a counting pass per step) where the group is split."""
    valid, V = teacher[3], teacher[4]
    split = valid & (share > 0.0) & (share < size)
    lo = tl.zeros([BLOCK_N], tl.int64)
    hi = tl.where(share > 0.0, V, 0).to(tl.int64)
    lo = tl.where(split, lo, tl.maximum(hi - 1, 0))
    while tl.max(hi - lo) > 1:
        mid = lo + (hi - lo) // 2
        ties = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, V, BLOCK_V):
            tile_t, tile_p, cols = _head_tile(teacher, start, SINGLE_TILE, BLOCK_V)
            ties += tl.sum(((tile_t == value[:, None]) & (cols[None, :] < mid[:, None])).to(tl.float32), axis=1)
        enough = ties >= share
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid)
    return hi


@triton.jit
def _akl_head(teacher, mass_ptr, mu, SINGLE_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """akl's head per row as (value, end): head = {t > value} + {t == value, index < end} on the raw teacher logits
    (docs/losses.md, "AKL's head"; csrc/divergence.h AklHead has the steps (a) to (c)): a radix select's candidate,
    checked in one pass at it, a bisection only where the check fails. mass_ptr: the rows' AKL_BINS floats of
    scratch, zero."""
    value = _akl_candidate(teacher, mass_ptr, mu, SINGLE_TILE, BLOCK_N, BLOCK_V)
    mass, mass_from, count_above, size, p_group = _akl_at(teacher, value, SINGLE_TILE, BLOCK_N, BLOCK_V)
    value, moved = _akl_settle(teacher, mu, value, mass, mass_from, SINGLE_TILE, BLOCK_V)
    if moved:  # (b) again at the value the fallback found
        mass, mass_from, count_above, size, p_group = _akl_at(teacher, value, SINGLE_TILE, BLOCK_N, BLOCK_V)
    room = (mu - mass) / tl.where(p_group > 0.0, p_group, 1.0)
    share = tl.where((p_group > 0.0) & (room < size), tl.where(room > 0.0, tl.floor(room), 0.0), size)
    share = tl.where((count_above == 0.0) & (share == 0.0), 1.0, share)  # (the forced first class)
    return value, _akl_end(teacher, value, share, size, SINGLE_TILE, BLOCK_N, BLOCK_V)


@triton.jit
def _in_head(t, cols, value, end):
    """Whether the classes of a tile of raw teacher logits are in akl's head (_akl_head)."""
    return (t > value[:, None]) | ((t == value[:, None]) & (cols[None, :] < end[:, None]))


# Long: one formula per divergence code, chosen at compile time (CODE), each a few lines.
@triton.jit
def _terms(
    x,
    y,
    mx,
    lzx,
    my,
    lzy,
    mix_p,
    mix_q,
    log_mix_p,
    log_mix_q,
    a,
    b,
    w_fkl,
    w_rkl,
    in_head,
    CODE: tl.constexpr,
    FULL: tl.constexpr,
):
    """Per-class (l_k, r_k, q_k, p_k) and rt_k of a tile, and the row sums of e_k and f_k, from the row statistics
    (max, log-sum) of x and y; bdkd's and akl's l_k and r_k are those of KL(p || q) and KL(q || p) (_row weighs them),
    bdkd's e_k = q log q - p log p and f_k = -(q log q + p log p), akl's e_k and f_k = |p - q| on its head (in_head)
    and off it, 0 for the others; rt_k = p_k dl/dp_k, the teacher's r_k (bdkd's and akl's: their forward KL's, weighed
    in _teacher_r), only with FULL (what a code does not need is not computed: Triton's interpreter, which runs the
    tests, computes everything). (e and f are summed here, so that their tiles need no registers past this.)"""
    lq = log_softmax_tile(x, mx, lzx)
    lp = log_softmax_tile(y, my, lzy)
    # p = q = 0: masked, or underflowed (below float32's least normal number: log p below its log) in both; log 1
    # there, so that no formula meets inf - inf (the terms are set to 0 below)
    absent = (lq < LOG_MIN_NORMAL) & (lp < LOG_MIN_NORMAL)
    lq = tl.where(absent, 0.0, lq)
    lp = tl.where(absent, 0.0, lp)
    q = tl.exp(lq)
    p = tl.exp(lp)
    e = q  # (placeholders of the terms a code does not compute, never read)
    f = q
    rt = q
    if CODE == KD:
        loss = _xlogy(p, lp, lq)
        r = -p
        if FULL:
            rt = loss + p
    elif CODE == RKL:
        loss = _xlogy(q, lq, lp)
        r = loss
        if FULL:
            rt = -q
    elif CODE == JSD:
        lm = logaddexp(lp + log_mix_p, lq + log_mix_q)
        r = mix_q * _xlogy(q, lq, lm)
        forward = mix_p * _xlogy(p, lp, lm)
        loss = forward + r
        if FULL:
            rt = forward
    elif CODE == SKEW_FKL:
        lm = logaddexp(lp + log_mix_p, lq + log_mix_q)
        loss = _xlogy(p, lp, lm)
        r = -mix_q * tl.exp(lp + lq - lm)
        if FULL:
            rt = loss - r
    elif CODE == SKEW_RKL:
        lm = logaddexp(lp + log_mix_p, lq + log_mix_q)
        loss = _xlogy(q, lq, lm)
        r = loss + q - mix_q * tl.exp(2.0 * lq - lm)
        if FULL:
            rt = -mix_p * tl.exp(lp + lq - lm)
    elif CODE == TVD:
        loss = 0.5 * tl.abs(p - q)
        sign = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
        r = 0.5 * q * sign
        if FULL:
            rt = -0.5 * p * sign
    elif CODE == ABKD:
        ab = a + b
        mixed = tl.exp(a * lp + b * lq)
        loss = -(mixed - a / ab * tl.exp(ab * lp) - b / ab * tl.exp(ab * lq)) / (a * b)
        r = (tl.exp(ab * lq) - mixed) / a
        if FULL:
            rt = (tl.exp(ab * lp) - mixed) / b
    elif CODE == ABKD_ALPHA0:  # (q^b log(q^b / p^b): 0 where q^b = 0)
        qb = tl.exp(b * lq)
        loss = (_xlogy(qb, b * lq, b * lp) - qb + tl.exp(b * lp)) / (b * b)
        r = _xlogy(qb, lq, lp)
        if FULL:
            rt = (tl.exp(b * lp) - qb) / b
    elif CODE == ABKD_BETA0:
        pa = tl.exp(a * lp)
        loss = (_xlogy(pa, a * lp, a * lq) - pa + tl.exp(a * lq)) / (a * a)
        r = (tl.exp(a * lq) - pa) / a
        if FULL:
            rt = _xlogy(pa, lp, lq)
    elif CODE == ABKD_OPPOSITE:
        ratio = tl.exp(a * (lp - lq))
        loss = (a * (lq - lp) + ratio - 1.0) / (a * a)
        r = (1.0 - ratio) / a
        if FULL:
            rt = -r
    elif CODE == ABKD_ZERO:
        loss = 0.5 * (lp - lq) * (lp - lq)
        r = lq - lp
        if FULL:
            rt = lp - lq
    elif CODE == WSD:
        rkl = _xlogy(q, lq, lp)
        fkl = _xlogy(p, lp, lq)
        loss = w_fkl * fkl + w_rkl * rkl
        r = w_rkl * rkl - w_fkl * p
        if FULL:
            rt = w_fkl * (fkl + p) - w_rkl * q
    else:  # BDKD, AKL
        loss = _xlogy(p, lp, lq)
        r = _xlogy(q, lq, lp)
        if FULL:
            rt = loss + p
        if CODE == BDKD:
            e = _xlogy(q, lq, 0.0) - _xlogy(p, lp, 0.0)
            f = -(_xlogy(q, lq, 0.0) + _xlogy(p, lp, 0.0))
        else:
            e = tl.where(in_head, tl.abs(p - q), 0.0)
            f = tl.where(in_head, 0.0, tl.abs(p - q))
    zero = tl.zeros_like(q)
    if CODE >= ABKD and CODE <= ABKD_ZERO:  # (the abkd codes are consecutive)
        # The alpha-beta divergence is >= 0: where a class masked in one model only makes its formula inf - inf,
        # the term is +inf (the limit), not NaN.
        loss = tl.where(((lq == NEG_INF) | (lp == NEG_INF)) & (loss != loss), float("inf"), loss)
    if CODE == BDKD or CODE == AKL:
        e = tl.sum(tl.where(absent, zero, e), axis=1)
        f = tl.sum(tl.where(absent, zero, f), axis=1)
    if FULL:
        rt = tl.where(absent, zero, rt)
    return (
        tl.where(absent, zero, loss),
        tl.where(absent, zero, r),
        tl.where(absent, zero, q),
        tl.where(absent, zero, p),
        e,
        f,
        rt,
    )


@triton.jit
def _row(sum_l, sum_r, sum_e, sum_f, w_fkl, w_rkl, CODE: tl.constexpr):
    """(row loss, a, b): the gradient takes a r_k + b p_k for r_k, whose row sum is a sum_r + b. bdkd weighs its
    two KLs by w_fkl where H(p) > H(q) (sum_e > 0), by w_rkl where H(q) > H(p), else (equal within its tie, sum_f =
    H(p) + H(q)) by 1; akl by g_head / g and g_tail / g (sum_e, sum_f and their sum g; 1/2 each where g = 0); the
    weights are constant, and a KL of weight 0 adds 0."""
    a = tl.zeros_like(sum_l) + 1.0
    b = tl.zeros_like(sum_l)
    loss = sum_l
    if CODE == BDKD:
        tie = tl.abs(sum_e) <= BDKD_TIE_F32 * (1.0 + sum_f)
        a = tl.where((sum_e < 0) & ~tie, w_rkl, 1.0)
        b = -tl.where((sum_e > 0) & ~tie, w_fkl, 1.0)
        loss = a * sum_r - b * sum_l
    elif CODE == AKL:
        g = sum_e + sum_f
        safe_g = tl.where(g > 0, g, 1.0)
        a = tl.where(g > 0, sum_f / safe_g, 0.5)
        b = -tl.where(g > 0, sum_e / safe_g, 0.5)
        loss = weighted(a, sum_r) + weighted(-b, sum_l)
    return loss, a, b


@triton.jit
def _grad_terms(r, p, a, b, CODE: tl.constexpr):
    """The gradient's r_k (see _row)."""
    if CODE == BDKD or CODE == AKL:
        r = a[:, None] * r + b[:, None] * p
    return r


@triton.jit
def _method_grad(r, q, sum_r, scale):
    """The method's gradient g_j = (r_j - q_j sum_r) scale of a tile."""
    return (r - q * sum_r[:, None]) * scale[:, None]


@triton.jit
def _teacher_sum_r(sum_rt, a, b, CODE: tl.constexpr):
    """The row sum of the teacher's rt_k: bdkd's and akl's weigh their forward KL's by w_fkl = -b and q by
    w_rkl = a (sum q = 1)."""
    if CODE == BDKD or CODE == AKL:
        sum_rt = -b * sum_rt - a
    return sum_rt


@triton.jit
def _teacher_grad(rt, q, p, y, a, b, sum_rt, scale, CODE: tl.constexpr):
    """The teacher's gradient gt_j = (rt_j - p_j sum_rt) scale of a tile (sum_rt from _teacher_sum_r), 0 on the
    classes the teacher masks."""
    if CODE == BDKD or CODE == AKL:
        rt = -b[:, None] * rt - a[:, None] * q
    return tl.where(y == NEG_INF, 0.0, (rt - p * sum_rt[:, None]) * scale[:, None])


# Long: its passes (numbered blocks) share each row's running statistics in registers; the per-class math is
# in the helpers above.
@triton.jit
def divergence_kernel(
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
    mix_p,
    mix_q,
    log_mix_p,
    log_mix_q,
    alpha,
    beta,
    w_fkl,
    w_rkl,
    mu,
    gt_ptr,
    dtemp_ptr,
    mass_ptr,
    CODE: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_DENOM: tl.constexpr,
    WITH_CE: tl.constexpr,
    CE_GRAD: tl.constexpr,
    DISTILL_GRAD: tl.constexpr,
    CE_APART: tl.constexpr,
    STANDARDIZE: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    FULL: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    T2_SCALE: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # WITH_CE: the cross-entropy term (at T = 1): its softmax is the method's one unless CE_APART (T != 1 or
    # STANDARDIZE), which keeps a running (m1, z1) of the raw logits too. FULL (with WITH_GRAD): the teacher's
    # gradient too (stored into gt_ptr with TEACHER_GRAD) and d loss / d T per row into dtemp_ptr; kd and rkl then
    # take the streamed pass (B) like the others. mass_ptr: akl's scratch, AKL_BINS zeros per row (_akl_head).
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
    mx = tl.full([BLOCK_N], NEG_INF, tl.float32)
    my = tl.full([BLOCK_N], NEG_INF, tl.float32)
    zx = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    m1 = tl.full([BLOCK_N], NEG_INF, tl.float32)
    z1 = tl.zeros([BLOCK_N], tl.float32)
    sum_l = tl.zeros([BLOCK_N], tl.float32)
    sum_r = tl.zeros([BLOCK_N], tl.float32)
    sum_e = tl.zeros([BLOCK_N], tl.float32)
    sum_f = tl.zeros([BLOCK_N], tl.float32)
    sum_rt = tl.zeros([BLOCK_N], tl.float32)
    dtemp = tl.zeros([BLOCK_N], tl.float32)  # FULL: -sum_j (x_j - mx) g_j + (y_j - my) gt_j
    head_value = tl.zeros([BLOCK_N], tl.float32)  # akl's head (_akl_head)
    head_end = tl.zeros([BLOCK_N], tl.int64)
    cols0 = tl.arange(0, BLOCK_V)
    # (x = s / T, y = t / T; with STANDARDIZE the z-scores over T.)
    mean_s, sd_s, std_s, n_s, tau_s = row_zscore(
        s_ptr, rows64, s_stride, valid, V, temperature, STANDARDIZE, BLOCK_N, BLOCK_V
    )
    mean_t, sd_t, std_t, n_t, tau_t = row_zscore(
        t_ptr, rows64, t_stride, valid, V, temperature, STANDARDIZE, BLOCK_N, BLOCK_V
    )
    if SINGLE_TILE:
        s = load_raw(s_ptr, rows64, s_stride, valid, cols0, V)
        x = scaled(s, mean_s, tau_s)
        t = load_raw(t_ptr, rows64, t_stride, valid, cols0, V)
        y = scaled(t, mean_t, tau_t)
        mx, zx = online_lse(mx, zx, x)
        my, zy = online_lse(my, zy, y)
        if CE_APART:
            m1, z1 = online_lse(m1, z1, s)
        else:
            m1, z1 = mx, zx
        kept = valid & ((mx != NEG_INF) | (my != NEG_INF))
        if CODE == AKL:
            p_row = tl.exp(log_softmax_tile(y, my, tl.log(zy)))
            teacher = (t_ptr, rows64, t_stride, valid, V, mean_t, tau_t, my, tl.log(zy), t, p_row)
            head_value, head_end = _akl_head(teacher, mass_ptr, mu, True, BLOCK_N, BLOCK_V)
        in_head = False
        if CODE == AKL:
            in_head = _in_head(t, cols0, head_value, head_end)
        loss, r, q, p, e, f, rt = _terms(
            x,
            y,
            mx,
            tl.log(zx),
            my,
            tl.log(zy),
            mix_p,
            mix_q,
            log_mix_p,
            log_mix_q,
            alpha,
            beta,
            w_fkl,
            w_rkl,
            in_head,
            CODE,
            FULL,
        )
        sum_r = tl.sum(r, axis=1)
        if CODE == BDKD or CODE == AKL:
            sum_e = e
            sum_f = f
        sum_l, a, b = _row(tl.sum(loss, axis=1), sum_r, sum_e, sum_f, w_fkl, w_rkl, CODE)
        sum_r = a * sum_r + b
        if CODE == KD:
            sum_r = tl.full([BLOCK_N], -1.0, tl.float32)
        if WITH_GRAD:
            g = _method_grad(_grad_terms(r, p, a, b, CODE), q, sum_r, g_scale)
            if FULL:
                gt = _teacher_grad(rt, q, p, y, a, b, _teacher_sum_r(tl.sum(rt, axis=1), a, b, CODE), g_scale, CODE)
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
                g += ce_grad(s, cols0, tgt, m1, tl.log(z1), ce_scale, scalars, share)
            store_rows(grad_ptr, rows64, g_stride, row_in, cols0, V, tl.where(kept[:, None], g, 0.0))
    else:
        # rkl: kq = sum exp(x - mx) ((x - mx) - (y - my)), re-based as the maxes move, gives l in this pass; the
        # classes the teacher masks are left out of it, their largest x kept (x_masked): the loss is +inf if that
        # class's probability does not underflow (its term q (log q + inf)), their terms are 0 if it does (and their
        # exps in zx, which re-bases kq, then weigh less than the rounding of kq).
        kq = tl.zeros([BLOCK_N], tl.float32)
        x_masked = tl.full([BLOCK_N], NEG_INF, tl.float32)
        for start in range(0, V, BLOCK_V):
            s = load_raw(s_ptr, rows64, s_stride, valid, start + cols0, V)
            x = scaled(s, mean_s, tau_s)
            y = load_scaled(t_ptr, rows64, t_stride, valid, start + cols0, V, mean_t, tau_t)
            if CODE == RKL and not FULL:
                sx = safe_max(nan_max(mx, row_max(x)))
                sy = safe_max(nan_max(my, row_max(y)))
                ex = tl.exp(x - sx[:, None])
                d = tl.where((ex == 0.0) | (y == NEG_INF), 0.0, ex * ((x - sx[:, None]) - (y - sy[:, None])))
                x_masked = tl.maximum(x_masked, tl.max(tl.where(y == NEG_INF, x, NEG_INF), axis=1))
                rescale = tl.exp(mx - sx)
                kq = (kq - zx * ((sx - safe_max(mx)) - (sy - safe_max(my)))) * rescale + tl.sum(d, axis=1)
                zx = zx * rescale + tl.sum(ex, axis=1)
                mx = nan_max(mx, row_max(x))
            else:
                mx, zx = online_lse(mx, zx, x)
            my, zy = online_lse(my, zy, y)
            if CE_APART:
                m1, z1 = online_lse(m1, z1, s)
        if not CE_APART:
            m1, z1 = mx, zx
        kept = valid & ((mx != NEG_INF) | (my != NEG_INF))
        lzx = tl.log(zx)
        lzy = tl.log(zy)
        last = tl.cdiv(V, BLOCK_V) - 1
        if CODE == KD and not FULL:
            sum_r = sum_r - 1.0
        elif CODE == RKL and not FULL:
            sum_l = kq / zx - lzx + lzy
            sum_l = tl.where(x_masked - safe_max(mx) - lzx >= LOG_MIN_NORMAL, float("inf"), sum_l)
            sum_r = sum_l
        else:
            if CODE == AKL:
                teacher = (t_ptr, rows64, t_stride, valid, V, mean_t, tau_t, my, lzy, 0.0, 0.0)
                head_value, head_end = _akl_head(teacher, mass_ptr, mu, False, BLOCK_N, BLOCK_V)
            for i in range(0, last + 1):
                cols = (last - i) * BLOCK_V + cols0
                x = load_scaled(s_ptr, rows64, s_stride, valid, cols, V, mean_s, tau_s)
                t = load_raw(t_ptr, rows64, t_stride, valid, cols, V)
                in_head = False
                if CODE == AKL:
                    in_head = _in_head(t, cols, head_value, head_end)
                loss, r, q, p, e, f, rt = _terms(
                    x,
                    scaled(t, mean_t, tau_t),
                    mx,
                    lzx,
                    my,
                    lzy,
                    mix_p,
                    mix_q,
                    log_mix_p,
                    log_mix_q,
                    alpha,
                    beta,
                    w_fkl,
                    w_rkl,
                    in_head,
                    CODE,
                    FULL,
                )
                sum_l += tl.sum(loss, axis=1)
                sum_r += tl.sum(r, axis=1)
                if CODE == BDKD or CODE == AKL:
                    sum_e += e
                    sum_f += f
                if FULL:
                    sum_rt += tl.sum(rt, axis=1)
        sum_l, a, b = _row(sum_l, sum_r, sum_e, sum_f, w_fkl, w_rkl, CODE)
        sum_r = a * sum_r + b
        if CODE == KD:
            sum_r = tl.full([BLOCK_N], -1.0, tl.float32)
        sum_rt = _teacher_sum_r(sum_rt, a, b, CODE)
        mean_g, coef = n_s, n_s
        mean_gt, coef_t = n_t, n_t
        if STANDARDIZE and WITH_GRAD:  # the row sums of the z-scores' Jacobians (kd's loss with them)
            sum_g, sum_gz = tl.zeros_like(n_s), tl.zeros_like(n_s)
            sum_gt, sum_gtz = tl.zeros_like(n_t), tl.zeros_like(n_t)
            for start in range(0, V, BLOCK_V):
                s = load_raw(s_ptr, rows64, s_stride, valid, start + cols0, V)
                t = load_raw(t_ptr, rows64, t_stride, valid, start + cols0, V)
                y = scaled(t, mean_t, tau_t)
                loss, r, q, p, e, f, rt = _terms(
                    scaled(s, mean_s, tau_s),
                    y,
                    mx,
                    lzx,
                    my,
                    lzy,
                    mix_p,
                    mix_q,
                    log_mix_p,
                    log_mix_q,
                    alpha,
                    beta,
                    w_fkl,
                    w_rkl,
                    False,
                    CODE,
                    FULL,
                )
                if CODE == KD and not FULL:
                    sum_l += tl.sum(loss, axis=1)
                tile_g, tile_gz = zscore_sums(
                    _method_grad(_grad_terms(r, p, a, b, CODE), q, sum_r, g_scale), s, mean_s, sd_s
                )
                sum_g += tile_g
                sum_gz += tile_gz
                if TEACHER_GRAD:
                    tile_g, tile_gz = zscore_sums(
                        _teacher_grad(rt, q, p, y, a, b, sum_rt, g_scale, CODE), t, mean_t, sd_t
                    )
                    sum_gt += tile_g
                    sum_gtz += tile_gz
            mean_g, coef = zscore_jacobian(sum_g, sum_gz, std_s, n_s)
            mean_gt, coef_t = zscore_jacobian(sum_gt, sum_gtz, std_t, n_t)
        if WITH_GRAD or CODE == KD:
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                s = load_raw(s_ptr, rows64, s_stride, valid, cols, V)
                x = scaled(s, mean_s, tau_s)
                t = load_raw(t_ptr, rows64, t_stride, valid, cols, V)
                y = scaled(t, mean_t, tau_t)
                loss, r, q, p, e, f, rt = _terms(
                    x,
                    y,
                    mx,
                    lzx,
                    my,
                    lzy,
                    mix_p,
                    mix_q,
                    log_mix_p,
                    log_mix_q,
                    alpha,
                    beta,
                    w_fkl,
                    w_rkl,
                    False,
                    CODE,
                    FULL,
                )
                if CODE == KD and not FULL and not (STANDARDIZE and WITH_GRAD):
                    sum_l += tl.sum(loss, axis=1)
                if WITH_GRAD:
                    g = _method_grad(_grad_terms(r, p, a, b, CODE), q, sum_r, g_scale)
                    if FULL:
                        gt = _teacher_grad(rt, q, p, y, a, b, sum_rt, g_scale, CODE)
                        dtemp += temperature_terms(x, mx, g, y, my, gt)
                        if TEACHER_GRAD:
                            gt = distilled(
                                unstandardize(gt, t, mean_t, sd_t, mean_gt, coef_t, STANDARDIZE), DISTILL_GRAD
                            )
                            store_rows(gt_ptr, rows64, g_stride, row_in, cols, V, tl.where(kept[:, None], gt, 0.0))
                    g = distilled(unstandardize(g, s, mean_s, sd_s, mean_g, coef, STANDARDIZE), DISTILL_GRAD)
                    if CE_GRAD:
                        g += ce_grad(s, cols, tgt, m1, tl.log(z1), ce_scale, scalars, share)
                    store_rows(grad_ptr, rows64, g_stride, row_in, cols, V, tl.where(kept[:, None], g, 0.0))
    tl.store(loss_ptr + rows, tl.where(kept, sum_l * t2_of(scalars, T2_SCALE), 0.0), mask=row_in)
    if WITH_CE:
        tl.store(ce_ptr + rows, tl.where(kept, (m1 - s_y) + tl.log(z1), 0.0), mask=row_in)
    if FULL:  # d loss / d T = 2 L / T (with T^2 scaling, L = g_scale T l) - sum_j ((x_j - mx) g_j + (y_j - my) gt_j)
        if T2_SCALE:
            dtemp -= weighted(g_scale, 2.0 * sum_l)
        tl.store(dtemp_ptr + rows, tl.where(kept & (g_scale != 0.0), -dtemp, 0.0), mask=row_in)
