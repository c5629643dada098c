// Host-side half of the cross-vocabulary ops (kdkernels::cross_vocab_<backend>, schema in kdkernels.cpp), shared by
// the CPU (cpu/ops.cpp) and CUDA (cuda/cross_vocab.cu) implementations: the checks of the arguments and the outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/any.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>

#include <cmath>
#include <vector>

#include "cross_vocab.h"
#include "family_op.h"

namespace kdkernels {

// The op entry points' parameters (the schema of kdkernels.cpp), and the ones after the logits and log scales read
// into CrossVocabOptions.
#define KDKERNELS_CROSS_VOCAB_PARAMETERS                                                                              \
  const at::Tensor &student, const at::Tensor &teacher, const std::optional<at::Tensor>&student_log_scale,            \
      const std::optional<at::Tensor>&teacher_log_scale, const std::optional<at::Tensor>&target,                      \
      const std::optional<at::Tensor>&denominator, at::TensorList classes, int64_t code, at::ArrayRef<double> params, \
      double temperature, int64_t ignore_index, bool reduce, double ce_weight, double distill_weight, bool with_ce,   \
      bool with_grad
#define KDKERNELS_CROSS_VOCAB_OPTIONS                                                              \
  CrossVocabOptions {                                                                              \
    code, params, temperature, ignore_index, reduce, ce_weight, distill_weight, with_ce, with_grad \
  }

// The op's arguments after the logits and log scales, as the schema gives them.
struct CrossVocabOptions {
  int64_t code;
  at::ArrayRef<double> params;
  double temperature;
  int64_t ignore_index;
  bool reduce;
  double ce_weight, distill_weight;
  bool with_ce, with_grad;
};

// A checked call: the family call's outputs (grad [N, Vs] in the student's dtype), the log scales [N] in the math
// type (undefined when absent), dl/dc_s [N] (empty(0) without with_grad) and the gradient factors.
struct CrossVocabCall {
  FamilyCall call;
  int64_t vt;
  at::Tensor scales[2], scale_grad;
  double grad_scale;        // distill_weight / T_s / denominator (1 without one)
  double scale_grad_scale;  // distill_weight / denominator: dl/dc_s's factor
  double ce_scale;          // ce_weight / denominator
};

// A log scale [N] in the math type, contiguous (undefined when there is none), on the logits' device.
inline at::Tensor checked_log_scale(const char* op, const c10::optional<at::Tensor>& scale, const char* name,
                                    const at::Tensor& student, at::ScalarType math) {
  if (!scale.has_value()) return at::Tensor();
  TORCH_CHECK(scale->dim() == 1 && scale->size(0) == student.size(0) && scale->device() == student.device(), op, ": ",
              name, " must be a tensor of shape [N] = [", student.size(0), "] on the logits' device, got ",
              scale->sizes(), " on ", scale->device());
  return scale->to(math).contiguous();
}

// The plan's code and parameters (cross_vocab.h), then the checks the family ops make (the same shape for both
// models aside: the student [N, Vs] is checked as if [N, V]) and the outputs.
inline CrossVocabCall check_cross_vocab_call(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                             const c10::optional<at::Tensor>& student_log_scale,
                                             const c10::optional<at::Tensor>& teacher_log_scale,
                                             const c10::optional<at::Tensor>& target,
                                             const c10::optional<at::Tensor>& denominator, const CrossVocabOptions& o,
                                             c10::Allocator* grad_allocator = nullptr) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2 && student.size(0) == teacher.size(0), op,
              ": student [N, Vs] and teacher [N, Vt] must be 2-D with the same rows, got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(teacher.size(1) >= 1, op, ": the teacher logits need at least one class");
  TORCH_CHECK(student.size(1) < (int64_t(1) << 31), op, ": at most 2^31 - 1 student classes");
  TORCH_CHECK(o.code >= 0 && o.code < NUM_CROSS_VOCAB, op, ": code must be in [0, ", int(NUM_CROSS_VOCAB), "), got ",
              o.code);
  TORCH_CHECK(int(o.params.size()) == CrossVocabParams<double>::size, op, ": params must hold ",
              CrossVocabParams<double>::size, " numbers, got ", o.params.size());
  const auto c = CrossVocabParams<double>::from(o.params.data());
  TORCH_CHECK(std::isfinite(c.teacher_temperature) && c.teacher_temperature > 0, op,
              ": teacher_temperature must be > 0, got ", c.teacher_temperature);
  TORCH_CHECK(c.matched_code == KD || c.matched_code == RKL || c.matched_code == JSD, op,
              ": matched_code must be KD, RKL or JSD, got ", c.matched_code);
  CallOptions opt{};
  opt.temperature = o.temperature;
  opt.ce_weight = o.ce_weight;
  opt.distill_weight = o.distill_weight;
  opt.ignore_index = o.ignore_index;
  opt.reduce = o.reduce;
  opt.with_ce = o.with_ce;
  CrossVocabCall out{check_family_call(op, FamilyArgs{student, student, target, denominator, 0, {}, opt}, 1, 0,
                                       o.with_grad, false, grad_allocator),
                     teacher.size(1)};
  FamilyCall& call = out.call;
  TORCH_CHECK(is_logit_dtype(teacher.scalar_type()) && teacher.device() == student.device(), op,
              ": teacher logits must be float32, float64, bfloat16 or float16 on the student's device, got ",
              teacher.scalar_type(), " on ", teacher.device());
  call.teacher = teacher.stride(1) == 1 ? teacher : teacher.contiguous();
  call.math_double = call.math_double || teacher.scalar_type() == at::kDouble;
  const at::ScalarType math = call.math_double ? at::kDouble : at::kFloat;
  call.loss_rows = call.loss_rows.to(math);
  if (o.with_ce) call.ce_rows = at::empty_like(call.loss_rows);
  out.scales[0] = checked_log_scale(op, student_log_scale, "student_log_scale", student, math);
  out.scales[1] = checked_log_scale(op, teacher_log_scale, "teacher_log_scale", student, math);
  out.scale_grad = o.with_grad ? at::empty_like(call.loss_rows) : at::empty({0}, call.loss_rows.options());
  const double inv_denom = o.reduce && denominator.has_value() ? 1.0 / denominator->item<double>() : 1.0;
  out.grad_scale = o.distill_weight / o.temperature * inv_denom;
  out.scale_grad_scale = o.distill_weight * inv_denom;
  out.ce_scale = o.ce_weight * inv_denom;
  return out;
}

