"""Vocabulary-parallel losses (kdkernels.parallel) with 2 and 4 gloo processes on CPU, against the single process.

Each world size is one spawn (a process start costs seconds): every rank runs every scenario below on its shard of
the same full inputs and saves its loss and gradient shard, or the error it raised. The parent then checks, per
scenario, that every rank returned the same loss, equal to kdkernels.distill_loss on the full logits, and that the
ranks' gradient shards put together equal the single-process gradient (or that the error is the single-process one).
"""

from __future__ import annotations

import datetime
import inspect
import os
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import CASES, case_id
from helpers import assert_close, make_inputs, run_loss
from oracle import oracle

import kdkernels
import kdkernels.parallel as parallel
from kdkernels.methods import finite_when_missing

V = 37
# Shard sizes per world size: unequal, and on 4 ranks one shard (3 classes) smaller than the top-k's k.
SPLITS = {2: (20, 17), 4: (12, 3, 15, 7)}
WORLD_SIZES = tuple(SPLITS)
MASKED = (0, 12, 13, 14, 36)  # -inf in both logits: on 4 ranks, the whole shard of rank 1
TEACHER_MASKED = (13, 30)
NON_DEFAULT_T2 = {name: not spec.t2_scale for name, spec in kdkernels.METHODS.items()}


def _scenario(
    name,
    method,
    hp=None,
    shape=(9, V),
    dtype=torch.float32,
    teacher_dtype=None,
    inputs="random",
    grad_output=1.0,
    want="reference",
    error=False,
    **options,
):
    return dict(
        name=name,
        method=method,
        hp=hp or {},
        shape=shape,
        dtype=dtype,
        teacher_dtype=teacher_dtype,
        inputs=inputs,
        grad_output=grad_output,
        want=want,
        error=error,
        options=options,
    )


