"""The method table: every loss, and the one place that turns a method and its hyperparameters into a kernel plan.

A ``Method`` entry holds what users see (name, function and module names, source, hyperparameters with their
defaults and checks, default temperature and T^2 scaling) and ``plan(hp)``: what every backend computes, as a
``Plan`` of

    family   "divergence" (two softmaxes, one f-divergence per class) or "decoupled" (a partition of the classes
             into bins, the KL of the bin masses and weighted in-bin KLs);
    code     a named code of the family's formula (``Divergence``) or partition (``Partition``): the canonical
             form, e.g. jsd at beta = 0 is ``Divergence.KD``;
    params   the family's named parameters (``DivergenceParams``, ``DecoupledParams``).

The codes and parameter layouts are shared by name with the Triton kernels (``tl.constexpr`` copies of these
values) and the C++ kernels (enums and X-macro structs in csrc/divergence.h and csrc/decoupled.h); a test checks
that the three agree. The public functions, modules and ``kdkernels.parallel`` functions are generated from this
table. docs/losses.md is the math of every code.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

DIVERGENCE = "divergence"
DECOUPLED = "decoupled"
FAMILIES = (DIVERGENCE, DECOUPLED)
CROSS_VOCAB = "cross_vocab"  # the family of the losses between two vocabularies (CROSS_VOCAB_METHODS)
REDUCTIONS = ("batchmean", "sum", "none")
# The z-score of logit standardization (option standardize): (x - mean) / (std + STANDARDIZE_EPS), as Sun et al.'s
# code (sunshangquan/logit-standardization-KD) writes it; the kernels take it from here (C++: csrc/row_math.h).
STANDARDIZE_EPS = 1e-7
# bdkd weighs one KL by 3 where one model's entropy is the larger; the entropies count as equal (both weights 1)
# within BDKD_TIE eps (1 + H(p) + H(q)), eps the machine epsilon of the math type, above the rounding of computing them
# (docs/losses.md, "bdkd's tie"; C++: csrc/divergence.h).
BDKD_TIE = 256.0
CAKD_STRONG = ("target", "topk", "threshold")
GDKD_STRATEGIES = ("best", "worst")
# gdkd's in-bin KL: (weight of KL(p^b || q^b), weight of KL(q^b || p^b)) per kl_type, as ZaberKo/GDKD averages them.
GDKD_KL_TYPES = {"forward": (1.0, 0.0), "reverse": (0.0, 1.0), "both": (0.5, 0.5)}


class Divergence(enum.IntEnum):
    """Per-class formula of the divergence family (docs/losses.md, "Divergence family")."""

    KD = 0  # KL(p || q)
    RKL = 1  # KL(q || p)
    JSD = 2  # mix_p KL(p || m) + mix_q KL(q || m), m = mix_p p + mix_q q
    SKEW_FKL = 3  # KL(p || m)
    SKEW_RKL = 4  # KL(q || m)
    TVD = 5  # |p - q| / 2
    ABKD = 6  # alpha-beta divergence, alpha, beta and alpha + beta nonzero
    ABKD_ALPHA0 = 7  # its limit at alpha = 0
    ABKD_BETA0 = 8  # at beta = 0
    ABKD_OPPOSITE = 9  # at alpha = -beta
    ABKD_ZERO = 10  # at alpha = beta = 0
    WSD = 11  # w_fkl KL(p || q) + w_rkl KL(q || p)
    BDKD = 12  # the same, each weight applied only when its model's entropy is the larger (1 otherwise)
    AKL = 13  # w_head KL(p || q) + w_tail KL(q || p), the weights from |p - q| on the teacher's head and tail


ABKD_CODES = frozenset(
    {Divergence.ABKD, Divergence.ABKD_ALPHA0, Divergence.ABKD_BETA0, Divergence.ABKD_OPPOSITE, Divergence.ABKD_ZERO}
)


class Partition(enum.IntEnum):
    """How the decoupled family picks the strong bin (docs/losses.md, "Decoupled family")."""

    TARGET = 0  # {target}
    TOPK = 1  # the teacher's k largest raw logits (its k smallest with DecoupledParams.lowest)
    THRESHOLD = 2  # {i : t_i - max t >= T log(tau)}


class Bin(enum.IntEnum):
    """The decoupled family's bins, in every layer: the teacher's top-1 (only with split_top1), the strong set
    (without the top-1 when split), the rest."""

    TOP1 = 0
    STRONG = 1
    REST = 2


class DivergenceParams(NamedTuple):
    """Named parameters of a divergence-family plan (the order is the kernels' layout)."""

    mix_p: float = 0.0  # jsd / skews: the mixture m = mix_p p + mix_q q
    mix_q: float = 0.0
    log_mix_p: float = 0.0  # their logs (computed here in double precision)
    log_mix_q: float = 0.0
    alpha: float = 0.0  # abkd
    beta: float = 0.0
    w_fkl: float = 0.0  # wsd: the weights of KL(p || q) and KL(q || p); bdkd: their weights when the teacher's
    w_rkl: float = 0.0  # (w_fkl), the student's (w_rkl) entropy is the larger, 1 otherwise
    mu: float = 0.0  # akl: the teacher's head is its top classes of cumulative probability <= mu (at least one)


class DecoupledParams(NamedTuple):
    """Named parameters of a decoupled-family plan (the order is the kernels' layout)."""

    k: int = 0  # TOPK: size of the strong set
    log_tau: float = 0.0  # THRESHOLD
    split_top1: bool = False  # TOPK: the teacher's top-1 is a bin of its own (gdkd partitions=3)
    lowest: bool = False  # TOPK: the strong set is the teacher's k smallest raw logits (gdkd strategy="worst")
    adaptive: bool = False  # TARGET: w_mass is min(P_strong / Q_strong, max_weight), not differentiated (aekt)
    w_mass: float = 0.0  # weight of the KL of the bin masses
    w_strong: float = 0.0  # weight of the in-bin divergence of the strong bin
    w_rest: float = 0.0  # and of the rest
    w_fkl: float = 1.0  # the in-bin divergence: w_fkl KL(p^b || q^b) + w_rkl KL(q^b || p^b) (gdkd kl_type)
    w_rkl: float = 0.0
    max_weight: float = 0.0  # adaptive: the cap of w_mass


@dataclass(frozen=True)
class Plan:
    """What every backend computes for one method and its hyperparameters."""

    family: str
    code: int
    params: DivergenceParams | DecoupledParams

    @property
    def needs_target(self) -> bool:
        """Whether the loss indexes the target (so requires it and bounds-checks it)."""
        return self.family == DECOUPLED and self.code == Partition.TARGET

    @property
    def top_k(self) -> int:
        """k of a top-k partition (which must be smaller than V), else 0."""
        return self.params.k if self.family == DECOUPLED and self.code == Partition.TOPK else 0


# ---- hyperparameter checks --------------------------------------------------------------------------------------


def as_number(value: object) -> object:
    """A NumPy scalar (any numbers.Integral or numbers.Real) as the Python int or float it is; bools and everything
    else unchanged, for the checks to judge."""
    if isinstance(value, bool) or type(value) in (int, float) or not isinstance(value, numbers.Real):
        return value  # (type, not isinstance: numpy.float64 is a float subclass)
    return int(value) if isinstance(value, numbers.Integral) else float(value)


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


def _weight(name: str) -> Callable[[object], None]:
    """A weight of a term of the loss: finite and >= 0 (a negative one would make the loss unbounded below)."""
    finite = _finite(name)

    def check(value: object) -> None:
        finite(value)
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (a weight of the loss), got {value!r}")

    return check


def _top_k(value: object) -> None:
    # The upper bound (k < V) needs the vocabulary size: checked with the logits (arguments.Settings.bind).
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"k must be an integer >= 1, got {value!r}")


