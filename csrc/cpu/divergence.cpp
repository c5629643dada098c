// Fused CPU kernel of the divergence family: loss rows and gradient rows in one call, one row at a time per thread
// (rows of at most SHORT_ROW classes a block of them at a time, one row per lane: divergence_short_rows).
// setup.py compiles this file once per CPU capability (at::vec::Vectorized is then 8 or 16 floats wide). The math is
// divergence.h's; this file arranges the passes over a row, each class's exps computed once (pass 2) and kept in
// row buffers that stay in L2 with the row (docs/losses.md, "Streaming forms and passes"):
//
//   (1) row maxima of s and t (the only pass that reads the row from memory); a row whose classes are all masked in
//       both logits stops here (loss 0, gradient 0);
//   (2) es = exp(x - max x) and et = exp(y - max y) into the row buffers, their sums (and that of exp(s - max s) for
//       the cross-entropy term at T != 1); kd and rkl also sum their KL here (ExpsKl), and where that sum is finite
//       their row ends with a pass (3') that writes the gradient alone, from the kept exps (and for rkl the logits);
//   (2b) akl: the teacher's head (divergence.h AklHead) from the raw teacher row and its probabilities p = et / sum,
//       computed from et where a pass reads them: one pass lists the classes of p above a floor (a peaked row's
//       top classes; rarely a pass more, when those of the first floor hold less than mu), a select by mass over
//       a list of at most 256 classes, else 3 radix histograms of it in float32 (6 in float64), then a pass at the
//       value found, rarely a bisection more (when the two summation orders straddle mu) or about log2(V) passes to
//       split a tie group;
//   (3) per-class terms l_k, r_k (and e_k, f_k) from q = es / sum and p = et / sum and the logs (x - max x) - log sum:
//       the loss, and for kd (sum r = -1) the gradient; the other codes keep r_k in a row buffer;
//   (4) their gradient from r_k and q_k; bdkd and akl, whose r_k are weighted by their row sums, recompute their
//       terms from the kept exps here, and tvd its sign (TvdGrad). The full gradient (a learnable temperature, a
//       teacher that requires grad) sums the teacher's rt_k in (3) and recomputes the terms in (4) for every code,
//       writing the teacher's gradient and summing d loss / d T there.
//
// No exp is computed twice but those of a code's own terms (jsd's and the skew KLs' mixtures, abkd's powers) when
// (4) recomputes them.
#include "../divergence.h"

#include "rows.h"

namespace kdkernels::cpu::CPU_CAPABILITY {
namespace {

// The teacher's probabilities of akl's head search: p_k = et_k / sum et, from the kept exps et (pass 2) rather than
// a row buffer of their own, one product a class each time a pass reads them (the same product pass 3 computes).
template <class M>
struct AklProbabilities {
  const M* et;
  M inv_z;

  Vec<M> at(int64_t j, int64_t n) const { return Vec<M>::loadu(et + j, n) * Vec<M>(inv_z); }
  M at(int64_t i) const { return et[i] * inv_z; }
};

// The classes of p >= a floor, in index order (their index, raw teacher logit t and p), the greatest t of the others
// (-inf: none; NaN where a t is NaN), and a copy of the listed classes that the search of a candidate reorders
// (the radix select keeps those within the chosen digits).
template <class M>
struct AklList {
  int64_t* index;
  M *t, *p, *chosen_t, *chosen_p;
  int64_t size = 0;
  M unlisted_max = neg_inf<M>();
};

// Lists the classes of p >= p_floor (lanes past v are not classes); returns their mass.
template <class M, class S>
M akl_list(const S* t, AklProbabilities<M> p, int64_t v, M p_floor, AklList<M>& list) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V floor(p_floor), ninf(neg_inf<M>());
  V unlisted_max = ninf;
  M listed = M(0);
  int64_t size = 0;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const auto above_floor = O::ge(p.at(j, n), floor);
    unlisted_max = O::max(unlisted_max, O::select(above_floor, ninf, load(t + j, n)));
    for (uint32_t lanes = O::lane_bits(above_floor) & ((uint32_t(2) << (n - 1)) - 1); lanes != 0; lanes &= lanes - 1) {
      const int64_t i = j + __builtin_ctz(lanes);
      list.index[size] = i;
      list.t[size] = M(t[i]);
      list.p[size++] = p.at(i);
      listed += p.at(i);
    }
  }
  list.size = size;
  list.unlisted_max = max_lanes(unlisted_max);
  return listed;
}

// akl's radix select (divergence.h AklHead, (a)), one digit: the histogram mass[head.digits()] of p over the open
// digit of the classes (t, p)[size] within the chosen digits, which it copies into out_t, out_p (may be t, p);
// returns their number.
template <class M>
int64_t akl_histogram(const M* t, const M* p, int64_t size, const AklHead<M>& head, M* mass, M* out_t, M* out_p) {
  std::fill(mass, mass + head.digits(), M(0));
  int64_t kept = 0;
  for (int64_t k = 0; k < size; ++k) {
    const auto u = AklHead<M>::radix_key(t[k]);
    if (!head.in_prefix(u)) continue;
    mass[head.digit(u)] += p[k];
    out_t[kept] = t[k];
    out_p[kept++] = p[k];
  }
  return kept;
}

