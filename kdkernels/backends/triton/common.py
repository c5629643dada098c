"""Triton helpers shared by the two kernel families: tile loads, online logsumexp, launch shapes, grad scaling, the
z-score of the option standardize."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...methods import DIVERGENCE
from ...methods import STANDARDIZE_EPS as _EPS
from ..kernel_call import SCALARS

NEG_INF = tl.constexpr(float("-inf"))
STANDARDIZE_EPS = tl.constexpr(_EPS)
# The log of float32's least normal number: a probability below it underflows, and counts as 0 (docs/losses.md,
# "Conventions"); the kernels compare log-probabilities with it.
LOG_MIN_NORMAL = tl.constexpr(-87.3365447505531)
# The kernels receive the kernel call's float fields as one tuple, `scalars`, in the record's order
# (kernel_call.SCALARS): a helper reads the one it needs at its index here.
TEMPERATURE = tl.constexpr(SCALARS.index("temperature"))
CE_WEIGHT = tl.constexpr(SCALARS.index("ce_weight"))
LABEL_SMOOTHING = tl.constexpr(SCALARS.index("label_smoothing"))
DISTILL_WEIGHT = tl.constexpr(SCALARS.index("distill_weight"))

# Largest tile of a program, in elements ([rows, columns]): a row of up to this many classes is one tile, read once;
# longer rows stream in tiles of this size (docs/losses.md, "Passes"); short rows share a program up to this many
# elements (vision vocabularies). A tile takes one warp per 256 elements, so that each tile-shaped value holds 8
# elements per thread. The divergence family's kernel takes tiles of 4096 (16 warps: at most 128 registers per thread,
# as the SM's 64K registers are shared by 512 threads); the decoupled family's, which keeps more tile-shaped values
# live (its bins), and the full gradient of either (the teacher's gradient, the z-scores' terms) need up to about 250
# registers per thread with 8 elements each: tiles of 2048 (8 warps, at most 255 registers). Larger tiles spill
# registers on sm_90, whatever the warps (tests/test_triton_compile.py).
MAX_TILE = 4096
SMALL_TILE = 2048
TILE_ELEMENTS_PER_WARP = 256
SM_REGISTERS = 65536


def launch_shape(
    family: str, n_rows: int, v: int, full: bool = False, akl: bool = False
) -> tuple[int, int, int, bool, int | None]:
    """(rows per program, column tile, warps, whole row in one tile, most registers per thread or None) of the family's
    kernel on a [n_rows, v] problem, `full` for the full gradient (FULL), `akl` for the divergence code AKL.

    The registers (Triton's maxnreg, ptxas's .maxnreg) of the divergence family are what one program per SM may
    take. Without that cap ptxas chooses a kernel's registers itself and, to fit more programs per SM, may give it
    fewer than it needs and spill the rest: it did so for some divergence codes (to 64 registers with 16 warps, to 80
    or 128 with 8). The decoupled family is left to ptxas (None), which fits two programs per SM of its streamed
    tiles without spilling, where a cap lets it spend up to 160 registers on scheduling (one program per SM), and
    keeps its full gradient further below 255.
    """
    tile = MAX_TILE if family == DIVERGENCE and not full else SMALL_TILE
    block_v = min(triton.next_power_of_2(max(v, 1)), tile)
    single = v <= block_v
    # akl's head search keeps each row's teacher tile and probabilities live through its loops: rows that share a
    # program share at most SMALL_TILE elements, as in the full gradient.
    rows_tile = SMALL_TILE if akl else tile
    block_n = max(1, min(rows_tile // block_v, 16, triton.next_power_of_2(max(n_rows, 1)))) if single else 1
    warps = max(block_n * block_v // TILE_ELEMENTS_PER_WARP, 4)
    maxnreg = min(SM_REGISTERS // (32 * warps), 255) if family == DIVERGENCE else None
    return block_n, block_v, warps, single, maxnreg


@triton.jit
def row_block(
    target_ptr,
    denom_ptr,
    N,
    ignore_index,
    scalars,
    HAS_TARGET: tl.constexpr,
    HAS_DENOM: tl.constexpr,
    T2_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """This program's rows: (indices, in range, indices as int64, target (0 without one), not ignored, the factor
    of the method's gradient: distill_weight, 1/T from the softmax, T^2 if asked, 1/denominator for batchmean (read
    on the device), and the factor of the cross-entropy's: ce_weight / denominator)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    target = tl.zeros([BLOCK_N], tl.int64)
    valid = row_in
    if HAS_TARGET:
        target = tl.load(target_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
        valid = valid & (target != ignore_index)
    inv_denom = tl.zeros([BLOCK_N], tl.float32) + 1.0
    if HAS_DENOM:
        inv_denom = inv_denom / tl.load(denom_ptr)
    return (
        rows,
        row_in,
        rows.to(tl.int64),
        target,
        valid,
        inv_denom * (scalars[DISTILL_WEIGHT] * t2_of(scalars, T2_SCALE) / scalars[TEMPERATURE]),
        inv_denom * scalars[CE_WEIGHT],
    )


@triton.jit
def t2_of(scalars, T2_SCALE: tl.constexpr):
    """The factor of the method's loss: T^2 with T2_SCALE, else 1."""
    t2 = 1.0
    if T2_SCALE:
        t2 = scalars[TEMPERATURE] * scalars[TEMPERATURE]
    return t2


@triton.jit
def target_logit(s_ptr, rows64, s_stride, target, ok, V, scalars, BLOCK_V: tl.constexpr):
    """Per row, what the hard-label term (docs/losses.md, "The hard-label term") reads of the raw student row before
    an in-place gradient replaces it: (the target's logit, or with label smoothing (1 - eps) s_target + eps * (the
    mean of the unmasked s); eps / K, K the unmasked classes' count). 0 where not ok or out of range: never read."""
    in_range = ok & (target >= 0) & (target < V)
    s_y = tl.load(s_ptr + rows64 * s_stride + tl.where(in_range, target, 0), mask=in_range, other=0.0).to(tl.float32)
    share = tl.zeros_like(s_y)
    label_smoothing = scalars[LABEL_SMOOTHING]
    if label_smoothing > 0:
        count = tl.zeros_like(s_y)
        total = tl.zeros_like(s_y)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = ok[:, None] & (cols < V)[None, :]
            s = tl.load(s_ptr + rows64[:, None] * s_stride + cols[None, :], mask=mask, other=NEG_INF).to(tl.float32)
            count += tl.sum((s != NEG_INF).to(tl.float32), axis=1)
            total += tl.sum(tl.where(s != NEG_INF, s, 0.0), axis=1)
        count = tl.maximum(count, 1.0)  # (a row without an unmasked class is not kept)
        s_y = (1.0 - label_smoothing) * s_y + label_smoothing * (total / count)
        share = label_smoothing / count
    return s_y, share


@triton.jit
def ce_grad(s, cols, target, m1, lz1, ce_scale, scalars, share):
    """The hard-label term's gradient on a tile of raw logits s: ce_scale (softmax(s)_j - (1 - eps) [j = target]
    - eps / K [s_j unmasked]), share = eps / K (target_logit). The kernels add it only with CE_GRAD: ce_weight = 0
    leaves it out, whatever the logits."""
    onehot = (cols[None, :] == target[:, None]).to(tl.float32) * (1.0 - scalars[LABEL_SMOOTHING])
    unmasked = tl.where(s != NEG_INF, share[:, None], 0.0)
    return (tl.exp(s - m1[:, None] - lz1[:, None]) - onehot - unmasked) * ce_scale[:, None]


@triton.jit
def distilled(g, DISTILL_GRAD: tl.constexpr):
    """The method's gradient tile g, or 0 without DISTILL_GRAD (distill_weight = 0: the term adds exactly 0, whatever
    g holds, inf or NaN; a switch, so that the usual launches pay nothing for it)."""
    if not DISTILL_GRAD:
        g = tl.zeros_like(g)
    return g


@triton.jit
def weighted(weight, term):
    """weight * term, exactly 0 where the weight is 0: a term of weight 0 adds nothing, infinite or not."""
    return tl.where(weight == 0.0, 0.0, weight * term)


@triton.jit
def nan_max(a, b):
    """max(a, b), NaN where either is NaN (tl.maximum drops a NaN: a row whose other logits are all -inf would read as
    masked in both logits, its NaN hidden)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_max(x):
    """Per row, the max of a tile, NaN if it holds a NaN (tl.max drops NaN). Two built-in reductions rather than
    tl.reduce with nan_max, which Triton's interpreter runs element by element in Python (the tests' time)."""
    has_nan = tl.sum((x != x).to(tl.int32), axis=1) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, axis=1))


@triton.jit
def load_raw(ptr, rows64, row_stride, row_ok, cols, V):
    """Tile [BLOCK_N, BLOCK_V] of logits in float32; columns past V and rows not ok read as -inf."""
    mask = row_ok[:, None] & (cols[None, :] < V)
    return tl.load(ptr + rows64[:, None] * row_stride + cols[None, :], mask=mask, other=NEG_INF).to(tl.float32)


@triton.jit
def scaled(v, shift, tau):
    """(v - shift) / tau per row: the family's x = s / T (shift 0, tau T: exactly s / T), or with standardize
    z / T = (s - mean) / (sd T)."""
    return (v - shift[:, None]) / tau[:, None]


@triton.jit
def load_scaled(ptr, rows64, row_stride, row_ok, cols, V, shift, tau):
    """The tile of load_raw, scaled."""
    return scaled(load_raw(ptr, rows64, row_stride, row_ok, cols, V), shift, tau)


@triton.jit
def row_zscore(
    ptr,
    rows64,
    row_stride,
    row_ok,
    V,
    temperature,
    STANDARDIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row (mean, sd, std, n, tau) of the z-score of the option standardize (docs/losses.md, "Logit
    standardization"): the classes that are not -inf, each tile's moments merged by Chan's formula; tau = sd T.
    Without STANDARDIZE: (0, 1, 0, 0, T), so that scaled() gives s / T."""
    zero = tl.zeros([BLOCK_N], tl.float32)
    n, mean, m2 = zero, zero, zero
    if STANDARDIZE:
        cols0 = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            v = load_raw(ptr, rows64, row_stride, row_ok, start + cols0, V)
            finite = v != NEG_INF
            count = tl.sum(finite.to(tl.float32), axis=1)
            tile_mean = tl.sum(tl.where(finite, v, 0.0), axis=1) / tl.maximum(count, 1.0)
            d = tl.where(finite, v - tile_mean[:, None], 0.0)
            # The deviations' own mean corrects the rounded tile mean (a constant row gets std 0 exactly).
            shift = tl.sum(d, axis=1) / tl.maximum(count, 1.0)
            tile_mean = tile_mean + shift
            tile_m2 = tl.maximum(tl.sum(d * d, axis=1) - count * shift * shift, 0.0)
            total = n + count
            share = count / tl.maximum(total, 1.0)
            delta = tile_mean - mean
            mean = mean + delta * share
            m2 = m2 + tile_m2 + delta * delta * n * share
            n = total
    std = tl.where(n > 1.0, tl.sqrt(m2 / tl.maximum(n - 1.0, 1.0)), 0.0)
    sd = zero + 1.0
    if STANDARDIZE:
        sd = std + STANDARDIZE_EPS
    return mean, sd, std, n, sd * temperature


