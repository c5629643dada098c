#!/usr/bin/env bash
# GPU validation: the whole test suite with CUDA tensors, then the benchmark; results (logs, env, CSV, PNG) go to
# one folder to commit under bench/results/.
#
#   bash scripts/gpu_validate.sh [tests|bench|linear|all] [results-dir] [-- extra bench args]
#
# linear: the fused-linear section (python -m kdkernels bench --linear: N=8192, H=4096, V=128256 bf16).
#
# Runs with the machine's own python3/torch/triton (no network needed): the package is used from this checkout
# (PYTHONPATH), and the compiled extension, if there are C++ sources, is built in place first. Each part fits one
# 10-minute call on an H200; run them as separate calls if need be (bench args such as --shapes split it further).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
results=${2:-${OUT:-bench/results/$(date +%F)-gpu}}
shift $(( $# > 2 ? 2 : $# )); [ "${1:-}" = "--" ] && shift
mkdir -p "$results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "command: bash scripts/gpu_validate.sh $mode $results $*"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__)"
} | tee "$results/env.txt"
if ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  echo "no nvcc here: the extension is built without its CUDA kernels (KDKERNELS_NO_CUDA=1)" | tee -a "$results/env.txt"
  export KDKERNELS_NO_CUDA=1
fi
if ! python3 -c "import transformers, trl" 2>/dev/null; then
  echo "no transformers / trl here: tests/test_integrations.py is skipped (KDKERNELS_NO_LLM=1)" \
    | tee -a "$results/env.txt"
  export KDKERNELS_NO_LLM=1
fi
if ls csrc/*.cpp >/dev/null 2>&1 && [ "${KDKERNELS_NO_EXTENSION:-0}" != 1 ]; then
  python3 setup.py -q build_ext --inplace 2>&1 | tail -5 | tee "$results/build.log"
fi
status=0
if [ "$mode" = tests ] || [ "$mode" = all ]; then
  python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$results/tests.log" | tail -25
  status=${PIPESTATUS[0]}
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  python3 -m kdkernels bench --device cuda --out "$results" --no-progress "$@" 2>&1 | tee "$results/bench.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$mode" = linear ]; then
  python3 -m kdkernels bench --linear --device cuda --out "$results" "$@" 2>&1 | tee "$results/linear.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
