// CUDA kernel of kdkernels::scale_rows_ (schema in kdkernels.cpp): grad [N, V] *= factor (0-d, or [N] per row), in
// place, in float32 and rounded once to the gradient's dtype. The factor is read on the device: a row whose factor is
// exactly 1 (loss.backward() on a reduced loss) is neither read nor written, and finding that out costs no host sync.
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace kdkernels::cuda {
namespace {

template <class T>
__global__ void scale_rows_kernel(T* grad, const float* factor, int64_t v, bool per_row) {
  const int64_t row = blockIdx.y;
  const float f = factor[per_row ? row : 0];
  if (f == 1.f) return;
  T* g = grad + row * v;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < v; j += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (std::is_same_v<T, double>) {
      g[j] *= f;
    } else {
      g[j] = from_float<T>(to_float(g[j]) * f);
    }
  }
}

void scale_rows_cuda(const at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() &&
                  (factor.dim() == 0 || (factor.dim() == 1 && factor.size(0) == grad.size(0))),
              "kdkernels::scale_rows_: grad must be a contiguous [N, V] tensor and factor 0-d or [N], got ",
              grad.sizes(), " and ", factor.sizes());
  TORCH_CHECK(factor.device() == grad.device(), "kdkernels::scale_rows_: factor must be on the gradient's device");
  const int64_t n = grad.size(0), v = grad.size(1);
  if (n == 0 || v == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor f = factor.to(at::kFloat).contiguous();
  const unsigned threads = 256, blocks_x = unsigned(std::min<int64_t>((v + threads - 1) / threads, 64));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // One grid row per gradient row (gridDim.y is at most 65535: longer batches go in slices of rows).
  for (int64_t start = 0; start < n; start += 65535) {
    const unsigned rows = unsigned(std::min<int64_t>(n - start, 65535));
    const float* factor_ptr = f.data_ptr<float>() + (f.dim() == 1 ? start : 0);
    if (grad.scalar_type() == at::kDouble) {
      scale_rows_kernel<double><<<dim3(blocks_x, rows), threads, 0, stream>>>(grad.data_ptr<double>() + start * v,
                                                                              factor_ptr, v, f.dim() == 1);
    } else {
      dispatch_dtype(grad.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        scale_rows_kernel<T><<<dim3(blocks_x, rows), threads, 0, stream>>>(static_cast<T*>(grad.data_ptr()) + start * v,
                                                                           factor_ptr, v, f.dim() == 1);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("scale_rows_", &scale_rows_cuda);
}

}  // namespace kdkernels::cuda
