"""Sparse teachers: losses over the k + 1 bins, against the reference evaluated on the same bins."""

import math
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from cases import CASES, case_id
from helpers import assert_close, make_inputs

import kdkernels
from kdkernels import SparseTeacher, SparseTeacherWriter, load_sparse_teachers, save_sparse_teachers
from kdkernels.arguments import resolve
from kdkernels.backends.reference import divergence_rows
from kdkernels.methods import DIVERGENCE, finite_when_missing
from kdkernels.sparse import check, teacher_bins

DIVERGENCE_CASES = [c for c in CASES if kdkernels.METHODS[c[0]].family == DIVERGENCE]
K = 4


def top_k(t, k=K, kind="logprobs", temperature=1.0):
    """The teacher's top-k as an inference server returns it: log-probabilities (at T) or raw logits."""
    source = torch.log_softmax(t.double() / temperature, -1).float() if kind == "logprobs" else t
    top = source.topk(k, -1)
    return SparseTeacher(top.indices, top.values, kind)


def bin_row_losses(plan, student, teacher, temperature, t2_scale, valid):
    """Per-row losses over the k + 1 bins, the student's log-probabilities gathered on the k classes plus a
    logsumexp over all the others, under autograd (the sparse path folds the student into bin logits instead)."""
    keep = valid.unsqueeze(-1)
    lq = torch.log_softmax(torch.where(keep, student, 0.0) / temperature, -1)
    rest = torch.ones_like(lq, dtype=torch.bool).scatter_(-1, teacher.indices, False)
    lq_tail = torch.logsumexp(torch.where(rest, lq, float("-inf")), -1, keepdim=True)
    lq = torch.cat([lq.gather(-1, teacher.indices), lq_tail], -1)
    lp = torch.log_softmax(teacher_bins(teacher, temperature, student.dtype, student.shape[-1]) / temperature, -1)
    loss = divergence_rows(plan, lp, lq) * (temperature**2 if t2_scale else 1.0)
    return torch.where(valid, loss, 0.0)


def reference_loss(method, hp, s, teacher, target, reduction="batchmean", grad_output=None, **options):
    """Loss and gradient from bin_row_losses, in float64."""
    spec = kdkernels.METHODS[method]
    plan = spec.plan(spec.resolve(hp))
    temperature = options.get("temperature", spec.temperature)
    s = s.detach().double().requires_grad_(True)
    valid = torch.ones(s.shape[:-1], dtype=torch.bool) if target is None else target != -100
    flat = check(teacher, resolve(method, **hp), s.shape[:-1], s.shape[-1], s.device, valid.reshape(-1))
    rows = bin_row_losses(plan, s.reshape(-1, s.shape[-1]), flat, temperature, spec.t2_scale, valid.reshape(-1))
    loss = (
        rows.reshape(s.shape[:-1])
        if reduction == "none"
        else rows.sum() / valid.sum().clamp(min=1)
        if reduction == "batchmean"
        else rows.sum()
    )
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.double())
    return loss.detach(), s.grad


def run(method, hp, s, teacher, target, backend, reduction="batchmean", grad_output=None, **options):
    s = s.detach().clone().requires_grad_(True)
    loss = kdkernels.distill_loss(method, s, teacher, target, backend=backend, reduction=reduction, **hp, **options)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss, s.grad


@pytest.mark.parametrize("case", [c for c in DIVERGENCE_CASES if c[0] != "akl"], ids=case_id)  # (akl: no tail bin)
def test_every_divergence_against_reference_bins(case, backend, device):
    method, hp = case
    s, t, target = make_inputs((3, 2, 13), seed=3)
    teacher = top_k(t)
    go = torch.linspace(-1, 2, 6).reshape(3, 2)
    for reduction, grad_output in (("batchmean", None), ("none", go)):
        loss, grad = run(
            method,
            hp,
            s.to(device),
            SparseTeacher(teacher.indices.to(device), teacher.values.to(device)),
            target.to(device),
            backend,
            reduction,
            None if grad_output is None else grad_output.to(device),
            temperature=2.0,
        )
        want_loss, want_grad = reference_loss(method, hp, s, teacher, target, reduction, grad_output, temperature=2.0)
        assert_close(loss, want_loss.numpy(), torch.float32, f"{method} {hp} loss")
        assert_close(grad, want_grad.numpy(), torch.float32, f"{method} {hp} gradient")


