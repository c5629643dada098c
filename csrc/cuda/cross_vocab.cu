// CUDA kernels of the losses between two vocabularies (docs/losses.md, section 11.5): uld and GOLD's hybrid, the loss
// and the student's gradient in one call, in float32. A transcription of the CPU kernel (cpu/cross_vocab.cpp) and of
// the Triton kernels (kdkernels/backends/triton/cross_vocab.py), which the tests check against the oracle; the
// per-class formulas are cross_vocab.h's.
//
// A row of up to SORT_CLASSES classes a side is one block of sorted_row_kernel: the log-normalisers (block
// reductions), then the compared classes' probabilities (uld: all; hybrid: the unmatched ones, through the map's
// lists) as 64-bit keys sorted descending by a block-wide radix sort in shared memory (cub::BlockRadixSort): the
// teacher's float bits alone (a constant), then the student's above 2^32 - 1 - class, so that tied probabilities rank
// the lower class first (section 11.2's rule) and each rank's class comes back with it. A probability is >= 0, so its
// float bits sort as an unsigned integer. Each thread then holds SORT_ITEMS consecutive ranks of both rows: the sorted
// L1, r = w q~ sign(q~_(i) - p~_(i)), the matched pairs' J and r, and the gradient's scatter through the classes.
//
// Wider rows (an LLM's vocabulary) go a chunk of rows at a time through a workspace of at most CHUNK_ELEMENTS
// probabilities a side, as Triton's chunked path does: probs_kernel writes q~ and p~ of the compared classes and the
// log-normalisers, at::sort sorts the chunk's rows (descending and stable: ties keep the lower class first), and
// ranks_kernel makes the fused pass over the sorted ranks. Only the chunk's workspace is extra, not [N, V].
#include <ATen/ops/sort.h>

#include <algorithm>
#include <cub/block/block_radix_sort.cuh>

#include "../cross_vocab_op.h"
#include "common.cuh"

