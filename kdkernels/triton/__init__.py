"""The Triton backend: launchers of the two family kernels, their custom ops and the backend registration.

CUDA tensors run the compiled kernels. With the environment variable TRITON_INTERPRET=1 (set before Triton is
imported) the same kernels run on CPU tensors through Triton's interpreter: slow, used to test them without a GPU.

Each family has two ops: ``<family>_triton`` (ops.py schema: a new gradient tensor, autograd attached) and the
in-place ``<family>_triton_`` (no ``with_grad``; the contiguous student is overwritten by d loss / d student and
the loss is returned; no autograd: the fused-linear path uses the gradient itself). In-place is safe because
every kernel pass that writes a gradient tile first loads that same tile of the student in the same program and
computes each written element from the element it read; no other program touches those rows.
"""

from __future__ import annotations

import os

import torch
import triton

from .. import backends
from ..methods import DECOUPLED, DIVERGENCE
from ..ops import define_family_op, define_inplace_family_op, family_backend
from .common import launch_shape
from .decoupled import decoupled_kernel
from .divergence import divergence_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _launch(kernel, family, student, teacher, target, denominator, code, params, temperature, t2_scale,
            ignore_index, reduce, grad):
    """Runs ``kernel`` on 2-D logits; ``grad`` is the gradient output ([N, V] contiguous, possibly ``student``
    itself) or None for a forward-only call. Returns the loss (reduced or [N])."""
    if torch.float64 in (student.dtype, teacher.dtype):
        raise TypeError("the Triton kernels compute in float32 and take float32, bfloat16 or float16 logits, not "
                        "float64 (backend='reference' computes float64)")
    n, v = student.shape
    # Columns must be contiguous (vector loads); rows may have any stride.
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    target = None if target is None else target.contiguous()
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    if n:
        block_n, block_v, warps, single = launch_shape(n, v)
        has_denom = reduce and denominator is not None
        if family == DIVERGENCE:
            a, b, lwp, lwq, abkd_case = params
            scalars = (a, b, lwp, lwq)
            switches = dict(METHOD=code, ABKD_CASE=int(abkd_case))
        else:
            k, log_tau, three, adaptive, w0, w_strong, w_weak, max_weight = params
            scalars = (int(k), log_tau, w0, w_strong, w_weak, max_weight)
            switches = dict(PARTITION=code, THREE_BINS=bool(three), ADAPTIVE=bool(adaptive),
                            KPAD=triton.next_power_of_2(max(int(k), 1)))
        kernel[(triton.cdiv(n, block_n),)](
            student, teacher, target if target is not None else rows, denominator if has_denom else rows, rows,
            grad if grad is not None else rows, n, v, student.stride(0), teacher.stride(0), v, ignore_index,
            temperature, temperature**2 if t2_scale else 1.0, *scalars,
            HAS_TARGET=target is not None, HAS_DENOM=has_denom, WITH_GRAD=grad is not None, SINGLE_TILE=single,
            BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps, **switches,
        )
    if not reduce:
        return rows
    return rows.sum() if denominator is None else rows.sum() / denominator


def _out_of_place(kernel, family):
    def launch(student, teacher, target, denominator, code, params, temperature, t2_scale, ignore_index, reduce,
               with_grad):
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if with_grad else None
        loss = _launch(kernel, family, student, teacher, target, denominator, code, params, temperature, t2_scale,
                       ignore_index, reduce, grad)
        return loss, grad if with_grad else student.new_empty(0)

    return launch


def _in_place(kernel, family):
    def launch(student, teacher, target, denominator, code, params, temperature, t2_scale, ignore_index, reduce):
        if not student.is_contiguous():
            raise ValueError(f"the in-place {family} op overwrites the student logits with their gradient: they "
                             f"must be contiguous, got strides {student.stride()}")
        return _launch(kernel, family, student, teacher, target, denominator, code, params, temperature, t2_scale,
                       ignore_index, reduce, student)

    return launch


divergence_triton = define_family_op("divergence_triton", _out_of_place(divergence_kernel, DIVERGENCE))
decoupled_triton = define_family_op("decoupled_triton", _out_of_place(decoupled_kernel, DECOUPLED))
divergence_triton_ = define_inplace_family_op("divergence_triton_", _in_place(divergence_kernel, DIVERGENCE))
decoupled_triton_ = define_inplace_family_op("decoupled_triton_", _in_place(decoupled_kernel, DECOUPLED))


def _unavailable(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        return None if INTERPRETED else "Triton runs CPU tensors only under TRITON_INTERPRET=1 (its interpreter)"
    return f"no Triton support for {device.type} tensors"


_ops = {"divergence": divergence_triton, "decoupled": decoupled_triton}
backends.register("triton", family_backend("triton", _ops, float64=False), _unavailable, _ops,
                  {"divergence": divergence_triton_, "decoupled": decoupled_triton_})
