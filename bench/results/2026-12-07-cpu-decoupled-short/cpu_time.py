"""CPU time of a benchmark step (forward + backward, as `python -m kdkernels bench` times it) on one thread.

    PYTHONPATH=<checkout> python cpu_time.py --shapes vision-10 --methods dkd aekt --backends cpu compile

Inputs, losses and steps are the bench's (kdkernels.bench: its shape table, its inputs, its loss functions); the
clock is time.process_time, the CPU time this process gets whatever the other sessions on the host take of the
cores (cache sharing aside), where the bench's wall time counts the time slices others take. One thread
(torch.set_num_threads(1)); the least of --reps steps after one warm-up step. Prints one CSV line per case:
shape,method,backend,ms.
"""

from __future__ import annotations

import argparse
import time

import torch

from kdkernels import bench


def step_cpu_ms(method: str, backend: str, s, t, y, reps: int) -> float:
    fn = bench._loss_fn(method, backend)

    def step():
        s.grad = None
        fn(s, t, y).backward()

    step()
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        step()
        best = min(best, time.process_time() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--backends", nargs="+", default=["cpu"])
    parser.add_argument("--reps", type=int, default=10)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    table = bench.shape_table("cpu", linear=False)
    for shape in opts.shapes:
        n, v, dtype = table[shape]
        g = torch.Generator().manual_seed(0)
        s = (torch.randn(n, v, generator=g) * 3).to(dtype).requires_grad_(True)
        t = (torch.randn(n, v, generator=g) * 3).to(dtype)
        y = torch.randint(0, v, (n,), generator=g)
        y[::97] = -100
        for method in opts.methods:
            for backend in opts.backends:
                ms = step_cpu_ms(method, backend, s, t, y, opts.reps)
                print(f"{shape},{method},{backend},{ms:.3f}", flush=True)


if __name__ == "__main__":
    main()
