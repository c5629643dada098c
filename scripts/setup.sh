#!/usr/bin/env bash
# Creates .venv (once) and installs kdkernels into it with everything the demo, tests and benchmarks need.
# torch is pinned: on these CPU machines torch==2.13.0 comes from a local CPU build (an unpinned torch would pull
# GBs of CUDA packages). Set KDKERNELS_TORCH to another requirement (or to "" to keep the installed one).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
torch_req=${KDKERNELS_TORCH-torch==2.13.0}
[ -z "$torch_req" ] || pip install "$torch_req"
pip install setuptools wheel
pip install --no-build-isolation -e ".[dev]"
