import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    # No GPU: the Triton kernels run on CPU tensors through Triton's interpreter (must be set before the import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cases import CASES, ONE_PER_METHOD, case_id  # noqa: E402

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


def cross_vocab_backends() -> list[str]:
    """The backends that have kernels of the losses between two vocabularies (Backend.cross_vocab) and run CPU tensors
    here (tests/test_cross_vocab.py's; Triton under its interpreter)."""
    from kdkernels import backends

    names = backends_under_test() if DEVICE == "cpu" else kdkernels.available_backends("cpu")
    return [b for b in names if backends._REGISTRY[b].cross_vocab is not None]


def cross_vocab_device_backends() -> list[str]:
    """The device's fused backends with cross-vocabulary kernels (Triton, and CUDA on a GPU) that run DEVICE tensors
    here (Triton under its interpreter on the CPU)."""
    from kdkernels import backends

    names = kdkernels.available_backends(DEVICE)
    return [b for b in ("triton", "cuda") if b in names and backends._REGISTRY[b].cross_vocab is not None]


def pytest_generate_tests(metafunc):
    """``backend``: every backend runnable here; ``fused``: the same without the reference (kernel tests);
    ``cross_vocab_backend`` and ``cross_vocab_fused``: the same of those with cross-vocabulary kernels;
    ``cross_vocab_device_backend``: cross_vocab_device_backends()."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends_under_test())
    if "fused" in metafunc.fixturenames:
        metafunc.parametrize("fused", [b for b in backends_under_test() if b != "reference"])
    if "cross_vocab_backend" in metafunc.fixturenames:
        metafunc.parametrize("cross_vocab_backend", cross_vocab_backends())
    if "cross_vocab_fused" in metafunc.fixturenames:
        metafunc.parametrize("cross_vocab_fused", [b for b in cross_vocab_backends() if b != "reference"])
    if "cross_vocab_device_backend" in metafunc.fixturenames:
        metafunc.parametrize("cross_vocab_device_backend", cross_vocab_device_backends())


# Three selections of the suite. The quick tier is the default (the README's test command, at most 5 minutes on two
# cores); KDKERNELS_FULL_TESTS=1 runs everything (CI: .ci/run); KDKERNELS_GPU_QUICK=1 runs the GPU check of
# scripts/gpu_validate.sh. A test left out of a selection is reported as deselected, never silently skipped.
FULL_TESTS = os.environ.get("KDKERNELS_FULL_TESTS") == "1"
GPU_QUICK_TESTS = os.environ.get("KDKERNELS_GPU_QUICK") == "1"

# The GPU check must fit a few minutes of an H200. Triton compiles each kernel specialisation (code, tile layout,
# dtype) on first use, a few seconds each, and that is what sets its time, so it is every method once
# (cases.ONE_PER_METHOD) and every fused backend, forward + backward against the float64 oracle, at a row of one tile
# (V = 1000) and a streamed one (V = 70000), in float32 and bf16, the fused-linear path with bf16 heads, and the
# cross-vocabulary kernels (uld, hybrid) on rows that fit their on-chip sort and on chunked LLM rows.
# Test (file::function) -> {parameter: values kept}; the other tests are not run.
GPU_QUICK = {
    "test_kernels.py::test_float32_any_vocabulary": {"v": (1000, 70000)},
    "test_kernels.py::test_half_precision_no_worse_than_eager": {"v": (1000, 70000), "dtype": (torch.bfloat16,)},
    "test_linear.py::test_bfloat16_heads": {},
    "test_linear.py::test_bfloat16_hidden_float32_weight": {},
    "test_cross_vocab.py::test_device_kernels_against_oracle": {},
}

# The quick tier still runs every method on every backend against the float64 oracle (each method once: the
# hyperparameter sweep of cases.CASES is the full tier's), bad inputs, the extension's checks and a trainer step.
# What it leaves to the full tier: the tests below (file, or file::function), which take minutes each (sm_90
# compiles, per-capability builds, the demos, multi-process runs), and the values of QUICK_PARAMS it does not list.
FULL_ONLY = {
    "test_triton_compile.py",
    "test_cuda_compile.py",
    "test_extension.py::test_each_cpu_capability_build",
    "test_cli.py::test_demo_quick_runs_and_reports_every_method",
    "test_cli.py::test_demo_standardize_and_learn_temperature_add_columns",
    "test_cli.py::test_demo_lm_quick_trains_and_reports",
    "test_cli.py::test_demo_lm_cross_tokenizer_quick_trains_and_reports",
    "test_cli.py::test_liger_rows_check_values_first",
    "test_numerics.py::test_out_of_range_target_under_torch_compile_raises",
    "test_akl.py::test_fused_kernel_has_no_n_by_v_temporary",
    "test_cross_vocab.py::test_cpu_kernel_has_no_n_by_v_temporary",
    "test_linear_cross_vocab.py::test_triton_chunks",
    "test_integrations.py::test_fsdp2_two_processes_equal_one_full_batch",
    "test_integrations.py::test_ddp_two_processes_equal_one_full_batch",
    "test_parallel.py::test_groups_and_function_per_loss",
    "test_cli.py::test_setup_rebuilds_only_when_what_it_depends_on_changed",
    "test_cli.py::test_linear_bench_compares_paths",
    "test_cli.py::test_linear_bench_subsets",
    "test_integrations.py::test_torch_compile_compiles_the_students_forward",  # (the quick tier compiles the loss)
}
# Parameter -> values the quick tier keeps, for every test that takes it; per test (file::function) more of them.
QUICK_PARAMS = {"case": lambda case: _one_per_method(case), "world": lambda world: world == 2}
QUICK_TEST_PARAMS = {
    "test_kernels.py::test_float32_any_vocabulary": {"v": (37, 1000)},
    "test_kernels.py::test_half_precision_no_worse_than_eager": {"v": (37, 1000), "dtype": (torch.bfloat16,)},
    "test_kernels.py::test_short_rows": {"v": (1, 9, 17, 257), "fused": ("cpu", "cuda")},
    "test_full_gradient.py::test_short_rows": {"v": (9,), "fused": ("cpu", "cuda")},
    # (the streamed rows, and these large rows on Triton, seconds a case under its interpreter, in the full tier)
    "test_linear.py::test_inplace_ops_match_out_of_place": {"v": (37,)},
    **{
        test: {"backend": ("reference", "cpu", "cuda")}
        for test in (
            "test_api.py::test_the_ends_of_the_temperature_range_are_finite",
            "test_numerics.py::test_dkd_tiny_target_masses_at_large_vocabulary",
            "test_akl.py::test_streamed_rows_with_many_ties",
        )
    },
    "test_numerics.py::test_decoupled_student_offset_from_teacher": {"offset": (20000.0,)},
    "test_full_gradient.py::test_gradcheck_teacher_and_temperature": {"standardize": (True,)},
    # Triton's interpreter takes seconds per case here: the quick tier runs its cross-vocabulary kernel on the ties
    # (uld) only, the full tier everywhere.
    **{
        f"test_cross_vocab.py::{test}": {"cross_vocab_backend": ("reference", "cpu")}
        for test in (
            "test_against_oracle",
            "test_reductions_and_grad_output",
            "test_identical_rows_have_zero_loss_and_gradient",
            "test_masked_and_left_out_rows",
        )
    },
    "test_cross_vocab.py::test_ties_follow_the_documented_rule": {"method": ("uld",)},
    "test_cross_vocab.py::test_fused_wide_rows_against_oracle": {"cross_vocab_fused": ("cpu",)},
    "test_cross_vocab.py::test_device_kernels_against_oracle": {"method": ("uld",), "dtype": (torch.float32,)},
    "test_linear_cross_vocab.py::test_against_materialised_logits": {"chunk_size": (5,)},
}


def pytest_ignore_collect(collection_path, config):
    """With KDKERNELS_GPU_QUICK=1 the other test files are not even imported (collecting them all takes seconds)."""
    if (
        GPU_QUICK_TESTS
        and collection_path.name.startswith("test_")
        and collection_path.name not in {test.split("::")[0] for test in GPU_QUICK}
    ):
        return True
    return None


def _one_per_method(case) -> bool:
    """Of cases.CASES only ONE_PER_METHOD; a "case" parameter of other values (another file's cases) is kept."""
    return not any(case is c for c in CASES) or case_id(case) in ONE_PER_METHOD


def _params(item) -> dict:
    return item.callspec.params if hasattr(item, "callspec") else {}


def in_gpu_quick(item) -> bool:
    kept = GPU_QUICK.get(f"{item.path.name}::{item.originalname}")
    params = _params(item)
    return (
        kept is not None
        and all(params[name] in values for name, values in kept.items())
        and ("case" not in params or _one_per_method(params["case"]))
    )


def _full_only(item) -> bool:
    return item.path.name in FULL_ONLY or f"{item.path.name}::{item.originalname}" in FULL_ONLY


def in_quick_tier(item) -> bool:
    test = f"{item.path.name}::{item.originalname}"
    if _full_only(item):
        return False
    params = _params(item)
    if not all(keep(params[name]) for name, keep in QUICK_PARAMS.items() if name in params):
        return False
    return all(params[name] in values for name, values in QUICK_TEST_PARAMS.get(test, {}).items())


def pytest_collection_modifyitems(config, items):
    if FULL_TESTS and not GPU_QUICK_TESTS:
        # The tests of minutes first, so that pytest-xdist's workers share them out at the start rather than one
        # worker running the last of them alone at the end.
        items.sort(key=lambda item: not _full_only(item))
        return
    selected = in_gpu_quick if GPU_QUICK_TESTS else in_quick_tier
    config.hook.pytest_deselected(items=[item for item in items if not selected(item)])
    items[:] = [item for item in items if selected(item)]


def pytest_terminal_summary(terminalreporter):
    """Says which selection ran (under xdist the deselected count is not reported by pytest itself)."""
    if GPU_QUICK_TESTS:
        terminalreporter.write_line("kdkernels: the GPU check's selection of the tests (KDKERNELS_GPU_QUICK=1)")
    elif not FULL_TESTS:
        terminalreporter.write_line(
            "kdkernels: the quick tier; KDKERNELS_FULL_TESTS=1 runs the full one (every case, compile and build "
            "checks, demos, multi-process runs)"
        )