namespace kdkernels::cuda {
namespace {

// The on-chip sort: 512 threads of 8 keys, rows of up to 4096 classes a side (Triton's MAX_BLOCK).
constexpr int SORT_THREADS = 512, SORT_ITEMS = 8, SORT_CLASSES = SORT_THREADS * SORT_ITEMS;
using RowSort = cub::BlockRadixSort<uint64_t, SORT_THREADS, SORT_ITEMS>;
// The chunked path's workspace: probabilities a side of the rows sorted at once (Triton's CHUNK_ELEMENTS).
constexpr int64_t CHUNK_ELEMENTS = int64_t(1) << 22;

// What the kernels read and write besides the logits (the launch's constants, the outputs, the map's lists).
struct CrossVocabLaunch {
  const int64_t* target;      // [N] or nullptr
  const float* denominator;   // 0-d or nullptr (the gradients are scaled by its inverse)
  const float *cs, *ct;       // the log scales [N] or nullptr
  float *loss, *ce, *dscale;  // [N]; ce and dscale nullptr without the cross-entropy, the gradient
  const int64_t *pair_s, *pair_t, *free_s, *free_t;  // hybrid's lists, nullptr for uld
  int64_t vs, vt, ns, nt, num_pairs, s_stride, t_stride, ignore_index;
  float inv_ts, inv_tt, grad_scale, scale_grad_scale, ce_scale;
  bool hybrid;
};

template <class T>
struct CrossVocabRows {
  const T* s;  // the row's student logits
  const T* t;  // the row's teacher logits
  T* g;        // the row's gradient, or nullptr
};

// A row's statistics once its log-normalisers are known.
struct RowState {
  bool skip;  // left out, or masked in both models: loss 0, gradient 0
  int64_t target;
  float lz_x, lz_y, lz1, cs, ct, grad_scale, scale_grad_scale, ce_scale;
};

__device__ __forceinline__ float float_of_bits(uint32_t bits) {
  return __uint_as_float(bits);
}

// log sum exp(x * inv_t) over a row of width v (the block's threads strided): -inf when all are masked.
template <class T>
__device__ float row_log_partition(const T* x, int64_t v, float inv_t, Lse* scratch) {
  Lse l;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) l.add(to_float(x[j]) * inv_t);
  l = block_reduce(l, scratch);
  return l.m == -INFINITY ? -INFINITY : l.m + logf(l.z);
}

__device__ RowState row_state(const CrossVocabLaunch& a, int64_t row, float lz_x, float lz_y, float lz1) {
  RowState st{false, -1, lz_x, lz_y, lz1, 0.f, 0.f, a.grad_scale, a.scale_grad_scale, a.ce_scale};
  if (a.target != nullptr) st.target = a.target[row];
  st.skip = (a.target != nullptr && st.target == a.ignore_index) || (lz_x == -INFINITY && lz_y == -INFINITY);
  if (a.cs != nullptr) st.cs = a.cs[row];
  if (a.ct != nullptr) st.ct = a.ct[row];
  if (a.denominator != nullptr) {
    const float inv = 1.f / *a.denominator;
    st.grad_scale *= inv;
    st.scale_grad_scale *= inv;
    st.ce_scale *= inv;
  }
  return st;
}

template <class T>
__device__ RowState start_row(const CrossVocabRows<T>& r, const CrossVocabLaunch& a, int64_t row, Lse* scratch) {
  const float lz_x = row_log_partition(r.s, a.vs, a.inv_ts, scratch);
  const float lz_y = row_log_partition(r.t, a.vt, a.inv_tt, scratch);
  const float lz1 = a.ce != nullptr && a.inv_ts != 1.f ? row_log_partition(r.s, a.vs, 1.f, scratch) : lz_x;
  return row_state(a, row, lz_x, lz_y, lz1);
}

template <class T>
__device__ void skip_cross_vocab_row(const CrossVocabRows<T>& r, const CrossVocabLaunch& a, int64_t row) {
  if (threadIdx.x == 0) {
    a.loss[row] = 0.f;
    if (a.ce != nullptr) a.ce[row] = 0.f;
    if (a.dscale != nullptr) a.dscale[row] = 0.f;
  }
  if (r.g != nullptr) zero_row(r.g, a.vs);
}

// q~ (or p~) of compared class `cls` of a row.
template <class T>
__device__ __forceinline__ float probability(const T* x, int64_t cls, float inv_t, float lz, float c) {
  return expf(to_float(x[cls]) * inv_t - lz + c);
}

// A rank's |q~_(i) - p~_(i)| (x) and r = w_u q~_(i) sign(q~_(i) - p~_(i)) (y, 0 unless `student_rank`).
__device__ __forceinline__ Sum2 rank_terms(float q, float p, bool student_rank, float w_u) {
  const float d = q - p;
  return {fabsf(d), student_rank ? w_u * q * sign_of(d) : 0.f};
}

// Pair m's w_m J (x) and w_m r (y).
template <class T>
__device__ __forceinline__ Sum2 pair_terms(const CrossVocabRows<T>& r, const CrossVocabLaunch& a,
                                           const CrossVocabParams<float>& c, const RowState& st, int64_t m) {
  const float lq = to_float(r.s[a.pair_s[m]]) * a.inv_ts - st.lz_x + st.cs;
  const float lp = to_float(r.t[a.pair_t[m]]) * a.inv_tt - st.lz_y + st.ct;
  const MatchedTerm<float> term = matched_term(c, lq, lp);
  return {c.matched_weight * term.loss, c.matched_weight * term.r};
}

// The matched pairs' sums of w_m J and w_m r over this thread's pairs (0 for uld).
template <class T>
__device__ Sum2 matched_sums(const CrossVocabRows<T>& r, const CrossVocabLaunch& a, const CrossVocabParams<float>& c,
                             const RowState& st) {
  Sum2 sums;
  for (int64_t m = threadIdx.x; m < a.num_pairs; m += blockDim.x) sums.merge(pair_terms(r, a, c, st, m));
  return sums;
}

// g_j = grad_scale (r_j - q_j R) (+ the cross-entropy's) at class j.
template <class T>
__device__ __forceinline__ void store_grad(const CrossVocabRows<T>& r, const CrossVocabLaunch& a, const RowState& st,
                                           int64_t j, float rj, float R) {
  const float sj = to_float(r.s[j]);
  float g = st.grad_scale * (rj - expf(sj * a.inv_ts - st.lz_x) * R);
  if (a.ce != nullptr) g += st.ce_scale * (expf(sj - st.lz1) - (j == st.target ? 1.f : 0.f));
  r.g[j] = from_float<T>(g);
}

// The row's sums (x: the sorted L1 over the ranks, y: sum r over the ranks) and the matched pairs' reduced: stores
// the loss, the cross-entropy and dl/dc_s; returns R = sum r.
template <class T>
__device__ float finish_row(const CrossVocabRows<T>& r, const CrossVocabLaunch& a, const CrossVocabParams<float>& c,
                            const RowState& st, int64_t row, Sum2 ranks, Sum2* scratch) {
  const bool compared = a.ns > 0 && a.nt > 0;  // (hybrid: no term without unmatched classes on both sides)
  ranks = block_reduce(ranks, scratch);
  const Sum2 pairs = block_reduce(matched_sums(r, a, c, st), scratch);
  const float R = (compared ? ranks.y : 0.f) + pairs.y;
  if (threadIdx.x == 0) {
    a.loss[row] = (compared ? c.unmatched_weight * ranks.x : 0.f) + pairs.x;
    if (a.ce != nullptr) a.ce[row] = st.lz1 - (st.target >= 0 && st.target < a.vs ? to_float(r.s[st.target]) : NAN);
    if (a.dscale != nullptr) a.dscale[row] = st.scale_grad_scale * R;
  }
  return R;
}

template <class T>
__device__ void store_pair_grads(const CrossVocabRows<T>& r, const CrossVocabLaunch& a,
                                 const CrossVocabParams<float>& c, const RowState& st, float R) {
  for (int64_t m = threadIdx.x; m < a.num_pairs; m += blockDim.x) {
    store_grad(r, a, st, a.pair_s[m], pair_terms(r, a, c, st, m).y, R);
  }
}

template <class T>
__device__ CrossVocabRows<T> rows_of(const T* s, const T* t, T* g, const CrossVocabLaunch& a, int64_t row) {
  return {s + row * a.s_stride, t + row * a.t_stride, g == nullptr ? nullptr : g + row * a.vs};
}

// Sorts this thread's keys of the row's compared classes descending: the teacher's (bits(p~) << 32) or the
// student's ((bits(q~) << 32) | (2^32 - 1 - class)), padding 0 (last: a real student key is > 0).
template <class T>
__device__ void sort_row(const T* x, const int64_t* free, int64_t n, float inv_t, float lz, float c, bool student,
                         uint64_t (&keys)[SORT_ITEMS], RowSort::TempStorage& storage) {
#pragma unroll
  for (int e = 0; e < SORT_ITEMS; ++e) {
    const int64_t k = int64_t(threadIdx.x) * SORT_ITEMS + e, cls = k < n && free != nullptr ? free[k] : k;
    const uint64_t bits = k < n ? __float_as_uint(probability(x, cls, inv_t, lz, c)) : 0u;
    keys[e] = k < n ? bits << 32 | (student ? 0xffffffffu - uint32_t(cls) : 0u) : 0u;
  }
  RowSort(storage).SortDescending(keys, student ? 0 : 32);  // (the teacher's low half is 0: not sorted on)
  __syncthreads();                                          // (the storage is reused by the next sort)
}

// One block per row of up to SORT_CLASSES classes a side; thread i holds ranks [i SORT_ITEMS, (i + 1) SORT_ITEMS).
template <class T>
__global__ void __launch_bounds__(SORT_THREADS)
    sorted_row_kernel(const T* s, const T* t, T* g, CrossVocabLaunch a, CrossVocabParams<float> c) {
  __shared__ RowSort::TempStorage sort_storage;
  __shared__ Lse lse_scratch[MAX_WARPS];
  __shared__ Sum2 sum_scratch[MAX_WARPS];
  const int64_t row = blockIdx.x;
  const CrossVocabRows<T> r = rows_of(s, t, g, a, row);
  const RowState st = start_row(r, a, row, lse_scratch);
  if (st.skip) return skip_cross_vocab_row(r, a, row);
  uint64_t keys[SORT_ITEMS];
  float p_sorted[SORT_ITEMS], r_sorted[SORT_ITEMS];
  sort_row(r.t, a.free_t, a.nt, a.inv_tt, st.lz_y, st.ct, false, keys, sort_storage);
#pragma unroll
  for (int e = 0; e < SORT_ITEMS; ++e) p_sorted[e] = float_of_bits(uint32_t(keys[e] >> 32));
  sort_row(r.s, a.free_s, a.ns, a.inv_ts, st.lz_x, st.cs, true, keys, sort_storage);
  const bool compared = a.ns > 0 && a.nt > 0;
  Sum2 ranks;
#pragma unroll
  for (int e = 0; e < SORT_ITEMS; ++e) {
    const int64_t i = int64_t(threadIdx.x) * SORT_ITEMS + e;
    const Sum2 terms = rank_terms(i < a.ns ? float_of_bits(uint32_t(keys[e] >> 32)) : 0.f, i < a.nt ? p_sorted[e] : 0.f,
                                  i < a.ns && compared, c.unmatched_weight);
    r_sorted[e] = terms.y;
    ranks.merge(terms);
  }
  const float R = finish_row(r, a, c, st, row, ranks, sum_scratch);
  if (r.g == nullptr) return;
#pragma unroll
  for (int e = 0; e < SORT_ITEMS; ++e) {
    const int64_t i = int64_t(threadIdx.x) * SORT_ITEMS + e;
    if (i < a.ns) store_grad(r, a, st, int64_t(0xffffffffu - uint32_t(keys[e])), r_sorted[e], R);
  }
  store_pair_grads(r, a, c, st, R);
}

// The chunked path's workspace rows of a chunk (local row i at i * ns, i * nt, i * 3).
struct Workspace {
  float *q, *p, *stats;              // q~ [chunk, ns] and p~ [chunk, nt] of the compared classes; (lz_x, lz_y, lz1)
  const float *q_sorted, *p_sorted;  // their rows sorted descending
  const int64_t* order;              // the position in the student's compared classes of each sorted q~
};

// Writes out[k] = the probability of compared class k (free's k-th, or k itself for uld) for k < n.
template <class T>
__device__ void write_probabilities(const T* x, const int64_t* free, int64_t n, float inv_t, float lz, float c,
                                    float* out) {
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) out[k] = probability(x, free ? free[k] : k, inv_t, lz, c);
}

