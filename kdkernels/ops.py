"""torch.library custom ops of the fused kernels, their fake (meta) functions and their autograd.

Every fused backend exposes one op per family with the same schema:

    kdkernels::<family>_<backend>(student [N, V], teacher [N, V], target [N]?, denominator 0-d?, code, params,
                                  temperature, t2_scale, ignore_index, reduce, with_grad) -> (loss, grad)

``code`` and ``params`` come from kernel_params.py. With ``reduce`` the loss is sum(rows) / denominator (sum when
there is no denominator) and the gradient rows are already scaled by 1 / denominator; otherwise the loss is the
per-row vector [N]. ``grad`` is d loss / d student in the student's dtype (the kernel writes it in the same launch
as the loss), or an empty tensor when ``with_grad`` is False.

Backward multiplies the saved gradient in place by grad_output with ``kdkernels::scale_rows_``, which skips rows
whose factor is exactly 1 on the device: ``loss.backward()`` on a reduced loss costs no pass over the gradient.
The saved gradient is consumed by that, so a second backward through the same graph raises an error. A traced
backward (torch.compile) multiplies out of place instead.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor


@torch.library.custom_op("kdkernels::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, factor: Tensor) -> None:
    """grad [N, V] *= factor (0-d, or [N] per row); rows whose factor is exactly 1 are not touched."""
    # CPU: the check is a plain read, no device sync to avoid.
    if factor.dim() == 0 and bool(factor == 1):
        return
    grad.mul_(factor.to(grad.dtype).reshape(-1, 1) if factor.dim() == 1 else factor.to(grad.dtype))


@scale_rows_.register_kernel("cuda")
def _scale_rows_cuda(grad: Tensor, factor: Tensor) -> None:
    from .triton.common import scale_rows_ as triton_scale_rows_

    triton_scale_rows_(grad, factor)


def _loss_like(student, teacher, reduce):
    """The loss output: 0-d if reduced, else [N]; float64 when an input is float64 (C++ ops), else float32."""
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    return student.new_empty(() if reduce else (student.shape[0],), dtype=dtype)


def _fake(student, teacher, target, denominator, code, params, temperature, t2_scale, ignore_index, reduce,
          with_grad):
    loss = _loss_like(student, teacher, reduce)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if with_grad else student.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output):
    # The grad output is not differentiable: without this, autograd would fill an [N, V] tensor of zeros for its
    # (absent) incoming gradient on every backward, a pass as costly as the kernel itself.
    ctx.set_materialize_grads(False)
    ctx.reduce = inputs[9]
    ctx.save_for_backward(output[1])
    ctx.consumed = False


def _backward(ctx, grad_loss, _grad_grad):
    if ctx.consumed:
        raise RuntimeError("kdkernels: the fused loss's saved gradient was already used; backward through the same "
                           "fused loss twice (retain_graph=True) is not supported")
    grad, = ctx.saved_tensors
    if grad_loss is None:  # only the (non-differentiable) grad output was used
        return (None,) * 11
    if type(grad) is not torch.Tensor:
        # Traced (torch.compile, AOTAutograd: fake or functional tensors): a forward output mutated in backward
        # cannot be partitioned, so the traced graph multiplies out of place.
        factor = grad_loss.to(grad.dtype)
        return (grad * (factor.unsqueeze(-1) if factor.dim() else factor),) + (None,) * 10
    ctx.consumed = True
    torch.ops.kdkernels.scale_rows_(grad, grad_loss)
    return (grad,) + (None,) * 10


def define_family_op(name: str, launch: Callable) -> Callable:
    """Defines ``kdkernels::name`` in Python, running ``launch`` (the schema above), with fake and autograd."""

    def impl(student: Tensor, teacher: Tensor, target: Optional[Tensor], denominator: Optional[Tensor], code: int,
             params: List[float], temperature: float, t2_scale: bool, ignore_index: int, reduce: bool,
             with_grad: bool) -> Tuple[Tensor, Tensor]:
        return launch(student, teacher, target, denominator, code, params, temperature, t2_scale, ignore_index,
                      reduce, with_grad)

    op = torch.library.custom_op(f"kdkernels::{name}", mutates_args=())(impl)
    op.register_fake(_fake)
    op.register_autograd(_backward, setup_context=_setup_context)
    return op


def attach_family_op(name: str):
    """Adds the fake function and autograd to ``kdkernels::name`` whose schema and kernels come from C++."""
    qualname = f"kdkernels::{name}"
    torch.library.register_fake(qualname)(_fake)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)
    return getattr(torch.ops.kdkernels, name).default


def _inplace_fake(student, teacher, target, denominator, code, params, temperature, t2_scale, ignore_index, reduce):
    return _loss_like(student, teacher, reduce)


def define_inplace_family_op(name: str, launch: Callable) -> Callable:
    """Defines the in-place ``kdkernels::name`` in Python, running ``launch``: the family schema without
    ``with_grad``, the contiguous student overwritten by d loss / d student, the loss returned. It has no autograd:
    its caller (the fused-linear path) uses the gradient itself."""

    def impl(student: Tensor, teacher: Tensor, target: Optional[Tensor], denominator: Optional[Tensor], code: int,
             params: List[float], temperature: float, t2_scale: bool, ignore_index: int, reduce: bool) -> Tensor:
        return launch(student, teacher, target, denominator, code, params, temperature, t2_scale, ignore_index,
                      reduce)

    op = torch.library.custom_op(f"kdkernels::{name}", mutates_args=("student",))(impl)
    op.register_fake(_inplace_fake)
    return op


def attach_inplace_family_op(name: str):
    """Adds the fake function to the C++ in-place sibling ``kdkernels::name`` (``divergence_``, ``decoupled_``;
    the schema of ``define_inplace_family_op``)."""
    torch.library.register_fake(f"kdkernels::{name}")(_inplace_fake)
    return getattr(torch.ops.kdkernels, name).default


def family_backend(name: str, ops: dict, float64: bool) -> Callable:
    """The impl (backends.py) of fused backend ``name`` calling its family ``ops`` ({"divergence": op,
    "decoupled": op}); without ``float64`` it refuses float64 logits (float32 math) with a clear error."""
    from .kernel_params import decoupled_params, divergence_params
    from .methods import DIVERGENCE, get_method

    def impl(p) -> Tensor:
        if not float64 and torch.float64 in (p.student.dtype, p.teacher.dtype):
            raise TypeError(f"backend={name!r} computes in float32 and takes float32, bfloat16 or float16 logits; "
                            "use backend='reference' (or 'cpu' on CPU tensors) for float64")
        family = get_method(p.method).family
        code, params = (divergence_params if family == DIVERGENCE else decoupled_params)(p.method, p.hp)
        with_grad = p.student.requires_grad and torch.is_grad_enabled()
        loss, _ = ops[family](p.student, p.teacher, p.target, p.denominator, code, params, p.temperature,
                              p.t2_scale, p.ignore_index, p.reduction != "none", with_grad)
        return loss

    return impl
