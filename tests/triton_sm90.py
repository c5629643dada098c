"""Compiles the Triton kernel specialisations for the H200 (sm_90) and reads each one's registers, spills and shared
memory: the subprocess side of tests/test_triton_compile.py.

    python tests/triton_sm90.py FAMILY OUT.json [--covering]

It needs no pytest, so it also runs under the Triton 3.6.0 venv (.venv-triton36, the GPU machine's Triton), with
kdkernels from this checkout on PYTHONPATH. ptxas's -v log comes from Triton's own compile (TRITON_DUMP_PTXAS_LOG
prints it; TRITON_ALWAYS_COMPILE makes a kernel in Triton's cache compile again, or there would be no log): no
driver is needed, and no second ptxas run. A specialisation that fails to compile does not stop the others (its
error comes with the compiler's diagnostics). OUT.json gets {"triton": version, "records": [Resources fields ...],
"failures": [[specialisation, error] ...]}. With --covering it compiles fewer specialisations of the two families'
kernels that still take every compile-time branch once per code (specialisations()): enough to show that a Triton
compiles the code, not to report every launch shape's registers.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import sys
import tempfile
from dataclasses import asdict

from sm90_resources import Resources, parse_ptxas

INTS = {
    "N": "i32",
    "Vs": "i32",
    "Vt": "i32",
    "ns": "i32",
    "nt": "i32",
    "num_pairs": "i32",
    "matched_code": "i32",
    "V": "i32",
    "k": "i32",
    "ignore_index": "i32",
    "s_stride": "i64",
    "t_stride": "i64",
    "g_stride": "i32",
    "row_stride": "i64",
    "first_row": "i32",
}
POINTERS = {"s_ptr": "*bf16", "t_ptr": "*fp32", "grad_ptr": "*bf16", "target_ptr": "*i64", "gt_ptr": "*fp32"}
CROSS_VOCAB_POINTERS = {
    **POINTERS,
    "g_ptr": "*bf16",
    **{name: "*i64" for name in ("free_s_ptr", "free_t_ptr", "pair_s_ptr", "pair_t_ptr", "order_ptr")},
}
# The launch shapes (tile, warps and register cap as kdkernels launches them) of a short row, in one tile with several
# rows per program (a vision vocabulary), and of a long one, streamed in tiles (an LLM's).
LAYOUT_ROWS = {"single": (64, 1000), "stream": (64, 32000)}


def compile_for_h200(kernel, pointer_types: dict, constexprs: dict, options: dict, label: str) -> list[Resources]:
    """Compiles one specialisation for sm_90 with Triton's compile `options` (num_warps, maxnreg) and returns
    ptxas's records of it (labelled with `label`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kdkernels.backends.kernel_call import SCALARS

    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name == "scalars":  # (the kernel call's float fields: kernel_call.SCALARS)
            signature[p.name] = ("fp32",) * len(SCALARS)
        elif p.name.endswith("_ptr"):
            signature[p.name] = pointer_types.get(p.name, "*fp32")
        else:
            signature[p.name] = INTS.get(p.name, "fp32")
    names = list(signature)
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert "cubin" in compiled.asm, f"{label}: no cubin"
    functions = parse_ptxas(log.getvalue())
    name = compiled.metadata.name
    assert name in functions and functions[name]["registers"] is not None, (
        f"{label}: no ptxas -v record of {name} in the compile's output:\n{log.getvalue()[-2000:]}"
    )
    records = []
    for function, fields in functions.items():
        # Triton's kernels take their shared memory dynamically (metadata.shared); ptxas counts only static smem.
        smem = fields.pop("smem") + (compiled.metadata.shared if function == name else 0)
        records.append(Resources(kernel=function, specialisation=label, smem=smem, **fields))
    return records


def describe(constexprs: dict, options: dict) -> str:
    """The specialisation as a label: every constexpr (switches as 0/1), then the compile options (warps, ...)."""
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in {**constexprs, **options}.items())


def decoupled_plans() -> list[tuple]:
    """The switches of every decoupled plan the test cases reach."""
    from cases import CASES

    from kdkernels.methods import DECOUPLED, METHODS

    return sorted(
        {
            (
                int(plan.code),
                bool(plan.params.split_top1),
                bool(plan.params.lowest),
                bool(plan.params.adaptive),
                plan.params.w_fkl != 0,
                plan.params.w_rkl != 0,
            )
            for plan in (METHODS[method].plan(METHODS[method].resolve(hp)) for method, hp in CASES)
            if plan.family == DECOUPLED
        }
    )


