// Fused CPU kernel of the divergence family: loss rows and gradient rows in one call, one row at a time per thread.
// setup.py compiles this file once per CPU capability (at::vec::Vectorized is then 8 or 16 floats wide). The math is
// divergence.h's; this file arranges the passes over a row:
//
//   (1) row maxima of s and t, then their sums of exp(x - max) (and of exp(s - max s) for the cross-entropy term at
//       T != 1); a row whose classes are all masked in both logits stops here (loss 0, gradient 0);
//   (1b) akl: the teacher's probabilities into a row buffer, then the bisections of its head (divergence.h AklHead)
//       over that buffer and the raw teacher row (in cache): 32 passes in float32, 64 in float64, and rarely about
//       log2(V) more to split a tie group;
//   (2) per-class terms l_k, r_k (and e_k, f_k): the loss, and for kd (sum r = -1) the gradient;
//   (3) for the other codes the gradient, from r_k and q_k that pass 2 kept in a row-sized buffer (so no exp is
//       recomputed); bdkd and akl, whose r_k are weighted by their row sums, recompute their terms here. The full
//       gradient (a learnable temperature, a teacher that requires grad) sums the teacher's rt_k in (2) and
//       recomputes the terms in (3) for every code, writing the teacher's gradient and summing d loss / d T there.
#include "../divergence.h"
#include "rows.h"

namespace kdkernels::cpu::CPU_CAPABILITY {
namespace {

// akl's head of a row (divergence.h AklHead) as (value, end): head = {t > value} + {t == value, index < end} on the
// raw teacher logits t, from the teacher's probabilities p.
template <class M>
std::pair<M, int64_t> akl_head(const M* t, const M* p, int64_t v, M mu) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V zero(M(0)), one(M(1));
  AklHead<M> head;
  while (head.searching()) {  // (a)
    const V probe(head.probe());
    ChunkedSum<M> above;
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      above.add(O::select(O::gt(load(t + j, n), probe), V::loadu(p + j, n), zero));
    }
    head.narrow(above.sum(), mu);
  }
  const M value = head.threshold();  // (b)
  const V u(value);
  ChunkedSum<M> mass, count_above, group;
  V p_group = zero;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V tj = load(t + j, n), pj = V::loadu(p + j, n);
    const auto above = O::gt(tj, u), tie = O::eq(tj, u);
    mass.add(O::select(above, pj, zero));
    count_above.add(O::select(above, one, zero));
    group.add(O::select(tie, one, zero));
    p_group = O::max(p_group, O::select(tie, pj, zero));
  }
  const int64_t size = int64_t(group.sum());
  const int64_t share = AklHead<M>::group_share(mass.sum(), int64_t(count_above.sum()), size, max_lanes(p_group), mu);
  if (share == 0 || share >= size) return {value, share == 0 ? 0 : v};
  int64_t lo = 0, hi = v;  // (c) the least end with `share` ties before it
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    ChunkedSum<M> ties;
    for (int64_t j = 0; j < mid; j += L) ties.add(O::select(O::eq(load(t + j, std::min(L, mid - j)), u), one, zero));
    (int64_t(ties.sum()) >= share ? hi : lo) = mid;
  }
  return {value, hi};
}

