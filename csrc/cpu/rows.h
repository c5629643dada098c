// What the fused CPU kernels of both families (divergence.cpp, decoupled.cpp) share: SIMD loads and lane
// reductions, row conversion to the math type, and the loop over a worker's rows.
//
// Rows whose dtype is not the math type are first converted into a row buffer (but for two bf16 inputs, which the
// kernels load and convert a vector at a time); the gradient is written in the math type and converted into the
// student's dtype the same way. Ignored rows are not read: loss 0, gradient 0. After the
// first read a row (2 x 4 bytes x V: 256 KB at V = 32000) stays in L2 for the passes that follow.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "vec_ops.h"

#ifndef CPU_CAPABILITY
#error "setup.py compiles the CPU kernels once per CPU capability, with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

namespace kdkernels::cpu::CPU_CAPABILITY {
namespace {

using c10::ScalarType;

template <class M>
using Ops = VecOps<M>;
template <class M>
using Vec = typename VecOps<M>::V;

// The lanes of p[0, n) (n <= lanes); lanes past n hold -inf: a masked class, which adds 0 to every sum. (Always
// inlined: a call returns the vector through memory, which costs a short row more than its loads.)
template <class M>
C10_ALWAYS_INLINE at::vec::Vectorized<M> load(const M* p, int64_t n) {
  if (n == Ops<M>::lanes) return Vec<M>::loadu(p);
  return Ops<M>::loadu_or(p, n, neg_inf<M>());
}

// The same from a bfloat16 row, as float lanes (each value's 16 bits shifted into a float's top half, a vector at a
// time): the kernels read bf16 rows where they are, without a float copy of the row.
C10_ALWAYS_INLINE at::vec::Vectorized<float> load(const c10::BFloat16* p, int64_t n) {
  constexpr int64_t L = Ops<float>::lanes;
  at::vec::Vectorized<float> out;
  if (n == L) {
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  }
#if defined(CPU_CAPABILITY_AVX512)
  // (A masked load, inline: the copy below is a call, around which the row's loops keep their vectors in memory.)
  const __m256i fill = _mm256_set1_epi16(int16_t(c10::BFloat16(neg_inf<float>()).x));
  const __m256i bits = _mm256_mask_loadu_epi16(fill, __mmask16((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
#else
  c10::BFloat16 lanes[L];
  std::fill(std::copy(p, p + n, lanes), lanes + L, c10::BFloat16(neg_inf<float>()));
  at::vec::load_fp32_from_bf16(lanes, out);
  return out;
#endif
}

// A vector's lanes reduced by op(a, b) as at::vec::vec_reduce_all reduces them (the same shuffles: the same sums),
// inline for float on AVX2 / AVX-512, where torch's may be a call (max_lanes' was, a call per row with its vector
// registers saved around it).
template <class M, class Op>
C10_ALWAYS_INLINE M reduce_lanes(const at::vec::Vectorized<M>& v, Op op) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<M, float>) {
    Vec<M> x = op(v, Vec<M>(_mm512_shuffle_f32x4(v, v, 0x4E)));
    x = op(x, Vec<M>(_mm512_shuffle_f32x4(x, x, 0xB1)));
    x = op(x, Vec<M>(_mm512_shuffle_ps(x, x, 0x4E)));
    return _mm512_cvtss_f32(op(x, Vec<M>(_mm512_shuffle_ps(x, x, 0xB1))));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<M, float>) {
    Vec<M> x = op(v, Vec<M>(_mm256_permute2f128_ps(v, v, 0x1)));
    x = op(x, Vec<M>(_mm256_shuffle_ps(x, x, 0x4E)));
    return _mm256_cvtss_f32(op(x, Vec<M>(_mm256_shuffle_ps(x, x, 0xB1))));
  }
#endif
  return at::vec::vec_reduce_all<M>(op, v);
}

template <class M>
C10_ALWAYS_INLINE M sum_lanes(const at::vec::Vectorized<M>& v) {
  return reduce_lanes(v, [](const Vec<M>& a, const Vec<M>& b) { return a + b; });
}

// (max propagates NaN.)
template <class M>
C10_ALWAYS_INLINE M max_lanes(const at::vec::Vectorized<M>& v) {
  return reduce_lanes(v, [](const Vec<M>& a, const Vec<M>& b) { return Ops<M>::max(a, b); });
}

// A per-lane sum over a row, added up in chunks of 64 vectors: each lane then rounds about 64 + V / (64 L) partial
// sums instead of V / L (at V = 70000, 4400 float32 additions per lane cost the gradient 4e-5 relative error).
template <class M>
struct ChunkedSum {
  static constexpr int CHUNK = 64;
  at::vec::Vectorized<M> total = at::vec::Vectorized<M>(M(0)), part = at::vec::Vectorized<M>(M(0));
  int count = 0;

  void add(const at::vec::Vectorized<M>& x) {
    part += x;
    if (++count == CHUNK) {
      total += part;
      part = at::vec::Vectorized<M>(M(0));
      count = 0;
    }
  }
  C10_ALWAYS_INLINE M sum() const { return sum_lanes(total + part); }
};

template <class M, class S>
const M* converted(const S* src, int64_t v, M* buf) {
  if constexpr (std::is_same_v<M, S>) {
    return src;
  } else {
    at::vec::convert(src, buf, v);
    return buf;
  }
}

// Row `i` of an [N, V] input as M values: the row itself when its dtype is M, else its conversion into buf.
template <class M>
const M* row_as(const void* base, ScalarType dtype, int64_t stride, int64_t i, int64_t v, M* buf) {
  const int64_t offset = i * stride;
  switch (dtype) {
    case ScalarType::Float:
      return converted(static_cast<const float*>(base) + offset, v, buf);
    case ScalarType::Double:
      return converted(static_cast<const double*>(base) + offset, v, buf);
    case ScalarType::BFloat16:
      return converted(static_cast<const c10::BFloat16*>(base) + offset, v, buf);
    default:
      return converted(static_cast<const c10::Half*>(base) + offset, v, buf);
  }
}

template <class M>
void store_row(const M* g, int64_t v, ScalarType dtype, void* out) {
  switch (dtype) {
    case ScalarType::Float:
      return at::vec::convert(g, static_cast<float*>(out), v);
    case ScalarType::Double:
      return at::vec::convert(g, static_cast<double*>(out), v);
    case ScalarType::BFloat16:
      return at::vec::convert(g, static_cast<c10::BFloat16*>(out), v);
    default:
      return at::vec::convert(g, static_cast<c10::Half*>(out), v);
  }
}

template <class M>
constexpr ScalarType math_dtype() {
  return std::is_same_v<M, double> ? ScalarType::Double : ScalarType::Float;
}

// Row-sized buffers of one worker: converted inputs, the gradient in M, whatever the family keeps per class, with
// standardize both rows' z-scores and a copy of the raw student row, and with the teacher's gradient its row in M.
template <class M>
struct RowBuffers {
  std::vector<M> memory;
  M *s, *t, *g, *extra, *zs, *zt, *raw, *gt;

  // Set by for_rows for the row at hand: the next row's inputs (nullptr at the last), which the kernel's passes over
  // the cached row prefetch a slice at a time (prefetch_next_row); whether the gradient row is the output itself
  // and large enough to be written with streaming stores (store_grad_vector); and, for the rows of two bf16 inputs
  // with a gradient, the bf16 output row, which store_grad_vector writes a vector at a time (the kernel's g, the
  // float row buffer, then stays unwritten: no float row is stored and read back to be converted).
  const char *next_s = nullptr, *next_t = nullptr;
  int64_t s_item = 0, t_item = 0;
  bool stream_grad = false;
  c10::BFloat16* grad_bf16 = nullptr;

  RowBuffers(const RowsArgs& a, int extra_rows)
      : memory(size_t(a.v) * (3 + extra_rows + (a.opt.standardize ? 3 : 0) + (a.teacher_grad ? 1 : 0))) {
    s = memory.data();
    t = s + a.v;
    g = t + a.v;
    extra = g + a.v;
    zs = extra + size_t(a.v) * extra_rows;
    zt = zs + (a.opt.standardize ? a.v : 0);
    raw = zt + (a.opt.standardize ? a.v : 0);
    gt = raw + (a.opt.standardize ? a.v : 0);
  }
};

// Gradients of at least this many bytes in all are written with streaming stores: they do not fit any cache, so a
// plain store's read of each line before writing it is only a wasted pass over memory.
constexpr int64_t STREAM_GRAD_BYTES = int64_t(8) << 20;

// Prefetches into L2 the part of the next row's inputs that matches classes [j, j + n) of a pass over the row at hand:
// the pass computes from the cached row while the next one comes in from memory.
template <class M>
void prefetch_next_row(const RowBuffers<M>& buf, int64_t j, int64_t n) {
  if (buf.next_s == nullptr) return;
  for (int64_t b = j * buf.s_item; b < (j + n) * buf.s_item; b += 64) __builtin_prefetch(buf.next_s + b, 0, 2);
  for (int64_t b = j * buf.t_item; b < (j + n) * buf.t_item; b += 64) __builtin_prefetch(buf.next_t + b, 0, 2);
}

// Stores the gradient of classes [j, j + n) of a row: into buf.grad_bf16 when set, else into g; whole vectors streamed
// when buf.stream_grad. Always inline: called out of line, once a vector, it made the gradient loops save and reload
// their vector registers around it.
template <class M>
C10_ALWAYS_INLINE void store_grad_vector(const RowBuffers<M>& buf, const Vec<M>& x, M* g, int64_t j, int64_t n) {
  if constexpr (std::is_same_v<M, float>) {
    if (buf.grad_bf16 != nullptr) return store_bf16(x, buf.grad_bf16 + j, n, buf.stream_grad);
  }
  if (buf.stream_grad && n == Ops<M>::lanes) return Ops<M>::store_streamed(x, g + j);
  x.store(g + j, n);
}

// Writes 0 over a row's gradients, its cross-entropy and its d loss / d T (a row whose classes are all masked in both
// logits).
template <class M>
M skip_row(M* g, M* ce, int64_t v, M* gt = nullptr, M* dtemp = nullptr) {
  if (g != nullptr) std::fill(g, g + v, M(0));
  if (gt != nullptr) std::fill(gt, gt + v, M(0));
  if (ce != nullptr) *ce = M(0);
  if (dtemp != nullptr) *dtemp = M(0);
  return M(0);
}

// The same for a kernel's row, whose gradient may go to the bf16 output row (RowBuffers::grad_bf16).
template <class M>
M skip_row(const RowBuffers<M>& buf, M* g, M* ce, int64_t v, M* gt, M* dtemp) {
  if (buf.grad_bf16 != nullptr) std::fill(buf.grad_bf16, buf.grad_bf16 + v, c10::BFloat16(0.0f));
  return skip_row(g, ce, v, gt, dtemp);
}

// A row's part of d loss / d T (docs/losses.md, "Learnable temperature"): -sum_j ((x_j - mx) g_j + (y_j - my) gt_j)
// over vectors of classes (x = s / T and y = t / T, or the z-scores over T; the gradients before the z-score's
// Jacobian), plus 2 scale l with T^2 scaling; masked classes add 0.
template <class M>
struct TemperatureGrad {
  at::vec::Vectorized<M> shift_x, shift_y;
  ChunkedSum<M> sum;

  void add(const at::vec::Vectorized<M>& x, const at::vec::Vectorized<M>& g, const at::vec::Vectorized<M>& y,
           const at::vec::Vectorized<M>& gt) {
    using O = Ops<M>;
    using V = Vec<M>;
    const V ninf(neg_inf<M>()), zero(M(0));
    sum.add(O::select(O::eq(x, ninf), zero, (x - shift_x) * g) + O::select(O::eq(y, ninf), zero, (y - shift_y) * gt));
  }
  M value(bool t2_scale, M scale, M loss) const {
    if (scale == M(0)) return M(0);  // (distill_weight = 0: the gradients summed are 0, the loss may be inf)
    return (t2_scale ? M(2) * scale * loss : M(0)) - sum.sum();
  }
};

// The count and sum of a row's classes that are not -inf (lanes past v load as -inf); x of M or bf16.
template <class M, class S>
std::pair<M, M> unmasked_count_sum(const S* x, int64_t v) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V ninf(neg_inf<M>()), zero(M(0));
  ChunkedSum<M> count, sum;
  for (int64_t j = 0; j < v; j += L) {
    const V xj = load(x + j, std::min(L, v - j));
    const auto unmasked = O::lnot(O::eq(xj, ninf));
    count.add(O::select(unmasked, V(M(1)), zero));
    sum.add(O::select(unmasked, xj, zero));
  }
  return {count.sum(), sum.sum()};
}

// The hard-label term's options of a call: its gradient factor ce_weight / denominator and label smoothing's eps.
template <class M>
struct CeOptions {
  M scale, smoothing;
  static CeOptions of(const RowsArgs& a) { return {M(a.ce_scale), M(a.opt.label_smoothing)}; }
};

// The hard-label term of one row at T = 1 (docs/losses.md, "The hard-label term"), from m1 = max s and
// lz1 = log sum exp(s - m1): m1 + lz1 - (1 - eps) s_target - eps * (the mean of the unmasked s); its gradient
// scale (exp(s_j - m1 - lz1) - (1 - eps) [j = target] - eps / K [s_j unmasked]) joins the gradient row, K the
// unmasked classes' count, which loss() finds: it runs first, before an in-place gradient overwrites s.
template <class M>
struct CrossEntropy {
  M m1, lz1;
  CeOptions<M> options;
  int64_t target;
  mutable M share = M(0);  // eps / K