// akl's candidate (AklHead, (a)) from a short list: a select by mass on the list's copy (chosen_t, chosen_p). Each
// step splits the classes still open three ways around the middle one's t (above, equal, below) and keeps the part
// where the mass from the top crosses mu, until the equal part holds the crossing: about three steps of the list's
// size in all, where the radix select's three histograms of 2048 bins cost a short row far more than its classes.
// -inf (the radix select's lowest key) if the list's mass never crosses mu.
template <class M>
M akl_select_short(const AklList<M>& list, M mu) {
  M *t = list.chosen_t, *p = list.chosen_p;
  std::copy(list.t, list.t + list.size, t);
  std::copy(list.p, list.p + list.size, p);
  int64_t lo = 0, hi = list.size;
  M above = M(0);
  while (lo < hi) {
    const M pivot = t[lo + (hi - lo) / 2];
    if (std::isnan(pivot)) break;      // (no class is above or equal to it: the split would keep them all)
    int64_t gt = lo, i = lo, lt = hi;  // [lo, gt) above the pivot, [gt, i) equal, [lt, hi) below (or NaN)
    M mass_gt = M(0), mass_eq = M(0);
    while (i < lt) {
      if (t[i] > pivot) {
        mass_gt += p[i];
        std::swap(t[i], t[gt]);
        std::swap(p[i++], p[gt++]);
      } else if (t[i] == pivot) {
        mass_eq += p[i++];
      } else {
        std::swap(t[i], t[--lt]);
        std::swap(p[i], p[lt]);
      }
    }
    if (above + mass_gt > mu) {
      hi = gt;
    } else if (above + mass_gt + mass_eq > mu) {
      return pivot == M(0) ? -M(0) : pivot;  // (a zero's candidate is -0.0, as AklHead::candidate)
    } else {
      above += mass_gt + mass_eq;
      lo = lt;
    }
  }
  return neg_inf<M>();
}

// akl's candidate value (AklHead, (a)) from the classes of p >= a floor: the classes below it hold the least
// probabilities, so while those above hold more than mu, the mass crosses mu above them and each digit is chosen as
// over the whole row. The floor starts at AKL_FLOOR times the top class's p (et = 1) and falls by that factor, at
// most AKL_FLOOR_STEPS times, until the classes above hold more than mu, else to (1 - mu) / (2 V), where those below
// hold at most (1 - mu) / 2: a peaked row lists its top classes only (a flat one every class), in one pass over the
// row. A list of at most AKL_SHORT_LIST classes gives its candidate by akl_select_short, a longer one by the radix
// select's histograms of the list.
constexpr double AKL_FLOOR = 1.0 / 64;
constexpr int AKL_FLOOR_STEPS = 3;
constexpr int64_t AKL_SHORT_LIST = 256;
template <class M, class S>
M akl_candidate(const S* t, AklProbabilities<M> p, int64_t v, AklList<M>& list, M mu) {
  const M lowest = (M(1) - mu) / M(2 * v);
  M p_floor = p.inv_z;
  for (int step = 1;; ++step) {
    p_floor = step <= AKL_FLOOR_STEPS ? std::max(p_floor * M(AKL_FLOOR), lowest) : lowest;
    if (akl_list(t, p, v, p_floor, list) > mu || !(p_floor > lowest)) break;
  }
  if (list.size <= AKL_SHORT_LIST) return akl_select_short(list, mu);
  AklHead<M> radix;
  M mass[AklHead<M>::BINS];
  int64_t size = akl_histogram(list.t, list.p, list.size, radix, mass, list.chosen_t, list.chosen_p);
  for (radix.choose(mass, mu); radix.selecting(); radix.choose(mass, mu)) {
    size = akl_histogram(list.chosen_t, list.chosen_p, size, radix, mass, list.chosen_t, list.chosen_p);
  }
  return radix.candidate();
}

// ChunkedSum's sum over a row whose only terms other than 0 are those add() gets, class by class in index order: the
// same additions in each lane and chunk (a 0 changes no sum), without a pass over the row.
template <class M>
struct ListedSum {
  static constexpr int64_t L = Ops<M>::lanes, SPAN = L * ChunkedSum<M>::CHUNK;
  M total[L] = {}, part[L] = {};
  int64_t chunk = 0;

  void add(int64_t i, M x) {
    if (i / SPAN != chunk) {  // (ChunkedSum adds each chunk's lanes into the total at its end)
      for (int64_t l = 0; l < L; ++l) total[l] += std::exchange(part[l], M(0));
      chunk = i / SPAN;
    }
    part[i % L] += x;
  }
  M sum() const { return sum_lanes(Vec<M>::loadu(total) + Vec<M>::loadu(part)); }
};

