"""The custom ops of the fused backends: their schema, fake (meta) functions and autograd.

Every fused backend ``<backend>`` ("cpu", "cuda": the C++ extension; "triton") exposes one op per family:

    kdkernels::<family>_<backend>(student [N, V], teacher [N, V], <the kernel call>, with_grad) -> (loss, parts, grad)
    kdkernels::<family>_<backend>_(student [N, V] contiguous, teacher, <the kernel call>) -> (loss, parts)

where <the kernel call> is ``kernel_call.SCHEMA_ARGS``: the fields of ``KernelCall`` (kernel_call.py, the one list of
what a fused op receives: target, denominator, the plan's code and params, and the options as two lists of numbers).
The loss is distill_weight * (the plan's loss) + ce_weight * (the student's cross-entropy against the target at
T = 1), which is computed with ``with_ce`` (a target is then required); with ``standardize`` both models' rows are
z-scored before the temperature (the cross-entropy keeps the raw logits). ``parts`` holds the two terms unweighted,
[distill, ce] (ce 0 without ``with_ce``), not differentiable. With ``reduce`` the loss and parts are sum(rows) /
denominator (sum when there is none) and the gradient rows are already scaled by 1 / denominator; otherwise they are
per row ([N], [2, N]). ``grad`` is d loss / d student in the student's dtype (written in the same launch as the
loss), or an empty tensor when ``with_grad`` is False. The in-place sibling overwrites the student logits with that
gradient (the fused-linear path, which needs no logits afterwards) and has no autograd. The full sibling

    kdkernels::<family>_<backend>_full(student, teacher, <the kernel call>, teacher_grad)
        -> (loss, parts, grad, teacher_grad, temperature_grad)

is the full gradient (a learnable temperature, a teacher that requires grad: docs/losses.md, "Learnable temperature
and the teacher's gradient"): from the same launch, grad, d loss / d teacher in the teacher's dtype (an empty tensor
unless ``teacher_grad``) and d loss / d T per row ([N], float32 or float64), all scaled like grad; ``full_backend``
applies them in an autograd Function.

Backward multiplies the saved gradient in place by grad_output with the backend's ``scale_rows``, which skips rows
whose factor is exactly 1 on the device: ``loss.backward()`` on a reduced loss costs no pass over the gradient.
The saved gradient is consumed by that, so a second backward through the same graph raises an error, and so does a
double backward (create_graph=True), which the fused gradient cannot support. A traced backward (torch.compile)
multiplies out of place instead.

Under torch.compile the temperature is a 0-d tensor whose value the graph does not know (arguments.py): ``run_op``
then calls the op through ``kdkernels::family_at_temperature`` (and its in-place and full siblings), which take the
op's name and the temperature tensor in place of the float, and read it when they run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .kernel_call import SCALARS, SCHEMA_ARGS, KernelCall, op_args

# The schemas above, as csrc/kdkernels.cpp defines them for the extension's ops.
_FAMILY_ARGS = f"Tensor teacher, {SCHEMA_ARGS}"
SCHEMA = f"(Tensor student, {_FAMILY_ARGS}, bool with_grad) -> (Tensor, Tensor, Tensor)"
INPLACE_SCHEMA = f"(Tensor(a!) student, {_FAMILY_ARGS}) -> (Tensor, Tensor)"
FULL_SCHEMA = f"(Tensor student, {_FAMILY_ARGS}, bool teacher_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
# Inputs of the out-of-place schema: student, teacher, the kernel call's arguments, with_grad.
NUM_INPUTS = 2 + len(SCHEMA_ARGS.split(",")) + 1
# The at-temperature ops (module docstring), per suffix of the op they run: its schema after the op's name and the
# temperature tensor, whose value replaces the scalars' temperature when they run.
AT_SCHEMAS = {
    suffix: "(str op, Tensor temperature, " + schema[1:]
    for suffix, schema in (("", SCHEMA), ("_", INPLACE_SCHEMA), ("_full", FULL_SCHEMA))
}
_TEMPERATURE = SCALARS.index("temperature")


def _losses_like(student, teacher, call_args):
    """The loss and parts outputs of a family op."""
    return _losses(student, teacher, KernelCall.from_op_args(*call_args).reduce)


def _losses(student, teacher, reduce: bool):
    """The loss and parts outputs: 0-d and [2] if ``reduce``, else [N] and [2, N]; float64 when an input is float64
    (C++ ops), else float32."""
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    rows = () if reduce else (student.shape[0],)
    return student.new_empty(rows, dtype=dtype), student.new_empty((2, *rows), dtype=dtype)


def _fake(student, teacher, *args):
    *call_args, with_grad = args
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if with_grad else student.new_empty(0)
    return *_losses_like(student, teacher, call_args), grad


def _inplace_fake(student, teacher, *call_args):
    return _losses_like(student, teacher, call_args)


def _full_fake(student, teacher, *args):
    *call_args, teacher_grad = args
    loss, parts = _losses_like(student, teacher, call_args)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    grad_t = torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad else teacher.new_empty(0)
    return loss, parts, grad, grad_t, student.new_empty((student.shape[0],), dtype=loss.dtype)


def _keep_gradient(ctx, grad):
    """What ``_autograd``'s backward reads: the op's gradient, not yet consumed. Gradients of the outputs that are not
    used stay None: autograd would otherwise fill tensors of zeros for them on every backward (for the op's [N, V]
    grad output, a pass as costly as the kernel itself)."""
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    ctx.consumed = False


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])  # the parts and the grad output
    _keep_gradient(ctx, output[2])


def _times(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """grad [N, V] times grad_output (0-d, or [N] per row), out of place."""
    factor = grad_loss.to(grad.dtype)
    return grad * (factor.unsqueeze(-1) if factor.dim() else factor)


def _autograd(backend: str, scale_rows: Callable[[Tensor, Tensor], None]) -> Callable:
    """The backward of backend ``backend``'s family ops: the saved gradient times grad_output."""

    def backward(ctx, grad_loss, _grad_parts, _grad_grad):
        if grad_loss is None:  # only the (non-differentiable) grad output was used
            return (None,) * NUM_INPUTS
        if ctx.consumed:  # (before saved_tensors, which the first backward's in-place scaling made stale)
            raise RuntimeError(
                "kdkernels: the fused loss's saved gradient was already used; backward through the "
                "same fused loss twice (retain_graph=True) is not supported"
            )
        (grad,) = ctx.saved_tensors
        if type(grad) is not torch.Tensor:
            # Traced (torch.compile, AOTAutograd: fake or functional tensors): a forward output mutated in backward
            # cannot be partitioned, so the traced graph multiplies out of place.
            return (_times(grad, grad_loss),) + (None,) * (NUM_INPUTS - 1)
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"kdkernels: backend={backend!r} computes the gradient inside its forward kernel, so it cannot be "
                f"differentiated again (create_graph=True: double backward, gradient penalties, Hessian-vector "
                f"products); use backend='reference', whose autograd graph supports it"
            )
        ctx.consumed = True
        scale_rows(grad, grad_loss)
        return (grad,) + (None,) * (NUM_INPUTS - 1)

    return backward


