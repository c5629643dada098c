"""What a chunk of fused-linear costs on the CPU's GEMMs: each matmul of a [V, H] head, run over N rows in chunks of
m rows, against one call on all N rows.

Per chunk, fused-linear runs three GEMMs that read the whole weight (the student's and the teacher's logits
hidden @ W.T, and grad_hidden = G @ W) and one that updates the whole float32 grad_weight accumulator
(acc += G.T @ hidden). A BLAS call packs (copies into its blocked layout) the weight again every time, so the time
of N rows grows with N / m. This script times each role over N rows at several m, in rounds (each variant once per
round, to share the machine's load), with the outputs written into buffers allocated once (as fused-linear does).
It also times the S role through what PyTorch offers besides MKL's plain GEMM: MKL's prepacked weight
(torch.ops.mkl._mkl_linear, packed once; its size printed) and oneDNN with the weight as the source operand
(torch.ops.mkldnn._linear_pointwise(W, X), which writes S.T) plus the transposing copy the loss's row layout needs.

    python matmul_chunks.py float32 [rounds]     # H = 1024, V = 65536, N = 2048
    python matmul_chunks.py bfloat16 [rounds]    # H = 2048, V = 128256, N = 1024 (oneDNN GEMMs; grad_weight by MKL)
"""

import statistics
import sys
import time

import torch

from kdkernels.linear import _mkl_gemm


def rounds_ms(cases: dict, rounds: int) -> dict:
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def over(n: int, m: int, fn):
    def run():
        for start in range(0, n, m):
            fn(slice(start, start + m))

    return run


def main(dtype_name: str, rounds: int) -> None:
    dtype = getattr(torch, dtype_name)
    n, h, v = (2048, 1024, 65536) if dtype == torch.float32 else (1024, 2048, 128256)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    x = torch.randn(n, h, generator=g).to(dtype)
    grad = (torch.randn(n, v, generator=g) * 1e-3).to(dtype)
    acc = torch.zeros(v, h)
    chunks = (n, n // 2, n // 4, n // 8) if dtype == torch.float32 else (n, n // 4, n // 8)
    cases = {}
    for m in chunks:
        logits = torch.empty(m, v, dtype=dtype)
        grad_hidden = torch.empty(n, h, dtype=dtype)
        cases[f"S = X W^T    m={m}"] = over(n, m, lambda r, out=logits: torch.mm(x[r], w.t(), out=out[: len(x[r])]))
        cases[f"dX = G W     m={m}"] = over(n, m, lambda r, out=grad_hidden: torch.mm(grad[r], w, out=out[r]))
        if dtype == torch.float32:
            cases[f"dW += G^T X  m={m}"] = over(n, m, lambda r: acc.addmm_(grad[r].t(), x[r]))
        else:
            cases[f"dW += G^T X  m={m} (MKL bf16->f32)"] = over(
                n, m, lambda r: _mkl_gemm(dtype)(acc, grad[r].t(), x[r], 1.0)
            )
    if dtype == torch.float32:
        m = n // 8
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        print(
            f"MKL prepacked weight: {packed.numel() * packed.element_size() / 2**20:.0f} MiB (the weight: "
            f"{w.numel() * w.element_size() / 2**20:.0f} MiB)"
        )
        cases[f"S prepacked  m={m}"] = over(n, m, lambda r: torch.ops.mkl._mkl_linear(x[r], packed, w, None, m))
        cases["pack the weight (once)"] = lambda: torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        rows = torch.empty(m, v)
        linear = torch.ops.mkldnn._linear_pointwise
        cases[f"S^T oneDNN   m={m}"] = over(n, m, lambda r: linear(w, x[r], None, "none", [], ""))
        cases[f"S^T oneDNN + transpose m={m}"] = over(
            n, m, lambda r: rows.copy_(linear(w, x[r], None, "none", [], "").t())
        )
    times = rounds_ms(cases, rounds)
    print(f"{dtype_name}: N = {n}, H = {h}, V = {v}; ms over N rows, median [fastest-slowest] of {rounds} rounds")
    for name, t in times.items():
        print(f"  {name:40s} {statistics.median(t):8.0f}  [{min(t):.0f}-{max(t):.0f}]")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
