"""Token alignment across two byte-level BPE tokenizers trained here on the same text (4096 and 16384 tokens, so the
token boundaries differ), against TRL's GOLD: byte offsets, groups, merged distributions and the aligned loss.

The tokenizers and TRL come with the ``llm`` extra, which scripts/setup.sh installs: a missing package is an error,
not a skip, unless KDKERNELS_NO_LLM=1 says the environment has none.
"""

import os

import pytest
import torch
from helpers import gold_config

if os.environ.get("KDKERNELS_NO_LLM") == "1":
    pytest.skip("KDKERNELS_NO_LLM=1: tokenizers / trl are not installed here", allow_module_level=True)

from tokenizers import normalizers  # noqa: E402
from trl.experimental.gold.gold_trainer import ULDLoss  # noqa: E402
from trl.experimental.utils import encode_with_byte_offsets  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels import alignment, demo_lm  # noqa: E402

NON_ASCII = "def naïve_café(x):  # 日本語, ünïcödé and 🎉 split across byte-level tokens\n    return x ** 2  # ≥ 0\n"


@pytest.fixture(scope="module")
def corpus():
    """(tokenizers, texts): byte-level BPEs of 4096 and 16384 tokens trained on the same 1.1 MB of the standard
    library's sources, and one of 4096 on every other file of it (about 4 s); the texts held out from all three.
    The tests against GOLD's merge and loss take the first text's start and the non-ASCII one: GOLD's loop over
    the groups makes its backward quadratic in their number."""
    train, held_out = demo_lm.corpus(1_500_000)
    tokenizers = {
        "4096": demo_lm.tokenizer(train, 4096),
        "16384": demo_lm.tokenizer(train, 16384),
        "4096-other": demo_lm.tokenizer(train[1::2], 4096),
    }
    assert [t.get_vocab_size() for t in tokenizers.values()] == [4096, 16384, 4096]
    texts = [held_out[0][:600], held_out[1][200:700], NON_ASCII, held_out[2][:300] + NON_ASCII]
    return tokenizers, texts


# (student, teacher): the 16384 BPE's merges extend the 4096's (the same text), so its tokens are unions of the
# other's: groups of several tokens on the 4096 side only, either way round; the BPE of other text cuts elsewhere,
# so groups of several tokens on both sides.
PAIRS = [("4096", "16384"), ("16384", "4096"), ("4096", "4096-other")]


def test_byte_offsets_equal_trls(corpus):
    tokenizers, texts = corpus
    for tokenizer in tokenizers.values():
        want = encode_with_byte_offsets(tokenizer, texts)
        for text, (ids, offsets) in zip(texts, want):
            assert alignment.byte_offsets(tokenizer, text) == (ids, [tuple(o) for o in offsets])


@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
def test_groups_cover_the_same_bytes_and_equal_golds(corpus, pair):
    tokenizers, texts = corpus
    several = []
    for text in texts:
        (_, s_offsets), (_, t_offsets) = (alignment.byte_offsets(tokenizers[name], text) for name in pair)
        groups = alignment.align_groups(s_offsets, t_offsets)
        start = 0
        for s, t in groups:
            assert s_offsets[s[0]][0] == t_offsets[t[0]][0] == start
            start = s_offsets[s[-1]][1]
            assert t_offsets[t[-1]][1] == start
            several.append((len(s) > 1, len(t) > 1))
        assert start == len(text.encode())
        gold = ULDLoss._align_by_byte_offsets([list(o) for o in s_offsets], [list(o) for o in t_offsets])
        assert [(list(s), list(t)) for s, t in groups] == [(s, t) for s, t in zip(*gold) if s and t]
    counts = {kind: several.count(kind) for kind in ((True, False), (False, True), (True, True))}
    if pair == ("4096", "16384"):
        assert counts[(True, False)] > 10 and counts[(False, True)] == counts[(True, True)] == 0, counts
    elif pair == ("16384", "4096"):
        assert counts[(False, True)] > 10 and counts[(True, False)] == counts[(True, True)] == 0, counts
    else:
        assert min(counts.values()) > 0, counts


def _gold(strategy: str, hybrid: bool, student, teacher, temperatures=(1.0, 1.0)) -> ULDLoss:
    config = gold_config(
        uld_student_temperature=temperatures[0],
        uld_teacher_temperature=temperatures[1],
        use_extended_uld=True,
        uld_token_merge_strategy=strategy,
        uld_use_hybrid_loss=hybrid,
    )
    return ULDLoss(config, student, teacher)


def _batch(tokenizer, texts, seed, strategy):
    """GOLD's inputs for one model: a prompt token at position 0, then each text's tokens, right-padded: input ids,
    labels, byte offsets [B, L, 2] and logits [B, L, V] (float64; each actual token's logit raised at the row that
    the strategy reads with it, so that merged probabilities stay above GOLD's 1e-8 clamps)."""
    encoded = [alignment.byte_offsets(tokenizer, text) for text in texts]
    length = 2 + max(len(ids) for ids, _ in encoded)
    ids = torch.zeros(len(texts), length, dtype=torch.int64)
    labels = torch.full_like(ids, -100)
    offsets = torch.zeros(len(texts), length, 2, dtype=torch.int64)
    for i, (tokens, spans) in enumerate(encoded):
        ids[i, 1 : 1 + len(tokens)] = labels[i, 1 : 1 + len(tokens)] = torch.tensor(tokens)
        offsets[i, 1 : 1 + len(tokens)] = torch.tensor(spans)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*ids.shape, tokenizer.get_vocab_size(), generator=g, dtype=torch.float64) * 0.5
    rows = torch.arange(len(texts)).unsqueeze(-1)
    if strategy == "observed":
        logits[rows, torch.arange(length), ids] += 12.0
    else:
        logits[rows, torch.arange(length - 1), ids[:, 1:]] += 12.0
    return encoded, ids, labels, offsets, logits


