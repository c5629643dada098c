"""How a method and its hyperparameters become the numeric arguments of the fused kernels (every backend).

Each family op takes an integer ``code`` and a float list ``params``:

    divergence  code: KD, RKL, JSD, SKEW_FKL, SKEW_RKL, TVD, ABKD
                params: [a, b, log_wp, log_wq, abkd_case]
                jsd: a = beta, log of the mixture weights of p and q; skew_fkl / skew_rkl: a = skew, same;
                abkd: a = alpha, b = beta and which of its five cases applies.
    decoupled   code: the partition: TARGET ({target} | rest), TOPK (teacher top-k | rest), THRESHOLD
                (p_i >= tau max p | rest)
                params: [k, log_tau, three_bins, adaptive, w0, w_strong, w_weak, max_weight]
                three_bins splits the top-k into {top-1} and {top-2..k} (gdkd partitions=3); adaptive makes w0
                the detached min(p_y / q_y, max_weight) (aekt).
"""

from __future__ import annotations

import math

DIVERGENCE_CODES = {"kd": 0, "rkl": 1, "jsd": 2, "skew_fkl": 3, "skew_rkl": 4, "tvd": 5, "abkd": 6}
# abkd cases: alpha, beta, alpha + beta all nonzero / alpha = 0 / beta = 0 / alpha = -beta / alpha = beta = 0.
ABKD_GENERAL, ABKD_ALPHA0, ABKD_BETA0, ABKD_OPPOSITE, ABKD_ZERO = range(5)
TARGET, TOPK, THRESHOLD = range(3)


def divergence_params(method: str, hp: dict) -> tuple[int, list[float]]:
    if method == "jsd" and hp["beta"] in (0, 1):
        method = "kd" if hp["beta"] == 0 else "rkl"  # the TRL/Liger endpoints are exactly the two KLs
    code = DIVERGENCE_CODES[method]
    if method in ("jsd", "skew_fkl"):
        w = hp["beta" if method == "jsd" else "skew"]
        return code, [w, 0.0, math.log(w), math.log1p(-w), 0.0]
    if method == "skew_rkl":
        w = hp["skew"]
        return code, [w, 0.0, math.log1p(-w), math.log(w), 0.0]
    if method == "abkd":
        a, b = hp["alpha"], hp["beta"]
        if a == 0:
            case = ABKD_ZERO if b == 0 else ABKD_ALPHA0
        else:
            case = ABKD_BETA0 if b == 0 else ABKD_OPPOSITE if a + b == 0 else ABKD_GENERAL
        return code, [a, b, 0.0, 0.0, float(case)]
    return code, [0.0] * 5


def decoupled_params(method: str, hp: dict) -> tuple[int, list[float]]:
    k, log_tau, three, adaptive, max_weight = 0, 0.0, 0, 0, 0.0
    if method == "dkd":
        code, w0, ws, ww = TARGET, hp["alpha"], 0.0, hp["beta"]
    elif method == "aekt":
        code, w0, ws, ww, adaptive, max_weight = TARGET, 0.0, 0.0, hp["beta"], 1, hp["max_weight"]
    elif method == "gdkd":
        code, k, three, w0, ws, ww = TOPK, hp["k"], int(hp["partitions"] == 3), hp["w0"], hp["w1"], hp["w2"]
    elif method == "cakd":
        code = {"target": TARGET, "topk": TOPK, "threshold": THRESHOLD}[hp["strong"]]
        w0, ws, ww = hp["bcd_weight"], hp["alpha"], hp["beta"]
        k = hp["k"] if code == TOPK else 0
        log_tau = math.log(hp["tau"])
    else:
        raise ValueError(f"not a decoupled-family method: {method!r}")
    return code, [float(k), log_tau, float(three), float(adaptive), w0, ws, ww, max_weight]