// What akl's head needs at a value u (AklHead, (b)): A(u) = the mass of {t > u}, the mass of {t >= u} (A just
// below u), the counts of {t > u} and {t == u}, and the group's probability; each sum in the fallback's order.
template <class M>
struct AklTies {
  M mass, mass_from, count_above, size, p_group;
};
template <class M, class S>
AklTies<M> akl_ties(const S* t, AklProbabilities<M> p, int64_t v, M value) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V zero(M(0)), one(M(1)), u(value);
  ChunkedSum<M> mass, mass_from, count_above, group;
  V p_group = zero;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    const V tj = load(t + j, n), pj = p.at(j, n);
    const auto above = O::gt(tj, u), tie = O::eq(tj, u);
    mass.add(O::select(above, pj, zero));
    mass_from.add(O::select(O::ge(tj, u), pj, zero));
    count_above.add(O::select(above, one, zero));
    group.add(O::select(tie, one, zero));
    p_group = O::max(p_group, O::select(tie, pj, zero));
  }
  return {mass.sum(), mass_from.sum(), count_above.sum(), group.sum(), max_lanes(p_group)};
}

// akl_ties from the list, when every class of t >= value is listed (value > the others' greatest t): the same sums.
template <class M>
AklTies<M> akl_listed_ties(const AklList<M>& list, M value) {
  ListedSum<M> mass, mass_from, count_above, group;
  M p_group = M(0);
  for (int64_t k = 0; k < list.size; ++k) {
    const int64_t i = list.index[k];
    if (list.t[k] > value) mass.add(i, list.p[k]);
    if (list.t[k] >= value) mass_from.add(i, list.p[k]);
    if (list.t[k] > value) count_above.add(i, M(1));
    if (list.t[k] == value) group.add(i, M(1));
    if (list.t[k] == value) p_group = std::max(p_group, list.p[k]);
  }
  return {mass.sum(), mass_from.sum(), count_above.sum(), group.sum(), p_group};
}

// akl's fallback (AklHead, (b)): the bisection over the keys within the head's bracket, A summed as akl_ties does.
template <class M, class S>
void akl_bisect(const S* t, AklProbabilities<M> p, int64_t v, AklHead<M>& head, M mu) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const V zero(M(0));
  while (head.searching()) {
    const V probe(head.probe());
    ChunkedSum<M> above;
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      above.add(O::select(O::gt(load(t + j, n), probe), p.at(j, n), zero));
    }
    head.narrow(above.sum(), mu);
  }
}

// akl's head of a row (divergence.h AklHead) as (value, end): head = {t > value} + {t == value, index < end} on the
// raw teacher logits t, from the teacher's probabilities p. The list of the radix select holds the classes from the
// value up in most rows: then (b) and (c) read it instead of the row.
template <class M, class S>
std::pair<M, int64_t> akl_head(const S* t, AklProbabilities<M> p, int64_t v, AklList<M> list, M mu) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  AklHead<M> head;
  M value = akl_candidate(t, p, v, list, mu);  // (a), then (b)
  auto ties_at = [&](M u) { return u > list.unlisted_max ? akl_listed_ties(list, u) : akl_ties(t, p, v, u); };
  AklTies<M> ties = ties_at(value);
  head.settle(value, ties.mass, ties.mass_from, mu);
  if (head.searching()) {
    akl_bisect(t, p, v, head, mu);
    value = head.threshold();
    ties = ties_at(value);
  }
  const int64_t size = int64_t(ties.size);
  const int64_t share = AklHead<M>::group_share(ties.mass, int64_t(ties.count_above), size, ties.p_group, mu);
  if (share == 0 || share >= size) return {value, share == 0 ? 0 : v};
  if (value > list.unlisted_max) {  // (c) the end of the group's share-th class
    int64_t tied = 0, k = 0;
    for (; tied < share; ++k) tied += list.t[k] == value;
    return {value, list.index[k - 1] + 1};
  }
  const V u(value), one(M(1)), zero(M(0));
  int64_t lo = 0, hi = v;  // (c) the least end with `share` ties before it
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    ChunkedSum<M> tied;
    for (int64_t j = 0; j < mid; j += L) tied.add(O::select(O::eq(load(t + j, std::min(L, mid - j)), u), one, zero));
    (int64_t(tied.sum()) >= share ? hi : lo) = mid;
  }
  return {value, hi};
}

// Whether every class of both rows is -inf (not NaN).
template <class M, class S>
bool masked_in_both(const S* s, const S* t, int64_t v) {
  using O = Ops<M>;
  const Vec<M> ninf(neg_inf<M>());
  for (int64_t j = 0; j < v; j += O::lanes) {
    const int64_t n = std::min(O::lanes, v - j);
    if (O::any(O::lnot(O::land(O::eq(load(s + j, n), ninf), O::eq(load(t + j, n), ninf))))) return false;
  }
  return true;
}

// prefetch_next_row spread over passes (2) and (3): pass `part` (0 or 1) prefetches half of the next row, the
// classes that match [j, j + n) of the row at hand halved, so that the next row's read from memory overlaps the
// computing of both passes and is in L2 when pass (1) of the next row begins.
template <class M>
void prefetch_half_next_row(const RowBuffers<M>& rows, int64_t v, int part, int64_t j, int64_t n) {
  const int64_t from = (part * v + j) / 2;
  prefetch_next_row(rows, from, (part * v + j + n) / 2 - from);
}

