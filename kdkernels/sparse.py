"""Sparse teachers: a teacher known only on k classes per row (its top-k, as stored by offline distillation).

Definition. A ``SparseTeacher(indices, values, kind, tail)`` row names k distinct classes K = {i_1 .. i_k}. The
teacher is a distribution over k + 1 bins, the k classes and one tail bin holding the rest of the mass:

    kind="logprobs"  P_j = exp(values_j), P_tail = max(0, 1 - sum_j exp(values_j)), 0 when k = V; used as given (the
                     values are the teacher's log-probabilities at the distillation temperature: T does not rescale
                     them).
    kind="logits"    P_j = softmax(values / T)_j over the k classes, P_tail = 0.

The student's distribution q = softmax(s / T) is folded onto the same bins: Q_j = q_{i_j}, and Q_tail, the mass of
every other class, is computed exactly as a logsumexp over those classes (never 1 - sum Q_j, which loses all its
digits when the top-k hold nearly all the mass). Every divergence-family loss is then its definition
(docs/losses.md) between [P_1 .. P_k, P_tail] and [Q_1 .. Q_k, Q_tail], with its T^2 factor, reductions and ignored
rows as usual.

With ``tail=False`` there is no tail bin (TRL's distillation from a served top-k with ``loss_add_tail=False``):
both models are renormalised over the k classes, P_j = exp(values_j) / sum exp(values) (logprobs) or
softmax(values / T) (logits), Q_j = q_{i_j} / sum_K q = softmax(s_K / T), and the student's gradient is 0 outside K.

Building one: ``SparseTeacher.from_logits(teacher_logits, k, temperature)`` keeps a dense teacher's top-k
log-probabilities at T; ``SparseTeacher.at_student_top_k(student_logits, k, score)`` takes the student's k most likely
classes and asks ``score(indices)`` for the teacher's log-probabilities there (a teacher that scores given token
ids: reverse KL on the student's top-k). ``save_sparse_teachers`` / ``load_sparse_teachers`` store them on disk
(sparse_store.py).

A loss that is infinite when the teacher gives zero mass to a bin the student does not (rkl, jsd at beta = 1, abkd
unless alpha > 0 and alpha + beta > 0: ``methods.finite_when_missing``) is undefined against a zero tail or a -inf
value: kind="logits" (tail always 0) raises at once, kind="logprobs" raises for the rows where it happens. The
decoupled family is not defined on a sparse teacher: its partitions ({target} | rest, top-k | rest, a threshold)
need the teacher's distribution inside the tail (the in-bin KL of "rest"), which a top-k teacher does not have; nor
is akl with a tail bin (its weights sum |p - q| over each class of the tail).

Fold as logits. The student side enters the fused kernels as k + 1 "bin logits" z = [s_{i_1} .. s_{i_k},
T lse_{j not in K}(s_j / T)]: softmax(z / T) = [Q_1 .. Q_tail] exactly, so the unchanged kernels compute the loss and
its gradient gamma = dl/dz. Back on the student's logits (chain rule through z):

    dl/ds_j = gamma_j                                    for j = i_j in K,
    dl/ds_j = gamma_tail * exp(s_j / T - lse_tail)       for j not in K (its share of the tail bin).

The teacher enters as bin logits too: [values, -inf] (kind="logits") or T [values, log P_tail] (kind="logprobs").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arguments import check_temperature_number
from .backends.reference import top_k_indices
from .methods import DIVERGENCE, Divergence, finite_when_missing

Tensor = torch.Tensor
KINDS = ("logprobs", "logits")
# kind="logprobs": sum_j exp(values_j) may exceed 1 by this much (rounding of low-precision log-probabilities); more
# means the values are not log-probabilities (typically logits passed with the default kind).
LOGPROB_SUM_SLACK = 1e-2


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher given on k classes per row plus a tail bin (see the module docstring for the exact definition).

    Args:
        indices: [..., k] integer class indices, distinct within a row, in [0, V).
        values: [..., k] float: the teacher's log-probabilities of those classes (kind="logprobs", e.g. a stored
            top-k of log_softmax) or its logits (kind="logits", renormalised over the k classes after / T).
        kind: "logprobs" (default) or "logits".
        tail: whether the rest of the vocabulary is a bin of its own (default), or both models are renormalised over
            the k classes (False).

    Accepted wherever teacher logits are: ``distill_loss`` and the per-method functions and modules (divergence
    family), and ``linear_distill_loss`` (as ``teacher_hidden``, with ``teacher_weight=None``).
    """

    indices: Tensor
    values: Tensor
    kind: str = "logprobs"
    tail: bool = True

    def __post_init__(self):
        if (
            not isinstance(self.indices, torch.Tensor)
            or self.indices.is_floating_point()
            or self.indices.is_complex()
            or self.indices.dtype == torch.bool
        ):
            raise TypeError(
                f"SparseTeacher indices must be an integer torch.Tensor, got "
                f"{getattr(self.indices, 'dtype', type(self.indices).__name__)}"
            )
        if not isinstance(self.values, torch.Tensor) or not self.values.is_floating_point():
            raise TypeError(
                f"SparseTeacher values must be a floating-point torch.Tensor, got "
                f"{getattr(self.values, 'dtype', type(self.values).__name__)}"
            )
        if self.indices.shape != self.values.shape or self.values.dim() < 1 or self.values.shape[-1] < 1:
            raise ValueError(
                f"SparseTeacher indices and values must have the same shape [..., k] with k >= 1, got "
                f"{tuple(self.indices.shape)} and {tuple(self.values.shape)}"
            )
        if self.indices.device != self.values.device:
            raise ValueError(
                f"SparseTeacher indices and values must be on one device, got {self.indices.device} "
                f"and {self.values.device}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"SparseTeacher kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.tail, bool):
            raise TypeError(f"SparseTeacher tail must be True or False, got {self.tail!r}")

    @classmethod
    def from_logits(cls, teacher_logits: Tensor, k: int, temperature: float = 1.0, tail: bool = True):
        """A dense teacher's top-k log-probabilities at ``temperature`` (kind="logprobs"), equal logits to the lower
        class index: what offline distillation stores. Computed under no_grad in float32 (float64 for float64)."""
        _check_k(k, teacher_logits)
        temperature = check_temperature_number(temperature)
        with torch.no_grad():
            dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
            logprobs = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)
            indices = top_k_indices(logprobs, k)
            return cls(indices, logprobs.gather(-1, indices), "logprobs", tail)

    @classmethod
    def at_student_top_k(cls, student_logits: Tensor, k: int, score, kind: str = "logprobs", tail: bool = True):
        """The student's k most likely classes (equal logits to the lower index; no gradient flows through the
        choice), with the teacher's values there from ``score(indices [..., k]) -> values [..., k]`` (its
        log-probabilities, or its logits with kind="logits")."""
        _check_k(k, student_logits)
        with torch.no_grad():
            indices = top_k_indices(student_logits.detach(), k)
        values = score(indices)
        if not isinstance(values, torch.Tensor) or values.shape != indices.shape:
            raise ValueError(
                f"score(indices) must return a tensor of the indices' shape {tuple(indices.shape)}, got "
                f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
            )
        return cls(indices, values.detach(), kind, tail)

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def rows(self, start: int | None = None, stop: int | None = None) -> SparseTeacher:
        """Rows [start, stop) of the flattened [N, k] teacher."""
        k = self.k
        return SparseTeacher(
            self.indices.reshape(-1, k)[start:stop], self.values.reshape(-1, k)[start:stop], self.kind, self.tail
        )


