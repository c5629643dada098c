"""An independent float64 NumPy implementation of the definitions (docs/losses.md), with the gradients written out.

kdkernels.backends.reference gets its gradients from autograd; this file uses the closed-form gradients of
docs/losses.md, one row at a time, on the classes that are not masked in both inputs. Agreement of the two checks both
the reference and the formulas. Tests compare every backend against it.
"""

from __future__ import annotations

import math

import numpy as np

# bdkd's entropies count as equal within BDKD_TIE eps (1 + H(p) + H(q)), eps the machine epsilon of the math type.
BDKD_TIE = 256.0


def _times(q, x):
    """q x with 0 where q = 0 (x may be infinite there: log q = -inf)."""
    with np.errstate(invalid="ignore"):
        return np.where(q == 0, 0.0, q * x)


def _weighted(weight, term):
    """weight * term, exactly 0 when the weight is 0 (whatever the term: inf and NaN too)."""
    return 0.0 if weight == 0 else weight * term


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x) if x.size else -np.inf
    if not np.isfinite(m):
        return m
    return float(m + np.log(np.sum(np.exp(x - m))))


def _xlogy_ratio(a: np.ndarray, log_a: np.ndarray, log_b: np.ndarray) -> np.ndarray:
    """a * (log a - log b) with 0 where a == 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(a == 0, 0.0, a * (log_a - log_b))


def _divergence(method: str, p, q, lp, lq, hp, temperature, eps):
    """(loss, gradient over these classes) of one row, before T^2; eps: the machine epsilon of the math type."""
    T = temperature
    if method == "jsd" and hp["beta"] == 0:
        method = "kd"
    if method == "jsd" and hp["beta"] == 1:
        method = "rkl"
    if method == "kd":
        loss = _xlogy_ratio(p, lp, lq).sum()
        return loss, (q - p) / T
    if method == "rkl":
        loss = _xlogy_ratio(q, lq, lp).sum()
        return loss, _times(q, lq - lp - loss) / T
    if method == "jsd":
        b = hp["beta"]
        lm = np.log(b * p + (1 - b) * q)
        loss = b * _xlogy_ratio(p, lp, lm).sum() + (1 - b) * _xlogy_ratio(q, lq, lm).sum()
        d = (1 - b) * _xlogy_ratio(q, lq, lm)
        return loss, (d - q * d.sum()) / T
    if method == "skew_fkl":
        lam = hp["skew"]
        m = lam * p + (1 - lam) * q
        G = -(1 - lam) * p / m
        return _xlogy_ratio(p, lp, np.log(m)).sum(), q * (G - (q * G).sum()) / T
    if method == "skew_rkl":
        lam = hp["skew"]
        m = (1 - lam) * p + lam * q
        G = lq - np.log(m) + 1 - lam * q / m
        return _xlogy_ratio(q, lq, np.log(m)).sum(), _times(q, G - _times(q, G).sum()) / T
    if method == "wsd":  # (1 - lam) KL(p || q) + lam KL(q || p)
        lam = hp["lam"]
        forward, reverse = _xlogy_ratio(p, lp, lq).sum(), _xlogy_ratio(q, lq, lp).sum()
        grad = _weighted(1 - lam, q - p) + _weighted(lam, _times(q, lq - lp - reverse))
        return _weighted(1 - lam, forward) + _weighted(lam, reverse), grad / T
    if method == "bdkd":  # 3 KL(p || q) + KL(q || p) if H(p) > H(q), KL(p || q) + 3 KL(q || p) if H(q) > H(p)
        entropy_p, entropy_q = -_xlogy_ratio(p, lp, 0 * lp).sum(), -_xlogy_ratio(q, lq, 0 * lq).sum()
        # (equal within BDKD_TIE eps (1 + H(p) + H(q)), eps that of the math type: weights 1 and 1)
        gap = entropy_p - entropy_q
        gap = 0.0 if abs(gap) <= BDKD_TIE * eps * (1 + entropy_p + entropy_q) else gap
        w_f, w_r = (3.0 if gap > 0 else 1.0), (3.0 if gap < 0 else 1.0)
        forward, reverse = _xlogy_ratio(p, lp, lq).sum(), _xlogy_ratio(q, lq, lp).sum()
        grad = _weighted(w_f, q - p) + _weighted(w_r, _times(q, lq - lp - reverse))
        return _weighted(w_f, forward) + _weighted(w_r, reverse), grad / T
    if method == "akl":  # wutaiqiang/LLM_KD_AKL: head = sorted p with cumsum <= mu, and the top one; ties: lower index
        order = np.argsort(-p, kind="stable")
        head = np.zeros(p.size, bool)
        head[order] = np.cumsum(p[order]) <= hp["mu"]
        head[order[0]] = True
        gap = np.abs(p - q)
        g_head, g_tail = gap[head].sum(), gap[~head].sum()
        w_f, w_r = (g_head / (g_head + g_tail), g_tail / (g_head + g_tail)) if g_head + g_tail > 0 else (0.5, 0.5)
        forward, reverse = _xlogy_ratio(p, lp, lq).sum(), _xlogy_ratio(q, lq, lp).sum()
        grad = _weighted(w_f, q - p) + _weighted(w_r, _times(q, lq - lp - reverse))
        return _weighted(w_f, forward) + _weighted(w_r, reverse), grad / T
    if method == "tvd":
        G = 0.5 * np.sign(q - p)
        return 0.5 * np.abs(p - q).sum(), q * (G - (q * G).sum()) / T
    if method == "abkd":
        a, b = hp["alpha"], hp["beta"]
        pa, qb = np.exp(a * lp), np.exp(b * lq)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if a != 0 and b != 0 and a + b != 0:
                terms = -(pa * qb - a / (a + b) * np.exp((a + b) * lp) - b / (a + b) * np.exp((a + b) * lq)) / (a * b)
            elif a == 0 and b != 0:  # q^b log(q^b / p^b): 0 where q^b = 0
                terms = (_xlogy_ratio(qb, b * lq, b * lp) - qb + np.exp(b * lp)) / b**2
            elif b == 0 and a != 0:
                terms = (_xlogy_ratio(pa, a * lp, a * lq) - pa + np.exp(a * lq)) / a**2
            elif a != 0:  # log(q^a / p^a) + p^a / q^a - 1, in the log domain (q^a may underflow where p^a does not)
                terms = (a * (lq - lp) + np.exp(a * (lp - lq)) - 1) / a**2
            else:
                terms = 0.5 * (lp - lq) ** 2
        # The divergence is >= 0: a class masked in one model only whose formula is inf - inf contributes +inf.
        loss = np.where(np.isnan(terms) & (np.isneginf(lp) | np.isneginf(lq)), np.inf, terms).sum()
        if a != 0:
            r = (np.exp((a + b) * lq) - pa * qb) / a
        elif b != 0:
            r = _xlogy_ratio(qb, lq, lp)
        else:
            r = lq - lp
        return loss, (r - q * r.sum()) / T
    raise AssertionError(method)


def _partition(method, y, hp, label):
    """Bin index per class (over these classes), and the bin weights (w0, [w_m])."""
    v = y.size
    order = np.argsort(-y, kind="stable")  # teacher ranking, ties to the lower index
    bins = np.ones(v, dtype=int)
    if method in ("dkd", "aekt") or (method == "cakd" and hp["strong"] == "target"):
        if label is not None:  # (None: the label is masked in both logits, the strong bin empty)
            bins[label] = 0
    elif method == "cakd" and hp["strong"] == "threshold":
        p = np.exp(y - y.max())
        bins[p >= hp["tau"] * p.max()] = 0
    elif method == "gdkd" and hp["partitions"] == 3:
        bins[:] = 2
        bins[order[1 : hp["k"]]] = 1
        bins[order[0]] = 0
    elif method == "gdkd" and hp["strategy"] == "worst":  # the k smallest finite, ties to the lower index
        bins[np.argsort(np.where(np.isneginf(y), np.inf, y), kind="stable")[: hp["k"]]] = 0
    else:
        bins[order[: hp["k"]]] = 0
    if method == "dkd":
        weights = (hp["alpha"], [0.0, hp["beta"]])
    elif method == "gdkd":
        weights = (hp["w0"], [hp["w1"], hp["w2"]] if hp["partitions"] == 2 else [0.0, hp["w1"], hp["w2"]])
    elif method == "cakd":
        weights = (hp["bcd_weight"], [hp["alpha"], hp["beta"]])
    else:  # aekt: a_r = min(p_y / q_y, max_weight), a constant for the gradient
        weights = (None, [0.0, hp["beta"]])
    return bins, weights


def _decoupled(method, p, q, lp, lq, y, hp, temperature, label, tiny):
    """(loss, gradient over these classes) of one row, before T^2; tiny: the least normal number of the math type."""
    T = temperature
    bins, (w0, wm) = _partition(method, y, hp, label)
    # The in-bin divergence: gdkd's kl_type weighs KL(p^b || q^b) and KL(q^b || p^b) (ZaberKo/GDKD: "both" = mean).
    fw, rw = {"forward": (1.0, 0.0), "reverse": (0.0, 1.0), "both": (0.5, 0.5)}[hp.get("kl_type", "forward")]
    if w0 is None:  # aekt: a = min(p_y / q_y, max_weight), and 0 where p_y = 0 (the label masked in both too)
        w0 = 0.0 if label is None or lp[label] == -np.inf else min(math.exp(lp[label] - lq[label]), hp["max_weight"])
    loss = 0.0
    grad = np.zeros_like(q)
    for m, w in enumerate(wm):
        member = bins == m
        if not member.any():
            continue
        lP, lQ = _logsumexp(lp[member]), _logsumexp(lq[member])
        has_p, has_q = not np.isneginf(lP), not np.isneginf(lQ)  # (mass, if only e^-10000; NaN propagates)
        P, Q = math.exp(lP), math.exp(lQ)
        if P < tiny and Q < tiny:  # (underflowed in both, or in one and masked in the other: as if masked in both)
            continue
        with np.errstate(invalid="ignore", divide="ignore"):  # (a bin one model gives no mass: its terms below)
            lpm, lqm = lp[member] - lP, lq[member] - lQ
            pm, qm = np.exp(lpm), np.exp(lqm)
        # A model that gives a bin no mass where the other does: the in-bin KL against it is infinite.
        fkl = (_xlogy_ratio(pm, lpm, lqm).sum() if has_q else np.inf) if fw and has_p else 0.0
        rkl = (_xlogy_ratio(qm, lqm, lpm).sum() if has_p else np.inf) if rw and has_q else 0.0
        loss += _weighted(w0, P * (lP - lQ) if has_p else 0.0) + _weighted(w, _weighted(fw, fkl) + _weighted(rw, rkl))
        # d KL(q^b || p^b) / d x_j = q^b_j (log q^b_j - log p^b_j - KL(q^b || p^b)) for j in the bin
        reverse = np.where(qm > 0, qm * (lqm - lpm - rkl), 0.0) if rw else 0.0
        forward = fw * (qm - pm) if has_p else 0.0  # (a bin without teacher mass has in-bin KL 0: no gradient)
        grad[member] = (w0 * (Q - P) * qm + w * (forward + rw * reverse)) / T
    return loss, grad


def _zscore(x):
    """Logit standardization of one row as Sun et al.'s code writes it, (x - mean) / (std + 1e-7) with Bessel's
    correction, over the classes that are not -inf (std 0 with one class); and the vector-Jacobian product
    G -> G^T dz/dx of it, from dz_j/dx_k = (delta_jk - 1/n) / sd - (x_j - m)(x_k - m) / (sd^2 (n - 1) std)."""
    finite = ~np.isneginf(x)
    n = int(finite.sum())
    z = np.full_like(x, -np.inf)
    if n == 0:
        return z, lambda g: np.zeros_like(g)
    c = x[finite] - x[finite].mean()
    std = np.sqrt((c * c).sum() / (n - 1)) if n > 1 else 0.0
    sd = std + 1e-7
    z[finite] = c / sd

    def vjp(g):
        out = np.zeros_like(g)
        gf = g[finite]
        out[finite] = (gf - gf.mean()) / sd - (c * (gf @ c) / (sd * sd * (n - 1) * std) if std > 0 else 0.0)
        return out

    return z, vjp


def oracle(
    method,
    student,
    teacher,
    target,
    hp,
    temperature,
    t2_scale,
    reduction="batchmean",
    ignore_index=-100,
    normalizer=None,
    grad_output=1.0,
    ce_weight=0.0,
    distill_weight=1.0,
    standardize=False,
    label_smoothing=0.0,
    float64_math=False,
):
    """Loss (reduced as asked) and d(grad_output . loss)/d student, both float64 NumPy arrays, of
    distill_weight * (the method's loss) + ce_weight * (the student's cross-entropy against target at T = 1,
    label-smoothed by ``label_smoothing``), a term of weight 0 left out (0 whatever its value); ``standardize``: the
    method's loss on both rows' z-scores (_zscore). ``float64_math``: the backends compute in float64 (an input is
    float64), else float32: a probability below the least normal number of that type underflows (is 0), and bdkd's
    tie is within its epsilon.

    student, teacher: arrays [..., V]; target: integer array [...] or None; grad_output: a number, or for
    reduction="none" an array of the leading shape.
    """
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    lead, v = s.shape[:-1], s.shape[-1]
    s, t = s.reshape(-1, v), t.reshape(-1, v)
    n = s.shape[0]
    labels = None if target is None else np.asarray(target).reshape(-1)
    valid = np.ones(n, bool) if labels is None else labels != ignore_index
    math_type = np.finfo(np.float64 if float64_math else np.float32)
    rows = np.zeros(n)
    grads = np.zeros((n, v))
    for r in range(n):
        if not valid[r]:
            continue
        if not (np.isneginf(s[r]) & np.isneginf(t[r])).all() and standardize:
            (zs, vjp), (zt, _) = _zscore(s[r]), _zscore(t[r])
        else:
            zs, zt, vjp = s[r], t[r], None
        x, y = zs / temperature, zt / temperature
        keep = ~(np.isneginf(x) & np.isneginf(y))
        with np.errstate(invalid="ignore"):  # (NaN for a row masked in one model only)
            lq_all, lp_all = x - _logsumexp(x), y - _logsumexp(y)
        divergence = method in ("kd", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "abkd", "wsd", "bdkd", "akl")
        if divergence:  # a class whose probabilities underflow in both models is left out like a masked one
            keep &= ~((np.exp(lq_all) < math_type.tiny) & (np.exp(lp_all) < math_type.tiny))
        lq, lp = lq_all[keep], lp_all[keep]
        p, q = np.exp(lp), np.exp(lq)
        if not keep.any():  # (masked in both logits: 0)
            loss, grad = 0.0, np.zeros(0)
        elif divergence:
            loss, grad = _divergence(method, p, q, lp, lq, hp, temperature, float(math_type.eps))
        else:
            label = None
            if labels is not None and keep[labels[r]]:
                label = int(np.cumsum(keep)[labels[r]] - 1)
            loss, grad = _decoupled(method, p, q, lp, lq, y[keep], hp, temperature, label, float(math_type.tiny))
        scale = temperature**2 if t2_scale else 1.0
        rows[r] = _weighted(distill_weight, loss * scale)
        grads[r, keep] = _weighted(distill_weight, grad * scale)
        if vjp is not None and distill_weight != 0:  # (weight 0: the gradient 0, whatever the z-scores)
            grads[r] = vjp(grads[r])
        if ce_weight and not (np.isneginf(s[r]) & np.isneginf(t[r])).all():  # (not a row masked in both)
            ce, ce_grad = _cross_entropy(s[r], labels[r], label_smoothing)
            rows[r] += ce_weight * ce
            grads[r] += ce_weight * ce_grad
    return _reduced(rows, grads, lead, valid, reduction, normalizer, grad_output)


def _cross_entropy(x: np.ndarray, label: int, eps: float = 0.0) -> tuple[float, np.ndarray]:
    """-log softmax(x)_y at T = 1 with label smoothing eps: (1 - eps) of it plus eps times the mean of -log softmax(x)
    over the K classes that are not -inf; its gradient softmax(x) - (1 - eps) onehot(y) - eps / K [unmasked]. (Taken
    on x less its max: the same values, without the rounding of a logsumexp near a logit of 1000.)"""
    top = np.max(x)
    x = x - top if np.isfinite(top) else x
    lse = _logsumexp(x)
    unmasked = ~np.isneginf(x)
    k = unmasked.sum()
    onehot = np.arange(x.size) == label
    smoothed = eps * (lse - x[unmasked].sum() / k) if eps else 0.0
    return (1 - eps) * (lse - x[label]) + smoothed, np.exp(x - lse) - (1 - eps) * onehot - eps / k * unmasked


def _reduced(rows, grads, lead, valid, reduction, normalizer, grad_output):
    """(the loss reduced as asked, d(grad_output . loss)/d input) from the row losses [n] and each row's gradient
    [n, ...]: the leading shape restored."""
    n = rows.size
    if reduction == "none":
        go = np.broadcast_to(np.asarray(grad_output, dtype=np.float64).reshape(-1), (n,))
        return rows.reshape(lead), (grads * go.reshape(n, *[1] * (grads.ndim - 1))).reshape(*lead, *grads.shape[1:])
    denom = 1.0
    if reduction == "batchmean":
        denom = float(normalizer) if normalizer is not None else max(1, int(valid.sum()))
    return np.float64(rows.sum() / denom), (grads * grad_output / denom).reshape(*lead, *grads.shape[1:])


# ---- cross-tokenizer losses (docs/losses.md, section 11) ---------------------------------------------------------


def _sorted_l1(q: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    """(sum_i |q_(i) - p_(i)|, dl/dq per class): both sorted descending, the shorter zero-padded; the student's ties
    ranked lower index first (a stable argsort of -q), sign(0) = 0."""
    order = np.argsort(-q, kind="stable")
    n = max(q.size, p.size)
    qs, ps = np.zeros(n), np.zeros(n)
    qs[: q.size], ps[: p.size] = q[order], np.sort(p)[::-1]
    diff = qs - ps
    grad = np.empty(q.size)
    grad[order] = np.sign(diff[: q.size])
    return float(np.abs(diff).sum()), grad


def _matched_terms(lp: np.ndarray, lq: np.ndarray, beta: float) -> tuple[float, np.ndarray]:
    """(sum of the generalized JSD terms J(p~_b, q~_a) over the pairs, r = q~ dl/dq~ per pair) from the pairs' log
    probabilities; TRL's endpoints: beta = 0 is p log(p / q), beta = 1 is q log(q / p)."""
    p, q = np.exp(lp), np.exp(lq)
    if beta == 0:
        return _xlogy_ratio(p, lp, lq).sum(), -p
    if beta == 1:
        with np.errstate(invalid="ignore"):
            return _xlogy_ratio(q, lq, lp).sum(), np.where(q == 0, 0.0, q * (lq - lp + 1))
    lm = np.logaddexp(lp + np.log(beta), lq + np.log1p(-beta))
    loss = beta * _xlogy_ratio(p, lp, lm).sum() + (1 - beta) * _xlogy_ratio(q, lq, lm).sum()
    with np.errstate(invalid="ignore"):
        return loss, np.where(q == 0, 0.0, (1 - beta) * q * (lq - lm))


