// Per-row and per-element formulas of the two kernel families, written once for every compiled backend.
//
// The CPU kernels (csrc/cpu) evaluate the per-element formulas on SIMD vectors (O = VecOps<T>, V = at::vec::Vectorized)
// and the CUDA kernels (csrc/cuda) on one element per thread (O = ScalarOps<T>, V = T). A policy O supplies the few
// operations the formulas use: exp, log, abs, max (NaN-propagating), comparisons giving a Mask, select(mask, a, b),
// and lane-index tests for the partitions that name classes by index. Row-level formulas are plain scalar code.
//
// The math is the Triton kernels' (kdkernels/triton/divergence.py and decoupled.py), restated at each formula.
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

// Each CPU capability's build of csrc/cpu/kernels.cpp gets its own copy of these templates (an inline namespace
// named after it), so no copy compiled with AVX-512 instructions can be the one the linker keeps for another build.
#if defined(CPU_CAPABILITY)
#define KDKERNELS_MATH_NAMESPACE CPU_CAPABILITY
#else
#define KDKERNELS_MATH_NAMESPACE common
#endif

namespace kdkernels {
inline namespace KDKERNELS_MATH_NAMESPACE {

// ---- Codes and parameter layouts of kdkernels/kernel_params.py -------------------------------------------------

enum Divergence : int { KD = 0, RKL = 1, JSD = 2, SKEW_FKL = 3, SKEW_RKL = 4, TVD = 5, ABKD = 6 };
enum AbkdCase : int { ABKD_GENERAL = 0, ABKD_ALPHA0 = 1, ABKD_BETA0 = 2, ABKD_OPPOSITE = 3, ABKD_ZERO = 4 };
enum Partition : int { TARGET = 0, TOPK = 1, THRESHOLD = 2 };
constexpr int NUM_DIVERGENCES = 7;
constexpr int NUM_PARTITIONS = 3;
constexpr int DIVERGENCE_PARAMS = 5;  // [a, b, log_wp, log_wq, abkd_case]
constexpr int DECOUPLED_PARAMS = 8;   // [k, log_tau, three_bins, adaptive, w0, w_strong, w_weak, max_weight]

// The decoupled family's bins: A = {top-1} (three bins only, else empty), B = the strong set, W = the rest.
constexpr int NUM_BINS = 3;
enum Bin : int { BIN_A = 0, BIN_B = 1, BIN_W = 2 };

template <class T>
KD_HD T neg_inf() {
  return T(-INFINITY);
}

template <class T>
KD_HD bool is_neg_inf(T x) {
  return x == neg_inf<T>();
}

// max that returns NaN when either side is NaN (as at::vec::maximum): a NaN logit must reach the loss.
template <class T>
KD_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// -inf (an empty or fully masked running max) read as 0, so exp(x - shift) of a masked x is 0, never NaN.
template <class T>
KD_HD T safe_shift(T m) {
  return is_neg_inf(m) ? T(0) : m;
}

// Ranking of the teacher's top-k: larger logit first, then the lower index (torch.topk's ties).
template <class T>
KD_HD bool better(T v1, int64_t i1, T v2, int64_t i2) {
  return v1 > v2 || (v1 == v2 && i1 < i2);
}

template <class T>
struct DivergenceConsts {
  T a, b, log_wp, log_wq;
  int abkd_case;

  static DivergenceConsts from(const double* p) {
    return {T(p[0]), T(p[1]), T(p[2]), T(p[3]), int(p[4])};
  }
};

template <class T>
struct DecoupledConsts {
  int64_t k;
  T log_tau;
  bool three_bins, adaptive;
  T w0, w_strong, w_weak, max_weight;

  static DecoupledConsts from(const double* p) {
    return {int64_t(p[0]), T(p[1]), p[2] != 0, p[3] != 0, T(p[4]), T(p[5]), T(p[6]), T(p[7])};
  }
};

// Calls f(std::integral_constant<int, code>()) for a runtime code in [0, N): one compiled variant per code.
template <int N, class F>
void dispatch_code(int code, F&& f) {
  if constexpr (N > 0) {
    if (code == N - 1) {
      f(std::integral_constant<int, N - 1>());
    } else {
      dispatch_code<N - 1>(code, std::forward<F>(f));
    }
  }
}

// ---- The scalar policy (CUDA threads; also valid host code) ----------------------------------------------------

KD_HD float math_exp(float x) { return expf(x); }
KD_HD double math_exp(double x) { return exp(x); }
KD_HD float math_log(float x) { return logf(x); }
KD_HD double math_log(double x) { return log(x); }

template <class T>
struct ScalarOps {
  using Scalar = T;
  using V = T;
  using Mask = bool;
  static KD_HD V exp(V x) { return math_exp(x); }
  static KD_HD V log(V x) { return math_log(x); }
  static KD_HD V abs(V x) { return x < T(0) ? -x : x; }
  static KD_HD V max(V a, V b) { return nan_max(a, b); }
  static KD_HD V select(Mask m, V a, V b) { return m ? a : b; }
  static KD_HD Mask eq(V a, V b) { return a == b; }
  static KD_HD Mask gt(V a, V b) { return a > b; }
  static KD_HD Mask ge(V a, V b) { return a >= b; }
  static KD_HD Mask lt(V a, V b) { return a < b; }
  static KD_HD Mask land(Mask a, Mask b) { return a && b; }
  static KD_HD Mask lor(Mask a, Mask b) { return a || b; }
  static KD_HD Mask lnot(Mask a) { return !a; }
  static KD_HD Mask none() { return false; }
  static KD_HD bool any(Mask m) { return m; }
  // A thread holds one element: its lane index is 0 and `offset` is (class index - element index).
  static KD_HD Mask index_eq(V, int64_t offset) { return offset == 0; }
  static KD_HD Mask index_le(V, int64_t offset) { return offset >= 0; }
};

// ---- Divergence family -----------------------------------------------------------------------------------------
//
// With x = s / T, y = t / T, log q = log_softmax(x), log p = log_softmax(y), every method is a per-class term l_k
// (row loss l = sum_k l_k) and, writing G_k = dl/dq_k, a term r_k = q_k G_k, so that
//
//     g_j = dl/ds_j = (r_j - q_j * sum_k r_k) / T.
//
//     kd        l_k = p (log p - log q)                      r_k = -p            (sum r = -1: no extra pass)
//     rkl       l_k = q (log q - log p)                      r_k = l_k
//     jsd       m = beta p + (1-beta) q (in log space)
//               l_k = beta p (log p - log m) + (1-beta) q (log q - log m),   r_k = (1-beta) q (log q - log m)
//     skew_fkl  m = lam p + (1-lam) q,  l_k = p (log p - log m),             r_k = -(1-lam) p q / m
//     skew_rkl  m = (1-lam) p + lam q,  l_k = q (log q - log m),             r_k = l_k + q - lam q^2 / m
//     tvd       l_k = |p - q| / 2,                                           r_k = q sign(q - p) / 2, sign(0) = 0
//     abkd      the five alpha/beta cases of LOSSES.md, powers in the log domain (p^a q^b = exp(a log p + b log q)).
//
// A class with both logits -inf contributes 0; a term a (log a - log b) with a = 0 is 0.

// log(exp(u) + exp(v)), exact for large arguments and 0-safe: both -inf gives -inf.
template <class O>
KD_HD typename O::V log_add_exp(typename O::V u, typename O::V v) {
  using V = typename O::V;
  using T = typename O::Scalar;
  V mx = O::max(u, v);
  V shift = O::select(O::eq(mx, V(neg_inf<T>())), V(T(0)), mx);
  return shift + O::log(O::exp(u - shift) + O::exp(v - shift));
}

// a (log a - log b) from log a, with 0 where a = 0.
template <class O>
KD_HD typename O::V kl_term(typename O::V a, typename O::V log_a, typename O::V log_b) {
  using V = typename O::V;
  using T = typename O::Scalar;
  return O::select(O::eq(log_a, V(neg_inf<T>())), V(T(0)), a * (log_a - log_b));
}

template <class O>
KD_HD void abkd_terms(const DivergenceConsts<typename O::Scalar>& c, typename O::V lp, typename O::V lq,
                      typename O::V& l, typename O::V& r) {
  using V = typename O::V;
  using T = typename O::Scalar;
  const T a = c.a, b = c.b;
  switch (c.abkd_case) {
    case ABKD_GENERAL: {
      const T ab = a + b;
      V mixed = O::exp(V(a) * lp + V(b) * lq);
      V q_ab = O::exp(V(ab) * lq);
      l = (mixed - V(a / ab) * O::exp(V(ab) * lp) - V(b / ab) * q_ab) * V(T(-1) / (a * b));
      r = (q_ab - mixed) * V(T(1) / a);
      break;
    }
    case ABKD_ALPHA0: {
      V qb = O::exp(V(b) * lq);
      l = (qb * V(b) * (lq - lp) - qb + O::exp(V(b) * lp)) * V(T(1) / (b * b));
      r = qb * (lq - lp);
      break;
    }
    case ABKD_BETA0: {
      V pa = O::exp(V(a) * lp);
      V qa = O::exp(V(a) * lq);
      l = (pa * V(a) * (lp - lq) - pa + qa) * V(T(1) / (a * a));
      r = (qa - pa) * V(T(1) / a);
      break;
    }
    case ABKD_OPPOSITE: {
      V ratio = O::exp(V(a) * (lp - lq));
      l = (V(a) * (lq - lp) + ratio - V(T(1))) * V(T(1) / (a * a));
      r = (V(T(1)) - ratio) * V(T(1) / a);
      break;
    }
    default: {  // ABKD_ZERO
      V d = lp - lq;
      l = V(T(0.5)) * d * d;
      r = lq - lp;
    }
  }
}

// (l_k, r_k, q_k) of the classes of x, y, given each row's max and log-sum: mx, lzx (student) and my, lzy (teacher).
template <int METHOD, class O>
KD_HD void divergence_terms(const DivergenceConsts<typename O::Scalar>& c, typename O::V x, typename O::V y,
                            typename O::V mx, typename O::V lzx, typename O::V my, typename O::V lzy,
                            typename O::V& l, typename O::V& r, typename O::V& q) {
  using V = typename O::V;
  using T = typename O::Scalar;
  const V zero(T(0)), ninf(neg_inf<T>());
  const auto absent = O::land(O::eq(x, ninf), O::eq(y, ninf));
  // log softmax as (x - m) - log z: exact for large logits.
  const V lq = O::select(absent, zero, (x - mx) - lzx);
  const V lp = O::select(absent, zero, (y - my) - lzy);
  q = O::exp(lq);
  const V p = O::exp(lp);
  if (METHOD == KD) {
    l = kl_term<O>(p, lp, lq);
    r = zero - p;
  } else if (METHOD == RKL) {
    l = kl_term<O>(q, lq, lp);
    r = l;
  } else if (METHOD == JSD) {  // a = beta
    const V lm = log_add_exp<O>(lp + V(c.log_wp), lq + V(c.log_wq));
    r = V(T(1) - c.a) * kl_term<O>(q, lq, lm);
    l = V(c.a) * kl_term<O>(p, lp, lm) + r;
  } else if (METHOD == SKEW_FKL) {  // a = lambda
    const V lm = log_add_exp<O>(lp + V(c.log_wp), lq + V(c.log_wq));
    l = kl_term<O>(p, lp, lm);
    r = V(c.a - T(1)) * O::exp(lp + lq - lm);
  } else if (METHOD == SKEW_RKL) {  // a = lambda
    const V lm = log_add_exp<O>(lp + V(c.log_wp), lq + V(c.log_wq));
    l = kl_term<O>(q, lq, lm);
    r = l + q - V(c.a) * O::exp(lq + lq - lm);
  } else if (METHOD == TVD) {
    l = V(T(0.5)) * O::abs(p - q);
    const V sign = O::select(O::gt(q, p), V(T(1)), O::select(O::lt(q, p), V(T(-1)), zero));
    r = V(T(0.5)) * q * sign;
  } else {
    abkd_terms<O>(c, lp, lq, l, r);
  }
  l = O::select(absent, zero, l);
  r = O::select(absent, zero, r);
  q = O::select(absent, zero, q);
}

// g_j = (r_j - q_j sum_k r_k) * scale, scale = (1/T) (T^2 if t2_scale) (1/denominator if reduced).
template <class O>
KD_HD typename O::V divergence_grad(typename O::V r, typename O::V q, typename O::Scalar sum_r,
                                    typename O::Scalar scale) {
  using V = typename O::V;
  return (r - q * V(sum_r)) * V(scale);
}

// ---- Decoupled family ------------------------------------------------------------------------------------------
//
// Classes fall in bins A, B, W (above). Per bin b the kernels keep, with x = s / T and y = t / T,
//     mt_b = max_{i in b} y_i,   zt_b = sum_{i in b} exp(y_i - mt_b),   kt_b = sum_{i in b} exp(y_i - mt_b) (y_i - x_i),
//     ms_b, zs_b likewise for x,
// from which, with P_b, Q_b the bin masses and p^b, q^b the in-bin distributions,
//     log P_b = log_softmax over bins of (mt_b + log zt_b),  log Q_b likewise,
//     KL(p^b || q^b) = kt_b / zt_b - (mt_b - ms_b) - (log zt_b - log zs_b),
//     l = w0 * sum_b P_b (log P_b - log Q_b) + w_B KL(p^B || q^B) + w_W KL(p^W || q^W)
// (A holds one class, so its in-bin KL is 0), and for j in bin b
//     g_j = (1/T) [w0 (Q_b - P_b) q^b_j + w_b (q^b_j - p^b_j)] = (1/T) (c_b q^b_j - w_b p^b_j),  c_b = w0 (Q_b - P_b) + w_b.
// Bin masses are logsumexps over the bin, never 1 - (mass of the others). aekt's w0 is min(p_y / q_y, max_weight)
// (bin B = {y}), a constant for the gradient.

// What a row's partition needs besides the class's own teacher logit.
template <class T>
struct Membership {
  int64_t target;  // TARGET: the label (-1 when there is none or it is out of range: bin B is then empty)
  T kth_v;         // TOPK: the k-th best teacher logit / T and its index
  int64_t kth_i;
  int64_t top1_i;  // three bins: the best teacher class
  T y_max;         // THRESHOLD: max of y, and log(tau)
  T log_tau;
  bool three_bins;
};

// (in A, in B) of the classes of y whose first lane is class `base`; iota holds the lane indices 0, 1, ...
template <int PARTITION, class O>
KD_HD void membership(const Membership<typename O::Scalar>& mb, typename O::V y, typename O::V iota, int64_t base,
                      typename O::Mask& in_a, typename O::Mask& in_b) {
  using V = typename O::V;
  if (PARTITION == TARGET) {
    in_b = O::index_eq(iota, mb.target - base);
  } else if (PARTITION == TOPK) {  // better than or equal to the k-th (value, index)
    const V kth(mb.kth_v);
    in_b = O::lor(O::lor(O::gt(y, kth), O::land(O::eq(y, kth), O::index_le(iota, mb.kth_i - base))),
                  O::index_eq(iota, mb.kth_i - base));
  } else {  // p_i >= tau max p  <=>  y_i - max y >= log tau
    in_b = O::ge(y - V(mb.y_max), V(mb.log_tau));
  }
  if (mb.three_bins) {
    in_a = O::index_eq(iota, mb.top1_i - base);
    in_b = O::land(in_b, O::lnot(in_a));
  } else {
    in_a = O::none();
  }
}

// The value of bin A, B or W, per class.
template <class O>
KD_HD typename O::V pick(typename O::Mask in_a, typename O::Mask in_b, typename O::Scalar a, typename O::Scalar b,
                         typename O::Scalar w) {
  using V = typename O::V;
  return O::select(in_a, V(a), O::select(in_b, V(b), V(w)));
}

// A class's term of kt_b: exp(y - mt_b) (y - x), with e = exp(y - mt_b); 0 for a masked teacher class.
template <class O>
KD_HD typename O::V k_term(typename O::V e, typename O::V y, typename O::V x) {
  using V = typename O::V;
  using T = typename O::Scalar;
  return O::select(O::eq(y, V(neg_inf<T>())), V(T(0)), e * (y - x));
}

template <class T>
struct BinStats {
  T m[NUM_BINS], z[NUM_BINS], k[NUM_BINS];  // k is used on the teacher side only
};

// A row's loss and its gradient coefficients, from the statistics of both sides.
template <class T>
struct DecoupledRow {
  T loss;                  // before T^2; NaN for an out-of-range target
  T c[NUM_BINS];           // g_j = scale (c_b q^b_j - w_b p^b_j)
  T w[NUM_BINS];
  // p^b_j = exp((y_j - mt_b) - lzt_b), q^b_j = exp((x_j - ms_b) - lzs_b): the max and the log-sum apart, since
  // rounding their sum (near a logit of 500, say) would cost exp(x - shift) that sum's absolute rounding error.
  T mt[NUM_BINS], lzt[NUM_BINS], ms[NUM_BINS], lzs[NUM_BINS];
};

// log of each bin's share of the row's mass (log_softmax over the bins of m_b + log z_b).
template <class T>
KD_HD void log_masses(const BinStats<T>& s, T out[NUM_BINS]) {
  T m = neg_inf<T>();
  for (int b = 0; b < NUM_BINS; ++b) m = nan_max(m, s.m[b]);
  m = safe_shift(m);
  T total = T(0);
  for (int b = 0; b < NUM_BINS; ++b) total += s.z[b] * math_exp(s.m[b] - m);
  const T log_total = math_log(total);
  for (int b = 0; b < NUM_BINS; ++b) out[b] = (s.m[b] - m) + math_log(s.z[b]) - log_total;
}

template <class T>
KD_HD T in_bin_kl(const BinStats<T>& t, const BinStats<T>& s, int b) {
  if (is_neg_inf(t.m[b])) return T(0);
  return t.k[b] / t.z[b] - (t.m[b] - s.m[b]) - (math_log(t.z[b]) - math_log(s.z[b]));
}

template <class T>
KD_HD DecoupledRow<T> decoupled_row(const BinStats<T>& t, const BinStats<T>& s, const DecoupledConsts<T>& c,
                                    bool bad_target) {
  T lp[NUM_BINS], lq[NUM_BINS];
  log_masses(t, lp);
  log_masses(s, lq);
  T weight = c.w0;
  if (c.adaptive) {  // aekt: min(p_y / q_y, max_weight) with B = {y}
    const T ratio = math_exp(lp[BIN_B] - lq[BIN_B]);
    weight = ratio < c.max_weight ? ratio : c.max_weight;
  }
  DecoupledRow<T> row;
  T mass_kl = T(0);
  for (int b = 0; b < NUM_BINS; ++b) {
    mass_kl += is_neg_inf(lp[b]) ? T(0) : math_exp(lp[b]) * (lp[b] - lq[b]);
  }
  row.loss = weight * mass_kl + c.w_strong * in_bin_kl(t, s, BIN_B) + c.w_weak * in_bin_kl(t, s, BIN_W);
  if (bad_target) row.loss = T(NAN);
  row.w[BIN_A] = T(0);
  row.w[BIN_B] = c.w_strong;
  row.w[BIN_W] = c.w_weak;
  for (int b = 0; b < NUM_BINS; ++b) {
    row.c[b] = weight * (math_exp(lq[b]) - math_exp(lp[b])) + row.w[b];
    row.mt[b] = safe_shift(t.m[b]);
    row.lzt[b] = math_log(t.z[b]);
    row.ms[b] = safe_shift(s.m[b]);
    row.lzs[b] = math_log(s.z[b]);
  }
  return row;
}

// g_j = scale (c_b q^b_j - w_b p^b_j) for the classes of x, y (0 for masked ones).
template <class O>
KD_HD typename O::V decoupled_grad(const DecoupledRow<typename O::Scalar>& row, typename O::Mask in_a,
                                   typename O::Mask in_b, typename O::V x, typename O::V y,
                                   typename O::Scalar scale) {
  using V = typename O::V;
  using T = typename O::Scalar;
  const V zero(T(0)), ninf(neg_inf<T>());
  const V q_in = O::select(O::eq(x, ninf), zero,
                           O::exp((x - pick<O>(in_a, in_b, row.ms[BIN_A], row.ms[BIN_B], row.ms[BIN_W])) -
                                  pick<O>(in_a, in_b, row.lzs[BIN_A], row.lzs[BIN_B], row.lzs[BIN_W])));
  const V p_in = O::select(O::eq(y, ninf), zero,
                           O::exp((y - pick<O>(in_a, in_b, row.mt[BIN_A], row.mt[BIN_B], row.mt[BIN_W])) -
                                  pick<O>(in_a, in_b, row.lzt[BIN_A], row.lzt[BIN_B], row.lzt[BIN_W])));
  const V c = pick<O>(in_a, in_b, row.c[BIN_A], row.c[BIN_B], row.c[BIN_W]);
  const V w = pick<O>(in_a, in_b, row.w[BIN_A], row.w[BIN_B], row.w[BIN_W]);
  return (c * q_in - w * p_in) * V(scale);
}

}  // namespace KDKERNELS_MATH_NAMESPACE
}  // namespace kdkernels
