"""The weight gradient's product of a 274-row bf16 chunk through oneDNN's brgemm ukernel (brgemm.cpp) into
float32 (output.txt).
"""

# ruff: noqa: B023  (each lambda runs at once, inside its loop iteration)
import timeit

import torch
from torch.utils.cpp_extension import load

ext = load("brgemm_bf16", ["brgemm.cpp"], extra_cflags=["-O3"], verbose=False)
print("could_pack bf16:", ext.could())
torch.manual_seed(0)
V, H, K = 128256, 2048, 274
G = (torch.randn(K, V) / 100).bfloat16()
X = torch.randn(K, H).bfloat16()
Gt = G.t().contiguous()


def t(f):  # ms: the best of 3 calls after a warm-up one
    return 1e3 * min(timeit.repeat(f, number=1, repeat=4)[1:])


ref = Gt[:2048].double() @ X.double()
for bv, bn in [(32, 64), (64, 256), (128, 512)]:
    out = ext.gradw(Gt, X, bv, bn)
    err = (out[:2048].double() - ref).abs().max().item()
    ms = t(lambda: ext.gradw(Gt, X, bv, bn))
    print(f"brgemm bv={bv} bn={bn}: {ms:.0f} ms err {err:.2e} (max {ref.abs().max().item():.2e})")
print(f"transpose G: {t(lambda: G.t().contiguous()):.0f} ms")
