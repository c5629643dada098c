// The SIMD policy of row_math.h: its per-element formulas evaluated on at::vec::Vectorized<T>, one lane per class
// (masks: VectorMasks, RegisterMasks).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../row_math.h"

// In the capability namespace: at::vec::Vectorized<T> is a different type in each capability's build.
namespace kdkernels::cpu::CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The float lanes of one instruction set, as much of them as exp_float and log_float need.
struct FloatLanes {
#if defined(CPU_CAPABILITY_AVX512)
  using R = __m512;
  using Mask = __mmask16;
  static R set(float c) { return _mm512_set1_ps(c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R fnma(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  // min / max return b where either is NaN (so NaN in b passes through).
  static R min(R a, R b) { return _mm512_min_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R round(R a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT); }
  static Mask cmp_gt(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static bool any(Mask m) { return m != 0; }
  // log's value y of the lanes x that are not positive finite numbers (denormals are: exponent and mantissa
  // normalise them): -inf at 0, inf at inf, NaN at a negative number or NaN.
  static R log_special_lanes(R x, R y) {
    if (_mm512_fpclass_ps_mask(x, 0xdf) == 0) return y;                    // (QNaN, +-0, +-inf, negative, SNaN)
    y = _mm512_mask_mov_ps(y, _mm512_fpclass_ps_mask(x, 0xd1), set(NAN));  // (QNaN, -inf, negative, SNaN)
    y = _mm512_mask_mov_ps(y, _mm512_fpclass_ps_mask(x, 0x06), set(-INFINITY));
    return _mm512_mask_mov_ps(y, _mm512_fpclass_ps_mask(x, 0x08), set(INFINITY));
  }
  static R select(Mask m, R a, R b) { return _mm512_mask_blend_ps(m, b, a); }
  static R zero_where(Mask m, R a) { return _mm512_maskz_mov_ps(Mask(~m), a); }
  // p 2^n for integral n in [-126, 128] (scalef rounds once, inf past the range).
  static R scale(R p, R n) { return _mm512_scalef_ps(p, n); }
  // A positive normal number's exponent e (as a float) and mantissa m in [1, 2): a = m 2^e, one instruction each.
  static R exponent(R a) { return _mm512_getexp_ps(a); }
  static R mantissa(R a) { return _mm512_getmant_ps(a, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src); }
#else
  using R = __m256;
  using I = __m256i;
  using Mask = __m256;
  static R set(float c) { return _mm256_set1_ps(c); }
  static I set(int32_t c) { return _mm256_set1_epi32(c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R fnma(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }
  static R min(R a, R b) { return _mm256_min_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R round(R a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT); }
  static Mask cmp_gt(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static bool any(Mask m) { return _mm256_movemask_ps(m) != 0; }
  static bool any_not_normal_positive(R a) {  // (a < FLT_MIN or a > FLT_MAX, either true for NaN)
    return any(_mm256_or_ps(_mm256_cmp_ps(a, set(FLT_MIN), _CMP_NGE_UQ), _mm256_cmp_ps(a, set(FLT_MAX), _CMP_NLE_UQ)));
  }
  static R select(Mask m, R a, R b) { return _mm256_blendv_ps(b, a, m); }
  static R zero_where(Mask m, R a) { return _mm256_andnot_ps(m, a); }
  // p 2^n as p 2^(n - n/2) 2^(n/2), both factors normal numbers: only the last product rounds.
  static R scale(R p, R n) {
    const I k = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(k, 1);
    auto pow2 = [](I e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, set(127)), 23)); };
    return _mm256_mul_ps(_mm256_mul_ps(p, pow2(_mm256_sub_epi32(k, half))), pow2(half));
  }
  // The same from the bits: the biased exponent field less 127, and the mantissa field under the exponent of 1.
  static R exponent(R a) {
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(a), 23), set(int32_t(127))));
  }
  static R mantissa(R a) {
    const I fraction = _mm256_and_si256(_mm256_castps_si256(a), set(int32_t(0x007fffff)));
    return _mm256_castsi256_ps(_mm256_or_si256(fraction, set(int32_t(0x3f800000))));
  }
#endif
};

// ln 2 in two parts: the first exact in n * it for every exponent n a float has.
constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;

// exp of float lanes, inline (SLEEF's is an out-of-line call, around which the kernel's loops save their vector
// registers): x clamped to [ln FLT_MIN, 89] (the clamps let NaN through), n = round(x / ln 2), r = x - n ln 2
// (|r| <= ln 2 / 2), exp(r) = 1 + r + r^2 P(r) with P of degree 5 (Cephes' expf coefficients), times 2^n. Results
// below FLT_MIN are 0: lanes past a row's end and masked classes (-inf) would otherwise compute denormals, each a
// microcode assist of about a hundred cycles, and a class 87 below the row's maximum is 0
// to every float32 sum anyway. At most 1.01 ulp from exp over every float in [ln FLT_MIN, 89] (0.06 ulp on
// average); inf above.
inline at::vec::Vectorized<float> exp_float(const at::vec::Vectorized<float>& v) {
  using F = FloatLanes;
  constexpr float LN_FLT_MIN = -87.33654f;
  const F::R x = F::min(F::set(89.0f), F::max(F::set(LN_FLT_MIN), v));
  const F::R n = F::round(F::mul(x, F::set(1.44269504088896341f)));
  const F::R r = F::fnma(n, F::set(LN2_LO), F::fnma(n, F::set(LN2_HI), x));
  F::R p = F::fma(F::set(1.9875691500e-4f), r, F::set(1.3981999507e-3f));
  p = F::fma(p, r, F::set(8.3334519073e-3f));
  p = F::fma(p, r, F::set(4.1665795894e-2f));
  p = F::fma(p, r, F::set(1.6666665459e-1f));
  p = F::fma(p, r, F::set(5.0000001201e-1f));
  p = F::add(F::fma(p, F::mul(r, r), r), F::set(1.0f));
  return F::zero_where(F::cmp_gt(F::set(LN_FLT_MIN), v), F::scale(p, n));  // (an ordered compare: NaN stays)
}

// log of float lanes, inline, when every lane is a normal positive number (a row's mixtures, clamped to FLT_MIN):
// x = m 2^e with m in (sqrt(1/2), sqrt(2)] (FloatLanes' exponent and mantissa), log x = e ln 2 + log(1 + f), f = m - 1,
// with log(1 + f) = f - f^2 / 2 + f^3 P(f), P of degree 8 (Cephes' logf coefficients). At most 0.83 ulp from log over
// every float in [FLT_MIN, FLT_MAX]. On AVX-512 the same for denormals, and the other lanes get their value inline
// (FloatLanes::log_special_lanes: no call, around which the kernels' loops would keep their vectors in memory); on
// AVX2 a vector with any other lane (0, a denormal, a negative number, inf, NaN) goes to SLEEF's log instead, which
// gives -inf, NaN and inf where they belong.
inline at::vec::Vectorized<float> log_float(const at::vec::Vectorized<float>& v) {
  using F = FloatLanes;
  const F::R x = v;
#if !defined(CPU_CAPABILITY_AVX512)
  if (F::any_not_normal_positive(x)) return v.log();
#endif
  F::R e = F::exponent(x), m = F::mantissa(x);
  const F::Mask high = F::cmp_gt(m, F::set(1.41421356f));  // m in [1, 2) to (sqrt(1/2), sqrt(2)]
  m = F::select(high, F::mul(m, F::set(0.5f)), m);
  e = F::select(high, F::add(e, F::set(1.0f)), e);
  const F::R f = F::add(m, F::set(-1.0f)), f2 = F::mul(f, f);
  F::R p = F::fma(F::set(7.0376836292e-2f), f, F::set(-1.1514610310e-1f));
  p = F::fma(p, f, F::set(1.1676998740e-1f));
  p = F::fma(p, f, F::set(-1.2420140846e-1f));
  p = F::fma(p, f, F::set(1.4249322787e-1f));
  p = F::fma(p, f, F::set(-1.6668057665e-1f));
  p = F::fma(p, f, F::set(2.0000714765e-1f));
  p = F::fma(p, f, F::set(-2.4999993993e-1f));
  p = F::fma(p, f, F::set(3.3333331174e-1f));
  const F::R y = F::fma(f2, F::set(-0.5f), F::fma(e, F::set(LN2_LO), F::mul(F::mul(p, f), f2)));
#if defined(CPU_CAPABILITY_AVX512)
  return F::log_special_lanes(x, F::fma(e, F::set(LN2_HI), F::add(f, y)));
#else
  return F::fma(e, F::set(LN2_HI), F::add(f, y));
#endif
}
#endif

// VecOps' masks and the operations on them: vectors whose lanes are all ones (true) or all zeros (false), as at::vec's
// comparisons return them.
template <class T>
struct VectorMasks {
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static constexpr int64_t lanes = V::size();

  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static Mask eq(const V& a, const V& b) { return a == b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static Mask ge(const V& a, const V& b) { return a >= b; }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask le(const V& a, const V& b) { return a <= b; }
  static Mask land(const Mask& a, const Mask& b) { return a & b; }
  static Mask lor(const Mask& a, const Mask& b) { return a | b; }
  static Mask lnot(const Mask& a) { return a ^ all(); }
  static Mask none() { return V(T(0)); }
  static Mask all() { return V(T(0)) == V(T(0)); }
  // Whether any lane of the mask is set.
  static bool any(const Mask& m) { return m.zero_mask() != (1 << lanes) - 1; }
  // The lanes of the mask that are set, as bits (lane k: bit k).
  static uint32_t lane_bits(const Mask& m) { return ~uint32_t(m.zero_mask()) & ((uint32_t(1) << lanes) - 1); }
};

#if defined(CPU_CAPABILITY_AVX512)
// The same on AVX-512, as a mask register's lane bits (lanes past the vector's are 0): a compare is one instruction and
// a select one blend, where at::vec's compare also widens its mask into a vector and its select compares that again.
// The same predicates as at::vec's compares (ordered: false where a lane is NaN).
template <class T>
struct RegisterMasks {
  using V = at::vec::Vectorized<T>;
  struct Mask {
    __mmask16 bits = 0;
  };
  static constexpr int64_t lanes = V::size();
  static constexpr __mmask16 ALL = __mmask16((uint32_t(1) << lanes) - 1);

