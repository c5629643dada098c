"""Public API: names, modules, clear errors on bad input, and the edge cases of docs/losses.md on every backend."""

import dataclasses
import inspect
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from cases import CASES, case_id
from helpers import assert_close, make_inputs, run_loss

import kdkernels
from kdkernels.arguments import OPTIONS, LossOptions, resolve

ROOT = pathlib.Path(__file__).resolve().parent.parent

FUNCTIONS = [spec.function for spec in kdkernels.METHODS.values()] + [
    "cakd_feature_loss",
    "distill_loss",
    "linear_distill_loss",
    "cross_vocab_loss",
    "linear_cross_vocab_loss",
]
MODULES = [spec.module for spec in kdkernels.METHODS.values()] + ["DistillLoss", "LinearDistillLoss", "SerialHead"]


@pytest.mark.parametrize("name", FUNCTIONS + MODULES)
def test_public_names(name):
    assert hasattr(kdkernels, name) and name in kdkernels.__all__


@pytest.mark.parametrize("method", sorted(kdkernels.METHODS))
def test_function_signature_shows_defaults(method):
    spec = kdkernels.METHODS[method]
    params = inspect.signature(getattr(kdkernels, f"{method}_loss")).parameters
    assert list(params)[:3] == ["student_logits", "teacher_logits", "target"]
    assert params["temperature"].default == spec.temperature and params["t2_scale"].default == spec.t2_scale
    for name, default in spec.hyperparameters.items():
        assert params[name].default == default and params[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_per_method_definitions_are_current():
    """functional.py, parallel.py and modules.py hold what scripts/method_api.py writes from the method table."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "method_api.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_resolve_tells_options_from_hyperparameters():
    settings = resolve("jsd", beta=0.25, temperature=2.0, ce_weight=0.5)
    assert settings.hp == {"beta": 0.25} and settings.temperature == 2.0 and settings.ce_weight == 0.5
    assert {f.name for f in dataclasses.fields(LossOptions)} == set(OPTIONS)
    with pytest.raises(TypeError, match="unexpected hyperparameter"):
        resolve("jsd", temprature=2.0)
    with pytest.raises(TypeError):  # the definitions are keyword-only
        kdkernels.METHODS["kd"].__class__("kd", "KDLoss", "", {}, {}, 1.0, False, None)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_module_equals_function(case, device):
    method, hp = case
    s, t, target = make_inputs((4, 19), torch.float64, device, seed=11)
    module = kdkernels.DistillLoss(method, reduction="sum", temperature=3.0, **hp)
    want = kdkernels.distill_loss(method, s, t, target, reduction="sum", temperature=3.0, **hp)
    torch.testing.assert_close(module(s, t, target), want, rtol=0, atol=0)
    cls = getattr(kdkernels, kdkernels.METHODS[method].module)
    torch.testing.assert_close(cls(reduction="sum", temperature=3.0, **hp)(s, t, target), want, rtol=0, atol=0)


def test_serial_head_starts_as_identity():
    head = kdkernels.SerialHead(10)
    x = torch.randn(3, 10)
    torch.testing.assert_close(head(x), x)
    assert sum(p.numel() for p in head.parameters()) == 110
    with pytest.raises(ValueError, match="num_classes"):
        kdkernels.SerialHead(0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: the error names the argument.
# ---------------------------------------------------------------------------------------------------------------


def _call(backend, method="kd", s=None, t=None, target=None, **kwargs):
    s0, t0, y0 = make_inputs((4, 10), torch.float32, seed=12, ignored=0)
    return kdkernels.distill_loss(
        method,
        s0 if s is None else s,
        t0 if t is None else t,
        y0 if target == "default" else target,
        backend=backend,
        **kwargs,
    )


BAD = [
    ("shape", dict(t=torch.randn(4, 11)), ValueError, "same shape"),
    ("shape-3d", dict(t=torch.randn(2, 2, 10)), ValueError, "same shape"),
    ("int logits", dict(s=torch.zeros(4, 10, dtype=torch.long)), TypeError, "student_logits.*floating"),
    ("int teacher", dict(t=torch.zeros(4, 10, dtype=torch.int32)), TypeError, "teacher_logits.*floating"),
    ("not a tensor", dict(s=[[1.0] * 10] * 4), TypeError, "student_logits"),
    ("0-d", dict(s=torch.tensor(1.0), t=torch.tensor(1.0)), ValueError, "student_logits"),
    ("missing target", dict(method="dkd"), ValueError, "needs target"),
    ("missing target aekt", dict(method="aekt"), ValueError, "needs target"),
    ("missing target cakd", dict(method="cakd"), ValueError, "needs target"),
    ("target shape", dict(method="dkd", target=torch.zeros(5, dtype=torch.long)), ValueError, "target.*shape"),
    ("float target", dict(method="dkd", target=torch.zeros(4)), TypeError, "target.*integer"),
    ("target too big", dict(method="dkd", target=torch.tensor([0, 1, 10, 2])), IndexError, r"target.*\[0, 10\)"),
    ("target negative", dict(method="aekt", target=torch.tensor([0, -1, 1, 2])), IndexError, "target"),
    (
        "target other ignore",
        dict(method="cakd", target=torch.tensor([0, -100, 1, 2]), ignore_index=-1),
        IndexError,
        "ignore_index=-1",
    ),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature negative", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature nan", dict(temperature=math.nan), TypeError, "temperature"),
    ("k too small", dict(method="gdkd", k=0), ValueError, "k must"),
    ("k = V", dict(method="gdkd", k=10), ValueError, "k must be smaller"),
    ("k > V cakd", dict(method="cakd", strong="topk", k=11), ValueError, "k must be smaller"),
    ("k not int", dict(method="gdkd", k=2.5), ValueError, "k must"),
    ("partitions", dict(method="gdkd", partitions=4), ValueError, "partitions"),
    ("strategy", dict(method="gdkd", strategy="top"), ValueError, "strategy must be one of"),
    ("kl_type", dict(method="gdkd", kl_type="js"), ValueError, "kl_type must be one of"),
    ("worst with 3 partitions", dict(method="gdkd", strategy="worst", partitions=3), ValueError, "needs partitions=2"),
    ("jsd beta", dict(method="jsd", beta=1.5), ValueError, "beta"),
    ("jsd beta neg", dict(method="jsd", beta=-0.1), ValueError, "beta"),
    ("skew 0", dict(method="skew_fkl", skew=0.0), ValueError, "skew"),
    ("skew 1", dict(method="skew_rkl", skew=1.0), ValueError, "skew"),
    ("tau 0", dict(method="cakd", strong="threshold", tau=0.0), ValueError, "tau"),
    ("tau > 1", dict(method="cakd", strong="threshold", tau=1.5), ValueError, "tau"),
    ("strong", dict(method="cakd", strong="labels"), ValueError, "strong"),
    ("abkd nan", dict(method="abkd", alpha=math.nan), ValueError, "alpha"),
    ("max_weight", dict(method="aekt", max_weight=0.0, target="default"), ValueError, "max_weight"),
    ("reduction", dict(reduction="mean"), ValueError, "reduction"),
    ("method", dict(method="kl"), ValueError, "method"),
    ("backend", dict(backend_override="fastest"), ValueError, "backend"),
    ("unknown hyperparameter", dict(method="kd", beta=0.5), TypeError, "unexpected hyperparameter"),
    ("normalizer with sum", dict(reduction="sum", normalizer=3.0), ValueError, "normalizer"),
    ("normalizer shape", dict(normalizer=torch.ones(2)), ValueError, "normalizer"),
    ("normalizer zero", dict(normalizer=0), ValueError, "normalizer"),
    ("float mask", dict(mask=torch.ones(4)), TypeError, "mask must be a bool or integer"),
    ("mask shape", dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask must have .* shape"),
    ("mask not a tensor", dict(mask=[1, 1, 1, 1]), TypeError, "mask"),
    ("float8 logits", dict(s=torch.zeros(4, 10).to(torch.float8_e4m3fn)), TypeError, "student_logits.*float8_e4m3fn"),
    ("float8 teacher", dict(t=torch.zeros(4, 10).to(torch.float8_e5m2)), TypeError, "teacher_logits.*float8_e5m2"),
    ("meta temperature", dict(temperature=torch.tensor(2.0, device="meta")), ValueError, "temperature.*meta"),
    *[
        (f"negative {method} {name}", dict(method=method, target="default", **{name: -0.5}), ValueError, f"{name} must")
        for method, names in (
            ("dkd", ("alpha", "beta")),
            ("gdkd", ("w0", "w1", "w2")),
            ("cakd", ("alpha", "beta", "bcd_weight")),
            ("aekt", ("beta",)),
        )
        for name in names
    ],
]


@pytest.mark.parametrize("name,kwargs,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, kwargs, error, match):
    kwargs = dict(kwargs)
    chosen = kwargs.pop("backend_override", backend)
    with pytest.raises(error, match=match):
        _call(chosen, **kwargs)


def test_cakd_feature_bad_input():
    with pytest.raises(ValueError, match="student_feat"):
        kdkernels.cakd_feature_loss(torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="strong"):
        kdkernels.cakd_feature_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), strong="target")


RANGE = r"temperature must be in the supported range \[0.0001, 10000\]"


@pytest.mark.parametrize("value", [1e-20, 9e-5, 1.01e4, 1e20])
def test_temperature_outside_the_supported_range_is_refused(backend, value):
    """Outside kdkernels.TEMPERATURE_RANGE (T^2 overflows float32 at 1e20, the CPU kernels gave NaN at 1e-20) a
    temperature is refused, naming the range: a number, a tensor (a learnable one too), the modules, the fused-linear
    loss and SparseTeacher.from_logits."""
    s, t, target = make_inputs((4, 10), torch.float32, seed=14, ignored=0)
    for temperature in (value, torch.tensor(value, dtype=torch.float64), torch.tensor(value, requires_grad=True)):
        with pytest.raises(ValueError, match=RANGE):
            kdkernels.distill_loss("dkd", s, t, target, temperature=temperature, backend=backend)
    with pytest.raises(ValueError, match=RANGE):
        kdkernels.DistillLoss("jsd", temperature=value, backend=backend)
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=RANGE):
        kdkernels.linear_distill_loss("kd", h, w, h, w, temperature=value, backend=backend)
    with pytest.raises(ValueError, match=RANGE):
        kdkernels.SparseTeacher.from_logits(t, 3, temperature=value)


@pytest.mark.parametrize("temperature", kdkernels.TEMPERATURE_RANGE)
def test_the_ends_of_the_temperature_range_are_finite(backend, temperature):
    """At both ends of the range every method gives a finite loss and gradient on every backend, as the float64
    reference does, for logits of scale 4 with an offset of 30 (the inputs that gave NaN on the CPU at 1e-8); both
    ends are taken as they are and as float32 tensors (1e-4 rounds below 1e-4 in float32). The exception: abkd with
    beta < 0 at 1e-4, where the student's probabilities underflow and q^beta is infinite (in float64 too)."""
    s, t, target = make_inputs((5, 23), torch.float32, seed=15, scale=4.0)
    s = s + 30
    for method, hp in CASES:
        want = kdkernels.distill_loss(method, s.double(), t.double(), target, temperature=temperature, **hp)
        if method == "abkd" and hp["beta"] < 0 and temperature < 1:
            assert torch.isinf(want)
            continue
        assert torch.isfinite(want), (method, hp)
        for T in (temperature, torch.tensor(temperature, requires_grad=True)):
            x = s.clone().requires_grad_(True)
            loss = kdkernels.distill_loss(method, x, t, target, temperature=T, backend=backend, **hp)
            (loss * 0.7).backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), (method, hp, T)
            if isinstance(T, torch.Tensor):
                assert torch.isfinite(T.grad), (method, hp)


