// CUDA kernel of the divergence family: one block per row, loss and gradient in one launch. The math is
// divergence.h's (l = sum_k l_k, g_j = (r_j - q_j sum_k r_k) / T, times T^2 with t2_scale, over the denominator).
//
// Passes: (0) with standardize, both rows' moments (x = z / T and y below are then the z-scores' over T);
// (1) online max and sum of exp of x = s / T and y = t / T (and of s, for the cross-entropy term); a row
// whose classes are all masked in both logits stops here (loss 0, gradient 0); (1b) akl: its head (divergence.h
// AklHead): 3 radix histograms in shared memory and a walk at the value found, each a walk of the teacher row (in
// L2); (2) the row sums of l_k, r_k (and e_k, f_k); kd knows sum r = -1 and writes the gradient here (unless
// standardize); (3) the other codes write the gradient once the row sums are known, with standardize after a
// read-only pass that sums the gradient for the z-score's Jacobian. With the cross-entropy term the gradient gains
// its ce_weight (softmax(s)_j - [j = target]) term. The full gradient (the _full op) sums the teacher's rt_k in (2)
// and writes the teacher's gradient with the student's in (3), summing d loss / d T there.
//
// Registers: a block of 512 threads, two per SM (__launch_bounds__(512, 2): at most 64 registers per thread), so
// that a long row's walks keep 32 warps' loads in flight per SM and one block's reductions overlap the other's walk.
// The passes that compute the codes' terms walk 4 classes per thread and step (TERMS_PACK: 16-byte packs of float32,
// 8-byte packs of bfloat16 / float16), which fits 64 registers; 8 classes of a 16-byte bfloat16 pack did not (ptxas
// spilled, or took up to 94 registers, one block per SM). The first walk, which reads the row from memory, and the
// teacher-only walks keep 16-byte packs.
#include "common.cuh"

