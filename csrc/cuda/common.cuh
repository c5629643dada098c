// What the CUDA kernels of both families share: one thread block per row, row walks with vector loads and stores,
// block reductions through warp shuffles, and the host-side launch setup (checks, dtypes, stream).
//
// Each pass over a row is a walk: thread i takes the packs i, i + blockDim, ... (then the tail one element at a time),
// 16 bytes each by default, so a warp reads 512 contiguous bytes per step; a walk may take fewer classes per pack
// (walk_row<4>: 8-byte packs of bfloat16 / float16), so that fewer of them are in registers at once. After the first
// walk the row (2 x V x itemsize bytes) is served from L2 for the passes that follow. The pass that writes the
// gradient is always the row's last one, after a block barrier, and each thread writes only the elements it has just
// read, so the in-place ops may pass the student as the gradient.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../family_op.h"

namespace kdkernels::cuda {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int MAX_WARPS = 32;

__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(c10::Half x) {
  return float(x);
}
__device__ __forceinline__ float to_float(c10::BFloat16 x) {
  return float(x);
}

template <class T>
__device__ __forceinline__ T from_float(float x) {
  return T(x);  // round to nearest even (c10::Half and c10::BFloat16 both round so)
}

// N classes of dtype T, loaded and stored as one vector.
template <class T, int N_>
struct alignas(N_ * sizeof(T)) Pack {
  static constexpr int N = N_;
  T v[N];
};

// The classes per pack of a walk that asks for PACK of them: at most 16 bytes' worth, which PACK = 0 takes.
template <class T, int PACK>
constexpr int pack_classes = PACK > 0 && PACK < 16 / int(sizeof(T)) ? PACK : 16 / int(sizeof(T));

__device__ __forceinline__ bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Calls f(j, s_j, t_j) -> (g_j, gt_j) (a float2) for every class j this thread owns, with the raw logits in float32,
// and stores g_j into g and gt_j into gt where they are not null (the full gradient writes both). PACK: the classes
// per pack (0: 16 bytes' worth).
template <int PACK = 0, class T, class F>
__device__ __forceinline__ void walk_row_pair(const T* s, const T* t, T* g, T* gt, int64_t v, F&& f) {
  using P = Pack<T, pack_classes<T, PACK>>;
  constexpr size_t bytes = sizeof(P);
  int64_t start = 0;
  if (aligned(s, bytes) && aligned(t, bytes) && (g == nullptr || aligned(g, bytes)) &&
      (gt == nullptr || aligned(gt, bytes))) {
    const int64_t packs = v / P::N;
    for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
      const P ps = reinterpret_cast<const P*>(s)[c];
      const P pt = reinterpret_cast<const P*>(t)[c];
      P out, out_t;
#pragma unroll
      for (int e = 0; e < P::N; ++e) {
        const float2 o = f(c * P::N + e, to_float(ps.v[e]), to_float(pt.v[e]));
        out.v[e] = from_float<T>(o.x);
        out_t.v[e] = from_float<T>(o.y);
      }
      if (g != nullptr) reinterpret_cast<P*>(g)[c] = out;
      if (gt != nullptr) reinterpret_cast<P*>(gt)[c] = out_t;
    }
    start = packs * P::N;
  }
  for (int64_t j = start + threadIdx.x; j < v; j += blockDim.x) {
    const float2 o = f(j, to_float(s[j]), to_float(t[j]));
    if (g != nullptr) g[j] = from_float<T>(o.x);
    if (gt != nullptr) gt[j] = from_float<T>(o.y);
  }
}

// Calls f(j, s_j, t_j) -> g_j for every class j this thread owns, with the raw logits in float32, and stores g_j into
// g when g is not null (a read-only walk returns anything, e.g. 0, and nothing is stored). PACK as walk_row_pair's.
template <int PACK = 0, class T, class F>
__device__ __forceinline__ void walk_row(const T* s, const T* t, T* g, int64_t v, F&& f) {
  walk_row_pair<PACK>(s, t, g, static_cast<T*>(nullptr), v,
                      [&](int64_t j, float sj, float tj) { return make_float2(f(j, sj, tj), 0.f); });
}