  static V select(Mask m, const V& a, const V& b) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_mask_blend_ps(m.bits, b, a);
    } else {
      return _mm512_mask_blend_pd(__mmask8(m.bits), b, a);
    }
  }
  template <int PREDICATE>
  static Mask compare(const V& a, const V& b) {
    if constexpr (std::is_same_v<T, float>) {
      return {_mm512_cmp_ps_mask(a, b, PREDICATE)};
    } else {
      return {__mmask16(_mm512_cmp_pd_mask(a, b, PREDICATE))};
    }
  }
  static Mask eq(const V& a, const V& b) { return compare<_CMP_EQ_OQ>(a, b); }
  static Mask gt(const V& a, const V& b) { return compare<_CMP_GT_OQ>(a, b); }
  static Mask ge(const V& a, const V& b) { return compare<_CMP_GE_OQ>(a, b); }
  static Mask lt(const V& a, const V& b) { return compare<_CMP_LT_OQ>(a, b); }
  static Mask le(const V& a, const V& b) { return compare<_CMP_LE_OQ>(a, b); }
  static Mask land(Mask a, Mask b) { return {__mmask16(a.bits & b.bits)}; }
  static Mask lor(Mask a, Mask b) { return {__mmask16(a.bits | b.bits)}; }
  static Mask lnot(Mask a) { return {__mmask16(~a.bits & ALL)}; }
  static Mask none() { return {}; }
  static Mask all() { return {ALL}; }
  static bool any(Mask m) { return m.bits != 0; }
  static uint32_t lane_bits(Mask m) { return m.bits; }
};
template <class T>
using MaskOps =
    std::conditional_t<std::is_same_v<T, float> || std::is_same_v<T, double>, RegisterMasks<T>, VectorMasks<T>>;
