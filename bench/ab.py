"""Before/after comparison of two checkouts with `python -m kdkernels bench`, in alternating rounds on one machine.

    python bench/ab.py BEFORE_DIR AFTER_DIR --out OUT [--rounds 3] -- --device cpu --backends cpu --shapes call

Each checkout must have its extension built in place (`python setup.py build_ext --inplace`); both run under this
interpreter with their own directory first on PYTHONPATH. Rounds alternate (before, after, before, ...) so that a
change in the machine's load reaches both sides alike. OUT gets each run's bench.csv (OUT/before-1/, ...) and
ab.csv: per shape, method and backend, the median time of each side over the rounds and their ratio (after /
before), with the spread (max / min) of each side's rounds to judge the noise. On a host that other jobs load, the
two threads' times snap to multiples of the scheduler's tick (their parallel loops wait on each other): compare with
OMP_NUM_THREADS=1 there (the environment reaches both sides).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys


def run(checkout: str, out: str, bench_args: list[str]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    cmd = [sys.executable, "-m", "kdkernels", "bench", "--no-progress", "--out", out, *bench_args]
    subprocess.run(cmd, env=env, check=True, cwd=checkout, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "bench.csv")) as f:
        return list(csv.DictReader(f))


def summarise(times: dict, path: str) -> list[list]:
    """Writes ab.csv from times[(shape, method, backend)] = {"before": [ms ...], "after": [ms ...]}."""
    rows = []
    for (shape, method, backend), sides in sorted(times.items()):
        before, after = (statistics.median(sides[s]) for s in ("before", "after"))
        spread = [max(sides[s]) / min(sides[s]) for s in ("before", "after")]
        rows.append([shape, method, backend, before, after, after / before, *spread])
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["shape", "method", "backend", "before_ms", "after_ms", "ratio", "before_spread", "after_spread"])
        out.writerows([*r[:3], *(f"{x:.4g}" for x in r[3:])] for r in rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args, bench_args = parser.parse_known_args()
    bench_args = [a for a in bench_args if a != "--"]
    times: dict = {}
    for r in range(1, args.rounds + 1):
        for side in ("before", "after"):
            out = os.path.abspath(os.path.join(args.out, f"{side}-{r}"))
            for row in run(getattr(args, side), out, bench_args):
                key = (row["shape"], row["method"], row["backend"])
                times.setdefault(key, {"before": [], "after": []})[side].append(float(row["ms"]))
    rows = summarise(times, os.path.join(args.out, "ab.csv"))
    ratios = [r[5] for r in rows]
    print(
        f"{len(rows)} timings; ratio after/before: median {statistics.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
