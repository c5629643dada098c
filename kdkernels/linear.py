"""Fused-linear distillation losses: the loss of ``hidden @ weight.T + bias`` without the [N, V] logits.

``linear_distill_loss`` gives the value and the gradients (for the student's hidden states, weight and bias) of
``distill_loss`` on the full logits of both models, but walks the rows in chunks: per chunk it computes the two
models' logits in float32, turns the student's into d loss / d logits (in place with the selected backend's
in-place op, else by autograd on the chunk), and accumulates

    grad_hidden[chunk] = G @ W_s        grad_weight += G.T @ hidden[chunk]  (float32)      grad_bias += sum_rows G

so the peak memory is that of one chunk plus the gradients (a bf16 weight's float32 accumulator on CPU is kept as
two 16-bit halves, the top one the returned bf16 gradient: ``_SplitGradWeight``). The forward does all of it (the
teacher's logits under no_grad); backward only scales the saved gradients by grad_output. A learnable temperature
(a 0-d tensor that requires grad) or a teacher that learns (teacher_hidden requires grad) runs each chunk through the
backend's full op instead, which also gives d loss / d T per row and the teacher's d loss / d logits; the teacher
head's gradients are then accumulated as the student's. With reduction="none" the per-row grad_output is not known
in the forward and a row's share of grad_weight cannot be rescaled afterwards: the forward then computes the
loss only and backward recomputes the chunks (twice the matmuls), refusing (as autograd does) inputs changed in
place since the forward. Autocast does not reach the chunks: their matmuls run in the weights' dtype with float32
accumulation whatever the autocast state.

Chunk size: the rows whose temporaries (student and teacher logits, softcap derivative, the gradient cast for the
matmul, the reference's autograd buffers) fit ``memory_budget`` bytes (``chunk_rows``), split into equal chunks;
the default budget (``default_budget``) on CPU is a fifth of what all rows would take (about five chunks: fewer
would save less memory, smaller ones would pack the weights too often; with a low-precision weight gradient's
accumulator held beside the chunks, a sixth less that accumulator), on CUDA a share of the free memory.
``chunk_size`` overrides the row count.

Padded vocabularies: a teacher weight with more rows (classes) than the student's is read as the student giving
those classes logit -inf (probability 0). Losses that are infinite where q = 0 < p (kd, the decoupled family,
jsd at beta = 0, abkd unless beta > 0 and alpha + beta > 0: ``methods.finite_when_missing``) are then infinite if
the teacher puts any mass there; slice the teacher weight (``teacher_weight[:V]``) to renormalise the teacher over
the shared classes instead.
"""

from __future__ import annotations

import ctypes
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import backends
from .arguments import (
    FLOAT_DTYPES,
    LossCall,
    as_number,
    check_float_tensor,
    check_temperature_device,
    full_gradient,
    resolve,
    split_temperature,
)
from .backends.ops import run_cross_vocab, run_op
from .backends.reference import cross_entropy_rows, cross_entropy_rows_and_grad
from .cross_vocab import VocabMap, resolve_cross_vocab, with_vocab_map
from .functional import finish
from .sparse import SparseTeacher, fold, teacher_bins, unfold_
from .sparse import check as check_sparse

Tensor = torch.Tensor

# Default chunk memory on CPU tensors, for a backend with an in-place op (docs/llm.md, "Chunk sizes"): this share
# of what the chunk buffers of all N rows would take, within [DEFAULT_CPU_BUDGET, CPU_BUDGET_MAX]. The BLAS packs the
# whole weight again for every matmul call, a cost per chunk that the matmuls of a fifth of the batch hide better than
# smaller chunks'; the unchunked path holds more [N, V] buffers than the chunks' five times over (docs/benchmarks.md,
# "Fused-linear"). A call that holds bytes beside the chunks whatever their size (a low-precision weight gradient's
# accumulator) keeps chunks and those bytes within HELD_SHARE of all rows' chunk buffers.
CPU_BUDGET_SHARE = 1 / 5
HELD_SHARE = 1 / 6
DEFAULT_CPU_BUDGET = 128 << 20
CPU_BUDGET_MAX = 1 << 30
# Without one (the reference by autograd): enough that its sub-chunks have tens of rows (a few rows per sub-chunk
# are dominated by per-operation costs), small next to the [N, V] logits and their reference temporaries.
DEFAULT_CPU_AUTOGRAD_BUDGET = 768 << 20
# On CUDA: this share of the free device memory, at most CUDA_BUDGET_MAX.
CUDA_BUDGET_FRACTION = 1 / 8
CUDA_BUDGET_MAX = 1 << 30
# Peak of the reference's forward + backward on a chunk, in [rows, V] float32 buffers (measured: 13 for kd up to
# 38 for gdkd with 3 partitions); used to size chunks when the backend has no in-place op.
REFERENCE_BUFFERS = 40


def default_budget(device: torch.device, inplace: bool, all_rows_bytes: int, held: int = 0) -> int:
    """Bytes of chunk temporaries used when neither ``memory_budget`` nor ``chunk_size`` is given; ``inplace``:
    whether the backend turns logits into gradients in place; ``all_rows_bytes``: what a chunk of all N rows would
    hold (N times ``chunk_row_bytes``); ``held``: what the call holds beside the chunks whatever their size (the
    weight gradients' accumulators beyond the returned gradients, ``_HeadGrads.held_bytes``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(free * CUDA_BUDGET_FRACTION, CUDA_BUDGET_MAX))
    if not inplace:
        return DEFAULT_CPU_AUTOGRAD_BUDGET
    share = all_rows_bytes * CPU_BUDGET_SHARE if held == 0 else all_rows_bytes * HELD_SHARE - held
    return int(min(max(share, DEFAULT_CPU_BUDGET), CPU_BUDGET_MAX))


def chunk_row_bytes(v_student: int, v_teacher: int, weight_dtype: torch.dtype, extra: int, sparse: bool) -> int:
    """Bytes of a chunk's buffers per row, as ``chunk_rows`` counts them."""
    v = v_student if sparse else v_teacher
    per_row = 4 * v * (2 + extra)
    if weight_dtype != torch.float32:
        per_row += v * torch.empty((), dtype=weight_dtype).element_size()
    return per_row


