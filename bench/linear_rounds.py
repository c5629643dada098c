"""Fused-linear step times in alternating rounds in one process: the paths of `bench --linear` one step each in
turn, so that a change in the machine's load reaches every path alike (`bench --linear` times each path's steps
back to back in its own process, minutes apart from the next path's).

    python bench/linear_rounds.py --shape head-64k --paths unchunked fused-linear liger --rounds 5 [--budgets MB ...]

Each path takes a warm-up step (Liger's compiles) before round 1. ``--budgets`` adds fused-linear paths with that
``memory_budget`` (MiB), to compare a chunk policy with the default in the same rounds. Prints each round's times
and, per path, the median time and (x unchunked) the median over rounds of its time / the unchunked path's in the
same round.
Memory is not measured here (`bench --linear` measures it exactly, in a fresh process per path).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdkernels.bench import (
    FUSED_LINEAR,
    LINEAR_CASES,
    LINEAR_CPU_SHAPES,
    LINEAR_PATHS,
    UNCHUNKED,
    _linear_inputs,
    _linear_step,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(LINEAR_CPU_SHAPES), required=True)
    parser.add_argument("--case", choices=list(LINEAR_CASES), default="jsd")
    parser.add_argument("--paths", nargs="+", choices=LINEAR_PATHS, default=[UNCHUNKED, "fused-linear"])
    parser.add_argument("--budgets", nargs="*", type=int, default=[], help="MiB of fused-linear paths' budgets")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, h, v, dtype = LINEAR_CPU_SHAPES[args.shape]
    inputs = _linear_inputs(n, h, v, dtype, torch.device("cpu"))
    steps = {path: (lambda path=path: _linear_step(path, args.case, *inputs)) for path in args.paths}
    for mib in args.budgets:
        steps[f"budget-{mib}MiB"] = lambda mib=mib: _linear_step(FUSED_LINEAR, args.case, *inputs, budget=mib << 20)
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
        print(f"round {r + 1}: " + ", ".join(f"{name} {ms[-1]:.0f} ms" for name, ms in times.items()), flush=True)
    base = times.get(UNCHUNKED)
    print(f"{args.shape} ({n} x {h} x {v} {str(dtype).replace('torch.', '')}), {args.case}, {args.rounds} rounds:")
    for name, ms in times.items():
        ratio = "" if base is None else f", x unchunked {statistics.median(m / b for m, b in zip(ms, base)):.3f}"
        print(f"  {name}: median {statistics.median(ms):.0f} ms (min {min(ms):.0f}, max {max(ms):.0f}){ratio}")


if __name__ == "__main__":
    main()