def _one_of(name: str, choices: tuple) -> Callable[[object], None]:
    def check(value: object) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    return check


# ---- plans ------------------------------------------------------------------------------------------------------


def _divergence(code: Divergence, **params) -> Plan:
    return Plan(DIVERGENCE, code, DivergenceParams(**params))


def _mixture(weight_p: float) -> dict:
    """m = weight_p p + (1 - weight_p) q, weights and their logs."""
    return dict(mix_p=weight_p, mix_q=1 - weight_p, log_mix_p=math.log(weight_p), log_mix_q=math.log1p(-weight_p))


def _jsd_plan(hp) -> Plan:
    beta = hp["beta"]
    if beta in (0, 1):  # the TRL / Liger endpoints are exactly the two KLs
        return _divergence(Divergence.KD if beta == 0 else Divergence.RKL)
    return _divergence(Divergence.JSD, **_mixture(beta))


def _abkd_plan(hp) -> Plan:
    a, b = hp["alpha"], hp["beta"]
    if a == 0:
        code = Divergence.ABKD_ZERO if b == 0 else Divergence.ABKD_ALPHA0
    else:
        code = Divergence.ABKD_BETA0 if b == 0 else Divergence.ABKD_OPPOSITE if a + b == 0 else Divergence.ABKD
    return _divergence(code, alpha=a, beta=b)


