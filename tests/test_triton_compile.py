"""Every Triton kernel specialisation compiles for the H200 (sm_90), here, without a GPU.

The interpreter that runs the kernels on CPU tensors accepts code that the compiler rejects (non-constexpr globals,
loop-carried type changes, ...); compiling to PTX/cubin for sm_90 catches that in CI. The compiler needs the real
@triton.jit functions, so each check runs in a subprocess without TRITON_INTERPRET. On a GPU machine the kernels
are compiled by running them (every other test file), so this file only runs without one.
"""

import os
import subprocess
import sys

import pytest
import torch

from cases import CASES
from kdkernels.methods import DECOUPLED as DECOUPLED_FAMILY
from kdkernels.methods import METHODS, Divergence

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="with a GPU the kernels are compiled by running them (every other test file)")

INTS = {"N": "i32", "V": "i32", "k": "i32", "ignore_index": "i32", "s_stride": "i64", "t_stride": "i64",
        "g_stride": "i32", "row_stride": "i64"}


def compile_for_h200(kernel, pointer_types, constexprs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = pointer_types.get(p.name, "*fp32")
        else:
            signature[p.name] = INTS.get(p.name, "fp32")
    names = list(signature)
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm or "ptx" in compiled.asm


POINTERS = {"s_ptr": "*bf16", "t_ptr": "*fp32", "grad_ptr": "*bf16", "target_ptr": "*i64", "gt_ptr": "*fp32"}
LAYOUTS = {"single": dict(SINGLE_TILE=True, BLOCK_N=4, BLOCK_V=1024), "stream": dict(SINGLE_TILE=False, BLOCK_N=1,
                                                                                    BLOCK_V=4096)}
# The switches of every decoupled plan the test cases reach.
DECOUPLED = sorted({(int(plan.code), bool(plan.params.split_top1), bool(plan.params.lowest), bool(plan.params.adaptive),
                     plan.params.w_fkl != 0, plan.params.w_rkl != 0) for plan in (
    METHODS[method].plan(METHODS[method].resolve(hp)) for method, hp in CASES) if plan.family == DECOUPLED_FAMILY})


def compile_family(family: str) -> None:
    """Compiles every specialisation of one kernel family (run in the subprocess)."""
    from kdkernels.backends.triton.common import scale_rows_kernel
    from kdkernels.backends.triton.decoupled import decoupled_kernel
    from kdkernels.backends.triton.divergence import divergence_kernel

    for name, layout in LAYOUTS.items():
        for standardize in (False, True):
            # The full gradient (its teacher gradient through the z-score too) with standardize: every code on
            # streamed rows, a few on one tile (its code paths are the same per code, its compile time is not small).
            def full(first):
                on = standardize and (name == "stream" or first)
                return dict(FULL=on, TEACHER_GRAD=on, T2_SCALE=True)

            if family == "divergence":
                for code in Divergence:
                    compile_for_h200(divergence_kernel, POINTERS, dict(
                        CODE=int(code), HAS_TARGET=True, HAS_DENOM=True, WITH_CE=True, CE_APART=True,
                        STANDARDIZE=standardize, WITH_GRAD=True,
                        **full(code in (Divergence.KD, Divergence.AKL)), **layout))
            elif family == "decoupled":
                for i, (partition, split_top1, lowest, adaptive, forward, reverse) in enumerate(DECOUPLED):
                    compile_for_h200(decoupled_kernel, POINTERS, dict(
                        PARTITION=partition, SPLIT_TOP1=split_top1, LOWEST=lowest, ADAPTIVE=adaptive,
                        FORWARD=forward, REVERSE=reverse, HAS_TARGET=True, HAS_DENOM=False, WITH_CE=True,
                        STANDARDIZE=standardize, WITH_GRAD=True, KPAD=8, **full(i == 0), **layout))
    if family == "scale":
        for per_row in (False, True):
            compile_for_h200(scale_rows_kernel, {"grad_ptr": "*bf16"}, dict(PER_ROW=per_row, BLOCK_V=4096))


@pytest.mark.parametrize("family", ["divergence", "decoupled", "scale"])
def test_kernels_compile_for_sm90(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(__file__)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_triton_compile as t; t.compile_family({family!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