def _check_k(k: object, logits: object) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError(
            f"logits must be a floating-point tensor [..., V], got {getattr(logits, 'dtype', type(logits).__name__)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be an integer in [1, V={logits.shape[-1]}], got {k!r}")


# Long: one check per argument, each with its message.
def check(
    teacher: SparseTeacher, settings, leading: torch.Size, v: int, device: torch.device, valid: Tensor
) -> SparseTeacher:
    """Checks a sparse teacher against the student ([*leading, V] logits on ``device``) and the call's settings
    (arguments.Settings: method, plan, standardize), and returns it flattened to [N, k] with the ignored rows
    (``valid`` False) made harmless (indices 0..k-1).

    Data checks (indices in range and distinct, log-probabilities summing to at most 1, no zero-mass bin where the
    method needs the teacher's support) run on the rows not ignored; on an accelerator they fail the stream
    asynchronously instead of synchronising with the host.
    """
    method, plan = settings.method, settings.plan
    if torch.is_grad_enabled() and teacher.values.requires_grad:
        raise ValueError(
            "a SparseTeacher is a constant: its values must not require grad (pass values.detach(); for "
            "a teacher that learns, pass dense teacher_logits)"
        )
    if settings.standardize:
        raise ValueError(
            "standardize z-scores the teacher's whole row of logits, which a SparseTeacher (k classes "
            "plus one tail bin) does not have; pass dense teacher_logits"
        )
    if plan.family != DIVERGENCE:
        raise ValueError(
            f"{method} is a decoupled-family loss: it partitions the teacher's full distribution and needs its "
            f"distribution inside every bin, which a SparseTeacher (k classes plus one tail bin) does not have; use a "
            f"divergence-family method (kd, rkl, jsd, skew_fkl, skew_rkl, tvd, abkd) or dense teacher_logits"
        )
    if plan.code == Divergence.AKL and teacher.tail:
        raise ValueError(
            "akl ranks the teacher's classes one by one (its head) and sums |p - q| over each of the "
            "others, which a SparseTeacher's tail bin lumps together; pass tail=False (both models "
            "renormalised over the k classes) or dense teacher_logits"
        )
    if teacher.values.shape[:-1] != leading:
        raise ValueError(
            f"SparseTeacher must have the student's leading shape {tuple(leading)} + (k,), got "
            f"{tuple(teacher.values.shape)}"
        )
    if teacher.device != device:
        raise ValueError(f"SparseTeacher must be on the student's device {device}, got {teacher.device}")
    if teacher.k > v:
        raise ValueError(f"SparseTeacher k={teacher.k} exceeds the number of classes V={v}")
    needs_support = not finite_when_missing(plan, "teacher")
    if needs_support and teacher.kind == "logits" and teacher.tail:
        raise ValueError(
            f"{method} with these hyperparameters is infinite where the teacher has zero mass, and a SparseTeacher "
            f"of kind='logits' puts zero mass on its tail bin; pass the teacher's log-probabilities "
            f"(kind='logprobs', tail = 1 - their mass) or use a loss that stays finite (e.g. kd)"
        )
    flat = teacher.rows()
    keep = valid.unsqueeze(-1)
    indices = torch.where(keep, flat.indices, torch.arange(flat.k, device=device))
    values = torch.where(keep, flat.values, 0.0)
    ordered = indices.sort(-1).values
    problems = [
        (((indices < 0) | (indices >= v)).any(-1), f"SparseTeacher indices must be in [0, {v})"),
        ((ordered[:, 1:] == ordered[:, :-1]).any(-1), "SparseTeacher indices must be distinct within a row"),
    ]
    if flat.kind == "logprobs":
        mass = values.double().exp().sum(-1)
        problems.append(
            (
                mass > 1 + LOGPROB_SUM_SLACK,
                "SparseTeacher values of kind='logprobs' must be "
                "log-probabilities (sum of exp at most 1); pass kind='logits' for logits",
            )
        )
    if needs_support:  # (without a tail bin, only a -inf value leaves a teacher bin empty)
        zero_bin = torch.isneginf(values).any(-1)
        if flat.kind == "logprobs" and flat.tail:
            zero_bin = zero_bin | ((mass >= 1) & (flat.k < v))
        problems.append(
            (
                zero_bin,
                f"{method} is undefined (infinite) against a teacher bin of zero mass (a "
                f"-inf value, or a tail 1 - sum exp(values) <= 0) where the student has mass",
            )
        )
    for bad, message in problems:
        bad = bad & valid
        if device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(bad.any()):
                raise ValueError(f"{message} (row {int(bad.nonzero()[0, 0])} of the flattened batch)")
        else:
            torch._assert_async(~bad.any(), message)
    return SparseTeacher(indices, values, flat.kind, flat.tail)


