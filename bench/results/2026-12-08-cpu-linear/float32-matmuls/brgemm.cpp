#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Parallel.h>
using at::native::cpublas::brgemm;
// out[V, M] = W[V, H] @ XT[H, M]
torch::Tensor logits_t(torch::Tensor W, torch::Tensor XT, int64_t bv, int64_t bn) {
  int64_t V = W.size(0), H = W.size(1), M = XT.size(1);
  auto out = torch::empty({V, M}, W.options());
  const float* w = W.data_ptr<float>(); const float* x = XT.data_ptr<float>(); float* o = out.data_ptr<float>();
  at::parallel_for(0, (V + bv - 1) / bv, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t v0 = b * bv, nv = std::min(bv, V - v0);
      for (int64_t n0 = 0; n0 < M; n0 += bn) {
        int64_t nn = std::min(bn, M - n0);
        brgemm(nv, nn, H, H, M, M, false, w + v0 * H, x + n0, o + v0 * M + n0, false);
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
  return out;
}
// out[M, H] = G[M, V] @ W[V, H]  (per-thread partial sums over V blocks)
torch::Tensor grad_x(torch::Tensor G, torch::Tensor W, int64_t bv, int64_t bm) {
  int64_t M = G.size(0), V = G.size(1), H = W.size(1);
  int nt = at::get_num_threads();
  auto part = torch::zeros({nt, M, H}, W.options());
  const float* g = G.data_ptr<float>(); const float* w = W.data_ptr<float>(); float* p = part.data_ptr<float>();
  at::parallel_for(0, (V + bv - 1) / bv, 1, [&](int64_t b0, int64_t b1) {
    float* acc = p + at::get_thread_num() * M * H;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t v0 = b * bv, nv = std::min(bv, V - v0);
      for (int64_t m0 = 0; m0 < M; m0 += bm) {
        int64_t mm = std::min(bm, M - m0);
        brgemm(mm, H, nv, V, H, H, true, g + m0 * V + v0, w + v0 * H, acc + m0 * H, false);
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
  return part.sum(0);
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("logits_t", &logits_t); m.def("grad_x", &grad_x); }
