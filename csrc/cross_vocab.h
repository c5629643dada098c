// The losses between two vocabularies (docs/losses.md, section 11): their codes, named parameters and the per-class
// formulas the kernels share. A row's q~ (student, Vs classes) and p~ (teacher, Vt classes) are compared by
//   uld:    the sorted L1 sum_i |q~_(i) - p~_(i)| (both sorted descending, the shorter zero-padded);
//   hybrid: w_m sum_m J(p~_{b_m}, q~_{a_m}) over the vocabulary map's pairs + w_u (the sorted L1 of the unmatched
//           classes, 0 when either model has none),
// and the student's gradient is g_j = (r_j - q_j sum_k r_k) / T_s with r_j = q~_j dl/dq~_j.
#pragma once

#include "divergence.h"

// The codes of kdkernels/methods.py CrossVocab, in its order, and the fields of its CrossVocabParams.
// clang-format off
#define KDKERNELS_CROSS_VOCAB_CODES(X) X(ULD) X(HYBRID)
#define KDKERNELS_CROSS_VOCAB_PARAMS(X)                                                                  \
  X(T, teacher_temperature) X(int, matched_code) X(T, mix_p) X(T, mix_q) X(T, log_mix_p) X(T, log_mix_q) \
  X(T, matched_weight) X(T, unmatched_weight)
// clang-format on

namespace kdkernels {
inline namespace KDKERNELS_MATH_NAMESPACE {

enum CrossVocab : int { KDKERNELS_CROSS_VOCAB_CODES(KDKERNELS_ENUMERATOR) NUM_CROSS_VOCAB };

KDKERNELS_DEFINE_PARAMS(CrossVocabParams, KDKERNELS_CROSS_VOCAB_PARAMS)

// A matched pair's term J(p~, q~) and r = q~ dJ/dq~, from log q~ and log p~ (docs/losses.md 11.3), for matched_code
// KD, RKL or JSD (divergence.h: TRL's beta = 0, 1, or in between, its mixture in mix_p, mix_q and their logs). Over a
// subset of the classes sum q~ != 1, so RKL's r keeps its "+ q~". A term whose first factor is 0 is 0, so masked
// classes add nothing unless the other model gives them mass (then J is infinite).
template <class T>
struct MatchedTerm {
  T loss, r;
};

template <class T>
KD_HD T times_log_ratio(T a, T log_a, T log_b) {  // a log(a / b), 0 where a = 0
  return a == T(0) ? T(0) : a * (log_a - log_b);
}

template <class T>
KD_HD MatchedTerm<T> matched_term(const CrossVocabParams<T>& c, T lq, T lp) {
  const T q = exp(lq), p = exp(lp);
  if (c.matched_code == KD) return {times_log_ratio(p, lp, lq), -p};
  if (c.matched_code == RKL) return {times_log_ratio(q, lq, lp), q == T(0) ? T(0) : q * (lq - lp + T(1))};
  // log m = log(mix_p p + mix_q q), as a log-sum-exp of the logs (exact where both are tiny)
  const T a = lp + c.log_mix_p, b = lq + c.log_mix_q, hi = nan_max(a, b);
  const T lm = is_neg_inf(hi) ? hi : hi + log1p(exp((a < b ? a : b) - hi));
  return {c.mix_p * times_log_ratio(p, lp, lm) + c.mix_q * times_log_ratio(q, lq, lm),
          q == T(0) ? T(0) : c.mix_q * q * (lq - lm)};
}

// sign(x) with sign(0) = 0 (and 0 for NaN, whose loss is NaN anyway): the sorted L1's dl/dq~ of one rank.
template <class T>
KD_HD T sign_of(T x) {
  return T(x > T(0)) - T(x < T(0));
}

}  // namespace KDKERNELS_MATH_NAMESPACE
}  // namespace kdkernels
