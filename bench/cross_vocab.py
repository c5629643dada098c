"""The losses between two vocabularies on the CPU: kdkernels' fused kernel against TRL's ULDLoss (GOLD), eager and
under torch.compile, and kdkernels' reference, forward + backward, time and peak memory.

    python bench/cross_vocab.py [--methods uld hybrid] [--batch 8 --length 257 --vs 32000 --vt 49152] --out DIR

The batch is ``batch`` examples of ``length`` positions, the first a prompt token and the others answer rows (TRL's
labels), so batch * (length - 1) rows: 8 x 256 = 2048 at the defaults, float32 logits of both models, the teacher
a constant. TRL's ULDLoss sums each example's rows, divides by their number and averages the examples; kdkernels'
batchmean over the same rows (``mask``) is the same number here, which is checked before timing (relative 1e-4).
hybrid: two vocabularies that share 20000 token strings at unrelated ids (TRL's and kdkernels' maps then agree).

Each (method, path) runs in a fresh process: one warm-up step (torch.compile's compile), the peak resident memory
one step adds (kdkernels.bench.peak_rss_bytes: the student's gradient included), then the median time of ``reps``
steps. Writes cross_vocab.csv and cross_vocab.txt into ``--out``.

``--linear [--hidden 1024]``: the fused-linear paths instead (LINEAR_PATHS), from both models' hidden states
[batch, length, H] and head weights [V, H] (float32, the teacher's a constant; the student's hidden states and weight
get gradients): ``linear_cross_vocab_loss`` (backend "cpu"), against both logits materialised then
``cross_vocab_loss`` (backend "cpu") or TRL's ULDLoss; each path's loss is checked against the materialised
``cross_vocab_loss`` first. Writes cross_vocab_linear.csv and .txt.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import kdkernels
from kdkernels.backends.extension import release_cached_gradients
from kdkernels.baselines import gold_config, shared_vocabularies
from kdkernels.bench import peak_rss_bytes

PATHS = ("kdkernels", "trl eager", "trl compiled", "reference")
LINEAR_PATHS = ("kdkernels linear", "kdkernels logits", "trl logits")
SHARED = 20000


def trl_loss_fn(method: str, vocabs, compiled: bool):
    from trl.experimental.gold.gold_trainer import ULDLoss

    uld = ULDLoss(gold_config(uld_use_hybrid_loss=method == "hybrid"), *vocabs)

    def loss(s, t, labels):
        ids = labels.clamp(min=0)
        return uld(s, t, labels, labels, ids, ids)

    return torch.compile(loss) if compiled else loss


def kdkernels_loss_fn(method: str, vocabs, backend: str):
    kwargs = {"vocab_map": kdkernels.vocab_map(*vocabs)} if method == "hybrid" else {}

    def loss(s, t, labels):
        return kdkernels.cross_vocab_loss(method, s, t, mask=labels != -100, backend=backend, **kwargs)

    return loss


def inputs(batch: int, length: int, vs: int, vt: int):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(batch, length, vs, generator=g) * 2).requires_grad_(True)
    t = torch.randn(batch, length, vt, generator=g) * 2 + 5
    labels = torch.ones(batch, length, dtype=torch.long)
    labels[:, 0] = -100  # the prompt token
    return s, t, labels


def measure(method: str, path: str, batch: int, length: int, vs: int, vt: int, reps: int) -> dict:
    """One (method, path) in this process: checked against TRL's eager loss, then peak and median time."""
    torch.manual_seed(0)
    vocabs = shared_vocabularies(vs, vt, SHARED, seed=0)
    s, t, labels = inputs(batch, length, vs, vt)
    if path.startswith("trl"):
        fn = trl_loss_fn(method, vocabs, compiled=path == "trl compiled")
    else:
        fn = kdkernels_loss_fn(method, vocabs, "cpu" if path == "kdkernels" else "reference")

    def step():
        s.grad = None
        loss = fn(s, t, labels)
        loss.backward()
        return loss.detach()

    try:
        value = step().item()
    except Exception as error:  # torch.compile of TRL's loss may not compile: reported, not hidden
        return {"method": method, "path": path, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    if path != "trl eager":
        with torch.no_grad():
            want = trl_loss_fn(method, vocabs, compiled=False)(s, t, labels).item()
        if abs(value - want) > 1e-4 * abs(want):
            raise AssertionError(f"{path} {method}: loss {value} differs from TRL's {want}")
    s.grad = None
    return {"method": method, "path": path, "loss": value, **peak_and_time(step, reps), "grad_mb": _mb(s)}


def peak_and_time(step, reps: int) -> dict:
    """The peak resident memory one ``step()`` adds and the median ms of ``reps`` more."""
    release_cached_gradients()  # (the fused op's freed gradient buffer would otherwise hide its gradient's bytes)
    peak = peak_rss_bytes(step)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "peak_mb": peak / 2**20, "threads": torch.get_num_threads()}


def _mb(*tensors) -> float:
    return sum(x.numel() * x.element_size() for x in tensors) / 2**20