def test_kd_closed_form_on_bins(backend, device):
    s, t, _ = make_inputs((5, 9), seed=4)
    teacher = top_k(t, kind="logprobs")
    loss, _ = run(
        "kd",
        {},
        s.to(device),
        SparseTeacher(teacher.indices.to(device), teacher.values.to(device)),
        None,
        backend,
        temperature=1.0,
        t2_scale=False,
    )
    q = torch.softmax(s.double(), -1).numpy()
    want = 0.0
    for r in range(5):
        p_k = np.exp(teacher.values[r].double().numpy())
        q_k = q[r, teacher.indices[r].numpy()]
        p_tail, q_tail = 1 - p_k.sum(), 1 - q_k.sum()
        want += (p_k * np.log(p_k / q_k)).sum() + p_tail * math.log(p_tail / q_tail)
    assert_close(loss, want / 5, torch.float32, "kd on bins")


@pytest.mark.parametrize("method,hp", [("kd", {}), ("tvd", {}), ("jsd", {"beta": 0.3}), ("skew_rkl", {})])
def test_logits_kind_with_all_classes_is_the_dense_loss(method, hp, backend, device):
    s, t, target = make_inputs((4, 6), seed=5)
    # k = V, kind="logits": the k classes are the whole vocabulary (renormalised after / T), the tail is empty.
    teacher = SparseTeacher(torch.arange(6).flip(0).expand(4, 6).to(device), t.flip(-1).to(device), "logits")
    loss, grad = run(method, hp, s.to(device), teacher, target.to(device), backend)
    want, want_grad = run(method, hp, s, t, target, "reference")
    assert_close(loss, want.detach().numpy(), torch.float32, "loss")
    assert_close(grad, want_grad.numpy(), torch.float32, "gradient")


@pytest.mark.parametrize("case", [c for c in DIVERGENCE_CASES if c[0] != "abkd"][:6], ids=case_id)
def test_logits_kind(case, backend, device):
    method, hp = case
    s, t, target = make_inputs((5, 10), seed=6)
    teacher = top_k(t, kind="logits")
    spec = kdkernels.METHODS[method]
    if not finite_when_missing(spec.plan(spec.resolve(hp)), "teacher"):
        with pytest.raises(ValueError, match="zero mass"):
            run(method, hp, s.to(device), teacher, target.to(device), backend)
        return
    loss, grad = run(method, hp, s.to(device), teacher, target.to(device), backend, temperature=3.0)
    want_loss, want_grad = reference_loss(method, hp, s, teacher, target, temperature=3.0)
    assert_close(loss, want_loss.numpy(), torch.float32, "loss")
    assert_close(grad, want_grad.numpy(), torch.float32, "gradient")


def test_fused_linear_with_sparse_teacher(backend, device):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(7, 5, generator=g).to(device).requires_grad_(True)
    weight = torch.randn(12, 5, generator=g).to(device).requires_grad_(True)
    teacher = top_k(torch.randn(7, 12, generator=g) * 2)
    teacher = SparseTeacher(teacher.indices.to(device), teacher.values.to(device))
    target = torch.tensor([0, 1, -100, 3, 4, 5, 6], device=device)
    for method, hp in (("kd", {}), ("abkd", {"alpha": 0.6, "beta": 0.5}), ("skew_fkl", {"skew": 0.2})):
        loss = kdkernels.linear_distill_loss(
            method, hidden, weight, teacher, None, target, chunk_size=3, softcap=4.0, backend=backend, **hp
        )
        got = torch.autograd.grad(loss, (hidden, weight), torch.tensor(1.3, device=device))
        logits = 4.0 * torch.tanh(hidden @ weight.t() / 4.0)
        want = kdkernels.distill_loss(method, logits, teacher, target, backend="reference", **hp)
        want_grads = torch.autograd.grad(want, (hidden, weight), torch.tensor(1.3, device=device))
        assert_close(loss, want.detach().cpu().numpy(), torch.float32, f"{method} loss")
        for a, b in zip(got, want_grads):
            assert_close(a, b.cpu().numpy(), torch.float32, f"{method} gradient")