// The chunked path's first pass, a block per row of the chunk starting at first_row.
template <class T>
__global__ void __launch_bounds__(512)
    probs_kernel(const T* s, const T* t, CrossVocabLaunch a, Workspace w, int64_t first_row) {
  __shared__ Lse lse_scratch[MAX_WARPS];
  const int64_t local = blockIdx.x, row = first_row + local;
  const CrossVocabRows<T> r = rows_of(s, t, static_cast<T*>(nullptr), a, row);
  const RowState st = start_row(r, a, row, lse_scratch);
  if (threadIdx.x == 0) {
    w.stats[local * 3] = st.lz_x;
    w.stats[local * 3 + 1] = st.lz_y;
    w.stats[local * 3 + 2] = st.lz1;
  }
  write_probabilities(r.s, a.free_s, a.ns, a.inv_ts, st.lz_x, st.cs, w.q + local * a.ns);
  write_probabilities(r.t, a.free_t, a.nt, a.inv_tt, st.lz_y, st.ct, w.p + local * a.nt);
}

// The chunked path's fused pass over a chunk's sorted rows, a block per row: the ranks' sums, then (once R is known)
// the gradient's scatter through the order.
template <class T>
__global__ void __launch_bounds__(512) ranks_kernel(const T* s, const T* t, T* g, CrossVocabLaunch a,
                                                    CrossVocabParams<float> c, Workspace w, int64_t first_row) {
  __shared__ Sum2 sum_scratch[MAX_WARPS];
  const int64_t local = blockIdx.x, row = first_row + local;
  const CrossVocabRows<T> r = rows_of(s, t, g, a, row);
  const float* stats = w.stats + local * 3;
  const RowState st = row_state(a, row, stats[0], stats[1], stats[2]);
  if (st.skip) return skip_cross_vocab_row(r, a, row);
  const float* q = w.q_sorted + local * a.ns;
  const float* p = w.p_sorted + local * a.nt;
  const bool compared = a.ns > 0 && a.nt > 0;
  auto terms = [&](int64_t i) {
    return rank_terms(i < a.ns ? q[i] : 0.f, i < a.nt ? p[i] : 0.f, i < a.ns && compared, c.unmatched_weight);
  };
  Sum2 ranks;
  for (int64_t i = threadIdx.x; i < std::max(a.ns, a.nt); i += blockDim.x) ranks.merge(terms(i));
  const float R = finish_row(r, a, c, st, row, ranks, sum_scratch);
  if (r.g == nullptr) return;
  const int64_t* order = w.order + local * a.ns;
  for (int64_t i = threadIdx.x; i < a.ns; i += blockDim.x) {
    store_grad(r, a, st, a.free_s != nullptr ? a.free_s[order[i]] : order[i], terms(i).y, R);
  }
  store_pair_grads(r, a, c, st, R);
}

