"""Distillation between two vocabularies (docs/losses.md, section 11): ``cross_vocab_loss("uld" | "hybrid", ...)``
on student logits [..., Vs] and teacher logits [..., Vt] whose rows are aligned (one per position, or per merged
group of tokens: kdkernels.alignment), and ``vocab_map`` (the classes of shared token strings, for "hybrid").

How a fused backend plugs in. A call goes through the same stages as ``distill_loss``: the options are checked
(``arguments``), the plan comes from the method table (``methods.CROSS_VOCAB_METHODS``: a ``Plan`` of family
CROSS_VOCAB, code ``CrossVocab``, ``CrossVocabParams`` with the teacher's temperature, the matched classes' divergence
code and mixture, and the two weights resolved here), ``Settings.bind`` gives the ``LossCall`` (rows left out, the
batchmean denominator), and the backend chosen by ``backends.select_backend(..., entry="cross_vocab")`` computes

    cross_vocab(call, student [N, Vs], teacher [N, Vt], log_scales (c_s [N] | None, c_t [N] | None), classes)
        -> (loss, parts)

like a backend's ``impl``; ``classes`` is the map's (student ids, teacher ids, unmatched student ids, unmatched
teacher ids) on the device, None for uld. The reference and the fused backends "cpu" (csrc/cpu/cross_vocab.cpp),
"triton" (backends/triton/cross_vocab.py) and "cuda" (csrc/cuda/cross_vocab.cu), through backends/ops.py
``cross_vocab_entries``, register one; "auto" takes the first backend of the device's order that has one. Per row
the CPU kernel does (docs/losses.md section 11.5): the two logsumexps at T_s and T_t;
q~ = exp(c_s) q and p~ = exp(c_t) p into row buffers; a stable descending sort of both (the probabilities are >= 0,
so a radix sort of their float bits; the student's with its class indices, the teacher's without: it is a constant);
one pass over the ranks summing |q~_(i) - p~_(i)| and writing G = sign(q~_(i) - p~_(i)) at the student's class pi(i)
(past the shorter row, the longer one's values alone); then r = q~ G, sum r, the gradient row (r - q sum r) / T_s and
dl/dc_s = sum r. For hybrid the matched pairs take the divergence family's JSD / KD / RKL terms (a gather of p~ at
the teacher ids), and the sort runs over the unmatched classes only. The gradient of the log scales then flows on by
autograd (into the merged groups' token rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from . import backends
from .arguments import DEFAULTS, OPTIONS, Settings, check_float_tensor, check_temperature, resolve
from .functional import LossParts, finish
from .methods import CROSS_VOCAB_METHODS, CrossVocab

# The loss options (arguments.LossOptions) that the cross-vocabulary losses read; every other one must keep its
# default (their hard-label term is the plain cross-entropy, and they do not standardize).
CROSS_VOCAB_OPTIONS = (
    "temperature",
    "t2_scale",
    "reduction",
    "ignore_index",
    "normalizer",
    "ce_weight",
    "distill_weight",
    "return_parts",
)

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class VocabMap:
    """The classes that stand for the same token string in a student's and a teacher's vocabulary: pairs
    (student_ids[m], teacher_ids[m]), one to one. Built by ``kdkernels.vocab_map(student_tokenizer,
    teacher_tokenizer)``, or from two 1-D integer tensors (checked here: equal lengths, ids >= 0, none twice).

    ``student_vocab`` and ``teacher_vocab``, the tokenizers' sizes when known, are for ``summary()`` only; the loss
    checks the ids against the logits' widths."""

    student_ids: Tensor
    teacher_ids: Tensor
    student_vocab: int | None = None
    teacher_vocab: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)
    # The largest student and teacher ids (-1 for none), read here so that ``classes`` reads no tensor's value: a
    # call under torch.compile traces it.
    _largest: tuple = field(init=False, repr=False)

    def __post_init__(self):
        ids = [_checked_ids(name, getattr(self, name)) for name in ("student_ids", "teacher_ids")]
        if ids[0].numel() != ids[1].numel():
            raise ValueError(
                f"vocab_map: student_ids and teacher_ids must have the same length (one pair per shared token), "
                f"got {ids[0].numel()} and {ids[1].numel()}"
            )
        object.__setattr__(self, "student_ids", ids[0])
        object.__setattr__(self, "teacher_ids", ids[1])
        object.__setattr__(self, "_largest", tuple(int(x.max()) if x.numel() else -1 for x in ids))

    def __len__(self) -> int:
        return self.student_ids.numel()

    def summary(self) -> str:
        """How many tokens the two vocabularies share, for the log."""

        def share(size):
            return f" of {size} ({100 * len(self) / size:.1f}%)" if size else ""

        return (
            f"{len(self)} shared token strings: the student's{share(self.student_vocab)}, "
            f"the teacher's{share(self.teacher_vocab)}"
        )

    def classes(self, num_student: int, num_teacher: int, device: torch.device) -> tuple[Tensor, ...]:
        """(student ids, teacher ids, unmatched student ids, unmatched teacher ids) for logits of Vs = num_student
        and Vt = num_teacher classes, on ``device`` (made once per widths and device eagerly, in the graph under
        torch.compile); ids outside [0, Vs) or [0, Vt) raise."""
        key = (num_student, num_teacher, device)
        if key in self._cache:
            return self._cache[key]
        for name, largest, width, logits in (
            ("student", self._largest[0], num_student, "student_logits"),
            ("teacher", self._largest[1], num_teacher, "teacher_logits"),
        ):
            if largest >= width:
                raise ValueError(
                    f"vocab_map: {name} id {largest} is outside the {name}'s vocabulary [0, {width}) "
                    f"(the last dimension of {logits})"
                )
        free = (_complement(self.student_ids, num_student), _complement(self.teacher_ids, num_teacher))
        classes = tuple(x.to(device) for x in (self.student_ids, self.teacher_ids, *free))
        if not torch.compiler.is_compiling():
            self._cache[key] = classes
        return classes


