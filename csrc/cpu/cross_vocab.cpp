// Fused CPU kernel of the losses between two vocabularies (docs/losses.md, section 11.5): uld and GOLD's hybrid, the
// loss and the student's gradient in one call, one row at a time per worker, in row buffers (no [N, V] temporary but
// the gradient). setup.py compiles this file once per CPU capability. Per row:
//
//   (1) the two log-normalisers log sum exp(x) of x = s / T_s and y = t / T_t (and of s at T = 1 for the
//       cross-entropy); a row whose classes are all masked in both logits stops here (loss 0, gradient 0);
//   (2) q~ = exp(x - lz_x + c_s) and p~ = exp(y - lz_y + c_t) into row buffers;
//   (3) the sort keys of the compared classes (uld: all; hybrid: the unmatched ones): a probability is >= 0, so its
//       float bits sort as an unsigned integer, and their complement sorts descending; an LSD radix sort (stable:
//       tied probabilities keep the lower class index first, docs/losses.md 11.2) sorts the student's keys with
//       their classes and the teacher's alone (a constant);
//   (4) one pass over the ranks: l += |q~_(i) - p~_(i)| and r at the student's class pi(i) = q~ sign(q~_(i) - p~_(i));
//       hybrid: the matched pairs' terms J and r (cross_vocab.h);
//   (5) the gradient row g_j = scale (r_j - q_j sum r) plus the cross-entropy's, and dl/dc_s = sum r.
#include "../cross_vocab.h"

#include <cstring>
#include <type_traits>

#include "rows.h"

namespace kdkernels::cpu::CPU_CAPABILITY {
namespace {

// The unsigned integer of M's width: a non-negative M's bits sort as one.
template <class M>
using Key = std::conditional_t<sizeof(M) == 4, uint32_t, uint64_t>;

// Digits of 11 bits: three passes for float32's keys, six for float64's, and a histogram of 2048 counters (8 KiB)
// that stays in L1.
constexpr int DIGIT_BITS = 11;
constexpr int BUCKETS = 1 << DIGIT_BITS;

template <class K>
constexpr int num_digits() {
  return (int(sizeof(K)) * 8 + DIGIT_BITS - 1) / DIGIT_BITS;
}

// Sorts keys[0, n) ascending, stably, carrying classes[0, n) along when it is not nullptr, by an LSD radix sort that
// ping-pongs with keys_tmp and classes_tmp (as long); the sorted arrays end up in keys and classes (swapped with the
// temporaries as needed). A digit on which all keys agree is skipped: it moves nothing.
template <class K>
void radix_sort(K*& keys, int32_t*& classes, K*& keys_tmp, int32_t*& classes_tmp, int64_t n, uint32_t* counts) {
  constexpr int D = num_digits<K>();
  std::memset(counts, 0, sizeof(uint32_t) * D * BUCKETS);
  for (int64_t k = 0; k < n; ++k) {
    for (int d = 0; d < D; ++d) ++counts[d * BUCKETS + ((keys[k] >> (d * DIGIT_BITS)) & (BUCKETS - 1))];
  }
  for (int d = 0; d < D; ++d) {
    uint32_t* count = counts + d * BUCKETS;
    uint32_t offset = 0;
    bool one_bucket = false;
    for (int b = 0; b < BUCKETS; ++b) {
      one_bucket |= count[b] == uint32_t(n);
      const uint32_t c = count[b];
      count[b] = offset;
      offset += c;
    }
    if (one_bucket) continue;
    const int shift = d * DIGIT_BITS;
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t to = count[(keys[k] >> shift) & (BUCKETS - 1)]++;
      keys_tmp[to] = keys[k];
      if (classes != nullptr) classes_tmp[to] = classes[k];
    }
    std::swap(keys, keys_tmp);
    std::swap(classes, classes_tmp);
  }
}

template <class M>
M key_value(Key<M> key) {  // the probability of a descending sort key
  M x;
  const Key<M> bits = ~key;
  std::memcpy(&x, &bits, sizeof(M));
  return x;
}

template <class M>
Key<M> descending_key(M x) {
  Key<M> bits;
  std::memcpy(&bits, &x, sizeof(M));
  return ~bits;
}

// log sum exp(x * inv_T) over a row: -inf when every class is masked, NaN when a logit is.
template <class M>
M log_partition(const M* x, int64_t v, M inv_T) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  V vm(neg_inf<M>());
  for (int64_t j = 0; j < v; j += L) vm = O::max(vm, load(x + j, std::min(L, v - j)));
  const M shift = safe_shift(max_lanes(vm) * inv_T);
  ChunkedSum<M> z;
  for (int64_t j = 0; j < v; j += L) z.add(O::exp(load(x + j, std::min(L, v - j)) * V(inv_T) - V(shift)));
  return shift + std::log(z.sum());
}