def specialisations(family: str, covering: bool = False) -> list[tuple]:
    """(kernel, pointer types, constexprs, compile options, label) of every specialisation of a family to compile: every
    code (divergence) or decoupled plan the test cases reach on both layouts, with and without standardize; the full
    gradient (FULL, TEACHER_GRAD) goes with standardize, on streamed rows for every code and on one tile for a few
    (its code paths are the same per code there, its compile time is not small). ``covering`` keeps, per code, the
    one-tile rows without standardize, the streamed rows with it (and the full gradient) and the full gradient on one
    tile: each branch of SINGLE_TILE, STANDARDIZE and FULL once."""
    from kdkernels.backends.triton.common import launch_shape, scale_rows_kernel
    from kdkernels.backends.triton.decoupled import decoupled_kernel
    from kdkernels.backends.triton.divergence import divergence_kernel
    from kdkernels.methods import Divergence, Partition

    if family == "cross_vocab":
        return cross_vocab_specialisations()
    if family == "scale":
        return [
            (
                scale_rows_kernel,
                {"grad_ptr": "*bf16"},
                dict(PER_ROW=per_row, BLOCK_V=4096),
                dict(num_warps=4),
                describe(dict(PER_ROW=per_row, BLOCK_V=4096), dict(num_warps=4)),
            )
            for per_row in (False, True)
        ]
    # (code, its name in the label, whether its full gradient is compiled on one tile too)
    if family == "divergence":
        codes = [(int(code), code.name, code in (Divergence.KD, Divergence.AKL)) for code in Divergence]
    else:
        codes = [(plan, Partition(plan[0]).name, i == 0) for i, plan in enumerate(decoupled_plans())]
    out = []
    for code, code_name, full_on_one_tile in codes:
        for layout, standardize in itertools.product(LAYOUT_ROWS, (False, True)):
            full = standardize and (layout == "stream" or full_on_one_tile)
            if covering and (layout == "stream") != standardize and not full:
                continue
            block_n, block_v, warps, single, maxnreg = launch_shape(
                family, *LAYOUT_ROWS[layout], full=full, akl=family == "divergence" and code == Divergence.AKL
            )
            options = dict(num_warps=warps, **({} if maxnreg is None else dict(maxnreg=maxnreg)))
            switches = dict(
                FULL=full, TEACHER_GRAD=full, T2_SCALE=True, SINGLE_TILE=single, BLOCK_N=block_n, BLOCK_V=block_v
            )
            if family == "divergence":
                constexprs = dict(
                    CODE=code,
                    HAS_TARGET=True,
                    HAS_DENOM=True,
                    WITH_CE=True,
                    CE_GRAD=True,
                    DISTILL_GRAD=True,
                    CE_APART=True,
                    STANDARDIZE=standardize,
                    WITH_GRAD=True,
                    **switches,
                )
                label = describe(dict(constexprs, CODE=code_name), options)
                out.append((divergence_kernel, POINTERS, constexprs, options, label))
            else:
                partition, split_top1, lowest, adaptive, forward, reverse = code
                constexprs = dict(
                    PARTITION=partition,
                    SPLIT_TOP1=split_top1,
                    LOWEST=lowest,
                    ADAPTIVE=adaptive,
                    FORWARD=forward,
                    REVERSE=reverse,
                    HAS_TARGET=True,
                    HAS_DENOM=False,
                    WITH_CE=True,
                    CE_GRAD=True,
                    DISTILL_GRAD=True,
                    STANDARDIZE=standardize,
                    WITH_GRAD=True,
                    KPAD=8,
                    **switches,
                )
                label = describe(dict(constexprs, PARTITION=code_name), options)
                out.append((decoupled_kernel, POINTERS, constexprs, options, label))
    return out


def cross_vocab_specialisations() -> list[tuple]:
    """The cross-vocabulary kernels with every switch on, launched as launch_cross_vocab does, uld and hybrid (uld's
    code and the matched pairs'): the on-chip sort at rows of 1024 classes, and the chunked path's two streaming
    kernels at their tile. The widest row the on-chip kernel sorts (triton.cross_vocab.MAX_BLOCK, 4096) takes several
    minutes per Triton version to compile on a 2-core machine, too long for CI: compiled once by hand, it used 208
    registers (Triton 3.6) and 192 (3.9) without spills (docs/benchmarks.md)."""
    from kdkernels.backends.triton.cross_vocab import (
        STREAM_TILE,
        STREAM_WARPS,
        cross_vocab_kernel,
        cross_vocab_probs_kernel,
        cross_vocab_ranks_kernel,
        launch_options,
    )

    out = []
    switches = dict(HAS_CS=True, HAS_CT=True, WITH_CE=True)
    for hybrid in (False, True):
        block = 1024
        constexprs = dict(
            HAS_TARGET=True,
            HAS_DENOM=True,
            **switches,
            HYBRID=hybrid,
            WITH_GRAD=True,
            BLOCK_S=block,
            BLOCK_T=block // 2,
            BLOCK=block,
            BLOCK_M=block // 4 if hybrid else 1,
        )
        options = launch_options(block)
        out.append((cross_vocab_kernel, CROSS_VOCAB_POINTERS, constexprs, options, describe(constexprs, options)))
        streamed = [
            (cross_vocab_probs_kernel, dict(**switches, HYBRID=hybrid, TILE=STREAM_TILE)),
            (
                cross_vocab_ranks_kernel,
                dict(HAS_TARGET=True, HAS_DENOM=True, **switches, HYBRID=hybrid, WITH_GRAD=True, TILE=STREAM_TILE),
            ),
        ]
        for kernel, constexprs in streamed:
            options = dict(num_warps=STREAM_WARPS)
            out.append((kernel, CROSS_VOCAB_POINTERS, constexprs, options, describe(constexprs, options)))
    return out


@contextlib.contextmanager
def stderr_to(file):
    """Points file descriptor 2, where MLIR and LLVM write their diagnostics (not Python's sys.stderr), at `file`."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def main(family: str, out_path: str, *flags: str) -> None:
    import triton

    records, failures = [], []
    for spec in specialisations(family, covering="--covering" in flags):
        with tempfile.TemporaryFile("w+") as said:
            try:
                with stderr_to(said):
                    records += compile_for_h200(*spec)
            except Exception as error:  # noqa: BLE001 (reported with its specialisation; the others still compile)
                # The exception says little ("PassManager::run failed"); the compiler's diagnostics say why.
                said.seek(0)
                why = dict.fromkeys(line for line in said.read().splitlines() if "error" in line or "Assertion" in line)
                failures.append([spec[-1], "\n".join([f"{type(error).__name__}: {error}", *why])[:2000]])
    with open(out_path, "w") as out:
        json.dump({"triton": triton.__version__, "records": [asdict(r) for r in records], "failures": failures}, out)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    main(*sys.argv[1:])
