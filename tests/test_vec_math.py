"""The CPU kernels' inline float exp and log (csrc/cpu/vec_ops.h) against double precision: tests/vec_math_check.cpp,
compiled here once per CPU capability that has them (AVX2, AVX-512) with setup.py's flags for it, over every 61st
32-bit pattern (every float takes about half a minute a capability, and gave the same bounds: exp 1.01 ulp, log
0.83 ulp) and the special values."""

import ast
import os
import re
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 61
# Bounds in ulps of the float result (the exhaustive sweep's maxima, plus a margin for rounding of the measure).
MAX_ULP = {"exp": 1.02, "log": 0.85}
# Capabilities this CPU runs, narrowest first (torch reports the widest one it has).
RUNNABLE = {"DEFAULT": [], "AVX2": ["AVX2"], "AVX512": ["AVX2", "AVX512"]}[torch.backends.cpu.get_cpu_capability()]


def capability_flags(capability: str) -> list[str]:
    """setup.py's compiler flags for the CPU kernels of ``capability``."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        match = re.search(rf'CPU_CAPABILITIES\["{capability}"\] = (\[.*?\])', f.read())
    return ast.literal_eval(match.group(1))


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_inline_exp_and_log_are_within_their_ulp_bounds(capability, tmp_path):
    if capability not in RUNNABLE:
        pytest.skip(f"this CPU cannot run {capability} code (it has {torch.backends.cpu.get_cpu_capability()})")
    binary = tmp_path / "vec_math_check"
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    libs = cpp_extension.library_paths()
    compile_ = subprocess.run(
        [
            "g++",
            "-O2",
            "-std=c++17",
            f"-DCPU_CAPABILITY={capability}",
            f"-DCPU_CAPABILITY_{capability}",
            *capability_flags(capability),
            *[f"-I{p}" for p in includes],
            os.path.join(ROOT, "tests", "vec_math_check.cpp"),
            "-o",
            str(binary),
            *[f"-L{p}" for p in libs],
            *[f"-Wl,-rpath,{p}" for p in libs],
            "-lc10",
            "-ltorch_cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert compile_.returncode == 0, compile_.stderr[-4000:]
    run = subprocess.run([str(binary), str(STEP)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = {name: (float(ulp), where, int(bad)) for name, ulp, where, bad in map(str.split, run.stdout.splitlines())}
    assert set(results) == set(MAX_ULP), run.stdout
    for name, (ulp, where, bad) in results.items():
        assert bad == 0, f"{capability} {name}: {bad} results break its rules for specials and range ({run.stdout})"
        assert ulp <= MAX_ULP[name], f"{capability} {name}: {ulp} ulp at x = {where} (bound {MAX_ULP[name]})"