// kd's KL(p || q) and rkl's KL(q || p), summed in pass (2) from the exps and the logits less their maxima x, y (the
// exps' arguments): with w the exps of the KL's first distribution (et for kd, es for rkl), a, b the logits of the
// first and the second, z, z' their exps' sums, KL = sum_k w_k (a_k - b_k) / z - (log z - log z') (as sum w / z = 1),
// a term 0 where w_k = 0 (kl_term). The gradient then needs no pass of terms: kd's g_k = (q_k - p_k) scale, rkl's
// g_k = q_k ((x_k - y_k) - C) scale with C = sum_k q_k (x_k - y_k) (the logs of z and z' cancel). The roundings are
// those of the terms' form: each of its log-probabilities carries the rounding of its row's log z. A row whose sum is
// not finite (a class the second distribution masks, NaN) takes passes (3) and (4), whose conventions cover it.
template <int CODE>
constexpr bool exps_kl = CODE == KD || CODE == RKL;

template <int CODE, class M>
struct ExpsKl {
  using O = Ops<M>;
  using V = Vec<M>;
  M cross, zx, zy, scale;

  static V term(const V& es, const V& et, const V& x, const V& y) {
    return CODE == KD ? kl_term<O>(et, y, x) : kl_term<O>(es, x, y);
  }
  M loss() const {
    return CODE == KD ? cross / zy - (std::log(zy) - std::log(zx)) : cross / zx - (std::log(zx) - std::log(zy));
  }
  // The gradient of classes whose exps are es, et and logits less their maxima x, y (as pass (2) computes them: each
  // exact to its own row's rounding, where (s - t) / T would round at the scale of two rows' offsets); scale 0 gives
  // 0, a finite cross sum leaving every class with w_k > 0 a finite a_k - b_k.
  V grad(const V& es, const V& et, const V& x, const V& y) const {
    if constexpr (CODE == KD) return es * V(scale / zx) - et * V(scale / zy);
    return O::where_nonzero(es, es * ((x - y) - V(cross / zx)) * V(scale / zx));
  }
};

// tvd's gradient in pass (4), divergence_grad of its r_k = q_k sign(q_k - p_k) / 2 from the kept exps:
// g_k = q_k (sign(q_k - p_k) / 2 - sum_r) scale, es_k times one of three constants (sign 1, -1, 0: where q_k = p_k, or
// either is NaN, as the terms' sign); exactly 0 where scale is 0, whatever the terms.
template <class M>
struct TvdGrad {
  using O = Ops<M>;
  using V = Vec<M>;
  V above, below, level, inv_zx, inv_zy;
  bool zero;

  TvdGrad(M sum_r, M scale, M zx, M zy)
      : above(scale / zx * (M(0.5) - sum_r)),
        below(scale / zx * (M(-0.5) - sum_r)),
        level(scale / zx * -sum_r),
        inv_zx(M(1) / zx),
        inv_zy(M(1) / zy),
        zero(scale == M(0)) {}
  V operator()(const V& es, const V& et) const {
    if (zero) return V(M(0));
    const V q = es * inv_zx, p = et * inv_zy;
    return es * O::select(O::gt(q, p), above, O::select(O::lt(q, p), below, level));
  }
};

// Whether pass (4) reads back the r_k of pass (3): not kd (whose gradient is pass (3)'s), bdkd and akl (which
// recompute their terms), nor tvd, whose terms are its probabilities' alone (no logs): recomputing them from the kept
// exps costs less than writing r_k and reading it back.
template <int CODE>
constexpr bool keeps_r = CODE != KD && CODE != TVD && !weighs_row_sums<CODE>;

// Whether a class absent in both rows needs divergence_terms_of's masking: not jsd's (each log-ratio multiplied by
// its own probability in kl_term, which gives 0 where that is 0, and the mixture's log finite) nor tvd's (no logs),
// whose terms there are 0 or, for subnormal probabilities, as good as 0 without it.
template <int CODE>
constexpr bool masks_absent = CODE != JSD && CODE != TVD;

