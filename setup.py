"""Build script: the kdkernels package and its compiled extension kdkernels._C.

kdkernels._C holds the op schemas (csrc/kdkernels.cpp), the CPU kernels (csrc/cpu, always) and the CUDA kernels
(csrc/cuda, when torch is a CUDA build and nvcc is found: torch.version.cuda and CUDA_HOME, not whether a GPU is
visible, so a GPU-less build machine still builds them). Environment switches:

    KDKERNELS_NO_EXTENSION=1     build the pure-Python package only (backend="reference" and "triton")
    KDKERNELS_NO_CUDA=1          build the CPU kernels only, even with a CUDA torch and nvcc
    KDKERNELS_CUDA_ARCHS="90"    CUDA architectures besides sm_90, e.g. "80 90 100" (space or ; separated)

The CPU kernels (csrc/cpu/divergence.cpp, decoupled.cpp, cross_vocab.cpp) are compiled once per CPU capability
(at::vec is as wide as the flags it is compiled with) and the library picks at run time the widest one the CPU
supports, as torch's own CPU kernels do.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

# Capability -> compiler flags of the CPU kernels (torch's own per-capability flags). DEFAULT comes first:
# the linker keeps the first copy of an inline function several objects define, and that copy must run anywhere.
CPU_CAPABILITIES = {"DEFAULT": []}
if platform.machine().lower() in ("x86_64", "amd64"):
    CPU_CAPABILITIES["AVX2"] = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"]
    CPU_CAPABILITIES["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
CPU_KERNELS = ["csrc/cpu/divergence.cpp", "csrc/cpu/decoupled.cpp", "csrc/cpu/cross_vocab.cpp"]


def cuda_arch_flags() -> list[str]:
    archs = {"90", *re.split(r"[;,\s]+", os.environ.get("KDKERNELS_CUDA_ARCHS", "").strip())} - {""}
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sorted(archs)]


def generated_include_dir() -> str:
    """build/generated, holding the kernel call's option lists generated from kdkernels/backends/kernel_call.py
    (the header is rewritten only when its text changes, so that an unchanged record rebuilds nothing)."""
    root = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(root, "kdkernels", "backends", "kernel_call.py")
    spec = importlib.util.spec_from_file_location("kdkernels_build_kernel_call", source)
    record = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses look their module up)
    spec.loader.exec_module(record)
    folder = os.path.join(root, "build", "generated")
    path, text = os.path.join(folder, record.CPP_OPTIONS_HEADER), record.cpp_option_lists()
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return folder


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("KDKERNELS_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, plus the CPU kernels compiled once per CPU capability (in parallel)."""

        def build_extension(self, ext):
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args

            def compile_for(capability: str) -> list[str]:
                # One call per capability (each writes its own ninja file into its own folder; ninja runs the sources
                # of one capability in parallel).
                flags = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
                return self.compiler.compile(
                    CPU_KERNELS,
                    output_dir=os.path.join(self.build_temp, capability.lower()),
                    include_dirs=ext.include_dirs,
                    depends=ext.depends,
                    extra_postargs={"cxx": cxx + flags + CPU_CAPABILITIES[capability], "nvcc": []},
                )

            with ThreadPoolExecutor(len(CPU_CAPABILITIES)) as pool:
                ext.extra_objects = [obj for objs in pool.map(compile_for, CPU_CAPABILITIES) for obj in objs]
            super().build_extension(ext)

    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("KDKERNELS_NO_CUDA") != "1"
    )
    sources = ["csrc/kdkernels.cpp", "csrc/cpu/ops.cpp", "csrc/cpu/gradient_cache.cpp"]
    sources += sorted(glob.glob("csrc/cuda/*.cu")) if with_cuda else []
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    cxx += [f"-DKDKERNELS_CPU_{c}" for c in CPU_CAPABILITIES]  # which capability builds ops.cpp may call
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = kind(
        "kdkernels._C",
        sources,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"] + cuda_arch_flags()},
        extra_link_args=["-fopenmp"],
        include_dirs=[generated_include_dir()],
        depends=sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True)),
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
