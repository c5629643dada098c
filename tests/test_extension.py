"""The compiled extension kdkernels._C beyond what every backend is tested on (test_losses, test_kernels, test_ops,
test_api): its in-place ops, each CPU capability's build, backend selection, and the message when it is missing."""

import inspect
import os
import subprocess
import sys

import pytest
import torch
from cases import CASES, case_id
from helpers import family_ops, kernel_call, make_inputs

import kdkernels
from kdkernels import backends
from kdkernels.backends.kernel_call import FLAGS, SCALARS, KernelCall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = tuple(float(x) for x in kdkernels.methods.DivergenceParams())  # a divergence plan's parameter list
pytestmark = pytest.mark.skipif(
    "cpu" not in kdkernels.available_backends("cpu"), reason="the C++ extension kdkernels._C is not built"
)


@pytest.mark.parametrize(
    "case", [c for c in CASES if case_id(c) in ("kd", "jsd-beta=0.5", "wsd-lam=1.0", "akl", "gdkd-k=3")], ids=case_id
)
def test_inplace_opcheck(case):
    method, hp = case
    s, t, target = make_inputs((4, 33), torch.float32, seed=31)
    for reduce, with_ce, standardize in ((True, False, False), (False, True, True)):
        family, call = kernel_call(
            method,
            hp,
            target=target,
            denominator=torch.tensor(2.0) if reduce else None,
            temperature=1.5,
            reduce=reduce,
            ce_weight=0.5,
            distill_weight=1.5,
            with_ce=with_ce,
            standardize=standardize,
        )
        torch.library.opcheck(family_ops("cpu")[family][1], (s.clone(), t, *call.op_args()))


