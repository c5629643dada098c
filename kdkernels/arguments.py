"""The one argument-preparation path of every entry point (``distill_loss``, ``linear_distill_loss``,
``kdkernels.parallel``): checks that name the argument and what was expected, defaults from the method table, the
kernel plan, the rows that are not ignored and the batchmean denominator.

Two steps, because the entry points learn the vocabulary size at different times: ``resolve`` checks everything
that needs no tensor (method, hyperparameters, options) and gives ``Settings``; ``Settings.bind`` checks the
target against the rows and the vocabulary and gives the ``LossCall`` that every backend receives. Each entry
point checks its own tensors (logits, hidden states and weights, or vocabulary shards) in between.

No host synchronisation on accelerators: the target's bounds are checked on the device there
(``torch._assert_async``), and raise IndexError on CPU tensors. Under torch.compile the check runs inside the opaque
custom op ``kdkernels::check_target``, whose copy of the target is what the backends read, so no compiled kernel can
index with an unchecked target.

The temperature is a number in ``TEMPERATURE_RANGE``. Eagerly it reaches the backends as a float (a 0-d tensor's
value read on the host once per call). Under torch.compile its value is not known while tracing (a 0-d tensor, or a
Python float that dynamo made dynamic after it changed): it reaches the backends as the 0-d float64 tensor of the
opaque custom op ``kdkernels::check_temperature``, which checks it when the graph runs, and the fused ops read it
then (ops.run_op), so that a scheduled or learnable temperature compiles once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch

from .methods import METHODS, REDUCTIONS, Method, Plan, as_number, get_method

Tensor = torch.Tensor
INT64 = (-(2**63), 2**63 - 1)
# The temperatures the losses take, both ends included (docs/losses.md, "Temperature", says why these).
TEMPERATURE_RANGE = (1e-4, 1e4)
# What is checked: the ends as float32 rounds them (1e-4 as a float32 tensor reads back a little below 1e-4).
_CHECKED_RANGE = tuple(float(torch.tensor(end, dtype=torch.float32)) for end in TEMPERATURE_RANGE)
_RANGE_TEXT = "the supported range [{:g}, {:g}]".format(*TEMPERATURE_RANGE)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # of logits, hidden states, weights


def temperature_error(value: float) -> Exception | None:
    """The error of a temperature value outside TEMPERATURE_RANGE, or None: TypeError when it is not finite (as for
    the other options), ValueError when it is <= 0 or outside the range."""
    if not math.isfinite(value):
        return TypeError(f"temperature must be a finite number, got {value!r}")
    if value <= 0:
        return ValueError(f"temperature must be > 0, got {value!r}")
    if not _CHECKED_RANGE[0] <= value <= _CHECKED_RANGE[1]:
        return ValueError(f"temperature must be in {_RANGE_TEXT}, got {value!r}")
    return None


# (defined with torch.library.define, whose op costs less per call than custom_op's: it runs in every compiled call)
torch.library.define("kdkernels::check_temperature", "(Tensor temperature) -> Tensor")


@torch.library.impl("kdkernels::check_temperature", "CompositeExplicitAutograd")
def _check_temperature(temperature: Tensor) -> Tensor:
    """A float64 copy of a 0-d ``temperature`` once its value is in TEMPERATURE_RANGE (ValueError on CPU tensors;
    on accelerators checked on the device, torch._assert_async: no host sync): what the backends read under
    torch.compile, opaque to it (module docstring)."""
    if temperature.device.type == "cpu":
        error = temperature_error(float(temperature))
        if error is not None:
            raise error
    else:
        low, high = _CHECKED_RANGE
        torch._assert_async((temperature >= low) & (temperature <= high), f"temperature must be in {_RANGE_TEXT}")
    return temperature.detach().to(torch.float64, copy=True)


@torch.library.register_fake("kdkernels::check_temperature")
def _(temperature):
    return torch.empty((), dtype=torch.float64, device=temperature.device)


check_temperature = torch.ops.kdkernels.check_temperature.default


def _check_bounds(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Every entry of ``target`` is a class index in [0, num_classes) or ``ignore_index``: IndexError on CPU
    tensors; on accelerators the check runs on the device (torch._assert_async: no host sync) and fails the stream
    asynchronously."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if target.device.type == "cpu":
        if bool(bad.any()):
            raise IndexError(
                f"target must hold class indices in [0, {num_classes}) or ignore_index={ignore_index}, "
                f"found {target[bad][0].item()}"
            )
    else:
        torch._assert_async(~bad.any(), f"target must hold class indices in [0, {num_classes}) or ignore_index")


@torch.library.custom_op("kdkernels::check_target", mutates_args=())
def check_target(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """An int64 copy of ``target`` [N] once its bounds are checked (_check_bounds): opaque to torch.compile, so that
    a compiled caller raises here instead of indexing out of bounds (which aborts the process from generated code),
    and what the backends read, so that no compiled kernel runs on the unchecked target."""
    _check_bounds(target, num_classes, ignore_index)
    return target.to(torch.int64, copy=True)


@check_target.register_fake
def _(target, num_classes, ignore_index):
    return torch.empty_like(target, dtype=torch.int64)


def check_options(options: dict) -> dict:
    """The options every method shares (a dict of LossOptions' fields, the method's defaults filled in), checked,
    with the weights as floats (also run by the modules at construction)."""
    if not isinstance(options["standardize"], bool):
        raise TypeError(f"standardize must be True or False, got {options['standardize']!r}")
    weights = {name: _weight(name, options[name]) for name in ("ce_weight", "distill_weight", "label_smoothing")}
    if weights["label_smoothing"] >= 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {options['label_smoothing']!r}")
    if weights["label_smoothing"] > 0 and weights["ce_weight"] == 0:
        raise ValueError(
            f"label_smoothing={options['label_smoothing']!r} smooths the cross-entropy term, which ce_weight=0 "
            "leaves out: set ce_weight > 0"
        )
    temperature = options["temperature"]
    if isinstance(temperature, torch.Tensor) and not torch.compiler.is_compiling():
        raise TypeError(
            "temperature must be a number here: a 0-d tensor (a learnable temperature) is taken by "
            "the loss functions (distill_loss, <method>_loss, linear_distill_loss, kdkernels.parallel), "
            "not by the loss modules"
        )
    if not isinstance(temperature, torch.Tensor):  # (a tensor traced by torch.compile: check_temperature)
        check_temperature_number(temperature)
    _check_reduction(options["reduction"], options["ignore_index"], options["normalizer"])
    numbers_ = {"ignore_index": int(options["ignore_index"]), "return_parts": bool(options["return_parts"])}
    return {**options, **weights, **numbers_}


def _weight(name: str, value: object) -> float:
    """A weight: a finite number >= 0 (NumPy's too), as a float."""
    if type(value) is not float and type(value) is not int:  # (the common case first: a check runs every call)
        value = as_number(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _check_reduction(reduction: object, ignore_index: object, normalizer: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, (bool, torch.Tensor)) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not INT64[0] <= ignore_index <= INT64[1]:
        raise ValueError(f"ignore_index must fit in int64 [{INT64[0]}, {INT64[1]}], got {ignore_index}")
    if normalizer is None:
        return
    if reduction != "batchmean":
        raise ValueError(
            f"normalizer replaces the batchmean denominator; it needs reduction='batchmean', got "
            f"reduction={reduction!r}"
        )
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real number, got a tensor of dtype {normalizer.dtype}")
        if normalizer.requires_grad:
            raise ValueError(
                "normalizer must not require grad: it is a constant of the loss (pass normalizer.detach())"
            )
    elif isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a positive number or a 0-d tensor, got {normalizer!r}")
    elif not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")


def check_temperature_number(temperature: object) -> float:
    """The temperature, a number (NumPy's too) in TEMPERATURE_RANGE, as a float. Its value is checked eagerly only:
    under torch.compile it may be symbolic, and ``check_temperature`` checks it when the graph runs."""
    temperature = as_number(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not torch.compiler.is_compiling():
        error = temperature_error(temperature)
        if error is not None:
            raise error
    return float(temperature)


@dataclass(frozen=True, kw_only=True)
class LossOptions:
    """The options of every loss call besides its tensors, ``mask``, ``backend`` and the method's hyperparameters,
    with their defaults (docs/usage.md): the one list of them. ``resolve`` tells them from the hyperparameters by
    these names. The loss is distill_weight * (the method's loss) + ce_weight * (the student's cross-entropy against
    the target at T = 1)."""

    temperature: float | Tensor | None = None  # None: the method's
    t2_scale: bool | None = None  # None: the method's
    reduction: str = "batchmean"
    ignore_index: int = -100
    normalizer: float | Tensor | None = None
    ce_weight: float = 0.0
    label_smoothing: float = 0.0  # eps: (1 - eps) CE + eps * the mean over the unmasked classes of -log q
    distill_weight: float = 1.0
    return_parts: bool = False  # the caller wants the two terms' values too (LossParts)
    standardize: bool = False  # z-score each row of both logits before the temperature (logit standardization)


OPTIONS = tuple(f.name for f in fields(LossOptions))
DEFAULTS = {f.name: f.default for f in fields(LossOptions)}


@dataclass(frozen=True, kw_only=True)
class Settings(LossOptions):
    """A call's method, hyperparameters, plan and options, checked, the method's defaults filled in (temperature a
    float, under torch.compile a 0-d float64 tensor: module docstring); no tensor seen yet."""

    method: str
    hp: dict
    plan: Plan

    def bind(
        self, target: object, leading: torch.Size, num_classes: int | Tensor, device: torch.device, mask: object = None
    ) -> LossCall:
        """The call on rows of ``leading`` shape over ``num_classes`` classes (an int, or for a sharded vocabulary
        on an accelerator a 0-d device tensor, checked on the device) on ``device``: checks k < V and the target
        (present where the plan indexes it, its shape, dtype, device and, where indexed, its bounds). ``mask``
        (bool or 0/1 of the leading shape) leaves out the rows where it is 0, as ``ignore_index`` does: it is folded
        into the target the kernels read (a target of ignore_index and 0 when there is none)."""
        k = self.plan.top_k
        if k and isinstance(num_classes, int) and k >= num_classes:
            raise ValueError(f"k must be smaller than the number of classes V={num_classes}, got k={k}")
        if k and not isinstance(num_classes, int):
            torch._assert_async(num_classes > k, f"k must be smaller than the number of classes V, got k={k}")
        if target is None:
            if self.plan.needs_target:
                raise ValueError(f"{self.method} needs target (class indices of shape {tuple(leading)})")
            if self.ce_weight > 0:
                raise ValueError(
                    f"ce_weight > 0 (the cross-entropy term) needs target (class indices of shape {tuple(leading)})"
                )
        else:
            target = self._checked_target(target, leading, num_classes, device)
        labels = target is not None
        if mask is not None:
            mask = _checked_mask(mask, leading, device)
            target = torch.where(mask, target if labels else 0, self.ignore_index)
        n = leading.numel()
        if self.reduction != "batchmean":
            denominator = None
        elif self.normalizer is not None:
            if isinstance(self.normalizer, torch.Tensor) and self.normalizer.device != device:
                raise ValueError(
                    f"normalizer must be on the logits' device {device} (or a Python number), got a "
                    f"tensor on {self.normalizer.device}"
                )
            denominator = torch.as_tensor(self.normalizer, dtype=torch.float32, device=device)
        elif target is None:  # every row counts: no op reads a mask (a call's fixed cost at small batches)
            denominator = torch.full((), max(n, 1), dtype=torch.float32, device=device)
        else:
            denominator = (target != self.ignore_index).sum().clamp(min=1).to(torch.float32)
        return LossCall(
            **self.__dict__, target=target, labels=labels, rows_count=n, device=device, denominator=denominator
        )

    @property
    def indexes_target(self) -> bool:
        """Whether the loss reads the target's class (its plan, or the cross-entropy term)."""
        return self.plan.needs_target or self.ce_weight > 0

    def _checked_target(self, target: object, leading: torch.Size, num_classes, device) -> Tensor:
        """The target flattened to [N] (a checked int64 copy where the loss reads its class)."""
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must have an integer dtype, got {target.dtype}")
        if target.shape != leading:
            raise ValueError(f"target must have the logits' leading shape {tuple(leading)}, got {tuple(target.shape)}")
        if target.device != device:
            raise ValueError(f"target must be on the logits' device {device}, got {target.device}")
        flat = target if target.dim() == 1 else target.reshape(-1)
        if not (self.indexes_target or self.return_parts):
            return flat  # it only marks the ignored rows
        if isinstance(num_classes, int) and torch.compiler.is_compiling():
            return check_target(flat, num_classes, self.ignore_index)
        if isinstance(num_classes, int):  # eager: the same check without the op's dispatch (tens of us a call)
            _check_bounds(flat, num_classes, self.ignore_index)
            return flat
        bad = (flat != self.ignore_index) & ((flat < 0) | (flat >= num_classes))
        torch._assert_async(~bad.any(), "target must hold class indices in [0, V) or ignore_index")
        return flat


@dataclass(frozen=True, kw_only=True)
class LossCall(Settings):
    """A checked loss call on N rows, as every backend receives it (the logits travel apart: they may be a chunk
    or a vocabulary shard)."""

    target: Tensor | None = None  # [N] (ignore_index on the rows left out), or None
    labels: bool = False  # the target holds the caller's class labels (not only a mask's marks)
    rows_count: int = 0  # N
    device: torch.device | None = None  # the logits'
    denominator: Tensor | None = None  # 0-d float32 for batchmean, else None

    @property
    def valid(self) -> Tensor:
        """[N] bool: the rows not ignored (made when a backend asks: the fused kernels read the target)."""
        if self.target is None:
            return torch.ones(self.rows_count, dtype=torch.bool, device=self.device)
        return self.target != self.ignore_index

    @property
    def reduce(self) -> bool:
        """Whether the rows are reduced (summed, and divided by the denominator for batchmean)."""
        return self.reduction != "none"

    @property
    def with_ce(self) -> bool:
        """Whether the cross-entropy term is computed: it weighs in the loss, or its value is asked for."""
        return self.labels and (self.ce_weight != 0 or self.return_parts)

    def rows(self, start: int, stop: int) -> LossCall:
        """The rows [start, stop), reduced with the whole batch's denominator."""
        target = None if self.target is None else self.target[start:stop]
        return replace(self, target=target, rows_count=stop - start)


def resolve(method: object, *, table: Mapping[str, Method] = METHODS, **arguments) -> Settings:
    """Checks a call's method (a name of ``table``), its options (``arguments`` named in OPTIONS) and the method's
    hyperparameters (the other ``arguments``); fills in the method's defaults."""
    spec = get_method(method, table)
    options, hyperparameters = dict(DEFAULTS), {}
    for name, value in arguments.items():
        (options if name in DEFAULTS else hyperparameters)[name] = value
    hp = spec.resolve(hyperparameters)
    if options["temperature"] is None:
        options["temperature"] = spec.temperature
    options["t2_scale"] = spec.t2_scale if options["t2_scale"] is None else bool(options["t2_scale"])
    options = check_options(options)
    temperature = options["temperature"]
    if not isinstance(temperature, torch.Tensor):
        temperature = float(as_number(temperature))
    if torch.compiler.is_compiling():
        if not isinstance(temperature, torch.Tensor):  # (a product: torch.tensor(T) would specialize T)
            temperature = torch.ones((), dtype=torch.float64) * temperature
        temperature = check_temperature(temperature)
    return Settings(**{**options, "temperature": temperature}, method=spec.name, hp=hp, plan=spec.plan(hp))


def split_temperature(temperature: object) -> tuple[object, Tensor | None]:
    """(the temperature's value, the tensor) of a 0-d floating-point tensor, else (temperature, None); its value is
    checked with the other options. The value is read on the host, but under torch.compile, where it stays the
    tensor (module docstring)."""
    if not isinstance(temperature, torch.Tensor):
        return temperature, None
    if temperature.dim() != 0 or not temperature.is_floating_point():
        raise TypeError(
            f"temperature must be a number or a 0-d floating-point tensor, got a tensor of shape "
            f"{tuple(temperature.shape)} and dtype {temperature.dtype}"
        )
    if temperature.device.type == "meta":
        raise ValueError(
            "temperature must be a number or a tensor on the logits' device, got a tensor on the meta device "
            "(which holds no value)"
        )
    if torch.compiler.is_compiling():
        return temperature.detach(), temperature
    return float(temperature.detach()), temperature


def full_gradient(teacher: object, temperature: Tensor | None) -> bool:
    """Whether the loss needs the full gradient: the teacher's logits or the temperature require grad."""
    wants = getattr(teacher, "requires_grad", False) or (temperature is not None and temperature.requires_grad)
    return torch.is_grad_enabled() and wants


def check_temperature_device(temperature: Tensor | None, device: torch.device) -> None:
    if temperature is not None and temperature.device != device:
        raise ValueError(
            f"temperature must be on the logits' device {device} (or a Python number), got a tensor "
            f"on {temperature.device}"
        )


def _checked_mask(mask: object, leading: torch.Size, device: torch.device) -> Tensor:
    """``mask`` flattened to [N] bool: a bool or integer tensor of the leading shape, on the logits' device."""
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"mask must be a bool or integer torch.Tensor (1 keeps a row), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if mask.shape != leading:
        raise ValueError(f"mask must have the logits' leading shape {tuple(leading)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the logits' device {device}, got {mask.device}")
    return mask.reshape(-1) != 0


def check_float_tensor(name: str, x: object, min_dim: int = 1) -> None:
    """``x`` is a floating-point tensor of at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating-point dtype (float32, bfloat16, float16 or float64), got {x.dtype}"
        )
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got a {x.dim()}-d tensor")
