"""The table of distillation methods: one entry per loss of LOSSES.md.

Every layer (functional API, modules, reference, kernels, demo, README table) reads names, families, defaults and
hyperparameter checks from here, so a method is described exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

DIVERGENCE = "divergence"
DECOUPLED = "decoupled"

REDUCTIONS = ("batchmean", "sum", "none")
CAKD_STRONG = ("target", "topk", "threshold")


def _finite(name: str) -> Callable[[object], None]:
    def check(value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")

    return check


def _in_range(name: str, low: float, high: float, low_open: bool, high_open: bool) -> Callable[[object], None]:
    finite = _finite(name)
    text = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(value: object) -> None:
        finite(value)
        if (value < low or (low_open and value == low)) or (value > high or (high_open and value == high)):
            raise ValueError(f"{name} must be in {text}, got {value!r}")

    return check


def _positive(name: str) -> Callable[[object], None]:
    finite = _finite(name)

    def check(value: object) -> None:
        finite(value)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")

    return check


def _top_k(value: object) -> None:
    # The upper bound (k < V) needs the vocabulary size: functional.py checks it once the logits are known.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"k must be an integer >= 1, got {value!r}")


def _one_of(name: str, choices: tuple) -> Callable[[object], None]:
    def check(value: object) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    return check


@dataclass(frozen=True)
class Method:
    """One loss: its family, hyperparameters (name -> default), their checks and its defaults."""

    name: str
    family: str
    source: str
    hyperparameters: Mapping[str, object]
    checks: Mapping[str, Callable[[object], None]]
    temperature: float
    t2_scale: bool
    target: str = "optional"  # "optional": only marks ignored rows; "required"; or "strong=target" (cakd)
    uses_topk: Callable[[Mapping[str, object]], bool] = field(default=lambda hp: False)

    def needs_target(self, hp: Mapping[str, object]) -> bool:
        """Whether the loss indexes the target (and so requires it and bounds-checks it)."""
        if self.target == "required":
            return True
        if self.target == "strong=target":
            return hp["strong"] == "target"
        return False

    def resolve(self, overrides: Mapping[str, object]) -> dict:
        """Defaults updated with ``overrides``, each checked; unknown names raise TypeError."""
        unknown = sorted(set(overrides) - set(self.hyperparameters))
        if unknown:
            known = ", ".join(self.hyperparameters) or "none"
            raise TypeError(f"{self.name}: unexpected hyperparameter(s) {unknown}; this method takes: {known}")
        hp = {**self.hyperparameters, **overrides}
        for name, value in hp.items():
            self.checks[name](value)
        return hp


_F = _finite
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("kd", DIVERGENCE, "Hinton et al. 2015, forward KL (mdistiller KD)", {}, {}, 4.0, True),
        Method("rkl", DIVERGENCE, "reverse KL", {}, {}, 1.0, False),
        Method(
            "jsd", DIVERGENCE, "generalized JSD (TRL GKD, Liger)",
            {"beta": 0.5}, {"beta": _in_range("beta", 0, 1, False, False)}, 1.0, False,
        ),
        Method(
            "skew_fkl", DIVERGENCE, "skew forward KL (DistiLLM)",
            {"skew": 0.1}, {"skew": _in_range("skew", 0, 1, True, True)}, 1.0, False,
        ),
        Method(
            "skew_rkl", DIVERGENCE, "skew reverse KL (DistiLLM)",
            {"skew": 0.1}, {"skew": _in_range("skew", 0, 1, True, True)}, 1.0, False,
        ),
        Method("tvd", DIVERGENCE, "total variation distance", {}, {}, 1.0, False),
        Method(
            "abkd", DIVERGENCE, "ABKD, alpha-beta divergence (arXiv 2505.04560)",
            {"alpha": 0.5, "beta": 0.5}, {"alpha": _F("alpha"), "beta": _F("beta")}, 1.0, False,
        ),
        Method(
            "dkd", DECOUPLED, "DKD, Zhao et al. 2022 (mdistiller DKD.py)",
            {"alpha": 1.0, "beta": 8.0}, {"alpha": _F("alpha"), "beta": _F("beta")}, 4.0, True, target="required",
        ),
        Method(
            "gdkd", DECOUPLED, "GDKD (arXiv 2512.04625; ZaberKo/GDKD)",
            {"k": 5, "w0": 1.0, "w1": 1.0, "w2": 8.0, "partitions": 2},
            {"k": _top_k, "w0": _F("w0"), "w1": _F("w1"), "w2": _F("w2"), "partitions": _one_of("partitions", (2, 3))},
            4.0, True, uses_topk=lambda hp: True,
        ),
        Method(
            "cakd", DECOUPLED, "CAKD (arXiv 2410.14741)",
            {"alpha": 1.0, "beta": 8.0, "bcd_weight": 1.0, "strong": "target", "k": 5, "tau": 0.5},
            {
                "alpha": _F("alpha"), "beta": _F("beta"), "bcd_weight": _F("bcd_weight"),
                "strong": _one_of("strong", CAKD_STRONG), "k": _top_k, "tau": _in_range("tau", 0, 1, True, False),
            },
            4.0, True, target="strong=target", uses_topk=lambda hp: hp["strong"] == "topk",
        ),
        Method(
            "aekt", DECOUPLED, "AEKT (arXiv 2409.01679)",
            {"beta": 8.0, "max_weight": 5.0}, {"beta": _F("beta"), "max_weight": _positive("max_weight")},
            4.0, True, target="required",
        ),
    ]
}


def finite_when_missing(method: str, hp: Mapping[str, object], missing: str) -> bool:
    """Whether the loss stays finite when ``missing`` ("student" or "teacher") gives probability 0 to a class that
    the other model gives mass to (a padded vocabulary, a sparse teacher's empty tail).

    With q_j = 0 < p_j (student missing): KL(p || q) terms p log(p / q) are infinite, so kd, jsd at beta = 0 and
    the decoupled family (forward KLs) are; rkl, jsd at beta > 0, the skews and tvd stay finite; abkd's terms stay
    finite iff beta > 0 and alpha + beta > 0 (q^beta and q^(alpha+beta) -> 0; every log q is weighted by a power of
    q). With p_j = 0 < q_j (teacher missing) the roles swap: rkl and jsd at beta = 1 are infinite, abkd is finite
    iff alpha > 0 and alpha + beta > 0, the forward KLs stay finite.
    """
    spec = get_method(method)
    if missing not in ("student", "teacher"):
        raise ValueError(f"missing must be 'student' or 'teacher', got {missing!r}")
    student = missing == "student"
    if spec.family == DECOUPLED or method == "kd":
        return not student
    if method == "rkl":
        return student
    if method == "jsd":
        return hp["beta"] > 0 if student else hp["beta"] < 1
    if method == "abkd":
        a, b = (hp["alpha"], hp["beta"]) if student else (hp["beta"], hp["alpha"])
        return b > 0 and a + b > 0
    return True  # skew_fkl, skew_rkl (the mixture is never 0 where its KL weights it), tvd


def get_method(name: object) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
