#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Parallel.h>
namespace cb = at::native::cpublas;
bool could() { return cb::could_pack(at::kBFloat16); }
// out[V, H] (f32) = Gt[V, K] @ X[K, H], Gt row-major bf16, X packed (VNNI) per call
torch::Tensor gradw(torch::Tensor Gt, torch::Tensor X, int64_t bv, int64_t bn) {
  int64_t V = Gt.size(0), K = Gt.size(1), H = X.size(1);
  auto out = torch::empty({V, H}, Gt.options().dtype(at::kFloat));
  torch::Tensor Xp = X;
  bool vnni = cb::could_pack(at::kBFloat16);
  if (vnni) {
    Xp = torch::empty({(K + 1) / 2 * 2, H}, X.options());
    cb::pack(K, H, H, H, at::kBFloat16, at::kBFloat16, X.data_ptr(), Xp.data_ptr());
  }
  auto* g = reinterpret_cast<const at::BFloat16*>(Gt.data_ptr());
  auto* x = reinterpret_cast<const at::BFloat16*>(Xp.data_ptr());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, (V + bv - 1) / bv, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t v0 = b * bv, nv = std::min(bv, V - v0);
      for (int64_t n0 = 0; n0 < H; n0 += bn) {
        int64_t nn = std::min(bn, H - n0);
        // with VNNI packing, column offset n0 in packed layout: packed rows are pairs of K: offset n0*2 per pair-row
        cb::brgemm(nv, nn, K, K, H, H, false, g + v0 * K, x + (vnni ? n0 * 2 : n0), o + v0 * H + n0, vnni);
      }
    }
    cb::brgemm_release(vnni);
  });
  return out;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gradw", &gradw); m.def("could", &could); }
