// The divergence family's codes, named parameters and per-class formulas (docs/losses.md, "Divergence family"), for
// the CPU and CUDA kernels: with x = s / T, y = t / T, log q = (x - max x) - log sum exp(x - max x) and log p
// likewise, each class has a loss term l_k and r_k = q_k dl/dq_k, and
//     l = sum_k l_k,    g_j = (r_j - q_j sum_k r_k) / T.
// bdkd's weights depend on the row's entropies: its l_k and r_k are those of its two KLs, e_k = q log q - p log p, and
// divergence_row() weighs the row sums; its gradient then takes r_j = a r_j + b p_j. A class with p = q = 0 (masked,
// or below float32's range in both) contributes 0.
#pragma once

#include "row_math.h"

// The codes of kdkernels/methods.py Divergence, in its order.
#define KDKERNELS_DIVERGENCE_CODES(X)                                                                          \
  X(KD) X(RKL) X(JSD) X(SKEW_FKL) X(SKEW_RKL) X(TVD) X(ABKD) X(ABKD_ALPHA0) X(ABKD_BETA0) X(ABKD_OPPOSITE) \
  X(ABKD_ZERO) X(WSD) X(BDKD)
// The fields of kdkernels/methods.py DivergenceParams, in its order.
#define KDKERNELS_DIVERGENCE_PARAMS(X) \
  X(T, mix_p) X(T, mix_q) X(T, log_mix_p) X(T, log_mix_q) X(T, alpha) X(T, beta) X(T, w_fkl) X(T, w_rkl)