def _scenarios():
    out = []
    for case in CASES:
        method, hp = case
        cid = case_id(case)
        out += [
            _scenario(f"{cid}-none-3d", method, hp, shape=(3, 5, V), reduction="none", grad_output="rows"),
            _scenario(
                f"{cid}-sum-options",
                method,
                hp,
                reduction="sum",
                grad_output=0.7,
                temperature=2.0,
                t2_scale=NON_DEFAULT_T2[method],
                ignore_index=-1,
            ),
            _scenario(f"{cid}-batchmean-f64", method, hp, dtype=torch.float64, grad_output=-1.3),
            _scenario(f"{cid}-normalizer", method, hp, normalizer=7.0),
            _scenario(f"{cid}-extreme", method, hp, inputs="extreme", reduction="sum"),
            _scenario(f"{cid}-masked", method, hp, inputs="masked", reduction="none", grad_output="rows"),
            _scenario(f"{cid}-nan", method, hp, inputs="nan", reduction="none", grad_output="rows"),
        ]
        spec = kdkernels.METHODS[method]
        if finite_when_missing(spec.plan(spec.resolve(hp)), "teacher"):  # (the others are infinite where p = 0 < q)
            out.append(_scenario(f"{cid}-teacher-masked", method, hp, inputs="teacher_masked", grad_output=0.6))
    out += [
        _scenario("kd-bf16-student", "kd", dtype=torch.bfloat16, teacher_dtype=torch.float32),
        # The hard-label term: the cross-entropy over the whole vocabulary, its target on one rank.
        _scenario(
            "jsd-ce", "jsd", reduction="none", grad_output="rows", temperature=2.0, ce_weight=0.6, distill_weight=0.5
        ),
        _scenario("bdkd-ce", "bdkd", ce_weight=0.6, distill_weight=0.5, normalizer=5.0),
        _scenario("gdkd3-ce", "gdkd", {"partitions": 3}, reduction="sum", ce_weight=1.0, distill_weight=0.2),
        _scenario("dkd-ce-masked", "dkd", inputs="masked", ce_weight=0.3),
        # Label smoothing: the mean of the unmasked logits over the whole vocabulary.
        _scenario("jsd-smoothing-masked", "jsd", inputs="masked", ce_weight=0.6, label_smoothing=0.2, want="oracle"),
        _scenario("dkd-smoothing", "dkd", reduction="none", grad_output="rows", ce_weight=0.5, label_smoothing=0.1),
        # Logit standardization: row statistics over the whole vocabulary.
        _scenario("kd-standardize", "kd", standardize=True, temperature=2.0, ce_weight=0.3),
        _scenario(
            "jsd-standardize-masked", "jsd", inputs="masked", standardize=True, reduction="none", grad_output="rows"
        ),
        _scenario("dkd-standardize-extreme", "dkd", inputs="extreme", standardize=True),
        _scenario(
            "cakd-threshold-standardize", "cakd", {"strong": "threshold", "tau": 0.3}, standardize=True, want="oracle"
        ),
        _scenario("gdkd-both-standardize", "gdkd", {"k": 3, "kl_type": "both"}, standardize=True, want="oracle"),
        _scenario(
            "jsd-ce-row-mask",
            "jsd",
            reduction="none",
            grad_output="rows",
            ce_weight=0.3,
            mask=torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 1]),
        ),
        _scenario("kd-row-mask-no-target", "kd", inputs="no_target", mask=torch.tensor([0, 1, 1, 1, 0, 1, 1, 1, 1])),
        _scenario("dkd-bf16", "dkd", dtype=torch.bfloat16),
        _scenario("jsd-1d", "jsd", shape=(V,), reduction="none", grad_output="rows"),
        _scenario("gdkd-1d", "gdkd", shape=(V,), reduction="none", grad_output="rows"),
        _scenario("gdkd-k-beyond-shards", "gdkd", {"k": 20}, inputs="masked"),
        _scenario("gdkd-k-V-1", "gdkd", {"k": V - 1, "partitions": 3}),
        _scenario("cakd-topk-k-1", "cakd", {"strong": "topk", "k": 1}),
        _scenario("dkd-all-ignored", "dkd", inputs="all_ignored", grad_output=2.0),
        _scenario("cakd-all-ignored-sum", "cakd", inputs="all_ignored", reduction="sum"),
        _scenario("kd-no-grad", "kd", inputs="no_grad"),
        _scenario("kd-empty", "kd", shape=(0, V), reduction="none", grad_output="rows"),
        _scenario("gdkd3-empty", "gdkd", {"partitions": 3}, shape=(0, V)),
        _scenario("cakd-threshold-empty", "cakd", {"strong": "threshold"}, shape=(0, V), reduction="sum"),
        _scenario("gdkd3-no-grad", "gdkd", {"partitions": 3}, inputs="no_grad"),
        # Teacher ties (integer logits): the top-k takes the lower global class index, as the oracle's stable sort.
        _scenario("gdkd-ties", "gdkd", {"k": 3}, inputs="ties", want="oracle"),
        _scenario("gdkd3-ties", "gdkd", {"k": 4, "partitions": 3}, inputs="ties", want="oracle"),
        _scenario("cakd-topk-ties", "cakd", {"strong": "topk", "k": 7}, inputs="ties", want="oracle"),
        _scenario("cakd-threshold-ties", "cakd", {"strong": "threshold", "tau": 0.4}, inputs="ties", want="oracle"),
        # akl's head splits the tie group where the mass crosses mu by global class index, across shards.
        _scenario("akl-ties", "akl", inputs="ties", want="oracle"),
        _scenario(
            "akl-ties-mu",
            "akl",
            {"mu": 0.8},
            inputs="ties",
            want="oracle",
            reduction="none",
            grad_output="rows",
            standardize=True,
        ),
        # The single process's errors, with V the whole vocabulary (a target of 30 is fine, of 37 is not).
        _scenario("error-target-V", "dkd", inputs="target=37", error=True),
        _scenario("error-target-negative", "aekt", inputs="target=-5", error=True),
        _scenario("error-k-V", "gdkd", {"k": V}, error=True),
        _scenario("error-k-V-cakd", "cakd", {"strong": "topk", "k": V + 3}, error=True),
        _scenario("error-missing-target", "dkd", inputs="no_target", error=True),
        _scenario("error-unknown-hyperparameter", "kd", {"beta": 0.5}, error=True),
        _scenario("error-reduction", "kd", reduction="mean", error=True),
        _scenario("error-normalizer-sum", "kd", reduction="sum", normalizer=3.0, error=True),
        _scenario("error-temperature", "jsd", temperature=0.0, error=True),
        _scenario("error-float-target", "dkd", inputs="float_target", error=True),
    ]
    return out


