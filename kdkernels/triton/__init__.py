"""The Triton backend: launchers of the two family kernels, their custom ops and the backend registration.

CUDA tensors run the compiled kernels. With the environment variable TRITON_INTERPRET=1 (set before Triton is
imported) the same kernels run on CPU tensors through Triton's interpreter: slow, used to test them without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton

from .. import backends
from ..kernel_params import decoupled_params, divergence_params
from ..methods import DIVERGENCE, get_method
from ..ops import define_family_op
from .common import launch_shape
from .decoupled import decoupled_kernel
from .divergence import divergence_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _prepare(student, teacher, target, with_grad):
    n, v = student.shape
    # Columns must be contiguous (vector loads); rows may have any stride.
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    target = None if target is None else target.contiguous()
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, v), dtype=student.dtype, device=student.device) if with_grad else student.new_empty(0)
    return student, teacher, target, rows, grad


def _finish(rows, denominator, reduce):
    if not reduce:
        return rows
    return rows.sum() if denominator is None else rows.sum() / denominator


def _launch_divergence(student, teacher, target, denominator, code, params, temperature, t2_scale, ignore_index,
                       reduce, with_grad):
    student, teacher, target, rows, grad = _prepare(student, teacher, target, with_grad)
    n, v = student.shape
    if n:
        a, b, lwp, lwq, abkd_case = params
        block_n, block_v, warps, single = launch_shape(n, v)
        has_denom = reduce and denominator is not None
        divergence_kernel[(triton.cdiv(n, block_n),)](
            student, teacher, target if target is not None else rows, denominator if has_denom else rows, rows,
            grad, n, v, student.stride(0), teacher.stride(0), v, ignore_index,
            temperature, temperature**2 if t2_scale else 1.0, a, b, lwp, lwq,
            METHOD=code, ABKD_CASE=int(abkd_case), HAS_TARGET=target is not None, HAS_DENOM=has_denom,
            WITH_GRAD=with_grad, SINGLE_TILE=single, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps,
        )
    return _finish(rows, denominator, reduce), grad


def _launch_decoupled(student, teacher, target, denominator, code, params, temperature, t2_scale, ignore_index,
                      reduce, with_grad):
    student, teacher, target, rows, grad = _prepare(student, teacher, target, with_grad)
    n, v = student.shape
    if n:
        k, log_tau, three, adaptive, w0, w_strong, w_weak, max_weight = params
        block_n, block_v, warps, single = launch_shape(n, v)
        has_denom = reduce and denominator is not None
        decoupled_kernel[(triton.cdiv(n, block_n),)](
            student, teacher, target if target is not None else rows, denominator if has_denom else rows, rows,
            grad, n, v, student.stride(0), teacher.stride(0), v, ignore_index,
            temperature, temperature**2 if t2_scale else 1.0, int(k), log_tau, w0, w_strong, w_weak, max_weight,
            PARTITION=code, THREE_BINS=bool(three), ADAPTIVE=bool(adaptive), HAS_TARGET=target is not None,
            HAS_DENOM=has_denom, WITH_GRAD=with_grad, SINGLE_TILE=single, BLOCK_N=block_n, BLOCK_V=block_v,
            KPAD=triton.next_power_of_2(max(int(k), 1)), num_warps=warps,
        )
    return _finish(rows, denominator, reduce), grad


divergence_triton = define_family_op("divergence_triton", _launch_divergence)
decoupled_triton = define_family_op("decoupled_triton", _launch_decoupled)


def _impl(p: backends.Problem) -> torch.Tensor:
    if torch.float64 in (p.student.dtype, p.teacher.dtype):
        raise TypeError("backend='triton' computes in float32 and takes float32, bfloat16 or float16 logits; "
                        "use backend='reference' for float64")
    if get_method(p.method).family == DIVERGENCE:
        op, (code, params) = divergence_triton, divergence_params(p.method, p.hp)
    else:
        op, (code, params) = decoupled_triton, decoupled_params(p.method, p.hp)
    with_grad = p.student.requires_grad and torch.is_grad_enabled()
    loss, _ = op(p.student, p.teacher, p.target, p.denominator, code, params, p.temperature, p.t2_scale,
                 p.ignore_index, p.reduction != "none", with_grad)
    return loss


def _unavailable(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        return None if INTERPRETED else "Triton runs CPU tensors only under TRITON_INTERPRET=1 (its interpreter)"
    return f"no Triton support for {device.type} tensors"


backends.register("triton", _impl, _unavailable)
