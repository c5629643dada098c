// The SIMD policy of row_math.h: its per-element formulas evaluated on at::vec::Vectorized<T>, one lane per class.
// Masks are vectors whose lanes are all ones (true) or all zeros (false), as at::vec's comparisons return them.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

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

  // Stores a whole vector at p with a non-temporal hint where the instruction set has one and p is aligned to the
  // vector: the line goes to memory without first being read into the cache (a plain store reads it, one more
  // pass over the output's bytes). Callers fence (fence_streamed_stores) before other threads may read.
  static void store_streamed(const V& x, T* p) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, x);
      if constexpr (std::is_same_v<T, double>) return _mm512_stream_pd(p, x);
#else
      if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, x);
      if constexpr (std::is_same_v<T, double>) return _mm256_stream_pd(p, x);
#endif
    }
#endif
    x.store(p);
  }
};

// Orders the non-temporal stores of this thread before whatever follows (the end of a worker's rows).
inline void fence_streamed_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace kdkernels::cpu::CPU_CAPABILITY