SCENARIOS = {sc["name"]: sc for sc in _scenarios()}
GROUPS_SCENARIO = f"{case_id(('cakd', {'strong': 'topk', 'k': 3, 'alpha': 0.5, 'bcd_weight': 2.0}))}-none-3d"


def full_inputs(sc):
    """Full-vocabulary (student, teacher, target, grad_output) of a scenario, the same in every process."""
    seed = zlib.crc32(sc["name"].encode()) % 10_000
    kind = sc["inputs"]
    s, t, target = make_inputs(sc["shape"], torch.float64, seed=seed, ignored=0 if len(sc["shape"]) == 1 else 2)
    if kind == "extreme":
        s, t = s + 1000, t - 1000  # float32 loses digits without max-shifts
    if kind == "ties":
        t = torch.randint(0, 3, t.shape, generator=torch.Generator().manual_seed(seed)).double()
    if kind == "masked":
        s[..., MASKED] = t[..., MASKED] = float("-inf")
        target[torch.isin(target, torch.tensor(MASKED))] = 5
    if kind == "teacher_masked":  # classes only the teacher masks, some of them targets (an empty teacher bin)
        t[..., TEACHER_MASKED] = float("-inf")
        target.view(-1)[[0, 4]] = torch.tensor(TEACHER_MASKED)
    if kind == "nan":  # NaN propagates to its row's loss; an ignored row's NaN does not
        s[1, 4] = t[4, 30] = s[7, 0] = float("nan")
        target[7] = -100
        target[[1, 4]] = 3
    if kind == "all_ignored":
        target[...] = -100
    if kind.startswith("target="):
        target.view(-1)[3] = int(kind.split("=")[1])
    ignore_index = sc["options"].get("ignore_index", -100)
    target[target == -100] = ignore_index
    if kind == "no_target":
        target = None
    if kind == "float_target":
        target = target.double()
    s, t = s.to(sc["dtype"]), t.to(sc["teacher_dtype"] or sc["dtype"])
    go = sc["grad_output"]
    if go == "rows":
        go = torch.linspace(-1.5, 2.0, s[..., 0].numel(), dtype=torch.float64).reshape(s.shape[:-1])
    return s, t, target, go


# ---------------------------------------------------------------------------------------------------------------
# The spawned ranks.
# ---------------------------------------------------------------------------------------------------------------


def _run_scenario(sc, bounds, group):
    s, t, target, go = full_inputs(sc)
    lo, hi = bounds
    s = s[..., lo:hi].clone().requires_grad_(sc["inputs"] != "no_grad")
    loss = parallel.distill_loss(sc["method"], s, t[..., lo:hi], target, group=group, **sc["hp"], **sc["options"])
    if not s.requires_grad:
        return loss, None
    loss.backward(torch.as_tensor(go, dtype=loss.dtype))
    return loss.detach(), s.grad


def _bounds(split, rank):
    return sum(split[:rank]), sum(split[: rank + 1])


