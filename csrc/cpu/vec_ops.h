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

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// exp of float lanes, inline (SLEEF's is an out-of-line call, around which the kernel's loops save their vector
// registers): x clamped to [ln FLT_MIN, 89] (the clamps let NaN through), n = round(x / ln 2), r = x - n ln 2 in two
// parts (|r| <= ln 2 / 2), exp(r) = 1 + r + r^2 P(r) with P of degree 5 (Cephes' expf coefficients), times 2^n
// (AVX2: 2^(n - n/2) and then 2^(n/2), both normal numbers). Results below FLT_MIN are 0: lanes past a row's end and
// masked classes (-inf) would otherwise compute denormals, each a microcode assist of about a hundred cycles (V = 100
// ran 1.5x slower), and a class 87 below the row's maximum is 0 to every float32 sum anyway. At most 1.01 ulp from
// exp over every float in [ln FLT_MIN, 89] (0.06 ulp on average); inf above.
inline at::vec::Vectorized<float> exp_float(const at::vec::Vectorized<float>& v) {
  constexpr float LN_FLT_MIN = -87.33654f;
#if defined(CPU_CAPABILITY_AVX512)
  using R = __m512;
  auto set = [](float c) { return _mm512_set1_ps(c); };
  auto fma = [](R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); };
  R x = _mm512_min_ps(set(89.0f), _mm512_max_ps(set(LN_FLT_MIN), v));
  const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, set(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  R r = _mm512_fnmadd_ps(n, set(0.693359375f), x);
#else
  using R = __m256;
  auto set = [](float c) { return _mm256_set1_ps(c); };
  auto fma = [](R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); };
  R x = _mm256_min_ps(set(89.0f), _mm256_max_ps(set(LN_FLT_MIN), v));
  const R n = _mm256_round_ps(_mm256_mul_ps(x, set(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  R r = _mm256_fnmadd_ps(n, set(0.693359375f), x);
#endif
  r = fma(n, set(2.12194440e-4f), r);  // ln 2 = 0.693359375 - 2.12194440e-4, the first part exact in n * it
  R p = fma(set(1.9875691500e-4f), r, set(1.3981999507e-3f));
  p = fma(p, r, set(8.3334519073e-3f));
  p = fma(p, r, set(4.1665795894e-2f));
  p = fma(p, r, set(1.6666665459e-1f));
  p = fma(p, r, set(5.0000001201e-1f));
#if defined(CPU_CAPABILITY_AVX512)
  p = _mm512_add_ps(fma(p, _mm512_mul_ps(r, r), r), set(1.0f));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(v, set(LN_FLT_MIN), _CMP_NLT_UQ), p, n);
#else
  p = _mm256_add_ps(fma(p, _mm256_mul_ps(r, r), r), set(1.0f));
  const __m256i k = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(k, 1);
  auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  const R kept = _mm256_cmp_ps(v, set(LN_FLT_MIN), _CMP_NLT_UQ);
  return _mm256_and_ps(kept, _mm256_mul_ps(_mm256_mul_ps(p, pow2(_mm256_sub_epi32(k, half))), pow2(half)));
#endif
}
#endif

template <class T>
struct VecOps {
  using Scalar = T;
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static constexpr int64_t lanes = V::size();

  // float: exp_float above, inline; double (and builds without AVX2): SLEEF's, 1 ulp. Both give exp(-inf) = 0 and
  // keep NaN.
  static V exp(const V& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) return exp_float(x);
#endif
    return x.exp();
  }
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