// Long: its passes (numbered blocks) share the row's maxima, sums and buffers; the per-class math is in the
// family's header.
template <int CODE, class M, class S>
M divergence_row(const S* s, const S* t, const S* t_rank, int64_t target, M* g, M* ce, M* gt, M* dtemp,
                 const RowBuffers<M>& rows, AklList<M> akl_list, int64_t v, const DivergenceParams<M>& c, M temperature,
                 M scale, CeOptions<M> ce_options, bool t2_scale) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  // The worker's extra row buffers: exp(x - max x) and exp(y - max y) of every class (pass 2), and what pass 4 reads
  // back (r_k of pass 3).
  M* const es_row = rows.extra;
  M* const et_row = es_row + v;
  M* const kept = et_row + v;
  // x = s / T as s * (1 / T): one rounding more than a division, far cheaper; max(x) = max(s) / T keeps the order.
  const M inv_temperature = M(1) / temperature;
  const V inv_T(inv_temperature);
  // (1) Row maxima, m where a class is NaN (max_or_second: one instruction a vector). A NaN class still makes its
  // row NaN, through its exp in pass (2); only a row whose maxima are both -inf checks that it is masked in both
  // logits (masked_in_both) before it is skipped.
  V vmx(neg_inf<M>()), vmy(neg_inf<M>());
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    vmx = O::max_or_second(load(s + j, n), vmx);
    vmy = O::max_or_second(load(t + j, n), vmy);
  }
  const M ms = max_lanes(vmx), mx = ms * inv_temperature, my = max_lanes(vmy) * inv_temperature;
  if (is_neg_inf(mx) && is_neg_inf(my) && masked_in_both<M>(s, t, v)) return skip_row(rows, g, ce, v, gt, dtemp);
  const bool full = dtemp != nullptr;  // the full gradient: the teacher's (stored into gt unless null) and d / d T
  const V shift_x(safe_shift(mx)), shift_y(safe_shift(my)), shift_s(safe_shift(ms));
  const bool ce_apart = ce != nullptr && temperature != M(1);  // the cross-entropy's softmax is at T = 1
  // (2) The exps of both rows, kept, and their sums; kd's and rkl's KL sum (ExpsKl).
  const bool kl_now = exps_kl<CODE> && !full && std::isfinite(mx) && std::isfinite(my);
  ChunkedSum<M> zx, zy, zs, cross;
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    if (kl_now && g == nullptr) {
      prefetch_next_row(rows, j, n);  // (no pass (3) follows to prefetch the other half)
    } else {
      prefetch_half_next_row(rows, v, 0, j, n);
    }
    const V sj = load(s + j, n), x = sj * inv_T - shift_x, y = load(t + j, n) * inv_T - shift_y;
    const V es = O::exp(x), et = O::exp(y);
    es.store(es_row + j, n);
    if (!(CODE == RKL && kl_now)) et.store(et_row + j, n);  // (rkl's gradient in (3') reads no et)
    zx.add(es);
    zy.add(et);
    if (ce_apart) zs.add(O::exp(sj - shift_s));
    if constexpr (exps_kl<CODE>) cross.add(ExpsKl<CODE, M>::term(es, et, x, y));
  }
  const CrossEntropy<M> xent{ms, ce != nullptr ? std::log(ce_apart ? zs.sum() : zx.sum()) : M(0), ce_options, target};
  if (ce != nullptr) *ce = xent.loss(s, v);  // (before the gradient overwrites s in place)
  const V iota = O::iota();
  // The gradient of a vector of classes j..: the method's, plus the cross-entropy's with the term.
  auto store_grad = [&](const V& method_grad, int64_t j, int64_t n) {
    store_grad_vector(rows, ce != nullptr ? method_grad + xent.grad(load(s + j, n), iota, j) : method_grad, g, j, n);
  };
  // (3') kd and rkl, their KL summed in (2) and finite: the gradient only.
  if constexpr (exps_kl<CODE>) {
    const ExpsKl<CODE, M> kl{cross.sum(), zx.sum(), zy.sum(), scale};
    if (kl_now && std::isfinite(kl.cross)) {
      for (int64_t j = 0; g != nullptr && j < v; j += L) {
        const int64_t n = std::min(L, v - j);
        prefetch_half_next_row(rows, v, 1, j, n);
        const V es = V::loadu(es_row + j, n), et = V::loadu(et_row + j, n);
        store_grad(kl.grad(es, et, load(s + j, n) * inv_T - shift_x, load(t + j, n) * inv_T - shift_y), j, n);
      }
      return kl.loss();
    }
    for (int64_t j = 0; CODE == RKL && kl_now && j < v; j += L) {  // (the passes that follow read et)
      const int64_t n = std::min(L, v - j);
      O::exp(load(t + j, n) * inv_T - shift_y).store(et_row + j, n);
    }
  }
  // (The logs and inverses of the sums only here: kd's and rkl's (3') reads none of them.)
  const V vmx_row(mx), vmy_row(my), lzx(std::log(zx.sum())), lzy(std::log(zy.sum()));
  const V inv_zx(M(1) / zx.sum()), inv_zy(M(1) / zy.sum());
  // (2b) akl: the teacher's head.
  std::pair<M, int64_t> head{M(0), 0};
  if constexpr (CODE == AKL) {
    head = akl_head(t_rank, AklProbabilities<M>{et_row, M(1) / zy.sum()}, v, akl_list, c.mu);
  }
  // The terms of the classes j..: logs from the logits, probabilities from the kept exps; the masking of classes
  // absent in both rows (probabilities 0 or underflowed) only for a vector that has one (lanes past the row's end
  // are).
  auto terms = [&](int64_t j, int64_t n) {
    typename O::Mask in_head{};
    if constexpr (CODE == AKL) in_head = in_akl_head<O>(load(t_rank + j, n), head.first, head.second, iota, j);
    const V lq = (load(s + j, n) * inv_T - vmx_row) - lzx, lp = (load(t + j, n) * inv_T - vmy_row) - lzy;
    const V q = V::loadu(es_row + j, n) * inv_zx, p = V::loadu(et_row + j, n) * inv_zy;
    if (masks_absent<CODE> && O::any(absent_in_both<O>(q, p))) {
      return divergence_terms_of<CODE, O>(c, lq, lp, q, p, in_head);
    }
    return divergence_terms_of<CODE, O, false>(c, lq, lp, q, p, in_head);
  };
  // (3) Per-class terms.
  ChunkedSum<M> sum_l, sum_r, sum_e, sum_f, sum_rt;
  const DivergenceRow<M> kd_row = divergence_row<CODE>(c, M(0), M(0), M(0), M(0));  // (kd's gradient: no row sum)
  for (int64_t j = 0; j < v; j += L) {
    const int64_t n = std::min(L, v - j);
    prefetch_half_next_row(rows, v, 1, j, n);
    const ClassTerms<V> k = terms(j, n);
    sum_l.add(k.l);
    if constexpr (CODE != KD) sum_r.add(k.r);  // (kd: sum r = -1)
    if constexpr (weighs_row_sums<CODE>) sum_e.add(k.e);
    if constexpr (weighs_row_sums<CODE>) sum_f.add(k.f);
    if (full) sum_rt.add(k.rt);
    if (g == nullptr || full) continue;
    if constexpr (CODE == KD) {
      store_grad(divergence_grad<CODE, O>(k, kd_row, scale), j, n);
    } else if constexpr (keeps_r<CODE>) {
      k.r.store(kept + j, n);
    }
  }
  const DivergenceRow<M> row =
      divergence_row<CODE>(c, sum_l.sum(), CODE == KD ? M(-1) : sum_r.sum(), weighs_row_sums<CODE> ? sum_e.sum() : M(0),
                           weighs_row_sums<CODE> ? sum_f.sum() : M(0));
  // (4) The gradient, once the row sums are known; bdkd, akl and the full gradient (the teacher's rt_k, p_k)
  // recompute the terms from the kept exps.
  if (full) {
    const M sum_teacher_r = teacher_sum_r<CODE>(row, sum_rt.sum());
    TemperatureGrad<M> dt{vmx_row, vmy_row};
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      const ClassTerms<V> k = terms(j, n);
      const V x = load(s + j, n) * inv_T, y = load(t + j, n) * inv_T;
      const V method_grad = divergence_grad<CODE, O>(k, row, scale);
      const V teacher_grad = divergence_teacher_grad<CODE, O>(k, row, sum_teacher_r, y, scale);
      dt.add(x, method_grad, y, teacher_grad);
      if (gt != nullptr) teacher_grad.store(gt + j, n);
      if (g != nullptr) store_grad(method_grad, j, n);
    }
    *dtemp = dt.value(t2_scale, scale, row.loss);
  } else if (g != nullptr && CODE == TVD) {
    const TvdGrad<M> tvd(row.sum_r, scale, zx.sum(), zy.sum());
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      store_grad(tvd(V::loadu(es_row + j, n), V::loadu(et_row + j, n)), j, n);
    }
  } else if (g != nullptr && CODE != KD) {
    for (int64_t j = 0; j < v; j += L) {
      const int64_t n = std::min(L, v - j);
      const ClassTerms<V> k =
          weighs_row_sums<CODE>
              ? terms(j, n)
              : ClassTerms<V>{V(0), V::loadu(kept + j, n), V::loadu(es_row + j, n) * inv_zx, V(0), V(0), V(0), V(0)};
      store_grad(divergence_grad<CODE, O>(k, row, scale), j, n);
    }
  }
  return row.loss;
}