def chunk_rows(
    budget: int, v_student: int, v_teacher: int, weight_dtype: torch.dtype, inplace: bool, extra: int, sparse: bool
) -> tuple[int, int]:
    """(rows per chunk, rows per loss call) whose temporaries fit ``budget`` bytes.

    A chunk holds float32 logits of both models ([rows, V_teacher] each; a sparse teacher's fold copies the student's
    instead), ``extra`` more float32 [rows, V] buffers (the capped logits for the softcap derivative, two for the
    student's entropy), and with a low-precision weight dtype one [rows, V] buffer of it (the logits' matmul output,
    then the gradient cast for the gradients' matmuls). A backend with an
    in-place op turns the student's logits into the gradient with nothing more, so the whole budget goes to the chunk.
    Otherwise the loss runs by autograd on sub-chunks (REFERENCE_BUFFERS [rows, V] float32 each) that get three quarters
    of the budget and the chunk the rest: small sub-chunks are dominated by per-operation costs, and a few hundred rows
    already keep the matmuls efficient (on a 2-core CPU a 48-row chunk runs them at half the speed of a 512-row one).
    """
    v = v_student if sparse else v_teacher
    return rows_in_budget(budget, chunk_row_bytes(v_student, v_teacher, weight_dtype, extra, sparse), inplace, v)


def cross_vocab_row_bytes(v_student: int, v_teacher: int, weight_dtype: torch.dtype, softcap: bool) -> int:
    """Bytes per row of a ``linear_cross_vocab_loss`` chunk: float32 logits of both heads ([rows, Vs] and
    [rows, Vt]), the fused op's gradient [rows, Vs], with a softcap the student's capped logits, and with a
    low-precision weight dtype one [rows, max(Vs, Vt)] buffer of it (as ``chunk_row_bytes``)."""
    per_row = 4 * (v_teacher + v_student * (2 + softcap))
    if weight_dtype != torch.float32:
        per_row += max(v_student, v_teacher) * torch.empty((), dtype=weight_dtype).element_size()
    return per_row