def _wsd_plan(hp) -> Plan:
    lam = hp["lam"]
    if lam in (0, 1):  # the endpoints are exactly the two KLs
        return _divergence(Divergence.KD if lam == 0 else Divergence.RKL)
    return _divergence(Divergence.WSD, w_fkl=1 - lam, w_rkl=lam)


def _decoupled(partition: Partition, **params) -> Plan:
    return Plan(DECOUPLED, partition, DecoupledParams(**params))


def _gdkd_plan(hp) -> Plan:
    split_top1, lowest = hp["partitions"] == 3, hp["strategy"] == "worst"
    if split_top1 and lowest:  # ZaberKo/GDKD's 3-partition loss splits off the teacher's best class: no "worst"
        raise ValueError(
            "gdkd: strategy='worst' (the teacher's k smallest logits) needs partitions=2, got "
            "partitions=3 (its extra bin is the teacher's top-1)"
        )
    w_fkl, w_rkl = GDKD_KL_TYPES[hp["kl_type"]]
    return _decoupled(
        Partition.TOPK,
        k=hp["k"],
        split_top1=split_top1,
        lowest=lowest,
        w_mass=hp["w0"],
        w_strong=hp["w1"],
        w_rest=hp["w2"],
        w_fkl=w_fkl,
        w_rkl=w_rkl,
    )


def _cakd_plan(hp) -> Plan:
    partition = {"target": Partition.TARGET, "topk": Partition.TOPK, "threshold": Partition.THRESHOLD}[hp["strong"]]
    return _decoupled(
        partition,
        k=hp["k"] if partition == Partition.TOPK else 0,
        log_tau=math.log(hp["tau"]) if partition == Partition.THRESHOLD else 0.0,
        w_mass=hp["bcd_weight"],
        w_strong=hp["alpha"],
        w_rest=hp["beta"],
    )


# ---- the table --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Method:
    """One loss: its names, source, hyperparameters (name -> default) with their checks, defaults and plan."""

    name: str
    module: str  # class name of its nn.Module
    source: str
    hyperparameters: Mapping[str, object]
    checks: Mapping[str, Callable[[object], None]]
    temperature: float
    t2_scale: bool
    plan: Callable[[Mapping[str, object]], Plan]

    @property
    def function(self) -> str:
        """Name of its public function."""
        return f"{self.name}_loss"

    @property
    def family(self) -> str:
        return self.plan(self.hyperparameters).family

    def resolve(self, overrides: Mapping[str, object]) -> dict:
        """Defaults updated with ``overrides``, each checked; unknown names raise TypeError."""
        unknown = sorted(set(overrides) - set(self.hyperparameters))
        if unknown:
            known = ", ".join(self.hyperparameters) or "none"
            raise TypeError(f"{self.name}: unexpected hyperparameter(s) {unknown}; this method takes: {known}")
        hp = {**self.hyperparameters, **{name: as_number(value) for name, value in overrides.items()}}
        for name, value in hp.items():
            self.checks[name](value)
        return hp


