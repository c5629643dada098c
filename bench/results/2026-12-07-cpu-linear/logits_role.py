"""The logits role S = X W^T of fused-linear's chunks (N = 2048, H = 1024, V = 65536 float32, chunks of m rows)
through MKL's GEMM as the chunks call it (A), MKL's packed weight (D: cblas_sgemm_pack once, cblas_sgemm_compute
per chunk, through ctypes), a weight with a padded row stride (E) and oneDNN's linear (F), against one call over
all rows; in rounds. python logits_role.py [m] [rounds]
"""

import ctypes
import os
import statistics
import sys
import time

import torch

torch.manual_seed(0)
n, h, v = 2048, 1024, 65536
m = int(sys.argv[1]) if len(sys.argv) > 1 else 342
w = torch.randn(v, h) / h**0.5
x = torch.randn(n, h)
out_full = torch.empty(n, v)
out = torch.empty(m, v)
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
lib.cblas_sgemm_pack_get_size.argtypes = [i, i, i, i]
lib.cblas_sgemm_pack.argtypes = [i, i, i, i, i, i, f, p, i, p]
lib.cblas_sgemm_compute.argtypes = [i, i, i, i, i, i, p, i, p, i, f, p, i]
RM, NT, T, PACKED, AM, BM = 101, 111, 112, 151, 161, 162
# B = W^T [K=h, N=v], given as W row-major => trans
size = lib.cblas_sgemm_pack_get_size(BM, m, v, h)
print("pack size MiB", size / 2**20)


def pack():
    buf = torch.empty(size // 4 + 16)
    lib.cblas_sgemm_pack(RM, BM, T, m, v, h, 1.0, w.data_ptr(), h, buf.data_ptr())
    return buf


packed = pack()


def compute(xs):
    o = out[: len(xs)]
    lib.cblas_sgemm_compute(RM, NT, PACKED, len(xs), v, h, xs.data_ptr(), h, packed.data_ptr(), h, 0.0, o.data_ptr(), v)


compute(x[:m])
ref = x[:m] @ w.t()
print("max err", (out - ref).abs().max().item())
wpad = torch.empty(v, h + 16)[:, :h]
wpad.copy_(w)


def over(fn):
    def run():
        for s in range(0, n, m):
            fn(x[s : s + m])

    return run


lin = torch.ops.mkldnn._linear_pointwise
cases = {
    "full m=2048 mm(x, w.t())": lambda: torch.mm(x, w.t(), out=out_full),
    f"A mm(x, w.t()) m={m}": over(lambda xs: torch.mm(xs, w.t(), out=out[: len(xs)])),
    "D packed compute": over(compute),
    "D pack once": pack,
    "E padded stride": over(lambda xs: torch.mm(xs, wpad.t(), out=out[: len(xs)])),
    "F onednn linear": over(lambda xs: lin(xs, w, None, "none", [], "")),
}
for fn in cases.values():
    fn()
times = {k: [] for k in cases}
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
    for k, fn in cases.items():
        t = time.perf_counter()
        fn()
        times[k].append((time.perf_counter() - t) * 1e3)
for k, t in times.items():
    print(f"{k:40s} {statistics.median(t):8.0f} {min(t):8.0f}-{max(t):.0f}")
