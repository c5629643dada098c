// The decoupled family's codes, named parameters and bin formulas (docs/losses.md, "Decoupled family"), for the CPU
// and CUDA kernels. The classes fall in bins TOP1 (the teacher's top-1, only with split_top1), STRONG (the strong
// set, chosen on the raw teacher logits by the partition) and REST. Per bin the kernels keep, with x = s / T and
// y = t / T,
//     mt_b = max y,  zt_b = sum exp(y - mt_b),  kt_b = sum exp(y - mt_b) ((y - mt_b) - (x - ms_b)),
//     ms_b = max x,  zs_b = sum exp(x - ms_b),  ks_b = sum exp(x - ms_b) ((x - ms_b) - (y - mt_b)) (when w_rkl != 0),
// from which decoupled_row() gives, in double precision, the loss
//     l = w_mass KL([P_b] || [Q_b]) + w_strong D^STRONG + w_rest D^REST,
//     D^b = w_fkl KL(p^b || q^b) + w_rkl KL(q^b || p^b),
//     KL(p^b || q^b) = kt_b / zt_b - (log zt_b - log zs_b),  KL(q^b || p^b) = ks_b / zs_b - (log zs_b - log zt_b),
// and per bin, with R_b = KL(q^b || p^b), the coefficients c_b = w_mass (Q_b - P_b) + f_b - r_b R_b,
// f_b = w_b w_fkl [P_b > 0], r_b = w_b w_rkl, so that for j in bin b
//     g_j = (c_b q^b_j - f_b p^b_j + r_b q^b_j (log q^b_j - log p^b_j)) / T.
#pragma once

#include "row_math.h"

// The codes of kdkernels/methods.py Partition and Bin, in their order.
// X-macro item lists, laid out by hand:
// clang-format off
#define KDKERNELS_PARTITION_CODES(X) X(TARGET) X(TOPK) X(THRESHOLD)
#define KDKERNELS_BIN_CODES(X) X(TOP1) X(STRONG) X(REST)
// The fields of kdkernels/methods.py DecoupledParams, in its order.
#define KDKERNELS_DECOUPLED_PARAMS(X)                                                                    \
  X(int64_t, k) X(T, log_tau) X(bool, split_top1) X(bool, lowest) X(bool, adaptive) X(T, w_mass) X(T, w_strong) \
  X(T, w_rest) X(T, w_fkl) X(T, w_rkl) X(T, max_weight)
// clang-format on

