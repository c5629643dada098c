// The SIMD policy of row_math.h: its per-element formulas evaluated on at::vec::Vectorized<T>, one lane per class.
// Masks are vectors whose lanes are all ones (true) or all zeros (false), as at::vec's comparisons return them.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "../row_math.h"

// In the capability namespace: at::vec::Vectorized<T> is a different type in each capability's build.
namespace kdkernels::cpu::CPU_CAPABILITY {

template <class T>
struct VecOps {
  using Scalar = T;
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static constexpr int64_t lanes = V::size();

  static V exp(const V& x) { return x.exp(); }  // SLEEF, 1 ulp: exact enough for -inf (0) and NaN (NaN)
  static V log(const V& x) { return x.log(); }
  static V abs(const V& x) { return x.abs(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static Mask eq(const V& a, const V& b) { return a == b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static Mask ge(const V& a, const V& b) { return a >= b; }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask land(const Mask& a, const Mask& b) { return a & b; }
  static Mask lor(const Mask& a, const Mask& b) { return a | b; }
  static Mask lnot(const Mask& a) { return a ^ all(); }
  static Mask none() { return V(T(0)); }
  static Mask all() { return V(T(0)) == V(T(0)); }
  // Lanes whose index equals (is at most) `offset`; offsets far outside the vector are clamped, so they stay exact.
  static Mask index_eq(const V& iota, int64_t offset) { return iota == V(clamp_offset(offset)); }
  static Mask index_le(const V& iota, int64_t offset) { return iota <= V(clamp_offset(offset)); }
  static V iota() { return V::arange(T(0), T(1)); }

  static T clamp_offset(int64_t offset) { return T(std::min<int64_t>(std::max<int64_t>(offset, -1), lanes)); }
  // Whether any lane of the mask is set.
  static bool any(const Mask& m) { return m.zero_mask() != (1 << lanes) - 1; }
};

}  // namespace kdkernels::cpu::CPU_CAPABILITY