def _run_at(op: str, temperature: Tensor, student: Tensor, teacher: Tensor, *args):
    """The kdkernels op ``op`` with the value of ``temperature`` in its scalars."""
    target, denominator, code, params, scalars, flags, *flag = args
    scalars = list(scalars)
    scalars[_TEMPERATURE] = float(temperature)
    return getattr(torch.ops.kdkernels, op).default(
        student, teacher, target, denominator, code, params, scalars, flags, *flag
    )


def _at_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs[2:], output)


def _at_backward(ctx, grad_loss, _grad_parts, _grad_grad):
    """Out of place: the at-temperature ops run under torch.compile, whose traced backward does not mutate."""
    (grad,) = ctx.saved_tensors
    return (None, None, None if grad_loss is None else _times(grad, grad_loss)) + (None,) * (NUM_INPUTS - 1)


def _define_at_temperature_ops() -> None:
    """Defines the at-temperature ops (AT_SCHEMAS)."""
    fakes = {"": _fake, "_": _inplace_fake, "_full": _full_fake}
    for suffix, schema in AT_SCHEMAS.items():
        name = f"kdkernels::family_at_temperature{suffix}"
        torch.library.define(name, schema)
        torch.library.impl(name, "CompositeExplicitAutograd")(_run_at)
        torch.library.register_fake(name)(lambda op, temperature, *args, fake=fakes[suffix]: fake(*args))
    torch.library.register_autograd("kdkernels::family_at_temperature", _at_backward, setup_context=_at_setup_context)


