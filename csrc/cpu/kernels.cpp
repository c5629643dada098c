// Fused CPU kernels of both families: loss rows and gradient rows in one call, one row at a time per thread.
//
// setup.py compiles this file once per CPU capability (-DCPU_CAPABILITY=DEFAULT / AVX2 / AVX512 with that
// capability's -m flags), so at::vec::Vectorized is 8 or 16 floats wide; ops.cpp picks the build the CPU supports.
// The math is row_math.h's (the formulas and their derivation are written there once); this file only arranges the
// passes over a row:
//
//   divergence  (1) row maxima of s and t, then their sums of exp(x - max); (2) per-class terms l_k, r_k: the loss,
//               and for kd (sum r = -1) the gradient; (3) for the other methods the gradient, from r_k and q_k that
//               pass 2 kept in a row-sized buffer (so no exp is recomputed).
//   decoupled   (0) what the partition needs from the teacher: its top-k (a heap, with a vector test that skips
//               the classes below the current k-th) or its max; (1) per-bin maxima of x and y, then per-bin sums;
//               (2) the gradient.
//
// After the first read a row (2 x 4 bytes x V: 256 KB at V = 32000) stays in L2 for the passes that follow.
// Rows whose dtype is not the math type are first converted into a row buffer; the gradient is written in the
// math type and converted into the student's dtype the same way. Ignored rows are not read: loss 0, gradient 0.
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
#error "setup.py compiles this file once per CPU capability, with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

namespace kdkernels::cpu::CPU_CAPABILITY {
namespace {

using c10::ScalarType;

template <class M>
using Ops = VecOps<M>;
template <class M>
using Vec = typename VecOps<M>::V;

// The lanes of p[0, n) (n <= lanes); lanes past n hold -inf: a masked class, which adds 0 to every sum.
template <class M>
at::vec::Vectorized<M> load(const M* p, int64_t n) {
  if (n == Ops<M>::lanes) return Vec<M>::loadu(p);
  return Vec<M>::set(Vec<M>(neg_inf<M>()), Vec<M>::loadu(p, n), n);
}

template <class M>
M sum_lanes(const at::vec::Vectorized<M>& v) {
  M lanes[Ops<M>::lanes];
  v.store(lanes);
  M total = M(0);
  for (M x : lanes) total += x;
  return total;
}

template <class M>
M max_lanes(const at::vec::Vectorized<M>& v) {
  M lanes[Ops<M>::lanes];
  v.store(lanes);
  M m = neg_inf<M>();
  for (M x : lanes) m = nan_max(m, x);
  return m;
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
  M sum() const { return sum_lanes(total + part); }
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

// Row-sized buffers of one worker: converted inputs, the gradient in M, and whatever the family keeps per class.
template <class M>
struct RowBuffers {
  std::vector<M> memory;
  M *s, *t, *g, *extra;

  RowBuffers(const RowsArgs& a, int extra_rows) : memory(size_t(a.v) * (3 + extra_rows)) {
    s = memory.data();
    t = s + a.v;
    g = t + a.v;
    extra = g + a.v;
  }
};

// Runs row(s, t, target, g) -> loss over the rows [begin, end): g is the gradient row in M (nullptr without a
// gradient), written straight into the output when the student's dtype is M.
template <class M, class Row>
void for_rows(const RowsArgs& a, int64_t begin, int64_t end, RowBuffers<M>& buf, Row&& row) {
  M* loss = static_cast<M*>(a.loss);
  const bool grad_in_place = a.student_dtype == math_dtype<M>();
  const size_t grad_row_bytes = size_t(a.v) * c10::elementSize(a.student_dtype);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t target = a.target ? a.target[i] : 0;
    void* grad_row = a.grad ? static_cast<char*>(a.grad) + i * grad_row_bytes : nullptr;
    if (a.target && target == a.ignore_index) {
      loss[i] = M(0);
      if (grad_row) std::memset(grad_row, 0, grad_row_bytes);
      continue;
    }
    const M* s = row_as<M>(a.student, a.student_dtype, a.student_stride, i, a.v, buf.s);
    const M* t = row_as<M>(a.teacher, a.teacher_dtype, a.teacher_stride, i, a.v, buf.t);
    M* g = grad_row == nullptr ? nullptr : grad_in_place ? static_cast<M*>(grad_row) : buf.g;
    loss[i] = row(s, t, target, g) * M(a.t2);
    if (g != nullptr && !grad_in_place) store_row(g, a.v, a.student_dtype, grad_row);
  }
}

// ---- Divergence family -----------------------------------------------------------------------------------------

template <int METHOD, class M>
M divergence_row(const M* s, const M* t, M* g, M* r_buf, M* q_buf, int64_t v, const DivergenceConsts<M>& c,
                 M temperature, M scale) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V T(temperature);
  // (1) Row maxima (max(s / T) = max(s) / T: division by T > 0 keeps the order), then the sums of exp(x - max).
  V vmx(neg_inf<M>()), vmy(neg_inf<M>());
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    vmx = O::max(vmx, load(s + j, n));
    vmy = O::max(vmy, load(t + j, n));
  }
  const M mx = max_lanes(vmx) / temperature, my = max_lanes(vmy) / temperature;
  const V shift_x(safe_shift(mx)), shift_y(safe_shift(my));
  ChunkedSum<M> zx, zy;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    zx.add(O::exp(load(s + j, n) / T - shift_x));
    zy.add(O::exp(load(t + j, n) / T - shift_y));
  }
  const V vmx_row(mx), vmy_row(my), lzx(std::log(zx.sum())), lzy(std::log(zy.sum()));
  // (2) Per-class terms.
  ChunkedSum<M> sum_l, sum_r;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    V l, r, q;
    divergence_terms<METHOD, O>(c, load(s + j, n) / T, load(t + j, n) / T, vmx_row, lzx, vmy_row, lzy, l, r, q);
    sum_l.add(l);
    if (g == nullptr) continue;
    if (METHOD == KD) {  // sum r = -1
      divergence_grad<O>(r, q, M(-1), scale).store(g + j, n);
    } else {
      sum_r.add(r);
      r.store(r_buf + j, n);
      q.store(q_buf + j, n);
    }
  }
  // (3) The gradient, once sum r is known.
  if (g != nullptr && METHOD != KD) {
    const M total_r = sum_r.sum();
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      divergence_grad<O>(V::loadu(r_buf + j, n), V::loadu(q_buf + j, n), total_r, scale).store(g + j, n);
    }
  }
  return sum_l.sum();
}