_F, _W = _finite, _weight
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            name="kd",
            module="KDLoss",
            source="Hinton et al. 2015, forward KL (mdistiller KD)",
            hyperparameters={},
            checks={},
            temperature=4.0,
            t2_scale=True,
            plan=lambda hp: _divergence(Divergence.KD),
        ),
        Method(
            name="rkl",
            module="RKLLoss",
            source="reverse KL",
            hyperparameters={},
            checks={},
            temperature=1.0,
            t2_scale=False,
            plan=lambda hp: _divergence(Divergence.RKL),
        ),
        Method(
            name="jsd",
            module="JSDLoss",
            source="generalized JSD (TRL GKD, Liger)",
            hyperparameters={"beta": 0.5},
            checks={"beta": _in_range("beta", 0, 1, False, False)},
            temperature=1.0,
            t2_scale=False,
            plan=_jsd_plan,
        ),
        Method(
            name="skew_fkl",
            module="SkewFKLLoss",
            source="skew forward KL (DistiLLM)",
            hyperparameters={"skew": 0.1},
            checks={"skew": _in_range("skew", 0, 1, True, True)},
            temperature=1.0,
            t2_scale=False,
            plan=lambda hp: _divergence(Divergence.SKEW_FKL, **_mixture(hp["skew"])),
        ),
        Method(
            name="skew_rkl",
            module="SkewRKLLoss",
            source="skew reverse KL (DistiLLM)",
            hyperparameters={"skew": 0.1},
            checks={"skew": _in_range("skew", 0, 1, True, True)},
            temperature=1.0,
            t2_scale=False,
            plan=lambda hp: _divergence(Divergence.SKEW_RKL, **_mixture(1 - hp["skew"])),
        ),
        Method(
            name="tvd",
            module="TVDLoss",
            source="total variation distance",
            hyperparameters={},
            checks={},
            temperature=1.0,
            t2_scale=False,
            plan=lambda hp: _divergence(Divergence.TVD),
        ),
        Method(
            name="abkd",
            module="ABKDLoss",
            source="ABKD, alpha-beta divergence (Wang et al., ICML 2025, arXiv 2505.04560)",
            hyperparameters={"alpha": 0.5, "beta": 0.5},
            checks={"alpha": _F("alpha"), "beta": _F("beta")},
            temperature=1.0,
            t2_scale=False,
            plan=_abkd_plan,
        ),
        Method(
            name="wsd",
            module="WSDLoss",
            source="weighted sum of forward and reverse KL, symmetric KL at lam = 0.5 (ABKD authors' LLM code)",
            hyperparameters={"lam": 0.5},
            checks={"lam": _in_range("lam", 0, 1, False, False)},
            temperature=1.0,
            t2_scale=False,
            plan=_wsd_plan,
        ),
        Method(
            name="bdkd",
            module="BDKDLoss",
            source="entropy-weighted forward and reverse KL (ABKD authors' LLM code)",
            hyperparameters={},
            checks={},
            temperature=1.0,
            t2_scale=False,
            plan=lambda hp: _divergence(Divergence.BDKD, w_fkl=3.0, w_rkl=3.0),
        ),
        Method(
            name="akl",
            module="AKLLoss",
            source="AKL, adaptive KL (Wu et al., COLING 2025; wutaiqiang/LLM_KD_AKL)",
            hyperparameters={"mu": 0.5},
            checks={"mu": _in_range("mu", 0, 1, True, True)},
            temperature=1.0,
            t2_scale=False,
            plan=lambda hp: _divergence(Divergence.AKL, mu=hp["mu"]),
        ),
        Method(
            name="dkd",
            module="DKDLoss",
            source="DKD, Zhao et al. 2022 (mdistiller DKD.py)",
            hyperparameters={"alpha": 1.0, "beta": 8.0},
            checks={"alpha": _W("alpha"), "beta": _W("beta")},
            temperature=4.0,
            t2_scale=True,
            plan=lambda hp: _decoupled(Partition.TARGET, w_mass=hp["alpha"], w_rest=hp["beta"]),
        ),
        Method(
            name="gdkd",
            module="GDKDLoss",
            source="GDKD (arXiv 2512.04625; ZaberKo/GDKD)",
            hyperparameters={
                "k": 5,
                "w0": 1.0,
                "w1": 1.0,
                "w2": 8.0,
                "partitions": 2,
                "strategy": "best",
                "kl_type": "forward",
            },
            checks={
                "k": _top_k,
                "w0": _W("w0"),
                "w1": _W("w1"),
                "w2": _W("w2"),
                "partitions": _one_of("partitions", (2, 3)),
                "strategy": _one_of("strategy", GDKD_STRATEGIES),
                "kl_type": _one_of("kl_type", tuple(GDKD_KL_TYPES)),
            },
            temperature=4.0,
            t2_scale=True,
            plan=_gdkd_plan,
        ),
        Method(
            name="cakd",
            module="CAKDLoss",
            source="CAKD (arXiv 2410.14741)",
            hyperparameters={"alpha": 1.0, "beta": 8.0, "bcd_weight": 1.0, "strong": "target", "k": 5, "tau": 0.5},
            checks={
                "alpha": _W("alpha"),
                "beta": _W("beta"),
                "bcd_weight": _W("bcd_weight"),
                "strong": _one_of("strong", CAKD_STRONG),
                "k": _top_k,
                "tau": _in_range("tau", 0, 1, True, False),
            },
            temperature=4.0,
            t2_scale=True,
            plan=_cakd_plan,
        ),
        Method(
            name="aekt",
            module="AEKTLoss",
            source="AEKT (arXiv 2409.01679)",
            hyperparameters={"beta": 8.0, "max_weight": 5.0},
            checks={"beta": _W("beta"), "max_weight": _positive("max_weight")},
            temperature=4.0,
            t2_scale=True,
            plan=lambda hp: _decoupled(Partition.TARGET, adaptive=True, w_rest=hp["beta"], max_weight=hp["max_weight"]),
        ),
    ]
}