_define_at_temperature_ops()
_AT_CALLS: dict = {}  # family op -> (its at-temperature op, its name), filled by _overloads


def define_family_ops(
    family: str, backend: str, launch: Callable, launch_inplace: Callable, launch_full: Callable, scale_rows: Callable
) -> tuple[Callable, Callable, Callable]:
    """Defines ``kdkernels::<family>_<backend>`` and its in-place and full siblings in Python (the schemas above),
    running ``launch``, ``launch_inplace`` and ``launch_full`` (each called with the op's arguments), with fake
    functions and autograd."""
    name = f"kdkernels::{family}_{backend}"
    op = torch.library.custom_op(name, mutates_args=(), schema=SCHEMA)(launch)
    op.register_fake(_fake)
    op.register_autograd(_autograd(backend, scale_rows), setup_context=_setup_context)
    op_inplace = torch.library.custom_op(name + "_", mutates_args=("student",), schema=INPLACE_SCHEMA)(launch_inplace)
    op_inplace.register_fake(_inplace_fake)
    torch.library.custom_op(name + "_full", mutates_args=(), schema=FULL_SCHEMA)(launch_full).register_fake(_full_fake)
    return _overloads(family, backend)


def attach_family_ops(family: str, backend: str, scale_rows: Callable) -> tuple[Callable, Callable, Callable]:
    """Adds the fake functions and autograd to ``kdkernels::<family>_<backend>`` and its in-place and full
    siblings, whose schemas and kernels come from C++ (csrc/kdkernels.cpp)."""
    name = f"kdkernels::{family}_{backend}"
    torch.library.register_fake(name)(_fake)
    torch.library.register_autograd(name, _autograd(backend, scale_rows), setup_context=_setup_context)
    torch.library.register_fake(name + "_")(_inplace_fake)
    torch.library.register_fake(name + "_full")(_full_fake)
    return _overloads(family, backend)


def _overloads(family: str, backend: str) -> tuple[Callable, Callable, Callable]:
    """The family op of ``backend`` and its in-place and full siblings, each entered in _AT_CALLS."""
    overloads = []
    for suffix in AT_SCHEMAS:
        name = f"{family}_{backend}{suffix}"
        overloads.append(getattr(torch.ops.kdkernels, name).default)
        _AT_CALLS[overloads[-1]] = (getattr(torch.ops.kdkernels, f"family_at_temperature{suffix}").default, name)
    return tuple(overloads)


def run_op(op, student: Tensor, teacher: Tensor, call, *flag):
    """``op`` (a family op, its in-place or its full sibling) on ``call`` (arguments.LossCall) and ``flag``
    (with_grad or teacher_grad): with a temperature tensor (torch.compile), through its at-temperature op."""
    if not isinstance(call.temperature, Tensor):
        return op(student, teacher, *op_args(call), *flag)
    at, name = _AT_CALLS[op]
    return at(name, call.temperature, student, teacher, *op_args(call), *flag)


class _EagerFamilyOp(torch.autograd.Function):
    """A family op with its gradient, run eagerly: the op's kernel called below autograd (one dispatcher call) and
    the op's own backward (``_autograd``). The op's registered autograd (torch.library's Python wrapper) costs as much
    again as the whole rest of a call at vision batch sizes; torch.compile traces the op itself."""

    @staticmethod
    def forward(ctx, student, teacher, op, args, op_backward):
        with torch._C._AutoDispatchBelowAutograd():
            loss, parts, grad = op(student, teacher, *args, True)
        ctx.mark_non_differentiable(parts)
        _keep_gradient(ctx, grad)
        ctx.op_backward = op_backward
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        return ctx.op_backward(ctx, grad_loss, None, None)[0], None, None, None, None


