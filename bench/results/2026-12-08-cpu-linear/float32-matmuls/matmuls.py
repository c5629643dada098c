"""Float32 logits and G @ W matmuls at H = 1024, V = 65536: MKL on a 342-row chunk and on 2048 rows, and
oneDNN's brgemm ukernel on the unpacked weight (brgemm.cpp), at several block sizes (output.txt).
"""

# ruff: noqa: B023  (each lambda runs at once, inside its loop iteration)
import timeit

import torch
from torch.utils.cpp_extension import load

ext = load("brgemm_f32", ["brgemm.cpp"], extra_cflags=["-O3", "-march=native"], verbose=False)
torch.manual_seed(0)
V, H = 65536, 1024
W = torch.randn(V, H) / 32


def t(f):  # ms: the best of 3 calls after a warm-up one
    return 1e3 * min(timeit.repeat(f, number=1, repeat=4)[1:])


for M in [342, 2048]:
    X = torch.randn(M, H)
    ref = X @ W.t()
    XT = X.t().contiguous()
    for bv, bn in [(32, 64), (64, 128), (128, 64), (64, 342)]:
        if bn > M:
            continue
        out = ext.logits_t(W, XT, bv, bn)
        err = (out.t() - ref).abs().max().item()
        plain = t(lambda: ext.logits_t(W, XT, bv, bn))
        transposed = t(lambda: ext.logits_t(W, XT, bv, bn).t().contiguous())
        print(f"M={M} brgemm bv={bv} bn={bn}: {plain:.1f} ms (+T {transposed:.1f}) err {err:.2e}")
    print(f"M={M} mkl X@W.T: {t(lambda: X @ W.t()):.1f} ms")
    G = torch.randn(M, V) / 256
    refg = G @ W
    for bv, bm in [(256, 64), (512, 128)]:
        err = (ext.grad_x(G, W, bv, bm) - refg).abs().max().item()
        print(f"M={M} grad_x brgemm bv={bv} bm={bm}: {t(lambda: ext.grad_x(G, W, bv, bm)):.1f} ms err {err:.2e}")
    print(f"M={M} mkl G@W: {t(lambda: G @ W):.1f} ms")