def test_numpy_scalars_are_the_numbers_they_are(backend):
    """NumPy scalars are taken as the Python numbers they equal: temperature, weights, k, hyperparameters,
    ignore_index and the fused-linear options."""
    s, t, target = make_inputs((4, 10), torch.float32, seed=16, ignored=1)
    numpy_options = dict(temperature=np.float32(2.0), ce_weight=np.float64(0.5), distill_weight=np.float32(1.5))
    numpy_options["ignore_index"] = np.int64(-100)
    python_options = dict(temperature=2.0, ce_weight=0.5, distill_weight=1.5, ignore_index=-100)
    for method, hp in (("gdkd", dict(k=np.int64(3), w2=np.float32(6.0))), ("jsd", dict(beta=np.float64(0.25)))):
        got = kdkernels.distill_loss(method, s, t, target, backend=backend, **hp, **numpy_options)
        plain = {name: value.item() for name, value in hp.items()}
        want = kdkernels.distill_loss(method, s, t, target, backend=backend, **plain, **python_options)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        module = kdkernels.DistillLoss(method, backend=backend, **hp, **numpy_options)
        assert all(type(v) in (int, float) for v in module.hyperparameters.values() if not isinstance(v, str))
        torch.testing.assert_close(module(s, t, target), want, rtol=0, atol=0)
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    got = kdkernels.linear_distill_loss(
        "kd", h, w, h, w, target, softcap=np.float32(5.0), chunk_size=np.int64(2), backend=backend, **numpy_options
    )
    want = kdkernels.linear_distill_loss(
        "kd", h, w, h, w, target, softcap=5.0, chunk_size=2, backend=backend, **python_options
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_module_checks_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        kdkernels.KDLoss(temperature=-1.0)
    with pytest.raises(TypeError, match="unexpected hyperparameter"):
        kdkernels.KDLoss(alpha=1.0)
    with pytest.raises(ValueError, match="beta"):
        kdkernels.JSDLoss(beta=2.0)


# ---------------------------------------------------------------------------------------------------------------
# Edge cases.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nan_propagates(backend, device, case):
    method, hp = case
    s, t, target = make_inputs((3, 17), torch.float32, device, seed=13, ignored=0)
    s[1, 4] = math.nan
    loss = kdkernels.distill_loss(method, s, t, target, backend=backend, reduction="none", **hp)
    assert torch.isnan(loss[1]) and not torch.isnan(loss[[0, 2]]).any()
    t[0, 2] = math.nan
    assert torch.isnan(kdkernels.distill_loss(method, s, t, target, backend=backend, **hp))


@pytest.mark.parametrize("v", [17, 97], ids=["short-row", "long-row"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nan_gradient_survives_bf16(backend, device, case, v):
    """A bf16 gradient is NaN wherever the float32 gradient of the same (widened) inputs is: the bf16 store keeps
    every NaN a NaN, whatever its low bits (the CPU kernels' rounding once carried some into 0 or inf)."""
    method, hp = case
    s, t, target = make_inputs((4, v), torch.bfloat16, device, seed=15, ignored=0)
    s[1, 4], t[2, 3] = math.nan, math.nan
    s[3], t[3] = -math.inf, -math.inf
    s[3, 2] = math.nan  # the only logit that is not -inf
    _, grad = run_loss(method, s, t, target, hp, backend, reduction="none")
    _, grad32 = run_loss(method, s.float(), t.float(), target, hp, backend, reduction="none")
    assert grad.dtype == torch.bfloat16 and torch.isnan(grad32).any()
    assert torch.equal(torch.isnan(grad), torch.isnan(grad32)), (torch.isnan(grad).int(), torch.isnan(grad32).int())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ignored_rows(backend, device, case):
    """All rows ignored: loss 0 and gradient 0, even with NaN in the ignored rows."""
    method, hp = case
    s, t, _ = make_inputs((3, 17), torch.float32, device, seed=14)
    s[0, 0] = math.nan
    target = torch.full((3,), -7, device=device)
    for reduction in ("batchmean", "sum", "none"):
        loss, grad = run_loss(method, s, t, target, hp, backend, reduction, ignore_index=-7)
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_row_mask_is_ignore_index(backend, device, case):
    """mask=0 leaves a row out exactly as target=ignore_index does: loss, gradient, batchmean denominator and the
    cross-entropy term; NaN in a masked row stays out. Without a target, rows are kept by the mask alone."""
    method, hp = case
    s, t, target = make_inputs((2, 3, 17), torch.float32, device, seed=15)
    s[0, 1, 3] = math.nan
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], device=device)
    kept = mask.bool()
    go = torch.linspace(-1.0, 2.0, 6, device=device).reshape(2, 3)
    for reduction, grad_output in (("batchmean", 1.3), ("sum", 0.7), ("none", go)):
        ce = 0.0 if reduction == "sum" else 0.4
        options = dict(ce_weight=ce, distill_weight=0.8)
        loss, grad = run_loss(method, s, t, target, hp, backend, reduction, grad_output, mask=mask, **options)
        want, want_grad = run_loss(
            method, s, t, torch.where(kept, target, -100), hp, backend, reduction, grad_output, **options
        )
        assert torch.equal(loss, want) and torch.equal(grad, want_grad), reduction
        assert not grad[~kept].any() and torch.isfinite(loss).all()
    spec = kdkernels.METHODS[method]
    if not spec.plan(spec.resolve(hp)).needs_target:
        loss, grad = run_loss(method, s, t, None, hp, backend, "none", go, mask=mask.bool())
        want, want_grad = run_loss(method, s, t, torch.where(kept, 0, -100), hp, backend, "none", go)
        assert torch.equal(loss, want) and torch.equal(grad, want_grad)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_empty_batch(backend, device, case):
    method, hp = case
    s, t, target = make_inputs((0, 17), torch.float32, device, ignored=0)
    for reduction in ("batchmean", "sum", "none"):
        loss, grad = run_loss(method, s, t, target, hp, backend, reduction)
        assert loss.shape == ((0,) if reduction == "none" else ()) and grad.shape == s.shape
        assert torch.all(loss == 0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_masked_classes_contribute_nothing(backend, device, case):
    """-inf in both logits (a padded vocabulary) is the same as removing the class; its gradient is exactly 0."""
    method, hp = case
    s, t, target = make_inputs(
        (4, 23), torch.float64 if backend == "reference" else torch.float32, device, seed=15, ignored=1
    )
    masked = torch.tensor([1, 5, 6, 22], device=device)
    keep = torch.tensor([i for i in range(23) if i not in masked.tolist()], device=device)
    target = torch.where(target == -100, target, keep[torch.arange(4, device=device) % keep.numel()])
    s_masked, t_masked = s.clone(), t.clone()
    s_masked[:, masked] = -math.inf
    t_masked[:, masked] = -math.inf
    loss, grad = run_loss(method, s_masked, t_masked, target, hp, backend, "none")
    compact = torch.where(target == -100, target, torch.searchsorted(keep, target))
    want, want_grad = run_loss(method, s[:, keep], t[:, keep], compact, hp, backend, "none")
    assert_close(loss, want.detach().double().cpu().numpy(), s.dtype, "loss")
    assert torch.equal(grad[:, masked], torch.zeros_like(grad[:, masked]))
    assert_close(grad[:, keep], want_grad.double().cpu().numpy(), s.dtype, "gradient")


def test_tvd_ties_give_zero_gradient(backend, device):
    """Self-distillation: identical rows give p == q exactly, so sign(0) = 0 and the gradient is exactly 0."""
    s, _, _ = make_inputs((3, 31), torch.float32, device, seed=16)
    loss, grad = run_loss("tvd", s, s.clone(), None, {}, backend, "none")
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


def test_teacher_gets_a_gradient_only_when_it_requires_one(backend, device):
    """A teacher that requires grad gets d loss / d teacher (tests/test_full_gradient.py checks its values); a
    detached one gets none and the student's gradient is the same."""
    s, t, target = make_inputs((3, 12), torch.float32, device, seed=17)
    grads = []
    for teacher_grad in (False, True):
        tt = t.clone().requires_grad_(teacher_grad)
        ss = s.clone().requires_grad_(True)
        kdkernels.dkd_loss(ss, tt, target, backend=backend).backward()
        assert (tt.grad is not None) == teacher_grad and ss.grad is not None
        grads.append(ss.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_cakd_feature_loss_is_rows_of_positions(backend, device):
    g = torch.Generator().manual_seed(18)
    fs, ft = torch.randn(2, 3, 4, 5, generator=g).to(device), torch.randn(2, 3, 4, 5, generator=g).to(device)
    got = kdkernels.cakd_feature_loss(fs, ft, strong="threshold", tau=0.4, reduction="none", backend=backend)
    want = kdkernels.cakd_loss(
        fs.reshape(2, 3, 20), ft.reshape(2, 3, 20), strong="threshold", tau=0.4, reduction="none", backend=backend
    )
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
