"""The kernel call: what a fused op receives besides the two logits tensors, declared once.

``KernelCall`` is the only list of it. Everything that carries it is derived from its fields or checked against
them by tests/test_ops.py:

- the op schemas (``SCHEMA_ARGS``: ops.py defines the Triton ops with it, csrc/kdkernels.cpp the extension's, and a
  test compares the two), their fake functions and autograd (ops.py);
- the tensors (``target``, ``denominator``) are schema arguments of their own, the plan (``code``, ``params``) is
  ``int code, float[] params`` (methods.py names the params), and every other field travels in one of two lists by
  its type, in field order: the float fields in ``float[] scalars`` (``SCALARS``), the int and bool fields in
  ``int[] flags`` (``FLAGS``);
- the C++ and CUDA kernels read those lists into ``CallOptions`` (csrc/kernel_call.h) through two X-macro lists
  that the build generates from this record (``cpp_option_lists``; the extension exports the names it was built
  with and a test compares them, which catches a stale build); the Triton kernels take the
  float fields as one tuple (``KernelCall.scalars``) and read them at indices derived from ``SCALARS``.

An option of the kernels is a field here with its default, its reading in each kernel language, and its check where
the loss call is checked (arguments.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class KernelCall:
    """One fused loss call on N rows, as every fused op receives it (the logits travel apart)."""

    target: Tensor | None = None  # [N] class indices (ignore_index on the rows left out), or None
    denominator: Tensor | None = None  # 0-d float32: a reduced loss is sum(rows) / denominator (sum without one)
    code: int = 0  # the plan's code (methods.Divergence or methods.Partition)
    params: tuple[float, ...] = ()  # the plan's named parameters (methods.DivergenceParams / DecoupledParams)
    temperature: float = 1.0  # under torch.compile a 0-d float64 tensor (arguments.py)
    ce_weight: float = 0.0  # loss = distill_weight * (the plan's loss) + ce_weight * CE(student, target at T = 1)
    label_smoothing: float = 0.0  # eps: CE = (1 - eps) (lse - s_target) + eps (lse - the mean of the unmasked s)
    distill_weight: float = 1.0
    ignore_index: int = -100  # the target value of the rows left out
    t2_scale: bool = False  # the plan's loss times T^2
    reduce: bool = True  # loss and parts summed over rows (and divided by the denominator), else per row
    with_ce: bool = False  # compute the cross-entropy term (needs a target): it weighs in, or its value is asked for
    standardize: bool = False  # z-score both rows before the temperature (logit standardization)

    def op_args(self) -> tuple:
        """The op's arguments after (student, teacher), in schema order (SCHEMA_ARGS)."""
        return self.target, self.denominator, self.code, list(self.params), *_numbers(self)

    def scalars(self) -> tuple[float, ...]:
        """The float fields, in the record's order (SCALARS): the Triton kernels' `scalars` tuple."""
        return tuple(_numbers(self)[0])

    @classmethod
    def from_op_args(cls, target, denominator, code, params, scalars, flags) -> KernelCall:
        """The record back from an op's arguments (what the Triton ops and the fake functions receive)."""
        numbers = {name: float(value) for name, value in zip(SCALARS, scalars, strict=True)}
        numbers.update({name: _FLAG_TYPES[name](value) for name, value in zip(FLAGS, flags, strict=True)})
        return cls(target, denominator, int(code), tuple(params), **numbers)


# The fields that are schema arguments of their own: the tensors and the plan.
_OWN_ARGUMENTS = ("target", "denominator", "code", "params")
_OPTIONS = [(f.name, f.type) for f in dataclasses.fields(KernelCall) if f.name not in _OWN_ARGUMENTS]
# The two lists of numbers, in field order; every option is a float, an int or a bool.
SCALARS = tuple(name for name, kind in _OPTIONS if kind == "float")
FLAGS = tuple(name for name, kind in _OPTIONS if kind in ("int", "bool"))
_FLAG_TYPES = {name: {"int": int, "bool": bool}[kind] for name, kind in _OPTIONS if name in FLAGS}
assert len(SCALARS) + len(FLAGS) == len(_OPTIONS)


def _numbers(call) -> tuple[list[float], list[int]]:
    """(scalars, flags) of a record, or of anything that names the options as it does."""
    # (a temperature tensor, under torch.compile, goes through ops.run_op, which puts its value here: NaN until then)
    values = [getattr(call, name) for name in SCALARS]
    scalars = [float("nan") if isinstance(v, Tensor) else float(v) for v in values]
    return scalars, [int(getattr(call, name)) for name in FLAGS]


def op_args(call) -> tuple:
    """``KernelCall.op_args`` of a checked loss call (arguments.LossCall) without making the record: the loss call
    names every option as the record does (a test checks), and its plan gives code and params. (Eager calls take
    this path: at vision batch sizes the record's construction is a measurable share of a call.)"""
    plan = call.plan
    return call.target, call.denominator, int(plan.code), [float(x) for x in plan.params], *_numbers(call)


# C++ types of the options, by their Python type.
_CPP_TYPES = {"float": "double", "int": "int64_t", "bool": "bool"}
# The generated header's name (setup.py writes it into the build's include directory).
CPP_OPTIONS_HEADER = "kernel_call_options.h"


def cpp_option_lists() -> str:
    """The text of ``CPP_OPTIONS_HEADER``: SCALARS and FLAGS as the X-macro lists csrc/kernel_call.h reads."""
    kinds = dict(_OPTIONS)

    def items(names: tuple[str, ...]) -> str:
        return " ".join(f"X({_CPP_TYPES[kinds[name]]}, {name})" for name in names)

    return (
        "// Generated from kdkernels/backends/kernel_call.py (KernelCall) by the build: do not edit.\n"
        "#pragma once\n"
        f"#define KDKERNELS_CALL_SCALARS(X) {items(SCALARS)}\n"
        f"#define KDKERNELS_CALL_FLAGS(X) {items(FLAGS)}\n"
    )


# The op schema's arguments after (Tensor student, Tensor teacher).
SCHEMA_ARGS = "Tensor? target, Tensor? denominator, int code, float[] params, float[] scalars, int[] flags"
