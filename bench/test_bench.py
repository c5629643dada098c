"""pytest-benchmark cases: forward + backward of each loss on each backend available here.

Run with ``python -m pytest bench/ --benchmark-only`` (not part of the test suite). Shapes are kept small enough
for a CPU; ``python -m kdkernels bench`` is the full table (bandwidth, memory, torch.compile).
"""

import pytest
import torch

import kdkernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = (
    {"vision": (4096, 1000), "llm": (256, 32000)}
    if DEVICE == "cpu"
    else {"vision": (65536, 1000), "llm": (8192, 32000)}
)
BACKENDS = [b for b in kdkernels.available_backends(DEVICE) if not (b == "triton" and DEVICE == "cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", list(kdkernels.METHODS))
def test_forward_backward(benchmark, method, shape, backend):
    n, v = SHAPES[shape]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s = torch.randn(n, v, generator=g, device=DEVICE).requires_grad_(True)
    t = torch.randn(n, v, generator=g, device=DEVICE)
    y = torch.randint(0, v, (n,), generator=g, device=DEVICE)

    def step():
        s.grad = None
        kdkernels.distill_loss(method, s, t, y, backend=backend).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