def _groups_and_function_per_loss(rank):
    """On 4 ranks: two process groups of 2 ranks with different layouts; parallel.cakd_loss on the default group."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    split = SPLITS[2] if rank < 2 else (30, 7)
    sc = SCENARIOS[GROUPS_SCENARIO]
    out = {"pairs": ("ok",) + _run_scenario(sc, _bounds(split, rank % 2), pairs[rank // 2])}
    s, t, target, _ = full_inputs(sc)
    lo, hi = _bounds(SPLITS[4], rank)
    out["cakd_loss"] = parallel.cakd_loss(s[..., lo:hi], t[..., lo:hi], target, reduction="none", **sc["hp"])
    return out


PARTS_SCENARIO = "jsd-ce"


def _parts(rank, world):
    """return_parts on the shards: (loss, distill, ce), each the whole vocabulary's."""
    s, t, target, _ = full_inputs(SCENARIOS[PARTS_SCENARIO])
    lo, hi = _bounds(SPLITS[world], rank)
    return tuple(
        parallel.distill_loss(
            "jsd", s[..., lo:hi], t[..., lo:hi], target, ce_weight=0.6, distill_weight=0.5, return_parts=True
        )
    )


# The full gradient (a teacher that requires grad and a temperature tensor): loss, the student's and the teacher's
# gradient shards and d loss / d T on the shards, against the single process's.
FULL_GRADIENT = [
    ("kd", {}, {}),
    ("jsd", {}, {"standardize": True, "ce_weight": 0.4}),
    ("bdkd", {}, {}),
    ("akl", {}, {}),
    ("abkd", {"alpha": 0.3, "beta": 0.9}, {"standardize": True}),
    ("dkd", {}, {"standardize": True}),
    ("gdkd", {"k": 3, "partitions": 3, "kl_type": "both"}, {}),
    ("cakd", {"strong": "threshold", "tau": 0.3}, {}),
    ("aekt", {}, {"reduction": "none"}),
]


def _full_gradient_inputs(i):
    s, t, target = make_inputs((9, V), torch.float64, seed=90 + i, ignored=2)
    s[..., MASKED] = t[..., MASKED] = float("-inf")
    target[torch.isin(target, torch.tensor(MASKED))] = 5
    return s, t, target, torch.linspace(-1.5, 2.0, 9, dtype=torch.float64)


def _full_gradient(method, hp, options, s, t, target, go, call):
    """(loss, student grad, teacher grad, d loss / d T) of ``call`` (parallel.distill_loss or the reference)."""
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    temperature = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    loss = call(method, s, t, target, temperature=temperature, **hp, **options)
    loss.backward(go if loss.dim() else go.sum())
    return loss.detach(), s.grad, t.grad, temperature.grad


def _full_gradients(rank, world):
    lo, hi = _bounds(SPLITS[world], rank)
    out = []
    for i, (method, hp, options) in enumerate(FULL_GRADIENT):
        s, t, target, go = _full_gradient_inputs(i)
        out.append(_full_gradient(method, hp, options, s[..., lo:hi], t[..., lo:hi], target, go, parallel.distill_loss))
    return out


def _rows_disagree(rank):
    """Leading shapes that disagree across ranks: every rank raises the same error."""
    s, t, _, _ = full_inputs(SCENARIOS["kd-no-grad"])
    rows = 9 - (rank == 1)
    parallel.distill_loss("kd", s[:rows, :2], t[:rows, :2])


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    results = {}
    parts = [
        (name, lambda sc=sc: ("ok",) + _run_scenario(sc, _bounds(SPLITS[world], rank), None))
        for name, sc in SCENARIOS.items()
    ]
    parts.append(("rows-disagree", lambda: _rows_disagree(rank)))
    parts.append(("parts", lambda: _parts(rank, world)))
    parts.append(("full-gradient", lambda: _full_gradients(rank, world)))
    if world == 4:
        parts.append(("groups", lambda: _groups_and_function_per_loss(rank)))
    for name, part in parts:
        try:
            results[name] = part()
        except Exception as error:  # reported to the parent (an exception here would hang the other ranks)
            results[name] = ("error", type(error).__name__, str(error))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


_RUNS: dict[int, list] = {}


