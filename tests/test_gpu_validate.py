"""scripts/gpu_validate.sh without a GPU: its syntax; budgets that fit one 8-minute device call; no more files than
the device machine returns (8); a failing step stops no later one and sets the exit status (python3 stubbed); and
its test subset (KDKERNELS_GPU_QUICK=1) is every method x fused backend x V in (1000, 70000) x (fp32, bf16), plus
the fused-linear bf16 tests and the cross-vocabulary kernels' device test."""

import os
import re
import stat
import subprocess
import sys
from collections import Counter

from conftest import DEVICE, backends_under_test, cross_vocab_device_backends

import kdkernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_validate.sh")
with open(SCRIPT) as f:
    TEXT = f.read()
OUTPUTS = re.search(r"^OUTPUTS=\((.*)\)$", TEXT, re.M).group(1).split()
# python3 for the script: pytest fails, bench writes its files into --out (and STUB_EXTRA one file more), the rest
# (the build, the environment's imports) succeeds.
STUB = """#!/usr/bin/env bash
args=" $* "
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
case $args in
  *" pytest "*) exit 3 ;;
  *" --cross-vocab "*) ;;
  *" --linear "*) touch "$out/linear.csv" ;;
  *" bench "*) touch "$out/bench.csv" "$out/bench.png" ${STUB_EXTRA:+"$out/extra.json"} ;;
esac
"""


def test_syntax():
    done = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_outputs_and_budgets_fit_one_device_call():
    assert len(OUTPUTS) <= 8 and len(set(OUTPUTS)) == len(OUTPUTS), OUTPUTS
    total = int(re.search(r"^TOTAL=(\d+)$", TEXT, re.M).group(1))
    budgets = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"^declare -A BUDGET=\((.*)\)$", TEXT, re.M).group(1)))
    assert set(budgets) == {"build", "tests", "bench", "linear"}
    assert sum(map(int, budgets.values())) <= total <= 8 * 60 - 10  # 10 s for the kill grace of a step past its limit


def run_stubbed(tmp_path, *args, **env):
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "python3").write_text(STUB)
    (stubs / "python3").chmod(stat.S_IRWXU)
    results = tmp_path / "results"
    environ = {k: v for k, v in os.environ.items() if k not in ("OUT", "KDKERNELS_NO_EXTENSION")}
    done = subprocess.run(
        ["bash", SCRIPT, args[0], str(results), *args[1:]],
        capture_output=True,
        text=True,
        env={**environ, "PATH": f"{stubs}:{os.environ['PATH']}", **env},
        timeout=60,
    )
    return done, results


def test_a_failing_step_stops_no_later_one(tmp_path):
    done, results = run_stubbed(tmp_path, "all")
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(os.listdir(results)) == sorted(OUTPUTS)
    verdicts = (results / "env.txt").read_text().split("steps (total")[1]
    for step, verdict in (("build", "ok"), ("tests", r"failed \(exit 3\)"), ("bench", "ok"), ("linear", "ok")):
        assert re.search(rf"^  {step} +{verdict} ", verdicts, re.M), verdicts


def test_files_besides_the_outputs_fail_the_run(tmp_path):
    done, results = run_stubbed(tmp_path, "bench", STUB_EXTRA="1")
    assert done.returncode == 1 and "files besides OUTPUTS" in done.stdout and "extra.json" in done.stdout
    assert re.search(r"^  bench +ok ", (results / "env.txt").read_text(), re.M)


def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    done, results = run_stubbed(tmp_path, "build,bnech")
    assert done.returncode == 2 and "unknown step 'bnech'" in done.stderr and not results.exists()


def test_gpu_subset():
    """Every method x fused backend once per (V, dtype) of the kernel tests, every backend in the linear ones, and the
    device's cross-vocabulary kernels once per method, dtype and width."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "KDKERNELS_GPU_QUICK": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    fused = [b for b in backends_under_test() if b != "reference"]
    kernels, cross_vocab = Counter(), Counter()
    for node in ids:
        path, _, name = node.partition("::")
        function, params = name.rstrip("]").split("[")
        if path == "tests/test_kernels.py":
            backend, *case, v = params.removesuffix("-bf16").split("-")
            kernels[function, backend, case[0], v, params.endswith("-bf16")] += 1
        elif path == "tests/test_cross_vocab.py":
            assert function == "test_device_kernels_against_oracle", node
            cross_vocab[params] += 1
        else:
            assert path == "tests/test_linear.py" and function in (
                "test_bfloat16_heads",
                "test_bfloat16_hidden_float32_weight",
            ), node
    want = {
        (function, backend, method, v, function.startswith("test_half"))
        for function in ("test_float32_any_vocabulary", "test_half_precision_no_worse_than_eager")
        for backend in fused
        for method in kdkernels.METHODS
        for v in ("1000", "70000")
    }
    assert set(kernels) == want and set(kernels.values()) == {1}
    widths = ("fits", "chunked") if DEVICE != "cpu" else ("chunked",)
    want_cross_vocab = {
        f"{backend}-{method}-{dtype}-{width}"
        for backend in cross_vocab_device_backends()
        for method in ("uld", "hybrid")
        for dtype in ("torch.float32", "torch.bfloat16")
        for width in widths
    }
    assert want_cross_vocab and set(cross_vocab) == want_cross_vocab and set(cross_vocab.values()) == {1}
    assert len(ids) == len(want) + 2 * (len(fused) + 1) + len(want_cross_vocab)