namespace kdkernels {
inline namespace KDKERNELS_MATH_NAMESPACE {

enum Partition : int { KDKERNELS_PARTITION_CODES(KDKERNELS_ENUMERATOR) NUM_PARTITIONS };
enum Bin : int { KDKERNELS_BIN_CODES(KDKERNELS_ENUMERATOR) NUM_BINS };

KDKERNELS_DEFINE_PARAMS(DecoupledParams, KDKERNELS_DECOUPLED_PARAMS)

// Ranking of the teacher's top-k: larger raw logit first, then the lower index (torch's stable sort).
template <class T>
KD_HD bool better(T v1, int64_t i1, T v2, int64_t i2) {
  return v1 > v2 || (v1 == v2 && i1 < i2);
}

// The top-k's ranking value of raw teacher logits t: t, or with `lowest` -t, masked classes (-inf) ranking last
// either way (the k smallest *finite* logits: a masked class is absent, as everywhere).
template <class O>
KD_HD typename O::V top_k_rank(typename O::V t, bool lowest) {
  using V = typename O::V;
  using T = typename O::Scalar;
  return lowest ? O::select(O::eq(t, V(neg_inf<T>())), t, V(T(0)) - t) : t;
}

// What a row's partition needs besides the class's own raw teacher logit.
template <class T>
struct Membership {
  int64_t target;  // TARGET: the label (-1 when there is none or it is out of range: the strong bin is then empty)
  T kth_v;         // TOPK: the k-th best ranking value (raw teacher logit, negated when lowest) and its index
  int64_t kth_i;
  int64_t top1_i;  // split_top1: the best teacher class
  T t_max;         // THRESHOLD: max of t, and T log(tau)
  T threshold;
  bool split_top1;
  bool lowest;  // TOPK: rank on -t (the teacher's k smallest logits; top_k_rank)
};

// (in TOP1, in STRONG) of the classes of raw teacher logits t whose first lane is class `base`; iota holds the lane
// indices 0, 1, ...
template <int PARTITION, class O>
KD_HD void membership(const Membership<typename O::Scalar>& mb, typename O::V t, typename O::V iota, int64_t base,
                      typename O::Mask& in_top1, typename O::Mask& in_strong) {
  using V = typename O::V;
  if constexpr (PARTITION == TARGET) {
    in_strong = O::index_eq(iota, mb.target - base);
  } else if constexpr (PARTITION == TOPK) {  // better than or equal to the k-th (value, index)
    const V kth(mb.kth_v), rank = top_k_rank<O>(t, mb.lowest);
    in_strong = O::lor(O::lor(O::gt(rank, kth), O::land(O::eq(rank, kth), O::index_le(iota, mb.kth_i - base))),
                       O::index_eq(iota, mb.kth_i - base));
  } else {  // p_i >= tau max p  <=>  t_i - max t >= T log(tau)
    in_strong = O::ge(t - V(mb.t_max), V(mb.threshold));
  }
  if (mb.split_top1) {
    in_top1 = O::index_eq(iota, mb.top1_i - base);
    in_strong = O::land(in_strong, O::lnot(in_top1));
  } else {
    in_top1 = O::none();
  }
}

// The value of bin TOP1, STRONG or REST, per class.
template <class O>
KD_HD typename O::V pick(typename O::Mask in_top1, typename O::Mask in_strong, typename O::Scalar top1,
                         typename O::Scalar strong, typename O::Scalar rest) {
  using V = typename O::V;
  return O::select(in_top1, V(top1), O::select(in_strong, V(strong), V(rest)));
}

// A class's term of kt_b, with e = exp(y - mt_b): e ((y - mt_b) - (x - ms_b)), 0 where e is 0 (a masked teacher
// class, or one whose exp underflows: never 0 * inf when the student's is masked); the sides swapped
// (e = exp(x - ms_b)), its term of ks_b.
template <class O>
KD_HD typename O::V k_term(typename O::V e, typename O::V y, typename O::V x, typename O::V shift_t,
                           typename O::V shift_s) {
  using V = typename O::V;
  using T = typename O::Scalar;
  return O::select(O::eq(e, V(T(0))), V(T(0)), e * ((y - shift_t) - (x - shift_s)));
}

template <class T>
struct BinStats {
  T m[NUM_BINS], z[NUM_BINS], k[NUM_BINS];  // the side's max, sum and k term (kt_b or ks_b) per bin
};

// A row's loss and its gradient coefficients, from the statistics of both sides.
template <class T>
struct DecoupledRow {
  T loss;         // before T^2; NaN for an out-of-range target
  T c[NUM_BINS];  // g_j = scale (c_b q^b_j - f_b p^b_j + r_b q^b_j (log q^b_j - log p^b_j))
  T f[NUM_BINS], r[NUM_BINS];
  T ct[NUM_BINS];  // the teacher's: gt_j = scale (ct_b p^b_j + f_b p^b_j (log p^b_j - log q^b_j) - r_b q^b_j)
  // p^b_j = exp((y_j - mt_b) - lzt_b), q^b_j = exp((x_j - ms_b) - lzs_b): the max and the log-sum apart, since
  // rounding their sum (near a logit of 500, say) would cost exp(x - shift) that sum's absolute rounding error.
  T mt[NUM_BINS], lzt[NUM_BINS], ms[NUM_BINS], lzs[NUM_BINS];
};

// exp(d) of a bin's max less the row's and log(z) of a bin's sum, in double, with the 1 of the max's bin, the 0 and
// -inf of an empty bin and the 0 of a one-class bin's sum 1 (TARGET's STRONG) answered without a libm call: a short
// row's bin math is mostly those calls.
KD_HD double exp_of_shift(double d) {
  return d == 0.0 ? 1.0 : is_neg_inf(d) ? 0.0 : exp(d);
}
KD_HD double log_of_sum(double z) {
  return z == 0.0 ? neg_inf<double>() : z == 1.0 ? 0.0 : log(z);
}

// What decoupled_row() needs of one side's bins in double, each exp and log computed once: log z_b, the log of each
// bin's share of the row's mass and that share.
struct BinMasses {
  double log_z[NUM_BINS], log_mass[NUM_BINS], mass[NUM_BINS];
};

// Each bin's share of the row's mass and its log (log_softmax over the bins of m_b + log z_b), in double: the shares
// e_b / total from e_b = z_b exp(m_b - m) (no exp of a log),
// the largest bin's log as log1p(-(share of the others)), so a bin holding nearly all the mass keeps the digits of
// its complement.
template <class T>
KD_HD BinMasses bin_masses(const BinStats<T>& s) {
  BinMasses out;
  double m = neg_inf<double>();
  for (int b = 0; b < NUM_BINS; ++b) m = nan_max(m, double(s.m[b]));
  m = safe_shift(m);
  double total = 0;
  for (int b = 0; b < NUM_BINS; ++b) {
    out.log_z[b] = log_of_sum(double(s.z[b]));
    const double d = double(s.m[b]) - m;
    out.log_mass[b] = d + out.log_z[b];              // log e_b
    out.mass[b] = double(s.z[b]) * exp_of_shift(d);  // e_b
    total += out.mass[b];
  }
  const double log_total = log(total);
  int big = 0;
  for (int b = 0; b < NUM_BINS; ++b) {
    out.log_mass[b] -= log_total;
    out.mass[b] /= total;
    if (out.log_mass[b] > out.log_mass[big]) big = b;
  }
  double others = 0;
  for (int b = 0; b < NUM_BINS; ++b) others += b == big ? 0.0 : out.mass[b];
  if (out.log_mass[big] == out.log_mass[big]) out.log_mass[big] = log1p(-others);
  return out;
}

// KL(a^b || o^b) of bin b, a's k term taken against o (the teacher's kt_b for the forward KL, the student's ks_b for
// the reverse one); 0 where a has no mass in the bin, +inf where o has none and a has.
template <class T>
KD_HD double in_bin_kl(const BinStats<T>& a, const BinMasses& la, const BinStats<T>& o, const BinMasses& lo, int b) {
  if (a.z[b] == T(0)) return 0.0;
  if (o.z[b] == T(0)) return double(INFINITY);
  return double(a.k[b]) / double(a.z[b]) - (la.log_z[b] - lo.log_z[b]);
}

// aekt's weight of the bin-mass KL: min(P_strong / Q_strong, max_weight) from their logs, and 0 where P_strong = 0
// (its label masked in both models too, where the ratio is 0 / 0; docs/losses.md, "aekt").
KD_HD double aekt_weight(double log_p, double log_q, double max_weight) {
  if (is_neg_inf(log_p)) return 0.0;
  const double ratio = exp(log_p - log_q);
  return ratio < max_weight ? ratio : max_weight;
}

// Whether a side has no distribution: every class of the row masked (the row's loss is then NaN, unless the other
// side's are all masked too: a row left out before this).
template <class T>
KD_HD bool all_masked(const BinStats<T>& s) {
  return s.z[TOP1] == T(0) && s.z[STRONG] == T(0) && s.z[REST] == T(0);
}

template <class T>
KD_HD DecoupledRow<T> decoupled_row(const BinStats<T>& t, const BinStats<T>& s, const DecoupledParams<double>& c,
                                    bool bad_target) {
  const BinMasses masses_t = bin_masses(t), masses_s = bin_masses(s);
  const double *lp = masses_t.log_mass, *lq = masses_s.log_mass, *P = masses_t.mass, *Q = masses_s.mass;
  // (aekt: the strong bin is {target}.) A term of weight 0 adds 0 (weighted), infinite or not.
  const double weight = c.adaptive ? aekt_weight(lp[STRONG], lq[STRONG], c.max_weight) : c.w_mass;
  double w[NUM_BINS] = {0.0, c.w_strong, c.w_rest};  // a one-class bin has no in-bin KL
  // A bin whose mass underflows (below the least normal number of the math type) in both models, or underflows in
  // one and is masked in the other, is absent, like a bin of classes masked in both: it contributes 0.
  bool absent[NUM_BINS];
  double mass_kl = 0;
  for (int b = 0; b < NUM_BINS; ++b) {
    absent[b] = P[b] < double(min_normal<T>()) && Q[b] < double(min_normal<T>());
    if (absent[b]) w[b] = 0.0;
    mass_kl += is_neg_inf(lp[b]) || absent[b] ? 0.0 : P[b] * (lp[b] - lq[b]);
  }
  double loss = weighted(weight, mass_kl);
  DecoupledRow<T> row;
  for (int b = 0; b < NUM_BINS; ++b) {
    // (TOP1 has no in-bin term; ks_b is kept only when w_rkl != 0.)
    const double fkl = b == TOP1 || c.w_fkl == 0.0 ? 0.0 : in_bin_kl(t, masses_t, s, masses_s, b);
    const double rkl = b == TOP1 || c.w_rkl == 0.0 ? 0.0 : in_bin_kl(s, masses_s, t, masses_t, b);
    loss += weighted(w[b], weighted(c.w_fkl, fkl) + weighted(c.w_rkl, rkl));
    // A bin the teacher gives no mass has in-bin forward KL 0 whatever the student does: no gradient from it.
    const double f = t.z[b] > T(0) ? w[b] * c.w_fkl : 0.0;
    row.f[b] = T(f);
    row.r[b] = T(w[b] * c.w_rkl);
    row.c[b] = absent[b] ? T(0) : T(weight * (Q[b] - P[b]) + f - weighted(w[b] * c.w_rkl, rkl));
    const double mass_term = is_neg_inf(lp[b]) || absent[b] ? 0.0 : weight * P[b] * (lp[b] - lq[b] - mass_kl);
    row.ct[b] = T(mass_term - weighted(f, fkl) + w[b] * c.w_rkl);
    row.mt[b] = safe_shift(t.m[b]);
    row.lzt[b] = T(masses_t.log_z[b]);
    row.ms[b] = safe_shift(s.m[b]);
    row.lzs[b] = T(masses_s.log_z[b]);
  }
  row.loss = bad_target || all_masked(t) || all_masked(s) ? T(NAN) : T(loss);
  return row;
}

// The in-bin log-probabilities and probabilities of the classes of x, y (q^b, p^b 0 where x, y are masked).
template <class V>
struct InBin {
  V log_q, log_p, q, p;
};

// The same from probabilities q, p that the caller kept (the CPU kernel: exp(x - bin max) / bin sum).
template <class O>
KD_HD InBin<typename O::V> in_bin_of(const DecoupledRow<typename O::Scalar>& row, typename O::Mask in_top1,
                                     typename O::Mask in_strong, typename O::V x, typename O::V y, typename O::V q,
                                     typename O::V p) {
  const typename O::V log_q = (x - pick<O>(in_top1, in_strong, row.ms[TOP1], row.ms[STRONG], row.ms[REST])) -
                              pick<O>(in_top1, in_strong, row.lzs[TOP1], row.lzs[STRONG], row.lzs[REST]);
  const typename O::V log_p = (y - pick<O>(in_top1, in_strong, row.mt[TOP1], row.mt[STRONG], row.mt[REST])) -
                              pick<O>(in_top1, in_strong, row.lzt[TOP1], row.lzt[STRONG], row.lzt[REST]);
  return {log_q, log_p, q, p};
}

template <class O>
KD_HD InBin<typename O::V> in_bin(const DecoupledRow<typename O::Scalar>& row, typename O::Mask in_top1,
                                  typename O::Mask in_strong, typename O::V x, typename O::V y) {
  using V = typename O::V;
  using T = typename O::Scalar;
  const V zero(T(0)), ninf(neg_inf<T>());
  InBin<V> b = in_bin_of<O>(row, in_top1, in_strong, x, y, zero, zero);
  b.q = O::select(O::eq(x, ninf), zero, O::exp(b.log_q));
  b.p = O::select(O::eq(y, ninf), zero, O::exp(b.log_p));
  return b;
}

// g_j = scale (c_b q^b_j - f_b p^b_j + r_b q^b_j (log q^b_j - log p^b_j)) for classes whose in-bin probabilities
// are b (in_bin; 0 for masked ones); the last term only when w_rkl != 0.
template <class O>
KD_HD typename O::V decoupled_grad(const DecoupledRow<typename O::Scalar>& row, typename O::Mask in_top1,
                                   typename O::Mask in_strong, const InBin<typename O::V>& b,
                                   typename O::Scalar scale) {
  using V = typename O::V;
  using T = typename O::Scalar;
  const V zero(T(0));
  if (scale == T(0)) return zero;  // (distill_weight = 0: no gradient, whatever the terms)
  const V c = pick<O>(in_top1, in_strong, row.c[TOP1], row.c[STRONG], row.c[REST]);
  const V f = pick<O>(in_top1, in_strong, row.f[TOP1], row.f[STRONG], row.f[REST]);
  V g = c * b.q - f * b.p;
  if (row.r[STRONG] != T(0) || row.r[REST] != T(0)) {
    const V r = pick<O>(in_top1, in_strong, row.r[TOP1], row.r[STRONG], row.r[REST]);
    g = g + O::select(O::eq(b.q, zero), zero, r * b.q * (b.log_q - b.log_p));  // (0 where q underflows, not 0 * inf)
  }
  return g * V(scale);
}

// The teacher's gradient gt_j = scale (ct_b p^b_j + f_b p^b_j (log p^b_j - log q^b_j) - r_b q^b_j) for the same classes
// (0 where the teacher masks them, y = -inf); the last term only when w_rkl != 0.
template <class O>
KD_HD typename O::V decoupled_teacher_grad(const DecoupledRow<typename O::Scalar>& row, typename O::Mask in_top1,
                                           typename O::Mask in_strong, const InBin<typename O::V>& b, typename O::V y,
                                           typename O::Scalar scale) {
  using V = typename O::V;
  using T = typename O::Scalar;
  const V zero(T(0));
  if (scale == T(0)) return zero;
  const V ct = pick<O>(in_top1, in_strong, row.ct[TOP1], row.ct[STRONG], row.ct[REST]);
  const V f = pick<O>(in_top1, in_strong, row.f[TOP1], row.f[STRONG], row.f[REST]);
  V g = ct * b.p + O::select(O::eq(b.p, zero), zero, f * b.p * (b.log_p - b.log_q));
  if (row.r[STRONG] != T(0) || row.r[REST] != T(0)) {
    g = g - pick<O>(in_top1, in_strong, row.r[TOP1], row.r[STRONG], row.r[REST]) * b.q;
  }
  return O::select(O::eq(y, V(neg_inf<T>())), zero, g * V(scale));
}

}  // namespace KDKERNELS_MATH_NAMESPACE
}  // namespace kdkernels