def test_undefined_and_bad_teachers_raise(device):
    s, t, target = make_inputs((3, 8), seed=8)
    s, t, target = s.to(device), t.to(device), target.to(device)
    teacher = top_k(t)
    with pytest.raises(ValueError, match="decoupled-family"):
        kdkernels.distill_loss("dkd", s, teacher, target)
    with pytest.raises(ValueError, match="decoupled-family"):
        kdkernels.linear_distill_loss("gdkd", s, torch.eye(8, device=device), teacher, None)
    # rkl against a zero tail: all the mass on the k classes.
    full = SparseTeacher(teacher.indices, torch.log_softmax(teacher.values, -1))
    with pytest.raises(ValueError, match="zero mass"):
        kdkernels.distill_loss("rkl", s, full, None)
    kdkernels.distill_loss("kd", s, full, None)  # finite: kd needs no tail
    with pytest.raises(ValueError, match="akl ranks the teacher's classes one by one"):
        kdkernels.distill_loss("akl", s, teacher, None)
    with pytest.raises(ValueError, match="must be log-probabilities"):
        kdkernels.distill_loss("kd", s, SparseTeacher(teacher.indices, teacher.values + 3), None)
    with pytest.raises(ValueError, match="distinct"):
        kdkernels.distill_loss("kd", s, SparseTeacher(torch.zeros_like(teacher.indices), teacher.values), None)
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        kdkernels.distill_loss("kd", s, SparseTeacher(teacher.indices + 8, teacher.values), None)
    with pytest.raises(ValueError, match="leading shape"):
        kdkernels.distill_loss("kd", s[:2], teacher, None)
    with pytest.raises(ValueError, match="teacher_weight=None"):
        kdkernels.linear_distill_loss("kd", s, torch.eye(8, device=device), teacher, torch.eye(8, device=device))
    with pytest.raises(TypeError, match="indices must be an integer"):
        SparseTeacher(teacher.values, teacher.values)
    with pytest.raises(ValueError, match="same shape"):
        SparseTeacher(teacher.indices[:, :2], teacher.values)
    with pytest.raises(ValueError, match="kind"):
        SparseTeacher(teacher.indices, teacher.values, "probs")
    # An ignored row may hold anything.
    bad = teacher.indices.clone()
    bad[1] = 99
    target = torch.tensor([0, -100, 2], device=device)
    kdkernels.distill_loss("kd", s, SparseTeacher(bad, teacher.values), target)


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
@pytest.mark.parametrize("kind", ["logprobs", "logits"])
def test_without_tail_both_models_are_renormalised_over_the_k_classes(case, kind, backend, device):
    """tail=False (TRL's loss_add_tail=False): the dense loss on the k gathered logits; no gradient outside K."""
    method, hp = case
    s, t, target = make_inputs((5, 11), seed=9)
    teacher = top_k(t, kind=kind, temperature=2.0)
    teacher = SparseTeacher(teacher.indices.to(device), teacher.values.to(device), kind, tail=False)
    loss, grad = run(method, hp, s.to(device), teacher, target.to(device), backend, "none", temperature=2.0)
    gathered_t = teacher.values.cpu() * (2.0 if kind == "logprobs" else 1.0)  # softmax(gathered / T) = renormalised
    want, want_grad_k = run(
        method, hp, s.gather(-1, teacher.indices.cpu()), gathered_t, target, "reference", "none", temperature=2.0
    )
    want_grad = torch.zeros_like(s).scatter_(-1, teacher.indices.cpu(), want_grad_k)
    assert_close(loss, want.detach().numpy(), torch.float32, f"{method} {hp} loss")
    assert_close(grad, want_grad.numpy(), torch.float32, f"{method} {hp} gradient")