def teacher_bins(teacher: SparseTeacher, temperature: float, dtype: torch.dtype, num_classes: int) -> Tensor:
    """The teacher's k + 1 bins as logits [N, k + 1] (softmax(bins / T) = [P_1 .. P_k, P_tail]) over ``num_classes``
    classes. With k = V the tail holds no class: its mass is 0, whatever 1 - sum exp(values) rounds to (a slightly
    positive rounding error there would make forward KL infinite against the student's empty tail). Without a tail
    bin (tail=False) it is -inf in both models: masked, the k classes renormalised."""
    values = teacher.values.to(dtype)
    empty = values.new_full((values.shape[0], 1), float("-inf"))
    if teacher.kind == "logits":
        return torch.cat([values, empty], -1)
    # In float64, as check() decides which tails are 0: a float32 sum would round some tails near 0 to exactly 0.
    tail = (
        empty
        if teacher.k == num_classes or not teacher.tail
        else (1 - teacher.values.double().exp().sum(-1, keepdim=True)).clamp(min=0).log().to(dtype)
    )
    return torch.cat([values, tail], -1) * temperature


def fold(
    student: Tensor, indices: Tensor, temperature: float, dtype: torch.dtype, tail: bool = True
) -> tuple[Tensor, Tensor]:
    """(student bin logits z [N, k + 1], lse_tail [N]): z = [s_K, T lse_tail], lse_tail = lse_{j not in K} s_j / T.

    A class-wide tail with no finite logit (k = V, or the rest masked) has lse_tail = -inf: an empty bin; so has
    every row without a tail bin (``tail`` False).
    """
    bins = student.gather(-1, indices).to(dtype)
    if not tail:
        lse_tail = bins.new_full(bins.shape[:-1], float("-inf"))
    else:
        x = student.to(dtype, copy=True).div_(temperature)
        x.scatter_(-1, indices, float("-inf"))
        lse_tail = torch.logsumexp(x, -1)
    return torch.cat([bins, (lse_tail * temperature).unsqueeze(-1)], -1), lse_tail