@triton.jit
def zscore_sums(g, s, mean, sd):
    """A tile's (sum G, sum G z) over the unmasked classes, G = dL/dz the family's gradient, s the raw logits."""
    finite = s != NEG_INF
    z = (s - mean[:, None]) / sd[:, None]
    return tl.sum(tl.where(finite, g, 0.0), axis=1), tl.sum(tl.where(finite, g * z, 0.0), axis=1)


@triton.jit
def zscore_jacobian(sum_g, sum_gz, std, n):
    """(mean of G, coef) of the z-score's Jacobian from the row sums of zscore_sums (docs/losses.md)."""
    return sum_g / n, tl.where(std > 0.0, sum_gz / ((n - 1.0) * std), 0.0)


@triton.jit
def unstandardize(g, s, mean, sd, mean_g, coef, STANDARDIZE: tl.constexpr):
    """dL/ds from the family's gradient g = dL/dz of a tile of raw student logits s: (g - mean_g) / sd - z coef, 0 on
    masked classes; g itself without STANDARDIZE."""
    if STANDARDIZE:
        z = (s - mean[:, None]) / sd[:, None]
        g = tl.where(s == NEG_INF, 0.0, (g - mean_g[:, None]) / sd[:, None] - z * coef[:, None])
    return g


@triton.jit
def temperature_terms(x, mx, g, y, my, gt):
    """A tile's part of -d loss / d T before the T^2 term (the full gradient; docs/losses.md): sum_j (x_j - mx) g_j +
    (y_j - my) gt_j, g and gt the student's and teacher's gradients before the z-score's Jacobian, mx and my the
    rows' maxes; masked classes add 0."""
    return tl.sum(
        tl.where(x == NEG_INF, 0.0, (x - safe_max(mx)[:, None]) * g)
        + tl.where(y == NEG_INF, 0.0, (y - safe_max(my)[:, None]) * gt),
        axis=1,
    )