// Writes 0 over a gradient row (an ignored row).
template <class T>
__device__ __forceinline__ void zero_row(T* g, int64_t v) {
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) g[j] = from_float<T>(0.f);
}

// ---- Block reductions ------------------------------------------------------------------------------------------

__device__ __forceinline__ float shfl_xor(float x, int lane_mask) {
  return __shfl_xor_sync(FULL_MASK, x, lane_mask);
}
__device__ __forceinline__ int64_t shfl_xor(int64_t x, int lane_mask) {
  return __shfl_xor_sync(FULL_MASK, static_cast<long long>(x), lane_mask);
}

// A running logsumexp: max m and z = sum exp(v - m).
struct Lse {
  float m = -INFINITY, z = 0.f;

  __device__ __forceinline__ void add(float v) {
    if (v > m || v != v) {  // a new max (or NaN, which must reach the loss): rescale what is there
      z *= expf(m - safe_shift(nan_max(m, v)));
      m = nan_max(m, v);
    }
    z += expf(v - safe_shift(m));
  }
  __device__ __forceinline__ void merge(const Lse& o) {
    const float m_new = nan_max(m, o.m), shift = safe_shift(m_new);
    z = z * expf(m - shift) + o.z * expf(o.m - shift);
    m = m_new;
  }
  __device__ __forceinline__ Lse shuffled(int lane_mask) const {
    Lse o;
    o.m = shfl_xor(m, lane_mask);
    o.z = shfl_xor(z, lane_mask);
    return o;
  }
};

struct Sum {
  float x = 0.f;
  __device__ __forceinline__ void merge(const Sum& o) { x += o.x; }
  __device__ __forceinline__ Sum shuffled(int lane_mask) const { return {shfl_xor(x, lane_mask)}; }
};

// Two sums at once (the gradient's row sums of the option standardize).
struct Sum2 {
  float x = 0.f, y = 0.f;
  __device__ __forceinline__ void merge(const Sum2& o) {
    x += o.x;
    y += o.y;
  }
  __device__ __forceinline__ Sum2 shuffled(int lane_mask) const {
    return {shfl_xor(x, lane_mask), shfl_xor(y, lane_mask)};
  }
};

// Count, mean and sum of squared deviations of the classes that are not -inf (Welford per thread, Chan's merge).
struct Moments {
  float n = 0.f, mean = 0.f, m2 = 0.f;
  __device__ __forceinline__ void add(float x) {
    if (x == -INFINITY) return;
    n += 1.f;
    const float d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  __device__ __forceinline__ void merge(const Moments& o) {
    if (o.n == 0.f) return;
    const float total = n + o.n, d = o.mean - mean;
    mean += d * (o.n / total);
    m2 += o.m2 + d * d * (n * o.n / total);
    n = total;
  }
  __device__ __forceinline__ Moments shuffled(int lane_mask) const {
    return {shfl_xor(n, lane_mask), shfl_xor(mean, lane_mask), shfl_xor(m2, lane_mask)};
  }
};

struct Max {
  float x = -INFINITY;
  __device__ __forceinline__ void merge(const Max& o) { x = nan_max(x, o.x); }
  __device__ __forceinline__ Max shuffled(int lane_mask) const { return {shfl_xor(x, lane_mask)}; }
};

// The best (value, index) by better() of row_math.h: larger value, then lower index (torch.topk's order).
struct Ranked {
  float v = -INFINITY;
  int64_t i = INT64_MAX;
  __device__ __forceinline__ void merge(const Ranked& o) {
    if (better(o.v, o.i, v, i)) *this = o;
  }
  __device__ __forceinline__ Ranked shuffled(int lane_mask) const {
    return {shfl_xor(v, lane_mask), shfl_xor(i, lane_mask)};
  }
};

// The merge of every thread's x, returned to all threads. `scratch` is MAX_WARPS items of shared memory; the
// trailing barrier lets the caller reuse it at once.
template <class R>
__device__ __forceinline__ R block_reduce(R x, R* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) x.merge(x.shuffled(mask));
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < warps ? scratch[lane] : R();
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) x.merge(x.shuffled(mask));
    if (lane == 0) scratch[0] = x;
  }
  __syncthreads();
  x = scratch[0];
  __syncthreads();
  return x;
}

