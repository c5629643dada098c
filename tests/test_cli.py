"""The command line: the demo (main job) and the benchmark run end to end on small settings."""

import csv
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import uninterpreted_env

import kdkernels
from kdkernels import backends, bench

# The demos run as a user runs them, without Triton's interpreter: under it the demo would time every method's step
# on interpreted Triton kernels, minutes a run.
DEMO_ENV = uninterpreted_env()


def test_demo_quick_runs_and_reports_every_method():
    done = subprocess.run(
        [sys.executable, "-m", "kdkernels", "demo", "--quick", "--no-progress"],
        env=DEMO_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for method in kdkernels.METHODS:
        assert f"\n{method} " in done.stdout
    assert "distilled students beat the CE-only student for" in done.stdout


def test_demo_standardize_and_learn_temperature_add_columns():
    """``demo --standardize --learn-temperature``: each method once more with logit standardization and once more
    with a learned temperature (CTKD), each in columns of its own, the mean learned T moved from its start (4). (One
    run for both: the demo's fixed cost, the teacher and the CE-only student, is most of a run.)"""
    command = ["demo", "--quick", "--no-progress", "--standardize", "--learn-temperature", "--methods", "kd", "dkd"]
    run = [sys.executable, "-m", "kdkernels", *command]
    done = subprocess.run(run, env=DEMO_ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    header, _, kd, dkd = done.stdout.splitlines()[1:5]
    assert "standardized acc" in header and "learned-T acc" in header and "learned T" in header, header
    assert kd.startswith("kd ") and dkd.startswith("dkd ")
    for row in (kd, dkd):  # student, standardized, learned-T, CE-only and teacher accuracies, and the learned T
        cells = row.split()
        assert len([cell for cell in cells if cell.endswith("%")]) == 5, row
        first = next(i for i, cell in enumerate(cells) if cell.endswith("%"))  # the student's accuracy
        learned = float(cells[first + 3])
        assert 1.0 < learned < 20.0 and learned != 4.0


def test_demo_lm_quick_trains_and_reports():
    """``demo lm --quick``: tokenizer, teacher, the CE-only student and the distilled ones through the trainer, then
    every step-cost path; the smoke run checks the pipeline and the report, not the perplexities."""
    done = subprocess.run(
        [sys.executable, "-m", "kdkernels", "demo", "lm", "--quick", "--no-progress", "--methods", "kd", "jsd"],
        env=DEMO_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "BPE vocabulary 4096" in out and "held-out perplexity (teacher" in out
    for row in ("CE only", "kd", "jsd", "full logits + eager", "full logits + fused", "fused-linear"):
        assert f"\n  {row} " in out, out
    assert "for 2 methods" in out or "of 2 methods" in out
    from kdkernels.demo_lm import cpu_bf16  # (the trainers run bf16 autocast where this CPU computes it)

    assert ("precision: bf16 autocast" if cpu_bf16() else "precision: float32 (this CPU does not") in out, out


def test_demo_lm_cross_tokenizer_quick_trains_and_reports():
    """``demo lm --cross-tokenizer --quick``: two tokenizers of different sizes, the teacher, CE only, uld and
    hybrid students through KDTrainer(teacher_tokenizer=...), and the step against TRL's ULDLoss on the same
    batch, whose loss values agree; the smoke run checks the pipeline and the report, not the perplexities."""
    done = subprocess.run(
        [sys.executable, "-m", "kdkernels", "demo", "lm", "--cross-tokenizer", "--quick", "--no-progress"],
        env=DEMO_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "teacher BPE 1024 tokens" in out and "student BPE 512" in out and "token strings shared" in out, out
    assert "1 seed(s) per student" in out and "bits/byte" in out
    for row in ("CE only", "uld", "hybrid"):
        assert f"\n  {row} " in out, out
    losses = {}
    for path in ("kdkernels uld", "TRL ULDLoss uld", "kdkernels hybrid", "TRL ULDLoss hybrid"):
        (line,) = [line for line in out.splitlines() if line.startswith(f"  {path} ")]
        losses[path] = float(line.split()[-1])
    for method in ("uld", "hybrid"):
        assert math.isclose(losses[f"kdkernels {method}"], losses[f"TRL ULDLoss {method}"], rel_tol=1e-4), losses


def test_bench_writes_table_csv_and_plot(tmp_path):
    rows = bench.run(
        "cpu", shapes=["vision-100"], methods=["kd", "gdkd"], backends=[bench.EAGER], out=str(tmp_path), progress=False
    )
    assert [(r.method, r.backend) for r in rows] == [("kd", "eager"), ("gdkd", "eager")]
    assert all(
        r.ms > 0 and math.isclose(r.gbps, bench.minimal_bytes(r.n, r.v, torch.float32) / r.ms / 1e6) for r in rows
    )
    assert all(r.floor_ms > 0 and math.isclose(r.copy_share, r.floor_ms / r.ms) for r in rows)  # (the byte floor)
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert os.path.getsize(tmp_path / "bench.png") > 1000
    assert "x compile" in bench.format_table(rows)


def test_cross_vocab_bench_times_every_backend(monkeypatch):
    """bench --cross-vocab: uld and hybrid on every backend with cross-vocabulary kernels that runs here (not Triton's
    interpreter), per shape, a positive time each, and the table."""
    monkeypatch.setitem(bench.CROSS_VOCAB_SHAPES, "cpu", {"tiny": (16, 50, 70, torch.float32, 20)})
    calls = []
    monkeypatch.setattr(bench, "_median_ms", lambda step, device, reps=20: calls.append(step()) or 0.5)
    rows = bench.run_cross_vocab("cpu", progress=False)
    names = [b for b in kdkernels.available_backends("cpu") if backends._REGISTRY[b].cross_vocab and b != "triton"]
    assert "cpu" in names and "reference" in names
    assert [(r["method"], r["backend"]) for r in rows] == [(m, b) for m in ("uld", "hybrid") for b in names]
    assert len(calls) == len(rows) and all(r["ms"] == 0.5 and r["shape"] == "tiny" for r in rows)
    table = bench.format_cross_vocab_table(rows).splitlines()
    assert table[0].split() == ["shape", "n", "vs", "vt", "dtype", "method", "backend", "ms", "peak_extra_mb"]
    assert len(table) == len(rows) + 1


def test_linear_bench_compares_paths(tmp_path):
    rows = bench.run_linear(
        "cpu", methods=["kd"], out=str(tmp_path), reps=1, table={"tiny": (64, 16, 300, torch.float32)}, liger=False
    )
    paths = (bench.UNCHUNKED, bench.FUSED_LINEAR, bench.FUSED_LINEAR_SMALL)
    assert [(r.case, r.path) for r in rows] == [("kd", p) for p in paths]
    auto = backends.select_backend("auto", torch.empty(1)).name
    assert all(r.ms > 0 and r.peak_extra_mb > 0 and r.backend == auto for r in rows)
    assert math.isclose(rows[1].vs_unchunked_time, rows[0].ms / rows[1].ms)
    grads_mb = (64 * 16 + 300 * 16) * 4 / 2**20  # grad_hidden + grad_weight, float32
    assert all(math.isclose(r.net_peak_mb, r.peak_extra_mb - grads_mb) for r in rows)
    assert math.isclose(rows[1].vs_unchunked_net_peak, rows[0].net_peak_mb / rows[1].net_peak_mb)
    assert "x net peak" in bench.format_linear_table(rows)
    with open(tmp_path / "linear.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_linear_bench_subsets(tmp_path):
    """--cases, --paths and --reps pick the section's losses, paths and timed steps; without the unchunked path the
    rows have no ratios."""
    from kdkernels.__main__ import build_parser

    args = build_parser().parse_args(["bench", "--linear", "--cases", "jsd", "--paths", "fused-linear", "--reps", "2"])
    assert (args.cases, args.paths, args.reps) == (["jsd"], [bench.FUSED_LINEAR], 2)
    table = {"tiny": (64, 16, 300, torch.float32)}
    rows = bench.run_linear("cpu", out=str(tmp_path), reps=1, table=table, liger=False, paths=args.paths, cases=["jsd"])
    assert [(r.case, r.path) for r in rows] == [("jsd", bench.FUSED_LINEAR)]
    assert math.isnan(rows[0].vs_unchunked_time) and rows[0].ms > 0


def test_liger_rows_check_values_first(monkeypatch):
    """The Liger rows time the same loss: its values and gradients, and kdkernels' fused-linear ones, are checked
    against the unchunked path's first (with and without the hard-label term), and a loss Liger does not compute is
    caught."""
    inputs = bench._linear_inputs(96, 16, 300, torch.float32, "cpu")
    for case in ("jsd", "jsd+ce"):
        assert bench.check_liger_agrees(case, inputs) == ""
    monkeypatch.setitem(bench.LINEAR_CASES, "jsd-T2", ("jsd", {"temperature": 2.0}))
    with pytest.raises(AssertionError, match="liger and the unchunked path disagree on jsd-T2 loss"):
        bench.check_liger_agrees("jsd-T2", inputs)


def test_liger_gradient_off_in_low_precision_is_a_note(monkeypatch):
    """With bf16 heads a Liger weight gradient off the unchunked path's (its bf16 accumulation) becomes the row's
    note, the loss still checked; at float32 the same difference raises."""
    liger_loss = bench._liger_loss

    def off_gradient(options):
        loss = liger_loss(options)
        # Same loss value, weight gradient + 1 on every entry.
        return lambda hs, ws, ht, wt, y: loss(hs, ws, ht, wt, y) + (ws - ws.detach()).sum()

    monkeypatch.setattr(bench, "_liger_loss", off_gradient)
    note = bench.check_liger_agrees("jsd", bench._linear_inputs(96, 16, 300, torch.bfloat16, "cpu"))
    assert note.startswith("liger and the unchunked path disagree on jsd grad weight"), note
    with pytest.raises(AssertionError, match="liger and the unchunked path disagree on jsd grad weight"):
        bench.check_liger_agrees("jsd", bench._linear_inputs(96, 16, 300, torch.float32, "cpu"))


def test_bench_shapes_are_listed_and_checked():
    """--help names every shape of every table; an unknown one is refused with the names to choose from."""
    helped = subprocess.run([sys.executable, "-m", "kdkernels", "bench", "--help"], capture_output=True, text=True)
    text = " ".join(helped.stdout.split())
    for table in (bench.GPU_SHAPES, bench.CPU_SHAPES, bench.LINEAR_GPU_SHAPES, bench.LINEAR_CPU_SHAPES):
        assert all(name in text for name in table), text
    done = subprocess.run(
        [sys.executable, "-m", "kdkernels", "bench", "--device", "cpu", "--shapes", "vision-100", "llm-9k"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert f"unknown shape(s) llm-9k on cpu; choose from: {', '.join(bench.CPU_SHAPES)}" in done.stderr


def test_bench_table_says_why_columns_are_empty():
    row = bench.Row("tiny", "kd", "cpu", 4, 10, "float32", 1.0, 2.0, 0.5, math.nan, 1.0, floor_ms=0.5, vs_eager=3.0)
    text = bench.format_table([row])
    assert "nan" not in text
    assert "copy bandwidth (read + write) measured in this run: 4.0 GB/s" in text
    assert "peak MB, peak/grad: measured on a GPU only" in text
    assert "x eager, x compile, x ref: '-' where that baseline was not run" in text


# The kernel call's record, from which setup.py generates the C++ option lists.
RECORD = os.path.join("kdkernels", "backends", "kernel_call.py")


def test_setup_rebuilds_only_when_what_it_depends_on_changed(tmp_path):
    """scripts/setup.sh's up-to-date test, in a copy of what the install depends on that shares this .venv:
    KDKERNELS_SETUP_CHECK=1 reports without installing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # (the package too, built extension included: the import check runs in the copy, where it is found first)
    for name in ("scripts", "csrc", "kdkernels"):
        shutil.copytree(os.path.join(root, name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
    os.symlink(os.path.join(root, ".venv"), tmp_path / ".venv")
    os.symlink(os.path.join(root, ".venv-triton36"), tmp_path / ".venv-triton36")
    (tmp_path / "build").mkdir()
    triton_stamp = tmp_path / "build" / "setup-triton36.stamp"
    shutil.copy(os.path.join(root, "build", "setup-triton36.stamp"), triton_stamp)

    def check(**env):
        done = subprocess.run(
            ["bash", "scripts/setup.sh"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "KDKERNELS_SETUP_CHECK": "1", **env},
            timeout=60,
        )
        return done.returncode, done.stdout

    code, out = check()
    assert code == 1 and "out of date" in out, out  # never installed here
    (tmp_path / "build" / "setup.stamp").write_text(out.split("(stamp ")[1].split(")")[0] + "\n")
    assert check() == (
        0,
        "scripts/setup.sh: .venv is up to date (nothing the install depends on changed): not rebuilding\n",
    )
    assert check(KDKERNELS_CUDA_ARCHS="80")[0] == 1
    assert check(KDKERNELS_TORCH="torch==2.99")[0] == 1
    for edited in (tmp_path / "csrc" / "row_math.h", tmp_path / RECORD):  # (the build generates a header from RECORD)
        original = edited.read_text()
        edited.write_text(original + "# edited\n")
        assert check()[0] == 1, edited
        edited.write_text(original)
        assert check()[0] == 0
    triton_stamp.write_text("torch==2.13.0 triton==3.5.0\n")  # the Triton 3.6.0 venv holds another version
    code, out = check()
    assert code == 1 and ".venv-triton36 is out of date" in out, out