  // (A constructor, not an aggregate: brace elision would let a bare scale fill options and shift target.)
  CrossEntropy(M m1_, M lz1_, CeOptions<M> options_, int64_t target_)
      : m1(m1_), lz1(lz1_), options(options_), target(target_) {}

  // (An index outside [0, V), which the op's callers never pass, gives NaN and is never read.)
  template <class S>
  M loss(const S* s, int64_t v) const {
    if (target < 0 || target >= v) return M(NAN);
    const M eps = options.smoothing, s_target(s[target]);
    // (m1 - s_target first: both near a logit of 1000, say, their difference is exact, and their sum with lz1 is not.)
    if (eps == M(0)) return (m1 - s_target) + lz1;
    const auto [count, sum] = unmasked_count_sum<M>(s, v);
    share = eps / count;
    return (M(1) - eps) * (m1 - s_target) + eps * (m1 - sum / count) + lz1;
  }
  at::vec::Vectorized<M> grad(const at::vec::Vectorized<M>& s, const at::vec::Vectorized<M>& iota, int64_t j) const {
    using V = at::vec::Vectorized<M>;
    return grad_of(s, V(m1), V(lz1), Ops<M>::index_eq(iota, target - j), V(share), options);
  }
  // The same from vectors: m1, lz1 and share per lane, and which lanes are the target (a block of short rows has one
  // row per lane).
  static at::vec::Vectorized<M> grad_of(const Vec<M>& s, const Vec<M>& m1, const Vec<M>& lz1,
                                        const typename Ops<M>::Mask& is_target, const Vec<M>& share,
                                        CeOptions<M> options) {
    using V = at::vec::Vectorized<M>;
    using O = Ops<M>;
    if (options.scale == M(0)) return V(M(0));  // (ce_weight = 0: no gradient, whatever the logits)
    V g = O::exp(s - m1 - lz1) - O::select(is_target, V(M(1) - options.smoothing), V(M(0)));
    if (options.smoothing != M(0)) g = g - O::select(O::lnot(O::eq(s, V(neg_inf<M>()))), share, V(M(0)));
    return g * V(options.scale);
  }
};

// A row's z-score (row_math.h ZScore) over the classes that are not -inf: the count and sum, then the deviations
// from that mean and their squares (the row is in cache for the second pass), which correct it: a float32 sum of
// logits near 1000 is off by more than the spread of a z-score can afford.
template <class M>
ZScore<M> row_zscore(const M* x, int64_t v) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V ninf(neg_inf<M>()), zero(M(0));
  const auto [n, sum] = unmasked_count_sum<M>(x, v);
  const M rough = n > M(0) ? sum / n : M(0);
  ChunkedSum<M> dev, m2;
  for (int64_t j = 0; j < v; j += L) {
    const V xj = load(x + j, std::min(L, v - j)), d = O::select(O::eq(xj, ninf), zero, xj - V(rough));
    dev.add(d);
    m2.add(d * d);
  }
  const M shift = n > M(0) ? dev.sum() / n : M(0);
  return ZScore<M>::of(n, rough + shift, m2.sum() - shift * shift * n);
}

// z = (x - mean) / sd over a row, -inf kept.
template <class M>
void write_zscore(const M* x, int64_t v, const ZScore<M>& zs, M* z) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V ninf(neg_inf<M>());
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V xj = load(x + j, n);
    O::select(O::eq(xj, ninf), ninf, (xj - V(zs.mean)) / V(zs.sd)).store(z + j, n);
  }
}

