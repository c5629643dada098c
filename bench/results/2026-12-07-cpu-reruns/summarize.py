"""Per (shape, method): the fused CPU kernel's x torch.compile and time / byte floor in each run*.csv, and medians."""

import csv
import glob
import os
import statistics
from collections import defaultdict

here = os.path.dirname(os.path.abspath(__file__))
vals = defaultdict(list)
for path in sorted(glob.glob(os.path.join(here, "run*.csv"))):
    for r in csv.DictReader(open(path)):
        if r["backend"] == "cpu":
            vals[(r["shape"], r["method"])].append((float(r["vs_compile"]), float(r["ms"]) / float(r["floor_ms"])))
for (shape, method), v in sorted(vals.items()):
    c, f = [x[0] for x in v], [x[1] for x in v]
    print(
        f"{shape:13s} {method:9s} x compile {' '.join(f'{x:.2f}' for x in c)} (median {statistics.median(c):.2f})"
        f"   / floor {' '.join(f'{x:.2f}' for x in f)} (median {statistics.median(f):.2f})"
    )