template <int METHOD, class M>
void divergence_rows_of(const RowsArgs& a, int64_t begin, int64_t end) {
  const auto c = DivergenceConsts<M>::from(a.params);
  const bool keeps_terms = a.grad != nullptr && METHOD != KD;
  RowBuffers<M> buf(a, keeps_terms ? 2 : 0);
  M* r_buf = buf.extra;
  M* q_buf = buf.extra + a.v;
  for_rows<M>(a, begin, end, buf, [&](const M* s, const M* t, int64_t, M* g) {
    return divergence_row<METHOD, M>(s, t, g, r_buf, q_buf, a.v, c, M(a.temperature), M(a.grad_scale));
  });
}

// ---- Decoupled family ------------------------------------------------------------------------------------------

// The teacher's k best classes by (y, lower index): kth_v / kth_i (the worst of them) and top1_i (the best).
template <class M>
void teacher_top_k(const M* t, int64_t v, M temperature, int64_t k, std::vector<std::pair<M, int64_t>>& heap,
                   Membership<M>& mb) {
  using O = Ops<M>;
  using V = Vec<M>;
  using Entry = std::pair<M, int64_t>;
  constexpr int64_t L = O::lanes;
  // Heap order "a < b" = "a ranks above b", so the heap's front is the worst of the k kept so far.
  auto ranks_above = [](const Entry& a, const Entry& b) { return better(a.first, a.second, b.first, b.second); };
  heap.clear();
  const V T(temperature);
  M lanes[L];
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V y = load(t + j, n) / T;
    // Classes come in index order: one that only ties the current k-th has a larger index and does not enter.
    if (int64_t(heap.size()) == k && !O::any(O::gt(y, V(heap.front().first)))) continue;
    y.store(lanes);
    for (int64_t l = 0; l < n; ++l) {
      const Entry e(lanes[l], j + l);
      if (int64_t(heap.size()) < k) {
        heap.push_back(e);
        std::push_heap(heap.begin(), heap.end(), ranks_above);
      } else if (ranks_above(e, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), ranks_above);
        heap.back() = e;
        std::push_heap(heap.begin(), heap.end(), ranks_above);
      }
    }
  }
  mb.kth_v = heap.front().first;
  mb.kth_i = heap.front().second;
  Entry best = heap.front();
  for (const Entry& e : heap) {
    if (ranks_above(e, best)) best = e;
  }
  mb.top1_i = best.second;
}

