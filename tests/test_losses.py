"""Every backend against the independent oracle: every method and case, every reduction, ignored rows, 3-D input,
grad_output != 1, normalizer."""

import pytest
import torch
from cases import CASES, case_id
from helpers import check_against_oracle, make_inputs

import kdkernels

REDUCTIONS = ["batchmean", "sum", "none"]


def dtypes_of(backend):
    """float64 where the backend computes it in float64 (the reference, the C++ CPU kernels)."""
    return [torch.float64, torch.float32] if backend in ("reference", "cpu") else [torch.float32]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_oracle(backend, device, case, reduction):
    method, hp = case
    for dtype in dtypes_of(backend):
        s, t, target = make_inputs((2, 3, 37), dtype, device, seed=hash(case_id(case)) % 1000, ignored=1)
        grad_output = torch.linspace(-1.5, 2.0, 6, dtype=torch.float64).reshape(2, 3) if reduction == "none" else 0.7
        check_against_oracle(method, hp, s, t, target, backend, reduction, grad_output)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_options(backend, device, case):
    """Non-default temperature and t2_scale, a normalizer, and no target (where the method allows it)."""
    method, hp = case
    s, t, target = make_inputs((5, 41), torch.float64 if backend == "reference" else torch.float32, device, seed=3)
    spec = kdkernels.METHODS[method]
    needs_target = spec.plan(spec.resolve(hp)).needs_target
    check_against_oracle(
        method,
        hp,
        s,
        t,
        target if needs_target else None,
        backend,
        temperature=2.5,
        t2_scale=not spec.t2_scale,
        normalizer=torch.tensor(7.0, device=device),
    )


TOPK_CASES = [c for c in CASES if c[0] == "gdkd" or (c[0] == "cakd" and c[1].get("strong") in ("topk", "threshold"))]


@pytest.mark.parametrize("case", TOPK_CASES, ids=case_id)
def test_teacher_ties(backend, device, case):
    """Integer teacher logits tie often: the top-k takes the lower class index (the oracle's stable ranking)."""
    method, hp = case
    s, _, target = make_inputs((6, 29), torch.float32, device, seed=5)
    g = torch.Generator().manual_seed(6)
    t = torch.randint(-2, 3, (6, 29), generator=g).float().to(device)
    check_against_oracle(method, hp, s, t, target, backend, "none", torch.linspace(0.5, 2.0, 6, dtype=torch.float64))