def ranks_results(world, tmp_path_factory):
    """Per rank, the results of every scenario with ``world`` gloo processes (spawned once per world size)."""
    if world not in _RUNS:
        tmp = tmp_path_factory.mktemp(f"parallel{world}")
        mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
        _RUNS[world] = [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
    return _RUNS[world]


# ---------------------------------------------------------------------------------------------------------------
# The parent's checks.
# ---------------------------------------------------------------------------------------------------------------


def single_process(sc):
    """(loss, gradient) of kdkernels.distill_loss on the full logits, or of the float64 oracle."""
    s, t, target, go = full_inputs(sc)
    if sc["want"] == "reference":
        loss, grad = run_loss(sc["method"], s, t, target, sc["hp"], "reference", grad_output=go, **sc["options"])
        return loss.detach(), grad.double()
    spec = kdkernels.METHODS[sc["method"]]
    options = {
        "reduction": "batchmean",
        "temperature": spec.temperature,
        "t2_scale": spec.t2_scale,
        "ignore_index": -100,
        "normalizer": None,
        **sc["options"],
    }
    return oracle(
        sc["method"],
        s.numpy(),
        t.numpy(),
        None if target is None else target.numpy(),
        spec.resolve(sc["hp"]),
        options["temperature"],
        options["t2_scale"],
        options["reduction"],
        options["ignore_index"],
        options["normalizer"],
        np.asarray(go, dtype=np.float64),
        ce_weight=options.get("ce_weight", 0.0),
        distill_weight=options.get("distill_weight", 1.0),
        standardize=options.get("standardize", False),
        label_smoothing=options.get("label_smoothing", 0.0),
    )


def single_process_error(sc):
    s, t, target, _ = full_inputs(sc)
    with pytest.raises(Exception) as info:
        kdkernels.distill_loss(sc["method"], s, t, target, **sc["hp"], **sc["options"])
    return type(info.value).__name__, str(info.value)


def check_ranks(sc, per_rank):
    """Every rank returned the same loss, the single process's, and the gradient shards make its gradient."""
    for rank, result in enumerate(per_rank):
        assert result[0] == "ok", f"rank {rank} raised {result[1]}: {result[2]}"
    losses = [result[1] for result in per_rank]
    for rank, loss in enumerate(losses[1:], 1):
        torch.testing.assert_close(
            loss,
            losses[0],
            rtol=0,
            atol=0,
            equal_nan=True,
            msg=f"rank {rank}'s loss differs from rank 0's: {loss} vs {losses[0]}",
        )
    want_loss, want_grad = single_process(sc)
    tol = torch.bfloat16 if torch.bfloat16 in (sc["dtype"], sc["teacher_dtype"]) else sc["dtype"]
    assert losses[0].dtype == (torch.float64 if sc["dtype"] == torch.float64 else torch.float32)
    # Rows whose loss is NaN (a NaN input) must be NaN alike; their gradients are not compared.
    nan_rows = torch.isnan(torch.as_tensor(want_loss))
    assert torch.equal(torch.isnan(losses[0]), nan_rows), f"{sc['name']}: NaN rows {losses[0]} vs {want_loss}"
    assert_close(losses[0][~nan_rows], torch.as_tensor(want_loss)[~nan_rows], tol, f"{sc['name']} loss")
    if per_rank[0][2] is not None:
        grads = [result[2] for result in per_rank]
        assert all(g.dtype == sc["dtype"] for g in grads)
        assert_close(
            torch.cat(grads, -1)[~nan_rows], torch.as_tensor(want_grad)[~nan_rows], tol, f"{sc['name']} gradient"
        )


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_single_process(world, name, tmp_path_factory):
    sc = SCENARIOS[name]
    per_rank = [results[name] for results in ranks_results(world, tmp_path_factory)]
    if sc["error"]:
        want = single_process_error(sc)
        for rank, result in enumerate(per_rank):
            assert result[0] == "error" and tuple(result[1:]) == want, f"rank {rank}: got {result}, want {want}"
    else:
        check_ranks(sc, per_rank)


def test_groups_and_function_per_loss(tmp_path_factory):
    """Two process groups of 2 ranks (each with its own layout) in one world of 4; parallel.cakd_loss."""
    per_rank = [results["groups"] for results in ranks_results(4, tmp_path_factory)]
    assert all(isinstance(result, dict) for result in per_rank), per_rank
    sc = SCENARIOS[GROUPS_SCENARIO]
    check_ranks(sc, [result["pairs"] for result in per_rank[:2]])
    check_ranks(sc, [result["pairs"] for result in per_rank[2:]])
    s, t, target, _ = full_inputs(sc)
    want = kdkernels.distill_loss(sc["method"], s, t, target, reduction="none", **sc["hp"])
    for result in per_rank:
        assert_close(result["cakd_loss"], want, torch.float32, "parallel.cakd_loss")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_parts(world, tmp_path_factory):
    s, t, target, _ = full_inputs(SCENARIOS[PARTS_SCENARIO])
    want = kdkernels.distill_loss(
        "jsd", s, t, target, ce_weight=0.6, distill_weight=0.5, return_parts=True, backend="reference"
    )
    for results in ranks_results(world, tmp_path_factory):
        assert isinstance(results["parts"], tuple) and len(results["parts"]) == 3, results["parts"]
        for got, expected in zip(results["parts"], want):
            assert_close(got, expected.detach().numpy(), torch.float32, "parts")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_rows_must_agree(world, tmp_path_factory):
    for results in ranks_results(world, tmp_path_factory):
        assert results["rows-disagree"][:2] == ("error", "ValueError"), results["rows-disagree"]
        assert "same number of rows" in results["rows-disagree"][2]


# ---------------------------------------------------------------------------------------------------------------
# Without processes.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(kdkernels.METHODS))
def test_function_signature(method):
    spec = kdkernels.METHODS[method]
    params = inspect.signature(getattr(parallel, f"{method}_loss")).parameters
    assert list(params)[:3] == ["student_logits", "teacher_logits", "target"]
    assert "backend" not in params  # (group and the loss options pass through to parallel.distill_loss)
    assert params["temperature"].default == spec.temperature and params["t2_scale"].default == spec.t2_scale
    for name, default in spec.hyperparameters.items():
        assert params[name].default == default


def test_needs_initialized_process_group():
    assert not dist.is_initialized()
    s, t, _ = make_inputs((2, 5))
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.kd_loss(s, t)
    with pytest.raises(ValueError, match="reduction"):  # the argument checks come first
        parallel.kd_loss(s, t, reduction="mean")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_full_gradient_matches_single_process(world, tmp_path_factory):
    """A teacher that requires grad and a temperature tensor: every rank's loss and d loss / d T equal the single
    process's, and its student and teacher gradient shards put together equal the single process's gradients."""
    results = [r["full-gradient"] for r in ranks_results(world, tmp_path_factory)]
    assert all(r[0] != "error" for r in results), results
    for i, (method, hp, options) in enumerate(FULL_GRADIENT):
        s, t, target, go = _full_gradient_inputs(i)
        want = _full_gradient(
            method, hp, options, s, t, target, go, lambda *a, **k: kdkernels.distill_loss(*a, backend="reference", **k)
        )
        what = f"{method} {hp} {options}"
        for rank in range(world):
            loss, _, _, d_temperature = results[rank][i]
            assert_close(loss, want[0].numpy(), torch.float64, f"{what} loss, rank {rank}")
            assert_close(d_temperature, want[3].numpy(), torch.float64, f"{what} d loss / d T, rank {rank}")
        for k, name in ((1, "student"), (2, "teacher")):
            whole = torch.cat([results[rank][i][k] for rank in range(world)], -1)
            assert_close(whole, want[k].numpy(), torch.float64, f"{what} {name} gradient")


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone (its collectives are identities), destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_akl_head_checks_its_candidate(one_rank_group, dtype, monkeypatch):
    """akl's head on the shards takes the radix select's candidate only where the check at its value confirms it
    (A(u) <= mu < A just below u), else finds the threshold by bisection from the candidate's right side: the head
    is the same whatever the candidate (a value of the row, a value between two, -inf, +inf, a zero of either
    sign), and equals the stable sort's (reference.akl_head) where no cumulative mass lies within rounding of mu;
    on such rows the radix select's own candidate needs no bisection."""
    from kdkernels.backends import reference

    g = torch.Generator().manual_seed(5)
    n, v = 6, 50
    t = (torch.randn(n, v, generator=g, dtype=dtype) * 2).to(torch.bfloat16).to(dtype)  # (ties)
    t[1, :10] = float("-inf")
    t[2, 20:30] = 0.0
    t[2, 25:28] = -0.0
    lp = torch.log_softmax(t, -1)
    shard = parallel.Shard(one_rank_group, 0, 0, v)
    sorted_t = t.sort(-1).values
    candidates = [float("-inf"), float("inf"), 0.0, -0.0, -1.0, 0.3]
    candidates += [sorted_t[:, k] for k in (0, 10, 25, 49)]
    candidates += [(sorted_t[:, k] + sorted_t[:, k + 1]) / 2 for k in (12, 37)]
    radix = parallel._akl_radix
    for mu in (0.1, 0.45, 0.9):
        want = reference.akl_head(t, lp, mu)
        keys, p = parallel._Keys(dtype), lp.exp()
        value = radix(t, p, mu, keys, one_rank_group)
        mass, mass_from = parallel._akl_ties(t, p, value, one_rank_group)[:2]
        assert bool(((mass <= mu) & (mass_from > mu)).all()), f"mu={mu}: the radix select's candidate was off"
        assert torch.equal(parallel._akl_head(t, lp, mu, shard), want), f"mu={mu}"
        for candidate in candidates:
            chosen = torch.full((n,), candidate, dtype=dtype) if isinstance(candidate, float) else candidate
            monkeypatch.setattr(parallel, "_akl_radix", lambda *args, chosen=chosen: chosen.clone())
            assert torch.equal(parallel._akl_head(t, lp, mu, shard), want), f"mu={mu}, candidate {candidate}"


@pytest.mark.parametrize("learns", ["teacher", "temperature", "neither"])
def test_backward_scales_in_place(one_rank_group, learns):
    """The shard loss's backward scales the gradients its forward kept in place, as the fused paths do (the full
    gradient's too): with a per-row grad_output they equal the float64 reference's, and a second backward through the
    same loss is refused."""
    s, t, target = make_inputs((6, 40), seed=31, ignored=1)
    weights = torch.tensor([0.5, 2.0, 0.0, 1.0, -3.0, 1.5])
    grads, losses = [], []
    for dtype, fn in ((torch.float32, parallel.distill_loss), (torch.float64, kdkernels.distill_loss)):
        x, y = (z.detach().to(dtype, copy=True) for z in (s, t))
        x, y = x.requires_grad_(True), y.requires_grad_(learns == "teacher")
        temperature = torch.tensor(1.7, dtype=dtype, requires_grad=learns == "temperature")
        where = {"group": one_rank_group} if fn is parallel.distill_loss else {"backend": "reference"}
        loss = (fn("jsd", x, y, target, temperature=temperature, reduction="none", **where) * weights.to(dtype)).sum()
        loss.backward(retain_graph=True)
        grads.append((x.grad, y.grad, temperature.grad))
        losses.append(loss)
    got, want = grads
    assert_close(got[0], want[0].numpy(), torch.float32, "student gradient")
    if learns == "teacher":
        assert_close(got[1], want[1].numpy(), torch.float32, "teacher gradient")
    if learns == "temperature":
        assert abs(float(got[2]) - float(want[2])) <= 1e-4 * abs(float(want[2])) + 1e-6
    with pytest.raises(RuntimeError, match="kdkernels: the fused loss's saved gradient was already used"):
        losses[0].backward()
