// Fused CPU kernel of the decoupled family: loss rows and gradient rows in one call, one row at a time per thread.
// setup.py compiles this file once per CPU capability. The math is decoupled.h's; this file arranges the passes over
// a row:
//
//   (0) what the partition needs from the raw teacher logits: their top-k (a heap, with a vector test that skips
//       the classes below the current k-th; on -t for the k smallest) or their max;
//   (1) per-bin maxima of x and y; a row whose classes are all masked in both logits stops here (loss 0,
//       gradient 0); then per-bin sums, each class shifted by its own bin's maxima (one exp per class and side), and
//       the sum of exp(s - max s) of the cross-entropy term;
//   (2) the gradient (with the full gradient also the teacher's, and the row's d loss / d T).
//
// Each pass tests a vector's bins first: one whose classes all fall in REST (most of a long row's) adds to REST's
// maxima and sums alone and takes REST's coefficients without a blend per bin (RestOps).
// Only the bins that may hold several classes are reduced over lanes: TOP1 is empty without split_top1, and the TARGET
// partition's STRONG bin (the target alone) takes its statistics from the target's logits (one_class_bin).
#include "../decoupled.h"

#include <array>
#include <utility>

#include "rows.h"

namespace kdkernels::cpu::CPU_CAPABILITY {
namespace {

// The teacher's k best classes by (ranking value, lower index), the value being top_k_rank of the raw logit:
// kth_v / kth_i (the worst of them) and top1_i (the best).
template <class M, class S>
void teacher_top_k(const S* t, int64_t v, int64_t k, std::vector<std::pair<M, int64_t>>& heap, Membership<M>& mb) {
  using O = Ops<M>;
  using V = Vec<M>;
  using Entry = std::pair<M, int64_t>;
  constexpr int64_t L = O::lanes;
  // Heap order "a < b" = "a ranks above b", so the heap's front is the worst of the k kept so far.
  auto ranks_above = [](const Entry& a, const Entry& b) { return better(a.first, a.second, b.first, b.second); };
  heap.clear();
  M lanes[L];
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V y = top_k_rank<O>(load(t + j, n), mb.lowest);
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

// A bin mask that holds no lane, and the policy O over it: a vector whose classes all fall in bin REST (most vectors
// of a long row) runs the family's formulas with pick() giving REST's value outright, no blend per bin.
struct NoLanes {};
template <class O>
struct RestOps : O {
  using Mask = NoLanes;
  using O::select;
  static typename O::V select(NoLanes, const typename O::V&, const typename O::V& otherwise) { return otherwise; }
};

// acc[b] = op(acc[b], x where the lane is in bin b, else fill) for every bin that is `reduced`; a vector all in REST
// only meets REST's. (Always inline: out of line, a call per vector and bin.)
template <class O, class Acc, class Op>
C10_ALWAYS_INLINE void into_bins(Acc (&acc)[NUM_BINS], const std::array<typename O::Mask, NUM_BINS>& in, bool rest_only,
                                 const std::array<bool, NUM_BINS>& reduced, const typename O::V& x,
                                 const typename O::V& fill, Op&& op) {
  if (rest_only) return op(acc[REST], x);
  for (int b = 0; b < NUM_BINS; ++b) {
    if (reduced[b]) op(acc[b], O::select(in[b], x, fill));
  }
}

// The statistics of bin b when it holds one class (TARGET's STRONG: the target), of logits x and y (-inf for an empty
// bin), as the lane reductions would give them (a fill lane adds -inf to a max, 0 to a sum) without them: the exps
// only meet 0, -inf and NaN, where the scalar exp is the vector one.
template <class M>
void one_class_bin(M x, M y, bool reverse, int b, BinStats<M>& st, BinStats<M>& ss) {
  using O = ScalarOps<M>;
  const M shift_t = safe_shift(y), shift_s = safe_shift(x), et = O::exp(y - shift_t), es = O::exp(x - shift_s);
  st.m[b] = y;
  ss.m[b] = x;
  st.z[b] = et;
  ss.z[b] = es;
  st.k[b] = k_term<O>(et, y, x, shift_t, shift_s);
  ss.k[b] = reverse ? k_term<O>(es, x, y, shift_s, shift_t) : M(0);
}

// t_rank: the raw teacher row the partition ranks (t itself, or t's raw logits when t holds their z-scores), and
// the threshold is in its units.
// Long: its passes (numbered blocks) share the row's maxima, sums and buffers; the per-class math is in the
// family's header.
template <int PARTITION, class M, class S>
M decoupled_row(const S* s, const S* t, const S* t_rank, int64_t target, M* g, M* ce, M* gt, M* dtemp,
                const RowBuffers<M>& rows, int64_t v, const DecoupledParams<double>& c, M temperature, M threshold,
                M scale, CeOptions<M> ce_options, bool t2_scale, std::vector<std::pair<M, int64_t>>& heap) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  // The worker's extra row buffers: exp(x - bin max) and exp(y - bin max) of every class, from pass (1) for (2).
  M* const es_row = rows.extra;
  M* const et_row = es_row + v;
  // x = s / T as s * (1 / T) (one rounding more than a division, far cheaper), likewise y.
  const M inv_t = M(1) / temperature;
  const V inv_T(inv_t), zero(M(0)), ninf(neg_inf<M>()), iota = O::iota();
  Membership<M> mb{-1, M(0), 0, 0, M(0), threshold, c.split_top1, c.lowest};
  // An index outside [0, V) is never read (membership only compares indices): the row's loss becomes NaN.
  const bool bad_target = PARTITION == TARGET && (target < 0 || target >= v);
  if (PARTITION == TARGET && !bad_target) mb.target = target;
  // (0) What the partition needs from the raw teacher logits alone.
  if constexpr (PARTITION == TOPK) {
    teacher_top_k<M>(t_rank, v, c.k, heap, mb);
  } else if constexpr (PARTITION == THRESHOLD) {
    V vmax = ninf;
    for (int64_t j = 0; j < v; j += L) vmax = O::max(vmax, load(t_rank + j, std::min(L, v - j)));
    mb.t_max = max_lanes(vmax);
  }
  // The bins of the classes j.. from their teacher logits traw: in[TOP1], in[STRONG], in[REST] (ranked on t_rank,
  // which is traw itself unless t holds z-scores).
  using Masks = std::array<typename O::Mask, NUM_BINS>;
  // (rest_only: no lane in TOP1 or STRONG; the masks are then left unset. A top-k vector without the k-th or the top-1
  // class and without a ranking value up to the k-th's is all in REST, which one compare tells.)
  auto bins_of = [&](const V& traw, int64_t j, int64_t n, bool& rest_only) {
    Masks in;
    const V tr = t_rank == t ? traw : load(t_rank + j, n);
    if constexpr (PARTITION == TOPK) {
      auto outside = [&](int64_t i) { return i < j || i >= j + n; };
      rest_only = outside(mb.kth_i) && (!mb.split_top1 || outside(mb.top1_i)) &&
                  !O::any(O::ge(top_k_rank<O>(tr, mb.lowest), V(mb.kth_v)));
      if (rest_only) return in;
    }
    membership<PARTITION, O>(mb, tr, iota, j, in[TOP1], in[STRONG]);
    const auto special = O::lor(in[TOP1], in[STRONG]);
    rest_only = !O::any(special);
    in[REST] = O::lnot(special);
    return in;
  };
  auto max_in = [](V& acc, const V& x) { acc = O::max(acc, x); };
  auto sum_in = [](ChunkedSum<M>& acc, const V& x) { acc.add(x); };
  // The bins whose statistics come from lane reductions: not TOP1 without split_top1 (it is empty), nor TARGET's
  // STRONG (the target alone, or nothing: one_class_bin), which a short row's reductions would mostly be.
  const bool target_alone = PARTITION == TARGET && !mb.split_top1;
  const std::array<bool, NUM_BINS> reduced{mb.split_top1, !target_alone, true};
  const bool reverse = c.w_rkl != 0.0;  // the student's ks_b: only for the in-bin reverse KL
  // (Each bin's statistics start as an empty bin's.)
  BinStats<M> st{{neg_inf<M>(), neg_inf<M>(), neg_inf<M>()}, {}, {}}, ss = st;
  if (target_alone && mb.target >= 0)
    one_class_bin(M(s[target]) * inv_t, M(t[target]) * inv_t, reverse, STRONG, st, ss);
  // (1) Per-bin maxima, then per-bin sums.
  V mt[NUM_BINS] = {ninf, ninf, ninf}, ms[NUM_BINS] = {ninf, ninf, ninf}, vm1 = ninf;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V sraw = load(s + j, n), traw = load(t + j, n);
    bool rest_only;
    const Masks in = bins_of(traw, j, n, rest_only);
    into_bins<O>(mt, in, rest_only, reduced, traw * inv_T, ninf, max_in);
    into_bins<O>(ms, in, rest_only, reduced, sraw * inv_T, ninf, max_in);
    if (ce != nullptr) vm1 = O::max(vm1, sraw);
  }
  bool masked = true;
  for (int b = 0; b < NUM_BINS; ++b) {
    if (reduced[b]) {
      st.m[b] = max_lanes(mt[b]);
      ss.m[b] = max_lanes(ms[b]);
    }
    masked = masked && is_neg_inf(st.m[b]) && is_neg_inf(ss.m[b]);
  }
  if (masked) return skip_row(rows, g, ce, v, gt, dtemp);
  const M m1 = ce != nullptr ? max_lanes(vm1) : M(0);
  const V shift_1(safe_shift(m1));
  M shift_t[NUM_BINS], shift_s[NUM_BINS];  // each bin's maxima (0 for an empty bin)
  for (int b = 0; b < NUM_BINS; ++b) {
    shift_t[b] = safe_shift(st.m[b]);
    shift_s[b] = safe_shift(ss.m[b]);
  }
  ChunkedSum<M> zt[NUM_BINS], kt[NUM_BINS], zs[NUM_BINS], ks[NUM_BINS], z1;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    prefetch_next_row(rows, j, n);
    const V sraw = load(s + j, n), traw = load(t + j, n), x = sraw * inv_T, y = traw * inv_T;
    if (ce != nullptr) z1.add(O::exp(sraw - shift_1));
    bool rest_only;
    const Masks in = bins_of(traw, j, n, rest_only);
    const V st_j =
        rest_only ? V(shift_t[REST]) : pick<O>(in[TOP1], in[STRONG], shift_t[TOP1], shift_t[STRONG], shift_t[REST]);
    const V ss_j =
        rest_only ? V(shift_s[REST]) : pick<O>(in[TOP1], in[STRONG], shift_s[TOP1], shift_s[STRONG], shift_s[REST]);
    const V et = O::exp(y - st_j), es = O::exp(x - ss_j);
    es.store(es_row + j, n);
    et.store(et_row + j, n);
    into_bins<O>(zt, in, rest_only, reduced, et, zero, sum_in);
    into_bins<O>(kt, in, rest_only, reduced, k_term<O>(et, y, x, st_j, ss_j), zero, sum_in);
    into_bins<O>(zs, in, rest_only, reduced, es, zero, sum_in);
    if (reverse) into_bins<O>(ks, in, rest_only, reduced, k_term<O>(es, x, y, ss_j, st_j), zero, sum_in);
  }
  for (int b = 0; b < NUM_BINS; ++b) {
    if (!reduced[b]) continue;
    st.z[b] = zt[b].sum();
    st.k[b] = kt[b].sum();
    ss.z[b] = zs[b].sum();
    if (reverse) ss.k[b] = ks[b].sum();
  }
  const DecoupledRow<M> row = decoupled_row(st, ss, c, bad_target);
  M inv_zs[NUM_BINS], inv_zt[NUM_BINS];  // (0 for an empty bin, whose kept exps are 0)
  for (int b = 0; b < NUM_BINS; ++b) {
    inv_zs[b] = ss.z[b] > M(0) ? M(1) / ss.z[b] : M(0);
    inv_zt[b] = st.z[b] > M(0) ? M(1) / st.z[b] : M(0);
  }
  const CrossEntropy<M> xent{m1, ce != nullptr ? std::log(z1.sum()) : M(0), ce_options, target};
  if (ce != nullptr) *ce = xent.loss(s, v);  // (before the gradient overwrites s in place)
  // (2) The gradient: the method's, plus the cross-entropy's with the term; with the full gradient the teacher's too,
  // and d loss / d T (the shifts: each model's largest bin max).
  const bool full = dtemp != nullptr;
  if (g != nullptr || full) {
    const M row_scale = bad_target ? M(NAN) : scale;
    TemperatureGrad<M> dt{V(safe_shift(nan_max(nan_max(ss.m[TOP1], ss.m[STRONG]), ss.m[REST]))),
                          V(safe_shift(nan_max(nan_max(st.m[TOP1], st.m[STRONG]), st.m[REST])))};
    // The classes j.. under the policy P (O, or RestOps<O> with NoLanes masks for a vector all in REST).
    auto gradients = [&](auto policy, const auto& in_top1, const auto& in_strong, const V& sraw, const V& traw,
                         int64_t j, int64_t n) {
      using P = decltype(policy);
      const V x = sraw * inv_T, y = traw * inv_T;
      const V q = V::loadu(es_row + j, n) * pick<P>(in_top1, in_strong, inv_zs[TOP1], inv_zs[STRONG], inv_zs[REST]);
      const V p = V::loadu(et_row + j, n) * pick<P>(in_top1, in_strong, inv_zt[TOP1], inv_zt[STRONG], inv_zt[REST]);
      const InBin<V> b = in_bin_of<P>(row, in_top1, in_strong, x, y, q, p);
      const V method_grad = decoupled_grad<P>(row, in_top1, in_strong, b, row_scale);
      if (full) {
        const V teacher_grad = decoupled_teacher_grad<P>(row, in_top1, in_strong, b, y, row_scale);
        dt.add(x, method_grad, y, teacher_grad);
        if (gt != nullptr) teacher_grad.store(gt + j, n);
      }
      if (g != nullptr) {
        store_grad_vector(rows, ce != nullptr ? method_grad + xent.grad(sraw, iota, j) : method_grad, g, j, n);
      }
    };
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      const V sraw = load(s + j, n), traw = load(t + j, n);
      bool rest_only;
      const Masks in = bins_of(traw, j, n, rest_only);
      if (rest_only) {
        gradients(RestOps<O>(), NoLanes(), NoLanes(), sraw, traw, j, n);
      } else {
        gradients(O(), in[TOP1], in[STRONG], sraw, traw, j, n);
      }
    }
    if (full) *dtemp = dt.value(t2_scale, row_scale, row.loss);
  }
  return row.loss;
}