// Rows of at most SHORT_ROW classes run a block of L rows at a time, one row per lane of every vector (ShortBlock holds
// the block's classes as columns: x[j] holds class j of its L rows): a row's maxima, sums and logs are lanes of
// vectors, without the lane reductions and scalar logs that cost a short row more than its classes. Not for akl (its
// head is searched row by row), standardize, the full gradient, or inputs in another dtype than the math type.
constexpr int64_t SHORT_ROW = 32;
template <class M>
bool runs_as_short_rows(const RowsArgs& a, int code) {
  return a.v <= SHORT_ROW && code != AKL && !a.opt.standardize && a.temperature_grad == nullptr &&
         a.student_dtype == math_dtype<M>() && a.teacher_dtype == math_dtype<M>();
}

template <class M>
struct ShortBlock {
  static constexpr int64_t L = Ops<M>::lanes;
  M x[SHORT_ROW * L], y[SHORT_ROW * L], es[SHORT_ROW * L], et[SHORT_ROW * L], g[SHORT_ROW * L];
  M loss[L], ce[L], target_value[L];
  int64_t target[L];
  bool live[L];  // a row of the worker's that is not ignored (the other lanes hold -inf: masked in both, skipped)

  Vec<M> column(const M* p, int64_t j) const { return Vec<M>::loadu(p + j * L); }
};