def test_from_logits_keeps_the_top_k_log_probabilities_at_t():
    t = torch.tensor([[1.0, 3.0, 3.0, -2.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    teacher = SparseTeacher.from_logits(t, 3, temperature=2.0)
    assert teacher.indices.tolist() == [[1, 2, 0], [0, 1, 2]]  # equal logits: the lower class index first
    torch.testing.assert_close(teacher.values, torch.log_softmax(t / 2.0, -1).gather(-1, teacher.indices))
    assert (teacher.kind, teacher.tail) == ("logprobs", True)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, V=5\]"):
        SparseTeacher.from_logits(t, 6)
    with pytest.raises(ValueError, match="temperature"):
        SparseTeacher.from_logits(t, 2, temperature=0.0)


def test_student_top_k_with_a_teacher_that_scores_token_ids(backend, device):
    """verl's reverse KL on the student's top-k: the teacher's log-probabilities looked up on those classes."""
    s, t, target = make_inputs((4, 3, 17), seed=10)
    s, t = s.to(device), t.to(device)
    asked = []

    def score(indices):
        asked.append(indices)
        return torch.log_softmax(t, -1).gather(-1, indices)

    teacher = SparseTeacher.at_student_top_k(s, 5, score)
    assert torch.equal(asked[0], torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :5])
    loss, grad = run("rkl", {}, s, teacher, None, backend, temperature=1.0)
    want_loss, want_grad = reference_loss(
        "rkl", {}, s.cpu(), SparseTeacher(teacher.indices.cpu(), teacher.values.cpu()), None, temperature=1.0
    )
    assert_close(loss, want_loss.numpy(), torch.float32, "loss")
    assert_close(grad, want_grad.numpy(), torch.float32, "gradient")
    # Without the tail: reverse KL between the two distributions renormalised over the student's top-k.
    loss, grad = run("rkl", {}, s, SparseTeacher(teacher.indices, teacher.values, tail=False), None, backend)
    indices = teacher.indices.cpu()
    want_loss, want_grad_k = run("rkl", {}, s.cpu().gather(-1, indices), teacher.values.cpu(), None, "reference")
    assert_close(loss, want_loss.detach().numpy(), torch.float32, "loss without the tail")
    assert_close(
        grad,
        torch.zeros(s.shape).scatter_(-1, indices, want_grad_k).numpy(),
        torch.float32,
        "gradient without the tail",
    )
    with pytest.raises(ValueError, match="score.indices. must return"):
        SparseTeacher.at_student_top_k(s, 5, lambda indices: indices[..., :2].float())


@pytest.mark.parametrize("values", ["bfloat16", "float16"])
def test_saved_teachers_round_trip(tmp_path, values):
    """Batches of any leading shape, written in a stream and read back batch by batch, bit for bit."""
    g = torch.Generator().manual_seed(11)
    batches = [
        SparseTeacher.from_logits(torch.randn(*shape, 300, generator=g) * 3, 7) for shape in ((4, 5), (3,), (2, 2, 2))
    ]
    path = tmp_path / "teacher.kds"
    assert save_sparse_teachers(path, batches, values) == 20 + 3 + 8
    loaded = list(load_sparse_teachers(path))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[values]
    assert len(loaded) == 3
    for got, want in zip(loaded, batches):
        assert torch.equal(got.indices, want.indices.reshape(-1, 7))
        assert got.values.dtype == dtype and torch.equal(got.values, want.values.reshape(-1, 7).to(dtype))
        assert (got.kind, got.tail) == ("logprobs", True)
    # A loaded teacher is a teacher: the loss from it equals the loss from the rounded values.
    s = torch.randn(20, 300, generator=g)
    rounded = SparseTeacher(batches[0].indices.reshape(-1, 7), batches[0].values.reshape(-1, 7).to(dtype))
    torch.testing.assert_close(kdkernels.kd_loss(s, loaded[0]), kdkernels.kd_loss(s, rounded))


def test_corrupted_or_truncated_files_are_rejected(tmp_path):
    teacher = SparseTeacher.from_logits(torch.randn(6, 50, generator=torch.Generator().manual_seed(12)), 4)
    path = tmp_path / "teacher.kds"
    with SparseTeacherWriter(path, 4, tail=True) as writer:
        writer.write(teacher)
        writer.write(teacher)
        with pytest.raises(ValueError, match="this file holds k=4"):
            writer.write(SparseTeacher(teacher.indices[:, :3], teacher.values[:, :3]))
    data = path.read_bytes()
    header, chunk, footer = 24, 16 + 6 * 4 * 6, 24  # (the layout of sparse_store.py: 6 rows of k = 4 a chunk)
    assert len(data) == header + 2 * chunk + footer
    cases = {
        "flipped value byte": (data[:60] + bytes([data[60] ^ 1]) + data[61:], "chunk 0: checksum mismatch"),
        "flipped header byte": (data[:12] + bytes([data[12] ^ 1]) + data[13:], "header checksum mismatch"),
        "cut inside a chunk": (data[:100], "truncated .*chunk 0"),
        "no footer": (data[:-footer], "truncated .*no footer"),
        "footer cut": (data[:-5], "truncated .*footer"),
        "one chunk dropped": (data[:header] + data[header + chunk :], "footer counts 2 chunks"),
        "not ours": (b"PK\x03\x04" + data[4:], "not a sparse-teacher file"),
    }
    for name, (corrupt, match) in cases.items():
        bad = tmp_path / f"{name}.kds"
        bad.write_bytes(corrupt)
        with pytest.raises(ValueError, match=match):
            list(load_sparse_teachers(bad))
    assert len(list(load_sparse_teachers(path))) == 2
    with pytest.raises(ValueError, match="values must be one of"):
        SparseTeacherWriter(tmp_path / "x.kds", 4, values="int8")


def test_every_single_byte_flip_raises_value_error(tmp_path):
    """Every byte of a small file flipped (each bit pattern that matters: the low bit, the high bit, all bits) is
    refused with the documented ValueError naming the file (no MemoryError or OverflowError from a chunk's row
    count); a flip inside a chunk names that chunk."""
    g = torch.Generator().manual_seed(13)
    path = tmp_path / "teacher.kds"
    save_sparse_teachers(path, [SparseTeacher.from_logits(torch.randn(n, 40, generator=g), 3) for n in (2, 5)])
    data = path.read_bytes()
    header = 24
    chunks = [header, header + 16 + 2 * 3 * 6, header + 2 * 16 + 7 * 3 * 6]  # where chunk 0, 1 and the footer begin
    assert len(data) == chunks[-1] + 24
    bad = tmp_path / "bad.kds"
    for at in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad.write_bytes(data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :])
            with pytest.raises(ValueError, match=re.escape(str(bad))) as error:
                list(load_sparse_teachers(bad))
            for i in range(2):
                if chunks[i] <= at < chunks[i + 1]:
                    assert f"chunk {i}" in str(error.value), (at, mask, error.value)