template <int PARTITION, class M>
void decoupled_rows_of(const RowsArgs& a, int64_t begin, int64_t end) {
  const auto c = DecoupledParams<double>::from(a.params);
  RowBuffers<M> buf(a, 2);  // (decoupled_row's es_row and et_row)
  std::vector<std::pair<M, int64_t>> heap;
  heap.reserve(PARTITION == TOPK ? size_t(c.k) : 0);
  const M threshold(a.opt.temperature * c.log_tau);  // THRESHOLD: t_i - max t >= T log(tau), in double like the others
  for_rows<M>(a, begin, end, buf,
              [&](const auto* s, const auto* t, int64_t target, M* g, M* ce, const auto* t_rank, M rank_scale, M* gt,
                  M* dtemp) {
                return decoupled_row<PARTITION, M>(s, t, t_rank, target, g, ce, gt, dtemp, buf, a.v, c,
                                                   M(a.opt.temperature), threshold * rank_scale, M(a.grad_scale),
                                                   CeOptions<M>::of(a), a.opt.t2_scale, heap);
              });
}

}  // namespace

void decoupled_rows(const RowsArgs& a, int64_t begin, int64_t end) {
  dispatch_rows<NUM_PARTITIONS>(a, [&](auto partition, auto math) {
    decoupled_rows_of<decltype(partition)::value, decltype(math)>(a, begin, end);
  });
}

}  // namespace kdkernels::cpu::CPU_CAPABILITY
