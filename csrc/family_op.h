// Host-side half of the family ops, shared by the CPU (cpu/ops.cpp) and CUDA (cuda/*.cu) implementations: the
// checks of the arguments of the schema in kdkernels.cpp, the outputs, and the final reduction.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>

#include "decoupled.h"
#include "divergence.h"
#include "kernel_call.h"

namespace kdkernels {

inline bool is_logit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// One family op's arguments as the schema gives them (kdkernels.cpp), the call's options read into CallOptions.
struct FamilyArgs {
  const at::Tensor& student;
  const at::Tensor& teacher;
  const c10::optional<at::Tensor>& target;
  const c10::optional<at::Tensor>& denominator;
  int64_t code;
  at::ArrayRef<double> params;
  CallOptions opt;
};

// The op entry points' parameters but their last (the logits and the kernel call, in the schemas' order of
// kdkernels.cpp), and their bundle into FamilyArgs (OP: the op's name, for errors).
#define KDKERNELS_CALL_PARAMETERS                                                               \
  const at::Tensor &student, const at::Tensor &teacher, const std::optional<at::Tensor>&target, \
      const std::optional<at::Tensor>&denominator, int64_t code, at::ArrayRef<double> params,   \
      at::ArrayRef<double> scalars, at::ArrayRef<int64_t> flags
#define KDKERNELS_CALL_ARGS(OP)                                                                \
  FamilyArgs {                                                                                 \
    student, teacher, target, denominator, code, params, CallOptions::from(OP, scalars, flags) \
  }

// A family call with checked arguments: 2-D logits with contiguous rows, an int64 target, and the outputs.
struct FamilyCall {
  at::Tensor student, teacher;  // [N, V]; rows may have any stride, the last dimension is contiguous
  at::Tensor target;            // [N] int64, contiguous; undefined when there is none
  at::Tensor loss_rows;         // [N] in the math type: float64 when an input is float64, else float32
  at::Tensor ce_rows;           // [N] likewise, the cross-entropy term's rows; undefined without with_ce
  at::Tensor grad;              // [N, V] contiguous in the student's dtype (the student itself in place), or empty(0)
  // The full ops' outputs (add_full_outputs): the teacher's gradient, [N, V] contiguous in the teacher's dtype or
  // empty(0), and d loss / d T per row, [N] in the math type; undefined for the other ops.
  at::Tensor teacher_grad, temperature_grad;
  c10::optional<at::Tensor> denominator;  // as given (used when opt.reduce)
  CallOptions opt;
  int64_t n, v;
  bool math_double;
};

// A new [n, v] gradient: from `allocator` (a CPU allocator: the CPU ops' gradient cache) when given, else at::empty.
inline at::Tensor new_gradient(int64_t n, int64_t v, const at::TensorOptions& options, c10::Allocator* allocator) {
  if (allocator == nullptr) return at::empty({n, v}, options);
  return at::detail::empty_generic({n, v}, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), c10::MemoryFormat::Contiguous);
}

// The outputs of a full op (a learnable temperature, a teacher that requires grad).
inline void add_full_outputs(FamilyCall& call, bool teacher_grad, c10::Allocator* grad_allocator = nullptr) {
  const auto options = call.teacher.options();
  call.teacher_grad = teacher_grad ? new_gradient(call.n, call.v, options, grad_allocator) : at::empty({0}, options);
  call.temperature_grad = at::empty_like(call.loss_rows);
}

inline FamilyCall check_family_call(const char* op, const FamilyArgs& a, int num_codes, int num_params, bool with_grad,
                                    bool in_place = false, c10::Allocator* grad_allocator = nullptr) {
  const at::Tensor& student = a.student;
  const at::Tensor& teacher = a.teacher;
  const CallOptions& o = a.opt;
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(), op,
              ": student and teacher must be [N, V] logits of the same shape, got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(is_logit_dtype(student.scalar_type()) && is_logit_dtype(teacher.scalar_type()), op,
              ": logits must be float32, float64, bfloat16 or float16, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), op, ": student and teacher must be on the same device");
  TORCH_CHECK(student.size(1) >= 1, op, ": the logits need at least one class");
  TORCH_CHECK(a.code >= 0 && a.code < num_codes, op, ": code must be in [0, ", num_codes, "), got ", a.code);
  TORCH_CHECK(int(a.params.size()) == num_params, op, ": params must hold ", num_params, " numbers, got ",
              a.params.size());
  TORCH_CHECK(std::isfinite(o.temperature) && o.temperature > 0, op, ": temperature must be > 0, got ", o.temperature);
  TORCH_CHECK(std::isfinite(o.ce_weight) && std::isfinite(o.distill_weight), op, ": the weights must be finite");
  TORCH_CHECK(!o.with_ce || a.target.has_value(), op, ": with_ce (the cross-entropy term) needs a target");
  const c10::optional<at::Tensor>& target = a.target;
  const c10::optional<at::Tensor>& denominator = a.denominator;
  FamilyCall call;
  call.n = student.size(0);
  call.v = student.size(1);
  call.student = student.stride(1) == 1 ? student : student.contiguous();
  call.teacher = teacher.stride(1) == 1 ? teacher : teacher.contiguous();
  if (target.has_value()) {
    const at::Tensor& y = *target;
    TORCH_CHECK(y.dim() == 1 && y.size(0) == call.n, op, ": target must have shape [N] = [", call.n, "], got ",
                y.sizes());
    TORCH_CHECK(at::isIntegralType(y.scalar_type(), /*includeBool=*/false), op,
                ": target must hold integer class indices, got ", y.scalar_type());
    TORCH_CHECK(y.device() == student.device(), op, ": target must be on the logits' device");
    call.target = y.to(at::kLong).contiguous();
  }
  if (denominator.has_value()) {
    TORCH_CHECK(denominator->numel() == 1 && denominator->device() == student.device(), op,
                ": denominator must be a one-element tensor on the logits' device");
  }
  call.denominator = denominator;
  call.opt = o;
  call.math_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const auto options = student.options();
  call.loss_rows = at::empty({call.n}, options.dtype(call.math_double ? at::kDouble : at::kFloat));
  if (o.with_ce) call.ce_rows = at::empty_like(call.loss_rows);
  if (in_place) {  // the gradient overwrites the student logits, row by row
    TORCH_CHECK(student.is_contiguous(), op, ": the student logits it overwrites must be contiguous");
    call.grad = student;
  } else {
    call.grad = with_grad ? new_gradient(call.n, call.v, options, grad_allocator) : at::empty({0}, options);
  }
  return call;
}

