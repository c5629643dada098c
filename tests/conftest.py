import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    # No GPU: the Triton kernels run on CPU tensors through Triton's interpreter (must be set before the import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cases import GPU_CASES, case_id  # noqa: E402

import kdkernels  # noqa: E402

DEVICE = os.environ.get("KDKERNELS_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def backends_under_test() -> list[str]:
    """Every backend that runs on the test device here (the reference always does). A missing C++ extension is an
    error, not a backend quietly left out, unless KDKERNELS_NO_EXTENSION=1 (the build switch that leaves it out)."""
    names = kdkernels.available_backends(DEVICE)
    if os.environ.get("KDKERNELS_NO_EXTENSION") != "1" and DEVICE == "cpu" and "cpu" not in names:
        from kdkernels.backends.extension import LOAD_ERROR

        raise RuntimeError(
            f"backend 'cpu' (the C++ extension) is unavailable: {LOAD_ERROR}; build it "
            "(pip install --no-build-isolation -e .) or set KDKERNELS_NO_EXTENSION=1 to test without"
        )
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


# KDKERNELS_GPU_QUICK=1: only the tests below, the GPU check of scripts/gpu_validate.sh, which must fit a few minutes
# of an H200. Triton compiles each kernel specialisation (code, tile layout, dtype) on first use, a few seconds each,
# and that is what sets its time, so it is every method once (cases.GPU_CASES) and every fused backend, forward +
# backward against the float64 oracle, at a row of one tile (V = 1000) and a streamed one (V = 70000), in float32 and
# bf16, and the fused-linear path with bf16 heads. Test (file::function) -> {parameter: values kept}.
GPU_QUICK = {
    "test_kernels.py::test_float32_any_vocabulary": {"v": (1000, 70000)},
    "test_kernels.py::test_half_precision_no_worse_than_eager": {"v": (1000, 70000), "dtype": (torch.bfloat16,)},
    "test_linear.py::test_bfloat16_heads": {},
    "test_linear.py::test_bfloat16_hidden_float32_weight": {},
}


def pytest_ignore_collect(collection_path, config):
    """With KDKERNELS_GPU_QUICK=1 the other test files are not even imported (collecting them all takes seconds)."""
    if (
        os.environ.get("KDKERNELS_GPU_QUICK") == "1"
        and collection_path.name.startswith("test_")
        and collection_path.name not in {test.split("::")[0] for test in GPU_QUICK}
    ):
        return True
    return None


def in_gpu_quick(item) -> bool:
    kept = GPU_QUICK.get(f"{item.path.name}::{item.originalname}")
    params = item.callspec.params if hasattr(item, "callspec") else {}
    return (
        kept is not None
        and all(params[name] in values for name, values in kept.items())
        and ("case" not in params or case_id(params["case"]) in GPU_CASES)
    )


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KDKERNELS_GPU_QUICK") != "1":
        return
    config.hook.pytest_deselected(items=[item for item in items if not in_gpu_quick(item)])
    items[:] = [item for item in items if in_gpu_quick(item)]
