"""Where a fused CPU kernel's time goes: the fixed cost of a row against the cost of its classes, on one thread.

    python bench/cpu_costs.py [--methods kd rkl ...] [--dtype float32|bfloat16]

For each method it times the C++ op (forward with the gradient, no autograd, one thread, gradient buffers reused:
the fastest of 30 calls) at V = 16, 112 and 1008 (1, 7 and 63 vectors of 16 float32 classes) and fits
time per row = row + vector * V / 16 by least squares: ``row`` is what a row costs whatever its length (the passes'
set-up, the lane reductions, two logs, the loop over rows), ``vector`` what 16 more classes cost (their exps, terms
and gradient). It also prints the share of the row's fixed cost at V = 100, and ns per class at V = 32000 (the LLM
shape's computing alone: 256 rows, which the host's cache holds) beside the time per class the byte floor leaves
each of two cores at the copy bandwidth measured in the same run (kdkernels.bench.copy_bandwidth_gbps).
"""

from __future__ import annotations

import argparse
import time

import torch

import kdkernels
from kdkernels.arguments import resolve
from kdkernels.backends.ops import op_args
from kdkernels.bench import copy_bandwidth_gbps, minimal_bytes

LANES = 16
WIDTHS = (16, 112, 1008)


def op_ms(method: str, n: int, v: int, dtype: torch.dtype, reps: int = 30) -> float:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    call = resolve(method).bind(y, s.shape[:-1], v, s.device)
    op = getattr(torch.ops.kdkernels, f"{call.plan.family}_cpu").default
    args = op_args(call)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        op(s, t, *args, True)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(kdkernels.METHODS), choices=list(kdkernels.METHODS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    opts = parser.parse_args()
    dtype = getattr(torch, opts.dtype)
    bandwidth = copy_bandwidth_gbps(torch.device("cpu"))
    # The time the byte floor leaves each class on each of two cores: the floor of N V classes, N V / 2 per core.
    floor_ns = 2 * minimal_bytes(1, 1, dtype) / bandwidth
    torch.set_num_threads(1)
    print(
        f"one thread, {opts.dtype}; copy bandwidth {bandwidth:.1f} GB/s: at the byte floor two cores have "
        f"{floor_ns:.2f} ns per class each (at 2.5x the floor: {2.5 * floor_ns:.2f})"
    )
    print(f"{'method':9s} {'row ns':>7s} {'vector ns':>9s} {'row share V=100':>15s} {'ns/class V=32000':>16s}")
    for method in opts.methods:
        per_row = [
            op_ms(method, 4096 if v < 1000 else 1024, v, dtype) * 1e6 / (4096 if v < 1000 else 1024) for v in WIDTHS
        ]
        vectors = [v / LANES for v in WIDTHS]
        mean_x, mean_y = sum(vectors) / 3, sum(per_row) / 3
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(vectors, per_row)) / sum(
            (x - mean_x) ** 2 for x in vectors
        )
        row = mean_y - slope * mean_x
        share = row / (row + slope * 100 / LANES)
        llm = op_ms(method, 256, 32000, dtype, reps=8) * 1e6 / (256 * 32000)
        print(f"{method:9s} {row:7.1f} {slope:9.2f} {share:15.0%} {llm:16.2f}")


if __name__ == "__main__":
    main()
