"""The custom ops behind the fused backends: registration, torch.library.opcheck, torch.compile without graph
breaks, and the in-place gradient scaling of backward."""

import pytest
import torch

import kdkernels
from cases import CASES, case_id
from helpers import assert_close, make_inputs
from kdkernels.kernel_params import decoupled_params, divergence_params

FAMILY_OPS = {"triton": ("divergence_triton", "decoupled_triton"), "cpu": ("divergence", "decoupled"),
              "cuda": ("divergence", "decoupled")}


def test_ops_are_registered(fused):
    for name in FAMILY_OPS[fused] + ("scale_rows_",):
        assert hasattr(torch.ops.kdkernels, name), name


@pytest.mark.parametrize("reduce,with_grad,has_target", [(True, True, True), (False, True, False),
                                                          (True, False, True)])
@pytest.mark.parametrize("case", [CASES[4], CASES[11], CASES[20], CASES[22], CASES[25]], ids=case_id)
def test_opcheck(fused, device, case, reduce, with_grad, has_target):
    method, hp = case
    family = kdkernels.METHODS[method].family
    op = getattr(torch.ops.kdkernels, FAMILY_OPS[fused][family == "decoupled"]).default
    code, params = (divergence_params if family == "divergence" else decoupled_params)(
        method, kdkernels.METHODS[method].resolve(hp))
    s, t, target = make_inputs((5, 33), torch.float32, device, seed=20)
    if method == "dkd":
        has_target = True
    s.requires_grad_(with_grad)
    args = (s, t, target if has_target else None, torch.tensor(3.0, device=device) if reduce else None, code,
            params, 2.0, True, -100, reduce, with_grad)
    torch.library.opcheck(op, args)


def test_scale_rows_skips_ones_and_scales_the_rest(device):
    g = torch.randn(4, 300, device=device).bfloat16()
    want = g.float() * torch.tensor([1.0, 2.5, 1.0, -3.0], device=device)[:, None]
    torch.ops.kdkernels.scale_rows_(g, torch.tensor([1.0, 2.5, 1.0, -3.0], device=device))
    assert_close(g, want.double().cpu().numpy(), torch.bfloat16, "per-row scaling")
    before = g.clone()
    torch.ops.kdkernels.scale_rows_(g, torch.tensor(1.0, device=device))
    assert torch.equal(g, before)


def test_triton_scale_kernel_rounds_bfloat16_to_nearest(device):
    """The Triton kernel of scale_rows_ (the CUDA implementation), run here through the interpreter if need be."""
    if "triton" not in kdkernels.available_backends(device):
        pytest.skip("Triton cannot run on this device here")
    from kdkernels.triton.common import scale_rows_

    g = torch.randn(3, 5000, device=device).bfloat16()
    f = torch.tensor([0.3, 1.0, 7.0], device=device)
    want = (g.float() * f[:, None]).bfloat16()
    scale_rows_(g, f)
    assert torch.equal(g, want)
    scale_rows_(g, torch.tensor(1.0 + 2**-20, device=device))
    assert torch.equal(g, (want.float() * (1.0 + 2**-20)).bfloat16())


def test_backward_twice_is_an_error(fused, device):
    s, t, target = make_inputs((3, 20), torch.float32, device, seed=11)
    s.requires_grad_(True)
    loss = kdkernels.kd_loss(s, t, target, backend=fused)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_compile_fullgraph_training_step(fused, device):
    """A training step calling losses of both families compiles with fullgraph=True (no graph break) and matches
    eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(21)
    head = torch.nn.Linear(16, 40).to(device)
    x = torch.randn(6, 16, generator=g).to(device)
    teacher = torch.randn(6, 40, generator=g).to(device)
    target = torch.tensor([1, -100, 3, 39, 0, 7], device=device)

    def step(x, teacher, target):
        s = head(x)
        return (kdkernels.dkd_loss(s, teacher, target, backend=fused)
                + kdkernels.jsd_loss(s, teacher, target, beta=0.3, backend=fused, reduction="none").sum())

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, teacher, target)
    loss.backward()
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    eager = step(x, teacher, target)
    eager.backward()
    assert_close(loss, eager.detach().double().cpu().numpy(), torch.float32, "compiled loss")
    for got, p in zip(grads, head.parameters()):
        assert_close(got, p.grad.double().cpu().numpy(), torch.float32, "compiled gradient")