def test_version_1_files_are_still_read(tmp_path):
    """A file of version 1 (the chunk CRC over the payload only) reads back as the same batches; a later version
    is refused as unsupported."""
    g = torch.Generator().manual_seed(14)
    batches = [SparseTeacher.from_logits(torch.randn(n, 30, generator=g), 2) for n in (3, 4)]
    path = tmp_path / "v2.kds"
    save_sparse_teachers(path, batches)
    data = path.read_bytes()
    # Rewritten as version 1: the header's version and CRC, each chunk's CRC, the footer's CRC of the chunk CRCs.
    header = data[:8] + struct.pack("<I", 1) + data[12:20]
    out, at, crcs = header + struct.pack("<I", zlib.crc32(header)), 24, 0
    for n in (3, 4):
        payload = data[at + 16 : at + 16 + n * 2 * 6]
        crc = zlib.crc32(payload)
        out += data[at : at + 12] + struct.pack("<I", crc) + payload
        crcs = zlib.crc32(struct.pack("<I", crc), crcs)
        at += 16 + len(payload)
    out += data[at : at + 20] + struct.pack("<I", crcs)
    old = tmp_path / "v1.kds"
    old.write_bytes(out)
    for got, want in zip(load_sparse_teachers(old), batches, strict=True):
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values.to(torch.bfloat16))
    header = data[:8] + struct.pack("<I", 3) + data[12:20]
    (tmp_path / "v3.kds").write_bytes(header + struct.pack("<I", zlib.crc32(header)) + data[24:])
    with pytest.raises(ValueError, match="unsupported sparse-teacher file .version 3"):
        list(load_sparse_teachers(tmp_path / "v3.kds"))
