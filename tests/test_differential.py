"""A seeded randomized differential test: every method (tests/cases.py) on every fused backend, and the reference,
against the float64 oracle, on rows drawn with -inf masks (in either model or both, the label among them), classes
whose probability underflows, offsets of hundreds to thousands, ignored rows, rows masked in both or in one model,
NaN logits, identical rows, with or without standardize, the hard-label term (ce_weight, return_parts),
distill_weight (0 too), temperatures and reductions. The loss must match the oracle, inf and NaN exactly; the
gradient wherever the loss is finite. A failing case is rerun by its id: ``pytest tests/test_differential.py -k
'cpu-123'``.

The quick tier runs 460 cases (on CPU tensors: 300 cpu, 100 reference, 60 Triton under its interpreter); the full
tier runs ten times the cpu backend's and the reference's (4,060 in all): Triton's interpreter is too slow for
more. KDKERNELS_DIFFERENTIAL_CASES=k runs k times either tier's. At k = 10 (4,600 cases) the quick tier
found a decoupled bin whose mass underflows in one model where the other masks it (NaN or +inf, now absent: 0), a
row one model masks entirely that the kernels gave +inf (aekt: NaN), and the reference's cross-entropy gradient
rounded at logits near 1500, all fixed; and two rules of the comparison, written below: a value past the range of
its dtype is +-inf (_stored: float16 gradients past 65504), and the gradient of identical rows is measured against
the terms it cancels (_cancelled_scale). Every case of both tiers passes, and the quick tier's at k = 10.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from cases import CASES, case_id
from conftest import DEVICE, FULL_TESTS, backends_under_test
from helpers import TOLERANCE, assert_close
from oracle import oracle

import kdkernels
from kdkernels.backends.triton import common as triton_common

SCALE = int(os.environ.get("KDKERNELS_DIFFERENTIAL_CASES", "1"))  # (module docstring)
# Cases per backend in the quick tier (Triton's interpreter takes about half a second a case on CPU tensors; the
# reference, the eager yardstick of the fused backends' precision, is itself checked on fewer).
QUICK = {"cpu": 300, "cuda": 300, "triton": 60 if DEVICE == "cpu" else 300, "reference": 100}
# The full tier's multiple of them, for the backends whose cases cost little (the C++ kernels, the eager reference):
# under a minute more of CI (the commit that set them gives the times).
FULL = {"cpu": 10, "reference": 10}
SEED = 22
INF, NAN = float("inf"), float("nan")
# A class this far below the rest of its row has probability 0 in float64 too. The divergence family also gets
# classes 89 to 101 T below the row's max, whose float32 probabilities are subnormal: 0 by the underflow rule, which
# the oracle applies (docs/losses.md, section 1). The decoupled family's in-bin terms judge a class against its bin's
# max, a running one in the streamed kernels, so that band is left out for them.
DEEP = 1e4


@dataclass
class Case:
    method: str
    hp: dict
    dtype: torch.dtype
    student: torch.Tensor  # [N, V] float64, then rounded to dtype
    teacher: torch.Tensor
    target: torch.Tensor | None
    options: dict = field(default_factory=dict)
    reduction: str = "none"
    grad_output: np.ndarray | float = 1.0
    tile: int | None = None  # Triton's tile, to stream rows longer than it

    def describe(self) -> str:
        return (
            f"{case_id((self.method, self.hp))} {self.dtype} {tuple(self.student.shape)} {self.reduction} "
            f"{self.options} tile={self.tile}"
        )


def _row_features(rng, s, t, target, subnormal):
    """Draws each row's edge cases into s, t and target, in place; ``subnormal``: the depth of a class whose
    probability underflows to a float32 subnormal (None: always DEEP)."""
    n, v = s.shape
    for r in range(n):
        u = rng.random(8)
        if u[0] < 0.3:  # an offset of one model or both (no probability changes)
            side = rng.integers(3)
            offset = rng.choice([-1, 1]) * rng.uniform(100, 2000)
            if side != 1:
                s[r] += offset
            if side != 0:
                t[r] += offset * (1 if side == 2 else rng.uniform(0.5, 1.5))
        if u[1] < 0.4:  # masked classes: in the student only, the teacher only, or both
            for j in rng.choice(v, size=min(v - 1, rng.integers(1, 4)), replace=False):
                where = rng.integers(3)
                if where != 1:
                    s[r, j] = -INF
                if where != 0:
                    t[r, j] = -INF
        if u[2] < 0.3:  # a class whose probability underflows in one model, the other masking it or not
            j = rng.integers(v)
            deep, other = (s, t) if rng.random() < 0.5 else (t, s)
            if subnormal is not None and rng.random() < 0.5:
                deep[r, j] = _finite_max(deep[r]) - rng.uniform(89, 101) * subnormal
            else:
                deep[r, j] = -_finite_max(-deep[r]) - DEEP
            if rng.random() < 0.5:
                other[r, j] = -INF
        if u[3] < 0.05 and r > 0:  # identical rows (self-distillation: ties everywhere; not all of a batch's)
            t[r] = s[r]
        masked = u[4] < 0.06
        if masked:  # masked in both logits: loss 0, counted
            s[r], t[r] = -INF, -INF
        elif u[4] < 0.08:  # masked in one model only: NaN
            (s if rng.random() < 0.5 else t)[r] = -INF
        if u[5] < 0.1 or (masked and u[5] < 0.4):  # a NaN logit (the only one not -inf of a masked row): NaN loss
            side = 0 if masked else rng.integers(4)  # in both models, or +inf in the other: with standardize both
            if side != 1:  # rows' z-scores are NaN
                s[r, rng.integers(v)] = NAN
            if side >= 1:
                t[r, rng.integers(v)] = NAN if side < 3 else INF
        if target is not None:
            if u[6] < 0.15:
                target[r] = -100  # ignored (may hold NaN: must not leak)
            elif u[7] < 0.2:  # the label masked in the student, or in both
                s[r, target[r]] = -INF
                if rng.random() < 0.5:
                    t[r, target[r]] = -INF


# Besides the random edge cases, each case plants one in its first row (and, for NaN, its last), so that even a
# short tier has them all: every method gets its family's first spotlight, then the next, and so on.
SPOTLIGHTS = {
    "divergence": ("underflow against a masked class", "NaN", "ce_weight 0, the label masked", "label masked in both"),
    "decoupled": (
        "label masked in both",
        "label or top-1 masked in the student",
        "NaN",
        "ce_weight 0, the label masked",
    ),
}


def _finite_max(row) -> float:
    """The largest finite value of a row (0 if it has none)."""
    finite = row[np.isfinite(row)]
    return float(finite.max()) if finite.size else 0.0


def _spotlight(kind, rng, s, t, target, options, by_label):
    """Plants the edge case ``kind`` (SPOTLIGHTS) in the first row of s, t and target, in place; ``by_label``: the
    method's partition is the label's (else the teacher's top-1 is the class its student masks)."""
    v = s.shape[1]
    if target is not None:
        target[0] = rng.integers(v)
    if kind == "underflow against a masked class":
        j = rng.integers(v)
        depth = DEEP if rng.random() < 0.5 else rng.uniform(89, 101) * options["temperature"]
        deep, other = (s, t) if rng.random() < 0.5 else (t, s)
        deep[0, j], other[0, j] = _finite_max(deep[0]) - depth, -INF
    elif kind == "NaN":  # both rows' z-scores NaN with standardize; and a NaN the only logit not -inf
        options["standardize"] = bool(rng.random() < 0.7)
        s[0, rng.integers(v)], t[0, rng.integers(v)] = NAN, rng.choice([NAN, INF])
        s[-1], t[-1] = -INF, -INF
        s[-1, rng.integers(v)] = NAN
    elif kind == "ce_weight 0, the label masked":
        options.update(ce_weight=0.0, return_parts=True)
        s[0, target[0]] = -INF
    elif kind == "label masked in both":
        s[0, target[0]], t[0, target[0]] = -INF, -INF
    elif by_label:  # label (or top-1) masked in the student only
        s[0, target[0]], t[0, target[0]] = -INF, max(t[0, target[0]], 0.0)
    else:
        t[0, 0] = _finite_max(t[0]) + 1.0
        s[0, 0] = -INF


def draw(backend: str, index: int) -> Case:
    """The case ``index`` of ``backend``: every method in turn, the rest drawn from a seeded generator."""
    rng = np.random.default_rng([SEED, index, zlib.crc32(backend.encode())])
    method, hp = CASES[index % len(CASES)]
    spec = kdkernels.METHODS[method]
    spotlights = SPOTLIGHTS[spec.family]
    spotlight = spotlights[(index // len(CASES)) % len(spotlights)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float16]
    if backend in ("cpu", "reference"):
        dtypes.append(torch.float64)
    dtype = dtypes[rng.integers(len(dtypes))]
    n = int(rng.integers(2, 6))
    v = int(rng.integers(6, 48 if backend == "triton" else 300))
    s = rng.normal(size=(n, v)) * rng.uniform(0.3, 5.0)
    t = rng.normal(size=(n, v)) * rng.uniform(0.3, 5.0)
    options: dict = {"temperature": float(rng.choice([spec.temperature, 1.0, 2.0, 0.5]))}
    options["standardize"] = bool(rng.random() < 0.25)
    ce_weight = float(rng.choice([0.0, 0.0, 0.3, 1.0]))
    by_label = spec.plan(spec.resolve(hp)).needs_target
    needs_target = by_label or "label" in spotlight
    target = rng.integers(0, v, size=n) if needs_target or ce_weight or rng.random() < 0.3 else None
    _row_features(rng, s, t, target, options["temperature"] if spec.family == "divergence" else None)
    if target is not None:
        options["ce_weight"] = ce_weight
        options["return_parts"] = bool(rng.random() < 0.3)
    options["distill_weight"] = float(rng.choice([1.0, 1.0, 1.0, 0.5, 0.0]))
    _spotlight(spotlight, rng, s, t, target, options, by_label)
    reduction = str(rng.choice(["none", "none", "sum", "batchmean"]))
    grad_output = rng.uniform(-2, 2, size=n) if reduction == "none" else float(rng.uniform(0.5, 2))
    tile = int(rng.choice([8, 16])) if backend == "triton" and rng.random() < 0.3 else None
    return Case(
        method,
        hp,
        dtype,
        torch.from_numpy(s).to(dtype),
        torch.from_numpy(t).to(dtype),
        None if target is None else torch.from_numpy(target),
        options,
        reduction,
        grad_output,
        tile,
    )


def _oracle(case: Case, **weights):
    spec = kdkernels.METHODS[case.method]
    options = {**case.options, **weights}
    with np.errstate(all="ignore"):  # (inf and NaN are expected values here)
        return oracle(
            case.method,
            case.student.double().numpy(),
            case.teacher.double().numpy(),
            None if case.target is None else case.target.numpy(),
            spec.resolve(case.hp),
            options["temperature"],
            spec.t2_scale,
            case.reduction,
            grad_output=case.grad_output,
            ce_weight=options.get("ce_weight", 0.0),
            distill_weight=options["distill_weight"],
            standardize=options["standardize"],
            float64_math=case.dtype == torch.float64,
        )


def _run(case: Case, backend: str, device: str):
    """(loss, gradient, the distillation part or None) of kdkernels on the case."""
    x = case.student.to(device).clone().requires_grad_(True)
    out = kdkernels.distill_loss(
        case.method,
        x,
        case.teacher.to(device),
        None if case.target is None else case.target.to(device),
        backend=backend,
        reduction=case.reduction,
        **case.hp,
        **case.options,
    )
    loss = out.loss if case.options.get("return_parts") else out
    loss.backward(torch.as_tensor(case.grad_output, dtype=loss.dtype, device=device))
    return loss.detach().cpu(), x.grad.cpu(), out.distill.cpu() if case.options.get("return_parts") else None


def _max_error(got, want) -> float:
    """The max error over max |want|, at least 1e-4: values that cancel to nearly 0 (identical rows) are compared in
    absolute terms."""
    got, want = np.asarray(got.double(), dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-4)) if want.size else 0.0


def _compare(got, want, dtype, what, eager=None, min_scale=0.0):
    """assert_close (inf and NaN exactly); where a finite value misses the tolerance, the project's other bar: no
    worse than twice the eager float32 reference's error on the same inputs (``eager()`` gives its value), which is
    what float32 can do there (a gradient that cancels to 1e-3 of its terms, say)."""
    try:
        assert_close(got, want, dtype, what, min_scale)
    except AssertionError:
        got, finite = got.double(), np.asarray(np.isfinite(want))
        if eager is None or dtype == torch.float64 or not torch.isfinite(got[torch.from_numpy(finite)]).all():
            raise
        assert_close(got[torch.from_numpy(np.asarray(~finite))], want[~finite], dtype, what)  # (inf, NaN: exactly)
        error = _max_error(got[torch.from_numpy(finite)], want[finite])
        eager_error = _max_error(eager()[torch.from_numpy(finite)], want[finite])
        assert error <= max(TOLERANCE[torch.float32], 2 * eager_error), (
            f"{what}: error {error:.3e}, the eager float32 reference's {eager_error:.3e}"
        )


def _overflows(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return np.isinf(torch.from_numpy(np.asarray(values)).to(dtype).double().numpy())


def _stored(want, dtype: torch.dtype, unit=1.0) -> np.ndarray:
    """The oracle's float64 values as a tensor of ``dtype`` holds them where they pass its range: +-inf (the loss is
    float32, the gradient the student's dtype: float16 ends at 65504; docs/losses.md, "Precision"); the others as
    they are, the tolerance's to judge. ``unit``: the factor the value was stored at before it was scaled to want
    (a fused backend stores the gradient at grad_output 1, then multiplies it by grad_output: one per row)."""
    want = np.asarray(want, dtype=np.float64)
    unit = np.asarray(unit, dtype=np.float64).reshape(-1, *[1] * max(want.ndim - 1, 0)) if np.ndim(unit) else unit
    overflows = np.isfinite(want) & (_overflows(want, dtype) | _overflows(want / unit, dtype))
    return np.where(overflows, np.copysign(np.inf, want), want)


def _cancelled_scale(case: Case) -> float:
    """The size of the terms that the gradient of an identical row (self-distillation) cancels: its loss and
    gradient are exactly 0, so a float32 backend's gradient there is its rounding of those terms, which the
    tolerance must measure against them, not against 0 (the scale of a comparison is the batch's largest |gradient|:
    0 where every compared row is identical). Their size: the largest finite gradient the oracle gives those rows
    against the same logits rolled by one class (the same weights, temperature and magnitudes, nothing cancelled);
    0 without identical rows."""
    s, t = case.student.double(), case.teacher.double()
    same = ((s == t) | (torch.isnan(s) & torch.isnan(t))).all(-1)
    if not same.any():
        return 0.0
    teacher = case.teacher.clone()
    teacher[same] = case.student[same].roll(1, -1)
    _, grad = _oracle(replace(case, teacher=teacher))
    grad = np.abs(grad[same.numpy()])
    grad = grad[np.isfinite(grad)]
    return float(grad.max()) if grad.size else 0.0


def check(case: Case, backend: str, device: str) -> None:
    loss, grad, distill = _run(case, backend, device)
    want, want_grad = _oracle(case)
    want = _stored(want, loss.dtype)
    want_grad = _stored(want_grad, grad.dtype, 1.0 if backend == "reference" else case.grad_output)
    runs = []

    def eager(i, mask=None):
        """The eager reference's value i (loss, gradient, distillation part), run once and only if asked for; None
        for the reference itself, whose only bar is the tolerance."""
        if backend == "reference":
            return None

        def value():
            if not runs:
                runs.extend(_run(case, "reference", device))
            return runs[i] if mask is None else runs[i][mask]

        return value

    what = f"{backend} {case.describe()}"
    _compare(loss, want, case.dtype, f"{what}: loss", eager(0))
    finite = torch.from_numpy(np.broadcast_to(np.isfinite(want), want_grad.shape[:-1]).copy())
    want_grad, scale = want_grad[finite.numpy()], _cancelled_scale(case)
    _compare(grad[finite], want_grad, case.dtype, f"{what}: gradient", eager(1, finite), scale)
    if distill is not None:
        want_distill = _stored(_oracle(case, ce_weight=0.0, distill_weight=1.0)[0], distill.dtype)
        _compare(distill, want_distill, case.dtype, f"{what}: parts.distill", eager(2))


def _cases():
    count = {b: QUICK.get(b, 60) * (FULL.get(b, 1) if FULL_TESTS else 1) * SCALE for b in backends_under_test()}
    return [(b, i) for b, n in count.items() for i in range(n)]


@pytest.mark.parametrize("fused_backend, index", _cases(), ids=[f"{b}-{i}" for b, i in _cases()])
def test_matches_oracle(fused_backend, index, device, monkeypatch):
    case = draw(fused_backend, index)
    if case.tile is not None:
        monkeypatch.setattr(triton_common, "MAX_TILE", case.tile)
        monkeypatch.setattr(triton_common, "SMALL_TILE", case.tile)
    check(case, fused_backend, device)


def features(case: Case) -> set[str]:
    """The edge cases of issue 22 (items 1-6) that a case holds, for the check of the generator below."""
    s, t, target, options = case.student.double(), case.teacher.double(), case.target, case.options
    family = kdkernels.METHODS[case.method].family
    found = {case.method, case.reduction}
    labels = [] if target is None else [(r, int(y)) for r, y in enumerate(target) if y >= 0]
    if options.get("return_parts") and options.get("ce_weight") == 0 and any(s[r, y] == -INF for r, y in labels):
        found.add("1: ce_weight 0, the label masked in the student")
    if options["distill_weight"] == 0:
        found.add("1: distill_weight 0")
    for deep, other in ((s, t), (t, s)):
        low = deep < torch.nan_to_num(deep, neginf=0.0).amax(-1, keepdim=True) - 88 * options["temperature"]
        if (low & torch.isneginf(other)).any():
            found.add("2, 6: underflow against a masked class")
    one_sided = torch.isneginf(s) ^ torch.isneginf(t)
    if case.method == "abkd" and 0.0 in (case.hp["alpha"], case.hp["beta"]) and one_sided.any():
        found.add("3: abkd limit, a class masked in one model")
    if case.method == "aekt" and any(s[r, y] == t[r, y] == -INF for r, y in labels):
        found.add("4: aekt, the label masked in both")
    nan_s, nan_t = torch.isnan(s).any(-1), (torch.isnan(t) | torch.isposinf(t)).any(-1)
    if options["standardize"] and (nan_s & nan_t).any():
        found.add("5: standardize, NaN in both rows")
    if ((torch.isneginf(s) | torch.isnan(s)).all(-1) & torch.isneginf(t).all(-1) & nan_s).any():
        found.add("5: NaN the only logit not -inf")
    if family == "decoupled" and any(s[r, y] == -INF and t[r, y] > -INF for r, y in labels):
        found.add("6: decoupled, the label masked in the student only")
    return found


def test_the_cases_reach_every_method_and_edge_case():
    """Each fused backend's quick tier holds every method, reduction and edge case of issue 22 (items 1-6) it had
    wrong: a check of the generator, so that a change to it cannot quietly drop one."""
    wanted = {m for m, _ in CASES} | {"none", "sum", "batchmean"}
    wanted |= {
        "1: distill_weight 0",
        "2, 6: underflow against a masked class",
        "3: abkd limit, a class masked in one model",
        "4: aekt, the label masked in both",
        "6: decoupled, the label masked in the student only",
    }
    only = {"cpu": {"1: ce_weight 0, the label masked in the student"}, "reference": set()}
    only["cuda"] = only["cpu"]
    only["triton"] = {"5: standardize, NaN in both rows", "5: NaN the only logit not -inf"}
    for backend in {b for b, _ in _cases()}:
        found = set().union(*(features(draw(backend, i)) for i in range(QUICK.get(backend, 60))))
        assert wanted | only.get(backend, set()) <= found, sorted(wanted | only.get(backend, set()) - found)