// The decoupled family's parameters that the kernels rely on (the method table's plans never break them).
inline void check_decoupled_params(const FamilyCall& call, int64_t partition, at::ArrayRef<double> params) {
  const auto c = DecoupledParams<double>::from(params.data());
  TORCH_CHECK(partition != TARGET || call.target.defined(), "decoupled: the TARGET partition needs a target");
  TORCH_CHECK(partition != TOPK || (c.k >= 1 && c.k <= call.v), "decoupled: k must be in [1, V], got ", c.k);
  TORCH_CHECK(!c.split_top1 || partition == TOPK, "decoupled: split_top1 splits the top-k (TOPK partition)");
  TORCH_CHECK(!c.adaptive || partition == TARGET, "decoupled: the adaptive weight needs the TARGET partition");
}

// weight * x of a tensor, a weight of 0 giving exactly 0 (a term that does not count contributes nothing, even inf);
// row_math.h's weighted is the same rule for numbers.
inline at::Tensor weighted(double weight, const at::Tensor& x) {
  return weight == 1.0 ? x : weight == 0.0 ? at::zeros_like(x) : x * weight;
}

// distill_weight * distill + ce_weight * ce (ce nullptr without the term), of rows or of reduced terms: the one
// place the C++ ops combine the two terms.
template <class X>
X combine_terms(const CallOptions& o, const X& distill, const X* ce) {
  const X loss = weighted(o.distill_weight, distill);
  return ce != nullptr && o.ce_weight != 0.0 ? loss + weighted(o.ce_weight, *ce) : loss;
}

// (loss, parts) of rows on the host, reduced: summed in double (at a vision batch's [8, 100] the ATen reductions
// and divisions cost more than the kernel itself), over the denominator when there is one.
template <class M>
std::tuple<at::Tensor, at::Tensor> host_reduced_losses(const FamilyCall& call) {
  const M* loss_rows = call.loss_rows.data_ptr<M>();
  const M* ce_rows = call.ce_rows.defined() ? call.ce_rows.data_ptr<M>() : nullptr;
  double distill = 0, ce = 0;
  for (int64_t i = 0; i < call.n; ++i) {
    distill += double(loss_rows[i]);
    if (ce_rows != nullptr) ce += double(ce_rows[i]);
  }
  if (call.denominator.has_value()) {
    const double d = call.denominator->item<double>();
    distill /= d;
    ce /= d;
  }
  at::Tensor loss = at::empty({}, call.loss_rows.options()), parts = at::empty({2}, call.loss_rows.options());
  *loss.data_ptr<M>() = M(combine_terms(call.opt, distill, ce_rows != nullptr ? &ce : nullptr));
  parts.data_ptr<M>()[0] = M(distill);
  parts.data_ptr<M>()[1] = M(ce);
  return {loss, parts};
}

// (loss, parts) from the two terms' rows: loss = distill_weight * distill + ce_weight * ce, parts = [distill, ce]
// (ce 0 without with_ce); with reduce both are sum(rows) / denominator (sum without one), else per row.
inline std::tuple<at::Tensor, at::Tensor> finish_losses(const FamilyCall& call) {
  if (call.opt.reduce && call.loss_rows.is_cpu()) {
    return call.math_double ? host_reduced_losses<double>(call) : host_reduced_losses<float>(call);
  }
  const bool has_ce = call.ce_rows.defined();
  const at::Tensor ce = has_ce ? call.ce_rows : at::zeros_like(call.loss_rows);
  at::Tensor loss = combine_terms(call.opt, call.loss_rows, has_ce ? &ce : nullptr);
  at::Tensor parts = at::stack({call.loss_rows, ce});
  if (!call.opt.reduce) return {loss, parts};
  loss = loss.sum();
  parts = parts.sum(-1);
  if (call.denominator.has_value()) {
    const at::Tensor d = call.denominator->reshape({}).to(loss.scalar_type());
    loss = loss.div(d);
    parts = parts.div(d);
  }
  return {loss, parts};
}

}  // namespace kdkernels