def _aligned(tokenizers, pair, texts, strategy, seeds):
    """Both models' GOLD batches (_batch) and the kdkernels Alignment of the same texts (a short selection)."""
    texts = [texts[0][:150], NON_ASCII]
    batches = [_batch(tokenizers[name], texts, seed, strategy) for name, seed in zip(pair, seeds)]
    first_row = 1 if strategy == "observed" else 0  # the tokens' own rows, or the rows that predict them
    built = alignment.build_alignment(
        *([alignment.Tokens(*e, first_row) for e in batch[0]] for batch in batches), strategy
    )
    return batches, built, first_row


@pytest.mark.parametrize("strategy", alignment.STRATEGIES)
@pytest.mark.parametrize("pair", PAIRS[1:], ids="-".join)
def test_merged_rows_equal_golds(corpus, pair, strategy):
    """The teacher's side merged as GOLD merges it (its groups of several tokens: the 4096 side of both pairs)."""
    tokenizers, texts = corpus
    batches, built, first_row = _aligned(tokenizers, pair, texts, strategy, seeds=(1, 2))
    logits = batches[1][4]
    rows, scale = alignment.merge_groups(logits, built.teacher, temperature=1.5)
    merged = scale.exp().unsqueeze(-1) * torch.softmax(rows / 1.5, -1)
    gold = _gold(strategy, False, *(tokenizers[name] for name in pair))
    want = []
    for i, ((_, s_offsets), (tokens, t_offsets)) in enumerate(zip(batches[0][0], batches[1][0])):
        groups = [list(t) for _, t in alignment.align_groups(s_offsets, t_offsets)]
        probs = torch.softmax(logits[i, first_row : first_row + len(tokens)] / 1.5, -1)
        want.append(gold._merge_probabilities_with_alignment_groups(probs, groups, tokens))
    assert torch.allclose(merged, torch.cat(want), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize(
    "pair, strategy, method",
    [
        (PAIRS[0], "observed", "uld"),
        (PAIRS[1], "bayesian", "uld"),
        (PAIRS[2], "observed", "hybrid"),
        (PAIRS[2], "bayesian", "uld"),
    ],
    ids=lambda x: "-".join(x) if isinstance(x, tuple) else x,
)
def test_aligned_loss_equals_golds(corpus, pair, strategy, method):
    """GOLD's ULDLoss with use_extended_uld on the same batch (its observed strategy reads the rows at the tokens'
    own positions, bayesian the rows before): values and the student's gradient to float64 rounding."""
    tokenizers, texts = corpus
    student, teacher = (tokenizers[name] for name in pair)
    temperatures = (1.0, 1.0) if method == "hybrid" else (1.3, 0.9)
    gold = _gold(strategy, method == "hybrid", student, teacher, temperatures)
    (s_batch, t_batch), built, _ = _aligned(tokenizers, pair, texts, strategy, seeds=(3, 4))
    s_logits = s_batch[4].requires_grad_(True)
    want = gold(s_logits, t_batch[4], s_batch[2], t_batch[2], s_batch[1], t_batch[1], s_batch[3], t_batch[3])
    (want_grad,) = torch.autograd.grad(want, s_logits)

    logits = s_logits.detach().requires_grad_(True)
    hybrid = {"vocab_map": kdkernels.vocab_map(student, teacher)} if method == "hybrid" else {}
    rows = alignment.aligned_cross_vocab_loss(
        method,
        logits,
        t_batch[4],
        built,
        temperature=temperatures[0],
        teacher_temperature=temperatures[1],
        reduction="none",
        **hybrid,
    )
    loss = built.example_mean(rows)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(loss, want, rtol=1e-12, atol=0), (loss.item(), want.item())
    assert torch.allclose(grad, want_grad, rtol=1e-9, atol=1e-15)


def test_vocab_map_of_the_trained_tokenizers(corpus):
    tokenizers, _ = corpus
    for pair in PAIRS:
        student, teacher = (tokenizers[name] for name in pair)
        shared = kdkernels.vocab_map(student, teacher)
        gold = _gold("observed", True, student, teacher)
        assert dict(zip(shared.teacher_ids.tolist(), shared.student_ids.tolist())) == gold._vocab_mapping
    # The 16384 BPE extends the 4096 one (same text, same merges first): the smaller vocabulary is all shared.
    shared = kdkernels.vocab_map(tokenizers["4096"], tokenizers["16384"])
    assert len(shared) == 4096 and shared.summary().endswith("the teacher's of 16384 (25.0%)")


def test_bad_input_names_the_argument():
    tokens = alignment.Tokens([5, 6], [(0, 1), (1, 3)], 0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        alignment.build_alignment([tokens], [tokens], "first")
    with pytest.raises(ValueError, match=r"teacher\[0\]: ids and offsets must have one entry per token"):
        alignment.build_alignment([tokens], [tokens._replace(ids=[5])])
    with pytest.raises(ValueError, match="student and teacher must hold the same examples"):
        alignment.build_alignment([tokens], [])
    lossy = demo_lm.tokenizer(["ab ab"], 300)
    lossy.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match="tokens' bytes do not spell the text"):
        alignment.byte_offsets(lossy, "AB")