#else
template <class T>
using MaskOps = VectorMasks<T>;
#endif

template <class T>
struct VecOps : MaskOps<T> {
  using Scalar = T;
  using V = at::vec::Vectorized<T>;
  using typename MaskOps<T>::Mask;
  using MaskOps<T>::select, MaskOps<T>::eq, MaskOps<T>::le;
  static constexpr int64_t lanes = V::size();

  // exp and log: float's inline above; double's (and those of builds without AVX2) SLEEF's, 1 ulp. All give
  // exp(-inf) = 0 and keep NaN.
  static V exp(const V& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) return exp_float(x);
#endif
    return x.exp();
  }
  static V log(const V& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) return log_float(x);
#endif
    return x.log();
  }
  // x where a is not 0 (NaN included), else 0: on AVX-512 a compare into a mask register and a masked move, where
  // select(eq(...)) takes four instructions (at::vec's compares return vectors).
  static V where_nonzero(const V& a, const V& x) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, V(T(0)), _CMP_NEQ_UQ), x);
    if constexpr (std::is_same_v<T, double>) return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(a, V(T(0)), _CMP_NEQ_UQ), x);
#endif
    return select(eq(a, V(T(0))), V(T(0)), x);
  }
  // Lanes [0, n) of p (0 < n < lanes), the others `fill`: a masked load, inline (at::vec's set, which blends a
  // partial load into a vector, is out of line: a call per row's last vector, its vector registers saved around it).
  static V loadu_or(const T* p, int64_t n, T fill) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) return _mm512_mask_loadu_ps(V(fill), __mmask16((1u << n) - 1), p);
    if constexpr (std::is_same_v<T, double>) return _mm512_mask_loadu_pd(V(fill), __mmask8((1u << n) - 1), p);
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      return _mm256_blendv_ps(V(fill), _mm256_maskload_ps(p, in), _mm256_castsi256_ps(in));
    }
    if constexpr (std::is_same_v<T, double>) {
      const __m256i in = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
      return _mm256_blendv_pd(V(fill), _mm256_maskload_pd(p, in), _mm256_castsi256_pd(in));
    }
