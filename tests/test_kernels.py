"""The fused backends (every backend but the reference) at kernel scale: vocabularies that stream in tiles, low
precision, mixed dtypes, strided rows, extreme logits, the custom ops and their autograd."""

import math

import numpy as np
import pytest
import torch
from cases import CASES, case_id
from helpers import STREAMED_WIDTH, TOLERANCE, assert_close, check_against_oracle, make_inputs, run_loss, streamed_width
from oracle import oracle

import kdkernels


def _grad_output(reduction, n):
    return torch.linspace(-1.5, 2.0, n, dtype=torch.float64) if reduction == "none" else 0.7


@pytest.mark.parametrize("v", [37, 1000, STREAMED_WIDTH])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_any_vocabulary(fused, device, case, v):
    """V below one tile, several rows per program, and a row streamed in tiles, against the oracle (2e-5)."""
    method, hp = case
    reduction = "none" if v == STREAMED_WIDTH else "batchmean"
    v = streamed_width(fused, device) if v == STREAMED_WIDTH else v
    s, t, target = make_inputs((3, v), torch.float32, device, seed=v % 97, ignored=1)
    check_against_oracle(method, hp, s, t, target, fused, reduction, _grad_output(reduction, 3))


def _errors(method, hp, s, t, target, backend, temperature=None):
    """Max errors of loss and gradient against the float64 oracle on the same (rounded) inputs, over their scale."""
    spec = kdkernels.METHODS[method]
    temperature = temperature or spec.temperature
    loss, grad = run_loss(method, s, t, target, hp, backend, "none", temperature=temperature)
    want_loss, want_grad = oracle(
        method,
        s.double().cpu().numpy(),
        t.double().cpu().numpy(),
        target.cpu().numpy(),
        spec.resolve(hp),
        temperature,
        spec.t2_scale,
        "none",
    )
    err = [
        np.abs(got.detach().double().cpu().numpy() - want).max() / np.abs(want).max()
        for got, want in ((loss, want_loss), (grad, want_grad))
    ]
    return err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("v", [37, 1000, STREAMED_WIDTH])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_half_precision_no_worse_than_eager(fused, device, case, v, dtype):
    """bf16 / fp16 logits: within 2e-2 of float64 truth, and no worse than the eager reference fed the same logits."""
    method, hp = case
    v = streamed_width(fused, device) if v == STREAMED_WIDTH else v
    # fp16 stores gradients up to 65504 only: abkd's p^a / q^a terms overflow that on logits spread by 3.
    s, t, target = make_inputs((4, v), dtype, device, seed=5, ignored=1, scale=3.0 if dtype == torch.bfloat16 else 1.5)
    kernel = _errors(method, hp, s, t, target, fused)
    eager = _errors(method, hp, s, t, target, "reference")
    for what, k, e in zip(("loss", "gradient"), kernel, eager):
        assert k <= TOLERANCE[dtype], f"{what}: error {k:.3e} above {TOLERANCE[dtype]}"
        # Both are at the rounding of the stored gradient (2^-9 relative for bf16); allow one rounding step.
        assert k <= e + 2.0**-8, f"{what}: kernel error {k:.3e} worse than the eager reference's {e:.3e}"


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
    ids=lambda d: str(d).replace("torch.", ""),
)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_mixed_and_half_dtypes(fused, device, case, dtypes):
    method, hp = case
    s, t, target = make_inputs((5, 300), dtypes[0], device, seed=6, teacher_dtype=dtypes[1])
    check_against_oracle(method, hp, s, t, target, fused, "sum", 1.3, tol_dtype=torch.bfloat16)


@pytest.mark.parametrize("v", [50, 9000])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_extreme_logits(fused, device, case, v):
    """Logits offset by +-1000 (float32 exp overflows without max-shifts, and x - lse loses digits without them)
    with a wide spread: within 2e-5 of float64 truth, or no worse than twice the float32 eager reference's error
    where the exact gradient is a cancellation (r_j - q_j sum r with q_j near 1) below float32's resolution."""
    method, hp = case
    s, t, target = make_inputs((3, v), torch.float32, device, seed=7, scale=12.0)
    s, t = s + 1000.0, t - 1000.0
    kernel = _errors(method, hp, s, t, target, fused, temperature=2.0)
    eager = _errors(method, hp, s, t, target, "reference", temperature=2.0)
    for what, k, e in zip(("loss", "gradient"), kernel, eager):
        assert k <= max(TOLERANCE[torch.float32], 2 * e), f"{what}: error {k:.3e} (float32 eager: {e:.3e})"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_strided_rows_and_3d(fused, device, case):
    """Rows of a wider tensor (row stride > V) and [B, S, V] input, streamed past one tile."""
    method, hp = case
    s, t, target = make_inputs((2, 3, 2 * 5000), torch.float32, device, seed=8)
    check_against_oracle(method, hp, s[..., 3:5003], t[..., 1:5001], target % 5000, fused, "batchmean", 0.9)


