#!/usr/bin/env bash
# GPU validation as one prepared call on an H200: at most 8 minutes from start to end, the build included (an issue
# gets 15 minutes of GPU time in all, a machine start included). Steps, in this order, each under its own time limit
# and none stopped by an earlier one's failure:
#
#   build   the extension in place (kdkernels._C with its CUDA kernels for sm_90; the .cu files compile in parallel)
#   tests   the GPU subset of the test suite (KDKERNELS_GPU_QUICK=1, tests/conftest.py): every method and fused
#           backend once, forward + backward against the float64 oracle, at V = 1000 and V = 70000, fp32 and bf16,
#           the fused-linear path with bf16 heads, and the cross-vocabulary kernels (Triton, CUDA) on rows sorted on
#           chip and on chunked LLM rows
#   bench   python -m kdkernels bench on BENCH_SHAPES x BENCH_METHODS: the fused backends against its eager and
#           torch.compile baselines, GB/s and share of the copy bandwidth; then its --cross-vocab section (uld and
#           hybrid on every backend with cross-vocabulary kernels, the reference included), in the same log
#   linear  python -m kdkernels bench --linear for LINEAR_METHODS: the fused-linear rows
#
#   bash scripts/gpu_validate.sh [all|STEP[,STEP...]] [results-dir] [-- extra bench args]
#
# results-dir: default $OUT (the device machine's folder that comes back), else bench/results/<date>-gpu. Extra bench
# args go to the bench step after its own (a repeated option such as --shapes replaces the default). Exit status: 0
# when every step ran and passed, 1 when one did not, 2 for an unknown step. env.txt ends with each step's verdict
# and time. The run writes OUTPUTS into results-dir and nothing else (the device machine returns at most 8 files).
# It runs with the machine's own python3, torch and triton (no network there), the package from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTPUTS=(env.txt build.log tests.log bench.txt bench.csv bench.png linear.txt linear.csv)
# Seconds for the whole run and per step. Each step may use its budget plus what the steps before it left unused,
# never what the steps after it are budgeted. They are sized on CPU times taken on a 2-core Xeon VM (no H200 run has
# timed them yet): the build waits on nvcc of csrc/cuda/divergence.cu (~105 s; the .cu files compile side by side);
# the tests are ~60 Triton compiles for sm_90 (~2 s each, ~4 s for the decoupled kernel) over TEST_WORKERS processes;
# the bench is mostly its torch.compile baseline, compiled per method and shape (timed with Inductor's CPU backend:
# ~15-25 s for a process's first compile, ~5 s for further ones), ~1.5 min for kd, jsd and dkd x 2 shapes (akl's
# two, which time its head search, are estimated at ~15 s more, not timed); the tests and the bench's --cross-vocab
# section add 12 and 6 Triton compiles (the cross-vocab kernels; not timed on a GPU); each linear row is a fresh
# process (~10 s).
TOTAL=470
declare -A BUDGET=([build]=150 [tests]=100 [bench]=150 [linear]=60)
BENCH_SHAPES="llm-128k vision-1000"
BENCH_METHODS="kd jsd dkd akl"
LINEAR_METHODS="kd"
TEST_WORKERS=8

steps=${1:-all}
[ "$steps" = all ] && steps=build,tests,bench,linear
steps=${steps//,/ }
[ "${KDKERNELS_NO_EXTENSION:-0}" = 1 ] && steps=${steps//build/}
reserved=0
for step in $steps; do
  [ -n "${BUDGET[$step]:-}" ] || { echo "unknown step '$step': choose from ${!BUDGET[*]}" >&2; exit 2; }
  reserved=$(( reserved + BUDGET[$step] ))
done
results=${2:-${OUT:-bench/results/$(date +%F)-gpu}}
shift $(( $# > 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
mkdir -p "$results"
# MAX_JOBS: the compiler processes torch's extension builder runs at once (the .cu files compile side by side).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
env_txt=$results/env.txt
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . \
    && echo ' + uncommitted changes')"
  echo "command: bash scripts/gpu_validate.sh ${steps// /,} $results $*"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__)"
} 2>&1 | tee "$env_txt"
note() { echo "$*" | tee -a "$env_txt"; }
if ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  note "no nvcc here: the extension is built without its CUDA kernels (KDKERNELS_NO_CUDA=1)"
  export KDKERNELS_NO_CUDA=1
fi
workers=()
if python3 -c "import xdist" 2>/dev/null; then
  workers=(-n "$TEST_WORKERS")  # Triton's compiles, which set the tests' time, run in parallel
else
  note "no pytest-xdist here: the tests run in one process"
fi

build() {
  python3 setup.py -q build_ext --inplace || return
  # A backend that does not load is left out of the tests, not failed: say here which ones loaded.
  python3 -c "import os, kdkernels; names = kdkernels.available_backends('cuda'); print('backends on cuda:', names)
assert 'cuda' in names or os.environ.get('KDKERNELS_NO_CUDA') == '1', 'the cuda backend did not load'"
}
export -f build

status=0
verdicts=()
# run_step NAME LOG COMMAND...: COMMAND (with all its processes) under the step's limit, its output in LOG.
run_step() {
  local name=$1 log=$results/$2 start=$SECONDS
  shift 2
  reserved=$(( reserved - BUDGET[$name] ))
  local limit=$(( TOTAL - SECONDS - reserved ))
  if (( limit < 10 )); then
    verdicts+=("$(printf '%-7s skipped: no time left' "$name")")
    status=1
    return
  fi
  echo "== $name (limit $limit s)"
  timeout -k 5 "$limit" "$@" > "$log" 2>&1
  local rc=$? verdict=ok
  case $rc in
    0) ;;
    124|137) verdict="timed out" ;;
    *) verdict="failed (exit $rc)" ;;
  esac
  (( rc == 0 )) || status=1
  tail -n 30 "$log"
  verdicts+=("$(printf '%-7s %-16s %4d s of %d s' "$name" "$verdict" $(( SECONDS - start )) "$limit")")
}

for step in $steps; do
  case $step in
    build)
      run_step build build.log bash -c build ;;
    tests)
      run_step tests tests.log env KDKERNELS_GPU_QUICK=1 python3 -m pytest -q -rfE --durations=15 \
        -p no:cacheprovider "${workers[@]}" tests ;;
    bench)
      # shellcheck disable=SC2086  # the shape and method lists split into words
      run_step bench bench.txt bash -c 'python3 -m kdkernels bench "$@"; status=$?
        python3 -m kdkernels bench --cross-vocab --device cuda --no-progress || status=1
        exit $status' bench --device cuda --out "$results" --no-progress --shapes $BENCH_SHAPES \
        --methods $BENCH_METHODS "$@" ;;
    linear)
      # shellcheck disable=SC2086
      run_step linear linear.txt python3 -m kdkernels bench --linear --device cuda --out "$results" \
        --methods $LINEAR_METHODS ;;
  esac
done

unexpected=$(ls -A "$results" | grep -vxF "$(printf '%s\n' "${OUTPUTS[@]}")")
if [ -n "$unexpected" ]; then
  note "files besides OUTPUTS in $results (the device machine returns 8 at most): $unexpected"
  status=1
fi
{ echo; echo "steps (total $SECONDS s of $TOTAL s):"; printf '  %s\n' "${verdicts[@]}"; } | tee -a "$env_txt"
exit $status