@triton.jit
def store_teacher_tile(
    gt_ptr, rows64, g_stride, row_in, cols, V, gt, t, mean_t, sd_t, std_t, n_t, kept, STANDARDIZE: tl.constexpr
):
    """Stores the teacher's gradient of a row that is one tile (through the teacher's z-score with STANDARDIZE; 0 on
    rows not kept: pass those whose gradient is 0 by distill_weight = 0 as not kept)."""
    mean_gt, coef_t = n_t, n_t
    if STANDARDIZE:
        sum_gt, sum_gtz = zscore_sums(gt, t, mean_t, sd_t)
        mean_gt, coef_t = zscore_jacobian(sum_gt, sum_gtz, std_t, n_t)
    gt = unstandardize(gt, t, mean_t, sd_t, mean_gt, coef_t, STANDARDIZE)
    store_rows(gt_ptr, rows64, g_stride, row_in, cols, V, tl.where(kept[:, None], gt, 0.0))


@triton.jit
def store_rows(ptr, rows64, row_stride, row_ok, cols, V, value):
    """Stores a float32 tile in ptr's dtype. bfloat16 is rounded to nearest-even by hand: Triton's interpreter
    truncates that cast, which would make CPU-tested gradients a rounding step worse than the GPU's."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = value.to(ptr.dtype.element_ty)
    mask = row_ok[:, None] & (cols[None, :] < V)
    tl.store(ptr + rows64[:, None] * row_stride + cols[None, :], out, mask=mask)


@triton.jit
def safe_max(m):
    """The running max with -inf replaced by 0, so exp(x - m) of an all -inf row is 0, never NaN."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def online_lse(m, z, x):
    """Per row: running max m and z = sum exp(x - m), updated with tile x (rescaling z when the max grows)."""
    m_new = nan_max(m, row_max(x))
    shift = safe_max(m_new)
    z = z * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return m_new, z


