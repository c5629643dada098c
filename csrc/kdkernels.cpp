// The kdkernels operator library: every op schema, once. The kernels are registered per device by
// cpu/ops.cpp and cuda/*.cu; fake (meta) functions and autograd are attached in Python (kdkernels/ops.py).
//
//   divergence / decoupled(student [N, V], teacher [N, V], target [N]?, denominator 0-d?, code, params,
//                          temperature, t2_scale, ignore_index, reduce, with_grad) -> (loss, grad)
//
// code and params come from kdkernels/kernel_params.py. With reduce the loss is sum(rows) / denominator (sum
// without one) and the gradient rows are already scaled by 1 / denominator; otherwise the loss is the per-row
// vector [N]. The loss is float32, or float64 when an input is float64. grad is d loss / d student in the
// student's dtype, written in the same pass as the loss, or an empty tensor when with_grad is false.
//
//   divergence_ / decoupled_(student [N, V] contiguous, ...same arguments but with_grad...) -> loss
//
// The in-place siblings (for the fused-linear path, which needs no logits after the loss): the same math, with
// d loss / d student written over the student logits (each element is read before it is written). No autograd.
#include <Python.h>
#include <torch/library.h>

#include <string>

#define KDKERNELS_FAMILY_ARGS                                                                               \
  "Tensor teacher, Tensor? target, Tensor? denominator, int code, float[] params, float temperature, " \
  "bool t2_scale, int ignore_index, bool reduce"

TORCH_LIBRARY(kdkernels, m) {
  for (const char* family : {"divergence", "decoupled"}) {
    const std::string name(family);
    m.def((name + "(Tensor student, " KDKERNELS_FAMILY_ARGS ", bool with_grad) -> (Tensor, Tensor)").c_str());
    m.def((name + "_(Tensor(a!) student, " KDKERNELS_FAMILY_ARGS ") -> Tensor").c_str());
  }
}

// The Python module kdkernels._C: importing it loads this library and its kernels; it holds nothing else.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kdkernels' compiled operators (torch.ops.kdkernels)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