def get_method(name: object, table: Mapping[str, Method] = METHODS) -> Method:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"method must be one of {sorted(table)}, got {name!r}")
    return table[name]


# ---- two vocabularies (docs/losses.md, section 11) ----------------------------------------------------------------


class CrossVocab(enum.IntEnum):
    """The losses between a student and a teacher of different vocabularies (``kdkernels.cross_vocab_loss``)."""

    ULD = 0  # the sorted L1 of the two rows' probabilities
    HYBRID = 1  # GOLD: a divergence on the classes of shared token strings, the sorted L1 on the others


class CrossVocabParams(NamedTuple):
    """Named parameters of a cross-vocabulary plan (the order is the kernels' layout)."""

    teacher_temperature: float = 1.0  # T_t (the student's is the call's temperature)
    # hybrid: the matched classes' divergence, a divergence-family code (JSD, or KD / RKL at beta = 0 / 1) with its
    # mixture, and the weights of the two terms (None until the call knows M and Vt: TRL's adaptive M / Vt)
    matched_code: int = Divergence.JSD
    mix_p: float = 0.0
    mix_q: float = 0.0
    log_mix_p: float = 0.0
    log_mix_q: float = 0.0
    matched_weight: float | None = None
    unmatched_weight: float | None = None

    def matched_plan(self) -> Plan:
        """The divergence-family plan of the matched classes' terms."""
        mixture = {k: getattr(self, k) for k in ("mix_p", "mix_q", "log_mix_p", "log_mix_q")}
        return _divergence(Divergence(self.matched_code), **mixture)