def _checked_ids(name: str, ids: object) -> Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        raise TypeError(
            f"vocab_map: {name} must be a 1-D integer torch.Tensor, got "
            f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}"
        )
    ids = ids.detach().to("cpu", torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"vocab_map: {name} must be >= 0, found {int(ids.min())}")
    unique, counts = torch.unique(ids, return_counts=True)
    if bool((counts > 1).any()):
        raise ValueError(
            f"vocab_map: {name} has id {int(unique[counts > 1][0])} more than once (the map must be one to one)"
        )
    return ids


def _complement(ids: Tensor, width: int) -> Tensor:
    """The classes of [0, width) not in ``ids`` (distinct), ascending."""
    free = torch.ones(width, dtype=torch.int32)
    free[ids] = 0
    # A stable sort puts the free classes first, in order: a shape known without the values (width - len(ids)),
    # which torch.compile can trace, where nonzero's is not.
    return torch.sort(free, descending=True, stable=True).indices[: width - ids.numel()]


def _token_ids(tokenizer: object, name: str) -> dict[str, int]:
    if not callable(getattr(tokenizer, "get_vocab", None)):
        raise TypeError(
            f"{name} must be a tokenizer with get_vocab() (transformers or tokenizers), got {type(tokenizer).__name__}"
        )
    return tokenizer.get_vocab()


def vocab_map(student_tokenizer, teacher_tokenizer) -> VocabMap:
    """The ``VocabMap`` of the token strings both tokenizers have, as TRL's GOLD builds it (every string of the
    teacher's ``get_vocab()``, added tokens included, that the student's also has), kept one to one: where strings
    share an id, the first pair in the teacher's id order wins. ``len(map)`` tokens are shared by each side;
    ``map.summary()`` says so against each vocabulary's size.

    The strings must be spelt alike: two byte-level BPE tokenizers (GPT-2's byte alphabet) share them, a byte-level
    and a SentencePiece tokenizer (with its "▁") share few."""
    student = _token_ids(student_tokenizer, "student_tokenizer")
    teacher = _token_ids(teacher_tokenizer, "teacher_tokenizer")
    pairs, used = [], set()
    taken_teacher = set()
    for token, teacher_id in sorted(teacher.items(), key=lambda item: item[1]):
        student_id = student.get(token)
        if student_id is None or student_id in used or teacher_id in taken_teacher:
            continue
        pairs.append((student_id, teacher_id))
        used.add(student_id)
        taken_teacher.add(teacher_id)
    ids = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    return VocabMap(ids[:, 0], ids[:, 1], len(set(student.values())), len(set(teacher.values())))