// ---- Host side -------------------------------------------------------------------------------------------------

// Threads per row: about 16 classes per thread, from one warp (vision, V = 100..1000) to 512 threads (LLM rows).
inline int threads_for(int64_t v) {
  int threads = 32;
  while (threads < 512 && threads * 16 < v) threads *= 2;
  return threads;
}

// The kernel call's options (kernel_call.h CallOptions) as the kernels read them: the float fields in float, the
// kernels' math type (no double arithmetic on the device).
#define KDKERNELS_FLOAT_FIELD(type, name) float name;
#define KDKERNELS_FLOAT_COPY(type, name) out.name = float(o.name);
#define KDKERNELS_FLAG_COPY(type, name) out.name = o.name;
struct LaunchOptions {
  KDKERNELS_CALL_SCALARS(KDKERNELS_FLOAT_FIELD)
  KDKERNELS_CALL_FLAGS(KDKERNELS_PARAM_FIELD)

  static LaunchOptions of(const CallOptions& o) {
    LaunchOptions out;
    KDKERNELS_CALL_SCALARS(KDKERNELS_FLOAT_COPY)
    KDKERNELS_CALL_FLAGS(KDKERNELS_FLAG_COPY)
    return out;
  }
};

// What a launch needs besides the checked call: the options and the pointers of its optional tensors.
struct LaunchArgs {
  const int64_t* target;     // [N] or nullptr
  const float* denominator;  // 0-d float32 or nullptr (the gradient is scaled by 1 / *denominator)
  LaunchOptions opt;
  float t2;        // T^2 with t2_scale, else 1
  float* ce_loss;  // [N] the cross-entropy term's rows, or nullptr without it
  // The full gradient (the *_full ops): d loss / d T per row ([N]), else nullptr; the teacher's gradient goes to
  // Rows::gt.
  float* temperature_grad = nullptr;
};

// The CUDA kernels compute in float32 and read both inputs in one dtype. They run on the inputs' dtype when
// student and teacher share it; otherwise both are read as float32 copies and the gradient is converted back.
struct CudaCall {
  FamilyCall call;
  at::Tensor student, teacher, grad;  // what the kernel reads and writes
  at::Tensor teacher_grad;            // the full ops' teacher gradient as the kernel writes it, or undefined
  at::Tensor denominator;             // float32 on the device, or undefined
  LaunchArgs args;
  double temperature;  // in double, for host-side constants such as T log(tau)
};

inline CudaCall prepare_cuda_call(const char* op, const FamilyArgs& a, int num_codes, int num_params, bool with_grad,
                                  bool in_place) {
  TORCH_CHECK_TYPE(a.student.scalar_type() != at::kDouble && a.teacher.scalar_type() != at::kDouble, op,
                   ": the CUDA kernels compute in float32 and take float32, bfloat16 or float16 logits, not float64 "
                   "(backend='reference' computes float64)");
  CudaCall c{check_family_call(op, a, num_codes, num_params, with_grad, in_place)};
  const CallOptions& o = c.call.opt;
  c.student = c.call.student;
  c.teacher = c.call.teacher;
  c.grad = c.call.grad;
  if (a.student.scalar_type() != a.teacher.scalar_type()) {
    c.student = c.student.to(at::kFloat);
    c.teacher = c.teacher.to(at::kFloat);
    if (with_grad) c.grad = at::empty({c.call.n, c.call.v}, c.student.options());
  }
  if (o.reduce && a.denominator.has_value()) c.denominator = a.denominator->reshape({}).to(at::kFloat);
  c.args = {c.call.target.defined() ? c.call.target.data_ptr<int64_t>() : nullptr,
            c.denominator.defined() ? c.denominator.data_ptr<float>() : nullptr, LaunchOptions::of(o), float(o.t2()),
            o.with_ce ? c.call.ce_rows.data_ptr<float>() : nullptr};
  c.temperature = o.temperature;
  return c;
}