template <int CODE, class M>
M divergence_row(const M* s, const M* t, const M* t_rank, int64_t target, M* g, M* ce, M* gt, M* dtemp, M* r_buf,
                 M* q_buf, int64_t v, const DivergenceParams<M>& c, M temperature, M scale, M ce_scale,
                 bool t2_scale) {
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
  const M ms = max_lanes(vmx), mx = ms / temperature, my = max_lanes(vmy) / temperature;
  if (is_neg_inf(mx) && is_neg_inf(my)) return skip_row(g, ce, v, gt, dtemp);
  const bool full = dtemp != nullptr;  // the full gradient: the teacher's (stored into gt unless null) and d / d T
  const V shift_x(safe_shift(mx)), shift_y(safe_shift(my)), shift_s(safe_shift(ms));
  const bool ce_apart = ce != nullptr && temperature != M(1);  // the cross-entropy's softmax is at T = 1
  ChunkedSum<M> zx, zy, zs;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V sj = load(s + j, n);
    zx.add(O::exp(sj / T - shift_x));
    zy.add(O::exp(load(t + j, n) / T - shift_y));
    if (ce_apart) zs.add(O::exp(sj - shift_s));
  }
  const V vmx_row(mx), vmy_row(my), lzx(std::log(zx.sum())), lzy(std::log(zy.sum()));
  const CrossEntropy<M> xent{ms, std::log(ce_apart ? zs.sum() : zx.sum()), ce_scale, target};
  if (ce != nullptr) *ce = xent.loss(s, v);  // (before the gradient overwrites s in place)
  const V iota = O::iota();
  // (1b)
  std::pair<M, int64_t> head{M(0), 0};
  if constexpr (CODE == AKL) {
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      O::exp((load(t + j, n) / T - vmy_row) - lzy).store(r_buf + j, n);
    }
    head = akl_head(t_rank, r_buf, v, c.mu);
  }
  // The gradient of a vector of classes j..: the method's, plus the cross-entropy's with the term.
  auto store_grad = [&](const V& method_grad, int64_t j, int64_t n) {
    (ce != nullptr ? method_grad + xent.grad(load(s + j, n), iota, j) : method_grad).store(g + j, n);
  };
  auto terms = [&](int64_t j, int64_t n) {
    typename O::Mask in_head{};
    if constexpr (CODE == AKL) in_head = in_akl_head<O>(load(t_rank + j, n), head.first, head.second, iota, j);
    return divergence_terms<CODE, O>(c, load(s + j, n) / T, load(t + j, n) / T, vmx_row, lzx, vmy_row, lzy, in_head);
  };
  // (2) Per-class terms.
  ChunkedSum<M> sum_l, sum_r, sum_e, sum_f, sum_rt;
  const DivergenceRow<M> kd_row = divergence_row<CODE>(c, M(0), M(0), M(0), M(0));  // (kd's gradient: no row sum)
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const ClassTerms<V> k = terms(j, n);
    sum_l.add(k.l);
    sum_r.add(k.r);
    if constexpr (weighs_row_sums<CODE>) sum_e.add(k.e);
    if constexpr (CODE == AKL) sum_f.add(k.f);
    if (full) sum_rt.add(k.rt);
    if (g == nullptr || full) continue;
    if constexpr (CODE == KD) {
      store_grad(divergence_grad<CODE, O>(k, kd_row, scale), j, n);
    } else if constexpr (!weighs_row_sums<CODE>) {
      k.r.store(r_buf + j, n);
      k.q.store(q_buf + j, n);
    }
  }
  const DivergenceRow<M> row = divergence_row<CODE>(c, sum_l.sum(), sum_r.sum(), sum_e.sum(), sum_f.sum());
  // (3) The gradient, once the row sums are known; the full gradient recomputes the terms (the teacher's rt_k, p_k).
  if (full) {
    const M sum_teacher_r = teacher_sum_r<CODE>(row, sum_rt.sum());
    TemperatureGrad<M> dt{vmx_row, vmy_row};
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      const ClassTerms<V> k = terms(j, n);
      const V x = load(s + j, n) / T, y = load(t + j, n) / T;
      const V method_grad = divergence_grad<CODE, O>(k, row, scale);
      const V teacher_grad = divergence_teacher_grad<CODE, O>(k, row, sum_teacher_r, y, scale);
      dt.add(x, method_grad, y, teacher_grad);
      if (gt != nullptr) teacher_grad.store(gt + j, n);
      if (g != nullptr) store_grad(method_grad, j, n);
    }
    *dtemp = dt.value(t2_scale, scale, row.loss);
  } else if (g != nullptr && CODE != KD) {
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      const ClassTerms<V> k = weighs_row_sums<CODE>
                                  ? terms(j, n)
                                  : ClassTerms<V>{V(0), V::loadu(r_buf + j, n), V::loadu(q_buf + j, n), V(0), V(0),
                                                  V(0), V(0)};
      store_grad(divergence_grad<CODE, O>(k, row, scale), j, n);
    }
  }
  return row.loss;
}

template <int CODE, class M>
void divergence_rows_of(const RowsArgs& a, int64_t begin, int64_t end) {
  const auto c = DivergenceParams<M>::from(a.params);
  const bool keeps_terms = a.grad != nullptr && a.temperature_grad == nullptr && CODE != KD && !weighs_row_sums<CODE>;
  RowBuffers<M> buf(a, keeps_terms ? 2 : CODE == AKL ? 1 : 0);  // (akl: the teacher's probabilities in r_buf)
  M* r_buf = buf.extra;
  M* q_buf = buf.extra + a.v;
  for_rows<M>(a, begin, end, buf, [&](const M* s, const M* t, int64_t target, M* g, M* ce, const M* t_rank, M,
                                      M* gt, M* dtemp) {
    return divergence_row<CODE, M>(s, t, t_rank, target, g, ce, gt, dtemp, r_buf, q_buf, a.v, c, M(a.temperature),
                                   M(a.grad_scale), M(a.ce_scale), a.t2_scale);
  });
}

}  // namespace

void divergence_rows(const RowsArgs& a, int64_t begin, int64_t end) {
  dispatch_rows<NUM_DIVERGENCES>(a, [&](auto code, auto math) {
    divergence_rows_of<decltype(code)::value, decltype(math)>(a, begin, end);
  });
}

}  // namespace kdkernels::cpu::CPU_CAPABILITY
