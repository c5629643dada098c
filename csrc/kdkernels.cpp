// The kdkernels operator library: every op schema of the extension, once. The kernels are registered per device by
// cpu/ops.cpp and cuda/*.cu; fake (meta) functions and autograd are attached in Python (kdkernels/backends/ops.py).
//
//   <family>_<backend>(student [N, V], teacher [N, V], target [N]?, denominator 0-d?, code, params, scalars, flags,
//                      with_grad) -> (loss, parts, grad)
//   <family>_<backend>_(student [N, V] contiguous, ...the same but with_grad...) -> (loss, parts)
//
// for family in {divergence, decoupled} and backend in {cpu, cuda} (a CPU kernel for the first, a CUDA kernel for
// the second). The arguments after the logits are the kernel call of kdkernels/backends/kernel_call.py: code and
// params are a plan of kdkernels/methods.py (a code of divergence.h or decoupled.h and the family's named
// parameters in their order), scalars and flags the call's options (kernel_call.h CallOptions: temperature,
// ce_weight, distill_weight; ignore_index, t2_scale, reduce, with_ce, standardize). The loss is distill_weight *
// (the plan's loss) + ce_weight * (the student's cross-entropy against the target at T = 1, computed with with_ce),
// both models' rows z-scored first with standardize (row_math.h ZScore; the cross-entropy keeps the raw logits);
// parts holds the two terms, unweighted: [distill, ce]. With reduce the loss and parts are sum(rows) / denominator
// (sum without one) and the gradient rows are already scaled by 1 / denominator; otherwise they are per row ([N],
// [2, N]). They are float32, or float64 when an input is float64. grad is d loss / d student in the student's dtype,
// written in the same pass as the loss, or an empty tensor when with_grad is false. The in-place sibling writes
// d loss / d student over the student logits (each element is read before it is written) and has no autograd.
//
//   <family>_<backend>_full(student, ...the same but with_grad..., teacher_grad)
//       -> (loss, parts, grad, teacher_grad, temperature_grad)
//
// is the full gradient (a learnable temperature, a teacher that requires grad): grad as with with_grad, the teacher's
// gradient in the teacher's dtype (empty unless teacher_grad) and d loss / d T per row ([N], the math type), scaled
// like grad, all from the same launch; no autograd (kdkernels/functional.py applies them).
//
//   cross_vocab_<backend>(student [N, Vs], teacher [N, Vt], student_log_scale [N]?, teacher_log_scale [N]?,
//                         target [N]?, denominator 0-d?, classes, code, params, temperature, ignore_index, reduce,
//                         ce_weight, distill_weight, with_ce, with_grad) -> (loss, parts, grad, scale_grad)
//
// is uld or hybrid (cross_vocab.h; code and params a plan of kdkernels/methods.py CROSS_VOCAB_METHODS; classes, for
// hybrid, the vocabulary map's student ids, teacher ids and the unmatched classes of each model), the loss and parts
// as the family ops', grad d loss / d student [N, Vs] and scale_grad d loss / d student_log_scale [N] (math type),
// scaled like the loss (empty without with_grad). The teacher is a constant.
//
//   scale_rows_(grad [N, V], factor 0-d or [N]): grad *= factor in place, rows whose factor is exactly 1 untouched
//                                                (the backward of the family ops; CPU and CUDA kernels).
//
// The Python module kdkernels._C exports the codes, parameter layouts, call options and standardization epsilon the
// kernels were built with, which the tests compare with kdkernels/methods.py and kernel_call.py, and the CPU gradient
// cache's release_cached_gradients() and cached_gradient_bytes().
#include <Python.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <utility>

#include "cpu/gradient_cache.h"
#include "cross_vocab.h"
#include "decoupled.h"
#include "divergence.h"
#include "kernel_call.h"

// The kernel call's arguments (kdkernels/backends/kernel_call.py SCHEMA_ARGS, after the teacher).
#define KDKERNELS_FAMILY_ARGS \
  "Tensor teacher, Tensor? target, Tensor? denominator, int code, float[] params, float[] scalars, int[] flags"

