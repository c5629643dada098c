"""The Triton backend: launchers of the two family kernels, their custom ops and the backend registration.

CUDA tensors run the compiled kernels. With the environment variable TRITON_INTERPRET=1 (set before Triton is
imported) the same kernels run on CPU tensors through Triton's interpreter: slow, used to test them without a GPU.

Each family has the ops ``kdkernels::<family>_triton`` and the in-place ``<family>_triton_`` (ops.py), and the losses
between two vocabularies ``kdkernels::cross_vocab_triton`` (cross_vocab.py). In-place is
safe because every kernel pass that writes a gradient tile first loads that same tile of the student in the same
program and computes each written element from the element it read; no other program touches those rows.
"""

from __future__ import annotations

import os

import torch
import triton

from ...methods import DIVERGENCE, FAMILIES, DecoupledParams, Divergence, DivergenceParams
from .. import Backend, combine, reference_cross_vocab, register
from ..kernel_call import KernelCall
from ..ops import cross_vocab_entries, define_cross_vocab_op, define_family_ops, family_backend, full_backend
from .common import launch_shape, scale_rows_
from .cross_vocab import launch_cross_vocab
from .decoupled import decoupled_kernel
from .divergence import AKL_BINS, divergence_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _plan_arguments(family: str, call: KernelCall) -> tuple:
    """(the family's kernel, its named parameters, its compile-time switches) for the call's plan."""
    if family == DIVERGENCE:
        switches = dict(CODE=call.code, CE_APART=call.with_ce and (call.temperature != 1.0 or call.standardize))
        return divergence_kernel, DivergenceParams(*call.params)._asdict(), switches
    p = DecoupledParams(*call.params)
    named = dict(
        k=int(p.k),
        threshold=call.temperature * p.log_tau,
        w_mass=p.w_mass,
        w_strong=p.w_strong,
        w_rest=p.w_rest,
        w_fkl=p.w_fkl,
        w_rkl=p.w_rkl,
        max_weight=p.max_weight,
    )
    switches = dict(
        PARTITION=call.code,
        SPLIT_TOP1=bool(p.split_top1),
        LOWEST=bool(p.lowest),
        ADAPTIVE=bool(p.adaptive),
        FORWARD=p.w_fkl != 0,
        REVERSE=p.w_rkl != 0,
        KPAD=triton.next_power_of_2(max(int(p.k), 1)),
    )
    return decoupled_kernel, named, switches


def _launch(family, student, teacher, call: KernelCall, grad, teacher_grad=None, temperature_grad=None):
    """Runs the family's kernel on 2-D logits; ``grad`` is the gradient output ([N, V] contiguous, possibly
    ``student`` itself) or None for a forward-only call; the full gradient also writes ``temperature_grad`` ([N]
    float32, d loss / d T per row) and, unless None, ``teacher_grad`` ([N, V] contiguous). Returns (loss, parts),
    reduced or per row."""
    if torch.float64 in (student.dtype, teacher.dtype):
        raise TypeError(
            "the Triton kernels compute in float32 and take float32, bfloat16 or float16 logits, not "
            "float64 (backend='reference' computes float64)"
        )
    n, v = student.shape
    # Columns must be contiguous (vector loads); rows may have any stride.
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    target = None if call.target is None else call.target.contiguous()
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    ce_rows = torch.empty(n, dtype=torch.float32, device=student.device) if call.with_ce else None
    denominator = call.denominator if call.reduce else None
    if n:
        akl = family == DIVERGENCE and call.code == Divergence.AKL
        block_n, block_v, warps, single, maxnreg = launch_shape(
            family, n, v, full=temperature_grad is not None, akl=akl
        )
        kernel, named, switches = _plan_arguments(family, call)
        if family == DIVERGENCE:  # akl's radix histograms (divergence._akl_head), a row's AKL_BINS zeros
            named["mass_ptr"] = (
                torch.zeros((n, AKL_BINS.value), dtype=torch.float32, device=student.device) if akl else rows
            )
        kernel[(triton.cdiv(n, block_n),)](
            student,
            teacher,
            target if target is not None else rows,
            denominator if denominator is not None else rows,
            rows,
            ce_rows if ce_rows is not None else rows,
            grad if grad is not None else rows,
            n,
            v,
            student.stride(0),
            teacher.stride(0),
            v,
            call.ignore_index,
            call.scalars(),
            **named,
            gt_ptr=teacher_grad if teacher_grad is not None else rows,
            dtemp_ptr=temperature_grad if temperature_grad is not None else rows,
            HAS_TARGET=target is not None,
            HAS_DENOM=denominator is not None,
            WITH_CE=call.with_ce,
            # A term of weight 0 adds exactly 0 to the gradient, whatever it holds: left out (its loss still computed).
            CE_GRAD=call.with_ce and call.ce_weight != 0,
            DISTILL_GRAD=call.distill_weight != 0,
            STANDARDIZE=call.standardize,
            WITH_GRAD=grad is not None,
            FULL=temperature_grad is not None,
            TEACHER_GRAD=teacher_grad is not None,
            T2_SCALE=call.t2_scale,
            SINGLE_TILE=single,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            num_warps=warps,
            maxnreg=maxnreg,
            **switches,
        )
    return combine(call, rows, ce_rows)


def _out_of_place(family):
    def launch(student, teacher, *args):
        *call_args, with_grad = args
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if with_grad else None
        loss, parts = _launch(family, student, teacher, KernelCall.from_op_args(*call_args), grad)
        return loss, parts, grad if with_grad else student.new_empty(0)

    return launch


def _in_place(family):
    def launch(student, teacher, *call_args):
        if not student.is_contiguous():
            raise ValueError(
                f"the in-place {family} op overwrites the student logits with their gradient: they "
                f"must be contiguous, got strides {student.stride()}"
            )
        return _launch(family, student, teacher, KernelCall.from_op_args(*call_args), student)

    return launch


def _full(family):
    def launch(student, teacher, *args):
        *call_args, teacher_grad = args
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        grad_t = torch.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device) if teacher_grad else None
        grad_temperature = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        loss, parts = _launch(
            family, student, teacher, KernelCall.from_op_args(*call_args), grad, grad_t, grad_temperature
        )
        return loss, parts, grad, grad_t if teacher_grad else teacher.new_empty(0), grad_temperature

    return launch


def _unavailable(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        return None if INTERPRETED else "Triton runs CPU tensors only under TRITON_INTERPRET=1 (its interpreter)"
    return f"no Triton support for {device.type} tensors"


_triples = {
    family: define_family_ops(family, "triton", _out_of_place(family), _in_place(family), _full(family), scale_rows_)
    for family in FAMILIES
}
_ops = {family: ops[0] for family, ops in _triples.items()}
_full_ops = {family: ops[2] for family, ops in _triples.items()}
register(
    Backend(
        name="triton",
        impl=family_backend("triton", _ops, scale_rows_),
        unavailable=_unavailable,
        full=full_backend(_full_ops, scale_rows_),
        ops=_ops,
        inplace={family: ops[1] for family, ops in _triples.items()},
        scale_rows=scale_rows_,
        full_ops=_full_ops,
        **cross_vocab_entries(
            "triton",
            define_cross_vocab_op("triton", launch_cross_vocab),
            scale_rows_,
            reference_cross_vocab,
        ),
    )
)