def family_backend(backend: str, ops: dict, scale_rows: Callable) -> Callable:
    """The impl of a fused backend (backends.Backend) calling its family ``ops`` ({"divergence": op, ...}), whose
    gradients ``scale_rows`` scales in backward."""
    op_backward = _autograd(backend, scale_rows)

    def impl(call, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        op = ops[call.plan.family]
        with_grad = student.requires_grad and torch.is_grad_enabled()
        if torch.compiler.is_compiling():
            loss, parts, _ = run_op(op, student, teacher, call, with_grad)
            return loss, parts
        args = op_args(call)
        if with_grad:
            loss, parts = _EagerFamilyOp.apply(student, teacher, op, args, op_backward)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                loss, parts, _ = op(student, teacher, *args, False)
        return loss, parts

    return impl


def scale_full_gradients(
    grad_loss: Tensor,
    grad: Tensor,
    grad_teacher: Tensor | None,
    grad_temperature: Tensor | None,
    temperature_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The out-of-place backward of a full gradient (a traced one, consume_full_gradients): the saved
    d loss / d student and d loss / d teacher (None when the teacher does not learn) times grad_output (0-d, or per
    row [N]), each rounded once to its dtype, and d loss / d T, the rows' d loss / d T summed with it (None without a
    temperature tensor)."""
    factor = grad_loss.unsqueeze(-1) if grad_loss.dim() else grad_loss
    d_teacher = None if grad_teacher is None else (grad_teacher * factor).to(grad_teacher.dtype)
    d_temperature = _temperature_gradient(grad_loss, grad_temperature, temperature_dtype)
    return (grad * factor).to(grad.dtype), d_teacher, d_temperature


def consume_full_gradients(
    ctx, grad_loss: Tensor, scale_rows: Callable[[Tensor, Tensor], None]
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Backward of a full gradient (_FullGradient, and kdkernels.parallel's) whose forward saved (d loss / d student,
    d loss / d teacher or None, the rows' d loss / d T or None) and set ctx.consumed = False and
    ctx.temperature_dtype: the kept gradients scaled by grad_output in place with ``scale_rows``, as ``_autograd``
    does (a traced backward out of place), and d loss / d T."""
    if ctx.consumed:  # (before saved_tensors, which the first backward's in-place scaling made stale)
        raise RuntimeError(
            "kdkernels: the fused loss's saved gradient was already used; backward through the "
            "same fused loss twice (retain_graph=True) is not supported"
        )
    saved = ctx.saved_tensors
    # Traced (torch.compile: dynamo traces this backward too, AOTAutograd runs it on fake tensors): out of place, as
    # in _autograd.
    if torch.compiler.is_compiling() or type(saved[0]) is not torch.Tensor:
        return scale_full_gradients(grad_loss, *saved, ctx.temperature_dtype)
    ctx.consumed = True
    grad, grad_teacher, grad_temperature = saved
    for kept in (grad, grad_teacher):
        if kept is not None:
            scale_rows(kept, grad_loss)
    return grad, grad_teacher, _temperature_gradient(grad_loss, grad_temperature, ctx.temperature_dtype)


def _temperature_gradient(
    grad_loss: Tensor, grad_temperature: Tensor | None, temperature_dtype: torch.dtype | None
) -> Tensor | None:
    """d loss / d T: the rows' d loss / d T times grad_output, summed (None without a temperature tensor)."""
    if temperature_dtype is None or grad_temperature is None:
        return None
    return (grad_temperature * grad_loss.to(grad_temperature.dtype)).sum().to(temperature_dtype)


class _FullGradient(torch.autograd.Function):
    """A full op's loss and parts, differentiable in the student, the teacher and the temperature (a 0-d tensor):
    backward scales the gradients the op computed with the loss (rows by grad_output, in place with the backend's
    ``scale_rows`` as ``_autograd`` does; d loss / d T summed over rows with it)."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, op, call, scale_rows):
        loss, parts, grad, grad_teacher, grad_temperature = run_op(
            op, student.detach(), teacher.detach(), call, teacher.requires_grad
        )
        ctx.save_for_backward(grad, grad_teacher if teacher.requires_grad else None, grad_temperature)
        ctx.temperature_dtype = None if temperature is None else temperature.dtype
        ctx.scale_rows, ctx.consumed = scale_rows, False
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        return (*consume_full_gradients(ctx, grad_loss, ctx.scale_rows), None, None, None)


def full_backend(full_ops: dict, scale_rows: Callable) -> Callable:
    """The full-gradient impl of a fused backend (backends.Backend.full) calling its family ``full_ops``, whose
    gradients ``scale_rows`` scales in backward."""

    def full(call, student: Tensor, teacher: Tensor, temperature: Tensor | None) -> tuple[Tensor, Tensor]:
        return _FullGradient.apply(student, teacher, temperature, full_ops[call.plan.family], call, scale_rows)

    return full


# ---- the losses between two vocabularies (kdkernels/cross_vocab.py) ----------------------------------------------
#
#   kdkernels::cross_vocab_<backend>(student [N, Vs], teacher [N, Vt], student_log_scale [N]?, teacher_log_scale [N]?,
#                                    target [N]?, denominator 0-d?, classes, code, params, temperature, ignore_index,
#                                    reduce, ce_weight, distill_weight, with_ce, with_grad)
#       -> (loss, parts, grad, scale_grad)
#
# ``code`` and ``params``: a plan of methods.CROSS_VOCAB_METHODS (uld's weights as (0, 1)); ``classes``: hybrid's
# (student ids, teacher ids, unmatched student ids, unmatched teacher ids), int64, or []. The loss and parts are those
# of the family ops; ``grad`` is d loss / d student and ``scale_grad`` d loss / d student_log_scale per row ([N], the
# loss's dtype), both scaled like the loss and written by the same call (empty without ``with_grad``). The teacher is
# a constant. Under torch.compile the temperatures are tensors (arguments.py) and ``run_cross_vocab`` calls the op
# through kdkernels::cross_vocab_at_temperature(op, temperatures [T_s, T_t], <the op's arguments>), which reads them
# when it runs, as the family ops' at-temperature ops do.


# The schema above, as csrc/kdkernels.cpp defines it for the extension's op.
CROSS_VOCAB_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor? student_log_scale, Tensor? teacher_log_scale, Tensor? target, "
    "Tensor? denominator, Tensor[] classes, int code, float[] params, float temperature, int ignore_index, "
    "bool reduce, float ce_weight, float distill_weight, bool with_ce, bool with_grad) -> (Tensor, Tensor, Tensor, "
    "Tensor)"
)


CROSS_VOCAB_INPUTS = len(CROSS_VOCAB_SCHEMA.split(" -> ")[0].split(","))


def _cross_vocab_fake(student, teacher, student_log_scale, teacher_log_scale, target, denominator, classes, *rest):
    reduce, with_grad = rest[4], rest[-1]
    loss, parts = _losses(student, teacher, reduce)
    if not with_grad:
        return loss, parts, student.new_empty(0), loss.new_empty(0)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    return loss, parts, grad, loss.new_empty((student.shape[0],))


def _cross_vocab_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2], output[3])
    ctx.scale_dtype = None if inputs[2] is None else inputs[2].dtype
    ctx.num_classes = len(inputs[6])  # (backward returns one None per tensor of ``classes``)


def _cross_vocab_backward(ctx, grad_loss, *_unused):
    """The op's registered autograd, which torch.compile traces (eagerly ``_CrossVocabFunction`` runs the op and
    scales its gradient in place): out of place, as ``_at_backward``."""
    grads = [None] * CROSS_VOCAB_INPUTS
    grads[6] = [None] * ctx.num_classes
    if grad_loss is not None:
        grad, scale_grad = ctx.saved_tensors
        grads[0], grads[2] = _times(grad, grad_loss), _log_scale_gradient(scale_grad, grad_loss, ctx.scale_dtype)
    return tuple(grads)


def _log_scale_gradient(scale_grad: Tensor, grad_loss: Tensor, dtype: torch.dtype | None) -> Tensor | None:
    """d loss / d student_log_scale: the op's per-row ``scale_grad`` times grad_output, in the scale's ``dtype``
    (None without a student log scale)."""
    return None if dtype is None else (scale_grad * grad_loss.to(scale_grad.dtype)).to(dtype)


def _cross_vocab_overload(name: str) -> Callable:
    """The op ``kdkernels::<name>`` with its fake function and autograd registered."""
    torch.library.register_fake(f"kdkernels::{name}")(_cross_vocab_fake)
    torch.library.register_autograd(
        f"kdkernels::{name}", _cross_vocab_backward, setup_context=_cross_vocab_setup_context
    )
    op = getattr(torch.ops.kdkernels, name).default
    _CROSS_VOCAB_NAMES[op] = name
    return op


_CROSS_VOCAB_NAMES: dict = {}  # cross-vocabulary op -> its name, for the at-temperature op


def _cross_vocab_at_run(op: str, temperatures: Tensor, student, teacher, *args):
    """The op ``kdkernels::<op>`` with the values of ``temperatures`` (T_s, T_t) in its arguments."""
    student_scale, teacher_scale, target, denominator, classes, code, params, _, *rest = args
    t_s, t_t = temperatures.tolist()
    return getattr(torch.ops.kdkernels, op).default(
        student, teacher, student_scale, teacher_scale, target, denominator, classes, code, [t_t, *params[1:]], t_s,
        *rest,
    )  # fmt: skip


def _define_cross_vocab_at_temperature() -> Callable:
    """``kdkernels::cross_vocab_at_temperature(str op, Tensor temperatures, <CROSS_VOCAB_SCHEMA's arguments>)``:
    the cross-vocabulary op ``op`` at the temperatures [T_s, T_t] that the tensor holds when the graph runs (the
    at-temperature ops of the module docstring)."""
    name = "kdkernels::cross_vocab_at_temperature"
    torch.library.define(name, "(str op, Tensor temperatures, " + CROSS_VOCAB_SCHEMA[1:])
    torch.library.impl(name, "CompositeExplicitAutograd")(_cross_vocab_at_run)
    torch.library.register_fake(name)(lambda op, temperatures, *args: _cross_vocab_fake(*args))

    def setup_context(ctx, inputs, output):
        _cross_vocab_setup_context(ctx, inputs[2:], output)

    def backward(ctx, *grads):
        return (None, None, *_cross_vocab_backward(ctx, *grads))

    torch.library.register_autograd(name, backward, setup_context=setup_context)
    return torch.ops.kdkernels.cross_vocab_at_temperature.default


_cross_vocab_at = _define_cross_vocab_at_temperature()


def attach_cross_vocab_op(backend: str) -> Callable:
    """``kdkernels::cross_vocab_<backend>`` (schema and kernel from C++), with its fake function and autograd."""
    return _cross_vocab_overload(f"cross_vocab_{backend}")


def define_cross_vocab_op(backend: str, launch: Callable) -> Callable:
    """Defines ``kdkernels::cross_vocab_<backend>`` in Python (CROSS_VOCAB_SCHEMA), running ``launch``, with its fake
    function and autograd."""
    torch.library.define(f"kdkernels::cross_vocab_{backend}", CROSS_VOCAB_SCHEMA)
    torch.library.impl(f"kdkernels::cross_vocab_{backend}", "CompositeExplicitAutograd")(launch)
    return _cross_vocab_overload(f"cross_vocab_{backend}")


def run_cross_vocab(op, student: Tensor, teacher: Tensor, log_scales, call, classes, with_grad: bool):
    """``op`` (a cross-vocabulary op) on ``call`` (arguments.LossCall of a cross-vocabulary plan) and ``classes``:
    with the temperatures as tensors (torch.compile), through ``kdkernels::cross_vocab_at_temperature``."""
    args = cross_vocab_args(call, classes)
    if not isinstance(call.temperature, Tensor):
        return op(student, teacher, *log_scales, *args, with_grad)
    temperatures = torch.stack([call.temperature, call.plan.params.teacher_temperature])
    return _cross_vocab_at(_CROSS_VOCAB_NAMES[op], temperatures, student, teacher, *log_scales, *args, with_grad)


def cross_vocab_args(call, classes) -> tuple:
    """The arguments of a cross-vocabulary op after (student, teacher, the two log scales), with_grad aside; with
    temperature tensors (torch.compile), 1 in their places (``run_cross_vocab``)."""
    # (matched_code as an int: dynamo cannot trace float() of an IntEnum)
    params = call.plan.params._replace(matched_code=int(call.plan.params.matched_code))
    if params.matched_weight is None:  # uld: the sorted L1 of every class, alone
        params = params._replace(matched_weight=0.0, unmatched_weight=1.0)
    traced = isinstance(call.temperature, Tensor)
    if traced:
        params = params._replace(teacher_temperature=1.0)
    return (
        call.target,
        call.denominator,
        list(classes or ()),
        int(call.plan.code),
        [float(x) for x in params],
        1.0 if traced else float(call.temperature),
        call.ignore_index,
        call.reduction != "none",
        call.ce_weight,
        call.distill_weight,
        call.with_ce,
    )


class _CrossVocabFunction(torch.autograd.Function):
    """A cross-vocabulary op's loss and parts, differentiable in the student and its log scale: backward scales the
    gradients the op computed by grad_output (the student's in place, as the family ops')."""

    @staticmethod
    def forward(ctx, student, student_log_scale, teacher, teacher_log_scale, op, args, op_backward):
        with torch._C._AutoDispatchBelowAutograd():
            loss, parts, grad, scale_grad = op(student, teacher, student_log_scale, teacher_log_scale, *args, True)
        ctx.mark_non_differentiable(parts)
        _keep_gradient(ctx, grad)
        ctx.scale_grad = scale_grad
        ctx.scale_dtype = None if student_log_scale is None else student_log_scale.dtype
        ctx.op_backward = op_backward
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        d_scale = None if grad_loss is None else _log_scale_gradient(ctx.scale_grad, grad_loss, ctx.scale_dtype)
        d_student = ctx.op_backward(ctx, grad_loss, None, None)[0]
        return d_student, d_scale, None, None, None, None, None


def cross_vocab_entries(backend: str, op: Callable, scale_rows: Callable, fallback: Callable) -> dict:
    """The cross-vocabulary fields of fused backend ``backend`` (backends.Backend): ``cross_vocab_op`` (``op``) and
    the ``cross_vocab`` entry calling ``op``, whose gradient ``scale_rows`` scales in backward. ``fallback`` (the
    reference) computes what the op does not: a teacher (or teacher log scale) that requires grad (the reference's
    autograd differentiates it)."""
    op_backward = _autograd(backend, scale_rows)

    def cross_vocab(call, student: Tensor, teacher: Tensor, log_scales, classes) -> tuple[Tensor, Tensor]:
        scale, teacher_scale = log_scales
        learning_teacher = teacher.requires_grad or (teacher_scale is not None and teacher_scale.requires_grad)
        if learning_teacher:
            return fallback(call, student, teacher, log_scales, classes)
        learns = torch.is_grad_enabled() and (student.requires_grad or (scale is not None and scale.requires_grad))
        if torch.compiler.is_compiling():  # traced through the op's registered autograd
            loss, parts, _, _ = run_cross_vocab(op, student, teacher, log_scales, call, classes, learns)
            return loss, parts
        args = cross_vocab_args(call, classes)
        if learns:
            return _CrossVocabFunction.apply(student, scale, teacher, teacher_scale, op, args, op_backward)
        with torch._C._AutoDispatchBelowAutograd():
            loss, parts, _, _ = op(student, teacher, scale, teacher_scale, *args, False)
        return loss, parts

    return {"cross_vocab": cross_vocab, "cross_vocab_op": op}