template <int PARTITION, class M>
M decoupled_row(const M* s, const M* t, int64_t target, M* g, int64_t v, const DecoupledConsts<M>& c,
                M temperature, M scale, std::vector<std::pair<M, int64_t>>& heap) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V T(temperature), zero(M(0)), ninf(neg_inf<M>()), iota = O::iota();
  Membership<M> mb{-1, M(0), 0, 0, M(0), c.log_tau, c.three_bins};
  // An index outside [0, V) is never read (membership only compares indices): the row's loss becomes NaN.
  const bool bad_target = PARTITION == TARGET && (target < 0 || target >= v);
  if (PARTITION == TARGET && !bad_target) mb.target = target;
  // (0) What the partition needs from the teacher alone.
  if (PARTITION == TOPK) {
    teacher_top_k<M>(t, v, temperature, c.k, heap, mb);
  } else if (PARTITION == THRESHOLD) {
    V vmy = ninf;
    for (int64_t j = 0; j < v; j += L) vmy = O::max(vmy, load(t + j, std::min(L, v - j)));
    mb.y_max = max_lanes(vmy) / temperature;
  }
  // (1) Per-bin maxima, then per-bin sums (each class shifted by its own bin's max: one exp per class and side).
  V mt[NUM_BINS] = {ninf, ninf, ninf}, ms[NUM_BINS] = {ninf, ninf, ninf};
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V x = load(s + j, n) / T, y = load(t + j, n) / T;
    typename O::Mask in[NUM_BINS];
    membership<PARTITION, O>(mb, y, iota, j, in[BIN_A], in[BIN_B]);
    in[BIN_W] = O::lnot(O::lor(in[BIN_A], in[BIN_B]));
    for (int b = 0; b < NUM_BINS; ++b) {
      mt[b] = O::max(mt[b], O::select(in[b], y, ninf));
      ms[b] = O::max(ms[b], O::select(in[b], x, ninf));
    }
  }
  BinStats<M> st, ss;
  for (int b = 0; b < NUM_BINS; ++b) {
    st.m[b] = max_lanes(mt[b]);
    ss.m[b] = max_lanes(ms[b]);
  }
  ChunkedSum<M> zt[NUM_BINS], kt[NUM_BINS], zs[NUM_BINS];
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V x = load(s + j, n) / T, y = load(t + j, n) / T;
    typename O::Mask in_a, in_b;
    membership<PARTITION, O>(mb, y, iota, j, in_a, in_b);
    const V et = O::exp(y - pick<O>(in_a, in_b, safe_shift(st.m[BIN_A]), safe_shift(st.m[BIN_B]),
                                    safe_shift(st.m[BIN_W])));
    const V es = O::exp(x - pick<O>(in_a, in_b, safe_shift(ss.m[BIN_A]), safe_shift(ss.m[BIN_B]),
                                    safe_shift(ss.m[BIN_W])));
    const V kv = k_term<O>(et, y, x);
    const typename O::Mask in[NUM_BINS] = {in_a, in_b, O::lnot(O::lor(in_a, in_b))};
    for (int b = 0; b < NUM_BINS; ++b) {
      zt[b].add(O::select(in[b], et, zero));
      kt[b].add(O::select(in[b], kv, zero));
      zs[b].add(O::select(in[b], es, zero));
    }
  }
  for (int b = 0; b < NUM_BINS; ++b) {
    st.z[b] = zt[b].sum();
    st.k[b] = kt[b].sum();
    ss.z[b] = zs[b].sum();
    ss.k[b] = M(0);
  }
  const DecoupledRow<M> row = decoupled_row(st, ss, c, bad_target);
  // (2) The gradient.
  if (g != nullptr) {
    const M row_scale = bad_target ? M(NAN) : scale;
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      const V x = load(s + j, n) / T, y = load(t + j, n) / T;
      typename O::Mask in_a, in_b;
      membership<PARTITION, O>(mb, y, iota, j, in_a, in_b);
      decoupled_grad<O>(row, in_a, in_b, x, y, row_scale).store(g + j, n);
    }
  }
  return row.loss;
}

template <int PARTITION, class M>
void decoupled_rows_of(const RowsArgs& a, int64_t begin, int64_t end) {
  const auto c = DecoupledConsts<M>::from(a.params);
  RowBuffers<M> buf(a, 0);
  std::vector<std::pair<M, int64_t>> heap;
  heap.reserve(PARTITION == TOPK ? size_t(c.k) : 0);
  for_rows<M>(a, begin, end, buf, [&](const M* s, const M* t, int64_t target, M* g) {
    return decoupled_row<PARTITION, M>(s, t, target, g, a.v, c, M(a.temperature), M(a.grad_scale), heap);
  });
}

}  // namespace

void divergence_rows(const RowsArgs& a, int64_t begin, int64_t end) {
  dispatch_code<NUM_DIVERGENCES>(a.code, [&](auto method) {
    if (a.math_double) {
      divergence_rows_of<decltype(method)::value, double>(a, begin, end);
    } else {
      divergence_rows_of<decltype(method)::value, float>(a, begin, end);
    }
  });
}

void decoupled_rows(const RowsArgs& a, int64_t begin, int64_t end) {
  dispatch_code<NUM_PARTITIONS>(a.code, [&](auto partition) {
    if (a.math_double) {
      decoupled_rows_of<decltype(partition)::value, double>(a, begin, end);
    } else {
      decoupled_rows_of<decltype(partition)::value, float>(a, begin, end);
    }
  });
}

}  // namespace kdkernels::cpu::CPU_CAPABILITY