@pytest.mark.parametrize("case", [c for c in CASES if case_id(c) in ("kd", "akl", "dkd")], ids=case_id)
def test_full_opcheck(case):
    """The full ops (teacher gradient, d loss / d T): schema, fake function and dispatch agree."""
    method, hp = case
    s, t, target = make_inputs((4, 33), torch.float32, seed=32)
    for reduce, with_ce, standardize, teacher_grad in ((True, False, False, True), (False, True, True, False)):
        family, call = kernel_call(
            method,
            hp,
            target=target,
            denominator=torch.tensor(2.0) if reduce else None,
            temperature=1.5,
            t2_scale=True,
            reduce=reduce,
            ce_weight=0.5,
            distill_weight=1.5,
            with_ce=with_ce,
            standardize=standardize,
        )
        op = getattr(torch.ops.kdkernels, f"{family}_cpu_full").default
        torch.library.opcheck(op, (s, t, *call.op_args(), teacher_grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("v", [16384, 16387])
@pytest.mark.parametrize("method", ["kd", "jsd", "dkd"])
def test_cpu_streamed_gradient_rows_equal_small_batches(method, v, dtype):
    """A gradient of 8 MB or more is written with streaming stores (whole vectors at aligned addresses: every one at
    V = 16384, none but the rows' aligned ones at V = 16387) while the next row is prefetched; a small batch is
    not. Both give the same bits, row for row. (bf16: 320 rows make the 8 MB; two bf16 inputs write the gradient
    converted a vector at a time, streamed too.)"""
    n = 320 if dtype == torch.bfloat16 else 160
    s, t, target = make_inputs((n, v), dtype, seed=v)
    weights = torch.rand(n, dtype=dtype) + 0.5

    def grads(rows):
        student = s[rows].clone().requires_grad_(True)
        loss = kdkernels.distill_loss(method, student, t[rows], target[rows], reduction="none", backend="cpu")
        (loss * weights[rows]).sum().backward()
        return loss.detach(), student.grad

    whole = grads(slice(None))
    parts = [grads(slice(i, i + 8)) for i in range(0, n, 8)]
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
    assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize(
    "method,dtype,full",
    [
        ("kd", torch.float32, False),
        ("kd", torch.bfloat16, False),
        ("dkd", torch.bfloat16, False),
        ("jsd", torch.float32, True),
    ],
)
def test_cpu_gradient_buffers_are_reused_and_fully_rewritten(method, dtype, full):
    """A freed CPU gradient of 1 MiB or more is kept (csrc/cpu/gradient_cache.h) and the next gradient of its size
    gets the same buffer, here poisoned with NaN first: every element is written again (ignored rows and rows masked
    in both logits included), giving the bits a fresh buffer gets. With full, the teacher's gradient too."""
    s, t, target = make_inputs((96, 6000), dtype, seed=77, ignored=3)
    s[7], t[7] = float("-inf"), float("-inf")
    family, call = kernel_call(
        method,
        {},
        target=target,
        denominator=torch.tensor(95.0),
        temperature=2.0,
        t2_scale=True,
        ce_weight=0.5,
        with_ce=True,
    )
    op = getattr(torch.ops.kdkernels, f"{family}_cpu" + ("_full" if full else "")).default

    def gradients():
        outputs = op(s, t, *call.op_args(), True)
        return list(outputs[2:4] if full else outputs[2:3])

    kdkernels.release_cached_gradients()
    fresh = gradients()
    expected = [g.clone() for g in fresh]
    pointers = {g.data_ptr() for g in fresh}
    assert kdkernels._C.cached_gradient_bytes() == 0  # (the gradients are alive)
    for g in fresh:
        g.fill_(float("nan"))
    del fresh, g
    assert kdkernels._C.cached_gradient_bytes() == len(pointers) * s.numel() * s.element_size()
    again = gradients()
    assert {g.data_ptr() for g in again} == pointers
    for want, got in zip(expected, again):
        assert torch.equal(got, want)


def test_release_cached_gradients_frees_what_is_kept():
    kdkernels.release_cached_gradients()
    student = torch.randn(64, 8192, requires_grad=True)  # a 2 MiB gradient
    kdkernels.distill_loss("kd", student, torch.randn(64, 8192), backend="cpu").backward()
    student.grad = None
    assert kdkernels._C.cached_gradient_bytes() == 64 * 8192 * 4
    assert kdkernels.release_cached_gradients() == 64 * 8192 * 4
    assert kdkernels._C.cached_gradient_bytes() == 0
    small = torch.randn(8, 100, requires_grad=True)  # below 1 MiB: the CPU allocator's, never kept
    kdkernels.distill_loss("kd", small, torch.randn(8, 100), backend="cpu").backward()
    small.grad = None
    assert kdkernels._C.cached_gradient_bytes() == 0


@pytest.mark.parametrize("limit_mb,kept_mb", [("0", 0), ("5", 4)])
def test_gradient_cache_keeps_at_most_its_limit(limit_mb, kept_mb):
    """KDKERNELS_GRADIENT_CACHE_MB caps the kept bytes (0 keeps nothing); the smallest buffers make room."""
    code = (
        "import torch, kdkernels\n"
        "grads = []\n"
        "for v in (8192, 16384, 8192, 8192):  # gradients of 2, 4, 2 and 2 MiB, all alive at once\n"
        "    s = torch.randn(64, v, requires_grad=True)\n"
        "    kdkernels.distill_loss('kd', s, torch.randn(64, v), backend='cpu').backward()\n"
        "    grads.append(s.grad)\n"
        "del s\n"
        "while grads:  # freed in the order they were made\n"
        "    grads.pop(0)\n"
        "print(kdkernels._C.cached_gradient_bytes())\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "KDKERNELS_GRADIENT_CACHE_MB": limit_mb},
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == kept_mb << 20


def test_a_smaller_gradient_takes_the_smallest_kept_buffer_that_holds_it():
    """The cache hands a gradient the smallest kept buffer of at least its size (not only one of its exact size)."""
    kdkernels.release_cached_gradients()

    def gradient(rows):
        s = torch.randn(rows, 8192, requires_grad=True)  # 32 KiB a row
        kdkernels.distill_loss("kd", s, torch.randn(rows, 8192), backend="cpu").backward()
        return s.grad

    big, small = gradient(96), gradient(48)  # 3 and 1.5 MiB, alive at once
    pointers = big.data_ptr(), small.data_ptr()
    del big, small
    assert kdkernels._C.cached_gradient_bytes() == (96 + 48) * 8192 * 4
    first = gradient(40)  # fits both: the 1.5 MiB one
    second = gradient(64)  # fits only the 3 MiB one
    assert (second.data_ptr(), first.data_ptr()) == pointers
    assert kdkernels._C.cached_gradient_bytes() == 0


# A training loop whose number of rows varies (an LLM's tokens per step): N uniform in [8, 512] at V = 8192.
VARYING_LOOP = """
import random, torch, kdkernels
def rss():
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
torch.set_num_threads(1)
random.seed(0)
teacher, base = torch.randn(512, 8192), torch.randn(512, 8192)
for warm in (0, 1):
    start = rss()
    for step in range(150):
        s = base[:random.randint(8, 512)].clone().requires_grad_(True)
        kdkernels.kd_loss(s, teacher[: s.shape[0]], backend="cpu").backward()
        del s
print(rss() - start, kdkernels._C.cached_gradient_bytes())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc/self/status")
def test_a_loop_of_varying_shapes_keeps_about_one_step_of_gradient():
    """In a loop whose gradients' sizes vary, the process grows by no more than about its largest gradient beyond
    what it grows with the cache off (the cache keeps at most the most gradient bytes in use at once, one step's;
    by exact sizes it kept a buffer per size, up to its 2 GiB limit). Each loop runs twice in a fresh process and
    the second run's resident-set growth is compared."""
    largest = 512 * 8192 * 4
    on, off = (_run(VARYING_LOOP, {"KDKERNELS_GRADIENT_CACHE_MB": mb}) for mb in ("2048", "0"))
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    (growth_on, kept), (growth_off, _) = [[int(x) for x in r.stdout.split()] for r in (on, off)]
    assert kept <= largest
    # (A loop with the cache off may also give pages back to the system: its growth counts as 0 then.)
    assert growth_on <= max(growth_off, 0) + 1.5 * largest, (growth_on >> 20, growth_off >> 20)


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "", " 5", "99999999999999"])
def test_a_gradient_cache_size_that_is_not_a_non_negative_integer_is_refused(value):
    """KDKERNELS_GRADIENT_CACHE_MB other than a non-negative integer raises ValueError naming it at the first
    gradient (-1 meant unlimited and "abc" 0 before)."""
    code = (
        "import torch, kdkernels\n"
        "s = torch.randn(64, 8192, requires_grad=True)\n"
        "kdkernels.kd_loss(s, torch.randn(64, 8192), backend='cpu').backward()\n"
    )
    run = _run(code, {"KDKERNELS_GRADIENT_CACHE_MB": value})
    assert run.returncode != 0
    assert "ValueError: KDKERNELS_GRADIENT_CACHE_MB must be a non-negative integer" in run.stderr, run.stderr


def test_ops_are_registered_with_the_backends():
    for name in ("cpu", "cuda"):
        registered = backends._REGISTRY[name]
        for family, (op, inplace) in family_ops(name).items():
            assert registered.ops[family] is op and registered.inplace[family] is inplace
        assert registered.scale_rows is torch.ops.kdkernels.scale_rows_.default


def test_codes_and_parameters_agree_in_every_language():
    """The named codes and parameter layouts of the method table (methods.py), and the z-score's epsilon, are those
    the C++ kernels were built with (csrc/divergence.h, decoupled.h, row_math.h, exported by kdkernels._C) and the
    Triton kernels' constexprs."""
    from kdkernels import _C, methods
    from kdkernels.backends.triton import common as triton_common
    from kdkernels.backends.triton import decoupled as triton_decoupled
    from kdkernels.backends.triton import divergence as triton_divergence

    for python, cpp, triton_module in (
        (methods.Divergence, _C.DIVERGENCE_CODES, triton_divergence),
        (methods.Partition, _C.PARTITION_CODES, triton_decoupled),
        (methods.Bin, _C.BIN_CODES, None),
        (methods.CrossVocab, _C.CROSS_VOCAB_CODES, None),
    ):
        assert cpp == {code.name: int(code) for code in python}, python.__name__
        if triton_module is not None:
            assert {code.name: getattr(triton_module, code.name).value for code in python} == cpp
    assert _C.DIVERGENCE_PARAMS == methods.DivergenceParams._fields
    assert _C.DECOUPLED_PARAMS == methods.DecoupledParams._fields
    assert _C.CROSS_VOCAB_PARAMS == methods.CrossVocabParams._fields
    assert _C.CALL_SCALARS == SCALARS and _C.CALL_FLAGS == FLAGS
    assert _C.STANDARDIZE_EPS == methods.STANDARDIZE_EPS == triton_common.STANDARDIZE_EPS.value
    assert _C.BDKD_TIE == methods.BDKD_TIE
    divergence_args = inspect.signature(triton_divergence.divergence_kernel.fn).parameters
    assert all(name in divergence_args for name in methods.DivergenceParams._fields)


def test_inplace_needs_contiguous_student():
    s, t, target = make_inputs((4, 66), torch.float32, seed=32)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.kdkernels.divergence_cpu_(s[:, ::2], t[:, ::2], *KernelCall(target=target, params=PARAMS).op_args())


@pytest.mark.parametrize(
    "what,kwargs,match",
    [
        ("code", dict(code=99), "code must be in"),
        ("params", dict(params=(0.0,) * 3), f"params must hold {len(PARAMS)}"),
        ("temperature", dict(temperature=0.0), "temperature must be > 0"),
        ("shape", dict(teacher=torch.zeros(4, 5)), "same shape"),
        ("dtype", dict(teacher=torch.zeros(4, 6, dtype=torch.int32)), "logits must be float32"),
        ("target", dict(target=torch.zeros(3, dtype=torch.long)), r"target must have shape \[N\]"),
        ("with_ce", dict(with_ce=True), "with_ce .* needs a target"),
        ("weights", dict(ce_weight=float("inf")), "weights must be finite"),
    ],
)
def test_op_checks_its_arguments(what, kwargs, match):
    teacher = kwargs.pop("teacher", torch.zeros(4, 6))
    call = KernelCall(**{"params": PARAMS, **kwargs})
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kdkernels.divergence_cpu(torch.zeros(4, 6), teacher, *call.op_args(), True)


def test_op_checks_the_lengths_of_its_option_lists():
    *call, scalars, flags = KernelCall(params=PARAMS).op_args()
    for bad in ((scalars[:-1], flags), (scalars, flags + [0])):
        with pytest.raises(RuntimeError, match="scalars must hold .* and flags"):
            torch.ops.kdkernels.divergence_cpu(torch.zeros(4, 6), torch.zeros(4, 6), *call, *bad, True)


def test_auto_picks_the_extension_on_cpu_and_cuda_is_refused_with_a_reason():
    s = torch.zeros(2, 3)
    assert backends.select_backend("auto", s) is backends._REGISTRY["cpu"]
    assert backends.AUTO_ORDER["cuda"][:2] == ("triton", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu tensors: .*cuda tensors only"):
            kdkernels.kd_loss(s, s, backend="cuda")


def _run(code, env=None):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
    )


def test_missing_extension_is_explained():
    """Without kdkernels._C the package imports, "auto" falls back to the reference, and backend="cpu" says why
    and how to build it."""
    run = _run(
        "import sys; sys.modules['kdkernels._C'] = None\n"
        "import torch, kdkernels\n"
        "assert 'cpu' not in kdkernels.available_backends('cpu')\n"
        "s = torch.randn(3, 7)\n"
        "kdkernels.kd_loss(s, s)\n"
        "kdkernels.kd_loss(s, s, backend='cpu')\n"
    )
    assert run.returncode != 0 and "RuntimeError" in run.stderr, run.stderr
    assert (
        "backend='cpu' cannot run on cpu tensors: the compiled extension kdkernels._C could not be imported"
        in run.stderr
        and "pip install --no-build-isolation -e ." in run.stderr
    ), run.stderr


LOWER_CAPABILITIES = {"AVX512": ["default", "avx2"], "AVX2": ["default"]}.get(
    torch.backends.cpu.get_cpu_capability(), []
)


@pytest.mark.parametrize("capability", LOWER_CAPABILITIES)
def test_each_cpu_capability_build(capability):
    """setup.py compiles the CPU kernels once per capability and this CPU runs the widest: force each narrower
    build (ATEN_CPU_CAPABILITY) and rerun the CPU backend's oracle tests on it, the quick tier's selection of them
    (every method once; the full tier's hyperparameter sweep runs on the widest build)."""
    env = {"ATEN_CPU_CAPABILITY": capability, "KDKERNELS_FULL_TESTS": "0"}
    seen = _run("import torch; print(torch.backends.cpu.get_cpu_capability())", env)
    assert seen.stdout.strip().lower() == capability, seen.stdout + seen.stderr
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/test_losses.py",
            "tests/test_kernels.py",
            "tests/test_extension.py",
            "-k",
            "cpu and (oracle or any_vocabulary or extreme or masked or half or streamed)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_every_cuda_op_has_its_cuda_kernel_in_csrc():
    """Every op the extension defines for CUDA tensors (its <family>_cuda ops and the generic scale_rows_; not
    split_accumulate_, which only the CPU fused-linear path calls) is implemented by a CUDA kernel under csrc/cuda/,
    read from the sources (no GPU or CUDA build needed)."""
    import glob
    import re

    with open(os.path.join(ROOT, "csrc", "kdkernels.cpp")) as f:
        schemas = f.read()
    families = re.findall(r'"(\w+)"', re.findall(r"for \(const char\* family : \{([^}]*)\}", schemas)[0])
    wanted = {f"{family}_cuda{suffix}" for family in families for suffix in ("", "_")}
    wanted |= set(re.findall(r'm\.def\("(\w+)\(', schemas)) - {"split_accumulate_"}
    implemented = set()
    for source in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        with open(source) as f:
            text = f.read()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(kdkernels, CUDA, m\) \{(.*?)\n\}", text, re.S):
            implemented |= set(re.findall(r'm\.impl\("(\w+)"', block))
    assert wanted == {"divergence_cuda", "divergence_cuda_", "decoupled_cuda", "decoupled_cuda_", "scale_rows_"}
    assert wanted <= implemented, wanted - implemented


def test_extension_backends_need_no_triton():
    """Without the triton package the extension's backends register with the extension's own ops (the CUDA
    backend's backward included), and backend='triton' says why it is missing."""
    run = _run(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kdkernels\n"
        "from kdkernels import backends\n"
        "assert backends._REGISTRY['cuda'].scale_rows is torch.ops.kdkernels.scale_rows_.default\n"
        "assert backends._REGISTRY['cpu'].impl is not None\n"
        "s = torch.randn(3, 7, requires_grad=True)\n"
        "kdkernels.kd_loss(s, torch.randn(3, 7), backend='cpu').backward(torch.tensor(2.0))\n"
        "kdkernels.kd_loss(s, s, backend='triton')\n",
        env={"TRITON_INTERPRET": ""},
    )
    assert (
        run.returncode != 0
        and "backend='triton' cannot run on cpu tensors: the triton package could not be imported" in run.stderr
    ), run.stderr
