"""The Triton kernels compile for the H200 (sm_90), here, without a GPU, and none spills.

The interpreter that runs the kernels on CPU tensors accepts code that the compiler rejects (non-constexpr globals,
loop-carried type changes, ...); compiling to cubin for sm_90 catches that in CI. The compiler needs the real
@triton.jit functions, so each family compiles in a subprocess without TRITON_INTERPRET (tests/triton_sm90.py), which
also reads each specialisation's registers, spills and shared memory from ptxas (tests/sm90_resources.py: a spill
fails the test; KDKERNELS_SPILL_REPORT=<dir> writes the tables). Each family compiles twice: under this venv's
Triton and under the GPU machine's, Triton 3.6.0 (.venv-triton36, made by scripts/setup.sh), so that code that only
one of the two compiles (an API, a compiler bug) fails here rather than on the GPU: 3.6.0 every launch shape, whose
resources are those of the Triton that runs the kernels, this venv's a covering set of them (TRITONS). On a GPU
machine the kernels are compiled by running them (every other test file), so this file only runs without one.
"""

import json
import os
import subprocess
import sys

import pytest
import sm90_resources
import torch
from sm90_resources import Resources

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="with a GPU the kernels are compiled by running them (every other test file)"
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# (interpreter, the Triton version it must have: None for whichever this venv has, the script's flags): the GPU
# machine's Triton compiles every launch shape, whose registers and spills are the ones that matter; this venv's, the
# newest, a covering set of them (every compile-time branch once per code: does it compile the code at all).
TRITONS = {
    "venv": (sys.executable, None, ["--covering"]),
    "triton-3.6.0": (os.path.join(ROOT, ".venv-triton36", "bin", "python"), "3.6.0", []),
}


@pytest.mark.parametrize("family", ["divergence", "decoupled", "scale", "cross_vocab"])
@pytest.mark.parametrize("triton", list(TRITONS))
def test_kernels_compile_for_sm90(triton, family, tmp_path):
    python, version, flags = TRITONS[triton]
    assert os.path.exists(python), f"{python} not found: run scripts/setup.sh (it makes the Triton {version} venv)"
    out = tmp_path / "records.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    done = subprocess.run(
        [python, os.path.join(HERE, "triton_sm90.py"), family, str(out), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert version is None or result["triton"] == version, f"{python} has Triton {result['triton']}, not {version}"
    records = [Resources(**r) for r in result["records"]]
    result["failures"] = [[label, error.replace(ROOT + os.sep, "")] for label, error in result["failures"]]
    sm90_resources.report(
        f"triton-{result['triton']}",
        f"Triton {result['triton']}, sm_90 (GPUTarget('cuda', 90, "
        "32)), tests/triton_sm90.py: registers per thread, stack and spills in bytes per thread, "
        "smem in bytes per block (Triton's dynamic + ptxas's static)",
        family,
        records,
        result["failures"],
    )
    failed = "".join(f"\n{label}\n  {error}" for label, error in result["failures"])
    assert not failed, f"Triton {result['triton']}, {family}: failed to compile:{failed}"
    spills = sm90_resources.spill_message(f"Triton {result['triton']}, {family}", records)
    assert not spills, spills