// The family ops on CUDA tensors. Family supplies name, name_, num_codes, num_params, decoupled and
// launch(CudaCall&, code, params, cudaStream_t), which launches one block per row. With `full` (the *_full ops) the
// call's full outputs are added and *full receives it.
template <class Family>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_family(const FamilyArgs& a, bool with_grad, bool in_place,
                                                          FamilyCall* full = nullptr, bool teacher_grad = false) {
  const c10::cuda::CUDAGuard guard(a.student.device());
  CudaCall c = prepare_cuda_call(in_place ? Family::name_ : Family::name, a, Family::num_codes, Family::num_params,
                                 with_grad, in_place);
  if (Family::decoupled) check_decoupled_params(c.call, a.code, a.params);
  if (full != nullptr) {
    add_full_outputs(c.call, teacher_grad);
    c.teacher_grad = !teacher_grad || c.teacher.scalar_type() == c.call.teacher_grad.scalar_type()
                         ? c.call.teacher_grad
                         : at::empty({c.call.n, c.call.v}, c.teacher.options());
    c.args.temperature_grad = c.call.temperature_grad.data_ptr<float>();
  }
  TORCH_CHECK(c.call.n <= INT32_MAX, Family::name, ": at most 2^31 - 1 rows, got ", c.call.n);
  if (c.call.n > 0) {
    Family::launch(c, a.code, a.params, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (with_grad && !c.grad.is_same(c.call.grad)) c.call.grad.copy_(c.grad);
  if (full != nullptr && teacher_grad && !c.teacher_grad.is_same(c.call.teacher_grad)) {
    c.call.teacher_grad.copy_(c.teacher_grad);
  }
  auto [loss, parts] = finish_losses(c.call);
  if (full != nullptr) *full = c.call;
  return {loss, parts, c.call.grad};
}

// The op entry points (the schemas of kdkernels.cpp).
template <class Family>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> family_cuda_full(KDKERNELS_CALL_PARAMETERS,
                                                                                        bool teacher_grad) {
  FamilyCall call;
  auto [loss, parts, grad] = run_family<Family>(KDKERNELS_CALL_ARGS(Family::name), /*with_grad=*/true,
                                                /*in_place=*/false, &call, teacher_grad);
  return {loss, parts, grad, call.teacher_grad, call.temperature_grad};
}

template <class Family>
std::tuple<at::Tensor, at::Tensor, at::Tensor> family_cuda(KDKERNELS_CALL_PARAMETERS, bool with_grad) {
  return run_family<Family>(KDKERNELS_CALL_ARGS(Family::name), with_grad, /*in_place=*/false);
}

template <class Family>
std::tuple<at::Tensor, at::Tensor> family_cuda_(KDKERNELS_CALL_PARAMETERS) {
  auto [loss, parts, grad] =
      run_family<Family>(KDKERNELS_CALL_ARGS(Family::name_), /*with_grad=*/true, /*in_place=*/true);
  return {loss, parts};
}

// The rows of one launch, as the kernels see them.
template <class T>
struct Rows {
  const T* s;
  const T* t;
  T* g;   // nullptr without a gradient
  T* gt;  // the teacher's gradient (the full ops with teacher_grad), else nullptr
  float* loss;
  int64_t v, s_stride, t_stride;

  static Rows of(CudaCall& c) {
    return {static_cast<const T*>(c.student.const_data_ptr()),
            static_cast<const T*>(c.teacher.const_data_ptr()),
            c.grad.numel() ? static_cast<T*>(c.grad.data_ptr()) : nullptr,
            c.teacher_grad.defined() && c.teacher_grad.numel() ? static_cast<T*>(c.teacher_grad.data_ptr()) : nullptr,
            c.call.loss_rows.data_ptr<float>(),
            c.call.v,
            c.student.stride(0),
            c.teacher.stride(0)};
  }
};

// A row left out (ignored, or masked in both logits): thread 0 stores losses 0, the block a zero gradient.
template <class T>
__device__ __forceinline__ void skip_row(const Rows<T>& r, const LaunchArgs& a, int64_t row) {
  if (threadIdx.x == 0) {
    r.loss[row] = 0.f;
    if (a.ce_loss != nullptr) a.ce_loss[row] = 0.f;
    if (a.temperature_grad != nullptr) a.temperature_grad[row] = 0.f;
  }
  if (r.g != nullptr) zero_row(r.g + row * r.v, r.v);
  if (r.gt != nullptr) zero_row(r.gt + row * r.v, r.v);
}

// Skips an ignored row (skip_row). Returns whether it was ignored.
template <class T>
__device__ __forceinline__ bool skip_ignored_row(const Rows<T>& r, const LaunchArgs& a, int64_t row) {
  if (a.target == nullptr || a.target[row] != a.opt.ignore_index) return false;
  skip_row(r, a, row);
  return true;
}

// distill_weight (1/T) (T^2 with t2_scale) (1/denominator when reduced): the factor of the method's gradient.
__device__ __forceinline__ float grad_scale(const LaunchArgs& a) {
  return a.opt.distill_weight * a.t2 / a.opt.temperature / (a.denominator != nullptr ? *a.denominator : 1.f);
}

// One row's z-score (row_math.h ZScore) and its Jacobian applied to the family's gradient G = dL/dz once the block
// knows its row sums over the unmasked classes (set_sums).
struct ZScoreSide {
  ZScore<float> stats;
  float mean_g = 0.f, coef = 0.f;

  __device__ __forceinline__ float z(float v) const { return (v - stats.mean) / stats.sd; }
  __device__ __forceinline__ void set_sums(Sum2 sums) {
    mean_g = sums.x / stats.n;
    coef = stats.coef(sums.y);
  }
  __device__ __forceinline__ float grad(float g, float v) const {
    return v == -INFINITY ? 0.f : (g - mean_g) / stats.sd - z(v) * coef;
  }
};

// The option standardize on one row: both rows' z-scores (the student's s, the teacher's t, whose Jacobian the full
// gradient uses), x = z / T for the family's math (without the option: mean 0, sd 1, so x = s / T exactly). The walk
// and each reduction are the block's.
struct RowZScores {
  ZScoreSide s, t;

  __device__ __forceinline__ float x(float sj, float temperature) const { return s.z(sj) / temperature; }
  __device__ __forceinline__ float y(float tj, float temperature) const { return t.z(tj) / temperature; }
};

// A row's d loss / d T (the full gradient): thread sums of (x_j - mx) g_j + (y_j - my) gt_j over its classes (the
// gradients before the z-score's Jacobian), then value() = 2 scale l (with T^2 scaling) - their block sum.
struct TemperatureGrad {
  float mx, my;
  Sum sum;
  __device__ __forceinline__ void add(float x, float g, float y, float gt) {
    sum.x += (x == -INFINITY ? 0.f : (x - safe_shift(mx)) * g) + (y == -INFINITY ? 0.f : (y - safe_shift(my)) * gt);
  }
  __device__ __forceinline__ float value(bool t2_scale, float scale, float loss, Sum* scratch) const {
    const float terms = block_reduce(sum, scratch).x;  // (every thread: a barrier)
    if (scale == 0.f) return 0.f;                      // (distill_weight = 0: the loss may be inf, the gradient is 0)
    return (t2_scale ? 2.f * scale * loss : 0.f) - terms;
  }
};

template <class T>
__device__ __forceinline__ RowZScores row_zscores(const T* s, const T* t, int64_t v, bool standardize,
                                                  Moments* scratch) {
  RowZScores out{{{0.f, 1.f, 0.f, 0.f}}, {{0.f, 1.f, 0.f, 0.f}}};
  if (!standardize) return out;
  Moments ms, mt;
  walk_row(s, t, static_cast<T*>(nullptr), v, [&](int64_t, float sj, float tj) {
    ms.add(sj);
    mt.add(tj);
    return 0.f;
  });
  ms = block_reduce(ms, scratch);
  mt = block_reduce(mt, scratch);
  out.s.stats = ZScore<float>::of(ms.n, ms.mean, ms.m2);
  out.t.stats = ZScore<float>::of(mt.n, mt.mean, mt.m2);
  return out;
}

// The hard-label term of a row at T = 1 (docs/losses.md, "The hard-label term"), from m1 = max s and
// lz1 = log sum exp(s - m1): its loss m1 + lz1 - (1 - eps) s_target - eps * (the mean of the unmasked s) and its
// gradient ce_weight / denominator (exp(s_j - m1 - lz1) - (1 - eps) [j = target] - eps / K [s_j unmasked]), K the
// unmasked classes' count.
struct CrossEntropy {
  float m1, lz1, scale;
  int64_t target;
  float smoothing, share;  // eps, eps / K

  __device__ __forceinline__ float grad(int64_t j, float s) const {
    if (scale == 0.f) return 0.f;  // (ce_weight = 0: no gradient, whatever the logits)
    const float unmasked = s != -INFINITY ? share : 0.f;
    return (expf(s - m1 - lz1) - (j == target ? 1.f - smoothing : 0.f) - unmasked) * scale;
  }
};

// What the hard-label term reads of the student's raw row: its target's logit (NaN out of range, never read there),
// with label smoothing (1 - eps) s_target + eps * (the mean of the unmasked s), and eps / K; 0 without the term.
// Every thread reads the row before the block's next barrier, so an in-place gradient written after that barrier
// cannot replace it.
struct TargetLogit {
  float value, share;
};

template <class T>
__device__ __forceinline__ TargetLogit target_logit(const Rows<T>& r, const LaunchArgs& a, int64_t row, const T* s,
                                                    Sum2* scratch) {
  if (a.ce_loss == nullptr) return {0.f, 0.f};
  const int64_t target = a.target[row];
  const float s_y = target >= 0 && target < r.v ? to_float(s[target]) : NAN;
  const float eps = a.opt.label_smoothing;
  if (eps == 0.f) return {s_y, 0.f};
  Sum2 unmasked;  // (count, sum)
  walk_row(s, s, static_cast<T*>(nullptr), r.v, [&](int64_t, float sj, float) {
    if (sj != -INFINITY) unmasked.merge({1.f, sj});
    return 0.f;
  });
  unmasked = block_reduce(unmasked, scratch);
  return {(1.f - eps) * s_y + eps * (unmasked.y / unmasked.x), eps / unmasked.x};
}

// The row's cross-entropy from the online (max, sum) of its raw logits; thread 0 stores its loss.
__device__ __forceinline__ CrossEntropy cross_entropy(const LaunchArgs& a, int64_t row, const Lse& raw,
                                                      const TargetLogit& y) {
  if (a.ce_loss == nullptr) return {0.f, 0.f, 0.f, 0, 0.f, 0.f};
  const float lz1 = logf(raw.z);
  if (threadIdx.x == 0) a.ce_loss[row] = (raw.m - y.value) + lz1;  // (the difference of two large logits is exact)
  const float scale = a.opt.ce_weight / (a.denominator != nullptr ? *a.denominator : 1.f);
  return {raw.m, lz1, scale, a.target[row], a.opt.label_smoothing, y.share};
}

// Calls f(T()) with T the C++ type of the kernel's input dtype.
template <class F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float());
    case at::kHalf:
      return f(c10::Half());
    default:
      return f(c10::BFloat16());
  }
}

}  // namespace kdkernels::cuda
