// CUDA kernel of the decoupled family: one block per row, loss and gradient in one launch. The math is
// decoupled.h's: per bin (TOP1, STRONG, REST) the online statistics (mt, zt, kt) of y = t / T and (ms, zs, ks) of
// x = s / T, from which decoupled_row() gives the loss and the coefficients of the gradient.
//
// Passes: (0) what the partition needs from the raw teacher logits: k walks picking the next best (value, index)
// each (top-k), or their max (threshold), and with standardize both rows' moments (x and y are then the z-scores
// over T; the raw teacher logits order and threshold the same way, the threshold scaled by the teacher's sd);
// (1) the per-bin statistics (and the online max and sum of exp of s for the cross-entropy term; a row whose
// classes are all masked in both logits stops here: loss 0, gradient 0); (2) the gradient, with the cross-entropy's
// ce_weight (softmax(s)_j - [j = target]) term, with standardize after a read-only pass that sums the gradient for
// the z-score's Jacobian; with the full gradient (the _full op) the teacher's gradient is written with the student's
// and d loss / d T summed in the same walk.
#include "common.cuh"

namespace kdkernels::cuda {
namespace {

using F = ScalarOps<float>;

// Online statistics of one bin: the teacher's mt, zt = sum exp(y - mt), kt = sum exp(y - mt) ((y - mt) - (x - ms))
// and the student's ms, zs = sum exp(x - ms), ks = sum exp(x - ms) ((x - ms) - (y - mt)) (used when w_rkl != 0).
// kt and ks are kept relative to both maxes, so they stay exact for logits offset by 1000; moving them rescales the
// sums (and subtracts z times the moves from k).
struct BinAccumulator {
  float mt = -INFINITY, zt = 0.f, kt = 0.f, ms = -INFINITY, zs = 0.f, ks = 0.f;