// out_j = exp(x_j * inv_T - shift) over a row.
template <class M>
void write_exp(const M* x, int64_t v, M inv_T, M shift, M* out) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    O::exp(load(x + j, n) * V(inv_T) - V(shift)).store(out + j, n);
  }
}

// One worker's row buffers: converted inputs, the two rows' probabilities, r, the gradient in M, and the sort's keys,
// classes and histograms.
template <class M>
struct CrossVocabBuffers {
  std::vector<M> s, t, q, p, r, g;
  std::vector<Key<M>> keys_s, keys_s_tmp, keys_t, keys_t_tmp;
  std::vector<int32_t> classes, classes_tmp;
  std::vector<uint32_t> counts;

  explicit CrossVocabBuffers(const CrossVocabArgs& a)
      : s(a.vs),
        t(a.vt),
        q(a.vs),
        p(a.vt),
        r(a.vs),
        g(a.vs),
        keys_s(a.vs),
        keys_s_tmp(a.vs),
        keys_t(a.vt),
        keys_t_tmp(a.vt),
        classes(a.vs),
        classes_tmp(a.vs),
        counts(size_t(num_digits<Key<M>>()) * BUCKETS) {}
};

// The sorted L1 of the compared classes (free_s of the student, free_t of the teacher; all when nullptr) of the row
// at hand, weight w; writes r at the student's compared classes (w q~ sign(...), 0 where either side has none).
template <class M>
double sorted_l1(CrossVocabBuffers<M>& b, const int64_t* free_s, int64_t ns, const int64_t* free_t, int64_t nt, M w,
                 bool pad) {
  Key<M>*keys_s = b.keys_s.data(), *keys_s_tmp = b.keys_s_tmp.data();
  Key<M>*keys_t = b.keys_t.data(), *keys_t_tmp = b.keys_t_tmp.data();
  int32_t *classes = b.classes.data(), *classes_tmp = b.classes_tmp.data(), *none = nullptr, *none_tmp = nullptr;
  for (int64_t k = 0; k < ns; ++k) {
    const int64_t j = free_s == nullptr ? k : free_s[k];
    keys_s[k] = descending_key(b.q[j]);
    classes[k] = int32_t(j);
  }
  if (!pad && (ns == 0 || nt == 0)) {  // hybrid: no term without unmatched classes on both sides
    for (int64_t k = 0; k < ns; ++k) b.r[classes[k]] = M(0);
    return 0.0;
  }
  for (int64_t k = 0; k < nt; ++k) keys_t[k] = descending_key(b.p[free_t == nullptr ? k : free_t[k]]);
  radix_sort(keys_s, classes, keys_s_tmp, classes_tmp, ns, b.counts.data());
  radix_sort(keys_t, none, keys_t_tmp, none_tmp, nt, b.counts.data());
  double loss = 0;
  const int64_t common = std::min(ns, nt);
  for (int64_t i = 0; i < common; ++i) {
    const M q = key_value<M>(keys_s[i]), d = q - key_value<M>(keys_t[i]);
    loss += double(std::abs(d));
    b.r[classes[i]] = w * q * sign_of(d);
  }
  for (int64_t i = common; i < ns; ++i) {  // past the teacher's row: q~ against the padding
    const M q = key_value<M>(keys_s[i]);
    loss += double(q);
    b.r[classes[i]] = w * q * M(q > M(0));
  }
  for (int64_t i = common; i < nt; ++i) loss += double(key_value<M>(keys_t[i]));
  return double(w) * loss;
}