def _cross_vocab_row(method, lq, lp, pairs, hp):
    """(loss, r = q~ dl/dq~ over the student's classes) of one row from its log q~ [Vs] and log p~ [Vt]."""
    q, p = np.exp(lq), np.exp(lp)
    if method == "uld":
        loss, grad = _sorted_l1(q, p)
        return loss, q * grad
    a, b = pairs
    matched_loss, r_matched = _matched_terms(lp[b], lq[a], hp["beta"])
    w_m, w_u = hp["matched_weight"], hp["unmatched_weight"]
    if w_m is None:
        w_m = a.size / lp.size
        w_u = 1 - w_m
    r = np.zeros(q.size)
    r[a] = w_m * r_matched
    free_s, free_t = np.setdiff1d(np.arange(q.size), a), np.setdiff1d(np.arange(p.size), b)
    unmatched = 0.0
    if free_s.size and free_t.size:
        unmatched, grad = _sorted_l1(q[free_s], p[free_t])
        r[free_s] = w_u * q[free_s] * grad
    return w_m * matched_loss + w_u * unmatched, r


def _per_row(x, n: int) -> np.ndarray:
    return np.zeros(n) if x is None else np.asarray(x, np.float64).reshape(-1)


def cross_vocab_oracle(
    method,
    student,
    teacher,
    target=None,
    *,
    vocab_map=None,
    beta=0.5,
    matched_weight=None,
    unmatched_weight=None,
    temperature=1.0,
    teacher_temperature=None,
    student_log_scale=None,
    teacher_log_scale=None,
    reduction="batchmean",
    ignore_index=-100,
    normalizer=None,
    grad_output=1.0,
    ce_weight=0.0,
    distill_weight=1.0,
    mask=None,
):
    """(loss, d(grad_output . loss)/d student, the same for student_log_scale) of ``method`` ("uld" or "hybrid") on
    student [..., Vs] and teacher [..., Vt], float64, with the closed-form gradients of docs/losses.md section 11:
    r = q~ dl/dq~, g = (r - q sum r) / T_s, dl/dc_s = sum r. ``vocab_map``: (student ids, teacher ids)."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    lead, vs = s.shape[:-1], s.shape[-1]
    s, t = s.reshape(-1, vs), t.reshape(-1, t.shape[-1])
    n = s.shape[0]
    scales = [_per_row(c, n) for c in (student_log_scale, teacher_log_scale)]
    labels = None if target is None else np.asarray(target).reshape(-1)
    valid = np.ones(n, bool) if labels is None else labels != ignore_index
    if mask is not None:
        valid &= np.asarray(mask).reshape(-1) != 0
    pairs = None if vocab_map is None else tuple(np.asarray(ids, np.int64) for ids in vocab_map)
    hp = {"beta": beta, "matched_weight": matched_weight, "unmatched_weight": unmatched_weight}
    T_s, T_t = temperature, temperature if teacher_temperature is None else teacher_temperature
    rows, grads, scale_grads = np.zeros(n), np.zeros((n, vs)), np.zeros(n)
    for i in range(n):
        if not valid[i] or (np.isneginf(s[i]).all() and np.isneginf(t[i]).all()):
            continue
        x, y = s[i] / T_s, t[i] / T_t
        lq_norm = x - _logsumexp(x)
        loss, r = _cross_vocab_row(method, lq_norm + scales[0][i], y - _logsumexp(y) + scales[1][i], pairs, hp)
        rows[i] = distill_weight * loss
        grads[i] = distill_weight * (r - np.exp(lq_norm) * r.sum()) / T_s
        scale_grads[i] = distill_weight * r.sum()
        if ce_weight:
            ce, ce_grad = _cross_entropy(s[i], labels[i])
            rows[i] += ce_weight * ce
            grads[i] += ce_weight * ce_grad
    options = (valid, reduction, normalizer, grad_output)
    loss, grad = _reduced(rows, grads, lead, *options)
    return loss, grad, _reduced(rows, scale_grads, lead, *options)[1]