// g = dL/dz over a row becomes dL/dx through the z-score z of x (row_math.h ZScore), plus extra(j, n) (a vector).
template <class M, class Extra>
void through_zscore(M* g, const M* z, const ZScore<M>& zs, int64_t v, Extra&& extra) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V ninf(neg_inf<M>()), zero(M(0));
  ChunkedSum<M> sum_g, sum_gz;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V gj = V::loadu(g + j, n), zj = load(z + j, n);
    const auto masked = O::eq(zj, ninf);
    sum_g.add(O::select(masked, zero, gj));
    sum_gz.add(O::select(masked, zero, gj * zj));
  }
  const V mean_g(sum_g.sum() / zs.n), inv_sd(M(1) / zs.sd), coef(zs.coef(sum_gz.sum()));
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V zj = load(z + j, n);
    (O::select(O::eq(zj, ninf), zero, (V::loadu(g + j, n) - mean_g) * inv_sd - zj * coef) + extra(j, n))
        .store(g + j, n);
  }
}

// One row of the option standardize: row(zs, zt, target, g, nullptr, t, sd_t, gt, dtemp) -> loss runs the family on
// both rows' z-scores (a partition ranks the raw teacher row t, its threshold scaled by the teacher's sd) and writes
// G = dL/dz into g (and the teacher's into gt; dtemp is d loss / d T, which the z-score does not change); here they
// become dL/ds (dL/dt) through the z-scores' Jacobians (row_math.h ZScore), and the cross-entropy term, which keeps
// the raw logits, is added. buf holds the z-scores and, when g overwrites s (in place), a copy of s. distilled: the
// method's gradient is weighed in (distill_weight != 0); else g and gt hold 0, which stays 0 (not the Jacobian's
// product with a NaN z-score, whatever the row holds).
template <class M, class Row>
M standardized_row(const M* s, const M* t, int64_t target, M* g, M* ce, int64_t v, CeOptions<M> ce_options,
                   bool distilled, RowBuffers<M>& buf, M* gt, M* dtemp, Row&& row) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const ZScore<M> student = row_zscore(s, v), teacher = row_zscore(t, v);
  if (student.n == M(0) && teacher.n == M(0)) return skip_row(g, ce, v, gt, dtemp);  // all classes masked in both
  write_zscore(s, v, student, buf.zs);
  write_zscore(t, v, teacher, buf.zt);
  if (g == s) s = static_cast<const M*>(std::memcpy(buf.raw, s, size_t(v) * sizeof(M)));
  const V ninf(neg_inf<M>()), iota = O::iota();
  CrossEntropy<M> xent{M(0), M(0), ce_options, target};  // (with the term: m1 = max s, lz1 = log sum exp(s - m1))
  if (ce != nullptr) {
    V vm1 = ninf;
    for (int64_t j = 0; j < v; j += L) vm1 = O::max(vm1, load(s + j, std::min(L, v - j)));
    xent.m1 = max_lanes(vm1);
    ChunkedSum<M> z1;
    for (int64_t j = 0; j < v; j += L) z1.add(O::exp(load(s + j, std::min(L, v - j)) - V(safe_shift(xent.m1))));
    xent.lz1 = std::log(z1.sum());
  }
  const M loss = row(buf.zs, buf.zt, target, g, nullptr, t, teacher.sd, gt, dtemp);
  if (ce != nullptr) *ce = xent.loss(s, v);
  auto ce_grad = [&](int64_t j, int64_t n) { return ce != nullptr ? xent.grad(load(s + j, n), iota, j) : V(M(0)); };
  if (g != nullptr && distilled) {
    through_zscore(g, buf.zs, student, v, ce_grad);
  } else if (g != nullptr) {
    for (int64_t j = 0; j < v; j += L) ce_grad(j, std::min(L, v - j)).store(g + j, std::min(L, v - j));
  }
  if (gt != nullptr && distilled) through_zscore(gt, buf.zt, teacher, v, [](int64_t, int64_t) { return V(M(0)); });
  return loss;
}

