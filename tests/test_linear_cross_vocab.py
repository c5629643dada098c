"""The fused-linear losses between two vocabularies (kdkernels.linear_cross_vocab_loss): equal (value and the
gradients of the student's hidden states, weight and bias) to cross_vocab_loss of the reference on the float64
logits of both heads, whatever the chunks; bad input; a compiled step."""

import pytest
import torch
from conftest import cross_vocab_backends
from helpers import assert_close

import kdkernels
from kdkernels import linear
from kdkernels.cross_vocab import VocabMap

N = 13  # rows: chunks of 4 and 5 leave a short last chunk
# The backends of the chunk loop's tests; Triton's interpreter takes seconds a call: test_triton_chunks.
BACKENDS = [b for b in cross_vocab_backends() if b != "triton"]


def make_heads(vs, vt, dtype, seed=0):
    """Student and teacher heads (hidden [N, H], weight [V, H], bias [V]; the teacher's logits offset), a target
    with two ignored rows and a map of a third of the smaller vocabulary."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)

    student = {"hidden": rand(N, 6), "weight": rand(vs, 6, scale=1.5), "bias": rand(vs)}
    teacher = {"hidden": rand(N, 5), "weight": rand(vt, 5, scale=1.5), "bias": rand(vt, offset=30.0)}
    target = torch.randint(0, vs, (N,), generator=g)
    target[[2, 9]] = -100
    m = min(vs, vt) // 3
    pairs = VocabMap(torch.randperm(vs, generator=g)[:m], torch.randperm(vt, generator=g)[:m])
    return student, teacher, target, pairs


def logits(head, scale=1.0, cap=None):
    z = scale * (head["hidden"].double() @ head["weight"].double().t() + head["bias"].double())
    return z if cap is None else cap * torch.tanh(z / cap)


CASES = [
    dict(method="uld", vs=29, vt=47),
    dict(method="uld", vs=53, vt=31, temperature=2.0, teacher_temperature=0.7, ce_weight=0.4),
    dict(method="hybrid", vs=29, vt=47, beta=0.3),
    dict(method="hybrid", vs=53, vt=31, beta=1.0, matched_weight=0.7, unmatched_weight=0.2, softcap=4.0),
    dict(method="hybrid", vs=40, vt=40, beta=0.0, temperature=0.8, ce_weight=0.2, student_logit_scale=0.5),
]


def compare(case, dtype, backend, chunk_size=None, reduction="batchmean", grad_output=None, **extra):
    """linear_cross_vocab_loss against cross_vocab_loss (reference) on the float64 logits of both heads."""
    case = {**case, **extra}
    method, vs, vt = case.pop("method"), case.pop("vs"), case.pop("vt")
    cap, scale = case.pop("softcap", None), case.pop("student_logit_scale", 1.0)
    student, teacher, target, pairs = make_heads(vs, vt, dtype)
    options = dict(case, reduction=reduction, target=target, vocab_map=pairs if method == "hybrid" else None)
    params = [student[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    loss = kdkernels.linear_cross_vocab_loss(
        method, params[0], params[1], teacher["hidden"], teacher["weight"], student_bias=params[2],
        teacher_bias=teacher["bias"], chunk_size=chunk_size, softcap=cap, student_logit_scale=scale,
        backend=backend, **options,
    )  # fmt: skip
    go = torch.full_like(loss, 0.7) if grad_output is None else grad_output.to(loss.dtype)
    got = torch.autograd.grad(loss, params, go)
    ref = {k: student[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias")}
    want = kdkernels.cross_vocab_loss(method, logits(ref, scale, cap), logits(teacher), backend="reference", **options)
    want_grads = torch.autograd.grad(want, list(ref.values()), go.double())
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    # The chunks' logits are float32 whatever the heads' dtype (as linear_distill_loss's).
    assert_close(loss, want.detach().numpy(), torch.float32, f"{method} loss")
    for name, a, b, p in zip(("hidden", "weight", "bias"), got, want_grads, params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_close(a, b.numpy(), torch.float32, f"{method} gradient of the {name}")


@pytest.mark.parametrize("chunk_size", [1, 4, 5, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("chunk_backend", BACKENDS)
def test_against_materialised_logits(case, dtype, chunk_size, chunk_backend):
    compare(case, dtype, chunk_backend, chunk_size)


# Triton's kernel is cross_vocab_loss's (tests/test_cross_vocab.py), the chunk loop the one above: one case of each
# method.
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["uld", "hybrid"])
@pytest.mark.parametrize("chunk_backend", [b for b in cross_vocab_backends() if b == "triton"])
def test_triton_chunks(case, chunk_backend):
    compare(case, torch.float32, chunk_backend, 5)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["uld", "hybrid"])
@pytest.mark.parametrize("chunk_backend", BACKENDS)
def test_reductions_grad_output_and_mask(case, reduction, chunk_backend):
    """grad_output != 1 (per row for "none"), and a mask that leaves out rows besides the ignored targets."""
    go = torch.linspace(-1.0, 2.0, N) if reduction == "none" else torch.tensor(2.5)
    mask = torch.ones(N, dtype=torch.bool)
    mask[[0, 5]] = False
    compare(case, torch.float32, chunk_backend, 4, reduction, go, mask=mask)
    if reduction == "sum":  # batchmean's denominator is the whole batch's, not a chunk's
        compare(case, torch.float32, chunk_backend, 4, "batchmean", go, normalizer=3.0)


def test_chunks_follow_the_budget(monkeypatch):
    """memory_budget sizes the chunks by cross_vocab_row_bytes (a fused op: the whole budget to the chunk; the
    reference: a quarter), in equal chunks."""
    seen = []
    chunk = linear._CrossVocabHeads.chunk
    monkeypatch.setattr(
        linear._CrossVocabHeads,
        "chunk",
        lambda self, start, stop, *a: seen.append(stop - start) or chunk(self, start, stop, *a),
    )
    student, teacher, target, _ = make_heads(29, 47, torch.float32)
    args = (student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], target)
    per_row = linear.cross_vocab_row_bytes(29, 47, torch.float32, False)
    for backend, budget, want in (("cpu", 7 * per_row, [7, 6]), ("reference", 4 * 7 * per_row, [7, 6])):
        seen.clear()
        kdkernels.linear_cross_vocab_loss("uld", *args, memory_budget=budget, backend=backend)
        assert seen == want, backend


IDS = torch.arange(4)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(teacher_hidden=torch.randn(5, 5, requires_grad=True)), ValueError, "takes the teacher as a constant"),
        (dict(teacher_hidden=torch.randn(4, 5)), ValueError, "teacher_hidden must have the student's leading shape"),
        (dict(student_weight=torch.randn(20, 7)), ValueError, r"student_weight must have shape \[\?, 6\]"),
        (dict(teacher_bias=torch.randn(30)), ValueError, r"teacher_bias must have shape \[31\]"),
        (dict(student_hidden=torch.randn(5, 6).long()), TypeError, "student_hidden must have a floating-point"),
        (dict(method="hybrid"), ValueError, "hybrid needs vocab_map"),
        (dict(vocab_map=(IDS, IDS)), ValueError, "vocab_map is for method='hybrid'"),
        (dict(method="hybrid", vocab_map=(IDS, IDS + 40)), ValueError, "teacher id 43 is outside"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive integer"),
        (dict(memory_budget=1.5), ValueError, "memory_budget must be a positive integer"),
        (dict(softcap=-1.0), ValueError, "softcap must be a positive number"),
        (dict(temperature=torch.tensor(2.0)), TypeError, "temperature must be a number"),
        (dict(teacher_temperature=-1.0), ValueError, "teacher_temperature must be a finite number > 0"),
        (dict(ce_weight=1.0, target=None), ValueError, "needs target"),
        (dict(target=torch.full((5,), 20)), IndexError, r"class indices in \[0, 20\)"),
        (dict(method="kd"), ValueError, r"method must be one of \['hybrid', 'uld'\]"),
        (dict(backend="nope"), ValueError, "backend must be 'auto' or one of"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    call = dict(
        method="uld",
        student_hidden=torch.randn(5, 6),
        student_weight=torch.randn(20, 6),
        teacher_hidden=torch.randn(5, 5),
        teacher_weight=torch.randn(31, 5),
        target=torch.tensor([1, 2, -100, 3, 4]),
        ce_weight=0.5,
    )
    call.update(change)
    with pytest.raises(error, match=match):
        kdkernels.linear_cross_vocab_loss(
            call.pop("method"), call.pop("student_hidden"), call.pop("student_weight"), call.pop("teacher_hidden"),
            call.pop("teacher_weight"), **call,
        )  # fmt: skip


@pytest.mark.parametrize("compiled_backend", [b for b in cross_vocab_backends() if b == "cpu"])
def test_compiled_step_matches_eager(compiled_backend):
    """A training step through linear_cross_vocab_loss (hybrid, chunks that do not divide the rows, a softcap)
    compiles with fullgraph=True and matches eager: the loss and the student head's gradients."""
    torch._dynamo.reset()
    student, teacher, target, pairs = make_heads(29, 47, torch.float32, seed=3)

    def step(hidden, weight, bias):
        return kdkernels.linear_cross_vocab_loss(
            "hybrid", hidden, weight, teacher["hidden"], teacher["weight"], target, student_bias=bias,
            teacher_bias=teacher["bias"], vocab_map=pairs, beta=0.4, chunk_size=5, softcap=6.0, ce_weight=0.3,
            backend=compiled_backend,
        )  # fmt: skip

    results = []
    # (aot_eager: dynamo's trace and AOTAutograd's fake tensors are what the op's registrations serve; inductor's
    # code generation of the unrolled chunks would add a minute)
    for f in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        params = [student[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
        loss = f(*params)
        (loss * 1.7).backward()
        results.append((loss.detach(), *(p.grad for p in params)))
    for got, want, what in zip(*results, ("loss", "hidden's gradient", "weight's gradient", "bias's gradient")):
        assert_close(got, want.double().numpy(), torch.float32, f"compiled {what}")
