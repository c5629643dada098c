"""In one process, alternating rounds (each round in the reverse order of the last): unchunked, the fused-linear
default with both heads packed once per call (commit b805b20 of this branch: 19 chunks of 432 rows) and without packs
(the whole budget to the chunks, as main: 5 chunks of 1639 rows), jsd, N = 8192, H = 1024, V = 65536 float32.
Run from a checkout of b805b20: python packed_ab_8k.py ROUNDS
"""

import statistics
import sys
import time

import torch

from kdkernels import linear
from kdkernels.bench import FUSED_LINEAR, UNCHUNKED, _linear_inputs, _linear_step

n, h, v = 8192, 1024, 65536
inputs = _linear_inputs(n, h, v, torch.float32, "cpu")
packed_bytes = linear.packed_bytes


def step(kind):
    linear.packed_bytes = packed_bytes if kind == "packed" else (lambda w, r: 0)
    _linear_step(UNCHUNKED if kind == "unchunked" else FUSED_LINEAR, "jsd", *inputs)


kinds = ["unchunked", "packed", "unpacked"]
times = {k: [] for k in kinds}
for r in range(int(sys.argv[1])):
    for k in kinds if r % 2 == 0 else kinds[::-1]:
        t = time.perf_counter()
        step(k)
        times[k].append(time.perf_counter() - t)
        print(r, k, round(times[k][-1] * 1e3), time.strftime("%H:%M:%S"), flush=True)
for k, t in times.items():
    print(f"{k:10s} median {statistics.median(t) * 1e3:.0f} ms [{min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}]")