// Sorts rows [0, rows) of x [chunk, n] descending, stably, into sorted and order (the rows of the same shape).
void sort_rows(const at::Tensor& x, const at::Tensor& sorted, const at::Tensor& order, int64_t rows) {
  at::Tensor values = sorted.narrow(0, 0, rows), indices = order.narrow(0, 0, rows);
  at::sort_out(values, indices, x.narrow(0, 0, rows), /*stable=*/true, /*dim=*/1, /*descending=*/true);
}

// Rows wider than the on-chip sort: chunks of rows through one workspace (allocated once per call).
template <class T>
void launch_chunked(const T* s, const T* t, T* g, const CrossVocabLaunch& a, const CrossVocabParams<float>& c,
                    int64_t n, const at::TensorOptions& options, cudaStream_t stream) {
  const int64_t chunk = std::max<int64_t>(1, std::min(n, CHUNK_ELEMENTS / std::max<int64_t>({a.ns, a.nt, 1})));
  const at::TensorOptions f32 = options.dtype(at::kFloat), i64 = options.dtype(at::kLong);
  const at::Tensor q = at::empty({chunk, a.ns}, f32), p = at::empty({chunk, a.nt}, f32);
  const at::Tensor stats = at::empty({chunk, 3}, f32), q_sorted = at::empty_like(q), p_sorted = at::empty_like(p);
  const at::Tensor order = at::empty({chunk, a.ns}, i64), p_order = at::empty({chunk, a.nt}, i64);
  const Workspace w{q.data_ptr<float>(),        p.data_ptr<float>(),        stats.data_ptr<float>(),
                    q_sorted.data_ptr<float>(), p_sorted.data_ptr<float>(), order.data_ptr<int64_t>()};
  const unsigned threads = unsigned(threads_for(std::max(a.vs, a.vt)));
  for (int64_t first = 0; first < n; first += chunk) {
    const int64_t rows = std::min(chunk, n - first);
    probs_kernel<T><<<unsigned(rows), threads, 0, stream>>>(s, t, a, w, first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sort_rows(q, q_sorted, order, rows);
    sort_rows(p, p_sorted, p_order, rows);
    ranks_kernel<T><<<unsigned(rows), threads, 0, stream>>>(s, t, g, a, c, w, first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The launch's constants and pointers of a checked call (the logits as the kernels read them: s [N, Vs], t [N, Vt]).
CrossVocabLaunch launch_args(const CrossVocabCall& x, const at::Tensor& s, const at::Tensor& t,
                             const at::Tensor& denominator, const std::vector<at::Tensor>& classes,
                             const CrossVocabOptions& o) {
  const FamilyCall& call = x.call;
  const bool hybrid = o.code == HYBRID;
  auto list = [&](int k) { return hybrid ? classes[k].data_ptr<int64_t>() : nullptr; };
  auto scale = [&](int k) { return x.scales[k].defined() ? x.scales[k].data_ptr<float>() : nullptr; };
  return {call.target.defined() ? call.target.data_ptr<int64_t>() : nullptr,
          denominator.defined() ? denominator.data_ptr<float>() : nullptr,
          scale(0),
          scale(1),
          call.loss_rows.data_ptr<float>(),
          o.with_ce ? call.ce_rows.data_ptr<float>() : nullptr,
          o.with_grad ? x.scale_grad.data_ptr<float>() : nullptr,
          list(0),
          list(1),
          list(2),
          list(3),
          call.v,
          x.vt,
          hybrid ? classes[2].numel() : call.v,
          hybrid ? classes[3].numel() : x.vt,
          hybrid ? classes[0].numel() : 0,
          s.stride(0),
          t.stride(0),
          o.ignore_index,
          float(1.0 / o.temperature),
          float(1.0 / CrossVocabParams<double>::from(o.params.data()).teacher_temperature),
          float(x.grad_scale),
          float(x.scale_grad_scale),
          float(x.ce_scale),
          hybrid};
}

// uld and hybrid on CUDA tensors (the schema of kdkernels.cpp): (loss, parts, grad [N, Vs] or empty, dl/dc_s [N] or
// empty), reduced as the family ops. The kernels read both logits in one dtype: the inputs' when they share it, else
// float32 copies (the gradient then converted back).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_vocab_cuda(KDKERNELS_CROSS_VOCAB_PARAMETERS) {
  const char* op = "kdkernels::cross_vocab_cuda";
  TORCH_CHECK(student.is_cuda(), op, ": the logits must be CUDA tensors, got ", student.device());
  TORCH_CHECK_TYPE(student.scalar_type() != at::kDouble && teacher.scalar_type() != at::kDouble, op,
                   ": the CUDA kernels compute in float32 and take float32, bfloat16 or float16 logits, not float64 "
                   "(backend='reference' computes float64)");
  const c10::cuda::CUDAGuard guard(student.device());
  const CrossVocabOptions o = KDKERNELS_CROSS_VOCAB_OPTIONS;
  CrossVocabCall x =
      check_cross_vocab_call(op, student, teacher, student_log_scale, teacher_log_scale, target, denominator, o);
  const std::vector<at::Tensor> kept =
      code == HYBRID ? checked_hybrid_classes(op, classes, student, x.vt) : std::vector<at::Tensor>();
  at::Tensor s = x.call.student, t = x.call.teacher, grad = x.call.grad;
  if (s.scalar_type() != t.scalar_type()) {
    s = s.to(at::kFloat);
    t = t.to(at::kFloat);
    if (with_grad) grad = at::empty(s.sizes(), s.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const at::Tensor denom = reduce && denominator.has_value() ? denominator->reshape({}).to(at::kFloat) : at::Tensor();
  const CrossVocabLaunch a = launch_args(x, s, t, denom, kept, o);
  const auto c = CrossVocabParams<float>::from(params.data());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(x.call.n <= INT32_MAX, op, ": at most 2^31 - 1 rows, got ", x.call.n);
  if (x.call.n > 0) {
    dispatch_dtype(s.scalar_type(), [&](auto zero) {
      using T = decltype(zero);
      const T* sp = static_cast<const T*>(s.const_data_ptr());
      const T* tp = static_cast<const T*>(t.const_data_ptr());
      T* gp = with_grad ? static_cast<T*>(grad.data_ptr()) : nullptr;
      if (std::max(a.ns, a.nt) <= SORT_CLASSES) {
        sorted_row_kernel<T><<<unsigned(x.call.n), SORT_THREADS, 0, stream>>>(sp, tp, gp, a, c);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        launch_chunked(sp, tp, gp, a, c, x.call.n, s.options(), stream);
      }
    });
  }
  if (with_grad && !grad.is_same(x.call.grad)) x.call.grad.copy_(grad);
  auto [loss, parts] = finish_losses(x.call);
  return {loss, parts, x.call.grad, x.scale_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("cross_vocab_cuda", &cross_vocab_cuda);
}

}  // namespace kdkernels::cuda