def resolve_cross_vocab(method: object, *, teacher_temperature=None, **arguments) -> Settings:
    """The checked ``Settings`` of a cross-vocabulary call (arguments.resolve on CROSS_VOCAB_METHODS); its plan
    carries the teacher's temperature, the weights stay None (adaptive) until the logits are seen."""
    for name, value in (("temperature", arguments.get("temperature")), ("teacher_temperature", teacher_temperature)):
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a number here (a learnable temperature is not supported), got a tensor")
    settings = resolve(method, table=CROSS_VOCAB_METHODS, t2_scale=False, **arguments)
    refused = {name: getattr(settings, name) for name in OPTIONS if name not in CROSS_VOCAB_OPTIONS}
    given = {name: value for name, value in refused.items() if value != DEFAULTS[name]}
    if given:
        raise ValueError(
            f"the cross-vocabulary losses do not take {' or '.join(refused)} (their hard-label term is the plain "
            f"cross-entropy), got {', '.join(f'{name}={value!r}' for name, value in given.items())}"
        )
    if teacher_temperature is None:
        teacher_temperature = settings.temperature
    elif torch.compiler.is_compiling():
        # As the student's (arguments.py): a 0-d tensor, checked when the graph runs, that the ops read then, so
        # that a changing value compiles once.
        teacher_temperature = check_temperature(torch.ones((), dtype=torch.float64) * teacher_temperature)
    else:
        bad = isinstance(teacher_temperature, bool) or not isinstance(teacher_temperature, (int, float))
        if bad or not math.isfinite(teacher_temperature) or teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be a finite number > 0, got {teacher_temperature!r}")
        teacher_temperature = float(teacher_temperature)
    params = settings.plan.params._replace(teacher_temperature=teacher_temperature)
    return replace(settings, plan=replace(settings.plan, params=params))


def cross_vocab_loss(
    method: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    vocab_map: VocabMap | tuple[Tensor, Tensor] | None = None,
    temperature: float | None = None,
    teacher_temperature: float | None = None,
    student_log_scale: Tensor | None = None,
    teacher_log_scale: Tensor | None = None,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    normalizer=None,
    ce_weight: float = 0.0,
    distill_weight: float = 1.0,
    return_parts: bool = False,
    mask: Tensor | None = None,
    backend: str = "auto",
    **hyperparameters,
) -> Tensor | LossParts:
    """Distillation loss between a student and a teacher with different vocabularies, plus the hard-label term:
    ``distill_weight * (the method's loss) + ce_weight * CE`` (docs/losses.md, section 11).

    Args:
        method: "uld" (the sorted L1 of the two rows' probabilities) or "hybrid" (GOLD's: a generalized JSD on the
            classes of shared token strings, the sorted L1 on the others; needs ``vocab_map``).
        student_logits: [..., Vs] float tensor; the gradient flows to it.
        teacher_logits: [..., Vt] float tensor with the same leading shape (aligned rows); a constant unless it
            requires grad.
        target: optional student class indices [...] (the student's own labels); ignore_index rows are left out.
        vocab_map: hybrid only: a ``VocabMap`` (``kdkernels.vocab_map``) or (student_ids, teacher_ids).
        temperature, teacher_temperature: T_s (default 1) and T_t (default T_s): q = softmax(s / T_s),
            p = softmax(t / T_t), as GOLD's uld_student_temperature and uld_teacher_temperature. No T^2 factor.
        student_log_scale, teacher_log_scale: optional float tensors [...]: each row's probabilities are
            exp(log_scale) * softmax (a merged group's chained conditional probabilities, kdkernels.alignment);
            the gradient flows to them.
        reduction, ignore_index, normalizer, ce_weight, distill_weight, return_parts, mask: as in
            ``kdkernels.distill_loss`` (ce_weight: the student's cross-entropy at T = 1 against ``target``).
        backend: "auto", "reference" or "cpu" (the fused C++ kernel; a teacher that requires grad goes to the
            reference); a backend without cross-vocabulary kernels raises.
        **hyperparameters: hybrid: beta=0.5 (TRL's generalized JSD: 0 forward KL, 1 reverse KL),
            matched_weight=None, unmatched_weight=None (both, or neither for TRL's adaptive M / Vt and 1 - M / Vt).

    Returns:
        float32 loss (float64 for float64 inputs): 0-d, or the leading shape for reduction="none"; a ``LossParts``
        with ``return_parts``.
    """
    settings = resolve_cross_vocab(
        method,
        teacher_temperature=teacher_temperature,
        temperature=temperature,
        reduction=reduction,
        ignore_index=ignore_index,
        normalizer=normalizer,
        ce_weight=ce_weight,
        distill_weight=distill_weight,
        return_parts=return_parts,
        **hyperparameters,
    )
    leading = _checked_logits(student_logits, teacher_logits)
    vs, vt, device = student_logits.shape[-1], teacher_logits.shape[-1], student_logits.device
    log_scales = tuple(
        _checked_log_scale(name, scale, leading, device)
        for name, scale in (("student_log_scale", student_log_scale), ("teacher_log_scale", teacher_log_scale))
    )
    settings, classes = with_vocab_map(settings, vocab_map, vs, vt, device)
    call = settings.bind(target, leading, vs, device, mask)
    chosen = backends.select_backend(backend, student_logits, entry="cross_vocab")
    loss, parts = chosen.cross_vocab(
        call, student_logits.reshape(-1, vs), teacher_logits.reshape(-1, vt), log_scales, classes
    )
    return finish(call, loss, parts, leading)


