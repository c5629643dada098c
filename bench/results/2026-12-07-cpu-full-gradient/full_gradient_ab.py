"""A/B of the full-gradient backward (a learnable temperature; a teacher that learns) in one process: the kept
gradients scaled in place (now) against a fresh (grad * grad_output).to(dtype) (before), alternating round by round,
forward + backward of kd at [N, V] on the cpu backend with grad_output 0.5.

    python full_gradient_ab.py [rounds]
"""

import statistics
import sys
import time

import torch

import kdkernels
from kdkernels.backends import ops

N, V = 1024, 32000
NEW_BACKWARD = ops._FullGradient.backward


def old_backward(ctx, grad_loss, _grad_parts):
    return (*ops.scale_full_gradients(grad_loss, *ctx.saved_tensors, ctx.temperature_dtype), None, None, None)


def step(s0, t0, y, dtype, teacher_learns) -> float:
    s = s0.to(dtype, copy=True).requires_grad_(True)
    t = t0.to(dtype, copy=True).requires_grad_(teacher_learns)
    temperature = torch.tensor(2.0, requires_grad=True)
    start = time.perf_counter()
    kdkernels.kd_loss(s, t, y, temperature=temperature, backend="cpu").backward(torch.tensor(0.5))
    return time.perf_counter() - start


def main(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    s0, t0 = torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g) * 3
    y = torch.randint(0, V, (N,), generator=g)
    variants = {"before": old_backward, "after": NEW_BACKWARD}
    for dtype in (torch.float32, torch.bfloat16):
        for teacher_learns in (False, True):
            times = {name: [] for name in variants}
            for warm_up in (True,) + (False,) * rounds:
                for name, backward in variants.items():
                    ops._FullGradient.backward = staticmethod(backward)
                    elapsed = step(s0, t0, y, dtype, teacher_learns)
                    if not warm_up:
                        times[name].append(elapsed)
            before, after = (statistics.median(times[name]) * 1e3 for name in variants)
            print(
                f"kd [{N}, {V}] {str(dtype)[6:]:9s} teacher learns={teacher_learns!s:5s}: before {before:7.1f} ms, "
                f"after {after:7.1f} ms, before / after {before / after:.2f}"
            )
    ops._FullGradient.backward = staticmethod(NEW_BACKWARD)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