TORCH_LIBRARY(kdkernels, m) {
  for (const char* family : {"divergence", "decoupled"}) {
    for (const char* backend : {"cpu", "cuda"}) {
      const std::string name = std::string(family) + "_" + backend;
      m.def((name + "(Tensor student, " KDKERNELS_FAMILY_ARGS ", bool with_grad) -> (Tensor, Tensor, Tensor)").c_str());
      m.def((name + "_(Tensor(a!) student, " KDKERNELS_FAMILY_ARGS ") -> (Tensor, Tensor)").c_str());
      m.def((name + "_full(Tensor student, " KDKERNELS_FAMILY_ARGS
                    ", bool teacher_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
                .c_str());
    }
  }
  for (const char* backend : {"cpu", "cuda"}) {
    m.def((std::string("cross_vocab_") + backend +
           "(Tensor student, Tensor teacher, Tensor? student_log_scale, Tensor? teacher_log_scale, "
           "Tensor? target, Tensor? denominator, Tensor[] classes, int code, float[] params, float temperature, "
           "int ignore_index, bool reduce, float ce_weight, float distill_weight, bool with_ce, bool with_grad) "
           "-> (Tensor, Tensor, Tensor, Tensor)")
              .c_str());
  }
  m.def("scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
  m.def("split_accumulate_(Tensor(a!) high, Tensor(b!) low, Tensor add, bool round) -> ()");
}

namespace {

// name -> value of each code, as a new dict (nullptr on failure).
PyObject* codes_dict(std::initializer_list<std::pair<const char*, int>> codes) {
  PyObject* dict = PyDict_New();
  for (const auto& [name, value] : codes) {
    PyObject* number = PyLong_FromLong(value);
    if (dict == nullptr || number == nullptr || PyDict_SetItemString(dict, name, number) != 0) {
      Py_XDECREF(number);
      Py_XDECREF(dict);
      return nullptr;
    }
    Py_DECREF(number);
  }
  return dict;
}

// The parameter names, in layout order, as a new tuple (nullptr on failure).
PyObject* names_tuple(std::initializer_list<const char*> names) {
  PyObject* tuple = PyTuple_New(Py_ssize_t(names.size()));
  Py_ssize_t i = 0;
  for (const char* name : names) {
    PyObject* text = tuple == nullptr ? nullptr : PyUnicode_FromString(name);
    if (text == nullptr) {
      Py_XDECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, i++, text);  // steals the reference
  }
  return tuple;
}

bool add(PyObject* module, const char* name, PyObject* value) {
  if (value == nullptr) return false;
  if (PyModule_AddObject(module, name, value) != 0) {  // steals the reference on success only
    Py_DECREF(value);
    return false;
  }
  return true;
}

PyObject* release_cached_gradients(PyObject*, PyObject*) {
  return PyLong_FromSize_t(kdkernels::cpu::release_cached_gradients());
}

PyObject* cached_gradient_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(kdkernels::cpu::cached_gradient_bytes());
}

PyMethodDef methods[] = {
    {"release_cached_gradients", release_cached_gradients, METH_NOARGS,
     "Frees the CPU gradient buffers kept for reuse (csrc/cpu/gradient_cache.h); returns their bytes."},
    {"cached_gradient_bytes", cached_gradient_bytes, METH_NOARGS, "The bytes of the CPU gradient buffers kept now."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

#define KDKERNELS_CODE_ITEM(name) {#name, kdkernels::name},
#define KDKERNELS_NAME_ITEM(type, name) #name,

// The Python module kdkernels._C: importing it loads this library and its kernels.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef definition = {PyModuleDef_HEAD_INIT, "_C", "kdkernels' compiled operators (torch.ops.kdkernels)",
                                   -1, methods};
  PyObject* module = PyModule_Create(&definition);
  if (module == nullptr) return nullptr;
  const bool ok = add(module, "DIVERGENCE_CODES", codes_dict({KDKERNELS_DIVERGENCE_CODES(KDKERNELS_CODE_ITEM)})) &&
                  add(module, "PARTITION_CODES", codes_dict({KDKERNELS_PARTITION_CODES(KDKERNELS_CODE_ITEM)})) &&
                  add(module, "BIN_CODES", codes_dict({KDKERNELS_BIN_CODES(KDKERNELS_CODE_ITEM)})) &&
                  add(module, "DIVERGENCE_PARAMS", names_tuple({KDKERNELS_DIVERGENCE_PARAMS(KDKERNELS_NAME_ITEM)})) &&
                  add(module, "DECOUPLED_PARAMS", names_tuple({KDKERNELS_DECOUPLED_PARAMS(KDKERNELS_NAME_ITEM)})) &&
                  add(module, "CROSS_VOCAB_CODES", codes_dict({KDKERNELS_CROSS_VOCAB_CODES(KDKERNELS_CODE_ITEM)})) &&
                  add(module, "CROSS_VOCAB_PARAMS", names_tuple({KDKERNELS_CROSS_VOCAB_PARAMS(KDKERNELS_NAME_ITEM)})) &&
                  add(module, "CALL_SCALARS", names_tuple({KDKERNELS_CALL_SCALARS(KDKERNELS_NAME_ITEM)})) &&
                  add(module, "CALL_FLAGS", names_tuple({KDKERNELS_CALL_FLAGS(KDKERNELS_NAME_ITEM)})) &&
                  add(module, "STANDARDIZE_EPS", PyFloat_FromDouble(kdkernels::STANDARDIZE_EPS)) &&
                  add(module, "BDKD_TIE", PyFloat_FromDouble(kdkernels::BDKD_TIE));
  if (!ok) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