def unfold_(
    grad_bins: Tensor,
    buffer: Tensor,
    indices: Tensor,
    lse_tail: Tensor,
    temperature: float,
    valid: Tensor,
    tail: bool = True,
) -> Tensor:
    """Overwrites ``buffer`` [N, V], which holds the student's logits, with dl/ds from dl/dz = ``grad_bins``
    [N, k + 1] (module docstring); rows not ``valid`` become exactly 0 (even if their logits hold NaN).

    In place when ``buffer`` has the dtype of ``grad_bins``; otherwise through one temporary of that dtype.
    """
    x = buffer if buffer.dtype == grad_bins.dtype else buffer.to(grad_bins.dtype)
    if not tail:  # no tail bin: 0 outside K (exp(s / T) of large logits would overflow to inf * 0)
        x.zero_()
    else:
        shift = torch.where(torch.isneginf(lse_tail), 0.0, lse_tail).unsqueeze(-1)
        x.div_(temperature).sub_(shift).exp_().mul_(grad_bins[:, -1:])
    x.scatter_(-1, indices, grad_bins[:, :-1])
    x.masked_fill_(~valid.unsqueeze(-1), 0.0)
    if x is not buffer:
        buffer.copy_(x)
    return buffer


class FoldStudent(torch.autograd.Function):
    """z = fold(student) with the gradient of ``unfold_``: one [N, V] buffer in each direction."""

    @staticmethod
    def forward(ctx, student, indices, valid, temperature, dtype, tail):
        bins, lse_tail = fold(student, indices, temperature, dtype, tail)
        ctx.save_for_backward(student, indices, valid, lse_tail)
        ctx.temperature, ctx.tail = temperature, tail
        return bins

    @staticmethod
    def backward(ctx, grad_bins):
        student, indices, valid, lse_tail = ctx.saved_tensors
        buffer = student.to(grad_bins.dtype, copy=True)
        unfold_(grad_bins, buffer, indices, lse_tail, ctx.temperature, valid, ctx.tail)
        return buffer.to(student.dtype), None, None, None, None, None
