"""The custom ops behind the fused backends: registration, torch.library.opcheck, torch.compile without graph
breaks, and the in-place gradient scaling of backward."""

import inspect
import re

import pytest
import torch
from cases import CASES, case_id
from helpers import assert_close, family_ops, kernel_call, make_inputs

import kdkernels
from kdkernels.backends import ops


def test_ops_are_registered_with_their_backend(fused):
    """Every fused backend's ops are kdkernels::<family>_<backend> and its in-place sibling, registered with it."""
    backend = kdkernels.backends.select_backend(fused, torch.empty(0))
    for family, (op, inplace) in family_ops(fused).items():
        assert backend.ops[family] is op and backend.inplace[family] is inplace


def test_ops_share_one_schema(fused):
    """The Triton ops (defined in Python) and the extension's (defined in C++) have the schema of ops.py."""
    for op, inplace in family_ops(fused).values():
        for got, want in ((op, ops.SCHEMA), (inplace, ops.INPLACE_SCHEMA)):
            schema = re.sub(r"^kdkernels::\w+", "", str(got._schema))
            assert re.sub(r"Tensor\(a\d*!\)", "Tensor(a!)", schema) == want


OPCHECK_CASES = [
    c
    for c in CASES
    if case_id(c)
    in (
        "jsd-beta=0.5",
        "abkd-alpha=0.5-beta=0.5",
        "bdkd",
        "dkd",
        "gdkd-k=4-w0=0.5-w1=2.0-w2=6.0-partitions=3",
        "cakd-strong=threshold-tau=0.3",
    )
]