@pytest.mark.parametrize("v", [40, 6000])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_masked_classes_streamed(fused, device, case, v):
    """-inf classes (padded vocabulary) in both logits contribute nothing and get a zero gradient, any V."""
    method, hp = case
    s, t, target = make_inputs((3, v), torch.float32, device, seed=9)
    pad = torch.arange(v, device=device) >= v - v // 4
    s[:, pad] = -math.inf
    t[:, pad] = -math.inf
    target = torch.where(target == -100, target, target % (v - v // 4))
    check_against_oracle(method, hp, s, t, target, fused, "none", _grad_output("none", 3))
    _, grad = run_loss(method, s, t, target, hp, fused, "sum")
    assert torch.equal(grad[:, pad], torch.zeros_like(grad[:, pad]))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_only_writes_no_gradient(fused, device, case):
    method, hp = case
    s, t, target = make_inputs((4, 70), torch.float32, device, seed=10)
    with torch.no_grad():
        got = kdkernels.distill_loss(method, s, t, target, backend=fused, **hp)
    want = kdkernels.distill_loss(method, s, t, target, backend="reference", **hp)
    assert_close(got, want.detach().double().cpu().numpy(), torch.float32, "forward-only loss")


def test_gradient_accumulates_over_two_losses(fused, device):
    s, t, target = make_inputs((3, 20), torch.float32, device, seed=12)
    s.requires_grad_(True)
    (kdkernels.kd_loss(s, t, target, backend=fused) + 2 * kdkernels.dkd_loss(s, t, target, backend=fused)).backward()
    want = s.grad.clone()
    s.grad = None
    (
        kdkernels.kd_loss(s, t, target, backend="reference") + 2 * kdkernels.dkd_loss(s, t, target, backend="reference")
    ).backward()
    assert_close(want, s.grad.double().cpu().numpy(), torch.float32, "accumulated gradient")


@pytest.mark.parametrize("n,v", [(37, 100), (5, 2)])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_odd_row_counts_and_tiny_vocabulary(fused, device, case, n, v):
    """Several short rows per program with a partial last program, and the smallest vocabulary (V = 2, k = 1)."""
    method, hp = case
    if "k" in hp and hp["k"] >= v:
        hp = {**hp, "k": 1}
    s, t, target = make_inputs((n, v), torch.float32, device, seed=n + v, ignored=3)
    check_against_oracle(method, hp, s, t, target, fused, "none", _grad_output("none", n))


# V around a float32 vector's 8 and 16 lanes, and around 256 (csrc/cpu/divergence.cpp AKL_SHORT_LIST: akl's lists
# of at most 256 classes find their head's candidate by a select, longer ones by the radix select).
SHORT_ROWS = [1, 2, 7, 8, 9, 10, 15, 16, 17, 100, 256, 257]


@pytest.mark.parametrize("v", SHORT_ROWS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_short_rows(fused, device, case, v):
    """Short rows (11 of them, which the CPU kernels prefetch several rows ahead) against the oracle: ignored rows, a
    class masked in both logits, per-row grad_output, the cross-entropy term; a row masked whole in both logits gets
    loss 0 and gradient 0 and leaves the other rows as they were."""
    method, hp = case
    if "k" in hp and hp["k"] >= v:
        hp = {**hp, "k": 1}
    s, t, target = make_inputs((11, v), torch.float32, device, seed=v, ignored=2)
    if "k" in hp and v == 1:  # (a top-k needs k < V)
        with pytest.raises(ValueError, match="k must be smaller than the number of classes"):
            kdkernels.distill_loss(method, s, t, target, **hp)
        return
    if v == 1:  # one class: p = q, every loss and gradient is exactly 0 (the oracle's float64 rounding is not)
        loss, grad = run_loss(method, s, t, target, hp, fused, "none", _grad_output("none", 11))
        assert loss.abs().max() <= 1e-6 and grad.abs().max() <= 1e-6, (loss, grad)
        return
    if v > 2:  # class 0 masked in both models on every row (the labels elsewhere)
        s[:, 0] = t[:, 0] = -math.inf
        target = torch.where(target == -100, target, 1 + target % (v - 1))
    check_against_oracle(method, hp, s, t, target, fused, "none", _grad_output("none", 11))
    check_against_oracle(method, hp, s, t, target, fused, "batchmean", 0.7, ce_weight=0.3, temperature=2.0)
    loss, grad = run_loss(method, s, t, target, hp, fused, "none")
    s[5] = t[5] = -math.inf
    target[5] = 0
    masked_loss, masked_grad = run_loss(method, s, t, target, hp, fused, "none")
    assert masked_loss[5] == 0 and torch.equal(masked_grad[5], torch.zeros_like(masked_grad[5]))
    rest = torch.arange(11, device=device) != 5
    assert torch.equal(masked_loss[rest], loss[rest]) and torch.equal(masked_grad[rest], grad[rest])
