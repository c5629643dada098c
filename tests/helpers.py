"""Shared test helpers: random logits, the per-dtype tolerance table, and comparison against the oracle."""

from __future__ import annotations

import os

import numpy as np
import torch
from oracle import oracle

import kdkernels
from kdkernels.backends.kernel_call import KernelCall

# Relative tolerance per input dtype, applied as |got - want| <= tol * (|want| + max|want|) (loss and gradient).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# The width of a row that streams in tiles: an LLM's, except for Triton's interpreter on CPU tensors, where two
# tiles (of MAX_TILE = 4096) take the same code paths at a fifteenth of the time (the full tier ran them at 70000 for
# about 8 minutes of CI).
STREAMED_WIDTH = 70000
INTERPRETED_STREAMED_WIDTH = 4500


def uninterpreted_env() -> dict:
    """This process's environment without TRITON_INTERPRET (which conftest sets for the kernel tests): for a
    subprocess that runs as a user runs it (the demos) or that compiles the Triton kernels (torch.compile)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def streamed_width(backend: str, device: str) -> int:
    """STREAMED_WIDTH, or INTERPRETED_STREAMED_WIDTH for backend "triton" on CPU tensors (the interpreter)."""
    return INTERPRETED_STREAMED_WIDTH if backend == "triton" and device == "cpu" else STREAMED_WIDTH


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0, scale=3.0, ignored=1, teacher_dtype=None):
    """Student/teacher logits of ``shape`` and a target with ``ignored`` rows set to -100."""
    g = torch.Generator().manual_seed(seed)
    v = shape[-1]
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(teacher_dtype or dtype)
    target = torch.randint(0, v, shape[:-1], generator=g)
    flat = target.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:ignored]] = -100
    return s.to(device), t.to(device), target.to(device)


def assert_close(got, want, dtype, what, min_scale=0.0):
    """|got - want| <= tol * (|want| + max|want|) where want is finite (the max over those, at least ``min_scale``);
    where it is not (inf, -inf, NaN), got must be the same."""
    got = np.asarray(got.detach().double().cpu() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    tol = TOLERANCE[dtype]
    finite = np.isfinite(want)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert np.all(same | finite), (
        f"{what}: got {got[~(same | finite)][:4]} where want is {want[~(same | finite)][:4]} "
        f"(at {np.argwhere(~(same | finite))[:4].tolist()})"
    )
    scale = max(np.abs(want[finite]).max() if finite.any() else 0.0, min_scale)
    err = np.where(finite, np.abs(got - np.where(finite, want, 0.0)), 0.0)
    err = np.where(finite & np.isnan(got), np.inf, err)
    bound = tol * (np.abs(np.where(finite, want, 0.0)) + scale) + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape) if err.size else ()
    assert np.all(err <= bound), (
        f"{what}: max error {err.max() if err.size else 0:.3e} at {worst} (got {got[worst] if err.size else got}, "
        f"want {want[worst] if err.size else want}), tolerance {tol:g} relative, scale {scale:.3e}"
    )


def run_loss(method, s, t, target, hp, backend, reduction="batchmean", grad_output=None, **options):
    """Loss and student gradient from kdkernels for d(grad_output . loss)/ds."""
    s = s.detach().clone().requires_grad_(True)
    loss = kdkernels.distill_loss(method, s, t, target, backend=backend, reduction=reduction, **hp, **options)
    go = (
        torch.ones_like(loss)
        if grad_output is None
        else torch.as_tensor(grad_output, dtype=loss.dtype, device=loss.device)
    )
    loss.backward(go)
    return loss, s.grad


def check_against_oracle(
    method, hp, s, t, target, backend, reduction="batchmean", grad_output=None, tol_dtype=None, **options
):
    loss, grad = run_loss(method, s, t, target, hp, backend, reduction, grad_output, **options)
    spec = kdkernels.METHODS[method]
    T = options.get("temperature", spec.temperature)
    t2 = options.get("t2_scale", spec.t2_scale)
    want_loss, want_grad = oracle(
        method,
        s.double().cpu().numpy(),
        t.double().cpu().numpy(),
        None if target is None else target.cpu().numpy(),
        spec.resolve(hp),
        T,
        t2,
        reduction,
        options.get("ignore_index", -100),
        options.get("normalizer"),
        1.0
        if grad_output is None
        else np.asarray(grad_output.cpu() if isinstance(grad_output, torch.Tensor) else grad_output, dtype=np.float64),
        options.get("ce_weight", 0.0),
        options.get("distill_weight", 1.0),
        options.get("standardize", False),
        label_smoothing=options.get("label_smoothing", 0.0),
        float64_math=torch.float64 in (s.dtype, t.dtype),
    )
    dtype = tol_dtype or s.dtype
    assert loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    assert_close(loss, want_loss, dtype, f"{method} {hp} loss")
    assert_close(grad, want_grad, dtype, f"{method} {hp} gradient")


def kernel_call(method, hp, **fields) -> tuple[str, KernelCall]:
    """(family, the KernelCall of the method's plan with ``fields``), as the family ops take it."""
    plan = kdkernels.METHODS[method].plan(kdkernels.METHODS[method].resolve(hp))
    return plan.family, KernelCall(code=int(plan.code), params=tuple(float(x) for x in plan.params), **fields)


def family_ops(backend):
    """{family: (op, in-place op)} of a fused backend: kdkernels::<family>_<backend> and its sibling."""
    return {
        family: (
            getattr(torch.ops.kdkernels, f"{family}_{backend}").default,
            getattr(torch.ops.kdkernels, f"{family}_{backend}_").default,
        )
        for family in ("divergence", "decoupled")
    }
