#!/usr/bin/env bash
# Creates .venv (once) and installs kdkernels into it with everything the demos, tests and benchmarks need (the dev
# and llm extras: transformers, trl, liger-kernel ...), building the compiled extension kdkernels._C. torch is
# pinned: on these CPU machines torch==2.13.0 comes from a local CPU build (an unpinned torch would pull GBs of CUDA
# packages). Set KDKERNELS_TORCH to another requirement (or to "" to keep the installed one).
#
# A later run installs and builds nothing unless something the install depends on changed: a file of csrc/,
# setup.py, pyproject.toml, the kernel call's record (the build generates a C++ header from it), the torch requirement or a build switch (KDKERNELS_NO_EXTENSION, KDKERNELS_NO_CUDA,
# KDKERNELS_CUDA_ARCHS), or the package no longer imports. KDKERNELS_SETUP_CHECK=1 only says which: exit status 0
# when up to date, 1 when a run would reinstall.
#
# It also makes .venv-triton36: the GPU machine's Triton (3.6.0) with the same torch, nothing else (kdkernels comes
# from the checkout, on PYTHONPATH), under which tests/test_triton_compile.py compiles the Triton kernels a second
# time, so that an API that only one of the two Triton versions has fails here rather than on the GPU (compiled, never
# interpreted: its Triton imports without numpy, which only the interpreter needs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
torch_req=${KDKERNELS_TORCH-torch==2.13.0}
stamp_file=build/setup.stamp
stamp=$( {
  echo "torch=$torch_req no_extension=${KDKERNELS_NO_EXTENSION:-} no_cuda=${KDKERNELS_NO_CUDA:-}" \
       "archs=${KDKERNELS_CUDA_ARCHS:-}"
  find csrc setup.py pyproject.toml kdkernels/backends/kernel_call.py -type f | LC_ALL=C sort | xargs sha256sum
} | sha256sum | cut -d' ' -f1)
triton_gpu_reqs=("${torch_req:-torch==2.13.0}" triton==3.6.0)
if [ "$(cat build/setup-triton36.stamp 2>/dev/null)" != "${triton_gpu_reqs[*]}" ] \
    || ! env -u TRITON_INTERPRET .venv-triton36/bin/python -c "import torch, triton" 2>/dev/null; then
  if [ "${KDKERNELS_SETUP_CHECK:-}" = 1 ]; then
    echo "scripts/setup.sh: .venv-triton36 is out of date: a run would install ${triton_gpu_reqs[*]} into it"
    exit 1
  fi
  [ -x .venv-triton36/bin/python ] || "$PYTHON" -m venv .venv-triton36
  .venv-triton36/bin/python -m pip -q --disable-pip-version-check install "${triton_gpu_reqs[@]}"
  mkdir -p build
  echo "${triton_gpu_reqs[*]}" > build/setup-triton36.stamp
fi
module=kdkernels._C
[ "${KDKERNELS_NO_EXTENSION:-}" != 1 ] || module=kdkernels
if [ -x .venv/bin/python ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] \
    && .venv/bin/python -c "import $module" 2>/dev/null; then
  echo "scripts/setup.sh: .venv is up to date (nothing the install depends on changed): not rebuilding"
  exit 0
fi
if [ "${KDKERNELS_SETUP_CHECK:-}" = 1 ]; then
  echo "scripts/setup.sh: .venv is out of date (a source, the torch requirement or a build switch changed): a run" \
       "would reinstall and rebuild (stamp $stamp)"
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
[ -z "$torch_req" ] || pip install "$torch_req"
pip install setuptools wheel
# The torch requirement again: the extras' packages that depend on torch (trl, liger-kernel) keep the pinned build.
pip install --no-build-isolation -e ".[dev,llm]" ${torch_req:+"$torch_req"}
mkdir -p build
echo "$stamp" > "$stamp_file"
