"""Every CUDA source under csrc/cuda/ compiles for the H200 (sm_90) with nvcc, here, without a GPU.

Nothing CUDA runs on a GPU-less machine and a CPU build of torch builds only the CPU kernels, so this is what keeps
the CUDA kernels from rotting unseen: nvcc -c on each .cu with torch's include paths and the nvcc flags torch's
extension builder uses. A CPU build of torch lacks one generated CUDA header, c10/cuda/impl/cuda_cmake_macros.h
(a single #define); the check writes it into a scratch include directory, beside the kernel call's option lists
that setup.py generates (kernel_call.cpp_option_lists). A missing nvcc fails the check unless
KDKERNELS_NO_CUDA=1 (the build switch that leaves the CUDA kernels out) says the CUDA sources are not wanted here.

ptxas's -v log gives each kernel's registers, spills and shared memory (tests/sm90_resources.py): a kernel that
spills fails the test, and KDKERNELS_SPILL_REPORT=<dir> writes them all to <dir>/cuda.txt. Each test compiles its
own source, so that pytest-xdist's workers share the sources out (a module-scoped fixture compiling them all ran
once in each worker: every source compiled twice with -n 2).
"""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import sm90_resources
from sm90_resources import Resources, parse_ptxas
from torch.utils import cpp_extension

from kdkernels.backends import kernel_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
MACROS = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")


def _nvcc() -> str | None:
    home = cpp_extension.CUDA_HOME
    found = os.path.join(home, "bin", "nvcc") if home else None
    return found if found and os.path.exists(found) else shutil.which("nvcc")


@pytest.fixture(scope="module")
def nvcc_command(tmp_path_factory) -> list[str]:
    """nvcc and its flags and include paths, without the source and output."""
    nvcc = _nvcc()
    if nvcc is None:
        if os.environ.get("KDKERNELS_NO_CUDA") == "1":
            pytest.skip("KDKERNELS_NO_CUDA=1 and no nvcc: the CUDA sources are not compiled here")
        pytest.fail("nvcc not found (CUDA_HOME or PATH); install the CUDA toolkit or set KDKERNELS_NO_CUDA=1")
    scratch = tmp_path_factory.mktemp("nvcc")
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    (scratch / kernel_call.CPP_OPTIONS_HEADER).write_text(kernel_call.cpp_option_lists())
    includes.append(str(scratch))
    if not any(os.path.exists(os.path.join(d, MACROS)) for d in includes):
        os.makedirs(scratch / os.path.dirname(MACROS))
        (scratch / MACROS).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    flags = [
        "-std=c++20",
        "-O3",
        "-gencode=arch=compute_90,code=sm_90",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-Werror=all-warnings",
        "-Xptxas=-v",
        *cpp_extension.COMMON_NVCC_FLAGS,
    ]
    return [nvcc, *flags, *(f"-I{d}" for d in includes)]


def resources(log: str) -> list[Resources]:
    """The records of ptxas's -v log: a function named by its demangled name without namespaces, return type and
    parameter list, its template arguments as the specialisation."""
    functions = parse_ptxas(log)
    names = subprocess.run(
        ["c++filt"], input="\n".join(functions), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    records = []
    for name, fields in zip(names, functions.values()):
        name = name.removeprefix("void ").replace("(anonymous namespace)::", "").split("(")[0]
        qualified, bracket, args = name.partition("<")
        records.append(Resources(kernel=qualified.rsplit("::", 1)[-1], specialisation=bracket + args, **fields))
    return records


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu not found"


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_compiles_for_sm90(nvcc_command, source, tmp_path):
    run = subprocess.run([*nvcc_command, "-c", source, "-o", str(tmp_path / "out.o")], capture_output=True, text=True)
    output = run.stdout + run.stderr
    name = os.path.relpath(source, ROOT)
    assert run.returncode == 0, f"nvcc failed on {name}:\n{output[-6000:]}"
    records = resources(output)
    assert records, f"no ptxas -v record in nvcc's output on {name}:\n{output[-2000:]}"
    sm90_resources.report(
        "cuda",
        "CUDA kernels of csrc/cuda/*.cu, nvcc -gencode=arch=compute_90,code=sm_90 -O3 "
        "-Xptxas=-v, tests/test_cuda_compile.py: registers per thread, stack and spills in bytes per "
        "thread, smem in bytes per block (static)",
        os.path.basename(source),
        records,
    )
    spills = sm90_resources.spill_message(name, records)
    assert not spills, spills