// Rows [first, first + L) of the worker's [first, end) into the block's columns.
template <class M>
void load_block(const RowsArgs& a, int64_t first, int64_t end, ShortBlock<M>& b) {
  constexpr int64_t L = ShortBlock<M>::L;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t i = first + l;
    b.target[l] = i < end && a.target ? a.target[i] : 0;
    b.target_value[l] = M(b.target[l]);
    b.live[l] = i < end && !(a.target && b.target[l] == a.opt.ignore_index);
    const M* s = static_cast<const M*>(a.student) + (b.live[l] ? i * a.student_stride : 0);
    const M* t = static_cast<const M*>(a.teacher) + (b.live[l] ? i * a.teacher_stride : 0);
    for (int64_t j = 0; j < a.v; ++j) {
      b.x[j * L + l] = b.live[l] ? s[j] : neg_inf<M>();
      b.y[j * L + l] = b.live[l] ? t[j] : neg_inf<M>();
    }
  }
}

// The block's losses, cross-entropies and gradients into the rows [first, min(first + L, end)) of the outputs.
template <class M>
void store_block(const RowsArgs& a, int64_t first, int64_t end, const ShortBlock<M>& b) {
  constexpr int64_t L = ShortBlock<M>::L;
  for (int64_t l = 0; l < std::min(L, end - first); ++l) {
    const int64_t i = first + l;
    static_cast<M*>(a.loss)[i] = b.loss[l];
    if (a.ce_loss != nullptr) static_cast<M*>(a.ce_loss)[i] = b.ce[l];
    if (a.grad == nullptr) continue;
    M* g = static_cast<M*>(a.grad) + i * a.v;
    for (int64_t j = 0; j < a.v; ++j) g[j] = b.g[j * L + l];
  }
}

// The cross-entropy term of the block's rows (CrossEntropy, from the input rows themselves, before an in-place
// gradient overwrites them): each row's loss into b.ce, and its share eps / K per lane.
template <class M>
Vec<M> short_rows_ce(const RowsArgs& a, int64_t first, const Vec<M>& m1, const Vec<M>& lz1,
                     const typename Ops<M>::Mask& skipped, ShortBlock<M>& b) {
  constexpr int64_t L = ShortBlock<M>::L;
  M m1_lanes[L], lz1_lanes[L], skip_lanes[L], share[L];
  m1.store(m1_lanes);
  lz1.store(lz1_lanes);
  Ops<M>::select(skipped, Vec<M>(M(1)), Vec<M>(M(0))).store(skip_lanes);
  for (int64_t l = 0; l < L; ++l) {
    const CrossEntropy<M> xent{m1_lanes[l], lz1_lanes[l], CeOptions<M>::of(a), b.target[l]};
    const M* s = static_cast<const M*>(a.student) + (first + l) * a.student_stride;
    b.ce[l] = skip_lanes[l] != M(0) ? M(0) : xent.loss(s, a.v);
    share[l] = xent.share;
  }
  return Vec<M>::loadu(share);
}

// Each lane's row weights (divergence_row) from the row sums of the terms, and its loss (0 where skipped) into b.
template <int CODE, class M>
DivergenceRow<Vec<M>> short_rows_weights(const RowsArgs& a, const DivergenceParams<M>& c, const Vec<M> (&sums)[4],
                                         const typename Ops<M>::Mask& skipped, ShortBlock<M>& b) {
  constexpr int64_t L = ShortBlock<M>::L;
  M lanes[4][L], skip_lanes[L], weight_a[L], weight_b[L], sum_r[L];
  for (int k = 0; k < 4; ++k) sums[k].store(lanes[k]);
  Ops<M>::select(skipped, Vec<M>(M(1)), Vec<M>(M(0))).store(skip_lanes);
  for (int64_t l = 0; l < L; ++l) {
    const DivergenceRow<M> row =
        divergence_row<CODE>(c, lanes[0][l], CODE == KD ? M(-1) : lanes[1][l],
                             weighs_row_sums<CODE> ? lanes[2][l] : M(0), weighs_row_sums<CODE> ? lanes[3][l] : M(0));
    b.loss[l] = skip_lanes[l] != M(0) ? M(0) : row.loss * M(a.opt.t2());
    weight_a[l] = row.a;
    weight_b[l] = row.b;
    sum_r[l] = row.sum_r;
  }
  using V = Vec<M>;
  return {V(M(0)), V::loadu(weight_a), V::loadu(weight_b), V::loadu(sum_r)};
}

