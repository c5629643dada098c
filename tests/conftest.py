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
    """Every backend that runs on the test device here (the reference always does). With
    KDKERNELS_REQUIRE_EXTENSION=1 (CI) a missing C++ extension is an error, not a backend quietly left out."""
    names = kdkernels.available_backends(DEVICE)
    if os.environ.get("KDKERNELS_REQUIRE_EXTENSION") == "1" and DEVICE == "cpu" and "cpu" not in names:
        from kdkernels.extension import LOAD_ERROR

        raise RuntimeError(f"KDKERNELS_REQUIRE_EXTENSION=1 but backend 'cpu' is unavailable: {LOAD_ERROR}")
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
