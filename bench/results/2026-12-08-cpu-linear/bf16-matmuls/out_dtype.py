"""Whether torch.mm has a bf16 x bf16 -> float32 kernel on CPU (out_dtype), and the product's time in bf16 and in
float32 (output.txt).
"""

# ruff: noqa: B023  (each lambda runs at once, inside its loop iteration)
import timeit

import torch

torch.manual_seed(0)
V, H, M = 128256, 2048, 274
X = torch.randn(M, H).bfloat16()
G = (torch.randn(M, V) / 100).bfloat16()


def t(f):  # ms: the best of 3 calls after a warm-up one
    return 1e3 * min(timeit.repeat(f, number=1, repeat=4)[1:])


try:
    out = torch.mm(G.t()[:1024], X, out_dtype=torch.float32)
    ref = G.t()[:1024].double() @ X.double()
    print("out_dtype ok", out.dtype, (out.double() - ref).abs().max().item(), ref.abs().max().item())
    print(f"mm out_dtype f32 full: {t(lambda: torch.mm(G.t(), X, out_dtype=torch.float32)):.0f} ms")
    part = torch.empty(8192, H)

    def f():
        for s in range(0, V, 8192):
            e = min(s + 8192, V)
            torch.mm(G.t()[s:e], X, out_dtype=torch.float32, out=part[: e - s])

    print(f"mm out_dtype f32 slices 8192: {t(f):.0f} ms")
except Exception as e:
    print("no out_dtype:", type(e).__name__, str(e)[:300])
print(f"mm bf16 full: {t(lambda: torch.mm(G.t(), X)):.0f} ms")
print(f"mm f32 (upcast) full: {t(lambda: torch.mm(G.t().float(), X.float())):.0f} ms")