#endif
    return V::set(V(fill), V::loadu(p, n), n);
  }
  static V abs(const V& x) { return x.abs(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  // max(a, b), b where either is NaN: one vmaxps / vmaxpd, where at::vec::maximum (which keeps NaN) takes three or
  // four; without AVX2, at::vec::maximum.
  static V max_or_second(const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) return _mm512_max_ps(a, b);
    if constexpr (std::is_same_v<T, double>) return _mm512_max_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) return _mm256_max_ps(a, b);
    if constexpr (std::is_same_v<T, double>) return _mm256_max_pd(a, b);
#endif
    return max(a, b);
  }
  static V floor_at(const V& x, const V& lo) { return max_or_second(lo, x); }  // max(x, lo), NaN where x is
  // Lanes whose index equals (is at most) `offset`; offsets far outside the vector are clamped, so they stay exact.
  static Mask index_eq(const V& iota, int64_t offset) { return eq(iota, V(clamp_offset(offset))); }
  static Mask index_le(const V& iota, int64_t offset) { return le(iota, V(clamp_offset(offset))); }
  static V iota() { return V::arange(T(0), T(1)); }

  static T clamp_offset(int64_t offset) { return T(std::min<int64_t>(std::max<int64_t>(offset, -1), lanes)); }

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

// Stores float lanes [0, n) at p as bfloat16, rounded to nearest even as at::vec::convert rounds a float row; with
// `streamed`, a whole vector at an address aligned to its bytes goes to memory as store_streamed's do. Always inline:
// the compiler kept it out of line, a call per vector of the gradient loops, with their vector registers saved
// around it.
C10_ALWAYS_INLINE void store_bf16(const at::vec::Vectorized<float>& x, c10::BFloat16* p, int64_t n, bool streamed) {
  constexpr int64_t lanes = at::vec::Vectorized<float>::size();
#if defined(CPU_CAPABILITY_AVX512)
  // at::vec::convert's rounding, bits + 0x7fff + (bit 16); a NaN lane keeps its top bits with the quiet bit set
  // instead: the carry would turn a NaN whose low bits are set into 0 or inf.
  const __m512i bits = _mm512_castps_si512(x), one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i rounded = _mm512_mask_or_epi32(
      _mm512_add_epi32(_mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), one), bias), bits), nan, bits,
      _mm512_set1_epi32(0x00400000));
  const __m256i b = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  if (streamed && n == lanes && reinterpret_cast<uintptr_t>(p) % (2 * lanes) == 0) {
    return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), b);
  }
  if (n == lanes) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b);
  return _mm256_mask_storeu_epi16(p, __mmask16((uint32_t(1) << n) - 1), b);
#else
  const at::vec::Vectorized<c10::BFloat16> b = at::vec::convert<c10::BFloat16>(x);
  if (streamed && n == lanes && reinterpret_cast<uintptr_t>(p) % (2 * lanes) == 0) {
#if defined(CPU_CAPABILITY_AVX2)
    return _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(b));
#endif
  }
  b.store(p, n);
#endif
}

// Orders the non-temporal stores of this thread before whatever follows (the end of a worker's rows).
inline void fence_streamed_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace kdkernels::cpu::CPU_CAPABILITY
