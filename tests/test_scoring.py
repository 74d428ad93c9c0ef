"""The scorer (rgemma.scoring): chunked over the state == one forward pass == a direct
cross-entropy; continuing from a state adds up; batches equal rows alone; bytes are
UTF-8 bytes; bad input is a one-line InputError. Tiny random models, under a second."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import random_model

from rgemma.config import GriffinConfig
from rgemma.errors import InputError
from rgemma.scoring import (
    Score,
    score_batch,
    score_documents,
    score_ids,
    score_text,
    score_texts,
)
from rgemma.tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer

CFG = GriffinConfig.preset("test-tiny")  # window 8: the sequences below outrun it


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=3, std=0.2)


def _ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()


def _direct_nll(model, ids: list[int], mask: list[bool] | None = None) -> float:
    """Summed cross-entropy over one forward pass of the whole sequence."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    nll = F.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]), reduction="none")
    if mask is not None:
        nll = nll[torch.tensor(mask[1:])]
    return float(nll.double().sum())


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 8, 13, 52, 53, 1024])
def test_chunked_equals_one_pass_and_direct_cross_entropy(model, chunk_size):
    ids = _ids(53)
    direct = _direct_nll(model, ids)
    assert direct > 50  # a random model: about ln(256) nats per token
    got = score_ids(model, ids, chunk_size=chunk_size)
    assert got.tokens == 52 and got.bytes == 0
    assert got.nll == pytest.approx(direct, rel=2e-6)
    assert got.nll_per_token == pytest.approx(direct / 52, rel=2e-6)
    assert score_ids(model, torch.tensor(ids), chunk_size=chunk_size) == got  # tensor input
    assert score_ids(model, np.array(ids), chunk_size=chunk_size) == got  # numpy input


@pytest.mark.parametrize("k", [1, 7, 30, 51])
def test_continuing_from_a_state_equals_the_concatenation(model, k):
    ids = _ids(53, seed=1)
    whole = score_ids(model, ids, chunk_size=6)
    with torch.no_grad():
        _, state = model(torch.tensor([ids[:k]]))  # the state after ids[:k]
    head = score_ids(model, ids[: k + 1], chunk_size=4)
    tail = score_ids(model, ids[k:], state=state, chunk_size=5)
    assert head.tokens + tail.tokens == whole.tokens == 52
    assert head.nll + tail.nll == pytest.approx(whole.nll, rel=2e-6)
    # Without the state the tail is a different (worse-informed) score.
    assert abs(score_ids(model, ids[k:]).nll - tail.nll) > 1e-3


def test_mask_scores_only_the_marked_tokens(model):
    ids = _ids(40, seed=2)
    mask = [i % 3 == 0 or 20 <= i < 25 for i in range(40)]
    got = score_ids(model, ids, mask=mask, chunk_size=7)
    assert got.tokens == sum(mask[1:])
    assert got.nll == pytest.approx(_direct_nll(model, ids, mask), rel=2e-6)
    none = score_ids(model, ids, mask=[True] + [False] * 39)
    assert none == Score(0.0, 0, 0)


def test_batch_equals_rows_alone_in_order(model):
    rows = [_ids(2, 3), _ids(41, 4), _ids(17, 5), _ids(9, 6)]
    alone = [score_ids(model, r, num_bytes=10 * i) for i, r in enumerate(rows)]
    batched = score_batch(model, rows, num_bytes=[0, 10, 20, 30], chunk_size=6)
    assert [s.tokens for s in batched] == [1, 40, 16, 8]
    for a, b in zip(alone, batched):
        assert b.nll == pytest.approx(a.nll, rel=2e-6) and b.bytes == a.bytes
    docs = score_documents(model, rows, batch_size=3, chunk_size=5)
    assert [s.tokens for s in docs] == [1, 40, 16, 8]
    for a, b in zip(alone, docs):
        assert b.nll == pytest.approx(a.nll, rel=2e-6)
    total = sum(docs)
    assert total.tokens == 65 and total.nll == pytest.approx(sum(s.nll for s in alone), rel=2e-6)


def test_text_bytes_are_utf8_and_eos_is_scored():
    tok = Tokenizer(BUNDLED_TOKENIZER_PATH)
    model = random_model(dataclasses.replace(CFG, vocab_size=tok.vocab_size), seed=4, std=0.2)
    text = "Naïve café, Zürich — 東京 😀"
    score = score_text(model, tok, text, chunk_size=3)
    assert score.bytes == len(text.encode("utf-8")) == 37 and len(text) == 25
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert score.tokens == len(ids) - 1
    assert score.nll == pytest.approx(_direct_nll(model, ids), rel=2e-6)
    assert score.bits_per_byte == pytest.approx(score.nll / math.log(2) / 37)
    assert score.perplexity == pytest.approx(math.exp(score.nll / score.tokens))
    empty = score_text(model, tok, "")  # only EOS is predicted
    assert (empty.tokens, empty.bytes) == (1, 0) and math.isnan(empty.bits_per_byte)
    many = score_texts(model, tok, ["", text], batch_size=2)
    assert many[0].nll == pytest.approx(empty.nll, rel=2e-6)
    assert many[1].nll == pytest.approx(score.nll, rel=2e-6) and many[1].bytes == 37


def test_score_arithmetic():
    a, b = Score(3.0, 2, 10), Score(1.5, 4, 2)
    assert a + b == Score(4.5, 6, 12)
    assert sum([a, b]) == Score(4.5, 6, 12) and sum([a]) == a
    assert a.nll_per_token == 1.5 and a.perplexity == pytest.approx(math.exp(1.5))
    assert a.bits_per_byte == pytest.approx(3.0 / math.log(2) / 10)
    assert math.isnan(Score().nll_per_token) and math.isnan(Score().perplexity)
    assert Score(1e6, 1).perplexity == math.inf
    assert a.to_dict()["perplexity"] == a.perplexity
    with pytest.raises(TypeError):
        a + 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: score_ids(m, []), "0 token"),
        (lambda m: score_ids(m, [5]), "1 token"),
        (lambda m: score_ids(m, torch.tensor([5])), "1 token"),
        (lambda m: score_ids(m, [5, 6], chunk_size=0), "chunk_size must be an int >= 1, got 0"),
        (lambda m: score_ids(m, [5, 6], chunk_size=-3), "chunk_size"),
        (lambda m: score_ids(m, [5, 6], chunk_size=2.5), "chunk_size"),
        (lambda m: score_ids(m, [5, 6], chunk_size=True), "chunk_size"),
        (lambda m: score_ids(m, [5, CFG.vocab_size]), "token id 256 is out of range"),
        (lambda m: score_ids(m, [5, -1]), "token id -1 is out of range"),
        (lambda m: score_ids(m, [5, 6.0]), "must hold ints"),
        (lambda m: score_ids(m, torch.ones(2, 3, dtype=torch.long)), "1-D integer tensor"),
        (lambda m: score_ids(m, "hello"), "list of token ids"),
        (lambda m: score_ids(m, [5, 6, 7], mask=[True]), "3 bools"),
        (lambda m: score_ids(m, [5, 6], state=m.init_state(2)), "batch size 2"),
        (lambda m: score_batch(m, []), "non-empty"),
        (lambda m: score_documents(m, [[1, 2]], batch_size=0), "batch_size"),
        (lambda m: score_documents(m, [[1, 2], [3]]), "document 1: .*1 token"),
    ],
)
def test_bad_input_is_one_line_input_error(model, call, match):
    with pytest.raises(InputError, match=match) as err:
        call(model)
    assert "\n" not in str(err.value)