def linear_loss_fn(method: str, vocabs, path: str):
    """The loss of ``path`` (LINEAR_PATHS) from (student hidden, weight, teacher hidden, weight, labels)."""
    if path == "kdkernels linear":
        kwargs = {"vocab_map": kdkernels.vocab_map(*vocabs)} if method == "hybrid" else {}

        def fused(hs, ws, ht, wt, labels):
            return kdkernels.linear_cross_vocab_loss(method, hs, ws, ht, wt, mask=labels != -100, **kwargs)

        return fused
    on_logits = trl_loss_fn(method, vocabs, False) if path == "trl logits" else kdkernels_loss_fn(method, vocabs, "cpu")

    def materialised(hs, ws, ht, wt, labels):
        with torch.no_grad():
            t = ht @ wt.t()
        return on_logits(hs @ ws.t(), t, labels)

    return materialised


def measure_linear(method: str, path: str, batch: int, length: int, hidden: int, vs: int, vt: int, reps: int):
    """One (method, path) of LINEAR_PATHS in this process, as ``measure``."""
    torch.manual_seed(0)
    vocabs = shared_vocabularies(vs, vt, SHARED, seed=0)
    g = torch.Generator().manual_seed(1)
    hs, ht = (torch.randn(batch, length, hidden, generator=g) for _ in range(2))
    ws = (torch.randn(vs, hidden, generator=g) * 0.06).requires_grad_(True)
    hs.requires_grad_(True)
    wt = torch.randn(vt, hidden, generator=g) * 0.06
    labels = torch.ones(batch, length, dtype=torch.long)
    labels[:, 0] = -100  # the prompt token
    fn = linear_loss_fn(method, vocabs, path)

    def step():
        hs.grad = ws.grad = None
        loss = fn(hs, ws, ht, wt, labels)
        loss.backward()
        return loss.detach()

    value = step().item()
    with torch.no_grad():
        want = linear_loss_fn(method, vocabs, "kdkernels logits")(hs, ws, ht, wt, labels).item()
    if abs(value - want) > 1e-4 * abs(want):
        raise AssertionError(f"{path} {method}: loss {value} differs from cross_vocab_loss's {want}")
    hs.grad = ws.grad = None
    return {"method": method, "path": path, "loss": value, **peak_and_time(step, reps), "grad_mb": _mb(hs, ws)}


def format_table(rows: list[dict], base_path: str) -> str:
    lines = [
        f"| method | path | ms (median) | peak MB added | x {base_path} time | x {base_path} peak |",
        "|---|---|---|---|---|---|",
    ]
    fused = {r["method"]: r for r in rows if r["path"] == base_path and "ms" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['path']} | did not run: {r['error'][:120]} | | | |")
            continue
        base = fused.get(r["method"])
        ratio = (f"{r['ms'] / base['ms']:.1f}", f"{r['peak_mb'] / base['peak_mb']:.1f}") if base else ("-", "-")
        lines.append(f"| {r['method']} | {r['path']} | {r['ms']:.0f} | {r['peak_mb']:.0f} | {ratio[0]} | {ratio[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["uld", "hybrid"], choices=["uld", "hybrid"])
    parser.add_argument("--paths", nargs="+", choices=PATHS + LINEAR_PATHS, help="default: every path of the mode")
    parser.add_argument("--linear", action="store_true", help="the fused-linear paths (module docstring)")
    parser.add_argument("--hidden", type=int, default=1024, help="H of both models (--linear)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=257)
    parser.add_argument("--vs", type=int, default=32000)
    parser.add_argument("--vt", type=int, default=49152)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)  # (a child process)
    args = parser.parse_args()
    shape = (args.batch, args.length, args.vs, args.vt)
    if args.one:
        if args.linear:
            print(json.dumps(measure_linear(*args.one, args.batch, args.length, args.hidden, *shape[2:], args.reps)))
        else:
            print(json.dumps(measure(*args.one, *shape, args.reps)))
        return
    paths = args.paths or list(LINEAR_PATHS if args.linear else PATHS)
    rows = []
    for method in args.methods:
        for path in paths:
            child = [sys.executable, __file__, "--one", method, path, *sys.argv[1:]]
            result = subprocess.run(child, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                rows.append({"method": method, "path": path, "error": result.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    name = "cross_vocab_linear" if args.linear else "cross_vocab"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.csv"), "w", newline="") as f:
        fields = ["method", "path", "loss", "ms", "peak_mb", "grad_mb", "threads", "error"]
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    rows_n = args.batch * (args.length - 1)
    header = f"[{rows_n}, {args.vs}] student x [{rows_n}, {args.vt}] teacher, float32, forward + backward\n\n"
    if args.linear:
        header = (
            f"hidden states [{args.batch * args.length}, {args.hidden}] of both models, heads [{args.vs}, "
            f"{args.hidden}] and [{args.vt}, {args.hidden}] ({rows_n} answer rows), float32, forward + backward\n\n"
        )
    with open(os.path.join(args.out, f"{name}.txt"), "w") as f:
        f.write(header + format_table(rows, paths[0]) + "\n")
    print(header + format_table(rows, paths[0]))


if __name__ == "__main__":
    main()