namespace kdkernels {
inline namespace KDKERNELS_MATH_NAMESPACE {

enum Divergence : int { KDKERNELS_DIVERGENCE_CODES(KDKERNELS_ENUMERATOR) NUM_DIVERGENCES };

KDKERNELS_DEFINE_PARAMS(DivergenceParams, KDKERNELS_DIVERGENCE_PARAMS)

// log(exp(u) + exp(v)), exact for large arguments and 0-safe: both -inf gives -inf.
template <class O>
KD_HD typename O::V log_add_exp(typename O::V u, typename O::V v) {
  using V = typename O::V;
  using T = typename O::Scalar;
  V mx = O::max(u, v);
  V shift = O::select(O::eq(mx, V(neg_inf<T>())), V(T(0)), mx);
  return shift + O::log(O::exp(u - shift) + O::exp(v - shift));
}

// Whether a code's row loss weighs its row sums by weights that depend on them (see divergence_row).
template <int CODE>
constexpr bool weighs_row_sums = CODE == BDKD;

// A class's l_k, r_k, its probabilities and e_k (0 but for bdkd).
template <class V>
struct ClassTerms {
  V l, r, q, p, e;
};

// The terms of the classes of x, y, given each row's max and log-sum: mx, lzx (student) and my, lzy (teacher).
template <int CODE, class O>
KD_HD ClassTerms<typename O::V> divergence_terms(const DivergenceParams<typename O::Scalar>& c, typename O::V x,
                                                 typename O::V y, typename O::V mx, typename O::V lzx,
                                                 typename O::V my, typename O::V lzy) {
  using V = typename O::V;
  using T = typename O::Scalar;
  const V zero(T(0)), ninf(neg_inf<T>());
  // log softmax as (x - m) - log z: exact for large logits.
  V lq = (x - mx) - lzx, lp = (y - my) - lzy;
  const auto absent = O::land(O::eq(lq, ninf), O::eq(lp, ninf));
  lq = O::select(absent, zero, lq);
  lp = O::select(absent, zero, lp);
  const V q = O::exp(lq), p = O::exp(lp);
  V l, r, e = zero;
  const T a = c.alpha, b = c.beta;
  if constexpr (CODE == KD) {
    l = kl_term<O>(p, lp, lq);
    r = zero - p;
  } else if constexpr (CODE == RKL) {
    l = kl_term<O>(q, lq, lp);
    r = l;
  } else if constexpr (CODE == JSD) {
    const V lm = log_add_exp<O>(lp + V(c.log_mix_p), lq + V(c.log_mix_q));
    r = V(c.mix_q) * kl_term<O>(q, lq, lm);
    l = V(c.mix_p) * kl_term<O>(p, lp, lm) + r;
  } else if constexpr (CODE == SKEW_FKL) {
    const V lm = log_add_exp<O>(lp + V(c.log_mix_p), lq + V(c.log_mix_q));
    l = kl_term<O>(p, lp, lm);
    r = zero - V(c.mix_q) * O::exp(lp + lq - lm);
  } else if constexpr (CODE == SKEW_RKL) {
    const V lm = log_add_exp<O>(lp + V(c.log_mix_p), lq + V(c.log_mix_q));
    l = kl_term<O>(q, lq, lm);
    r = l + q - V(c.mix_q) * O::exp(lq + lq - lm);
  } else if constexpr (CODE == TVD) {
    l = V(T(0.5)) * O::abs(p - q);
    const V sign = O::select(O::gt(q, p), V(T(1)), O::select(O::lt(q, p), V(T(-1)), zero));
    r = V(T(0.5)) * q * sign;
  } else if constexpr (CODE == ABKD) {
    const T ab = a + b;
    const V mixed = O::exp(V(a) * lp + V(b) * lq), q_ab = O::exp(V(ab) * lq);
    l = (mixed - V(a / ab) * O::exp(V(ab) * lp) - V(b / ab) * q_ab) * V(T(-1) / (a * b));
    r = (q_ab - mixed) * V(T(1) / a);
  } else if constexpr (CODE == ABKD_ALPHA0) {
    const V qb = O::exp(V(b) * lq);
    l = (qb * V(b) * (lq - lp) - qb + O::exp(V(b) * lp)) * V(T(1) / (b * b));
    r = qb * (lq - lp);
  } else if constexpr (CODE == ABKD_BETA0) {
    const V pa = O::exp(V(a) * lp), qa = O::exp(V(a) * lq);
    l = (pa * V(a) * (lp - lq) - pa + qa) * V(T(1) / (a * a));
    r = (qa - pa) * V(T(1) / a);
  } else if constexpr (CODE == ABKD_OPPOSITE) {
    const V ratio = O::exp(V(a) * (lp - lq));
    l = (V(a) * (lq - lp) + ratio - V(T(1))) * V(T(1) / (a * a));
    r = (V(T(1)) - ratio) * V(T(1) / a);
  } else if constexpr (CODE == ABKD_ZERO) {
    const V d = lp - lq;
    l = V(T(0.5)) * d * d;
    r = lq - lp;
  } else if constexpr (CODE == WSD) {
    const V rkl = kl_term<O>(q, lq, lp);
    l = V(c.w_fkl) * kl_term<O>(p, lp, lq) + V(c.w_rkl) * rkl;
    r = V(c.w_rkl) * rkl - V(c.w_fkl) * p;
  } else {
    static_assert(CODE == BDKD, "a divergence code without a formula");
    l = kl_term<O>(p, lp, lq);
    r = kl_term<O>(q, lq, lp);
    e = kl_term<O>(q, lq, zero) - kl_term<O>(p, lp, zero);
  }
  return {O::select(absent, zero, l), O::select(absent, zero, r), O::select(absent, zero, q),
          O::select(absent, zero, p), O::select(absent, zero, e)};
}

// A row's loss and what its gradient needs: g_j = (a r_j + b p_j - q_j sum_r) * scale.
template <class T>
struct DivergenceRow {
  T loss, a, b, sum_r;
};

// From the row sums of l_k, r_k and e_k. bdkd weighs its KLs by w_fkl where H(p) > H(q) (sum e > 0), by w_rkl where
// H(q) > H(p), else by 1; the weights are constants of the gradient.
template <int CODE, class T>
KD_HD DivergenceRow<T> divergence_row(const DivergenceParams<T>& c, T sum_l, T sum_r, T sum_e) {
  if constexpr (weighs_row_sums<CODE>) {
    const T w_fkl = sum_e > T(0) ? c.w_fkl : T(1), w_rkl = sum_e < T(0) ? c.w_rkl : T(1);
    return {w_fkl * sum_l + w_rkl * sum_r, w_rkl, -w_fkl, w_rkl * sum_r - w_fkl};
  } else {
    return {sum_l, T(1), T(0), CODE == KD ? T(-1) : sum_r};
  }
}

// g_j = (a r_j + b p_j - q_j sum_r) * scale, scale = (1/T) (T^2 if t2_scale) (1/denominator if reduced).
template <int CODE, class O>
KD_HD typename O::V divergence_grad(const ClassTerms<typename O::V>& k, const DivergenceRow<typename O::Scalar>& row,
                                    typename O::Scalar scale) {
  using V = typename O::V;
  const V r = weighs_row_sums<CODE> ? V(row.a) * k.r + V(row.b) * k.p : k.r;
  return (r - k.q * V(row.sum_r)) * V(scale);
}

}  // namespace KDKERNELS_MATH_NAMESPACE
}  // namespace kdkernels
