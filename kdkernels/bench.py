"""Microbenchmark of every loss and backend (``python -m kdkernels bench``).

For each shape, method and backend it times forward + backward of the loss (median of repeated runs, CUDA events on
a GPU) against what a user would run instead: the method's idiomatic eager code (kdkernels/baselines.py, written as
its official code writes it) and ``torch.compile`` of that code (static shapes), and the eager reference
(kdkernels/backends/reference.py). The minimal bytes of one forward + backward are

    bytes = N * V * (itemsize(student) + itemsize(teacher) + itemsize(student))

that is: read the student once, read the teacher once, write the gradient once (O(N) target and loss terms are
left out). Every run first measures the device's copy bandwidth (a large copy, bytes read + written, on all of the
CPU's threads or on the GPU); the **byte floor** of a shape is its minimal bytes at that bandwidth, the least time a
memory-bound kernel can take. The table gives each backend's ms, its bandwidth on the minimal bytes, that as a share
of the copy bandwidth (= floor / ms), its time as a multiple of the floor, the peak memory added by loss + backward
(GPU), and the speed-up over the idiomatic eager code, over ``torch.compile`` of it and over the eager reference.

Writes ``bench.csv`` and ``bench.png`` into ``--out`` and prints the table.

``--linear`` runs the fused-linear section instead: ``linear_distill_loss`` with its default chunks (and with
chunks of a 128 MiB ``memory_budget``, ``SMALL_BUDGET``) against the
unchunked path (both models' full logits ``hidden @ weight.T`` in float32, as a training loop upcasts a
low-precision head's, then ``distill_loss`` with the backend that backend="auto" picks, the fastest fused loss
registered for the device) and, on the jsd rows, Liger-Kernel's chunked ``LigerFusedLinearJSDLoss``
(torch.compile'd PyTorch; its loss and gradients are first checked equal to kdkernels' on the same inputs), forward
+ backward, at LLM head shapes, for the losses of ``LINEAR_CASES`` (kd, jsd, and jsd with the hard-label term 0.5 CE
+ 0.5 jsd). It reports the time of a step (median, fastest and slowest of the timed steps; on GPU do_bench's median)
and the peak memory that loss + backward add above the inputs and parameters (the gradients of the student's hidden
states and weight included, in every path), on a step after a warm-up one (Liger compiles in it). GPU:
``torch.cuda.max_memory_allocated`` above the allocated bytes before the step. CPU: each (path, loss) runs in a
fresh process and the step is measured with the kernel's own resident-set high-water mark (``peak_rss_bytes``). That
counts every byte the step touches (PyTorch, BLAS and Python alike) and nothing it only reserves, the CPU ops' gradient
cache emptied first (the buffer it keeps between steps is the unchunked path's); timing uses later steps. Every path
returns the same gradients (``grads_mb``: the student's hidden states and weight in their dtype), which training keeps
anyway; the table also gives each peak net of them (the loss's own memory) and its ratio.
Writes ``linear.csv``.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from . import METHODS, available_backends, distill_loss, linear_distill_loss, release_cached_gradients
from .baselines import BASELINES

# name: (N, V, student and teacher dtype)
GPU_SHAPES = {
    "vision-100": (65536, 100, torch.float32),
    "vision-1000": (65536, 1000, torch.float32),
    "llm-32k": (8192, 32000, torch.bfloat16),
    "llm-128k": (8192, 128256, torch.bfloat16),
    "llm-256k": (8192, 262144, torch.bfloat16),
}
# The same families of shapes, sized for a CPU, each in float32 and bfloat16, ten classes (vision-10: digits,
# CIFAR-10, rows shorter than one vector), and one small batch ("call": the fixed cost of a call, validation and
# autograd included, which vision batches of a few rows pay every step).
CPU_SHAPES = {
    "call": (8, 100, torch.float32),
    "vision-10": (65536, 10, torch.float32),
    "vision-100": (8192, 100, torch.float32),
    "vision-1000": (4096, 1000, torch.float32),
    "vision-1000-bf16": (4096, 1000, torch.bfloat16),
    "llm-32k": (1024, 32000, torch.float32),
    "llm-32k-bf16": (1024, 32000, torch.bfloat16),
}
EAGER, COMPILED, REFERENCE = "eager", "compile", "reference"


@dataclass
class Row:
    shape: str
    method: str
    backend: str
    n: int
    v: int
    dtype: str
    ms: float  # median forward + backward time; NaN when it could not run (see note)
    gbps: float  # minimal bytes / time
    copy_share: float  # gbps / measured copy bandwidth = byte floor / ms
    peak_extra_mb: float  # peak memory added by forward + backward above the inputs (GPU), else NaN
    grad_mb: float  # size of the gradient tensor, the floor of peak_extra_mb
    floor_ms: float = math.nan  # minimal bytes / measured copy bandwidth
    vs_eager: float = math.nan
    vs_compile: float = math.nan
    vs_reference: float = math.nan
    note: str = ""


def minimal_bytes(n: int, v: int, dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return n * v * (item + item + item)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Copy bandwidth of ``device`` (bytes read + written, a copy of nbytes / 2 on all threads of a CPU), the ceiling
    a memory-bound kernel can reach."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device)
    return nbytes / ms / 1e6


def _median_ms(fn, device: torch.device, reps: int = 20) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(max(3, reps // 4)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _loss_fn(method: str, backend: str):
    if backend == EAGER:
        return BASELINES[method]
    if backend == COMPILED:
        return torch.compile(BASELINES[method], dynamic=False)

    def loss(s, t, y):
        return distill_loss(method, s, t, y, backend=backend)

    return loss


def _measure(method, backend, s, t, y, device) -> tuple[float, float]:
    """(median ms of forward + backward, peak MB added above the inputs or NaN off-GPU)."""
    return _measure_loss(_loss_fn(method, backend), s, t, y, device)


def _measure_loss(fn, s, t, y, device) -> tuple[float, float]:
    """_measure of the loss ``fn(s, t, y)``."""

    def step():
        s.grad = None
        fn(s, t, y).backward()

    step()  # compile / autotune / first-launch costs stay out of the numbers
    peak = math.nan
    if device.type == "cuda":
        s.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(s, t, y).backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    reps = 200 if s.numel() < 1 << 16 else 20  # (a small call: more runs for a steady median)
    return _median_ms(step, device, reps), peak


def run(
    device: str = "cuda", shapes=None, methods=None, backends=None, out: str = "bench/out", progress: bool = True
) -> list[Row]:
    device = torch.device(device)
    table = shape_table(device.type, linear=False)
    shapes = shapes or list(table)
    methods = methods or list(METHODS)
    if backends is None:
        # Triton on CPU tensors means its interpreter: far too slow to time.
        fused = [
            b for b in available_backends(device) if b != REFERENCE and not (b == "triton" and device.type == "cpu")
        ]
        backends = fused + [EAGER, COMPILED, REFERENCE]
    copy_gbps = copy_bandwidth_gbps(device)
    rows: list[Row] = []
    jobs = [(sh, m, b) for sh in shapes for m in methods for b in backends]
    bar = tqdm(jobs, desc="bench", disable=not progress, file=None)
    inputs = {}
    for shape, method, backend in bar:
        bar.set_postfix_str(f"{shape} {method} {backend}")
        n, v, dtype = table[shape]
        if shape not in inputs:
            inputs.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=device).manual_seed(0)
            s = (torch.randn(n, v, generator=g, device=device) * 3).to(dtype).requires_grad_(True)
            t = (torch.randn(n, v, generator=g, device=device) * 3).to(dtype)
            y = torch.randint(0, v, (n,), generator=g, device=device)
            y[::97] = -100  # about 1% ignored rows
            inputs[shape] = (s, t, y)
        s, t, y = inputs[shape]
        grad_mb = n * v * s.element_size() / 2**20
        note = ""
        try:
            ms, peak = _measure(method, backend, s, t, y, device)
        except (torch.OutOfMemoryError, RuntimeError) as error:  # e.g. the eager reference at V = 256K
            if not isinstance(error, torch.OutOfMemoryError) and "allocate" not in str(error):
                raise
            ms, peak, note = math.nan, math.nan, "out of memory"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        nbytes = minimal_bytes(n, v, dtype)
        gbps = nbytes / ms / 1e6
        rows.append(
            Row(
                shape,
                method,
                backend,
                n,
                v,
                str(dtype).replace("torch.", ""),
                ms,
                gbps,
                gbps / copy_gbps,
                peak,
                grad_mb,
                floor_ms=nbytes / copy_gbps / 1e6,
                note=note,
            )
        )
    for row in rows:
        base = {r.backend: r.ms for r in rows if (r.shape, r.method) == (row.shape, row.method)}
        row.vs_eager = base.get(EAGER, math.nan) / row.ms
        row.vs_compile = base.get(COMPILED, math.nan) / row.ms
        row.vs_reference = base.get(REFERENCE, math.nan) / row.ms
    os.makedirs(out, exist_ok=True)
    _write_csv(rows, os.path.join(out, "bench.csv"), copy_gbps)
    _plot(rows, os.path.join(out, "bench.png"), copy_gbps)
    return rows


def _write_csv(rows: list[Row], path: str, copy_gbps: float) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])) + ["copy_gbps"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**asdict(row), "copy_gbps": copy_gbps})


def _plot(rows: list[Row], path: str, copy_gbps: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    fig, axes = plt.subplots(len(shapes), 1, figsize=(12, 3.2 * len(shapes)), squeeze=False)
    width = 0.8 / len(backends)
    for ax, shape in zip(axes[:, 0], shapes):
        for i, backend in enumerate(backends):
            vals = [
                next((r.gbps for r in rows if (r.shape, r.method, r.backend) == (shape, m, backend)), math.nan)
                for m in methods
            ]
            ax.bar([j + i * width for j in range(len(methods))], vals, width, label=backend)
        if not math.isnan(copy_gbps):
            ax.axhline(copy_gbps, color="k", linestyle="--", linewidth=1, label="copy bandwidth")
        n, v = next((r.n, r.v) for r in rows if r.shape == shape)
        ax.set_title(f"{shape}: N={n}, V={v}, forward + backward")
        ax.set_ylabel("GB/s (minimal bytes)")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods)
        ax.legend(fontsize=7, ncol=len(backends) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(value: float, spec: str) -> str:
    """A number, or "-" where it was not measured (the table's footnotes say why)."""
    return "-" if math.isnan(value) else format(value, spec)


def format_table(rows: list[Row]) -> str:
    head = [
        "shape",
        "method",
        "backend",
        "ms",
        "GB/s",
        "%copy",
        "x floor",
        "peak MB",
        "peak/grad",
        "x eager",
        "x compile",
        "x ref",
        "note",
    ]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r.shape,
                r.method,
                r.backend,
                _cell(r.ms, ".3f"),
                _cell(r.gbps, ".0f"),
                _cell(100 * r.copy_share, ".0f"),
                _cell(r.ms / r.floor_ms, ".1f"),
                _cell(r.peak_extra_mb, ".0f"),
                _cell(r.peak_extra_mb / r.grad_mb, ".2f"),
                _cell(r.vs_eager, ".2f"),
                _cell(r.vs_compile, ".2f"),
                _cell(r.vs_reference, ".1f"),
                r.note,
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    table = "\n".join(
        "  ".join(
            str(c).rjust(w) if j not in (0, 1, 2, len(head) - 1) else str(c).ljust(w)
            for j, (c, w) in enumerate(zip(line, widths))
        )
        for line in lines
    )
    copy_gbps = next((r.gbps / r.copy_share for r in rows if r.copy_share > 0), math.nan)
    notes = [
        f"copy bandwidth (read + write) measured in this run: {copy_gbps:.1f} GB/s; x floor = ms / (minimal "
        "bytes / copy bandwidth); x eager, x compile, x ref = their ms / this ms (eager: the method's idiomatic "
        "code, compile: torch.compile of it, ref: the eager reference)"
    ]
    if any(math.isnan(r.peak_extra_mb) for r in rows):
        notes.append("peak MB, peak/grad: measured on a GPU only (torch.cuda peak memory); '-' elsewhere")
    if any(math.isnan(r.vs_eager) or math.isnan(r.vs_compile) or math.isnan(r.vs_reference) for r in rows):
        notes.append("x eager, x compile, x ref: '-' where that baseline was not run (--backends)")
    return "\n".join([table, *notes])


def shape_table(device: str, linear: bool) -> dict:
    """The shapes of ``python -m kdkernels bench`` on ``device`` ("cuda" or "cpu"), or of its --linear section."""
    if linear:
        return LINEAR_GPU_SHAPES if device == "cuda" else LINEAR_CPU_SHAPES
    return GPU_SHAPES if device == "cuda" else CPU_SHAPES


def describe_shapes() -> str:
    """Every shape name with its size, for the command line's help."""

    def listing(table):
        return ", ".join(
            f"{name} ({' x '.join(map(str, shape[:-1]))} {str(shape[-1]).replace('torch.', '')})"
            for name, shape in table.items()
        )

    return (
        f"GPU: {listing(GPU_SHAPES)}; CPU: {listing(CPU_SHAPES)}; with --linear (N x H x V), GPU: "
        f"{listing(LINEAR_GPU_SHAPES)}; CPU: {listing(LINEAR_CPU_SHAPES)}"
    )


# --------------------------------------------------------------------------------------------------------------
# Fused-linear section (python -m kdkernels bench --linear)
# --------------------------------------------------------------------------------------------------------------

# name: (N, H, V, dtype of hidden states and weights); the teacher has the student's shapes.
LINEAR_GPU_SHAPES = {"llama3-head": (8192, 4096, 128256, torch.bfloat16)}
LINEAR_CPU_SHAPES = {
    "head-64k": (2048, 1024, 65536, torch.float32),
    "head-64k-8k-rows": (8192, 1024, 65536, torch.float32),
    "head-128k-bf16": (4096, 2048, 128256, torch.bfloat16),
}
# The losses of the section: name -> (method, options). Liger-Kernel's chunked distillation loss is the generalized
# JSD (beta, temperature, weight_hard_loss / weight_soft_loss), so it runs on the jsd rows, with and without the
# hard-label term.
LINEAR_CASES = {
    "kd": ("kd", {}),
    "jsd": ("jsd", {}),
    "jsd+ce": ("jsd", {"ce_weight": 0.5, "distill_weight": 0.5}),
}
UNCHUNKED, FUSED_LINEAR, FUSED_LINEAR_SMALL, LIGER = "unchunked", "fused-linear", "fused-linear-128M", "liger"
LINEAR_PATHS = [UNCHUNKED, FUSED_LINEAR, FUSED_LINEAR_SMALL, LIGER]
# The memory_budget of the FUSED_LINEAR_SMALL path: the default's floor on CPU, chunks smaller than the default's.
SMALL_BUDGET = 128 << 20


@dataclass
class LinearRow:
    shape: str
    case: str  # a name of LINEAR_CASES
    path: str
    backend: str  # the loss backend backend="auto" picked
    n: int
    h: int
    v: int
    dtype: str
    ms: float  # median of the timed steps
    ms_min: float  # the fastest and slowest of them
    ms_max: float
    peak_extra_mb: float
    grads_mb: float  # the gradients both paths return (hidden states, weight), part of peak_extra_mb
    net_peak_mb: float = field(init=False)  # peak_extra_mb - grads_mb: the loss's own memory
    vs_unchunked_time: float = math.nan  # unchunked ms / this ms
    vs_unchunked_peak: float = math.nan  # unchunked peak / this peak
    vs_unchunked_net_peak: float = math.nan  # unchunked net peak / this net peak
    note: str = ""  # what differs from the unchunked path's values (check_liger_agrees)

    def __post_init__(self):
        self.net_peak_mb = self.peak_extra_mb - self.grads_mb


def _linear_inputs(n, h, v, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hs = (torch.randn(n, h, generator=g, device=device)).to(dtype).requires_grad_(True)
    ws = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype).requires_grad_(True)
    ht = (torch.randn(n, h, generator=g, device=device)).to(dtype)
    wt = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    y[::97] = -100
    return hs, ws, ht, wt, y


def _liger_loss(options: dict):
    """Liger-Kernel's chunked jsd (torch.compile'd PyTorch) with the case's jsd options (beta at its default)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(
        weight_hard_loss=options.get("ce_weight", 0.0),
        weight_soft_loss=options.get("distill_weight", 1.0),
        beta=METHODS["jsd"].hyperparameters["beta"],
        temperature=METHODS["jsd"].temperature,
    )


def _linear_loss(path, case, hs, ws, ht, wt, y, budget=None):
    method, options = LINEAR_CASES[case]
    if path == UNCHUNKED:  # float32 logits, as a training loop upcasts a low-precision head's
        with torch.no_grad():
            teacher = (ht @ wt.t()).float()
        return distill_loss(method, (hs @ ws.t()).float(), teacher, y, **options)
    if path == LIGER:
        return _liger_loss(options)(hs, ws, ht, wt, y)
    if budget is None and path == FUSED_LINEAR_SMALL:
        budget = SMALL_BUDGET
    return linear_distill_loss(method, hs, ws, ht, wt, y, memory_budget=budget, **options)


def _linear_step(path, case, hs, ws, ht, wt, y, budget=None) -> torch.Tensor:
    """Forward + backward of one path (a fused-linear one with ``budget`` bytes, when given); its loss, detached."""
    hs.grad = ws.grad = None
    loss = _linear_loss(path, case, hs, ws, ht, wt, y, budget)
    loss.backward()
    return loss.detach()


def check_liger_agrees(case: str, inputs) -> str:
    """Liger's loss and gradients (hidden states, weight) against the unchunked path's on ``inputs``, within the
    inputs' dtype's tolerance, and kdkernels' fused-linear ones likewise: the timings compare the same loss. A loss
    that differs, or any difference at float32, raises; with low-precision heads a gradient of Liger's that differs
    (its bf16 accumulation of the weight's gradient over chunks) is returned as the row's note instead."""
    hs, ws = inputs[:2]
    results = {}
    for path in (UNCHUNKED, FUSED_LINEAR, LIGER):
        results[path] = [_linear_step(path, case, *inputs), hs.grad, ws.grad]
    tol = 1e-4 if hs.dtype == torch.float32 else 3e-2
    notes = []
    for path, who in ((FUSED_LINEAR, "kdkernels"), (LIGER, "liger")):
        for name, ref, got in zip(("loss", "grad hidden", "grad weight"), results[UNCHUNKED], results[path]):
            scale = ref.abs().max().item()
            err = (got.float() - ref.float()).abs().max().item()
            if err <= tol * scale:
                continue
            text = f"{who} and the unchunked path disagree on {case} {name}: max error {err:.3g}"
            text += f" against max |value| {scale:.3g}"
            if path == FUSED_LINEAR or name == "loss" or hs.dtype == torch.float32:
                raise AssertionError(text)
            notes.append(text)
    return "; ".join(notes)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_rss_bytes(fn) -> int:
    """Bytes that ``fn()`` adds at its peak to this process's resident set, off-GPU: freed heap returned to the
    system first (malloc_trim), then VmHWM reset to VmRSS (``/proc/self/clear_refs``), peak = VmHWM after - VmRSS
    before. Run it in a fresh process for a clean allocator."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    fn()
    return _rss("VmHWM") - base


def linear_measure(n: int, h: int, v: int, dtype: str, case: str, path: str, device: str, reps: int) -> dict:
    """One (shape, case, path): peak MB added by a step after a warm-up one (Liger's compiles), then the median,
    fastest and slowest ms of ``reps`` steps; Liger's values are checked against the unchunked path's first, on the
    same inputs."""
    from . import backends as registry

    device = torch.device(device)
    dtype = getattr(torch, dtype)
    inputs = _linear_inputs(n, h, v, dtype, device)
    note = check_liger_agrees(case, inputs) if path == LIGER else ""
    _linear_step(path, case, *inputs)
    if device.type == "cuda":
        inputs[0].grad = inputs[1].grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _linear_step(path, case, *inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        inputs[0].grad = inputs[1].grad = None
        # The CPU ops keep a freed gradient buffer for the next step (docs/backends.md): memory the step holds
        # between steps too, so the measured step allocates it again.
        release_cached_gradients()
        peak = peak_rss_bytes(lambda: _linear_step(path, case, *inputs))
    times = _step_ms(lambda: _linear_step(path, case, *inputs), device, reps)
    backend = "liger (compiled)" if path == LIGER else registry.select_backend("auto", inputs[0]).name
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "peak_extra_mb": peak / 2**20,
        "backend": backend,
        "note": note,
    }


def _step_ms(step, device: torch.device, reps: int) -> list[float]:
    """ms of each of ``reps`` calls of ``step`` (warmed up already) on CPU; on CUDA do_bench's median, once."""
    if device.type == "cuda":
        return [_median_ms(step, device, reps)]
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def run_linear(
    device: str,
    shapes=None,
    methods=None,
    out: str = "bench/out",
    reps: int = 3,
    table=None,
    liger: bool | None = None,
    paths=None,
    cases=None,
) -> list[LinearRow]:
    """Every (shape, case, path) of the section, or those of ``shapes``, ``methods`` (or ``cases``, names of
    LINEAR_CASES) and ``paths``; Liger's rows when ``liger`` (default: when it is installed)."""
    import json
    import subprocess
    import sys

    liger = liger_available() if liger is None else liger
    table = table or shape_table(torch.device(device).type, linear=True)
    rows = []
    for shape in shapes or list(table):
        n, h, v, dtype = table[shape]
        name = str(dtype).replace("torch.", "")
        for case, (method, _) in LINEAR_CASES.items():
            if (methods and method not in methods) or (cases and case not in cases):
                continue
            for path in LINEAR_PATHS[:3] + ([LIGER] if method == "jsd" and liger else []):
                if paths and path not in paths:
                    continue
                # A fresh process per measurement: no allocator state carried over from the previous one.
                code = (
                    f"import json; from kdkernels.bench import linear_measure; print(json.dumps(linear_measure("
                    f"{n}, {h}, {v}, {name!r}, {case!r}, {path!r}, {device!r}, {reps})))"
                )
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"linear bench {shape} {case} {path} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                grads_mb = (n + v) * h * dtype.itemsize / 2**20
                rows.append(
                    LinearRow(
                        shape,
                        case,
                        path,
                        result["backend"],
                        n,
                        h,
                        v,
                        name,
                        result["ms"],
                        result["ms_min"],
                        result["ms_max"],
                        result["peak_extra_mb"],
                        grads_mb,
                        note=result["note"],
                    )
                )
                print(format_linear_table(rows[-1:], header=len(rows) == 1), flush=True)
    for row in rows:
        base = next((r for r in rows if (r.shape, r.case, r.path) == (row.shape, row.case, UNCHUNKED)), None)
        if base is None:  # (paths without the unchunked one: no ratios)
            continue
        row.vs_unchunked_time = base.ms / row.ms
        row.vs_unchunked_peak = base.peak_extra_mb / row.peak_extra_mb
        row.vs_unchunked_net_peak = base.net_peak_mb / row.net_peak_mb
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "linear.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return rows


def format_linear_table(rows: list[LinearRow], header: bool = True) -> str:
    lines = (
        [
            [
                "shape",
                "loss",
                "path",
                "loss backend",
                "N",
                "H",
                "V",
                "dtype",
                "ms",
                "ms spread",
                "peak MB",
                "grads MB",
                "net peak MB",
                "x time",
                "x peak",
                "x net peak",
            ]
        ]
        if header
        else []
    )
    for r in rows:
        lines.append(
            [
                r.shape,
                r.case,
                r.path,
                r.backend,
                r.n,
                r.h,
                r.v,
                r.dtype,
                f"{r.ms:.0f}",
                f"{r.ms_min:.0f}-{r.ms_max:.0f}",
                f"{r.peak_extra_mb:.0f}",
                f"{r.grads_mb:.0f}",
                f"{r.net_peak_mb:.0f}",
                f"{r.vs_unchunked_time:.2f}",
                f"{r.vs_unchunked_peak:.2f}",
                f"{r.vs_unchunked_net_peak:.2f}",
            ]
        )
    notes = [f"note ({r.shape} {r.case} {r.path}): {r.note}" for r in rows if r.note]
    return "\n".join(["  ".join(str(c).ljust(13) for c in line) for line in lines] + notes)


# The cross-vocabulary section (--cross-vocab), per device: name -> (N, Vs, Vt, dtype, classes the map pairs). "fits":
# rows that the fused kernels sort on chip; "llm": a 32K student and a 128K teacher (chunked on a GPU).
CROSS_VOCAB_SHAPES = {
    "cuda": {"fits": (16384, 1000, 2000, torch.float32, 500), "llm": (4096, 32000, 128256, torch.bfloat16, 24000)},
    "cpu": {"fits": (1024, 1000, 2000, torch.float32, 500), "llm": (32, 32000, 128256, torch.float32, 24000)},
}


def run_cross_vocab(device: str = "cuda", progress: bool = True) -> list[dict]:
    """Forward + backward of ``cross_vocab_loss`` (uld, and hybrid with a map of the shape's shared classes) on every
    backend with cross-vocabulary kernels (not Triton's interpreter), at CROSS_VOCAB_SHAPES: median ms and the peak MB
    added (GPU) per shape, method and backend."""
    from . import backends, cross_vocab_loss

    device = torch.device(device)
    names = [
        b
        for b in available_backends(device)
        if backends._REGISTRY[b].cross_vocab is not None and not (b == "triton" and device.type == "cpu")
    ]
    jobs = [
        (shape, method, b) for shape in CROSS_VOCAB_SHAPES[device.type] for method in ("uld", "hybrid") for b in names
    ]
    rows, inputs = [], {}
    for shape, method, backend in tqdm(jobs, desc="cross-vocab", disable=not progress):
        n, vs, vt, dtype, shared = CROSS_VOCAB_SHAPES[device.type][shape]
        if shape not in inputs:
            inputs.clear()
            g = torch.Generator().manual_seed(0)
            s = (torch.randn(n, vs, generator=g) * 3).to(device, dtype).requires_grad_(True)
            t = (torch.randn(n, vt, generator=g) * 3).to(device, dtype)
            pairs = tuple(torch.randperm(v, generator=g)[:shared].to(device) for v in (vs, vt))
            inputs[shape] = s, t, pairs
        s, t, pairs = inputs[shape]
        hp = {"vocab_map": pairs} if method == "hybrid" else {}

        def loss(s, t, _y, method=method, backend=backend, hp=hp):
            return cross_vocab_loss(method, s, t, backend=backend, **hp)

        ms, peak = _measure_loss(loss, s, t, None, device)
        rows.append(dict(shape=shape, n=n, vs=vs, vt=vt, dtype=str(dtype).removeprefix("torch."), method=method,
                         backend=backend, ms=ms, peak_extra_mb=peak))  # fmt: skip
    return rows


def format_cross_vocab_table(rows: list[dict]) -> str:
    columns = ("shape", "n", "vs", "vt", "dtype", "method", "backend", "ms", "peak_extra_mb")
    lines = [columns] + [[_cell(r[c], ".3f" if c == "ms" else ".0f") if c in ("ms", "peak_extra_mb") else r[c]
                          for c in columns] for r in rows]  # fmt: skip
    return "\n".join("  ".join(str(c).ljust(13) for c in line) for line in lines)


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    table = shape_table(torch.device(device).type, args.linear)
    unknown = [shape for shape in args.shapes or () if shape not in table]
    if unknown:
        raise SystemExit(
            f"python -m kdkernels bench: error: unknown shape(s) {', '.join(unknown)} on {device}"
            f"{' with --linear' if args.linear else ''}; choose from: {', '.join(table)}"
        )
    if args.cross_vocab:
        print(format_cross_vocab_table(run_cross_vocab(device, progress=not args.no_progress)))
        return 0
    if args.linear:
        if not liger_available():
            print("liger-kernel is not installed: no Liger rows (pip install liger-kernel, or the llm extra)")
        rows = run_linear(device, args.shapes, args.methods, args.out, args.reps, paths=args.paths, cases=args.cases)
        print("\n" + format_linear_table(rows))
        print(f"\nwrote {os.path.join(args.out, 'linear.csv')}")
        return 0
    rows = run(device, args.shapes, args.methods, args.backends, args.out, progress=not args.no_progress)
    print(format_table(rows))
    print(f"\nwrote {os.path.join(args.out, 'bench.csv')} and {os.path.join(args.out, 'bench.png')}")
    return 0