namespace kdkernels::cuda {
namespace {

using F = ScalarOps<float>;

constexpr int TERMS_PACK = 4;

// akl's radix select (divergence.h AklHead, (a)), one digit: the block's histogram mass[head.digits()] of p over the
// open digit of the classes within the chosen digits (shared-memory atomics; p computed only for those classes).
template <class T, class P>
__device__ void akl_histogram(const T* t, int64_t v, const AklHead<float>& head, P&& p, float* mass) {
  for (int d = threadIdx.x; d < head.digits(); d += blockDim.x) mass[d] = 0.f;
  __syncthreads();
  const float low = head.range_value(false), high = head.range_value(true);
  walk_row(t, t, static_cast<T*>(nullptr), v, [&](int64_t, float, float tj) {
    const auto u = AklHead<float>::radix_key(tj);
    if (tj >= low && tj <= high && head.in_prefix(u)) atomicAdd(&mass[head.digit(u)], p(tj));
    return 0.f;
  });
  __syncthreads();
}

// AklHead::choose by the first warp, its lanes over slices of the bins from the top: each lane's slice sum, their
// scan across lanes, then each lane's own walk of its slice from the mass above it; the highest digit where one
// crosses mu wins (its sums round otherwise than choose's: the value is a candidate either way). Every thread then
// takes it (scratch: one Sum2 of shared memory).
__device__ void akl_choose(AklHead<float>& head, const float* mass, float mu, Sum2* scratch) {
  const int lane = threadIdx.x, digits = head.digits(), slice = (digits + 31) / 32;
  if (lane < 32) {
    const int top = digits - 1 - lane * slice, bottom = max(top - slice, -1);  // the lane's bins (bottom, top]
    float sum = 0.f;
    for (int d = top; d > bottom; --d) sum += mass[d];
    float before = sum;  // (the inclusive scan from lane 0, then the lanes above's alone)
    for (int o = 1; o < 32; o <<= 1) {
      const float x = __shfl_up_sync(FULL_MASK, before, o);
      if (lane >= o) before += x;
    }
    before = lane == 0 ? 0.f : __shfl_up_sync(FULL_MASK, before, 1);
    float above = head.mass_above + before;
    int found = -1;
    for (int d = top; d > bottom && found < 0; --d) {
      if (d == 0 || above + mass[d] > mu) found = d;
      if (found < 0) above += mass[d];
    }
    int best = found;
    for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(FULL_MASK, best, o));
    if (found >= 0 && found == best) *scratch = {above, float(best)};
  }
  __syncthreads();
  head.take(int(scratch->y), scratch->x);
  __syncthreads();
}

// What akl's head needs at a value u (AklHead, (b)): {A(u), the count above u}, {the mass of t >= u (A just below
// u), the tie group's size}.
template <class T, class P>
__device__ void akl_ties(const T* t, int64_t v, float value, P&& p, Sum2* above, Sum2* from, Sum2* scratch) {
  Sum2 a, f;
  walk_row(t, t, static_cast<T*>(nullptr), v, [&](int64_t, float, float tj) {
    if (tj > value) a.merge({p(tj), 1.f});
    if (tj >= value) f.merge({p(tj), tj == value ? 1.f : 0.f});
    return 0.f;
  });
  *above = block_reduce(a, scratch);
  *from = block_reduce(f, scratch);
}

// akl's head of a row (divergence.h AklHead) as (value, end): head = {t > value} + {t == value, index < end} on the raw
// teacher logits t; p(t_j) is the teacher's probability of a raw logit.
template <class T, class P>
__device__ float akl_head(const T* t, int64_t v, float mu, P&& p, int64_t* end, Sum* sum_scratch, Sum2* sum2_scratch) {
  __shared__ float mass[AklHead<float>::BINS];
  AklHead<float> head;
  while (head.selecting()) {  // (a)
    akl_histogram(t, v, head, p, mass);
    akl_choose(head, mass, mu, sum2_scratch);
  }
  float value = head.candidate();  // (b)
  Sum2 above, from;
  akl_ties(t, v, value, p, &above, &from, sum2_scratch);
  head.settle(value, above.x, from.x, mu);
  if (head.searching()) {  // (the fallback: the teacher row walked alone, as both rows)
    while (head.searching()) {
      const float probe = head.probe();
      Sum mass_above;
      walk_row(t, t, static_cast<T*>(nullptr), v, [&](int64_t, float, float tj) {
        if (tj > probe) mass_above.x += p(tj);
        return 0.f;
      });
      head.narrow(block_reduce(mass_above, sum_scratch).x, mu);
    }
    value = head.threshold();
    akl_ties(t, v, value, p, &above, &from, sum2_scratch);
  }
  const int64_t size = int64_t(from.y);
  const int64_t share = AklHead<float>::group_share(above.x, int64_t(above.y), size, p(value), mu);
  int64_t lo = 0, hi = v;  // (c) the least end with `share` ties before it
  if (share == 0 || share >= size) {
    lo = hi = share == 0 ? 0 : v;
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    Sum ties;
    walk_row(t, t, static_cast<T*>(nullptr), mid, [&](int64_t, float, float tj) {
      ties.x += tj == value ? 1.f : 0.f;
      return 0.f;
    });
    (int64_t(block_reduce(ties, sum_scratch).x) >= share ? hi : lo) = mid;
  }
  *end = hi;
  return value;
}

// Long: its passes (numbered blocks) share the row's block-reduced statistics; the per-class math is in the
// family's header.
template <int CODE, class T>
__global__ void __launch_bounds__(512, 2) divergence_kernel(Rows<T> r, LaunchArgs a, DivergenceParams<float> c) {
  __shared__ Lse lse_scratch[MAX_WARPS];
  __shared__ Sum sum_scratch[MAX_WARPS];
  __shared__ Moments moment_scratch[MAX_WARPS];
  __shared__ Sum2 sum2_scratch[MAX_WARPS];
  const int64_t row = blockIdx.x;
  if (skip_ignored_row(r, a, row)) return;
  const T* s = r.s + row * r.s_stride;
  const T* t = r.t + row * r.t_stride;
  T* g = r.g == nullptr ? nullptr : r.g + row * r.v;
  const bool with_ce = a.ce_loss != nullptr;
  const TargetLogit s_y = target_logit(r, a, row, s, sum2_scratch);
  // (0), (1)
  RowZScores zs = row_zscores(s, t, r.v, a.opt.standardize, moment_scratch);
  Lse lx, ly, l1;
  walk_row(s, t, static_cast<T*>(nullptr), r.v, [&](int64_t, float sj, float tj) {
    lx.add(zs.x(sj, a.opt.temperature));
    ly.add(zs.y(tj, a.opt.temperature));
    if (with_ce) l1.add(sj);
    return 0.f;
  });
  lx = block_reduce(lx, lse_scratch);
  ly = block_reduce(ly, lse_scratch);
  if (lx.m == -INFINITY && ly.m == -INFINITY) return skip_row(r, a, row);
  if (with_ce) l1 = block_reduce(l1, lse_scratch);
  const CrossEntropy xent = cross_entropy(a, row, l1, s_y);
  const float lzx = logf(lx.z), lzy = logf(ly.z), scale = grad_scale(a);
  // (1b)
  float head_value = 0.f;
  int64_t head_end = 0;
  if constexpr (CODE == AKL) {
    auto p = [&](float tj) { return expf((zs.y(tj, a.opt.temperature) - ly.m) - lzy); };
    head_value = akl_head(t, r.v, c.mu, p, &head_end, sum_scratch, sum2_scratch);
  }
  auto terms = [&](int64_t j, float sj, float tj) {
    return divergence_terms<CODE, F>(c, zs.x(sj, a.opt.temperature), zs.y(tj, a.opt.temperature), lx.m, lzx, ly.m, lzy,
                                     in_akl_head<F>(tj, head_value, head_end, 0.f, j));
  };
  // (2)
  const bool full = a.temperature_grad != nullptr;  // the full gradient: the teacher's (into gt) and d loss / d T
  T* gt = r.gt == nullptr ? nullptr : r.gt + row * r.v;
  Sum sum_l, sum_r, sum_e, sum_f, sum_rt;
  const DivergenceRow<float> kd_row = divergence_row<CODE>(c, 0.f, 0.f, 0.f, 0.f);  // (kd's gradient: no row sum)
  const bool kd_writes = CODE == KD && !a.opt.standardize && !full;
  walk_row<TERMS_PACK>(s, t, kd_writes ? g : static_cast<T*>(nullptr), r.v, [&](int64_t j, float sj, float tj) {
    const ClassTerms<float> k = terms(j, sj, tj);
    sum_l.x += k.l;
    sum_r.x += k.r;
    sum_e.x += k.e;
    sum_f.x += k.f;
    sum_rt.x += k.rt;
    if (!kd_writes || g == nullptr) return 0.f;
    return divergence_grad<CODE, F>(k, kd_row, scale) + (with_ce ? xent.grad(j, sj) : 0.f);  // stored for kd
  });
  sum_l = block_reduce(sum_l, sum_scratch);
  if (CODE != KD) sum_r = block_reduce(sum_r, sum_scratch);
  if (weighs_row_sums<CODE>) sum_e = block_reduce(sum_e, sum_scratch);
  if (weighs_row_sums<CODE>) sum_f = block_reduce(sum_f, sum_scratch);
  if (full) sum_rt = block_reduce(sum_rt, sum_scratch);
  const DivergenceRow<float> row_sums = divergence_row<CODE>(c, sum_l.x, sum_r.x, sum_e.x, sum_f.x);
  if (threadIdx.x == 0) r.loss[row] = row_sums.loss * a.t2;
  // (3)
  const DivergenceRow<float>& grad_row = CODE == KD ? kd_row : row_sums;
  const float sum_teacher_r = teacher_sum_r<CODE>(row_sums, sum_rt.x);
  auto teacher_grad = [&](const ClassTerms<float>& k, float tj) {
    return divergence_teacher_grad<CODE, F>(k, row_sums, sum_teacher_r, zs.y(tj, a.opt.temperature), scale);
  };
  if (a.opt.standardize && g != nullptr) {
    Sum2 sums, teacher_sums;
    walk_row<TERMS_PACK>(s, t, static_cast<T*>(nullptr), r.v, [&](int64_t j, float sj, float tj) {
      const ClassTerms<float> k = terms(j, sj, tj);
      const float gj = divergence_grad<CODE, F>(k, grad_row, scale);
      if (sj != -INFINITY) sums.merge({gj, gj * zs.s.z(sj)});
      if (gt != nullptr && tj != -INFINITY) {
        const float gtj = teacher_grad(k, tj);
        teacher_sums.merge({gtj, gtj * zs.t.z(tj)});
      }
      return 0.f;
    });
    zs.s.set_sums(block_reduce(sums, sum2_scratch));
    if (gt != nullptr) zs.t.set_sums(block_reduce(teacher_sums, sum2_scratch));
  }
  if (full) {
    TemperatureGrad dt{lx.m, ly.m};
    walk_row_pair<TERMS_PACK>(s, t, g, gt, r.v, [&](int64_t j, float sj, float tj) {
      const ClassTerms<float> k = terms(j, sj, tj);
      const float gj = divergence_grad<CODE, F>(k, grad_row, scale), gtj = teacher_grad(k, tj);
      dt.add(zs.x(sj, a.opt.temperature), gj, zs.y(tj, a.opt.temperature), gtj);
      const bool through = a.opt.standardize && scale != 0.f;  // (scale 0: gradients 0, not through a NaN z-score)
      return make_float2((through ? zs.s.grad(gj, sj) : gj) + (with_ce ? xent.grad(j, sj) : 0.f),
                         through ? zs.t.grad(gtj, tj) : gtj);
    });
    const float dtemp = dt.value(a.opt.t2_scale, scale, row_sums.loss, sum_scratch);
    if (threadIdx.x == 0) a.temperature_grad[row] = dtemp;
  } else if (!kd_writes && g != nullptr) {
    walk_row<TERMS_PACK>(s, t, g, r.v, [&](int64_t j, float sj, float tj) {
      const float gj = divergence_grad<CODE, F>(terms(j, sj, tj), grad_row, scale);
      return (a.opt.standardize && scale != 0.f ? zs.s.grad(gj, sj) : gj) + (with_ce ? xent.grad(j, sj) : 0.f);
    });
  }
}

struct DivergenceFamily {
  static constexpr const char* name = "kdkernels::divergence_cuda";
  static constexpr const char* name_ = "kdkernels::divergence_cuda_";
  static constexpr int num_codes = NUM_DIVERGENCES;
  static constexpr bool decoupled = false;
  static constexpr int num_params = DivergenceParams<float>::size;

  static void launch(CudaCall& call, int64_t code, at::ArrayRef<double> params, cudaStream_t stream) {
    const auto consts = DivergenceParams<float>::from(params.data());
    dispatch_code<NUM_DIVERGENCES>(int(code), [&](auto method) {
      dispatch_dtype(call.student.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        divergence_kernel<decltype(method)::value, T>
            <<<unsigned(call.call.n), threads_for(call.call.v), 0, stream>>>(Rows<T>::of(call), call.args, consts);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("divergence_cuda", &family_cuda<DivergenceFamily>);
  m.impl("divergence_cuda_", &family_cuda_<DivergenceFamily>);
  m.impl("divergence_cuda_full", &family_cuda_full<DivergenceFamily>);
}

}  // namespace kdkernels::cuda
