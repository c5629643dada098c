"""Before-vs-after akl differential: per-row losses and gradients (student's, and teacher's where it requires grad) of
the CPU kernel on stress inputs, saved to a file (run once per build, then compare bitwise with `compare`).

    python differential.py OUT.pt            # once under each checkout (PYTHONPATH=<checkout>)
    python differential.py --compare A.pt B.pt
"""

import sys

import torch

import kdkernels

out = {}


def run(name, s, t, mu, temperature=1.0, teacher_grad=False, target=None):
    """Stores the loss rows and the gradients of a weighted sum of them (the teacher's when teacher_grad)."""
    inputs = [s.clone().requires_grad_(True), t.clone().requires_grad_(teacher_grad)]
    loss = kdkernels.akl_loss(*inputs, target, mu=mu, reduction="none", backend="cpu", temperature=temperature)
    weights = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weights).sum(), [x for x in inputs if x.requires_grad])
    out[name] = (loss.detach(), *grads)


def cases():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for v in (37, 1000, 4099, 32000):
            n = 24 if v < 32000 else 8
            s = (torch.randn(n, v) * 3).to(dtype)
            for scale in (0.01, 0.3, 3.0, 10.0, 40.0):
                t = (torch.randn(n, v) * scale).to(dtype)
                for mu in (1e-6, 0.05, 0.5, 0.95, 0.999999):
                    run(f"rand-{dtype}-{v}-{scale}-{mu}", s, t, mu)
                run(f"rand-tgrad-{dtype}-{v}-{scale}", s, t, 0.5, teacher_grad=dtype != torch.bfloat16)
                run(f"rand-T2-{dtype}-{v}-{scale}", s, t, 0.3, temperature=2.0)
            t = (torch.randn(n, v) * 3).to(dtype)
            masked = t.masked_fill(torch.rand(n, v) < 0.3, float("-inf"))
            masked[0] = float("-inf")
            masked[1, 1:] = float("-inf")
            run(f"masked-{dtype}-{v}", s, masked, 0.5)
            run(f"masked-student-{dtype}-{v}", s.masked_fill(torch.rand(n, v) < 0.3, float("-inf")), t, 0.5)
            run(f"offset-{dtype}-{v}", s + 1000, t - 1000, 0.5)
            run(f"bf16-{dtype}-{v}", s, (t * 0.2).to(torch.bfloat16).to(dtype), 0.5, temperature=2.0)
            run(f"ce-{dtype}-{v}", s, t, 0.5, target=torch.randint(0, v, (n,)))
            ints = torch.randint(-3, 4, (n, v)).to(dtype)
            ints[torch.rand(n, v) < 0.2] = -0.0
            for mu in (0.1, 0.4, 0.77):
                run(f"ints-{dtype}-{v}-{mu}", s, ints, mu)
            if dtype == torch.bfloat16:
                continue
            # mu on a cumulative mass: rows permuting one row's logits, mu = cumsums of its sorted p
            base = torch.randn(v, dtype=dtype) * 2
            rows = torch.stack([base[torch.randperm(v, generator=g)] for _ in range(n)])
            p = torch.softmax(base, -1).sort(descending=True).values
            for k in (1, 3, v // 10, v // 3):
                for order in (p, p.flip(0)):
                    c = order.cumsum(0)[k] if order is p else p[: k + 1].flip(0).cumsum(0)[-1]
                    for mu in (c, torch.nextafter(c, c + 1), torch.nextafter(c, c - 1)):
                        mu = float(mu)
                        if 0 < mu < 1:
                            run(f"boundary-{dtype}-{v}-{k}-{order is p}-{mu!r}", s, rows, mu)


def same_bits(x, y):
    if x is None or y is None:
        return x is None and y is None
    return x.dtype == y.dtype and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def compare(a_path, b_path):
    a, b = torch.load(a_path), torch.load(b_path)
    assert a.keys() == b.keys(), "different cases"
    differing = [k for k in a if not all(same_bits(x, y) for x, y in zip(a[k], b[k]))]
    print(len(a), "cases,", len(differing), "differing outputs:", differing[:10])


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        cases()
        torch.save(out, sys.argv[1])
        print(len(out), "cases")
