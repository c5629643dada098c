// The CPU kernels' entry points: divergence.cpp, decoupled.cpp and cross_vocab.cpp are compiled once per CPU capability
// (setup.py: DEFAULT, and AVX2 / AVX512 on x86-64, each in its own namespace) and ops.cpp calls the one
// at::get_cpu_capability() names.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../kernel_call.h"

namespace kdkernels::cpu {

// One checked family call (ops.cpp), for the rows [begin, end) a worker thread is given.
struct RowsArgs {
  const void* student;  // [N, V], last dimension contiguous
  const void* teacher;
  c10::ScalarType student_dtype;  // float, double, bfloat16 or half; the gradient has the student's dtype
  c10::ScalarType teacher_dtype;
  int64_t student_stride;  // elements between rows
  int64_t teacher_stride;
  const int64_t* target;  // [N] or nullptr
  void* loss;             // [N] per-row losses in the math type (double when math_double, else float)
  void* ce_loss;          // [N] the cross-entropy term's rows likewise, or nullptr without it
  void* grad;             // [N, V] contiguous, or nullptr when no gradient is asked for
  int64_t n, v;
  int code;              // the plan's code (divergence.h Divergence, decoupled.h Partition)
  const double* params;  // the plan's named parameters, in their order
  CallOptions opt;       // the kernel call's options (kernel_call.h)
  double grad_scale;     // distill_weight t2 / T / denominator (1 without one): the method's gradient factor
  double ce_scale;       // ce_weight / denominator: the cross-entropy's gradient factor
  bool math_double;      // float64 math (when an input is float64)
  // The full gradient (a learnable temperature, a teacher that requires grad): with temperature_grad, the teacher's
  // gradient too, stored into teacher_grad ([N, V] contiguous, the teacher's dtype) unless nullptr, and per row
  // d loss / d T into temperature_grad ([N], the math type), both scaled like the student's.
  void* teacher_grad = nullptr;
  void* temperature_grad = nullptr;
};

using RowsFn = void (*)(const RowsArgs&, int64_t begin, int64_t end);

// One checked call of the losses between two vocabularies (ops.cpp cross_vocab_cpu; cross_vocab.cpp).
struct CrossVocabArgs {
  const void* student;            // [N, Vs], last dimension contiguous
  const void* teacher;            // [N, Vt]
  c10::ScalarType student_dtype;  // float, double, bfloat16 or half; the gradient has the student's dtype
  c10::ScalarType teacher_dtype;
  int64_t student_stride;  // elements between rows
  int64_t teacher_stride;
  const void* student_log_scale;  // [N] in the math type, or nullptr (0)
  const void* teacher_log_scale;
  const int64_t* target;  // [N] or nullptr
  int64_t ignore_index;
  void* loss;        // [N] the method's row losses in the math type (double when math_double, else float)
  void* ce_loss;     // [N] the cross-entropy term's rows likewise, or nullptr without it
  void* grad;        // [N, Vs] contiguous, or nullptr when no gradient is asked for
  void* scale_grad;  // [N] dl/dc_s in the math type, or nullptr
  int64_t n, vs, vt;
  int code;              // cross_vocab.h CrossVocab
  const double* params;  // CrossVocabParams, in their order
  // hybrid: the vocabulary map's pairs and the unmatched classes of each model (ascending)
  const int64_t *student_ids = nullptr, *teacher_ids = nullptr, *free_student = nullptr, *free_teacher = nullptr;
  int64_t num_pairs = 0, num_free_student = 0, num_free_teacher = 0;
  double temperature;       // T_s
  double grad_scale;        // distill_weight / T_s / denominator (1 without one)
  double scale_grad_scale;  // distill_weight / denominator: dl/dc_s's factor
  double ce_scale;          // ce_weight / denominator
  bool math_double;
};

using CrossVocabFn = void (*)(const CrossVocabArgs&, int64_t begin, int64_t end);

#define KDKERNELS_DECLARE_CPU_KERNELS(CAPABILITY)                           \
  namespace CAPABILITY {                                                    \
  void divergence_rows(const RowsArgs&, int64_t begin, int64_t end);        \
  void decoupled_rows(const RowsArgs&, int64_t begin, int64_t end);         \
  void cross_vocab_rows(const CrossVocabArgs&, int64_t begin, int64_t end); \
  }

KDKERNELS_DECLARE_CPU_KERNELS(DEFAULT)
KDKERNELS_DECLARE_CPU_KERNELS(AVX2)
KDKERNELS_DECLARE_CPU_KERNELS(AVX512)

}  // namespace kdkernels::cpu
