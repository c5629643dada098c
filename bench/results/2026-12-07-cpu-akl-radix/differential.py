"""Old-vs-new akl head differential: per-row losses and gradients of the CPU kernel on stress inputs, saved to a file
(run once per build, then compare bitwise)."""

import sys

import torch

import kdkernels

torch.manual_seed(0)
out = {}


def run(name, s, t, mu, temperature=1.0):
    s = s.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(t.dtype in (torch.float32, torch.float64))
    loss = kdkernels.akl_loss(s, tt, None, mu=mu, reduction="none", backend="cpu", temperature=temperature)
    w = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * w).sum().backward()
    out[name] = (loss.detach(), s.grad, tt.grad)


def permuted_rows(row, n, g):
    return torch.stack([row[torch.randperm(row.numel(), generator=g)] for _ in range(n)])


g = torch.Generator().manual_seed(1)
for dtype in (torch.float32, torch.float64):
    for v in (37, 1000, 4099, 32000):
        n = 48 if v < 32000 else 16
        s = torch.randn(n, v, dtype=dtype) * 3
        for scale in (0.3, 3.0, 10.0):
            t = torch.randn(n, v, dtype=dtype) * scale
            for mu in (0.05, 0.5, 0.95):
                run(f"rand-{dtype}-{v}-{scale}-{mu}", s, t, mu)
        t = torch.randn(n, v, dtype=dtype) * 3
        masked = t.masked_fill(torch.rand(n, v) < 0.3, float("-inf"))
        masked[0] = float("-inf")
        run(f"masked-{dtype}-{v}", s, masked, 0.5)
        run(f"bf16-{dtype}-{v}", s, (t * 0.2).to(torch.bfloat16).to(dtype), 0.5, temperature=2.0)
        ints = torch.randint(-3, 4, (n, v)).to(dtype)
        ints[torch.rand(n, v) < 0.2] = -0.0
        for mu in (0.1, 0.4, 0.77):
            run(f"ints-{dtype}-{v}-{mu}", s, ints, mu)
        # mu on a cumulative mass: rows permuting one row's logits, mu = float32 / float64 cumsums of its sorted p
        base = torch.randn(v, dtype=dtype) * 2
        rows = permuted_rows(base, n, g)
        p = torch.softmax(base, -1).sort(descending=True).values
        for k in (1, 3, v // 10, v // 3):
            for which, order in enumerate((p, p.flip(0))):
                c = order.cumsum(0)[k] if order is p else p[: k + 1].flip(0).cumsum(0)[-1]
                for mu in (c, torch.nextafter(c, c + 1), torch.nextafter(c, c - 1)):
                    mu = float(mu)
                    if 0 < mu < 1:
                        run(f"boundary-{dtype}-{v}-{k}-{which}-{mu!r}", s[:n], rows, mu)
torch.save(out, sys.argv[1])
print(len(out), "cases")