@triton.jit
def log_softmax_tile(x, m, log_z):
    """log softmax of a tile from its row's max and log-sum: (x - m) - log z, exact for large logits."""
    return (x - m[:, None]) - log_z[:, None]


@triton.jit
def logaddexp(u, v):
    mx = tl.maximum(u, v)
    shift = safe_max(mx)
    return shift + tl.log(tl.exp(u - shift) + tl.exp(v - shift))


@triton.jit
def scale_rows_kernel(grad_ptr, factor_ptr, V, row_stride, PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr):
    # grad[r, :] *= factor[r] (or the scalar factor), in place. A factor of exactly 1 (loss.backward() on a
    # reduced loss) leaves the tile untouched: no read, no write, and no host sync to find that out.
    row = tl.program_id(0)
    rows64 = row.to(tl.int64) + tl.zeros([1], tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    f = tl.load(factor_ptr + row) if PER_ROW else tl.load(factor_ptr)
    if f != 1.0:
        mask = cols[None, :] < V
        g = tl.load(grad_ptr + rows64[:, None] * row_stride + cols[None, :], mask=mask)
        store_rows(grad_ptr, rows64, row_stride, rows64 >= 0, cols, V, g.to(tl.float32) * f)


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad [N, V] *= factor (0-d, or [N] per row), skipping rows whose factor is exactly 1."""
    n, v = grad.shape
    if n == 0 or v == 0:
        return
    factor = factor.to(torch.float32).contiguous()
    block_v = min(triton.next_power_of_2(v), 4096)
    scale_rows_kernel[(n, triton.cdiv(v, block_v))](
        grad, factor, v, grad.stride(0), PER_ROW=factor.dim() == 1, BLOCK_V=block_v, num_warps=4
    )