def rows_in_budget(budget: int, per_row: int, inplace: bool, loss_width: int) -> tuple[int, int]:
    """``chunk_rows`` of a chunk of ``per_row`` bytes a row: all the budget to the chunk when the backend computes
    the gradient without autograd (``inplace``), else a quarter, and the rest to autograd sub-chunks of
    REFERENCE_BUFFERS float32 [rows, loss_width] buffers."""
    if inplace:
        return max(1, budget // per_row), 0
    return max(1, budget // 4 // per_row), max(1, budget * 3 // 4 // (4 * loss_width * REFERENCE_BUFFERS))


_OUT_DTYPE_MATMUL: dict = {}


def _out_dtype_matmul(device: torch.device) -> bool:
    """Whether this PyTorch has CUDA matmuls of bfloat16 inputs with a float32 output (``out_dtype``, into a given
    output too, torch >= 2.8), checked once on a tiny product: where it has none, low-precision chunks fall back to
    float32 matmuls."""
    if device.type != "cuda":
        return False
    if device.type not in _OUT_DTYPE_MATMUL:
        a = torch.ones(2, 3, device=device, dtype=torch.bfloat16)
        acc = torch.ones(3, 3, device=device)
        out = torch.zeros(3, 4, device=device)[:, :3]  # the strided output of a padded chunk
        try:
            torch.mm(a.t(), a, out_dtype=torch.float32, out=out)
            torch.addmm(acc, a.t(), a, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_MATMUL[device.type] = bool((acc == 3).all() and (out == 2).all())
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MATMUL[device.type] = False
    return _OUT_DTYPE_MATMUL[device.type]


def _matmul_f32(a: Tensor, b: Tensor, out: Tensor, low: Tensor | None = None) -> Tensor:
    """out (float32) = a @ b with float32 accumulation. Low-precision CUDA inputs write float32 directly; on CPU,
    where PyTorch has no such matmul, the BLAS accumulates in float32 and rounds the output to the inputs' dtype
    (into ``low``, a buffer of out's shape in that dtype, when given). Mixed dtypes cast the narrower operand (e.g.
    a chunk of bf16 hidden states against a float32 weight), not the weight."""
    if a.dtype != b.dtype:
        wide = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(wide), b.to(wide)
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.dtype != torch.float64 and _out_dtype_matmul(a.device):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    if a.is_cuda:
        return torch.mm(a.float(), b.float(), out=out)
    return out.copy_(torch.mm(a, b, out=low))


def _accumulates_into_f32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether products of ``dtype`` inputs on ``device`` can accumulate into a float32 tensor directly (CUDA's
    ``out_dtype``, MKL's low-precision GEMMs on CPU)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    return _out_dtype_matmul(device) or (device.type == "cpu" and _has_mkl_gemm(dtype))


def _accumulate_f32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (float32) += a @ b, low-precision inputs without a float32 copy where ``_accumulates_into_f32``."""
    if a.dtype != b.dtype or not _accumulates_into_f32(a.device, a.dtype):
        acc.addmm_(a.float(), b.float())
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        torch.ops.kdkernels.low_precision_gemm_(acc, a, b, 1.0)


# MKL's GEMMs of low-precision inputs with float32 accumulation and a float32 output, C = A @ B + beta C, which
# PyTorch's x86 CPU library carries (for its own kernels) but exposes no op for.
_MKL_GEMM_NAMES = {torch.bfloat16: "cblas_gemm_bf16bf16f32", torch.float16: "cblas_gemm_f16f16f32"}
_MKL_GEMMS: dict = {}
_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112


def _mkl_gemm(dtype: torch.dtype):
    """MKL's GEMM of ``dtype`` inputs into float32, as ``gemm(c, a, b, beta)``: c = a @ b + beta c for a [M, K] and
    b [K, N] (each row-major or a transposed view of one) and c [M, N] float32, row-major; None where this PyTorch
    has none. Found once, then checked on a small product of integers, which it must give exactly."""
    if dtype not in _MKL_GEMMS:
        _MKL_GEMMS[dtype] = None
        gemm = _load_mkl_gemm(_MKL_GEMM_NAMES.get(dtype))
        if gemm is not None:
            a = torch.arange(-40, 40, dtype=torch.float32).reshape(8, 10)
            b = torch.arange(30, dtype=torch.float32).reshape(10, 3) % 7
            c = torch.ones(8, 3)
            gemm(c, a.to(dtype), b.to(dtype).t().contiguous().t(), 2.0)  # b: a transposed view
            if torch.equal(c, a @ b + 2):
                _MKL_GEMMS[dtype] = gemm
    return _MKL_GEMMS[dtype]


@torch.compiler.assume_constant_result
def _has_mkl_gemm(dtype: torch.dtype) -> bool:
    """Whether ``_mkl_gemm(dtype)`` exists: found (and checked) once, a constant to torch.compile."""
    return _mkl_gemm(dtype) is not None


@torch.library.custom_op("kdkernels::low_precision_gemm_", mutates_args=("c",))
def _low_precision_gemm(c: Tensor, a: Tensor, b: Tensor, beta: float) -> None:
    """c = a @ b + beta c through ``_mkl_gemm(a.dtype)`` (CPU, where ``_has_mkl_gemm``): an op, so that
    torch.compile traces over the call into MKL."""
    _mkl_gemm(a.dtype)(c, a, b, beta)


@_low_precision_gemm.register_fake
def _(c: Tensor, a: Tensor, b: Tensor, beta: float) -> None:
    return None


def _load_mkl_gemm(name: str | None):
    if name is None or not torch.backends.mkl.is_available():
        return None
    try:
        fn = getattr(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")), name)
    except (OSError, AttributeError):
        return None
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.restype, fn.argtypes = None, [i, i, i, i, i, i, f, p, i, p, i, f, p, i]

    def layout(x: Tensor) -> tuple[int, int] | None:
        """(transpose flag, leading dimension) of a row-major matrix or a transposed view of one."""
        if x.stride(1) == 1 and x.stride(0) >= max(1, x.shape[1]):
            return _CBLAS_NO_TRANS, x.stride(0)
        if x.stride(0) == 1 and x.stride(1) >= max(1, x.shape[0]):
            return _CBLAS_TRANS, x.stride(1)
        return None

    def gemm(c: Tensor, a: Tensor, b: Tensor, beta: float) -> None:
        a, b = (x if layout(x) else x.contiguous() for x in (a, b))
        (trans_a, ld_a), (trans_b, ld_b) = layout(a), layout(b)
        sizes = a.shape[0], b.shape[1], a.shape[1]
        fn(
            _CBLAS_ROW_MAJOR,
            trans_a,
            trans_b,
            *sizes,
            1.0,
            a.data_ptr(),
            ld_a,
            b.data_ptr(),
            ld_b,
            beta,
            c.data_ptr(),
            c.stride(0),
        )

    return gemm


class _Workspace:
    """The chunks' [rows, width] buffers, allocated once per call and reused by every chunk: on CPU a buffer this
    large comes fresh from the system at each allocation, and each chunk would pay its page faults again."""

    def __init__(self, rows: int, device: torch.device):
        self.rows, self.device, self.buffers = rows, device, {}

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """A contiguous [rows, cols] tensor (rows <= self.rows) on the buffer ``name`` of ``dtype``, holding whatever
        its last user left there; the buffer holds self.rows rows of the widest ``cols`` asked for."""
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < rows * cols:
            buf = self.buffers[name] = torch.empty(self.rows * cols, dtype=dtype, device=self.device)
        return buf[: rows * cols].view(rows, cols)


@dataclass
class _Head:
    """One model's output layer: logits = cap(scale * (hidden @ weight.T + bias)), cap(z) = c tanh(z / c)."""

    weight: Tensor  # [V, H]
    bias: Tensor | None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: Tensor, out: Tensor, work: _Workspace) -> Tensor:
        """float32 logits of ``hidden`` [rows, H] into ``out`` [rows, v], -inf past the head's classes."""
        v = self.weight.shape[0]
        low = None if self.weight.dtype == torch.float32 else work.take("low", len(hidden), v, self.weight.dtype)
        z = _matmul_f32(hidden, self.weight.t(), out[:, :v], low)
        if self.bias is not None:
            z += self.bias
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        out[:, v:] = float("-inf")
        return out

    def backward_(self, grad: Tensor, logits: Tensor) -> Tensor:
        """d loss / d (hidden @ weight.T + bias) from d loss / d logits ``grad``, in place; ``logits`` (the capped
        ones, consumed) give the softcap's derivative 1 - (cap(z) / c)^2."""
        if self.softcap is not None:
            grad.mul_(logits.div_(self.softcap).square_().neg_().add_(1))
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad


@dataclass
class _Heads:
    """Everything the chunks share: the checked loss call over the whole batch, the two heads and the backend."""

    call: LossCall  # over all N rows (its denominator is the whole batch's)
    backend: backends.Backend
    student: _Head
    teacher: _Head | None  # None for a sparse teacher
    teacher_hidden: Tensor | SparseTeacher  # [N, H_t] or [N, k]
    entropy: bool = False  # compute the student's per-row entropy at T (for logging)
    temperature_grad: bool = False  # a learnable temperature: d loss / d T per row from the full ops
    teacher_grad: bool = False  # a teacher that learns (its hidden states require grad): its head's gradients too

    loss_rows: int = 0  # rows per loss call by autograd (backends without an in-place op)

    def __post_init__(self):
        self.inplace = None if self.backend.inplace is None else self.backend.inplace[self.call.plan.family]
        self.sparse = isinstance(self.teacher_hidden, SparseTeacher)
        # the chunks' logits: over the teacher's classes (a sparse teacher's over the student's)
        self.width = self.student.weight.shape[0] if self.sparse else self.teacher.weight.shape[0]

    def tensors(self) -> list:
        """The tensors besides the student's hidden states that a recomputation reads (None where absent)."""
        teacher = (
            [self.teacher_hidden.indices, self.teacher_hidden.values]
            if self.sparse
            else [self.teacher_hidden, self.teacher.weight, self.teacher.bias]
        )
        return [self.student.weight, self.student.bias, *teacher]

    def chunk(self, start: int, stop: int, student_hidden: Tensor, want_grad: bool, work: _Workspace):
        """(loss of rows [start, stop) as reduced by the whole batch's denominator, or per row for "none"; its
        parts; the student's entropy per row or None; d that loss / d the student head's pre-activation
        [rows, V_student] float32, or None; d that loss / d T per row with the full gradient, else None; d that loss
        / d the teacher head's pre-activation [rows, V_teacher] with teacher_grad, else None)."""
        v_s = self.student.weight.shape[0]
        call = self.call.rows(start, stop)
        teacher = self.teacher_hidden.rows(start, stop) if self.sparse else self.teacher_logits(start, stop, work)
        full = want_grad and (self.temperature_grad or self.teacher_grad)
        capped_t = None
        if full and self.teacher_grad and self.teacher.softcap is not None:
            capped_t = work.take("capped teacher", stop - start, self.width).copy_(teacher)
        s, capped = self.student_logits(start, stop, student_hidden, self.width, want_grad, work)
        entropy = None
        if self.entropy:  # before s becomes the gradient
            entropy = torch.where(call.valid, _entropy(s, call.temperature), 0.0)
        dtemp = grad_t = None
        if self.sparse:
            loss, parts, grad = self._sparse_loss(call, s, teacher, want_grad)
        elif full:  # the full op (not in place): d loss / d T per row and the teacher's gradient too
            loss, parts, grad, grad_t, dtemp = run_op(
                self.backend.full_ops[call.plan.family], s, teacher, call, self.teacher_grad
            )
            grad_t = self.teacher.backward_(grad_t, capped_t) if self.teacher_grad else None
        else:
            loss, parts, grad = self._loss(call, s, teacher, want_grad)
        del teacher, s
        if grad is None:
            return loss, parts, entropy, None, None, None
        return loss, parts, entropy, self.student.backward_(grad, capped)[:, :v_s], dtemp, grad_t

    def teacher_logits(self, start: int, stop: int, work: _Workspace) -> Tensor:
        """The teacher head's float32 logits of rows [start, stop), [rows, V_teacher], a constant (no autograd)."""
        head = self.teacher
        bias = None if head.bias is None else head.bias.detach()
        detached = _Head(head.weight.detach(), bias, head.scale, head.softcap)
        with torch.no_grad():
            out = work.take("teacher", stop - start, head.weight.shape[0])
            return detached.logits(self.teacher_hidden[start:stop].detach(), out, work)

    def student_logits(
        self, start: int, stop: int, hidden: Tensor, width: int, want_grad: bool, work: _Workspace
    ) -> tuple[Tensor, Tensor | None]:
        """The student head's float32 logits of rows [start, stop), [rows, width] (-inf past its classes), and with
        ``want_grad`` and a softcap a copy of them for the softcap's derivative (else None)."""
        s = self.student.logits(hidden[start:stop], work.take("student", stop - start, width), work)
        capped = work.take("capped", stop - start, width).copy_(s) if want_grad and self.student.softcap else None
        return s, capped

    def _sparse_loss(self, call: LossCall, s: Tensor, teacher: SparseTeacher, want_grad: bool):
        """A chunk against a sparse teacher: the method's loss on the k + 1 bins (sparse.py), then the
        cross-entropy term, which needs the whole student row, from the chunk's logits ``s`` (overwritten by the
        gradient)."""
        bins, lse_tail = fold(s, teacher.indices, call.temperature, torch.float32, teacher.tail)
        valid = call.valid  # (derived from the target: made once here)
        ce_rows = ce_grad = None
        if call.with_ce and want_grad and call.ce_weight:  # its gradient times ce_weight, over the denominator
            ce_rows, ce_grad = cross_entropy_rows_and_grad(call, s, call.target, valid)
            ce_grad.mul_(call.ce_weight / (call.denominator if call.denominator is not None else 1.0))
        elif call.with_ce:
            ce_rows = cross_entropy_rows(call, s, call.target, valid)
        loss, parts, grad = self._loss(
            replace(call, ce_weight=0.0, return_parts=False),
            bins,
            teacher_bins(teacher, call.temperature, torch.float32, s.shape[-1]),
            want_grad,
        )
        if want_grad:
            grad = unfold_(grad, s, teacher.indices, lse_tail, call.temperature, valid, teacher.tail)
            if ce_grad is not None:
                grad += ce_grad
        if ce_rows is not None:
            loss, parts = backends.weigh(call, parts[0], backends.reduce(ce_rows, call))
        return loss, parts, grad

    def _loss(self, call: LossCall, student: Tensor, teacher: Tensor, want_grad: bool):
        """(loss, parts, gradient or None) of a chunk; with ``want_grad`` the contiguous float32 ``student`` is
        overwritten by its gradient."""
        if want_grad and self.inplace is not None:
            loss, parts = run_op(self.inplace, student, teacher, call)
            return loss, parts, student
        return self.by_autograd(call, student, teacher, want_grad, self.backend.impl)

    def by_autograd(self, call: LossCall, student: Tensor, teacher: Tensor, want_grad: bool, loss_of: Callable):
        """(loss, parts, gradient or None) of a chunk from ``loss_of(call, student, teacher) -> (loss, parts)`` and,
        with ``want_grad``, autograd on sub-chunks of ``loss_rows`` rows, whose gradients overwrite ``student``."""
        losses, parts = [], []
        step = self.loss_rows if want_grad else student.shape[0]
        for start in range(0, student.shape[0], step):
            rows = slice(start, start + step)
            part = student[rows].detach().requires_grad_(want_grad)
            with torch.enable_grad() if want_grad else torch.no_grad():
                loss, loss_parts = loss_of(call.rows(rows.start, rows.stop), part, teacher[rows])
            if want_grad:
                (grad,) = torch.autograd.grad(loss, part, torch.ones_like(loss))
                student[rows] = grad
            losses.append(loss.detach())
            parts.append(loss_parts)
        return _total(losses, call.reduction), _total(parts, call.reduction), student if want_grad else None


@dataclass
class _CrossVocabHeads(_Heads):
    """The chunks of ``linear_cross_vocab_loss``: the student's logits [rows, Vs], the teacher's [rows, Vt] (a
    constant), and the cross-vocabulary loss of the two (kdkernels/cross_vocab.py) with its gradient, from the
    backend's fused op (``fused``), else from its ``cross_vocab`` by autograd."""

    classes: tuple | None = None  # hybrid's (VocabMap.classes), None for uld

    def __post_init__(self):
        self.sparse, self.inplace = False, None
        self.width = max(self.student.weight.shape[0], self.teacher.weight.shape[0])
        self.fused = self.backend.cross_vocab_op

    def chunk(self, start: int, stop: int, student_hidden: Tensor, want_grad: bool, work: _Workspace):
        """_Heads.chunk's (loss, parts, None, gradient or None, None, None)."""
        call = self.call.rows(start, stop)
        teacher = self.teacher_logits(start, stop, work)
        s, capped = self.student_logits(start, stop, student_hidden, self.student.weight.shape[0], want_grad, work)
        if want_grad and self.fused is not None:
            loss, parts, grad, _ = run_cross_vocab(self.fused, s, teacher, (None, None), call, self.classes, True)
        else:
            loss, parts, grad = self.by_autograd(call, s, teacher, want_grad, self._loss_of)
        del teacher
        return loss, parts, None, None if grad is None else self.student.backward_(grad, capped), None, None

    def _loss_of(self, call: LossCall, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        return self.backend.cross_vocab(call, student, teacher, (None, None), self.classes)


def _entropy(s: Tensor, temperature: float) -> Tensor:
    """-sum_j q_j log q_j of q = softmax(s / T) per row, as lse(z) - sum_j q_j z_j with z = s / T: two [rows, V]
    buffers (z and q; the row dot products by bmm)."""
    z = s / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    q = (z - lse).exp_()
    return lse.squeeze(-1) - torch.bmm(q.unsqueeze(1), z.unsqueeze(2)).reshape(-1)


def _total(values: list, reduction: str) -> Tensor:
    """The sum of reduced chunk values (losses [] or parts [2]), or their rows put together (reduction="none")."""
    return torch.cat(values, -1) if reduction == "none" else torch.stack(values).sum(0)


# Rows of the weight per matmul of a split accumulation (``_SplitGradWeight``): a float32 slice of about 8 MB.
SPLIT_SLICE_BYTES = 8 << 20


@torch.compiler.assume_constant_result
def _has_split_accumulate() -> bool:
    """Whether the extension's kdkernels::split_accumulate_ is loaded (a constant to torch.compile)."""
    return hasattr(torch.ops.kdkernels, "split_accumulate_")


class _SplitGradWeight:
    """A bfloat16 weight's gradient accumulated in float32 as two 16-bit halves (``kdkernels::split_accumulate_``):
    ``high`` (bfloat16, the accumulator's top bits, rounded at the last chunk: the returned gradient) and ``low``
    (int16, its bottom bits), so the accumulator costs half the float32 one beyond the gradient, with the same sums.
    Each chunk's product G.T @ hidden goes through a float32 slice of SPLIT_SLICE_BYTES at a time."""

    def __init__(self, weight: Tensor):
        self.high = torch.zeros_like(weight)
        self.low = torch.zeros(weight.shape, dtype=torch.int16, device=weight.device)
        rows = max(1, SPLIT_SLICE_BYTES // (4 * weight.shape[1]))
        self.slice = torch.empty(rows, weight.shape[1], device=weight.device)

    @staticmethod
    def usable(weight: Tensor, hidden: Tensor) -> bool:
        """Whether the split applies: bfloat16 weight and hidden states on the CPU, with MKL's bfloat16 GEMM and the
        extension's op."""
        cpu_bf16 = weight.dtype == hidden.dtype == torch.bfloat16 and weight.device.type == "cpu"
        return cpu_bf16 and _has_mkl_gemm(torch.bfloat16) and _has_split_accumulate()

    def add(self, g_t: Tensor, hidden: Tensor, last: bool) -> None:
        """+= g_t @ hidden for g_t [V, rows] (a transposed view) and hidden [rows, H]; ``last`` rounds."""
        for start in range(0, len(self.high), len(self.slice)):
            stop = min(start + len(self.slice), len(self.high))
            part = self.slice[: stop - start]
            torch.ops.kdkernels.low_precision_gemm_(part, g_t[start:stop], hidden, 0.0)
            torch.ops.kdkernels.split_accumulate_(self.high[start:stop], self.low[start:stop], part, last)


class _HeadGrads:
    """One head's gradients over the chunks: hidden states (per chunk), weight and bias (accumulated in float32;
    a bfloat16 weight's in two halves where ``_SplitGradWeight`` applies), each where ``need`` asks for it."""

    def __init__(self, hidden: Tensor, head: _Head, need: tuple[bool, bool, bool]):
        self.hidden, self.weight = hidden, head.weight.detach()
        device = self.weight.device
        self.h = torch.empty_like(hidden) if need[0] else None
        self.split = _SplitGradWeight(self.weight) if need[1] and _SplitGradWeight.usable(self.weight, hidden) else None
        if self.split is not None:
            self.w = self.split.high
        else:
            self.w = torch.zeros(self.weight.shape, dtype=torch.float32, device=device) if need[1] else None
        self.b = torch.zeros(self.weight.shape[0], dtype=torch.float32, device=device) if need[2] else None

    def add(self, g: Tensor, start: int, stop: int, work: _Workspace) -> None:
        """Rows [start, stop) of d loss / d (hidden @ weight.T + bias), ``g`` (float32)."""
        weight, hidden = self.weight, self.hidden
        # Low-precision weights: the matmuls take the gradient in their dtype (one cast, counted by chunk_rows).
        g_mm = g if weight.dtype == torch.float32 else work.take("low", len(g), g.shape[1], weight.dtype).copy_(g)
        if self.h is not None and weight.dtype == hidden.dtype:
            torch.mm(g_mm, weight, out=self.h[start:stop])
        elif self.h is not None:
            self.h[start:stop] = torch.mm(g_mm, weight).to(hidden.dtype)
        if self.split is not None:
            self.split.add(g_mm.t(), hidden[start:stop], stop == len(hidden))
        elif self.w is not None:
            low = hidden.dtype == weight.dtype and _accumulates_into_f32(g.device, weight.dtype)
            _accumulate_f32(self.w, (g_mm if low else g).t(), hidden[start:stop])
        if self.b is not None:
            self.b += g.sum(0)

    def grads(self) -> list:
        return [self.h, self.w, self.b]

    @staticmethod
    def held_bytes(hidden: Tensor, weight: Tensor, need_weight: bool) -> int:
        """Bytes of the weight gradient's accumulator beyond the returned gradient: none for a float32 weight (the
        accumulator is the gradient), the low half where ``_SplitGradWeight`` applies, else a float32 copy."""
        if not need_weight or weight.dtype == torch.float32:
            return 0
        return weight.numel() * (2 if _SplitGradWeight.usable(weight, hidden) else 4)


def _run(p: _Heads, hidden: Tensor, rows: int, need: tuple[bool, ...], grad_rows: Tensor | None):
    """Loss, parts and the student's entropy per row (empty unless asked) over all chunks and, when ``need`` asks,
    (grad_hidden, grad_weight, grad_bias, grad_temperature, grad_teacher_hidden, grad_teacher_weight,
    grad_teacher_bias); ``grad_rows`` [N] scales each row's gradient (reduction="none")."""
    n = hidden.shape[0]
    weight = p.student.weight.detach()
    want_grad = any(need)
    student = _HeadGrads(hidden, p.student, need[:3])
    teacher = _HeadGrads(p.teacher_hidden, p.teacher, need[4:]) if any(need[4:]) else None
    grad_t = torch.zeros((), dtype=torch.float32, device=weight.device) if need[3] else None
    losses, parts, entropies = [], [], []
    work = _Workspace(min(rows, n), hidden.device)
    # Autocast would run the chunk matmuls in low precision: they already use the weights' dtype with float32
    # accumulation, as the fused kernels do.
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            loss, loss_parts, entropy, g, dtemp, g_teacher = p.chunk(start, stop, hidden, want_grad, work)
            losses.append(loss)
            parts.append(loss_parts)
            entropies.append(entropy)
            if g is None:
                continue
            if grad_t is not None:
                grad_t += (dtemp * grad_rows[start:stop]).sum() if grad_rows is not None else dtemp.sum()
            for head, grad in ((student, g), (teacher, g_teacher)):
                if head is not None:
                    if grad_rows is not None:
                        grad.mul_(grad_rows[start:stop, None])
                    head.add(grad, start, stop, work)
            del g, g_teacher  # this chunk's buffers go before the next chunk's are allocated
    entropy = torch.cat(entropies) if p.entropy and entropies else hidden.new_zeros(0, dtype=torch.float32)
    if not losses:  # no rows
        rows_shape = (0,) if p.call.reduction == "none" else ()
        return (
            torch.zeros(rows_shape, device=hidden.device),
            torch.zeros((2, *rows_shape), device=hidden.device),
            entropy,
            *student.grads(),
            grad_t,
            *(teacher.grads() if teacher else [None] * 3),
        )
    return (
        _total(losses, p.call.reduction),
        _total(parts, p.call.reduction),
        entropy,
        *student.grads(),
        grad_t,
        *(teacher.grads() if teacher else [None] * 3),
    )


class LinearDistillFunction(torch.autograd.Function):
    """Forward: the loss and (reduction != "none") every needed gradient; backward: scale them by grad_output."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        temperature,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        p,
        rows,
        need,
    ):
        ctx.p, ctx.rows, ctx.need, ctx.consumed = p, rows, need, False
        ctx.temperature_dtype = None if temperature is None else temperature.dtype
        hidden = student_hidden.detach()
        if p.call.reduction == "none":
            loss, parts, entropy, *_ = _run(p, hidden, rows, (False,) * len(need), None)
            # Saved so that autograd refuses a backward after any of them changed in place (backward recomputes).
            ctx.save_for_backward(hidden, *p.tensors())
        else:
            loss, parts, entropy, *grads = _run(p, hidden, rows, need, None)
            ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(parts, entropy)
        return loss, parts, entropy

    @staticmethod
    def backward(ctx, grad_output, _grad_parts, _grad_entropy):
        p = ctx.p
        if p.call.reduction == "none":
            hidden = ctx.saved_tensors[0]
            p = replace(p, entropy=False)  # (logging only: not recomputed)
            grads = _run(p, hidden, ctx.rows, ctx.need, grad_output.reshape(-1).float())[3:]
        else:
            if ctx.consumed:
                raise RuntimeError(
                    "kdkernels: the fused-linear loss's saved gradients were already used; backward "
                    "through it twice (retain_graph=True) is not supported"
                )
            ctx.consumed = True
            grads = list(ctx.saved_tensors)
            # In place, skipped when grad_output is exactly 1 (no device sync on CUDA): no copy of a weight's grad.
            for i, grad in enumerate(grads):
                if grad is not None and grad.dim() == 2:
                    p.backend.scale_rows(grad, grad_output)
                elif grad is not None:
                    grads[i] = grad * grad_output
        # (hidden, weight, bias, T, teacher hidden, weight, bias), each in its input's dtype
        like = (
            None,
            p.student.weight,
            p.student.bias,
            None,
            None,
            None if p.teacher is None else p.teacher.weight,
            None if p.teacher is None else p.teacher.bias,
        )
        grads = [g if g is None or x is None else g.to(x.dtype) for g, x in zip(grads, like)]
        if grads[3] is not None:
            grads[3] = grads[3].to(ctx.temperature_dtype)
        return (*grads, None, None, None)


def _check_matrix(name: str, x: object, rows: int | None, cols: int | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a torch.Tensor of float32, bfloat16, float16 or float64, got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    want = [d for d in (rows, cols) if d is not None]
    if x.dim() != len(want) or any(a != b for a, b in zip(x.shape, want) if b != -1):
        shape = ", ".join("?" if d == -1 else str(d) for d in want)
        raise ValueError(f"{name} must have shape [{shape}], got {tuple(x.shape)}")


def _positive(name: str, value, kind=numbers.Real):
    """``value`` (a NumPy scalar as the Python number it is) once it is a positive finite ``kind``."""
    value = as_number(value)
    if isinstance(value, bool) or not isinstance(value, kind) or not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{name} must be a positive {'integer' if kind is numbers.Integral else 'number'}, got {value!r}"
        )
    return value


# Long: its steps in order (checks, the chunk plan, the autograd Function, the result), each a few lines.
def linear_distill_loss(
    method: str,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | SparseTeacher,
    teacher_weight: Tensor | None,
    target: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    return_entropy: bool = False,
    mask: Tensor | None = None,
    backend: str = "auto",
    **options,
) -> Tensor:
    """``distill_loss(method, student_logits, teacher_logits, target, ...)`` on the logits of two linear heads,
    ``logits = hidden @ weight.T + bias``, computed in row chunks so that neither [N, V] logits tensor exists.

    Args:
        student_hidden: [..., H_s]; student_weight: [V, H_s]; student_bias: [V] or None. Gradients flow to all three.
        teacher_hidden: [..., H_t] with the student's leading shape; teacher_weight: [V_t, H_t] with V_t >= V
            (classes past V are the student's logit -inf: module docstring); teacher_bias: [V_t] or None. The
            teacher is a constant unless teacher_hidden requires grad (a teacher that learns): then the gradient
            reaches teacher_hidden and, where they require grad, teacher_weight and teacher_bias, from the fused
            backends' full ops. Or a ``SparseTeacher`` with teacher_weight=None.
        target, mask, backend, **options (the loss options and the method's hyperparameters): as in
            ``distill_loss`` (a learnable temperature, a 0-d
            tensor that requires grad, gets d loss / d T from the fused backends' full ops; standardize z-scores
            each model's logits, after its logit scale and softcap; the cross-entropy term is the student head's,
            in the same pass); reductions and the batchmean denominator are those of the whole batch.
        student_logit_scale, teacher_logit_scale: each model's logits are ``scale * (hidden @ weight.T + bias)``
            (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), before the softcap.
        softcap, teacher_softcap: c applies c * tanh(logits / c) to the student's, resp. the teacher's, logits
            (Gemma's final-logit softcapping), with its gradient; None (default) leaves them uncapped.
        return_entropy: also return the student's entropy at T per row (leading shape, float32, 0 on the rows left
            out; not differentiable), for logging: ``(result, entropy)``. It costs one softmax over each chunk.
        memory_budget: bytes of chunk temporaries to size chunks from (default ``default_budget``); chunk_size:
            rows per chunk instead (the loss's autograd sub-chunks still follow the budget).

    Returns:
        float32 loss: 0-d, or the leading shape for reduction="none"; a ``LossParts`` with ``return_parts``;
        ``(that, entropy)`` with ``return_entropy``.
    """
    temperature, temperature_tensor = split_temperature(options.pop("temperature", None))
    settings = resolve(method, temperature=temperature, **options)
    sparse = isinstance(teacher_hidden, SparseTeacher)
    learn_temperature = full_gradient(None, temperature_tensor)
    if learn_temperature and sparse:
        raise ValueError(
            "a SparseTeacher is a constant and its temperature too: pass a number as temperature "
            "(or the teacher's hidden states and weight for a learnable temperature)"
        )
    # A teacher that learns: its hidden states require grad (its weight alone, a frozen head's, does not decide).
    teacher_grad = not sparse and full_gradient(teacher_hidden, None)
    v = _check_head("student", student_hidden, student_weight, student_bias)
    leading, device = student_hidden.shape[:-1], student_hidden.device
    if sparse:
        if teacher_weight is not None or teacher_bias is not None or teacher_softcap is not None:
            raise ValueError(
                "a SparseTeacher is the teacher's output: pass teacher_weight=None (and no "
                "teacher_bias or teacher_softcap)"
            )
        if teacher_logit_scale != 1.0:
            raise ValueError("a SparseTeacher is the teacher's output: teacher_logit_scale does not apply to it")
        v_t = v
    else:
        v_t = _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, leading)
        if v_t < v:
            raise ValueError(f"teacher_weight must have at least the student's V={v} rows (classes), got {v_t}")
    heads = _checked_heads(
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias),
        (softcap, teacher_softcap, student_logit_scale, teacher_logit_scale),
    )
    call = settings.bind(target, leading, v, device, mask)
    n = leading.numel()
    if sparse:
        teacher_hidden = check_sparse(teacher_hidden, settings, leading, v, device, call.valid)
    else:
        teacher_hidden = teacher_hidden.reshape(n, teacher_hidden.shape[-1])
    p = _Heads(
        call,
        backends.select_backend(backend, student_weight),
        heads[0],
        None if sparse else heads[1],
        teacher_hidden,
        return_entropy,
        learn_temperature,
        teacher_grad,
    )
    if learn_temperature or teacher_grad:
        check_temperature_device(temperature_tensor, device)
        if p.backend.full_ops is None:
            raise ValueError(
                f"a learnable temperature or teacher in linear_distill_loss needs a fused backend (its "
                f"full ops), got backend={p.backend.name!r}; use backend='auto' or a name from "
                f"kdkernels.available_backends()"
            )
    # (the full op writes the gradient beside the logits: one more buffer; the teacher's gradient one more, and its
    # capped logits with a teacher softcap)
    full_buffers = (learn_temperature or teacher_grad) + teacher_grad * (1 + (teacher_softcap is not None))
    extra = (softcap is not None) + 2 * return_entropy + full_buffers
    per_row = chunk_row_bytes(v, v_t, student_weight.dtype, extra, sparse)
    need = _student_need(student_hidden, student_weight, student_bias) + (
        learn_temperature,
        teacher_grad,
        teacher_grad and teacher_weight.requires_grad,
        teacher_grad and teacher_bias is not None and teacher_bias.requires_grad,
    )
    held = _HeadGrads.held_bytes(student_hidden, student_weight, need[1])
    if need[5]:
        held += _HeadGrads.held_bytes(teacher_hidden, teacher_weight, True)
    width = v if sparse else v_t
    rows = _rows_per_chunk(p, n, chunk_size, memory_budget, per_row, p.inplace is not None, width, held)
    teachers = (None, None, None) if sparse else (teacher_hidden, teacher_weight, teacher_bias)
    hidden = student_hidden.reshape(n, student_hidden.shape[-1])
    loss, parts, entropy = LinearDistillFunction.apply(
        hidden, student_weight, student_bias, temperature_tensor, *teachers, p, rows, need
    )
    result = finish(call, loss, parts, leading)
    return (result, entropy.reshape(leading)) if return_entropy else result


def _check_head(model: str, hidden: object, weight: object, bias: object, leading: torch.Size | None = None) -> int:
    """The number of classes V of ``model``'s head once its ``hidden`` [..., H] (the teacher's with the student's
    ``leading`` shape), ``weight`` [V, H] and ``bias`` ([V] or None) are checked."""
    check_float_tensor(f"{model}_hidden", hidden)
    if leading is not None and hidden.shape[:-1] != leading:
        raise ValueError(
            f"{model}_hidden must have the student's leading shape {tuple(leading)} + (H_t,), got {tuple(hidden.shape)}"
        )
    _check_matrix(f"{model}_weight", weight, -1, hidden.shape[-1])
    if bias is not None:
        _check_matrix(f"{model}_bias", bias, weight.shape[0], None)
    return weight.shape[0]


def _checked_heads(tensors: tuple, head_options: tuple) -> tuple[_Head, _Head | None]:
    """The student's and teacher's ``_Head`` from ``tensors`` (hidden, weight, bias of each; a teacher's hidden
    states may be a SparseTeacher, whose weight is None) and ``head_options`` (softcap, teacher_softcap,
    student_logit_scale, teacher_logit_scale), once all are on one device and the options are checked."""
    on = [x for x in tensors if isinstance(x, torch.Tensor)]
    if isinstance(tensors[3], SparseTeacher):
        on.append(tensors[3].values)
    if any(x.device != tensors[0].device for x in on):
        raise ValueError(f"all inputs must be on one device, got {sorted({str(x.device) for x in on})}")
    caps = [None if c is None else _positive(name, c) for name, c in zip(("softcap", "teacher_softcap"), head_options)]
    scales = []
    for name, scale in zip(("student_logit_scale", "teacher_logit_scale"), head_options[2:]):
        scale = as_number(scale)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"{name} must be a finite number, got {scale!r}")
        scales.append(float(scale))
    student = _Head(tensors[1], tensors[2], scales[0], caps[0])
    return student, None if tensors[4] is None else _Head(tensors[4], tensors[5], scales[1], caps[1])


def _student_need(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    """Which of the student's hidden states, weight and bias get a gradient."""
    return tuple(torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias))


def _rows_per_chunk(
    p: _Heads,
    n: int,
    chunk_size: object,
    memory_budget: object,
    per_row: int,
    fused: bool,
    loss_width: int,
    held: int,
) -> int:
    """The rows of a chunk (``chunk_size``, else the fewest equal chunks that ``memory_budget`` bytes allow, default
    ``default_budget``, which ``held`` bytes beside the chunks reduce), and ``p.loss_rows`` (``rows_in_budget``) for
    ``per_row`` bytes of chunk buffers a row; ``fused``: the backend computes the gradient without autograd."""
    if chunk_size is not None:
        chunk_size = _positive("chunk_size", chunk_size, numbers.Integral)
    if memory_budget is not None:
        memory_budget = _positive("memory_budget", memory_budget, numbers.Integral)
    else:
        memory_budget = default_budget(p.student.weight.device, fused, n * per_row, held)
    rows, p.loss_rows = rows_in_budget(memory_budget, per_row, fused, loss_width)
    if chunk_size is None:  # the fewest chunks the budget allows, of equal size (no short last chunk)
        chunk_size = -(-n // -(-n // rows)) if n else rows
    return max(1, min(chunk_size, n))


def linear_cross_vocab_loss(
    method: str,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None = None,
    *,
    vocab_map: VocabMap | tuple[Tensor, Tensor] | None = None,
    teacher_temperature: float | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    mask: Tensor | None = None,
    backend: str = "auto",
    **options,
) -> Tensor:
    """``cross_vocab_loss(method, student_logits, teacher_logits, target, ...)`` on the logits of two linear heads
    with their own vocabularies, ``logits = hidden @ weight.T + bias``, computed in row chunks so that neither the
    [N, Vs] nor the [N, Vt] logits exist (docs/llm.md, "Teachers with another tokenizer").

    Args:
        student_hidden: [..., H_s]; student_weight: [Vs, H_s]; student_bias: [Vs] or None. Gradients flow to all three.
        teacher_hidden: [..., H_t] with the student's leading shape (aligned rows); teacher_weight: [Vt, H_t];
            teacher_bias: [Vt] or None. A constant: teacher_hidden must not require grad.
        method, target, vocab_map, teacher_temperature, mask, backend, **options (temperature, reduction,
            ignore_index, normalizer, ce_weight, distill_weight, return_parts and the method's hyperparameters): as in
            ``cross_vocab_loss``, whose backends compute each chunk (a fused op where the backend has one for rows
            this wide, else by autograd); the reductions and the batchmean denominator are the whole batch's. No
            log scales (merged groups of tokens need the logits of other rows).
        student_logit_scale, teacher_logit_scale, softcap, teacher_softcap, memory_budget, chunk_size: as in
            ``linear_distill_loss`` (a chunk's buffers: ``cross_vocab_row_bytes``).

    Returns:
        float32 loss: 0-d, or the leading shape for reduction="none"; a ``LossParts`` with ``return_parts``.
    """
    settings = resolve_cross_vocab(method, teacher_temperature=teacher_temperature, **options)
    if full_gradient(teacher_hidden, None):
        raise ValueError(
            "linear_cross_vocab_loss takes the teacher as a constant: pass teacher_hidden.detach() (or the teacher's "
            "logits to cross_vocab_loss, whose reference backend differentiates them)"
        )
    vs = _check_head("student", student_hidden, student_weight, student_bias)
    leading, device = student_hidden.shape[:-1], student_hidden.device
    vt = _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, leading)
    heads = _checked_heads(
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias),
        (softcap, teacher_softcap, student_logit_scale, teacher_logit_scale),
    )
    settings, classes = with_vocab_map(settings, vocab_map, vs, vt, device)
    call = settings.bind(target, leading, vs, device, mask)
    n = leading.numel()
    teacher_hidden = teacher_hidden.reshape(n, teacher_hidden.shape[-1])
    chosen = backends.select_backend(backend, student_weight, entry="cross_vocab")
    p = _CrossVocabHeads(call, chosen, *heads, teacher_hidden, classes=classes)
    per_row = cross_vocab_row_bytes(vs, vt, student_weight.dtype, softcap is not None)
    need = _student_need(student_hidden, student_weight, student_bias) + (False,) * 4
    held = _HeadGrads.held_bytes(student_hidden, student_weight, need[1])
    rows = _rows_per_chunk(p, n, chunk_size, memory_budget, per_row, p.fused is not None, p.width, held)
    hidden = student_hidden.reshape(n, student_hidden.shape[-1])
    teachers = (teacher_hidden, teacher_weight, teacher_bias)
    loss, parts, _ = LinearDistillFunction.apply(hidden, student_weight, student_bias, None, *teachers, p, rows, need)
    return finish(call, loss, parts, leading)
