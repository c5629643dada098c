// The divergence family's codes, named parameters and per-class formulas (docs/losses.md, "Divergence family"), for
// the CPU and CUDA kernels: with x = s / T, y = t / T, log q = (x - max x) - log sum exp(x - max x) and log p
// likewise, each class has a loss term l_k and r_k = q_k dl/dq_k, and
//     l = sum_k l_k,    g_j = (r_j - q_j sum_k r_k) / T.
// bdkd's and akl's weights depend on row sums: their l_k and r_k are those of the two KLs, and e_k, f_k what sets the
// weights (bdkd: e_k = q log q - p log p, f_k = -(q log q + p log p); akl: |p - q| on the teacher's head for e_k, off
// it for f_k); divergence_row() weighs the row sums, and the gradient takes r_j = a r_j + b p_j. A class with
// p = q = 0 (masked, or underflowed: below the least normal number, in both) contributes 0. akl's head (AklHead below)
// is found before the terms, by a radix select.
#pragma once

#include <string.h>

#include "row_math.h"

// The codes of kdkernels/methods.py Divergence, in its order.
// X-macro item lists, laid out by hand:
// clang-format off
#define KDKERNELS_DIVERGENCE_CODES(X)                                                                          \
  X(KD) X(RKL) X(JSD) X(SKEW_FKL) X(SKEW_RKL) X(TVD) X(ABKD) X(ABKD_ALPHA0) X(ABKD_BETA0) X(ABKD_OPPOSITE) \
  X(ABKD_ZERO) X(WSD) X(BDKD) X(AKL)
// The fields of kdkernels/methods.py DivergenceParams, in its order.
#define KDKERNELS_DIVERGENCE_PARAMS(X) \
  X(T, mix_p) X(T, mix_q) X(T, log_mix_p) X(T, log_mix_q) X(T, alpha) X(T, beta) X(T, w_fkl) X(T, w_rkl) X(T, mu)
// clang-format on