// Runs row(s, t, target, g, ce, t_rank, rank_scale, gt, dtemp) -> loss over the rows [begin, end): s, t and t_rank
// are rows in M, or (M float, both inputs bf16, no standardize) the bf16 input rows themselves; g is the gradient
// row in M (nullptr without a gradient), written straight into the output when the student's dtype is M; ce is where
// the row's cross-entropy goes (nullptr without the term); a partition ranks t_rank (t itself) and scales its
// threshold by rank_scale (1); gt is the teacher's gradient row in M (nullptr unless stored) and dtemp where the
// row's d loss / d T goes (nullptr unless the full gradient is asked for). With standardize the row runs through
// standardized_row.
template <class M, class Row>
void for_rows(const RowsArgs& a, int64_t begin, int64_t end, RowBuffers<M>& buf, Row&& row) {
  M* loss = static_cast<M*>(a.loss);
  M* ce_loss = static_cast<M*>(a.ce_loss);
  M* temperature_grad = static_cast<M*>(a.temperature_grad);
  const bool grad_in_place = a.student_dtype == math_dtype<M>();
  const bool teacher_grad_in_place = a.teacher_dtype == math_dtype<M>();
  const size_t grad_row_bytes = size_t(a.v) * c10::elementSize(a.student_dtype);
  const size_t teacher_grad_row_bytes = size_t(a.v) * c10::elementSize(a.teacher_dtype);
  // Rows of two bf16 inputs go to the row function as they are (it loads them through load(const BFloat16*)), and
  // their gradient goes to the bf16 output a vector at a time (store_grad_vector).
  const bool bf16_rows = std::is_same_v<M, float> && !a.opt.standardize && a.student_dtype == ScalarType::BFloat16 &&
                         a.teacher_dtype == ScalarType::BFloat16;
  // (Not with standardize, which reads the gradient row back through the z-score's Jacobian; nor into a bf16 student
  // in place, whose cache line the next vector still reads.)
  const bool grad_output = grad_in_place || (bf16_rows && a.grad != a.student);
  buf.stream_grad = grad_output && !a.opt.standardize && int64_t(grad_row_bytes) * a.n >= STREAM_GRAD_BYTES;
  buf.s_item = int64_t(c10::elementSize(a.student_dtype));
  buf.t_item = int64_t(c10::elementSize(a.teacher_dtype));
  for (int64_t i = begin; i < end; ++i) {
    buf.next_s = i + 1 < end ? static_cast<const char*>(a.student) + (i + 1) * a.student_stride * buf.s_item : nullptr;
    buf.next_t = i + 1 < end ? static_cast<const char*>(a.teacher) + (i + 1) * a.teacher_stride * buf.t_item : nullptr;
    const int64_t target = a.target ? a.target[i] : 0;
    void* grad_row = a.grad ? static_cast<char*>(a.grad) + i * grad_row_bytes : nullptr;
    void* teacher_grad_row = a.teacher_grad ? static_cast<char*>(a.teacher_grad) + i * teacher_grad_row_bytes : nullptr;
    M* ce = ce_loss == nullptr ? nullptr : ce_loss + i;
    M* dtemp = temperature_grad == nullptr ? nullptr : temperature_grad + i;
    if (a.target && target == a.opt.ignore_index) {
      loss[i] = M(0);
      if (ce) *ce = M(0);
      if (dtemp) *dtemp = M(0);
      if (grad_row) std::memset(grad_row, 0, grad_row_bytes);
      if (teacher_grad_row) std::memset(teacher_grad_row, 0, teacher_grad_row_bytes);
      continue;
    }
    M* g = grad_row == nullptr ? nullptr : grad_in_place ? static_cast<M*>(grad_row) : buf.g;
    M* gt = teacher_grad_row == nullptr ? nullptr : teacher_grad_in_place ? static_cast<M*>(teacher_grad_row) : buf.gt;
    if (bf16_rows) {
      buf.grad_bf16 = static_cast<c10::BFloat16*>(grad_row);
      const auto* s = static_cast<const c10::BFloat16*>(a.student) + i * a.student_stride;
      const auto* t = static_cast<const c10::BFloat16*>(a.teacher) + i * a.teacher_stride;
      if constexpr (std::is_same_v<M, float>) loss[i] = row(s, t, target, g, ce, t, M(1), gt, dtemp) * M(a.opt.t2());
    } else {
      const M* s = row_as<M>(a.student, a.student_dtype, a.student_stride, i, a.v, buf.s);
      const M* t = row_as<M>(a.teacher, a.teacher_dtype, a.teacher_stride, i, a.v, buf.t);
      loss[i] = (a.opt.standardize ? standardized_row(s, t, target, g, ce, a.v, CeOptions<M>::of(a),
                                                      a.grad_scale != 0.0, buf, gt, dtemp, row)
                                   : row(s, t, target, g, ce, t, M(1), gt, dtemp)) *
                M(a.opt.t2());
    }
    if (g != nullptr && !grad_in_place && !bf16_rows) store_row(g, a.v, a.student_dtype, grad_row);
    if (gt != nullptr && !teacher_grad_in_place) store_row(gt, a.v, a.teacher_dtype, teacher_grad_row);
  }
  fence_streamed_stores();
}

// Calls f(std::integral_constant<int, code>(), M()) for the call's code and math type M (float, or double when an
// input is float64): one compiled variant per pair.
template <int NUM_CODES, class F>
void dispatch_rows(const RowsArgs& a, F&& f) {
  dispatch_code<NUM_CODES>(a.code, [&](auto code) {
    if (a.math_double) {
      f(code, double());
    } else {
      f(code, float());
    }
  });
}

}  // namespace
}  // namespace kdkernels::cpu::CPU_CAPABILITY
