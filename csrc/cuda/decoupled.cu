// CUDA kernel of the decoupled family (dkd, gdkd, cakd, aekt): one block per row, loss and gradient in one launch.
//
// Math (row_math.h, "Decoupled family"): the classes fall into bins A ({top-1}, three bins only), B (the strong
// set: {target}, the teacher's top-k, or p_i >= tau max p) and W (the rest). Per bin the kernel keeps online
//     mt_b = max y,  zt_b = sum exp(y - mt_b),  kt_b = sum exp(y - mt_b) (y - x),  ms_b = max x,  zs_b = sum exp(x - ms_b)
// from which decoupled_row() gives the loss
//     l = w0 KL(P || Q) + w_B KL(p^B || q^B) + w_W KL(p^W || q^W)
// and per bin c_b, so that g_j = (1/T) (c_b q^b_j - w_b p^b_j) for j in bin b.
// Passes: (0) what the partition needs from the teacher: k walks picking the next best (value, index) each (top-k),
// or its max (threshold); (1) the per-bin statistics; (2) the gradient.
#include "common.cuh"

namespace kdkernels::cuda {
namespace {

using F = ScalarOps<float>;

template <int PARTITION, class T>
__global__ void __launch_bounds__(512) decoupled_kernel(Rows<T> r, LaunchArgs a, DecoupledConsts<float> c) {
  __shared__ Lse lse_scratch[MAX_WARPS];
  __shared__ Ranked ranked_scratch[MAX_WARPS];
  __shared__ Max max_scratch[MAX_WARPS];
  const int64_t row = blockIdx.x;
  if (skip_ignored_row(r, a, row)) return;
  const T* s = r.s + row * r.s_stride;
  const T* t = r.t + row * r.t_stride;
  T* g = r.g == nullptr ? nullptr : r.g + row * r.v;
  T* const no_store = nullptr;
  const int64_t target = a.target != nullptr ? a.target[row] : 0;
  // An index outside [0, V) is never read (membership only compares indices): the row's loss becomes NaN.
  const bool bad_target = PARTITION == TARGET && (target < 0 || target >= r.v);
  Membership<float> mb{PARTITION == TARGET && !bad_target ? target : -1, 0.f, 0, 0, 0.f, c.log_tau, c.three_bins};
  // (0) The teacher-only walks pass t as both rows: the second read of each element is an L1 hit.
  if (PARTITION == TOPK) {
    Ranked prev{INFINITY, -1}, first;  // prev ranks above every class
    for (int64_t pick = 0; pick < c.k; ++pick) {
      Ranked best;
      walk_row(t, t, no_store, r.v, a.temperature, [&](int64_t j, float, float y) {
        if (better(prev.v, prev.i, y, j)) best.merge(Ranked{y, j});
        return 0.f;
      });
      prev = block_reduce(best, ranked_scratch);
      if (pick == 0) first = prev;
    }
    mb.kth_v = prev.v;
    mb.kth_i = prev.i;
    mb.top1_i = first.i;
  } else if (PARTITION == THRESHOLD) {
    Max y_max;
    walk_row(t, t, no_store, r.v, a.temperature, [&](int64_t, float, float y) {
      y_max.x = nan_max(y_max.x, y);
      return 0.f;
    });
    mb.y_max = block_reduce(y_max, max_scratch).x;
  }
  // (1)
  Lse bt[NUM_BINS], bs[NUM_BINS];
  walk_row(s, t, no_store, r.v, a.temperature, [&](int64_t j, float x, float y) {
    bool in_a, in_b;
    membership<PARTITION, F>(mb, y, 0.f, j, in_a, in_b);
    if (in_a) {
      bt[BIN_A].add(y, y - x);
      bs[BIN_A].add(x);
    } else if (in_b) {
      bt[BIN_B].add(y, y - x);
      bs[BIN_B].add(x);
    } else {
      bt[BIN_W].add(y, y - x);
      bs[BIN_W].add(x);
    }
    return 0.f;
  });
  BinStats<float> st, ss;
#pragma unroll
  for (int b = 0; b < NUM_BINS; ++b) {
    const Lse tb = block_reduce(bt[b], lse_scratch), sb = block_reduce(bs[b], lse_scratch);
    st.m[b] = tb.m;
    st.z[b] = tb.z;
    st.k[b] = tb.k;
    ss.m[b] = sb.m;
    ss.z[b] = sb.z;
    ss.k[b] = 0.f;
  }
  const DecoupledRow<float> d = decoupled_row(st, ss, c, bad_target);
  if (threadIdx.x == 0) r.loss[row] = d.loss * a.t2;
  // (2)
  if (g != nullptr) {
    const float scale = bad_target ? NAN : grad_scale(a);
    walk_row(s, t, g, r.v, a.temperature, [&](int64_t j, float x, float y) {
      bool in_a, in_b;
      membership<PARTITION, F>(mb, y, 0.f, j, in_a, in_b);
      return decoupled_grad<F>(d, in_a, in_b, x, y, scale);
    });
  }
}

struct DecoupledFamily {
  static constexpr const char* name = "kdkernels::decoupled";
  static constexpr const char* name_ = "kdkernels::decoupled_";
  static constexpr int num_codes = NUM_PARTITIONS;
  static constexpr bool decoupled = true;
  static constexpr int num_params = DECOUPLED_PARAMS;

  static void launch(CudaCall& call, int64_t code, at::ArrayRef<double> params, cudaStream_t stream) {
    const auto consts = DecoupledConsts<float>::from(params.data());
    dispatch_code<NUM_PARTITIONS>(int(code), [&](auto partition) {
      dispatch_dtype(call.student.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        decoupled_kernel<decltype(partition)::value, T>
            <<<unsigned(call.call.n), threads_for(call.call.v), 0, stream>>>(Rows<T>::of(call), call.args, consts);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("decoupled", &family_cuda<DecoupledFamily>);
  m.impl("decoupled_", &family_cuda_<DecoupledFamily>);
}

}  // namespace kdkernels::cuda