namespace kdkernels {
inline namespace KDKERNELS_MATH_NAMESPACE {

enum Divergence : int { KDKERNELS_DIVERGENCE_CODES(KDKERNELS_ENUMERATOR) NUM_DIVERGENCES };

KDKERNELS_DEFINE_PARAMS(DivergenceParams, KDKERNELS_DIVERGENCE_PARAMS)

// The mixture m = mix_p p + mix_q q and its log, from the probabilities, m clamped to the least normal number: where
// both underflow, p and q are 0 and every term that multiplies them stays 0 (never 0 * inf). One log per class.
template <class V>
struct Mixture {
  V m, log_m;
};
template <class O>
KD_HD Mixture<typename O::V> mixture(const DivergenceParams<typename O::Scalar>& c, typename O::V p, typename O::V q) {
  using V = typename O::V;
  const V m = O::floor_at(V(c.mix_p) * p + V(c.mix_q) * q, V(min_normal<typename O::Scalar>()));
  return {m, O::log(m)};
}

// Whether a code's row loss weighs its row sums by weights that depend on them (see divergence_row).
template <int CODE>
constexpr bool weighs_row_sums = CODE == BDKD || CODE == AKL;

// bdkd's entropies count as equal within BDKD_TIE eps (1 + H(p) + H(q)), eps the machine epsilon of the math type
// (kdkernels/methods.py BDKD_TIE; docs/losses.md, "bdkd's tie").
constexpr double BDKD_TIE = 256.0;

template <int CODE>
constexpr bool is_abkd =
    CODE == ABKD || CODE == ABKD_ALPHA0 || CODE == ABKD_BETA0 || CODE == ABKD_OPPOSITE || CODE == ABKD_ZERO;

// A class's l_k, r_k, its probabilities, e_k and f_k (0 but for bdkd and akl), and rt_k = p_k dl/dp_k, the teacher's
// counterpart of r_k (the gradient of the teacher's logits, docs/losses.md "Learnable temperature and the teacher's
// gradient"); bdkd's and akl's rt_k is their forward KL's, l_k + p_k, weighed at the row (divergence_teacher_grad).
template <class V>
struct ClassTerms {
  V l, r, q, p, e, f, rt;
};

// akl's head (docs/losses.md, "AKL"): the classes ranked by raw teacher logit t, descending, ties to the lower index,
// up to the last whose cumulative teacher probability is <= mu, and at least the first. Found without sorting, as
// head = {t > value} + {t == value, index < end}, value = u the least value with A(u) = sum of p over {t > u} <= mu,
// A summed by each kernel in its own fixed order (a bisection over every value would find the same u):
//   (a) a radix select over the order-preserving unsigned keys of the float type, DIGIT_BITS at a time from the top:
//       a histogram of p over the open digit of the classes whose higher digits are those chosen so far, scanned
//       from the top to the digit where the mass crosses mu (3 histograms in float32, 6 in float64). Its sums come
//       in another order than A's, so its value is only a candidate;
//   (b) one pass at the candidate u: A(u), A just below u (the mass of {t >= u}), the number of classes above u and
//       in its tie group, and their (equal) probability p_u. If A(u) <= mu < A(below u), u is the value (settle);
//       else (the two orders' roundings straddle mu) a bisection over the keys on u's correct side finds it (the
//       fallback: one pass per step), and (b) is repeated there. The group's first c = floor((mu - A(u)) / p_u)
//       classes are in the head (at least one if none is above u);
//   (c) when 0 < c < the group's size, bisection on the class index for the end of its c-th class (one counting
//       pass per step).
template <class T>
struct AklHead {
  using Key = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static constexpr Bits MAGNITUDE = ~Bits(0) >> 1;
  static constexpr int KEY_BITS = 8 * sizeof(T), DIGIT_BITS = 11, BINS = 1 << DIGIT_BITS;

  static KD_HD Key key(T value) {  // order-preserving: negative floats' magnitude bits flipped
    Key k;
    memcpy(&k, &value, sizeof k);
    return k < 0 ? Key(Bits(k) ^ MAGNITUDE) : k;
  }
  static KD_HD T value_of(Key k) {
    k = k < 0 ? Key(Bits(k) ^ MAGNITUDE) : k;
    T out;
    memcpy(&out, &k, sizeof out);
    return out;
  }
  // The key as unsigned bits in the same order (the radix select's digits).
  static KD_HD Bits radix_key(T value) { return Bits(key(value)) ^ ~MAGNITUDE; }

  // (a) The digits chosen so far (the key's bits above `shift`), and the histograms' mass of the classes above them.
  Bits prefix = 0;
  int shift = KEY_BITS;
  T mass_above = T(0);
  KD_HD bool selecting() const { return shift > 0; }
  KD_HD int digit_shift() const { return shift > DIGIT_BITS ? shift - DIGIT_BITS : 0; }
  KD_HD int digits() const { return 1 << (shift - digit_shift()); }  // the open digit's values (histogram bins)
  KD_HD bool in_prefix(Bits u) const { return shift == KEY_BITS || (u >> shift) == prefix; }
  KD_HD int digit(Bits u) const { return int((u >> digit_shift()) & Bits(digits() - 1)); }
  // The least and greatest values with the chosen digits (a range that also holds +0.0 when it holds -0.0).
  KD_HD T range_value(bool top) const {
    const Bits low = shift == KEY_BITS ? Bits(0) : prefix << shift;
    const Bits u = top ? low | (shift == KEY_BITS ? ~Bits(0) : (Bits(1) << shift) - 1) : low;
    return value_of(Key(clamped(u) ^ ~MAGNITUDE));
  }
  // Chooses the open digit from the histogram mass[digits()] of the classes within the prefix: the digit d where the
  // mass from the top crosses mu (the lowest if it never does).
  KD_HD void choose(const T* mass, T mu) {
    int d = digits() - 1;
    T above = mass_above;
    for (; d > 0 && !(above + mass[d] > mu); --d) above += mass[d];
    take(d, above);
  }
  // Takes digit d, the mass of the classes above it being `above`.
  KD_HD void take(int d, T above) {
    prefix = (prefix << (shift - digit_shift())) | Bits(d);
    shift = digit_shift();
    mass_above = above;
  }
  // The selected value, within [-inf, inf], -0.0 for a zero (the least key of the tie group {t == 0}, which a
  // bisection would find).
  KD_HD T candidate() const {
    const T u = value_of(Key(clamped(prefix) ^ ~MAGNITUDE));
    return u == T(0) ? -T(0) : u;
  }
  static KD_HD Bits clamped(Bits u) {  // (NaN keys lie beyond the infinities)
    const Bits lowest = radix_key(neg_inf<T>()), highest = radix_key(-neg_inf<T>());
    return u < lowest ? lowest : (u > highest ? highest : u);
  }

  // (b) Whether u, with A(u) = mass_above_u and A(below u) = mass_from_u, is the value; if not, the fallback's
  // bracket on its correct side.
  KD_HD void settle(T u, T mass_above_u, T mass_from_u, T mu) {
    const Key k = key(u);
    const bool low = mass_above_u <= mu, low_below = k != key(neg_inf<T>()) && mass_from_u <= mu;  // (as narrow)
    if (low && !low_below) {
      lo = Key(k - 1);
      hi = k;
    } else if (low) {
      hi = Key(k - 1);
    } else {
      lo = k;
    }
  }

  // The fallback's bisection: A(lo) > mu (lo starts below -inf), A(hi) <= mu (nothing is above +inf); every probe is
  // a value in [-inf, inf).
  Key lo = Key(key(neg_inf<T>()) - 1), hi = key(-neg_inf<T>());
  KD_HD Key mid() const { return Key(Bits(lo) + (Bits(hi) - Bits(lo)) / 2); }
  KD_HD bool searching() const { return Bits(hi) - Bits(lo) > 1; }
  KD_HD T probe() const { return value_of(mid()); }
  KD_HD void narrow(T mass_above_probe, T mu) { (mass_above_probe <= mu ? hi : lo) = mid(); }
  KD_HD T threshold() const { return value_of(hi); }

  // (b) How many classes of the tie group at the threshold join the head (0: none; the group's size: all).
  static KD_HD int64_t group_share(T mass_above, int64_t count_above, int64_t group, T p_group, T mu) {
    int64_t share = group;
    if (p_group > T(0)) {
      const T room = (mu - mass_above) / p_group;
      share = room < T(group) ? (room > T(0) ? int64_t(room) : int64_t(0)) : group;
    }
    return count_above == 0 && share == 0 ? int64_t(1) : share;
  }
};

// Whether the classes of raw teacher logits t (first lane: class `base`) are in the head {t > value} + {t == value,
// index < end}.
template <class O>
KD_HD typename O::Mask in_akl_head(typename O::V t, typename O::Scalar value, int64_t end, typename O::V iota,
                                   int64_t base) {
  using V = typename O::V;
  return O::lor(O::gt(t, V(value)), O::land(O::eq(t, V(value)), O::index_le(iota, end - 1 - base)));
}

// Whether a class has probability 0 in both rows: masked (-inf), or underflowed (underflows), given q and p.
template <class O>
KD_HD typename O::Mask absent_in_both(typename O::V q, typename O::V p) {
  return O::land(underflows<O>(q), underflows<O>(p));
}

// The terms of classes given their log-probabilities lq, lp and probabilities q, p (exp of them, or
// exp(x - max) / sum that a caller has kept); akl's in_head says which classes are in its head (ignored by the other
// codes). MAY_BE_ABSENT false: the caller has checked that no class is absent in both (absent_in_both), which skips
// their masking.
// Long: one formula per divergence code, chosen at compile time, each a few lines.
template <int CODE, class O, bool MAY_BE_ABSENT = true>
KD_HD ClassTerms<typename O::V> divergence_terms_of(const DivergenceParams<typename O::Scalar>& c, typename O::V lq,
                                                    typename O::V lp, typename O::V q, typename O::V p,
                                                    typename O::Mask in_head = typename O::Mask()) {
  using V = typename O::V;
  using T = typename O::Scalar;
  const V zero(T(0));
  // A class absent in both (q = p = 0) gets finite logs here, so no formula meets inf - inf; its terms are 0.
  typename O::Mask absent{};
  if constexpr (MAY_BE_ABSENT) {
    absent = absent_in_both<O>(q, p);
    lq = O::select(absent, zero, lq);
    lp = O::select(absent, zero, lp);
  }
  V l, r, rt, e = zero, f = zero;
  const T a = c.alpha, b = c.beta;
  if constexpr (CODE == KD) {
    l = kl_term<O>(p, lp, lq);
    r = zero - p;
    rt = l + p;
  } else if constexpr (CODE == RKL) {
    l = kl_term<O>(q, lq, lp);
    r = l;
    rt = zero - q;
  } else if constexpr (CODE == JSD) {
    const V lm = mixture<O>(c, p, q).log_m;
    r = V(c.mix_q) * kl_term<O>(q, lq, lm);
    rt = V(c.mix_p) * kl_term<O>(p, lp, lm);
    l = rt + r;
  } else if constexpr (CODE == SKEW_FKL) {
    const Mixture<V> m = mixture<O>(c, p, q);
    l = kl_term<O>(p, lp, m.log_m);
    r = zero - V(c.mix_q) * p * (q / m.m);
    rt = l - r;
  } else if constexpr (CODE == SKEW_RKL) {
    const Mixture<V> m = mixture<O>(c, p, q);
    l = kl_term<O>(q, lq, m.log_m);
    rt = zero - V(c.mix_p) * p * (q / m.m);
    r = l + q - V(c.mix_q) * q * (q / m.m);
  } else if constexpr (CODE == TVD) {
    l = V(T(0.5)) * O::abs(p - q);
    const V sign = O::select(O::gt(q, p), V(T(1)), O::select(O::lt(q, p), V(T(-1)), zero));
    r = V(T(0.5)) * q * sign;
    rt = zero - V(T(0.5)) * p * sign;
  } else if constexpr (CODE == ABKD) {
    const T ab = a + b;
    const V mixed = O::exp(V(a) * lp + V(b) * lq), q_ab = O::exp(V(ab) * lq), p_ab = O::exp(V(ab) * lp);
    l = (mixed - V(a / ab) * p_ab - V(b / ab) * q_ab) * V(T(-1) / (a * b));
    r = (q_ab - mixed) * V(T(1) / a);
    rt = (p_ab - mixed) * V(T(1) / b);
  } else if constexpr (CODE == ABKD_ALPHA0) {  // (q^b log(q^b / p^b): 0 where q^b = 0)
    const V qb = O::exp(V(b) * lq), pb = O::exp(V(b) * lp);
    l = (kl_term<O>(qb, V(b) * lq, V(b) * lp) - qb + pb) * V(T(1) / (b * b));
    r = kl_term<O>(qb, lq, lp);
    rt = (pb - qb) * V(T(1) / b);
  } else if constexpr (CODE == ABKD_BETA0) {
    const V pa = O::exp(V(a) * lp), qa = O::exp(V(a) * lq);
    l = (kl_term<O>(pa, V(a) * lp, V(a) * lq) - pa + qa) * V(T(1) / (a * a));
    r = (qa - pa) * V(T(1) / a);
    rt = kl_term<O>(pa, lp, lq);
  } else if constexpr (CODE == ABKD_OPPOSITE) {
    const V ratio = O::exp(V(a) * (lp - lq));
    l = (V(a) * (lq - lp) + ratio - V(T(1))) * V(T(1) / (a * a));
    r = (V(T(1)) - ratio) * V(T(1) / a);
    rt = zero - r;
  } else if constexpr (CODE == ABKD_ZERO) {
    const V d = lp - lq;
    l = V(T(0.5)) * d * d;
    r = lq - lp;
    rt = d;
  } else if constexpr (CODE == WSD) {
    const V rkl = kl_term<O>(q, lq, lp), fkl = kl_term<O>(p, lp, lq);
    l = V(c.w_fkl) * fkl + V(c.w_rkl) * rkl;
    r = V(c.w_rkl) * rkl - V(c.w_fkl) * p;
    rt = V(c.w_fkl) * (fkl + p) - V(c.w_rkl) * q;
  } else if constexpr (CODE == BDKD) {
    l = kl_term<O>(p, lp, lq);
    r = kl_term<O>(q, lq, lp);
    rt = l + p;
    e = kl_term<O>(q, lq, zero) - kl_term<O>(p, lp, zero);
  } else {
    static_assert(CODE == AKL, "a divergence code without a formula");
    l = kl_term<O>(p, lp, lq);
    r = kl_term<O>(q, lq, lp);
    rt = l + p;
    const V gap = O::abs(p - q);
    e = O::select(in_head, gap, zero);
    f = O::select(in_head, zero, gap);
  }
  if constexpr (CODE == BDKD) f = zero - (kl_term<O>(q, lq, zero) + kl_term<O>(p, lp, zero));
  if constexpr (is_abkd<CODE>) {
    // The alpha-beta divergence is >= 0: where a class masked in one model only makes its formula inf - inf, the
    // term is +inf (the limit), not NaN.
    const V ninf(neg_inf<T>());
    const auto one_sided = O::lor(O::eq(lq, ninf), O::eq(lp, ninf));
    l = O::select(O::land(one_sided, O::lnot(O::eq(l, l))), zero - ninf, l);
  }
  if constexpr (!MAY_BE_ABSENT) return {l, r, q, p, e, f, rt};
  return {O::select(absent, zero, l), O::select(absent, zero, r), O::select(absent, zero, q),
          O::select(absent, zero, p), O::select(absent, zero, e), O::select(absent, zero, f),
          O::select(absent, zero, rt)};
}

// The terms of the classes of x, y, given each row's max and log-sum: mx, lzx (student) and my, lzy (teacher), with
// log softmax as (x - m) - log z (exact for large logits).
template <int CODE, class O>
KD_HD ClassTerms<typename O::V> divergence_terms(const DivergenceParams<typename O::Scalar>& c, typename O::V x,
                                                 typename O::V y, typename O::V mx, typename O::V lzx, typename O::V my,
                                                 typename O::V lzy, typename O::Mask in_head = typename O::Mask()) {
  const typename O::V lq = (x - mx) - lzx, lp = (y - my) - lzy;
  return divergence_terms_of<CODE, O>(c, lq, lp, O::exp(lq), O::exp(lp), in_head);
}

// A row's loss and what its gradient needs: g_j = (a r_j + b p_j - q_j sum_r) * scale; the teacher's (with its row
// sum of rt_k, sum_rt; divergence_teacher_grad) weighs bdkd's and akl's rt_k by -b and q_k by a.
template <class T>
struct DivergenceRow {
  T loss, a, b, sum_r;
};

// From the row sums of l_k, r_k, e_k and f_k. bdkd weighs its KLs by w_fkl where H(p) > H(q) (sum e > 0), by w_rkl
// where H(q) > H(p), else (equal within BDKD_TIE eps (1 + H(p) + H(q)), sum f = H(p) + H(q)) by 1; akl by g_head / g
// and g_tail / g (g_head = sum e, g_tail = sum f, g their sum; 1/2 each where g = 0, that is p = q). The weights are
// constants of the gradient; a KL of weight 0 adds 0 (weighted), infinite or not.
template <int CODE, class T>
KD_HD DivergenceRow<T> divergence_row(const DivergenceParams<T>& c, T sum_l, T sum_r, T sum_e, T sum_f) {
  if constexpr (CODE == AKL) {
    const T g = sum_e + sum_f;
    const T w_fkl = g > T(0) ? sum_e / g : T(0.5), w_rkl = g > T(0) ? sum_f / g : T(0.5);
    return {weighted(w_fkl, sum_l) + weighted(w_rkl, sum_r), w_rkl, -w_fkl, weighted(w_rkl, sum_r) - w_fkl};
  } else if constexpr (weighs_row_sums<CODE>) {
    const T eps = sizeof(T) == 4 ? T(1.1920928955078125e-07) : T(2.220446049250313e-16);
    const bool tie = (sum_e < T(0) ? -sum_e : sum_e) <= T(BDKD_TIE) * eps * (T(1) + sum_f);
    const T w_fkl = sum_e > T(0) && !tie ? c.w_fkl : T(1), w_rkl = sum_e < T(0) && !tie ? c.w_rkl : T(1);
    return {w_fkl * sum_l + w_rkl * sum_r, w_rkl, -w_fkl, w_rkl * sum_r - w_fkl};
  } else {
    return {sum_l, T(1), T(0), CODE == KD ? T(-1) : sum_r};
  }
}

// The teacher's rt_j (weighed for bdkd and akl, whose rt_k is their forward KL's: w_fkl rt_k - w_rkl q_k), and the row
// sum of them from the sum of rt_k (sum q = 1).
template <int CODE, class O>
KD_HD typename O::V teacher_r(const ClassTerms<typename O::V>& k, const DivergenceRow<typename O::Scalar>& row) {
  using V = typename O::V;
  return weighs_row_sums<CODE> ? V(-row.b) * k.rt - V(row.a) * k.q : k.rt;
}
template <int CODE, class T>
KD_HD T teacher_sum_r(const DivergenceRow<T>& row, T sum_rt) {
  return weighs_row_sums<CODE> ? -row.b * sum_rt - row.a : sum_rt;
}

// The teacher's gradient gt_j = (rt_j - p_j sum_rt) * scale, rt_j and sum_rt from teacher_r / teacher_sum_r; 0 on the
// classes the teacher masks (y = -inf: a mask, not a parameter).
template <int CODE, class O>
KD_HD typename O::V divergence_teacher_grad(const ClassTerms<typename O::V>& k,
                                            const DivergenceRow<typename O::Scalar>& row, typename O::Scalar sum_rt,
                                            typename O::V y, typename O::Scalar scale) {
  using V = typename O::V;
  using T = typename O::Scalar;
  if (scale == T(0)) return V(T(0));  // (distill_weight = 0: no gradient, whatever the terms)
  return O::select(O::eq(y, V(neg_inf<T>())), V(T(0)), (teacher_r<CODE, O>(k, row) - k.p * V(sum_rt)) * V(scale));
}

// g_j = (a r_j + b p_j - q_j sum_r) * scale, scale = distill_weight (1/T) (T^2 if t2_scale) (1/denominator if
// reduced); exactly 0 when scale is 0 (distill_weight = 0), whatever the terms. The row's weights R are scalars, or
// vectors of one row per lane (the CPU kernel's short rows).
template <int CODE, class O, class R>
KD_HD typename O::V divergence_grad(const ClassTerms<typename O::V>& k, const DivergenceRow<R>& row,
                                    typename O::Scalar scale) {
  using V = typename O::V;
  if (scale == typename O::Scalar(0)) return V(scale);
  const V r = weighs_row_sums<CODE> ? V(row.a) * k.r + V(row.b) * k.p : k.r;
  return (r - k.q * V(row.sum_r)) * V(scale);
}

}  // namespace KDKERNELS_MATH_NAMESPACE
}  // namespace kdkernels