// Every id of x[0, n) in [0, width).
inline void check_class_ids(const char* op, const int64_t* x, int64_t n, int64_t width) {
  for (int64_t m = 0; m < n; ++m) {
    TORCH_CHECK(x[m] >= 0 && x[m] < width, op, ": class id ", x[m], " outside [0, ", width, ")");
  }
}

// hybrid's classes: (student ids, teacher ids, unmatched student ids, unmatched teacher ids), 1-D int64 on the
// logits' device, each id in range (read on the host: one copy and sync for device tensors, only when one is out of
// range) and the unmatched ones completing the pairs on each side. Returns them contiguous.
inline std::vector<at::Tensor> checked_hybrid_classes(const char* op, at::TensorList classes, const at::Tensor& student,
                                                      int64_t vt) {
  TORCH_CHECK(classes.size() == 4, op,
              ": hybrid needs 4 class tensors (student ids, teacher ids, unmatched student ids, unmatched teacher "
              "ids), got ",
              classes.size());
  const int64_t vs = student.size(1), widths[4] = {vs, vt, vs, vt};
  std::vector<at::Tensor> kept;
  for (int k = 0; k < 4; ++k) {
    const at::Tensor& ids = classes[k];
    TORCH_CHECK(ids.dim() == 1 && ids.device() == student.device() && ids.scalar_type() == at::kLong, op,
                ": the class tensors must be 1-D int64 tensors on the logits' device");
    kept.push_back(ids.contiguous());
  }
  TORCH_CHECK(kept[0].numel() == kept[1].numel() && kept[0].numel() + kept[2].numel() == vs &&
                  kept[1].numel() + kept[3].numel() == vt,
              op, ": the pairs and the unmatched classes must cover each vocabulary once");
  bool in_range = true;
  if (!student.is_cpu()) {
    std::vector<at::Tensor> outside;
    for (int k = 0; k < 4; ++k) outside.push_back(((kept[k] < 0) | (kept[k] >= widths[k])).any());
    in_range = !at::stack(outside).any().item<bool>();
  }
  for (int k = 0; k < 4 && !in_range; ++k) {
    const at::Tensor ids = kept[k].cpu();
    check_class_ids(op, ids.data_ptr<int64_t>(), ids.numel(), widths[k]);
  }
  for (int k = 0; k < 4 && student.is_cpu(); ++k) {
    check_class_ids(op, kept[k].data_ptr<int64_t>(), kept[k].numel(), widths[k]);
  }
  return kept;
}

}  // namespace kdkernels
