"""The fused-linear section's measurement (kdkernels.bench.linear_measure: peak RSS added by a step after a warm-up
one, then timed steps), for the jsd case only, each (shape, path) in a fresh process, printed as JSON lines:

    python jsd_paths.py SHAPES PATHS [REPS]      # e.g. head-64k-8k-rows unchunked,fused-linear,liger 1

SHAPES and PATHS are comma-separated names of kdkernels.bench.LINEAR_CPU_SHAPES and its paths. Run from the checkout
whose kdkernels is to be measured (the current directory comes first on the import path).
"""

import json
import subprocess
import sys
import time

from kdkernels.bench import LINEAR_CPU_SHAPES


def main(shapes: str, paths: str, reps: int = 1) -> None:
    for shape in shapes.split(","):
        n, h, v, dtype = LINEAR_CPU_SHAPES[shape]
        name = str(dtype).replace("torch.", "")
        for path in paths.split(","):
            code = (
                "import json; from kdkernels.bench import linear_measure; print(json.dumps(linear_measure("
                f"{n}, {h}, {v}, {name!r}, 'jsd', {path!r}, 'cpu', {reps})))"
            )
            start = time.time()
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{shape} {path} failed:\n{done.stderr[-3000:]}")
            row = {"shape": shape, "path": path, "n": n, "h": h, "v": v, "dtype": name, "start": start}
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            row["grads_mb"] = (n + v) * h * dtype.itemsize / 2**20
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
