"""The command line: the demo (main job) and the benchmark run end to end on small settings."""

import csv
import math
import os
import subprocess
import sys

import torch

import kdkernels
from kdkernels import backends, bench


def test_demo_quick_runs_and_reports_every_method():
    done = subprocess.run([sys.executable, "-m", "kdkernels", "demo", "--quick", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for method in kdkernels.METHODS:
        assert f"\n{method} " in done.stdout
    assert "distilled students beat the CE-only student for" in done.stdout


def test_bench_writes_table_csv_and_plot(tmp_path):
    rows = bench.run("cpu", shapes=["vision-100"], methods=["kd", "gdkd"], backends=[bench.EAGER],
                     out=str(tmp_path), progress=False)
    assert [(r.method, r.backend) for r in rows] == [("kd", "eager"), ("gdkd", "eager")]
    assert all(r.ms > 0 and math.isclose(r.gbps, bench.minimal_bytes(r.n, r.v, torch.float32) / r.ms / 1e6)
               for r in rows)
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert os.path.getsize(tmp_path / "bench.png") > 1000
    assert "x compile" in bench.format_table(rows)


def test_linear_bench_compares_paths(tmp_path):
    rows = bench.run_linear("cpu", methods=["kd"], out=str(tmp_path), reps=1,
                            table={"tiny": (64, 16, 300, torch.float32)})
    assert [r.path for r in rows] == [bench.UNCHUNKED, bench.FUSED_LINEAR]
    auto = backends.select_backend("auto", torch.empty(1)).name
    assert all(r.ms > 0 and r.peak_extra_mb > 0 and r.backend == auto for r in rows)
    assert math.isclose(rows[1].vs_unchunked_time, rows[0].ms / rows[1].ms)
    grads_mb = (64 * 16 + 300 * 16) * 4 / 2**20  # grad_hidden + grad_weight, float32
    assert all(math.isclose(r.net_peak_mb, r.peak_extra_mb - grads_mb) for r in rows)
    assert math.isclose(rows[1].vs_unchunked_net_peak, rows[0].net_peak_mb / rows[1].net_peak_mb)
    assert "x net peak" in bench.format_linear_table(rows)
    with open(tmp_path / "linear.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
