"""Carried state (truncated backpropagation through time) and chats that are never cut
blind: `data.StreamDataset`, `TrainConfig.carry_state`, `data.fit_chats`.

Tiny models in float32 on one thread; seconds in all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import random_model

from rgemma.config import GriffinConfig
from rgemma.data import (
    Document,
    PackedDataset,
    StreamDataset,
    TokenizedDocument,
    build_datasets,
    fit_chat,
    fit_chats,
    tokenize_document,
)
from rgemma.errors import ConfigError, InputError
from rgemma.state import GriffinState
from rgemma.tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer
from rgemma.training import TrainConfig, find_checkpoints, train
from rgemma.training.config import check_carry_state
from rgemma.training.objective import LMObjective

CFG = GriffinConfig.preset("test-tiny")  # window 8: shorter than every document here


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(BUNDLED_TOKENIZER_PATH)


def _docs(lengths, seed: int = 0, vocab: int = 256) -> list[TokenizedDocument]:
    """Random documents `<bos>=2 ...`, ids >= 3, every token but the first trained."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = np.concatenate([[2], rng.integers(3, vocab, n - 1)]).astype(np.int32)
        out.append(TokenizedDocument(t, np.arange(n) > 0))
    return out


def _whole(ds: StreamDataset, epoch: int = 0) -> list[torch.Tensor]:
    """All micro-batches of micro-batch group 0 of an epoch, joined along time:
    (tokens, segment_pos, targets, loss_mask), each (b, segments * t)."""
    n = ds.steps_per_epoch
    batches = [ds.batch(epoch * n + i) for i in range(0, n, ds.grad_accum)]
    return [torch.cat([getattr(b, f) for b in batches], dim=1) for f in batches[0]._fields]