def with_vocab_map(settings: Settings, vocab_map: object, vs: int, vt: int, device) -> tuple[Settings, tuple | None]:
    """(settings, classes) of a call on Vs = ``vs`` and Vt = ``vt`` classes: for hybrid the map's classes on the
    device and the plan's weights (TRL's adaptive M / Vt where none are given); uld takes no map."""
    if settings.plan.code == CrossVocab.ULD:
        if vocab_map is not None:
            raise ValueError("vocab_map is for method='hybrid'; uld compares the sorted probabilities of all classes")
        return settings, None
    if vocab_map is None:
        raise ValueError(
            "hybrid needs vocab_map: kdkernels.vocab_map(student_tokenizer, teacher_tokenizer), or a pair "
            "(student_ids, teacher_ids) of the classes with the same token string"
        )
    if isinstance(vocab_map, tuple) and len(vocab_map) == 2:
        vocab_map = VocabMap(*vocab_map)
    if not isinstance(vocab_map, VocabMap):
        raise TypeError(
            f"vocab_map must be a VocabMap or a pair (student_ids, teacher_ids), got {type(vocab_map).__name__}"
        )
    classes = vocab_map.classes(vs, vt, device)
    params = settings.plan.params
    if params.matched_weight is None:
        matched = len(vocab_map) / vt
        params = params._replace(matched_weight=matched, unmatched_weight=1.0 - matched)
    return replace(settings, plan=replace(settings.plan, params=params)), classes


def _checked_logits(student_logits: object, teacher_logits: object) -> torch.Size:
    """The rows' leading shape, once both logits are checked: float tensors of the same leading shape and device,
    each with at least one class."""
    check_float_tensor("student_logits", student_logits)
    check_float_tensor("teacher_logits", teacher_logits)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits [..., Vs] and teacher_logits [..., Vt] must have the same leading shape (one aligned "
            f"row each), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got {student_logits.device} "
            f"and {teacher_logits.device}"
        )
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.shape[-1] < 1:
            raise ValueError(f"{name} must have at least one class, got shape {tuple(x.shape)}")
    return student_logits.shape[:-1]


def _checked_log_scale(name: str, scale: object, leading: torch.Size, device) -> Tensor | None:
    """``scale`` flattened to [N]: None, or a float tensor of the leading shape on the logits' device."""
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(scale, 'dtype', type(scale))}")
    if scale.shape != leading:
        raise ValueError(f"{name} must have the logits' leading shape {tuple(leading)}, got {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {scale.device}")
    return scale.reshape(-1)


__all__ = ["VocabMap", "vocab_map", "cross_vocab_loss"]
