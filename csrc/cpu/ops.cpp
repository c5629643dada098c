// CPU implementations of the ops (schemas in kdkernels.cpp): the family ops' checks (family_op.h), their gradients
// from the gradient cache (gradient_cache.h), then the rows in parallel (at::parallel_for) through the kernels built
// for the best capability this CPU has (divergence.cpp and decoupled.cpp, compiled once per capability);
// scale_rows_ and split_accumulate_.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../cross_vocab_op.h"
#include "../family_op.h"
#include "gradient_cache.h"
#include "kernels.h"

namespace kdkernels::cpu {
namespace {

enum Family { DIVERGENCE_FAMILY, DECOUPLED_FAMILY };

// Of a kernel's builds (DEFAULT, AVX2, AVX512), that of the widest instruction set both this build and this CPU have
// (at::get_cpu_capability() also honours the ATEN_CPU_CAPABILITY environment variable, as torch's own kernels do).
template <class Fn>
Fn for_this_cpu(Fn default_build, [[maybe_unused]] Fn avx2_build, [[maybe_unused]] Fn avx512_build) {
  static const std::string capability = at::get_cpu_capability();
#ifdef KDKERNELS_CPU_AVX512
  if (capability == "AVX512") return avx512_build;
#endif
#ifdef KDKERNELS_CPU_AVX2
  if (capability == "AVX2" || capability == "AVX512") return avx2_build;
#endif
  return default_build;
}

RowsFn kernel_for_this_cpu(Family family) {
  if (family == DIVERGENCE_FAMILY) {
    return for_this_cpu(&DEFAULT::divergence_rows, &AVX2::divergence_rows, &AVX512::divergence_rows);
  }
  return for_this_cpu(&DEFAULT::decoupled_rows, &AVX2::decoupled_rows, &AVX512::decoupled_rows);
}

// Loss rows and, with a gradient, d loss / d student into call.grad (the student itself in place); with `full` (the
// full ops) the teacher's gradient and d loss / d T too, and *full receives the call.
template <Family FAMILY>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_family(const FamilyArgs& a, bool with_grad, bool in_place,
                                                          FamilyCall* full = nullptr, bool teacher_grad = false) {
  const bool divergence = FAMILY == DIVERGENCE_FAMILY;
  const std::string name =
      std::string("kdkernels::") + (divergence ? "divergence" : "decoupled") + "_cpu" + (in_place ? "_" : "");
  FamilyCall call = check_family_call(name.c_str(), a, divergence ? int(NUM_DIVERGENCES) : int(NUM_PARTITIONS),
                                      divergence ? DivergenceParams<double>::size : DecoupledParams<double>::size,
                                      with_grad, in_place, gradient_allocator());
  if (!divergence) check_decoupled_params(call, a.code, a.params);
  if (full != nullptr) add_full_outputs(call, teacher_grad, gradient_allocator());
  const CallOptions& o = call.opt;
  const double inv_denom = o.reduce && a.denominator.has_value() ? 1.0 / a.denominator->item<double>() : 1.0;
  RowsArgs args{call.student.data_ptr(),
                call.teacher.data_ptr(),
                call.student.scalar_type(),
                call.teacher.scalar_type(),
                call.student.stride(0),
                call.teacher.stride(0),
                call.target.defined() ? call.target.data_ptr<int64_t>() : nullptr,
                call.loss_rows.data_ptr(),
                o.with_ce ? call.ce_rows.data_ptr() : nullptr,
                with_grad ? call.grad.data_ptr() : nullptr,
                call.n,
                call.v,
                int(a.code),
                a.params.data(),
                o,
                o.distill_weight * o.t2() / o.temperature * inv_denom,
                o.ce_weight * inv_denom,
                call.math_double};
  if (full != nullptr) {
    args.teacher_grad = teacher_grad ? call.teacher_grad.data_ptr() : nullptr;
    args.temperature_grad = call.temperature_grad.data_ptr();
  }
  const RowsFn rows = kernel_for_this_cpu(FAMILY);
  // Enough rows per task to amortise its start, and never fewer than one row.
  const int64_t grain = std::max<int64_t>(1, 32768 / call.v);
  at::parallel_for(0, call.n, grain, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  auto [loss, parts] = finish_losses(call);
  if (full != nullptr) *full = call;
  return {loss, parts, call.grad};
}

// The op entry points (the schemas of kdkernels.cpp).
template <Family FAMILY>
std::tuple<at::Tensor, at::Tensor, at::Tensor> family_cpu(KDKERNELS_CALL_PARAMETERS, bool with_grad) {
  return run_family<FAMILY>(KDKERNELS_CALL_ARGS("kdkernels::<family>_cpu"), with_grad, /*in_place=*/false);
}

template <Family FAMILY>
std::tuple<at::Tensor, at::Tensor> family_cpu_(KDKERNELS_CALL_PARAMETERS) {
  auto [loss, parts, grad] =
      run_family<FAMILY>(KDKERNELS_CALL_ARGS("kdkernels::<family>_cpu_"), /*with_grad=*/true, /*in_place=*/true);
  return {loss, parts};
}

template <Family FAMILY>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> family_cpu_full(KDKERNELS_CALL_PARAMETERS,
                                                                                       bool teacher_grad) {
  FamilyCall call;
  auto [loss, parts, grad] = run_family<FAMILY>(KDKERNELS_CALL_ARGS("kdkernels::<family>_cpu_full"),
                                                /*with_grad=*/true, /*in_place=*/false, &call, teacher_grad);
  return {loss, parts, grad, call.teacher_grad, call.temperature_grad};
}

// uld and hybrid (cross_vocab.h): (loss, parts, grad [N, Vs] or empty, dl/dc_s [N] in the math type or empty),
// reduced as the family ops.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_vocab_cpu(KDKERNELS_CROSS_VOCAB_PARAMETERS) {
  const char* op = "kdkernels::cross_vocab_cpu";
  TORCH_CHECK(student.device().is_cpu(), op, ": the logits must be CPU tensors, got ", student.device());
  CrossVocabCall checked = check_cross_vocab_call(op, student, teacher, student_log_scale, teacher_log_scale, target,
                                                  denominator, KDKERNELS_CROSS_VOCAB_OPTIONS, gradient_allocator());
  const FamilyCall& call = checked.call;
  const at::Tensor* scales = checked.scales;
  CrossVocabArgs args{call.student.data_ptr(),
                      call.teacher.data_ptr(),
                      call.student.scalar_type(),
                      call.teacher.scalar_type(),
                      call.student.stride(0),
                      call.teacher.stride(0),
                      scales[0].defined() ? scales[0].data_ptr() : nullptr,
                      scales[1].defined() ? scales[1].data_ptr() : nullptr,
                      call.target.defined() ? call.target.data_ptr<int64_t>() : nullptr,
                      ignore_index,
                      call.loss_rows.data_ptr(),
                      with_ce ? call.ce_rows.data_ptr() : nullptr,
                      with_grad ? call.grad.data_ptr() : nullptr,
                      with_grad ? checked.scale_grad.data_ptr() : nullptr,
                      call.n,
                      call.v,
                      checked.vt,
                      int(code),
                      params.data()};
  std::vector<at::Tensor> kept;
  if (code == HYBRID) {
    kept = checked_hybrid_classes(op, classes, student, checked.vt);
    args.student_ids = kept[0].data_ptr<int64_t>();
    args.teacher_ids = kept[1].data_ptr<int64_t>();
    args.free_student = kept[2].data_ptr<int64_t>();
    args.free_teacher = kept[3].data_ptr<int64_t>();
    args.num_pairs = kept[0].numel();
    args.num_free_student = kept[2].numel();
    args.num_free_teacher = kept[3].numel();
  }
  args.temperature = temperature;
  args.grad_scale = checked.grad_scale;
  args.scale_grad_scale = checked.scale_grad_scale;
  args.ce_scale = checked.ce_scale;
  args.math_double = call.math_double;
  const CrossVocabFn rows =
      for_this_cpu(&DEFAULT::cross_vocab_rows, &AVX2::cross_vocab_rows, &AVX512::cross_vocab_rows);
  // A row is sorted in its worker's buffers: one row per task is enough to amortise a task's start.
  at::parallel_for(0, call.n, 1, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  auto [loss, parts] = finish_losses(call);
  return {loss, parts, call.grad, checked.scale_grad};
}

// grad *= factor: a 0-d factor of exactly 1 skips the pass (a host read: the factor is on the CPU); low-precision
// gradients are multiplied in float32 and rounded once. A 0-d float32 factor does that in place (the kernel multiplies
// by a CPU scalar in float32, its value not rounded to the gradient's dtype); a per-row one goes through a float32
// copy (an in-place product of mixed dtypes takes a slow element-wise cast).
void scale_rows_cpu(const at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.dim() == 2 && (factor.dim() == 0 || (factor.dim() == 1 && factor.size(0) == grad.size(0))),
              "kdkernels::scale_rows_: grad must be [N, V] and factor 0-d or [N], got ", grad.sizes(), " and ",
              factor.sizes());
  if (factor.dim() == 0 && factor.item<double>() == 1.0) return;
  const bool wide = grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble;
  const at::ScalarType math = wide ? grad.scalar_type() : at::kFloat;
  const at::Tensor f = factor.dim() == 1 ? factor.to(math).reshape({-1, 1}) : factor.to(math);
  if (wide || factor.dim() == 0) {
    grad.mul_(f);
  } else {
    grad.copy_(grad.to(math).mul_(f));
  }
}

// A float32 accumulator kept as two 16-bit halves: high holds its top 16 bits (a bfloat16, the accumulator
// truncated) and low its bottom 16 bits, so that a bfloat16 weight's gradient can be the high half and only the low
// half is extra memory. (high, low) += add in float32, each element rounded once as a float32 += would; with
// round (the last addition) high becomes the sum rounded to the nearest bfloat16 instead, and low is left as it was.
void split_accumulate_cpu(const at::Tensor& high, const at::Tensor& low, const at::Tensor& add, bool round) {
  TORCH_CHECK(high.scalar_type() == at::kBFloat16 && low.scalar_type() == at::kShort && add.scalar_type() == at::kFloat,
              "kdkernels::split_accumulate_: high, low, add must be bfloat16, int16, float32, got ", high.scalar_type(),
              ", ", low.scalar_type(), ", ", add.scalar_type());
  TORCH_CHECK(high.sizes() == low.sizes() && high.sizes() == add.sizes() && high.is_contiguous() &&
                  low.is_contiguous() && add.is_contiguous(),
              "kdkernels::split_accumulate_: high, low and add must be contiguous tensors of one shape, got ",
              high.sizes(), ", ", low.sizes(), ", ", add.sizes());
  auto* hi = reinterpret_cast<uint16_t*>(high.data_ptr());
  auto* lo = reinterpret_cast<uint16_t*>(low.data_ptr());
  const float* a = add.const_data_ptr<float>();
  at::parallel_for(0, high.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits = uint32_t(hi[i]) << 16 | lo[i];
      float x;
      std::memcpy(&x, &bits, sizeof x);
      x += a[i];
      if (round) {
        hi[i] = c10::BFloat16(x).x;
        continue;
      }
      std::memcpy(&bits, &x, sizeof x);
      hi[i] = uint16_t(bits >> 16);
      lo[i] = uint16_t(bits);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("divergence_cpu", &family_cpu<DIVERGENCE_FAMILY>);
  m.impl("decoupled_cpu", &family_cpu<DECOUPLED_FAMILY>);
  m.impl("divergence_cpu_", &family_cpu_<DIVERGENCE_FAMILY>);
  m.impl("decoupled_cpu_", &family_cpu_<DECOUPLED_FAMILY>);
  m.impl("divergence_cpu_full", &family_cpu_full<DIVERGENCE_FAMILY>);
  m.impl("decoupled_cpu_full", &family_cpu_full<DECOUPLED_FAMILY>);
  m.impl("cross_vocab_cpu", &cross_vocab_cpu);
  m.impl("scale_rows_", &scale_rows_cpu);
  m.impl("split_accumulate_", &split_accumulate_cpu);
}

}  // namespace kdkernels::cpu