# ----------------------------------------------------------------------------------
# Exactness: segments with carried state == one pass
# ----------------------------------------------------------------------------------
def test_segments_with_undetached_state_equal_one_pass():
    """Nothing detached: the summed loss and every gradient of the segments equal one
    pass over the whole streams (two documents in one stream, one in the other)."""
    model = random_model(CFG, std=0.2).train()
    objective = LMObjective(model)
    ds = StreamDataset(_docs([40, 55, 95]), seq_len=16, batch_size=2, shuffle=False)
    assert [m.tolist() for m in ds._members] == [[2], [0, 1]] and ds.segments_per_epoch == 6

    whole = _whole(ds)
    nll, _ = objective(*whole)
    nll.backward()
    expect = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    total, state = torch.zeros(()), None
    for i in range(len(ds)):
        part, state = objective(*ds.batch(i), state)  # the state keeps its graph
        total = total + part
    total.backward()
    torch.testing.assert_close(total, nll, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        # float32 summation order: errors up to ~1e-6 of the tensor's largest gradient
        scale = float(expect[name].abs().max())
        torch.testing.assert_close(p.grad, expect[name], rtol=1e-5, atol=1e-5 * scale, msg=name)

    # Detached: the loss is the same (the forward is exact), the gradients are not
    # (those through earlier segments are cut).
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for i in range(len(ds)):
        part, new = objective(*ds.batch(i), ds.carried_state(0))
        ds.set_carried_state(0, new)
        total = total + part
    total.backward()
    torch.testing.assert_close(total, nll, rtol=1e-6, atol=0)
    a_param = "blocks.0.recurrent_block.rg_lru.a_param"
    grad = dict(model.named_parameters())[a_param].grad
    assert not torch.allclose(grad, expect[a_param], rtol=1e-3, atol=0)


@pytest.mark.parametrize("first_len", [32, 37])  # B starts a segment / inside one
def test_documents_in_a_stream_never_see_each_other(first_len):
    """A then B in one stream of segments of 16: B's logits are those of B alone, and
    no gradient of B's loss reaches A's inputs (attention window, Conv1D, RG-LRU),
    with the state carried undetached across segments."""
    model = random_model(CFG, std=0.2)
    a, b = _docs([first_len, 50], seed=1)
    ds = StreamDataset([a, b], seq_len=16, batch_size=1, shuffle=False)
    tokens, pos, _, _ = _whole(ds)
    assert tokens[0, : first_len + 50].tolist() == a.tokens.tolist() + b.tokens.tolist()
    assert pos[0, first_len] == 0 and pos[0, first_len - 1] == first_len - 1

    embeds, outs, states = [], [], model.init_state(1).blocks
    for i in range(len(ds)):
        batch = ds.batch(i)
        x = model.embedder.encode(batch.tokens).detach().requires_grad_(True)
        embeds.append(x)
        new = []
        for block, state in zip(model.blocks, states):
            x, state = block(x, batch.segment_pos, state)
            new.append(state)
        outs.append(x)
        states = new
    out = torch.cat(outs, dim=1)  # (1, segments * t, d) before the final norm
    with torch.no_grad():
        logits = model.embedder.decode(model.final_norm(out)).float()
        logits = torch.tanh(logits / CFG.logits_soft_cap) * CFG.logits_soft_cap
        alone, _ = model(torch.from_numpy(b.tokens).long()[None])
    span = slice(first_len, first_len + 50)
    torch.testing.assert_close(logits[:, span], alone, rtol=1e-5, atol=1e-5)
    out[:, span].sum().backward()
    grads = torch.cat([e.grad for e in embeds], dim=1)[0]  # (segments * t, d)
    assert grads[:first_len].abs().max() == 0
    assert grads[span].abs().min(dim=-1).values.gt(0).all()


# ----------------------------------------------------------------------------------
# Bounded memory with detaching
# ----------------------------------------------------------------------------------
def _graph_nodes(t: torch.Tensor) -> int:
    """Autograd nodes reachable from `t`: the graph backward will walk."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    return len(seen)


def _segment_step(objective, batch, state):
    """Forward of one segment under a saved-tensor hook: (loss, new state, bytes that
    autograd saves for the backward)."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, new = objective(*batch, state)
    return nll, new, saved[0]


def test_detached_training_of_a_32k_document_has_bounded_memory():
    """A 32,768-token document trained in 64 segments of 512: the autograd graph and
    the tensors it keeps for the backward are the same size at token 32k as at token
    512, the state is fixed in size, and positions run on to 32,767. Without the
    detach, the graph grows with every segment (so the measure can fail)."""
    model = random_model(CFG, std=0.2).train()
    objective = LMObjective(model)
    n = 32_768
    ds = StreamDataset(_docs([n]), seq_len=512, batch_size=1, shuffle=False)
    assert len(ds) == 64
    nodes, saved, state_bytes, last_pos = [], [], set(), 0
    for i in range(len(ds)):
        batch = ds.batch(i)
        nll, new, nbytes = _segment_step(objective, batch, ds.carried_state(0))
        nodes.append(_graph_nodes(nll))
        saved.append(nbytes)
        nll.backward()
        ds.set_carried_state(0, new)
        state_bytes.add(new.nbytes())
        model.zero_grad(set_to_none=True)
        assert batch.segment_pos[0, 0] == last_pos  # continuous across segments
        last_pos = int(batch.segment_pos[0, -1]) + 1
    assert last_pos == n
    # Segment 0 starts from no state (a fresh window is skipped); every later one,
    # from position 512 to 32k, builds the same graph and saves the same bytes.
    assert len(set(nodes[1:])) == 1 and len(set(saved[1:])) == 1 and len(state_bytes) == 1
    assert nodes[0] <= nodes[1] and saved[0] <= saved[1]
    assert saved[-1] < 20 * 2**20  # about 14 MB: activations of 512 tokens only

    grown, state = [], None
    for i in range(3):  # the same segments, nothing detached
        nll, state, _ = _segment_step(objective, ds.batch(i), state)
        grown.append(_graph_nodes(nll))
    # ... each segment adds its own graph (all but the shared parameter leaves).
    assert grown[0] == nodes[0] and min(grown[1] - grown[0], grown[2] - grown[1]) > nodes[1] / 2


# ----------------------------------------------------------------------------------
# The stream dataset
# ----------------------------------------------------------------------------------
def _split_documents(tokens: list[int], pos: list[int], bos: int = 2) -> list[list[int]]:
    """A stream's tokens cut at each `<bos>` with position 0, padding (id 0) dropped;
    asserts that positions count 0, 1, 2, ... inside each document."""
    docs: list[list[int]] = []
    for t, p in zip(tokens, pos):
        if t == bos and p == 0:
            docs.append([])
        elif t == 0:  # padding: position 0, only after the stream's last document
            assert p == 0
            continue
        assert docs and p == len(docs[-1])
        docs[-1].append(t)
    return docs


def test_stream_dataset_covers_every_token_once_in_order():
    docs = _docs(np.random.default_rng(3).integers(2, 80, 30), seed=3)
    ds = StreamDataset(docs, seq_len=16, batch_size=2, grad_accum=2, seed=5, num_epochs=2)
    assert ds.num_streams == 4 and len(ds) == ds.segments_per_epoch * 2
    batches = list(ds)
    assert len(batches) == 2 * len(ds)
    contents = sorted(d.tokens.tolist() for d in docs)
    orders = []
    for epoch in range(2):
        streams = {g: [] for g in range(4)}  # global stream -> its micro-batches in order
        for i in range(len(ds)):
            group = i % 2
            for row, g in enumerate(ds.streams(group)):
                streams[g].append([x[row] for x in batches[epoch * len(ds) + i]])
        seen = []
        for parts in streams.values():
            tokens = torch.cat([p[0] for p in parts]).tolist()
            pos = torch.cat([p[1] for p in parts]).tolist()
            targets = torch.cat([p[2] for p in parts]).tolist()
            mask = torch.cat([p[3] for p in parts]).tolist()
            assert targets[:-1] == tokens[1:]  # the next token, across segments
            found = _split_documents(tokens, pos)
            seen += found
            # A target is learned iff it is the next token of the same document.
            same_doc = [pos[i + 1] == pos[i] + 1 for i in range(len(pos) - 1)]
            assert [bool(m) for m in mask[:-1]] == same_doc
        assert sorted(seen) == contents  # every document exactly once
        orders.append(seen)
    assert orders[0] != orders[1]  # each epoch reorders the streams


def test_stream_rows_of_ranks_are_slices_of_one_process():
    docs = _docs(np.random.default_rng(4).integers(2, 60, 24), seed=4)
    one = StreamDataset(docs, seq_len=8, batch_size=4, grad_accum=2, seed=1)
    ranks = [
        StreamDataset(docs, seq_len=8, batch_size=2, grad_accum=2, seed=1, world_size=2, rank=r)
        for r in range(2)
    ]
    assert ranks[0].num_streams == one.num_streams == 8
    for step in (0, 1, 5, len(one) + 3):
        whole = one.batch(step)
        for r, ds in enumerate(ranks):
            part = ds.batch(step)
            for x, y in zip(whole, part):
                assert torch.equal(x[2 * r : 2 * r + 2], y)


def _random_state(batch: int) -> GriffinState:
    state = random_model(CFG).init_state(batch)
    g = torch.Generator().manual_seed(0)
    blocks = tuple(
        type(s)(
            *(
                t.random_(0, 7, generator=g) if t.dtype == torch.long else t.normal_(generator=g)
                for t in s
            )
        )
        for s in state.blocks
    )
    return GriffinState(blocks, torch.arange(batch))


def test_stream_state_dict_round_trip_and_errors(tmp_path):
    docs = _docs(np.random.default_rng(5).integers(2, 60, 20), seed=5)
    ds = StreamDataset(docs, seq_len=8, batch_size=2, grad_accum=2)
    assert ds.state_dict()["carried"] is None
    states = [_random_state(2), _random_state(2)]
    for _ in range(2):
        next(iter(ds))
    for j, s in enumerate(states):
        ds.set_carried_state(j, s)
    torch.save(ds.state_dict(), tmp_path / "data.pt")
    saved = torch.load(tmp_path / "data.pt", weights_only=True)
    assert saved["step"] == 2 and saved["carried"]["next_pos"].tolist() == [0, 1, 0, 1]
    other = StreamDataset(docs, seq_len=8, batch_size=2, grad_accum=2)
    other.load_state_dict(saved)
    assert other.step == 2
    for j, s in enumerate(states):
        got = other.carried_state(j)
        assert all(torch.equal(x, y) for x, y in zip(_flat(got), _flat(s)))
    wide = StreamDataset(docs, seq_len=8, batch_size=4, grad_accum=1)  # 4 streams too
    with pytest.raises(InputError, match="saved with num_streams=4, but this dataset has"):
        StreamDataset(docs, seq_len=8, batch_size=1, grad_accum=2).load_state_dict(saved)
    with pytest.raises(InputError, match="saved with grad_accum=2, but this dataset has"):
        wide.load_state_dict(saved)

    with pytest.raises(InputError, match="saved by a run with carry_state=false"):
        other.load_state_dict(PackedDataset(docs, 8, 2).state_dict())
    with pytest.raises(InputError, match="saved by a run with carry_state=true"):
        PackedDataset(docs, 8, 2).load_state_dict(saved)
    with pytest.raises(InputError, match="at step 2 has no carried state"):
        other.load_state_dict({**saved, "carried": None})
    with pytest.raises(InputError, match="expected 4 \\(one per stream\\)"):
        other.load_state_dict({**saved, "carried": {"next_pos": torch.zeros(3)}})
    next(iter(ds))  # a micro-batch of the next step fetched, its state not handed back
    with pytest.raises(InputError, match="inside an optimiser step of 2"):
        ds.state_dict()
    with pytest.raises(InputError, match=r"4 streams \(batch_size 2 x ranks 1 x grad_accum 2\)"):
        StreamDataset(docs[:3], seq_len=8, batch_size=2, grad_accum=2)


def _stream_ids_state(ds: StreamDataset, group: int) -> GriffinState:
    """A state whose every value in row k is the global stream index of that row."""
    state = random_model(CFG).init_state(ds.batch_size)
    ids = torch.tensor(ds.streams(group))
    for t in _flat(state):
        t.copy_(ids.view(-1, *[1] * (t.ndim - 1)).expand_as(t))
    return state


def _gather_worker(rank: int, init_file: str, out: str) -> None:
    """Rank `rank` of 2 (gloo): carry stream-id states, write the gathered state_dict."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        docs = _docs(np.random.default_rng(8).integers(2, 40, 16), seed=8)
        ds = StreamDataset(docs, seq_len=8, batch_size=2, grad_accum=2, world_size=2, rank=rank)
        ds.step = 2 * 5
        for j in range(2):
            ds.set_carried_state(j, _stream_ids_state(ds, j))
        state = ds.state_dict()  # collective
        if rank == 0:
            torch.save(state, out)
    finally:
        torch.distributed.destroy_process_group()


def test_carried_state_is_gathered_from_every_rank_in_stream_order(tmp_path):
    """Two gloo processes each carry the state of their rows; `state_dict` holds all 8
    streams in order, and one process with 4 rows a micro-batch resumes each its own."""
    out = tmp_path / "data.pt"
    torch.multiprocessing.spawn(
        _gather_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True
    )
    state = torch.load(out, weights_only=True)
    assert state["step"] == 10 and state["num_streams"] == 8
    for name, t in state["carried"].items():
        rows = t.reshape(8, -1).double()
        assert (rows == torch.arange(8.0)[:, None]).all(), name
    docs = _docs(np.random.default_rng(8).integers(2, 40, 16), seed=8)
    one = StreamDataset(docs, seq_len=8, batch_size=4, grad_accum=2)
    one.load_state_dict(state)
    for j in range(2):
        assert (
            one.carried_state(j).next_pos.tolist()
            == one.streams(j)
            == [4 * j + k for k in range(4)]
        )


def _flat(state: GriffinState) -> list[torch.Tensor]:
    return [state.next_pos, *(t for s in state.blocks for t in s)]


# ----------------------------------------------------------------------------------
# Through `train`: resume with carried state equals the uninterrupted run
# ----------------------------------------------------------------------------------
def _corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "far", "away"]
    paras = [" ".join(rng.choice(words, 40)) + "." for _ in range(120)]
    path = tmp_path / "train.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


def _carry_cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = {
        "model": {"preset": "test-tiny", "vocab_size": 4096},
        "tokenizer": str(BUNDLED_TOKENIZER_PATH),
        "train_data": [str(_corpus(tmp_path))],
        "val_fraction": 0.0,
        "doc_chars": 700,  # about 150 tokens: each spans several segments of 32
        "seq_len": 32,
        "batch_size": 2,
        "grad_accum": 2,
        "carry_state": True,
        "max_steps": 6,
        "warmup_steps": 1,
        "lr": 3e-3,
        "save_every": 3,
        "keep_last": 5,
        "eval_every": 0,
        "log_every": 1,
        "out_dir": str(tmp_path / "run"),
        "progress": False,
        "save_final": False,
        "num_threads": 1,
    }
    base.update(kw)
    return TrainConfig(**base)


def test_train_with_carried_state_resumes_exactly(tmp_path, tok):
    cfg = _carry_cfg(tmp_path)
    full = train(cfg)
    assert [s for s, _ in full["losses"]] == [1, 2, 3, 4, 5, 6]
    ckpts = dict(find_checkpoints(cfg.out_dir))
    assert sorted(ckpts) == [3, 6]
    # Step 4 continues documents in the middle: the carried state matters there.
    train_set, _ = build_datasets(
        cfg.train_data,
        tok,
        32,
        2,
        val_fraction=0.0,
        doc_chars=700,
        carry_state=True,
        grad_accum=2,
    )
    assert isinstance(train_set, StreamDataset) and train_set.num_streams == 4
    assert (train_set.batch(3 * 2).segment_pos[:, 0] > 0).any()

    shutil.rmtree(ckpts[6])  # as if the run had stopped after the checkpoint of step 3
    resumed = train(cfg.replace(resume=True))
    assert resumed["losses"] == full["losses"][3:]  # bitwise
    lines = (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if json.loads(x).get("event") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_carry_state_needs_a_segment_of_one_window(tmp_path):
    cfg = _carry_cfg(tmp_path, seq_len=6)
    with pytest.raises(ConfigError, match="seq_len 6 is shorter than the model's attention_window"):
        check_carry_state(cfg, CFG)
    with pytest.raises(ConfigError, match="set seq_len >= 8, or carry_state=false"):
        train(cfg)
    check_carry_state(cfg.replace(carry_state=False), CFG)  # packed rows take any length
    recurrent_only = GriffinConfig.from_dict({**CFG.to_dict(), "block_types": ["recurrent"] * 2})
    check_carry_state(cfg, recurrent_only)


# ----------------------------------------------------------------------------------
# Chats: shortened from the left with a warning, never cut blind
# ----------------------------------------------------------------------------------
def _chat(*contents: str, system: str | None = None) -> Document:
    """user, model, user, model, ... with the given contents."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    messages += [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]
    return Document("test", messages=tuple(messages))


def test_fit_chat_keeps_the_start_and_the_latest_exchange(tok):
    long = "word " * 30
    turns = (
        "Hello there.",
        "Hi! " + long,
        "What now? " + long,
        "This. " + long,
        "Why?",
        "Because.",
    )
    doc = tokenize_document(_chat(*turns, system="Be brief."), tok)
    # The first user turn (the system prompt folded in) and the last exchange.
    expect = tokenize_document(
        Document(
            "x",
            messages=(
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": turns[0]},
                {"role": "user", "content": turns[4]},
                {"role": "assistant", "content": turns[5]},
            ),
        ),
        tok,
    )
    n = len(expect.tokens)
    fitted, lost = fit_chat(doc, n + 5)  # room for the first turn and the last exchange only
    assert lost == 2  # the two earlier replies
    assert fitted.tokens.tolist() == expect.tokens.tolist()
    assert fitted.trainable.tolist() == expect.trainable.tolist()
    assert fitted.turn_starts.tolist() == expect.turn_starts.tolist()
    assert tok.decode(fitted.tokens[fitted.trainable]) == "Because.<end_of_turn>"

    # Too small for the first turn beside the last exchange: the last exchange alone.
    alone = tokenize_document(_chat(turns[4], turns[5]), tok)
    fitted, lost = fit_chat(doc, len(alone.tokens))
    assert fitted.tokens.tolist() == alone.tokens.tolist() and lost == 2
    # Not even the last exchange: dropped, all three replies lost.
    assert fit_chat(doc, len(alone.tokens) - 1) == (None, 3)
    assert fit_chat(doc, len(doc.tokens)) == (doc, 0)  # fits: unchanged


def test_fit_chats_warns_with_counts_and_packing_never_cuts_a_chat(tmp_path, tok):
    short = [_chat(f"Question {i}?", f"Answer {i}.") for i in range(9)]
    long = "many words " * 20
    too_long = _chat("Start.", "One. " + long, "Two?", "Two. " + long, "Three?", "Three.")
    hopeless = _chat("Tell me everything.", "Everything: " + long * 3)
    rows = [{"messages": list(d.messages)} for d in (*short, too_long, hopeless)]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")

    warnings_seen: list[str] = []
    train_set, _ = build_datasets(
        data, tok, seq_len=64, batch_size=2, val_fraction=0.0, warn=warnings_seen.append
    )
    assert warnings_seen == [
        (
            "2 of 11 chats are longer than 64 tokens: 1 shortened (oldest turns dropped, "
            "the first user turn kept where it fits), 1 dropped (their last exchange alone "
            "is longer), 3 replies not trained; raise seq_len above 64, or set "
            "carry_state=true to train them whole"
        )
    ]
    assert len(train_set.docs) == 10 and max(len(d.tokens) for d in train_set.docs) <= 64
    # Every sequence starts with a chat's <bos> or is padding: no chat runs on from
    # the previous sequence, so no reply is trained without its conversation; and
    # every reply token of the kept chats is learned once per epoch.
    packed = PackedDataset(train_set.docs, 64, 2, drop_last=False, num_epochs=1)
    learned = 0
    for b in packed:
        assert set(b.tokens[:, 0].tolist()) <= {tok.bos_id, tok.pad_id}
        learned += int(b.loss_mask.sum())
    assert learned == sum(int(d.trainable.sum()) for d in train_set.docs)

    # Carried state takes them whole, nothing shortened or dropped, no warning.
    warnings_seen.clear()
    streams, _ = build_datasets(
        data,
        tok,
        seq_len=64,
        batch_size=2,
        val_fraction=0.0,
        carry_state=True,
        warn=warnings_seen.append,
    )
    assert warnings_seen == [] and len(streams.docs) == 11


def test_packing_keeps_completions_whole_beside_running_text():
    """Text runs on across sequences; documents with a prompt (kind 'completion' or
    'chat') of at most seq_len lie whole in one sequence; every token once per epoch."""
    text = _docs([30, 17, 45], seed=6)
    whole = [d._replace(kind="completion") for d in _docs([9, 12, 5, 16, 3, 11], seed=7)]
    docs = [text[0], whole[0], whole[1], text[1], *whole[2:], text[2]]
    ds = PackedDataset(docs, seq_len=16, batch_size=2, seed=3, drop_last=False, num_epochs=1)
    assert ds.num_sequences == 6 + 4  # ceil(92 / 16) text rows; best fit 16|12 3|11 5|9
    found = []
    for b in ds:
        for tokens, pos in zip(b.tokens.tolist(), b.segment_pos.tolist()):
            row = [t for t in tokens if t != 0]
            for d in whole:  # a whole document is a contiguous run starting at position 0
                n = len(d.tokens)
                for i in range(len(tokens) - n + 1):
                    if tokens[i : i + n] == d.tokens.tolist():
                        assert pos[i : i + n] == list(range(n))
                        found.append(n)
            assert row  # no sequence is padding only
    assert sorted(found) == sorted(len(d.tokens) for d in whole)
    everything = torch.cat(
        [b.tokens.flatten() for b in PackedDataset(docs, 16, 10, shuffle=False, num_epochs=1)]
    )
    assert sorted(everything[everything != 0].tolist()) == sorted(
        np.concatenate([d.tokens for d in docs]).tolist()
    )


def test_fit_chats_drops_everything_is_an_error(tok):
    hopeless = tokenize_document(_chat("Hi.", "word " * 80), tok)
    with pytest.raises(
        InputError, match="all 1 documents are chats whose last exchange is longer than 16"
    ):
        fit_chats([hopeless], 16, warn=lambda m: None)
    with (
        pytest.warns(UserWarning, match="1 of 1 chats are longer than 16 tokens"),
        pytest.raises(InputError),
    ):
        fit_chats([hopeless], 16)
