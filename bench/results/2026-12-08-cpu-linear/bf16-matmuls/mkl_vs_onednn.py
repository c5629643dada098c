"""A 274-row bf16 chunk's matmuls at H = 2048, V = 128256: oneDNN's (torch.mm, bf16 output) against MKL's
cblas_gemm_bf16bf16f32 (float32 output), and the weight gradient's product in vocabulary slices (output.txt).
"""

# ruff: noqa: B023  (each lambda runs at once, inside its loop iteration)
import timeit

import torch

from kdkernels.linear import _mkl_gemm

torch.manual_seed(0)
V, H = 128256, 2048
W = (torch.randn(V, H) / 45).bfloat16()
gemm = _mkl_gemm(torch.bfloat16)


def t(f):  # ms: the best of 3 calls after a warm-up one
    return 1e3 * min(timeit.repeat(f, number=1, repeat=4)[1:])


for M in [274, 1024]:
    X = torch.randn(M, H).bfloat16()
    low = torch.empty(M, V, dtype=torch.bfloat16)
    out = torch.empty(M, V)
    print(f"M={M} logits torch.mm bf16->bf16 + copy f32: {t(lambda: out.copy_(torch.mm(X, W.t(), out=low))):.0f} ms")
    print(f"M={M} logits mkl bf16->f32: {t(lambda: gemm(out, X, W.t(), 0.0)):.0f} ms")
    G = torch.randn(M, V).bfloat16() / 100
    hx = torch.empty(M, H, dtype=torch.bfloat16)
    hxf = torch.empty(M, H)
    print(f"M={M} grad_x torch.mm: {t(lambda: torch.mm(G, W, out=hx)):.0f} ms")
    print(f"M={M} grad_x mkl f32 out: {t(lambda: gemm(hxf, G, W, 0.0)):.0f} ms")
    acc = torch.zeros(V, H)
    print(f"M={M} grad_W mkl full beta=1: {t(lambda: gemm(acc, G.t(), X, 1.0)):.0f} ms")
    part = torch.empty(1024, H)

    def sl(rows):
        p = torch.empty(rows, H)

        def f():
            for s in range(0, V, rows):
                e = min(s + rows, V)
                gemm(p[: e - s], G.t()[s:e], X, 0.0)

        return f

    for rows in (1024, 8192):
        print(f"M={M} grad_W mkl slices {rows}: {t(sl(rows)):.0f} ms")
    print(f"M={M} unchunked-equivalent per-row logits rate check: full M=4096 skipped")
