// What the per-row formulas of both families (divergence.h, decoupled.h) share, for host and device code.
//
// The CPU kernels (csrc/cpu) evaluate the per-element formulas on SIMD vectors (O = VecOps<T>, V = at::vec::Vectorized)
// and the CUDA kernels (csrc/cuda) on one element per thread (O = ScalarOps<T>, V = T). A policy O supplies the few
// operations the formulas use: exp, log, abs, max (NaN-propagating), comparisons giving a Mask, select(mask, a, b),
// and lane-index tests for the partitions that name classes by index. Row-level formulas are plain scalar code.
//
// Codes and named parameters: each family's header lists them once with an X-macro, from which come its enum, its
// parameter struct (read from the op's float list in that order) and the names kdkernels._C exports, which a test
// compares with kdkernels/methods.py.
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

// Each CPU capability's build of the CPU kernels gets its own copy of these templates (an inline namespace named
// after it), so no copy compiled with AVX-512 instructions can be the one the linker keeps for another build.
#if defined(CPU_CAPABILITY)
#define KDKERNELS_MATH_NAMESPACE CPU_CAPABILITY
#else
#define KDKERNELS_MATH_NAMESPACE common
#endif

// X-macro helpers: an enumerator per code; a field per parameter, read from a double array in order.
#define KDKERNELS_ENUMERATOR(name) name,
#define KDKERNELS_PARAM_FIELD(type, name) type name;
#define KDKERNELS_PARAM_READ(type, name) out.name = type(values[i++]);
#define KDKERNELS_PARAM_COUNT(type, name) +1
// template <class T> struct NAME: the fields of the X-macro LIST (whose types may use T), their number, and
// NAME::from(values) reading them from the op's float list in order.
#define KDKERNELS_DEFINE_PARAMS(NAME, LIST)                    \
  template <class T>                                           \
  struct NAME {                                                \
    LIST(KDKERNELS_PARAM_FIELD)                                \
    static constexpr int size = 0 LIST(KDKERNELS_PARAM_COUNT); \
    static NAME from(const double* values) {                   \
      NAME out;                                                \
      int i = 0;                                               \
      LIST(KDKERNELS_PARAM_READ)                               \
      return out;                                              \
    }                                                          \
  };

namespace kdkernels {
inline namespace KDKERNELS_MATH_NAMESPACE {

template <class T>
KD_HD T neg_inf() {
  return T(-INFINITY);
}

// The least positive normal number of T.
template <class T>
KD_HD T min_normal() {
  return sizeof(T) == 4 ? T(1.17549435e-38f) : T(2.2250738585072014e-308);
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

KD_HD float math_exp(float x) {
  return expf(x);
}
KD_HD double math_exp(double x) {
  return exp(x);
}
KD_HD float math_log(float x) {
  return logf(x);
}
KD_HD double math_log(double x) {
  return log(x);
}

template <class T>
struct ScalarOps {
  using Scalar = T;
  using V = T;
  using Mask = bool;
  static KD_HD V exp(V x) { return math_exp(x); }
  static KD_HD V log(V x) { return math_log(x); }
  static KD_HD V abs(V x) { return x < T(0) ? -x : x; }
  static KD_HD V max(V a, V b) { return nan_max(a, b); }
  static KD_HD V floor_at(V x, V lo) { return x < lo ? lo : x; }  // max(x, lo), NaN where x is
  static KD_HD V select(Mask m, V a, V b) { return m ? a : b; }
  static KD_HD V where_nonzero(V a, V x) { return a == T(0) ? T(0) : x; }  // x where a != 0 (or NaN), else 0
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

// Logit standardization (option standardize; docs/losses.md, "Logit standardization"): each row of both logits is
// z-scored over its n unmasked classes, z = (x - mean) / sd with sd = std + STANDARDIZE_EPS and std =
// sqrt(m2 / (n - 1)) (m2 the sum of squared deviations; 0 when n <= 1), before the temperature. Given the row sums of
// the gradient G = dL/dz over the unmasked classes, sum_g = sum G and sum_gz = sum G z, the gradient of x is
//     (G - sum_g / n) / sd - z coef,  coef = sum_gz / ((n - 1) std)  (0 when std = 0).
constexpr double STANDARDIZE_EPS = 1e-7;  // kdkernels/methods.py STANDARDIZE_EPS

KD_HD float math_sqrt(float x) {
  return sqrtf(x);
}
KD_HD double math_sqrt(double x) {
  return sqrt(x);
}

template <class T>
struct ZScore {
  T mean, sd, std, n;

  KD_HD static ZScore of(T n, T mean, T m2) {
    const T std = n > T(1) ? math_sqrt(m2 / (n - T(1))) : T(0);
    return {mean, std + T(STANDARDIZE_EPS), std, n};
  }
  KD_HD T coef(T sum_gz) const { return std > T(0) ? sum_gz / ((n - T(1)) * std) : T(0); }
};

// a (log a - log b) from log a, with 0 where a = 0 (also when it underflowed from a finite log a, and when b = 0).
template <class O>
KD_HD typename O::V kl_term(typename O::V a, typename O::V log_a, typename O::V log_b) {
  return O::where_nonzero(a, a * (log_a - log_b));
}

// Whether probabilities p underflow: below the least normal number of the math type, where they count as 0
// (docs/losses.md, "Conventions"; the CPU's exp gives 0 there, and a subnormal would meet infinite log-ratios).
template <class O>
KD_HD typename O::Mask underflows(typename O::V p) {
  using T = typename O::Scalar;
  return O::lt(p, typename O::V(min_normal<T>()));
}

// weight * term, exactly 0 where the weight is 0 whatever the term (inf, NaN): a term of weight 0 contributes
// nothing (docs/losses.md, "The hard-label term").
template <class T>
KD_HD T weighted(T weight, T term) {
  return weight == T(0) ? T(0) : weight * term;
}

}  // namespace KDKERNELS_MATH_NAMESPACE
}  // namespace kdkernels
