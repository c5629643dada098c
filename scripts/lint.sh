#!/usr/bin/env bash
# Lint and format checks (CI runs them): ruff (pyproject.toml's [tool.ruff]) on the Python code, clang-format
# (.clang-format) on csrc/ and the C++ test helper. Both tools come from the dev extra (scripts/setup.sh). With --fix
# it rewrites the files instead of checking them.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
cxx=(csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/* tests/*.cpp)
if [ "${1:-}" = --fix ]; then
  "$bin/ruff" check --fix . && "$bin/ruff" format . && "$bin/clang-format" -i "${cxx[@]}"
else
  "$bin/ruff" check . && "$bin/ruff" format --check . && "$bin/clang-format" --dry-run -Werror "${cxx[@]}"
fi