// divergence_row's passes over a block of short rows (ShortBlock), one row per lane.
template <int CODE, class M>
void short_rows_block(const RowsArgs& a, int64_t first, const DivergenceParams<M>& c, ShortBlock<M>& b) {
  using O = Ops<M>;
  using V = Vec<M>;
  constexpr int64_t L = O::lanes;
  const int64_t v = a.v;
  const V ninf(neg_inf<M>()), zero(M(0)), inv_T(M(1) / M(a.opt.temperature));
  auto safe = [&](const V& m) { return O::select(O::eq(m, ninf), zero, m); };  // (safe_shift)
  // (1) Row maxima; the lanes whose classes are all -inf in both rows are skipped (loss 0, gradient 0).
  V vmx = ninf, vmy = ninf;
  auto skipped = O::all();
  for (int64_t j = 0; j < v; ++j) {
    const V x = b.column(b.x, j), y = b.column(b.y, j);
    vmx = O::max_or_second(x, vmx);
    vmy = O::max_or_second(y, vmy);
    skipped = O::land(skipped, O::land(O::eq(x, ninf), O::eq(y, ninf)));
  }
  const V mx = vmx * inv_T, my = vmy * inv_T, shift_x = safe(mx), shift_y = safe(my), shift_s = safe(vmx);
  const bool ce = a.ce_loss != nullptr, ce_apart = ce && a.opt.temperature != 1.0;
  // (2) The exps, kept, and their sums.
  V zx = zero, zy = zero, zs = zero;
  for (int64_t j = 0; j < v; ++j) {
    const V x = b.column(b.x, j), es = O::exp(x * inv_T - shift_x), et = O::exp(b.column(b.y, j) * inv_T - shift_y);
    es.store(b.es + j * L);
    et.store(b.et + j * L);
    zx = zx + es;
    zy = zy + et;
    if (ce_apart) zs = zs + O::exp(x - shift_s);
  }
  const V lzx = O::log(zx), lzy = O::log(zy), inv_zx = V(M(1)) / zx, inv_zy = V(M(1)) / zy;
  const V lz1 = ce_apart ? O::log(zs) : lzx;
  const V share = ce ? short_rows_ce(a, first, vmx, lz1, skipped, b) : zero;
  auto terms = [&](int64_t j) {
    const V lq = (b.column(b.x, j) * inv_T - mx) - lzx, lp = (b.column(b.y, j) * inv_T - my) - lzy;
    return divergence_terms_of<CODE, O>(c, lq, lp, b.column(b.es, j) * inv_zx, b.column(b.et, j) * inv_zy);
  };
  // (3) The row sums of the terms, and each row's weights.
  V sums[4] = {zero, zero, zero, zero};
  for (int64_t j = 0; j < v; ++j) {
    const ClassTerms<V> k = terms(j);
    sums[0] = sums[0] + k.l;
    sums[1] = sums[1] + k.r;
    sums[2] = sums[2] + k.e;
    sums[3] = sums[3] + k.f;
  }
  const DivergenceRow<V> row = short_rows_weights<CODE>(a, c, sums, skipped, b);
  if (a.grad == nullptr) return;
  // (4) The gradient.
  const V target = V::loadu(b.target_value);
  for (int64_t j = 0; j < v; ++j) {
    V g = divergence_grad<CODE, O>(terms(j), row, M(a.grad_scale));
    if (ce) {
      const auto is_target = O::eq(target, V(M(j)));
      g = g + CrossEntropy<M>::grad_of(b.column(b.x, j), vmx, lz1, is_target, share, CeOptions<M>::of(a));
    }
    O::select(skipped, zero, g).store(b.g + j * L);
  }
}

// Runs the worker's rows [begin, end) as blocks of short rows.
template <int CODE, class M>
void divergence_short_rows(const RowsArgs& a, int64_t begin, int64_t end, const DivergenceParams<M>& c) {
  ShortBlock<M> b;
  for (int64_t first = begin; first < end; first += ShortBlock<M>::L) {
    load_block(a, first, end, b);
    short_rows_block<CODE>(a, first, c, b);
    store_block(a, first, end, b);
  }
}

template <int CODE, class M>
void divergence_rows_of(const RowsArgs& a, int64_t begin, int64_t end) {
  const auto c = DivergenceParams<M>::from(a.params);
  if (runs_as_short_rows<M>(a, CODE)) return divergence_short_rows<CODE, M>(a, begin, end, c);
  const bool keeps_rs = a.grad != nullptr && a.temperature_grad == nullptr && keeps_r<CODE>;
  // divergence_row's es_row, et_row and kept; akl's list (AklList: t, p and their copy in 4 rows, the indices apart).
  RowBuffers<M> rows(a, keeps_rs ? 3 : CODE == AKL ? 6 : 2);
  std::vector<int64_t> akl_index(CODE == AKL ? a.v : 0);
  M* const list = rows.extra + 2 * a.v;
  const AklList<M> akl_list{akl_index.data(), list, list + a.v, list + 2 * a.v, list + 3 * a.v};
  for_rows<M>(a, begin, end, rows,
              [&](const auto* s, const auto* t, int64_t target, M* g, M* ce, const auto* t_rank, M, M* gt, M* dtemp) {
                return divergence_row<CODE, M>(s, t, t_rank, target, g, ce, gt, dtemp, rows, akl_list, a.v, c,
                                               M(a.opt.temperature), M(a.grad_scale), CeOptions<M>::of(a),
                                               a.opt.t2_scale);
              });
}

}  // namespace

void divergence_rows(const RowsArgs& a, int64_t begin, int64_t end) {
  dispatch_rows<NUM_DIVERGENCES>(
      a, [&](auto code, auto math) { divergence_rows_of<decltype(code)::value, decltype(math)>(a, begin, end); });
}

}  // namespace kdkernels::cpu::CPU_CAPABILITY