def _optional_weight(name: str) -> Callable[[object], None]:
    def check(value: object) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be None or a finite number >= 0, got {value!r}")

    return check


def _hybrid_plan(hp) -> Plan:
    if (hp["matched_weight"] is None) != (hp["unmatched_weight"] is None):
        raise ValueError(
            "matched_weight and unmatched_weight go together: give both, or neither for TRL's adaptive weights "
            f"(M / Vt and 1 - M / Vt), got matched_weight={hp['matched_weight']!r}, "
            f"unmatched_weight={hp['unmatched_weight']!r}"
        )
    matched = _jsd_plan(hp)
    return Plan(
        CROSS_VOCAB,
        CrossVocab.HYBRID,
        CrossVocabParams(
            matched_code=matched.code,
            mix_p=matched.params.mix_p,
            mix_q=matched.params.mix_q,
            log_mix_p=matched.params.log_mix_p,
            log_mix_q=matched.params.log_mix_q,
            matched_weight=hp["matched_weight"],
            unmatched_weight=hp["unmatched_weight"],
        ),
    )


CROSS_VOCAB_METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            name="uld",
            module="CrossVocabLoss",
            source="ULD, Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030)",
            hyperparameters={},
            checks={},
            temperature=1.0,
            t2_scale=False,
            plan=lambda hp: Plan(CROSS_VOCAB, CrossVocab.ULD, CrossVocabParams()),
        ),
        Method(
            name="hybrid",
            module="CrossVocabLoss",
            source="GOLD's hybrid ULD (TRL uld_use_hybrid_loss)",
            hyperparameters={"beta": 0.5, "matched_weight": None, "unmatched_weight": None},
            checks={
                "beta": _in_range("beta", 0, 1, False, False),
                "matched_weight": _optional_weight("matched_weight"),
                "unmatched_weight": _optional_weight("unmatched_weight"),
            },
            temperature=1.0,
            t2_scale=False,
            plan=_hybrid_plan,
        ),
    ]
}


def finite_when_missing(plan: Plan, missing: str) -> bool:
    """Whether the loss stays finite when ``missing`` ("student" or "teacher") gives probability 0 to a class that
    the other model gives mass to (a padded vocabulary, a sparse teacher's empty tail).

    With q_j = 0 < p_j (student missing): KL(p || q) terms p log(p / q) are infinite, so kd and the decoupled family
    (forward KLs) are; rkl, jsd, the skews and tvd stay finite; abkd's terms stay finite iff beta > 0 and
    alpha + beta > 0 (q^beta and q^(alpha+beta) -> 0; every log q is weighted by a power of q). With p_j = 0 < q_j
    (teacher missing) the roles swap: rkl is infinite, abkd is finite iff alpha > 0 and alpha + beta > 0, the
    forward KLs stay finite, and so does the decoupled family unless its in-bin divergence has a reverse KL (gdkd's
    kl_type "reverse" or "both"). akl is infinite either way.
    """
    if missing not in ("student", "teacher"):
        raise ValueError(f"missing must be 'student' or 'teacher', got {missing!r}")
    student = missing == "student"
    if plan.family == DECOUPLED:  # forward bin-mass KL; an in-bin reverse KL is infinite where p^b = 0 < q^b
        return not student and plan.params.w_rkl == 0
    if plan.code == Divergence.KD:
        return not student
    if plan.code == Divergence.RKL:
        return student
    if plan.code in ABKD_CODES:
        a, b = (plan.params.alpha, plan.params.beta) if student else (plan.params.beta, plan.params.alpha)
        return b > 0 and a + b > 0
    if plan.code == Divergence.AKL:  # both KLs, with weights > 0 but where p = q on the head (or the tail)
        return False
    if plan.code in (Divergence.WSD, Divergence.BDKD):
        return (plan.params.w_fkl if student else plan.params.w_rkl) == 0
    return True  # jsd, skew_fkl, skew_rkl (the mixture is never 0 where its KL weights it), tvd