// The row at hand's loss (unweighted by distill_weight); writes the gradient row g (nullptr: none), the
// cross-entropy and dl/dc_s (scaled like g's factor without 1 / T_s).
template <class M>
M cross_vocab_row(const CrossVocabArgs& a, const CrossVocabParams<M>& c, CrossVocabBuffers<M>& b, const M* s,
                  const M* t, M cs, M ct, int64_t target, M* g, M* ce, M* dscale) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const M inv_ts = M(1) / M(a.temperature), inv_tt = M(1) / c.teacher_temperature;
  const M lz_x = log_partition(s, a.vs, inv_ts), lz_y = log_partition(t, a.vt, inv_tt);
  if (is_neg_inf(lz_x) && is_neg_inf(lz_y)) {
    if (dscale != nullptr) *dscale = M(0);
    return skip_row(g, ce, a.vs);
  }
  // (2) The probabilities (a log scale of -inf gives 0, not NaN, through the exp's shift).
  write_exp(s, a.vs, inv_ts, lz_x - cs, b.q.data());
  write_exp(t, a.vt, inv_tt, lz_y - ct, b.p.data());
  // (3), (4) The sorted L1 and, for hybrid, the matched pairs.
  const bool hybrid = a.code == HYBRID;
  double loss = sorted_l1(b, a.free_student, hybrid ? a.num_free_student : a.vs, a.free_teacher,
                          hybrid ? a.num_free_teacher : a.vt, hybrid ? c.unmatched_weight : M(1), !hybrid);
  if (hybrid) {
    for (int64_t m = 0; m < a.num_pairs; ++m) {
      const int64_t j = a.student_ids[m], k = a.teacher_ids[m];
      const MatchedTerm<M> term = matched_term(c, s[j] * inv_ts - lz_x + cs, t[k] * inv_tt - lz_y + ct);
      loss += double(c.matched_weight) * double(term.loss);
      b.r[j] = c.matched_weight * term.r;
    }
  }
  // (5) The gradient: q_j = exp(x_j - lz_x) (unscaled), the cross-entropy's at T = 1.
  ChunkedSum<M> sum_r;
  for (int64_t j = 0; j < a.vs; j += L) sum_r.add(V::loadu(b.r.data() + j, std::min(L, a.vs - j)));
  const M R = sum_r.sum();
  CrossEntropy<M> xent{M(0), M(0), CeOptions<M>{M(a.ce_scale), M(0)}, target};
  if (ce != nullptr) {
    xent.lz1 = a.temperature == 1.0 ? lz_x : log_partition(s, a.vs, M(1));
    *ce = xent.loss(s, a.vs);
  }
  if (dscale != nullptr) *dscale = M(a.scale_grad_scale) * R;
  if (g == nullptr) return M(loss);
  const V scale(M(a.grad_scale)), vR(R), vinv(inv_ts), vlz(lz_x), iota = O::iota();
  for (int64_t j = 0; j < a.vs; j += L) {
    const int64_t n = std::min(L, a.vs - j);
    const V x = load(s + j, n);
    V gj = scale * (V::loadu(b.r.data() + j, n) - O::exp(x * vinv - vlz) * vR);
    if (ce != nullptr) gj = gj + xent.grad(x, iota, j);
    gj.store(g + j, n);
  }
  return M(loss);
}

template <class M>
void cross_vocab_rows_of(const CrossVocabArgs& a, int64_t begin, int64_t end) {
  const auto c = CrossVocabParams<M>::from(a.params);
  CrossVocabBuffers<M> b(a);
  M* loss = static_cast<M*>(a.loss);
  M* ce_loss = static_cast<M*>(a.ce_loss);
  M* scale_grad = static_cast<M*>(a.scale_grad);
  const M* log_scale_s = static_cast<const M*>(a.student_log_scale);
  const M* log_scale_t = static_cast<const M*>(a.teacher_log_scale);
  const bool grad_in_place = a.student_dtype == math_dtype<M>();
  const size_t grad_row_bytes = size_t(a.vs) * c10::elementSize(a.student_dtype);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t target = a.target ? a.target[i] : 0;
    void* grad_row = a.grad ? static_cast<char*>(a.grad) + i * grad_row_bytes : nullptr;
    M* ce = ce_loss == nullptr ? nullptr : ce_loss + i;
    M* dscale = scale_grad == nullptr ? nullptr : scale_grad + i;
    if (a.target && target == a.ignore_index) {
      loss[i] = M(0);
      if (ce) *ce = M(0);
      if (dscale) *dscale = M(0);
      if (grad_row) std::memset(grad_row, 0, grad_row_bytes);
      continue;
    }
    const M* s = row_as<M>(a.student, a.student_dtype, a.student_stride, i, a.vs, b.s.data());
    const M* t = row_as<M>(a.teacher, a.teacher_dtype, a.teacher_stride, i, a.vt, b.t.data());
    M* g = grad_row == nullptr ? nullptr : grad_in_place ? static_cast<M*>(grad_row) : b.g.data();
    loss[i] = cross_vocab_row(a, c, b, s, t, log_scale_s ? log_scale_s[i] : M(0), log_scale_t ? log_scale_t[i] : M(0),
                              target, g, ce, dscale);
    if (g != nullptr && !grad_in_place) store_row(g, a.vs, a.student_dtype, grad_row);
  }
}

}  // namespace

void cross_vocab_rows(const CrossVocabArgs& a, int64_t begin, int64_t end) {
  if (a.math_double) {
    cross_vocab_rows_of<double>(a, begin, end);
  } else {
    cross_vocab_rows_of<float>(a, begin, end);
  }
}

}  // namespace kdkernels::cpu::CPU_CAPABILITY
