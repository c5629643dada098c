"""Triton kernel of the divergence family: kd, rkl, jsd, skew_fkl, skew_rkl, tvd, abkd (LOSSES.md).

Math. With x = s / T, y = t / T, log q = log_softmax(x), log p = log_softmax(y), every method is a per-class term
l_k (the row loss is l = sum_k l_k) and, writing G_k = dl/dq_k, a term r_k = q_k G_k, so that

    g_j = dl/ds_j = (r_j - q_j * sum_k r_k) / T.

    kd        l_k = p (log p - log q)                      r_k = -p            (sum r = -1: no extra pass)
    rkl       l_k = q (log q - log p)                      r_k = l_k
    jsd       m = beta p + (1-beta) q (in log space)
              l_k = beta p (log p - log m) + (1-beta) q (log q - log m),   r_k = (1-beta) q (log q - log m)
    skew_fkl  m = lam p + (1-lam) q,  l_k = p (log p - log m),             r_k = -(1-lam) p q / m
    skew_rkl  m = (1-lam) p + lam q,  l_k = q (log q - log m),             r_k = l_k + q - lam q^2 / m
    tvd       l_k = |p - q| / 2,                                           r_k = q sign(q - p) / 2, sign(0) = 0
    abkd      the five alpha/beta cases of LOSSES.md, powers in the log domain (p^a q^b = exp(a log p + b log q)).

A class with both logits -inf contributes 0; a term a (log a - log b) with a = 0 is 0.

Passes. A row that fits one tile is loaded once. A longer row streams: (A) online max / sum of x and y,
(B, walking back so the freshest tiles are still in L2) sum of l_k and r_k, (C) the gradient. kd knows sum r and
folds its loss into (C); rkl gets l = sum r in (A) from kq = sum exp(x - mx) ((x - mx) - (y - my)), re-based
when a max moves (l = kq / zx - log zx + log zy); both read the row twice.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, load_scaled, log_softmax_tile, logaddexp, online_lse, safe_max, store_rows

@triton.jit
def _abkd_terms(lp, lq, a, b, CASE: tl.constexpr):
    if CASE == 0:
        ab = a + b
        mixed = tl.exp(a * lp + b * lq)
        loss = -(mixed - a / ab * tl.exp(ab * lp) - b / ab * tl.exp(ab * lq)) / (a * b)
        r = (tl.exp(ab * lq) - mixed) / a
    elif CASE == 1:
        qb = tl.exp(b * lq)
        loss = (qb * b * (lq - lp) - qb + tl.exp(b * lp)) / (b * b)
        r = qb * (lq - lp)
    elif CASE == 2:
        pa = tl.exp(a * lp)
        loss = (pa * a * (lp - lq) - pa + tl.exp(a * lq)) / (a * a)
        r = (tl.exp(a * lq) - pa) / a
    elif CASE == 3:
        ratio = tl.exp(a * (lp - lq))
        loss = (a * (lq - lp) + ratio - 1.0) / (a * a)
        r = (1.0 - ratio) / a
    else:
        loss = 0.5 * (lp - lq) * (lp - lq)
        r = lq - lp
    return loss, r


@triton.jit
def _terms(x, y, mx, lzx, my, lzy, a, b, lwp, lwq, METHOD: tl.constexpr, ABKD_CASE: tl.constexpr):
    """Per-class (l_k, r_k, q_k) of a tile, from the row statistics (max, log-sum) of x and y."""
    absent = (x == NEG_INF) & (y == NEG_INF)
    lq = tl.where(absent, 0.0, log_softmax_tile(x, mx, lzx))
    lp = tl.where(absent, 0.0, log_softmax_tile(y, my, lzy))
    q = tl.exp(lq)
    p = tl.exp(lp)
    if METHOD == 0:  # kd
        loss = tl.where(lp == NEG_INF, 0.0, p * (lp - lq))
        r = -p
    elif METHOD == 1:  # rkl
        loss = tl.where(lq == NEG_INF, 0.0, q * (lq - lp))
        r = loss
    elif METHOD == 2:  # jsd, a = beta
        lm = logaddexp(lp + lwp, lq + lwq)
        r = (1.0 - a) * tl.where(lq == NEG_INF, 0.0, q * (lq - lm))
        loss = a * tl.where(lp == NEG_INF, 0.0, p * (lp - lm)) + r
    elif METHOD == 3:  # skew_fkl, a = lambda
        lm = logaddexp(lp + lwp, lq + lwq)
        loss = tl.where(lp == NEG_INF, 0.0, p * (lp - lm))
        r = -(1.0 - a) * tl.exp(lp + lq - lm)
    elif METHOD == 4:  # skew_rkl, a = lambda
        lm = logaddexp(lp + lwp, lq + lwq)
        loss = tl.where(lq == NEG_INF, 0.0, q * (lq - lm))
        r = loss + q - a * tl.exp(2.0 * lq - lm)
    elif METHOD == 5:  # tvd
        loss = 0.5 * tl.abs(p - q)
        r = 0.5 * q * tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
    else:
        loss, r = _abkd_terms(lp, lq, a, b, ABKD_CASE)
    return tl.where(absent, 0.0, loss), tl.where(absent, 0.0, r), tl.where(absent, 0.0, q)


@triton.jit
def _store_grad(grad_ptr, rows64, g_stride, row_in, valid, cols, V, r, q, sum_r, scale):
    g = (r - q * sum_r[:, None]) * scale[:, None]
    store_rows(grad_ptr, rows64, g_stride, row_in, cols, V, tl.where(valid[:, None], g, 0.0))


@triton.jit
def divergence_kernel(
    s_ptr, t_ptr, target_ptr, denom_ptr, loss_ptr, grad_ptr,
    N, V, s_stride, t_stride, g_stride, ignore_index,
    temperature, t2, a, b, lwp, lwq,
    METHOD: tl.constexpr, ABKD_CASE: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_DENOM: tl.constexpr,
    WITH_GRAD: tl.constexpr, SINGLE_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    valid = row_in
    if HAS_TARGET:
        valid = valid & (tl.load(target_ptr + rows, mask=row_in, other=ignore_index) != ignore_index)
    rows64 = rows.to(tl.int64)
    # Gradient factor: 1/T from the softmax, T^2 if asked, 1/denominator for batchmean (read on device).
    g_scale = tl.zeros([BLOCK_N], tl.float32) + t2 / temperature
    if HAS_DENOM:
        g_scale = g_scale / tl.load(denom_ptr)
    mx = tl.full([BLOCK_N], NEG_INF, tl.float32)
    my = tl.full([BLOCK_N], NEG_INF, tl.float32)
    zx = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    sum_l = tl.zeros([BLOCK_N], tl.float32)
    sum_r = tl.zeros([BLOCK_N], tl.float32)
    cols0 = tl.arange(0, BLOCK_V)
    if SINGLE_TILE:
        x = load_scaled(s_ptr, rows64, s_stride, valid, cols0, V, temperature)
        y = load_scaled(t_ptr, rows64, t_stride, valid, cols0, V, temperature)
        mx, zx = online_lse(mx, zx, x)
        my, zy = online_lse(my, zy, y)
        loss, r, q = _terms(x, y, mx, tl.log(zx), my, tl.log(zy), a, b, lwp, lwq, METHOD, ABKD_CASE)
        sum_l = tl.sum(loss, axis=1)
        sum_r = tl.sum(r, axis=1)
        if METHOD == 0:
            sum_r = tl.full([BLOCK_N], -1.0, tl.float32)
        if WITH_GRAD:
            _store_grad(grad_ptr, rows64, g_stride, row_in, valid, cols0, V, r, q, sum_r, g_scale)
    else:
        # rkl: kq = sum exp(x - mx) ((x - mx) - (y - my)), re-based as the maxes move, gives l in this pass.
        kq = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, V, BLOCK_V):
            x = load_scaled(s_ptr, rows64, s_stride, valid, start + cols0, V, temperature)
            y = load_scaled(t_ptr, rows64, t_stride, valid, start + cols0, V, temperature)
            if METHOD == 1:
                sx = safe_max(tl.maximum(mx, tl.max(x, axis=1)))
                sy = safe_max(tl.maximum(my, tl.max(y, axis=1)))
                e = tl.exp(x - sx[:, None])
                d = tl.where(x == NEG_INF, 0.0, e * ((x - sx[:, None]) - (y - sy[:, None])))
                rescale = tl.exp(mx - sx)
                kq = (kq - zx * ((sx - safe_max(mx)) - (sy - safe_max(my)))) * rescale + tl.sum(d, axis=1)
                zx = zx * rescale + tl.sum(e, axis=1)
                mx = tl.maximum(mx, tl.max(x, axis=1))
            else:
                mx, zx = online_lse(mx, zx, x)
            my, zy = online_lse(my, zy, y)
        lzx = tl.log(zx)
        lzy = tl.log(zy)
        last = tl.cdiv(V, BLOCK_V) - 1
        if METHOD == 0:
            sum_r = sum_r - 1.0
        elif METHOD == 1:
            sum_l = kq / zx - lzx + lzy
            sum_r = sum_l
        else:
            for i in range(0, last + 1):
                cols = (last - i) * BLOCK_V + cols0
                x = load_scaled(s_ptr, rows64, s_stride, valid, cols, V, temperature)
                y = load_scaled(t_ptr, rows64, t_stride, valid, cols, V, temperature)
                loss, r, q = _terms(x, y, mx, lzx, my, lzy, a, b, lwp, lwq, METHOD, ABKD_CASE)
                sum_l += tl.sum(loss, axis=1)
                sum_r += tl.sum(r, axis=1)
        if WITH_GRAD or METHOD == 0:
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                x = load_scaled(s_ptr, rows64, s_stride, valid, cols, V, temperature)
                y = load_scaled(t_ptr, rows64, t_stride, valid, cols, V, temperature)
                loss, r, q = _terms(x, y, mx, lzx, my, lzy, a, b, lwp, lwq, METHOD, ABKD_CASE)
                if METHOD == 0:
                    sum_l += tl.sum(loss, axis=1)
                if WITH_GRAD:
                    _store_grad(grad_ptr, rows64, g_stride, row_in, valid, cols, V, r, q, sum_r, g_scale)
    tl.store(loss_ptr + rows, tl.where(valid, sum_l * t2, 0.0), mask=row_in)