@pytest.mark.parametrize(
    "reduce,with_grad,has_target,with_ce,standardize",
    [
        (True, True, True, False, False),
        (False, True, False, False, True),
        (True, False, True, True, True),
        (False, True, True, True, False),
    ],
)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=case_id)
def test_opcheck(fused, device, case, reduce, with_grad, has_target, with_ce, standardize):
    method, hp = case
    if method == "dkd":
        has_target = True
    s, t, target = make_inputs((5, 33), torch.float32, device, seed=20)
    family, call = kernel_call(
        method,
        hp,
        target=target if has_target else None,
        denominator=torch.tensor(3.0, device=device) if reduce else None,
        temperature=2.0,
        t2_scale=True,
        reduce=reduce,
        ce_weight=0.5 if with_ce else 0.0,
        distill_weight=1.5,
        with_ce=with_ce,
        standardize=standardize,
    )
    op = family_ops(fused)[family][0]
    s.requires_grad_(with_grad)
    args = (s, t, *call.op_args(), with_grad)
    torch.library.opcheck(op, args)
    # Its at-temperature op (torch.compile's way in with a temperature tensor): the op's name and T, a tensor.
    at_args = (f"{family}_{fused}", torch.tensor(2.0, dtype=torch.float64), *args)
    torch.library.opcheck(torch.ops.kdkernels.family_at_temperature.default, at_args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_scale_rows_multiplies_in_float32_and_skips_ones(backend, device, dtype):
    """Each backend's scale_rows (its backward): grad *= factor per row or for all rows, rounded once to the
    gradient's dtype (bf16: to nearest from the float32 product); a factor of exactly 1 changes nothing."""
    scale_rows = kdkernels.backends.select_backend(backend, torch.empty(0, device=device)).scale_rows
    g = torch.randn(4, 5000, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
    for factor in (torch.tensor([1.0, 0.3, 1.0, -7.0]), torch.tensor(0.7), torch.tensor(1.0 + 2**-20)):
        factor = factor.to(device)
        want = (g.float() * (factor[:, None] if factor.dim() else factor)).to(dtype)
        scale_rows(g, factor)
        assert torch.equal(g, want), factor
    before = g.clone()
    scale_rows(g, torch.tensor(1.0, device=device))
    assert torch.equal(g, before)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_backward_twice_is_an_error(fused, device, reduction):
    """A second backward through a fused loss (retain_graph=True) raises the project's message, also after a first
    backward that scaled the saved gradient in place (per-row grad_output, reduction="none"), where torch's own
    check of the saved tensor would otherwise speak first."""
    s, t, target = make_inputs((3, 20), torch.float32, device, seed=11)
    s.requires_grad_(True)
    loss = kdkernels.kd_loss(s, t, target, backend=fused, reduction=reduction)
    if reduction == "none":
        loss = (loss * torch.tensor([0.5, 2.0, 1.0], device=device)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="kdkernels: the fused loss's saved gradient was already used"):
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
        return (
            kdkernels.dkd_loss(s, teacher, target, backend=fused)
            + kdkernels.jsd_loss(s, teacher, target, beta=0.3, backend=fused, reduction="none").sum()
        )

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


@pytest.mark.parametrize("kind", ["float", "tensor", "learnable"])
def test_compile_once_with_a_changing_temperature(backend, device, kind):
    """A compiled training step (fullgraph=True: no graph break) whose temperature changes every call compiles once:
    a 0-d tensor (a scheduled one, or a learnable one that gets d loss / d T) never recompiles, a Python float once
    (dynamo specialises its first value, then makes it dynamic). Each call matches eager (loss, gradients)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    s0, t, target = make_inputs((6, 40), torch.float32, device, seed=22)

    def step(s, t, target, temperature):
        return (
            kdkernels.dkd_loss(s, t, target, temperature=temperature, backend=backend)
            + kdkernels.jsd_loss(s, t, target, temperature=temperature, backend=backend, reduction="none").sum()
        )

    # (the reference's graphs take inductor a minute to generate code for: AOTAutograd without it, for the reference)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "reference" else "inductor")
    for value in (2.0, 3.0, 0.7, 5.5):
        results = []
        for f in (compiled, step):
            s = s0.clone().requires_grad_(True)
            learns = kind == "learnable"
            temperature = value if kind == "float" else torch.tensor(value, device=device, requires_grad=learns)
            loss = f(s, t, target, temperature)
            loss.backward()
            results.append((loss.detach(), s.grad, temperature.grad if kind == "learnable" else None))
        (loss, grad, d_temperature), (want, want_grad, want_d_temperature) = results
        assert_close(loss, want.double().cpu().numpy(), torch.float32, f"loss at T = {value}")
        assert_close(grad, want_grad.double().cpu().numpy(), torch.float32, f"gradient at T = {value}")
        if kind == "learnable":  # (a sum of terms of the loss's size that cancel: an absolute tolerance from it)
            torch.testing.assert_close(d_temperature, want_d_temperature, rtol=1e-4, atol=1e-5 * float(want) / value)
    assert counters["stats"]["unique_graphs"] == (2 if kind == "float" else 1), dict(counters["stats"])


def test_compiled_temperature_outside_the_range_is_refused(fused, device):
    """Under torch.compile the temperature's value is checked when the graph runs (the opaque op
    kdkernels::check_temperature): a tensor outside the range raises the eager error."""
    torch._dynamo.reset()
    s, t, _ = make_inputs((4, 30), torch.float32, device, seed=23)
    compiled = torch.compile(lambda s, t, T: kdkernels.kd_loss(s, t, temperature=T, backend=fused), fullgraph=True)
    compiled(s, t, torch.tensor(2.0, device=device))
    with pytest.raises(ValueError, match="temperature must be in the supported range"):
        compiled(s, t, torch.tensor(1e-20, device=device))


def test_triton_launch_reads_every_option_of_the_kernel_call():
    """The Triton kernels read each option of KernelCall: the launcher passes the int and bool fields by name and
    the float fields as one tuple (KernelCall.scalars), which the kernels read at index constants of
    triton/common.py named after the fields (a new option that does not reach the kernels fails here; the C++ side
    is checked by tests/test_extension.py's comparison of the X-macro lists)."""
    from kdkernels.backends import triton as triton_backend
    from kdkernels.backends.kernel_call import FLAGS, SCALARS
    from kdkernels.backends.triton import common

    source = inspect.getsource(triton_backend._launch) + inspect.getsource(triton_backend._plan_arguments)
    assert "call.scalars()" in source
    assert [name for name in FLAGS if f"call.{name}" not in source] == []
    indices = {name: getattr(getattr(common, name.upper(), None), "value", None) for name in SCALARS}
    assert indices == {name: i for i, name in enumerate(SCALARS)}


@pytest.mark.parametrize("method", ["kd", "dkd", "abkd"])
def test_loss_call_gives_the_op_arguments_of_its_record(method):
    """Eager calls read the op's arguments off the loss call by the record's field names (kernel_call.op_args):
    they equal those of the KernelCall made field by field, so a loss call that names an option differently, or
    lacks one, fails here."""
    from kdkernels.arguments import resolve
    from kdkernels.backends.kernel_call import FLAGS, SCALARS, KernelCall, op_args

    options = dict(temperature=3.0, ce_weight=0.5, label_smoothing=0.1, distill_weight=2.0, ignore_index=7)
    call = resolve(method, **options, t2_scale=False, reduction="none", standardize=True, return_parts=True)
    call = call.bind(torch.tensor([1, 7, 2]), torch.Size([3]), 10, torch.device("cpu"))
    record = KernelCall(
        target=call.target,
        denominator=call.denominator,
        code=int(call.plan.code),
        params=tuple(map(float, call.plan.params)),
        **{name: getattr(call, name) for name in SCALARS + FLAGS},
    )
    assert record.reduce is False and record.with_ce is True and record.standardize is True
    assert op_args(call) == record.op_args()
