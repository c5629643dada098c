"""The hyperparameter cases every backend is tested on: each method's defaults, endpoints and special cases."""

from __future__ import annotations

CASES = [
    ("kd", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
    ("skew_fkl", {"skew": 0.1}),
    ("skew_fkl", {"skew": 0.7}),
    ("skew_rkl", {"skew": 0.1}),
    ("skew_rkl", {"skew": 0.7}),
    ("tvd", {}),
    ("abkd", {"alpha": 0.5, "beta": 0.5}),  # general case
    ("abkd", {"alpha": 1.5, "beta": -0.4}),  # general case, negative beta
    ("abkd", {"alpha": 1.0, "beta": 0.0}),  # beta = 0: KL(p || q)
    ("abkd", {"alpha": 0.0, "beta": 1.0}),  # alpha = 0: KL(q || p)
    ("abkd", {"alpha": 0.0, "beta": 0.6}),
    ("abkd", {"alpha": 0.7, "beta": 0.0}),
    ("abkd", {"alpha": 0.8, "beta": -0.8}),  # alpha = -beta
    ("abkd", {"alpha": 0.0, "beta": 0.0}),
    ("wsd", {}),  # symmetric KL
    ("wsd", {"lam": 0.2}),
    ("wsd", {"lam": 1.0}),  # KL(q || p)
    ("bdkd", {}),
    ("akl", {}),
    ("akl", {"mu": 0.15}),
    ("dkd", {}),
    ("dkd", {"alpha": 0.5, "beta": 2.0}),
    ("gdkd", {"k": 3}),
    ("gdkd", {"k": 4, "w0": 0.5, "w1": 2.0, "w2": 6.0, "partitions": 3}),
    ("gdkd", {"k": 3, "strategy": "worst", "kl_type": "reverse"}),
    ("gdkd", {"k": 2, "w1": 2.0, "kl_type": "both"}),
    ("gdkd", {"k": 3, "partitions": 3, "kl_type": "reverse", "w0": 0.5}),
    ("cakd", {"strong": "target"}),
    ("cakd", {"strong": "topk", "k": 3, "alpha": 0.5, "bcd_weight": 2.0}),
    ("cakd", {"strong": "threshold", "tau": 0.3}),
    ("aekt", {}),
    ("aekt", {"max_weight": 0.5}),
]

# One case per method, for the quick tier and the GPU check (tests/conftest.py): each method at its defaults where
# CASES has them; gdkd at k = 3 (CASES lacks its default k = 5), and cakd with a top-k strong set, since its default
# (strong="target") runs the kernel specialisation of dkd's case.
ONE_PER_METHOD = (
    "kd",
    "rkl",
    "jsd-beta=0.5",
    "skew_fkl-skew=0.1",
    "skew_rkl-skew=0.1",
    "tvd",
    "abkd-alpha=0.5-beta=0.5",
    "wsd",
    "bdkd",
    "akl",
    "dkd",
    "gdkd-k=3",
    "cakd-strong=topk-k=3-alpha=0.5-bcd_weight=2.0",
    "aekt",
)


def case_id(case) -> str:
    method, hp = case
    return method + "".join(f"-{k}={v}" for k, v in hp.items())
