"""The benchmark's baselines (kdkernels/baselines.py, the idiomatic eager code a user would write) compute the same
loss and student gradient as the reference, on random inputs with an ignored row: the timings of
``python -m kdkernels bench`` compare the same thing."""

import pytest
import torch

from kdkernels import METHODS, distill_loss
from kdkernels.baselines import BASELINES


def test_every_method_has_a_baseline():
    assert set(BASELINES) == set(METHODS)


@pytest.mark.parametrize("v", [37, 1000])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_baseline_matches_reference(method, v):
    g = torch.Generator().manual_seed(v)
    s = (torch.randn(6, v, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randn(6, v, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, v, (6,), generator=g)
    y[2] = -100
    want = distill_loss(method, s, t, y, backend="reference")
    (want_grad,) = torch.autograd.grad(want * 1.7, s)
    got = BASELINES[method](s.float(), t.float(), y)
    (got_grad,) = torch.autograd.grad(got * 1.7, s)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    assert got_grad[2].abs().max() == 0