  __device__ __forceinline__ void rebase(float nt, float ns) {
    const float st = expf(mt - safe_shift(nt)), ss = expf(ms - safe_shift(ns));
    const float moved = (safe_shift(nt) - safe_shift(mt)) - (safe_shift(ns) - safe_shift(ms));
    kt = (kt - zt * moved) * st;
    ks = (ks + zs * moved) * ss;
    zt *= st;
    zs *= ss;
    mt = nt;
    ms = ns;
  }
  __device__ __forceinline__ void add(float y, float x) {
    if (y > mt || y != y || x > ms || x != x) rebase(nan_max(mt, y), nan_max(ms, x));
    const float et = expf(y - safe_shift(mt)), es = expf(x - safe_shift(ms));
    const float d = (y - safe_shift(mt)) - (x - safe_shift(ms));
    zt += et;
    zs += es;
    kt += et == 0.f ? 0.f : et * d;  // (k_term of decoupled.h)
    ks += es == 0.f ? 0.f : -es * d;
  }
  __device__ __forceinline__ void merge(BinAccumulator o) {
    const float nt = nan_max(mt, o.mt), ns = nan_max(ms, o.ms);
    rebase(nt, ns);
    o.rebase(nt, ns);
    zt += o.zt;
    kt += o.kt;
    zs += o.zs;
    ks += o.ks;
  }
  __device__ __forceinline__ BinAccumulator shuffled(int lane_mask) const {
    return {shfl_xor(mt, lane_mask), shfl_xor(zt, lane_mask), shfl_xor(kt, lane_mask),
            shfl_xor(ms, lane_mask), shfl_xor(zs, lane_mask), shfl_xor(ks, lane_mask)};
  }
};

// Long: its passes (numbered blocks) share the row's block-reduced statistics; the per-class math is in the
// family's header.
template <int PARTITION, class T>
__global__ void __launch_bounds__(512)
    decoupled_kernel(Rows<T> r, LaunchArgs a, DecoupledParams<double> c, float threshold) {
  __shared__ BinAccumulator bin_scratch[MAX_WARPS];
  __shared__ Lse lse_scratch[MAX_WARPS];
  __shared__ Ranked ranked_scratch[MAX_WARPS];
  __shared__ Max max_scratch[MAX_WARPS];
  __shared__ Moments moment_scratch[MAX_WARPS];
  __shared__ Sum2 sum2_scratch[MAX_WARPS];
  __shared__ Sum sum_scratch[MAX_WARPS];
  const int64_t row = blockIdx.x;
  if (skip_ignored_row(r, a, row)) return;
  const T* s = r.s + row * r.s_stride;
  const T* t = r.t + row * r.t_stride;
  T* g = r.g == nullptr ? nullptr : r.g + row * r.v;
  T* const no_store = nullptr;
  const int64_t target = a.target != nullptr ? a.target[row] : 0;
  // An index outside [0, V) is never read (membership only compares indices): the row's loss becomes NaN.
  const bool bad_target = PARTITION == TARGET && (target < 0 || target >= r.v);
  Membership<float> mb{
      PARTITION == TARGET && !bad_target ? target : -1, 0.f, 0, 0, 0.f, threshold, c.split_top1, c.lowest};
  // (0) The teacher-only walks pass t as both rows: the second read of each element is an L1 hit.
  if constexpr (PARTITION == TOPK) {
    Ranked prev{INFINITY, -1}, first;  // prev ranks above every class
    for (int64_t pick = 0; pick < c.k; ++pick) {
      Ranked best;
      walk_row(t, t, no_store, r.v, [&](int64_t j, float, float tj) {
        const float rank = top_k_rank<F>(tj, c.lowest);  // (mb.kth_v is a ranking value too)
        if (better(prev.v, prev.i, rank, j)) best.merge(Ranked{rank, j});
        return 0.f;
      });
      prev = block_reduce(best, ranked_scratch);
      if (pick == 0) first = prev;
    }
    mb.kth_v = prev.v;
    mb.kth_i = prev.i;
    mb.top1_i = first.i;
  } else if constexpr (PARTITION == THRESHOLD) {
    Max t_max;
    walk_row(t, t, no_store, r.v, [&](int64_t, float, float tj) {
      t_max.x = nan_max(t_max.x, tj);
      return 0.f;
    });
    mb.t_max = block_reduce(t_max, max_scratch).x;
  }
  RowZScores zs = row_zscores(s, t, r.v, a.opt.standardize, moment_scratch);
  mb.threshold *= zs.t.stats.sd;  // (z_i - max z >= T log(tau)  <=>  t_i - max t >= T log(tau) sd)
  // (1)
  const bool with_ce = a.ce_loss != nullptr;
  const TargetLogit s_y = target_logit(r, a, row, s, sum2_scratch);
  BinAccumulator bins[NUM_BINS];
  Lse l1;
  walk_row(s, t, no_store, r.v, [&](int64_t j, float sj, float tj) {
    bool in_top1, in_strong;
    membership<PARTITION, F>(mb, tj, 0.f, j, in_top1, in_strong);
    bins[in_top1 ? TOP1 : in_strong ? STRONG : REST].add(zs.y(tj, a.opt.temperature), zs.x(sj, a.opt.temperature));
    if (with_ce) l1.add(sj);
    return 0.f;
  });
  BinStats<float> st, ss;
  bool masked = true;
#pragma unroll
  for (int b = 0; b < NUM_BINS; ++b) {
    const BinAccumulator bin = block_reduce(bins[b], bin_scratch);
    st.m[b] = bin.mt;
    st.z[b] = bin.zt;
    st.k[b] = bin.kt;
    ss.m[b] = bin.ms;
    ss.z[b] = bin.zs;
    ss.k[b] = bin.ks;
    masked = masked && bin.mt == -INFINITY && bin.ms == -INFINITY;
  }
  if (masked) return skip_row(r, a, row);
  if (with_ce) l1 = block_reduce(l1, lse_scratch);
  const CrossEntropy xent = cross_entropy(a, row, l1, s_y);
  const DecoupledRow<float> d = decoupled_row(st, ss, c, bad_target);
  if (threadIdx.x == 0) r.loss[row] = d.loss * a.t2;
  // (2) (with the full gradient: the teacher's too, into gt, and d loss / d T)
  T* gt = r.gt == nullptr ? nullptr : r.gt + row * r.v;
  if (g != nullptr) {
    const float scale = bad_target ? NAN : grad_scale(a);
    // The student's and the teacher's gradients of a class (the teacher's only with the full gradient).
    auto grads = [&](int64_t j, float sj, float tj) {
      bool in_top1, in_strong;
      membership<PARTITION, F>(mb, tj, 0.f, j, in_top1, in_strong);
      const float y = zs.y(tj, a.opt.temperature);
      const InBin<float> b = in_bin<F>(d, in_top1, in_strong, zs.x(sj, a.opt.temperature), y);
      return make_float2(
          decoupled_grad<F>(d, in_top1, in_strong, b, scale),
          a.temperature_grad != nullptr ? decoupled_teacher_grad<F>(d, in_top1, in_strong, b, y, scale) : 0.f);
    };
    if (a.opt.standardize) {
      Sum2 sums, teacher_sums;
      walk_row(s, t, static_cast<T*>(nullptr), r.v, [&](int64_t j, float sj, float tj) {
        const float2 gj = grads(j, sj, tj);
        if (sj != -INFINITY) sums.merge({gj.x, gj.x * zs.s.z(sj)});
        if (gt != nullptr && tj != -INFINITY) teacher_sums.merge({gj.y, gj.y * zs.t.z(tj)});
        return 0.f;
      });
      zs.s.set_sums(block_reduce(sums, sum2_scratch));
      if (gt != nullptr) zs.t.set_sums(block_reduce(teacher_sums, sum2_scratch));
    }
    // (the shifts of d loss / d T: each side's largest bin max)
    TemperatureGrad dt{nan_max(nan_max(ss.m[TOP1], ss.m[STRONG]), ss.m[REST]),
                       nan_max(nan_max(st.m[TOP1], st.m[STRONG]), st.m[REST])};
    walk_row_pair(s, t, g, gt, r.v, [&](int64_t j, float sj, float tj) {
      const float2 gj = grads(j, sj, tj);
      if (a.temperature_grad != nullptr) dt.add(zs.x(sj, a.opt.temperature), gj.x, zs.y(tj, a.opt.temperature), gj.y);
      // (scale 0, distill_weight = 0: the gradients are 0, kept 0 rather than carried through a NaN z-score)
      const bool through = a.opt.standardize && scale != 0.f;
      return make_float2((through ? zs.s.grad(gj.x, sj) : gj.x) + (with_ce ? xent.grad(j, sj) : 0.f),
                         through ? zs.t.grad(gj.y, tj) : gj.y);
    });
    if (a.temperature_grad != nullptr) {
      const float dtemp = dt.value(a.opt.t2_scale, scale, d.loss, sum_scratch);
      if (threadIdx.x == 0) a.temperature_grad[row] = dtemp;
    }
  }
}

struct DecoupledFamily {
  static constexpr const char* name = "kdkernels::decoupled_cuda";
  static constexpr const char* name_ = "kdkernels::decoupled_cuda_";
  static constexpr int num_codes = NUM_PARTITIONS;
  static constexpr bool decoupled = true;
  static constexpr int num_params = DecoupledParams<double>::size;

  static void launch(CudaCall& call, int64_t code, at::ArrayRef<double> params, cudaStream_t stream) {
    const auto consts = DecoupledParams<double>::from(params.data());
    const float threshold = float(call.temperature * consts.log_tau);  // t_i - max t >= T log(tau), as every backend
    dispatch_code<NUM_PARTITIONS>(int(code), [&](auto partition) {
      dispatch_dtype(call.student.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        decoupled_kernel<decltype(partition)::value, T><<<unsigned(call.call.n), threads_for(call.call.v), 0, stream>>>(
            Rows<T>::of(call), call.args, consts, threshold);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("decoupled_cuda", &family_cuda<DecoupledFamily>);
  m.impl("decoupled_cuda_", &family_cuda_<DecoupledFamily>);
  m.impl("decoupled_cuda_full", &family_cuda_full<DecoupledFamily>);
}

}  // namespace kdkernels::cuda
