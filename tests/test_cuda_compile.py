"""Every CUDA source under csrc/cuda/ compiles for the H200 (sm_90) with nvcc, here, without a GPU.

Nothing CUDA runs on a GPU-less machine and a CPU build of torch builds only the CPU kernels, so this is what keeps
the CUDA kernels from rotting unseen: nvcc -c on each .cu with torch's include paths and the nvcc flags torch's
extension builder uses. A CPU build of torch lacks one generated CUDA header, c10/cuda/impl/cuda_cmake_macros.h
(a single #define); the check writes it into a scratch include directory. A missing nvcc fails the check unless
KDKERNELS_NO_CUDA=1 (the build switch that leaves the CUDA kernels out) says the CUDA sources are not wanted here.
"""

import glob
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
MACROS = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")


def _nvcc() -> str | None:
    home = cpp_extension.CUDA_HOME
    found = os.path.join(home, "bin", "nvcc") if home else None
    return found if found and os.path.exists(found) else shutil.which("nvcc")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{source: (returncode, compiler output)}, the sources compiled in parallel."""
    nvcc = _nvcc()
    if nvcc is None:
        if os.environ.get("KDKERNELS_NO_CUDA") == "1":
            pytest.skip("KDKERNELS_NO_CUDA=1 and no nvcc: the CUDA sources are not compiled here")
        pytest.fail("nvcc not found (CUDA_HOME or PATH); install the CUDA toolkit or set KDKERNELS_NO_CUDA=1")
    scratch = tmp_path_factory.mktemp("nvcc")
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    if not any(os.path.exists(os.path.join(d, MACROS)) for d in includes):
        os.makedirs(scratch / os.path.dirname(MACROS))
        (scratch / MACROS).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(scratch))
    flags = ["-std=c++20", "-O3", "-gencode=arch=compute_90,code=sm_90", "-DTORCH_EXTENSION_NAME=_C",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-Werror=all-warnings", *cpp_extension.COMMON_NVCC_FLAGS]

    def compile_one(source):
        out = scratch / (os.path.basename(source) + ".o")
        run = subprocess.run([nvcc, "-c", source, "-o", str(out), *flags, *(f"-I{d}" for d in includes)],
                             capture_output=True, text=True)
        return source, (run.returncode, run.stdout + run.stderr)

    with ThreadPoolExecutor(max(1, min(len(SOURCES), os.cpu_count() or 1))) as pool:
        return dict(pool.map(compile_one, SOURCES))


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu not found"


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_compiles_for_sm90(compiled, source):
    returncode, output = compiled[source]
    assert returncode == 0, f"nvcc failed on {os.path.relpath(source, ROOT)}:\n{output[-6000:]}"
