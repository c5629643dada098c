import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    # No GPU: the Triton kernels run on CPU tensors through Triton's interpreter (must be set before the import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kdkernels  # noqa: E402

DEVICE = os.environ.get("KDKERNELS_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def backends_under_test() -> list[str]:
    """Every backend that runs on the test device here (the reference always does). A missing C++ extension is an
    error, not a backend quietly left out, unless KDKERNELS_NO_EXTENSION=1 (the build switch that leaves it out)."""
    names = kdkernels.available_backends(DEVICE)
    if os.environ.get("KDKERNELS_NO_EXTENSION") != "1" and DEVICE == "cpu" and "cpu" not in names:
        from kdkernels.backends.extension import LOAD_ERROR

        raise RuntimeError(f"backend 'cpu' (the C++ extension) is unavailable: {LOAD_ERROR}; build it "
                           "(pip install --no-build-isolation -e .) or set KDKERNELS_NO_EXTENSION=1 to test without")
    return names


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_generate_tests(metafunc):
    """``backend``: every backend runnable here; ``fused``: the same without the reference (kernel tests)."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends_under_test())
    if "fused" in metafunc.fixturenames:
        metafunc.parametrize("fused", [b for b in backends_under_test() if b != "reference"])
