"""Generation: batching, stopping, streaming, sampling, chat and saved states."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest_gen import ScriptedModel, tiny_config, tiny_model, tokenizer
from oracle import random_model

from rgemma.engine import CompiledDecodeStep, Row, RowEngine
from rgemma.errors import CheckpointError, InputError
from rgemma.generation import (
    ChatSession,
    GenerationResult,
    check_vocab,
    compile_decode,
    generate,
    prefill,
    prompt_state,
    stream,
)
from rgemma.sampling import SamplingParams, min_p_filter, sample, top_k_filter, top_p_filter
from rgemma.state import concat_states, load_state, save_state


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def random_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(8, 400, (n - 1,), generator=g).tolist()


def states_close(a, b, atol=1e-5) -> bool:
    ta = [a.next_pos] + [t for s in a.blocks for t in s]
    tb = [b.next_pos] + [t for s in b.blocks for t in s]
    return all(
        x.shape == y.shape and torch.allclose(x.float(), y.float(), atol=atol)
        for x, y in zip(ta, tb)
    )


def state_after(model, ids):
    """State after running `ids` from scratch (batch 1)."""
    return prefill(model, torch.tensor([ids]), None, None)[1]


# ----------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------
def test_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lp = probs.log()
    kept = ~torch.isinf(top_p_filter(lp, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert (~torch.isinf(top_p_filter(lp, 0.01))).sum() == 1  # always the best one
    kept = ~torch.isinf(min_p_filter(lp, 0.5))  # keep p >= 0.25
    assert kept.tolist() == [[True, True, False, False]]


def test_sample_distribution_and_greedy():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log().expand(4000, 4)
    draws = sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[3] == 0
    assert torch.allclose(freq, probs, atol=0.04)
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=0.7, top_k=1), logits.argmax(-1))
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    a = sample(logits, 1.0, generator=gens)
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    assert torch.equal(a, sample(logits, 1.0, generator=gens))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
    ],
)
def test_sample_bad_params(kwargs, name):
    with pytest.raises(InputError, match=name) as err:
        sample(torch.zeros(1, 4), **kwargs)
    assert str(next(iter(kwargs.values()))) in str(err.value)


# ----------------------------------------------------------------------------------
# Batching and prefill
# ----------------------------------------------------------------------------------
def test_batched_greedy_equals_single(model, tok):
    assert model.config.attention_window_size == 8
    prompts = [random_ids(1, 0), random_ids(5, 1), random_ids(40, 2)]
    batched = generate(model, tok, prompts, max_new_tokens=12, chunk_size=7)
    for p, res in zip(prompts, batched):
        alone = generate(model, tok, [p], max_new_tokens=12)[0]
        assert res.token_ids == alone.token_ids
        assert res.text == alone.text == tok.decode(alone.token_ids)
        assert res.prompt_tokens == len(p)
        assert res.finish_reason == "length" and len(res.token_ids) == 12


def test_text_prompts(model, tok):
    prompts = ["", "Hello world", "To be, or not to be, that is the question: whether"]
    batched = generate(model, tok, prompts, max_new_tokens=6)
    assert batched[0].prompt_tokens == 1  # BOS only
    for p, res in zip(prompts, batched):
        ids = tok.encode(p)
        assert res.token_ids == generate(model, tok, [ids], max_new_tokens=6)[0].token_ids
    # A single string is a batch of one.
    assert (
        generate(model, tok, "Hello world", max_new_tokens=6)[0].token_ids == batched[1].token_ids
    )
    assert [r.token_ids for r in generate(model, tok, prompts, max_new_tokens=0)] == [[]] * 3


def test_chunked_prefill_is_exact(model):
    ids = torch.tensor([random_ids(30, 3)])
    full_logits, full_state = prefill(model, ids, chunk_size=1000)
    for chunk in (1, 7):
        logits, state = prefill(model, ids, chunk_size=chunk)
        assert torch.allclose(logits, full_logits, atol=1e-4)
        assert states_close(state, full_state, atol=1e-4)


def test_decode_steps_are_single_tokens(model, tok):
    shapes = []

    class Spy(ScriptedModel):
        def forward(self, tokens, segment_pos=None, state=None, **kw):
            shapes.append(tuple(tokens.shape))
            return self.inner(tokens, segment_pos, state, **kw)

    res = generate(
        Spy(model),
        tok,
        [random_ids(20, 4), random_ids(3, 5)],
        max_new_tokens=5,
        chunk_size=8,
        return_state=True,
    )
    assert shapes[:3] == [(2, 8), (2, 8), (2, 4)]  # chunked prefill
    assert all(s[1] == 1 for s in shapes[3:])  # then one token per step
    assert all(r.state.nbytes() == model.state_nbytes(1) for r in res)


# ----------------------------------------------------------------------------------
# Stopping
# ----------------------------------------------------------------------------------
def test_per_row_stop_on_eos_end_of_turn_and_length(model, tok):
    sm = ScriptedModel(model)
    p0, p1, p2 = random_ids(4, 10), random_ids(7, 11), random_ids(2, 12)
    hello = tok.encode("Hello world", add_bos=False)
    sm.script(p0, hello + [tok.eos_id, 300, 301])
    sm.script(p1, [tok.end_of_turn_id, 302])
    sm.script(p2, hello + hello)
    res = generate(sm, tok, [p0, p1, p2], max_new_tokens=len(hello) + 2, return_state=True)
    assert res[0].token_ids == hello and res[0].text == "Hello world"
    assert res[0].finish_reason == "stop" and res[0].stop_token_id == tok.eos_id
    assert res[1].token_ids == [] and res[1].text == "" and res[1].finish_reason == "stop"
    assert res[1].stop_token_id == tok.end_of_turn_id
    assert res[2].token_ids == (hello + hello)[: len(hello) + 2]
    assert res[2].finish_reason == "length" and res[2].stop_token_id is None
    # Each row's state is that after its prompt and its token_ids.
    for p, r in zip((p0, p1, p2), res):
        assert states_close(r.state, state_after(model, p + r.token_ids))


def test_stop_strings_in_batch(model, tok):
    sm = ScriptedModel(model)
    p0, p1 = random_ids(3, 20), random_ids(6, 21)
    text = "Hello world! The quick brown fox"
    ids = tok.encode(text, add_bos=False)
    sm.script(p0, ids)
    sm.script(p1, ids)
    stops = ["quick", "world"]
    res = generate(sm, tok, [p0, p1], max_new_tokens=40, stop=stops, return_state=True)
    for r in res:
        assert r.text == "Hello "
        assert r.finish_reason == "stop" and r.stop_string == "world"
        decoded = tok.decode(r.token_ids)
        assert "world" in decoded and "world" not in tok.decode(r.token_ids[:-1])
        assert r.token_ids == ids[: len(r.token_ids)]
    assert states_close(res[0].state, state_after(model, p0 + res[0].token_ids))
    # Streaming holds back text that may start a stop string.
    pieces = list(stream(sm, tok, p0, max_new_tokens=40, stop=["fox", "ld!"]))
    assert "".join(pieces) == "Hello wor"


def test_stop_string_real_model(model, tok):
    prompts = [random_ids(5, 30), random_ids(9, 31)]
    free = generate(model, tok, prompts, max_new_tokens=16)
    text0 = free[0].text
    stop = text0[4:7]
    assert len(stop) == 3
    res = generate(model, tok, prompts, max_new_tokens=16, stop=stop)
    assert res[0].text == text0[: text0.index(stop)]
    assert res[0].finish_reason == "stop"
    assert res[0].token_ids == free[0].token_ids[: len(res[0].token_ids)]
    assert len(res[0].token_ids) < 16
    if stop not in free[1].text:
        assert res[1].token_ids == free[1].token_ids


# ----------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------
def test_stream_multibyte(model, tok):
    text = "你好 😀 wörld"
    ids = tok.encode(text, add_bos=False)
    assert any(tok.is_byte(i) for i in ids)
    sm = ScriptedModel(model)
    prompt = random_ids(3, 40)
    sm.script(prompt, ids + [tok.eos_id])
    s = stream(sm, tok, prompt, max_new_tokens=100)
    pieces = list(s)
    assert "".join(pieces) == text == s.result.text
    assert all(p and "\ufffd" not in p for p in pieces)
    assert "你" in pieces[0] or pieces[0] == "你"
    assert s.result.token_ids == ids
    assert generate(sm, tok, [prompt], max_new_tokens=100)[0].text == text


def test_stream_equals_generate_real_model(model, tok):
    for prompt in ("Hello", random_ids(12, 41)):
        for kw in ({}, {"temperature": 1.0, "seed": 5}, {"stop": ["e", "th"]}):
            pieces = list(stream(model, tok, prompt, max_new_tokens=20, **kw))
            assert (
                "".join(pieces) == generate(model, tok, [prompt], max_new_tokens=20, **kw)[0].text
            )


# ----------------------------------------------------------------------------------
# Sampling through generate
# ----------------------------------------------------------------------------------
def test_seeded_sampling(model, tok):
    prompts = [random_ids(6, 50), random_ids(2, 51)]
    kw = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, "min_p": 0.01}
    a = generate(model, tok, prompts, seed=7, **kw)
    b = generate(model, tok, prompts, seed=7, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    c = generate(model, tok, prompts, seed=8, **kw)
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    # Row r uses seed + r, whatever the rest of the batch.
    alone = generate(model, tok, [prompts[1]], seed=8, **kw)[0]
    assert alone.token_ids == a[1].token_ids


def test_top_k_one_is_greedy(model, tok):
    prompts = [random_ids(6, 60), random_ids(11, 61)]
    greedy = generate(model, tok, prompts, max_new_tokens=10)
    topk = generate(model, tok, prompts, max_new_tokens=10, temperature=0.9, top_k=1, seed=0)
    assert [r.token_ids for r in topk] == [r.token_ids for r in greedy]


# ----------------------------------------------------------------------------------
# Chat and saved states
# ----------------------------------------------------------------------------------
def test_chat_turn_ids_match_encode_chat(model, tok):
    chat = ChatSession(model, tok, system="Be brief.")
    first = chat.turn_ids("Hi there")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert first == tok.encode_chat(msgs)
    chat.state = model.init_state(1)  # pretend a turn happened
    second = chat.turn_ids("And you?")
    reply = "Hello world! The fox."
    full = msgs + [{"role": "model", "content": reply}, {"role": "user", "content": "And you?"}]
    assert tok.encode_chat(full) == first + tok.encode(reply, add_bos=False) + second


def test_chat_continuation_equals_whole_conversation(model, tok):
    chat = ChatSession(model, tok, system="You are terse.", max_new_tokens=8)
    history: list[int] = []
    replies = []
    for user in ("Hello", "Tell me about the sea.", "Why?"):
        turn = chat.turn_ids(user)
        s = chat.send_stream(user)
        text = "".join(s)
        assert text == s.result.text
        # The same reply from the whole conversation re-processed from scratch.
        whole = generate(model, tok, [history + turn], max_new_tokens=8)[0]
        assert whole.token_ids == s.result.token_ids
        history += turn + s.result.token_ids
        replies.append(text)
        assert states_close(chat.state, state_after(model, history), atol=1e-4)
    assert chat.turns == 3
    assert [m["content"] for m in chat.messages if m["role"] == "model"] == replies
    chat.reset()
    assert chat.state is None and chat.messages == []


def test_chat_canonical_reply_equals_encode_chat(model, tok):
    """With replies tokenized canonically, the state equals `encode_chat` of the whole
    conversation re-encoded as text."""
    sm = ScriptedModel(model)
    chat = ChatSession(sm, tok, max_new_tokens=20)
    r1, r2 = "Hello world!", "The quick fox."
    t1 = chat.turn_ids("Hi")
    sm.script(t1, tok.encode(r1, add_bos=False) + [tok.end_of_turn_id])
    assert chat.send("Hi") == r1
    t2 = chat.turn_ids("More")
    prefix = t1 + tok.encode(r1, add_bos=False) + t2
    sm.script(prefix, tok.encode(r2, add_bos=False) + [tok.end_of_turn_id])
    assert chat.send("More") == r2
    whole = tok.encode_chat(chat.messages, add_generation_prompt=False)
    assert whole[-2:] == [tok.end_of_turn_id, tok.encode("\n", add_bos=False)[0]]
    assert states_close(chat.state, state_after(model, whole[:-2]), atol=1e-4)


def test_chat_save_and_load(model, tok, tmp_path):
    a = ChatSession(model, tok, system="Hi.", max_new_tokens=6)
    a.send("one")
    a.send("two")
    a.save_state(tmp_path / "chat.state")
    b = ChatSession(model, tok, max_new_tokens=6)
    b.load_state(tmp_path / "chat.state")
    assert b.messages == a.messages and b.system == "Hi."
    assert b.send("three") == a.send("three")
    with pytest.raises(InputError, match="no state"):
        ChatSession(model, tok).save_state(tmp_path / "x.state")
    save_state(a.state, tmp_path / "bare.state", model.config)
    with pytest.raises(CheckpointError, match="sidecar"):
        b.load_state(tmp_path / "bare.state")


def test_saved_prompt_state_equals_reprocessing(model, tok, tmp_path):
    doc = "It is a truth universally acknowledged, that a single man in possession of"
    state = prompt_state(model, tok, doc, chunk_size=5)
    save_state(state, tmp_path / "doc.state", model.config)
    loaded = load_state(tmp_path / "doc.state", model.config)
    cont = [" a good", " fortune"]
    res = generate(model, tok, cont, max_new_tokens=10, state=loaded, return_state=True)
    for c, r in zip(cont, res):
        ids = tok.encode(doc) + tok.encode(c, add_bos=False)
        full = generate(model, tok, [ids], max_new_tokens=10)[0]
        assert r.token_ids == full.token_ids
        assert r.prompt_tokens == len(tok.encode(c, add_bos=False))
        assert states_close(r.state, state_after(model, ids + r.token_ids), atol=1e-4)
    # Continue again from a returned state.
    again = generate(model, tok, " and", max_new_tokens=4, state=res[0].state)[0]
    ids = (
        tok.encode(doc)
        + tok.encode(cont[0], add_bos=False)
        + res[0].token_ids
        + tok.encode(" and", add_bos=False)
    )
    assert again.token_ids == generate(model, tok, [ids], max_new_tokens=4)[0].token_ids


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompts, kwargs, pattern",
    [
        ([], {}, "empty"),
        (["hi"], {"max_new_tokens": -1}, "max_new_tokens.*-1"),
        (["hi"], {"max_new_tokens": 2.5}, "max_new_tokens"),
        (["hi"], {"temperature": -1.0}, "temperature.*-1"),
        (["hi"], {"top_p": 0.0}, "top_p.*0"),
        (["hi"], {"top_p": 1.5}, "top_p.*1.5"),
        (["hi"], {"top_k": -2}, "top_k.*-2"),
        (["hi"], {"min_p": 1.5}, "min_p.*1.5"),
        (["hi"], {"stop": [""]}, "stop"),
        (["hi"], {"seed": "x"}, "seed"),
        (["hi"], {"chunk_size": 0}, "chunk_size"),
        ([[2, 400]], {}, "400"),
        ([[]], {}, "no tokens"),
        ([3.5], {}, "prompts\\[0\\]"),
    ],
)
def test_bad_input(model, tok, prompts, kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        generate(model, tok, prompts, **kwargs)


def test_bad_state(model, tok):
    state = model.init_state(2)
    with pytest.raises(InputError, match="batch size"):
        generate(model, tok, ["a", "b", "c"], state=state)
    with pytest.raises(InputError, match="at least one new token"):
        generate(model, tok, [""], state=model.init_state(1))
    with pytest.raises(InputError, match="one prompt"):
        stream(model, tok, [[2, 3], [2, 4]])
    other = random_model(tiny_config(window=4))
    with pytest.raises(InputError, match="another config"):
        stream(model, tok, "x", state=other.init_state(1))  # raised before iterating


def test_zero_new_tokens_with_state(model, tok):
    ids = random_ids(9, 70)
    r = generate(model, tok, [ids], max_new_tokens=0, return_state=True)[0]
    assert r.token_ids == [] and r.text == "" and r.finish_reason == "length"
    assert states_close(r.state, state_after(model, ids))


def test_vocab_check(tok):
    small = random_model(tiny_config().__class__.preset("test-tiny"))  # vocab 256 < 400
    with pytest.raises(CheckpointError, match="400.*256"):
        check_vocab(small, tok)
    check_vocab(tiny_model(), tok)


def test_result_fields(model, tok):
    r = generate(model, tok, "Hello", max_new_tokens=3)[0]
    assert isinstance(r, GenerationResult) and r.state is None
    assert r.prefill_seconds >= 0 and r.decode_seconds >= 0 and not math.isnan(r.decode_seconds)


# ----------------------------------------------------------------------------------
# Compiled decode step
# ----------------------------------------------------------------------------------
def test_compiled_decode_equals_eager(tok):
    """torch.compile of the decode step: same greedy tokens and close logits, for a
    batch whose rows finish at different steps (the batch shrinks: one recompile)."""
    import shutil

    eager = tiny_model()
    compiled = compile_decode(copy.deepcopy(eager))  # tiny_model() is shared: copy it
    assert compile_decode(compiled) is compiled  # idempotent
    prompts = [random_ids(9, 1), random_ids(5, 2)]
    want = generate(eager, tok, prompts, max_new_tokens=6)
    got = generate(compiled, tok, prompts, max_new_tokens=6)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    step = compiled.decode_step
    if shutil.which("c++") or shutil.which("g++"):
        assert step.failed is None and step.calls >= 5
    state = prefill(eager, torch.tensor([random_ids(7, 3)]), None, None)[1]
    tokens = torch.tensor([11])
    with torch.no_grad():
        a, sa = eager.decode_step(tokens, state)
        b, sb = compiled.decode_step(tokens, state)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    torch.testing.assert_close(sb.next_pos, sa.next_pos)


def test_compile_failure_falls_back_to_eager(tok, monkeypatch, capsys):
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = compile_decode(copy.deepcopy(tiny_model()))
    got = generate(model, tok, [random_ids(6, 4)], max_new_tokens=5)
    want = generate(tiny_model(), tok, [random_ids(6, 4)], max_new_tokens=5)
    assert got[0].token_ids == want[0].token_ids
    err = capsys.readouterr().err
    assert err.count("torch.compile of the decode step failed") == 1
    assert "RuntimeError: no C++ compiler" in err and "second line" not in err
    assert model.decode_step.failed.startswith("RuntimeError")
    with pytest.raises(InputError, match="compile_decode expects"):
        compile_decode(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------
# One SamplingParams, one row engine
# ----------------------------------------------------------------------------------
def test_sampling_params_object_equals_keyword_sugar(model, tok):
    prompts = [random_ids(6, 90), random_ids(3, 91)]
    params = SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=4, stop=("zz",))
    by_object = generate(model, tok, prompts, sampling=params)
    by_keywords = generate(
        model, tok, prompts, max_new_tokens=9, temperature=0.8, top_p=0.9, seed=4, stop="zz"
    )
    assert [r.token_ids for r in by_object] == [r.token_ids for r in by_keywords]
    assert all(len(r.token_ids) == 9 or r.finish_reason == "stop" for r in by_object)
    # Keywords override the object's fields; the object itself is unchanged.
    short = generate(model, tok, prompts, sampling=params, max_new_tokens=4)
    assert [r.token_ids for r in short] == [r.token_ids[:4] for r in by_object]
    assert params.max_new_tokens == 9
    assert "".join(stream(model, tok, prompts[0], sampling=params)) == by_object[0].text
    with pytest.raises(InputError, match="unknown sampling option.*temprature"):
        generate(model, tok, prompts, temprature=0.5)
    with pytest.raises(InputError, match="prompt_logprobs"):
        generate(model, tok, prompts, prompt_logprobs=True)


def test_sampling_params_checks_and_merges():
    p = SamplingParams.make(None, max_new_tokens=3, stop="\n")
    assert p.max_new_tokens == 3 and p.stop == ("\n",) and p.greedy
    q = SamplingParams.make(p, temperature=0.5, top_k=1)
    assert q.greedy and q.max_new_tokens == 3 and q.sampler_key == ("greedy",)
    r = q.replace(top_k=5)
    assert not r.greedy and r.sampler_key == (0.5, 5, 1.0, 0.0)
    assert SamplingParams.make({"seed": 2}, top_p=0.5) == SamplingParams(seed=2, top_p=0.5)
    for kwargs, name in [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -1}, "seed"),  # the CLI's --seed range, [0, 2**63)
        ({"seed": 2**63}, "seed"),
        ({"stop": 3}, "stop"),
        ({"logprobs": -2}, "logprobs"),
        ({"temperature": float("nan")}, "temperature"),
    ]:
        with pytest.raises(InputError, match=name):
            SamplingParams(**kwargs)


def test_generate_logprobs_are_the_model_log_softmax(model, tok):
    ids = random_ids(5, 30)  # 16 greedy tokens without EOS (test_stop_string_real_model)
    r = generate(model, tok, [ids], max_new_tokens=5, logprobs=2)[0]
    assert len(r.logprobs) == len(r.token_ids) == 5
    full = ids + r.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full]))[0][0], dim=-1)  # (t, v)
    for i, entry in enumerate(r.logprobs):
        pos = len(ids) - 1 + i  # logits at pos predict full[pos + 1]
        assert entry.token_id == r.token_ids[i]
        assert entry.logprob == pytest.approx(lp[pos, entry.token_id].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == torch.topk(lp[pos], 2).indices.tolist()
        assert entry.logprob == pytest.approx(entry.top[0][1], abs=1e-6)  # greedy = best
    assert generate(model, tok, [ids], max_new_tokens=2)[0].logprobs is None


def test_chat_session_holds_one_sampling_params_and_turn_k_uses_seed_plus_k(model, tok):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)
    chat = ChatSession(model, tok, sampling=params)
    assert chat.sampling is params
    first = chat.turn_ids("Hello")
    assert chat.send("Hello") == generate(model, tok, [first], sampling=params)[0].text
    before = chat.state
    second = chat.turn_ids("Again")
    want = generate(model, tok, [second], sampling=params.replace(seed=12), state=before)[0]
    assert chat.send("Again") == want.text
    with pytest.raises(InputError, match="unknown sampling option"):
        ChatSession(model, tok, max_tokens=5)


def test_engine_decode_step_makes_one_host_sync(model, tok, monkeypatch):
    """A decode step in which no row leaves reads the sampled ids back once (one
    `.tolist()`) and copies nothing from the host: the ids fed next stay on the
    device."""
    prompts = [random_ids(5, 93), random_ids(9, 94)]
    engine = RowEngine(model, tok)
    logits, state = engine.prefill_prompts(prompts)
    rows = [
        Row(SamplingParams(max_new_tokens=8), tok, len(p), tag=i) for i, p in enumerate(prompts)
    ]
    engine.add(rows, logits, state)
    counts = {"tolist": 0, "tensor": 0, "item": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", torch.Tensor.tolist))
    monkeypatch.setattr(torch.Tensor, "item", counting("item", torch.Tensor.item))
    monkeypatch.setattr(torch, "tensor", counting("tensor", torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", counting("tensor", torch.as_tensor))
    for step in range(1, 4):
        engine.step()
        assert len(engine.rows) == 2
        assert counts == {"tolist": step, "tensor": 0, "item": 0}
    monkeypatch.undo()
    while engine.rows:
        engine.step()
    want = generate(model, tok, prompts, max_new_tokens=8)
    assert [r.ids for r in rows] == [r.token_ids for r in want]


def test_engine_rows_join_a_running_batch(model, tok):
    """Rows added while others decode (continuous batching, one row's state repeated
    for n choices) get the tokens each prompt gets alone."""
    engine = RowEngine(model, tok, batch_rows=lambda n: 4 if n > 1 else n)
    p0, p1 = random_ids(8, 95), random_ids(4, 96)
    logits, state = engine.prefill_prompts([p0])
    first = Row(SamplingParams(max_new_tokens=9), tok, len(p0))
    engine.add([first], logits, state)
    engine.step()
    engine.step()
    logits, state = engine.prefill_prompts([p1])
    later = [Row(SamplingParams(max_new_tokens=5), tok, len(p1)) for _ in range(2)]
    outs = engine.add(later, logits, state)
    assert [o.row for o in outs] == later and engine.state.batch_size == 4
    while engine.rows:
        engine.step()
    assert first.ids == generate(model, tok, [p0], max_new_tokens=9)[0].token_ids
    alone = generate(model, tok, [p1], max_new_tokens=5)[0].token_ids
    assert later[0].ids == later[1].ids == alone
    assert engine.state is None


def test_state_head_expand_and_concat(model):
    state = prefill(model, torch.tensor([random_ids(6, 97), random_ids(6, 98)]))[1]
    one = state.select([1])
    three = one.expand(3)
    assert three.batch_size == 3 and three.next_pos.data_ptr() == one.next_pos.data_ptr()
    joined = concat_states([state.head(1), three])
    assert states_close(joined, state.select([0, 1, 1, 1]), atol=0)
    assert all(t.is_contiguous() for s in joined.blocks for t in s)
    with pytest.raises(InputError, match="batch size 1"):
        state.expand(2)


def test_compile_decode_is_one_documented_attribute(monkeypatch):
    """`compile_decode` sets `decode_step` to a `CompiledDecodeStep` whose public
    attributes count calls and compile time; nothing else on the model changes."""

    def identity_compile(fn, **kw):
        return fn

    monkeypatch.setattr(torch, "compile", identity_compile)
    model = copy.deepcopy(tiny_model())
    before = set(vars(model))
    compile_decode(model)
    step = model.decode_step
    assert isinstance(step, CompiledDecodeStep) and set(vars(model)) - before == {"decode_step"}
    assert step.failed is None and step.calls == 0 and step.compile_seconds == 0.0
    state = model.init_state(1)
    with torch.no_grad():
        step(torch.tensor([5]), state)
        step(torch.tensor([6]), state)
    assert step.calls == 2 and step.compile_seconds > 0.0


# ----------------------------------------------------------------------------------
# Logits processors: penalties, logit bias, min_tokens, ignore_eos
# ----------------------------------------------------------------------------------
def _reference_greedy(model, prompt, n, process):
    """Greedy decoding by full forward passes, `process(logits (1, v), prompt, out)`
    changing the last logits: the spec the engine's processors are checked against."""
    out: list[int] = []
    for _ in range(n):
        logits, _ = model(torch.tensor([prompt + out]))
        x = process(logits[:, -1].float(), prompt, out)
        out.append(int(torch.argmax(x, dim=-1)))
    return out


def test_repetition_penalty_matches_hf_processor():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 4
    ids = torch.randint(0, 50, (3, 12), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    from rgemma.sampling import apply_repetition_penalty

    for penalty in (1.3, 0.7):
        want = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        got = apply_repetition_penalty(logits, seen, penalty)
        torch.testing.assert_close(got, want)
    per_row = torch.tensor([[1.3], [1.0], [0.7]])
    got = apply_repetition_penalty(logits, seen, per_row)
    torch.testing.assert_close(got[1], logits[1])
    torch.testing.assert_close(got[2], apply_repetition_penalty(logits, seen, 0.7)[2])


def test_presence_frequency_bias_and_suppress_values():
    from rgemma.sampling import apply_logit_bias, apply_presence_frequency_penalty, suppress_tokens

    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    got = apply_presence_frequency_penalty(logits, counts, 0.5, 0.25)
    assert got.tolist() == [[1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, -1.0]]
    assert apply_logit_bias(logits, torch.tensor([0.0, 0.0, -100.0, 5.0])).tolist() == [
        [1.0, 2.0, -97.0, 4.0]
    ]
    two = torch.cat([logits, logits])
    out = suppress_tokens(two, torch.tensor([1, 2]), torch.tensor([True, False]))
    assert out[0].tolist() == [1.0, float("-inf"), float("-inf"), -1.0]
    assert out[1].tolist() == logits[0].tolist() and two[0, 1] == 2.0  # not in place


@pytest.mark.parametrize(
    "fields",
    [
        {"repetition_penalty": 1.5},
        {"repetition_penalty": 0.8},
        {"frequency_penalty": 1.5},
        {"presence_penalty": 2.0, "frequency_penalty": -0.5},
        {"repetition_penalty": 1.2, "presence_penalty": 0.5, "logit_bias": {7: 3.0, 9: -2.0}},
    ],
)
def test_penalised_greedy_equals_full_forward_reference(model, tok, fields):
    """The engine's device-side counts give the tokens of a loop that recomputes the
    penalties from the ids (the prompt counts for the repetition penalty only), in a
    batch of prompts of different lengths."""
    from rgemma.sampling import (
        apply_logit_bias,
        apply_presence_frequency_penalty,
        apply_repetition_penalty,
    )

    params = SamplingParams(max_new_tokens=12, **fields)
    v = model.config.vocab_size
    bias = torch.zeros(v)
    for i, b in params.logit_bias:
        bias[i] = b

    def process(x, prompt, out):
        x = apply_logit_bias(x, bias)
        seen = torch.zeros(1, v, dtype=torch.bool)
        seen[0, prompt + out] = True
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=v).float()[None]
        x = apply_presence_frequency_penalty(
            x, counts, params.presence_penalty, params.frequency_penalty
        )
        x[0, tok.vocab_size :] = float("-inf")
        x[0, [tok.eos_id, tok.end_of_turn_id]] = float("-inf")  # never stop early here
        return x

    prompts = [random_ids(6, 200), random_ids(11, 201)]
    res = generate(model, tok, prompts, sampling=params.replace(ignore_eos=True))
    for p, r in zip(prompts, res):
        assert r.token_ids == _reference_greedy(model, p, 12, process)
    plain = generate(model, tok, prompts, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in plain] != [r.token_ids for r in res]


def test_logit_bias_forces_and_bans_tokens(model, tok):
    p = random_ids(5, 210)
    forced = generate(model, tok, [p], max_new_tokens=6, logit_bias={77: 100.0})[0]
    assert forced.token_ids == [77] * 6
    plain = generate(model, tok, [p], max_new_tokens=6)[0]
    first = plain.token_ids[0]
    banned = generate(model, tok, [p], max_new_tokens=6, logit_bias={str(first): -100})[0]
    assert first not in banned.token_ids
    # sampling sees the bias too
    sampled = generate(
        model, tok, [p], max_new_tokens=6, temperature=1.0, seed=0, logit_bias={77: 100}
    )[0]
    assert sampled.token_ids == [77] * 6
    with pytest.raises(InputError, match="logit_bias token id 400 is outside"):
        generate(model, tok, [p], max_new_tokens=2, logit_bias={400: 1.0})


def test_min_tokens_and_ignore_eos(model, tok):
    sm = ScriptedModel(model, after=tok.eos_id)
    p = random_ids(4, 220)
    hello = tok.encode("Hello world", add_bos=False)
    sm.script(p, hello)  # then EOS forever
    res = generate(sm, tok, [p], max_new_tokens=10)[0]
    assert res.token_ids == hello and res.finish_reason == "stop"
    res = generate(sm, tok, [p], max_new_tokens=20, min_tokens=len(hello) + 3)[0]
    assert len(res.token_ids) == len(hello) + 3 and res.token_ids[: len(hello)] == hello
    assert tok.eos_id not in res.token_ids and res.finish_reason == "stop"
    res = generate(sm, tok, [p], max_new_tokens=10, ignore_eos=True)[0]
    assert len(res.token_ids) == 10 and res.finish_reason == "length"
    # before min_tokens a stop string does not stop the row either
    res = generate(sm, tok, [p], max_new_tokens=10, stop="world", min_tokens=len(hello) + 1)[0]
    assert res.text.startswith("Hello world") and len(res.token_ids) == len(hello) + 1
    res = generate(sm, tok, [p], max_new_tokens=10, stop="world")[0]
    assert res.text == "Hello " and res.finish_reason == "stop"


def test_penalties_in_a_running_batch_equal_each_row_alone(model, tok):
    """Rows with different processors join and leave a running batch: each gets the
    tokens it gets alone (the counts follow the rows)."""
    engine = RowEngine(model, tok, batch_rows=lambda n: 4 if n > 1 else n)
    p0, p1, p2 = random_ids(8, 230), random_ids(5, 231), random_ids(6, 232)
    a = SamplingParams(max_new_tokens=9, repetition_penalty=1.5, ignore_eos=True)
    b = SamplingParams(max_new_tokens=4, ignore_eos=True)
    c = SamplingParams(max_new_tokens=7, frequency_penalty=2.0, ignore_eos=True)
    rows = []
    for p, params in ((p0, a), (p1, b)):
        logits, state = engine.prefill_prompts([p])
        rows.append(Row(params, tok, len(p), prompt_ids=p))
        engine.add([rows[-1]], logits, state)
        engine.step()
    for _ in range(4):  # b leaves
        engine.step()
    logits, state = engine.prefill_prompts([p2])
    rows.append(Row(c, tok, len(p2), prompt_ids=p2))
    engine.add([rows[-1]], logits, state)
    while engine.rows:
        engine.step()
    for p, params, row in zip((p0, p1, p2), (a, b, c), rows):
        assert row.ids == generate(model, tok, [p], sampling=params)[0].token_ids


def test_sampling_params_processor_fields_are_checked():
    for fields, name in (
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens"),
    ):
        with pytest.raises(InputError, match=name):
            SamplingParams(**fields)
    p = SamplingParams(logit_bias={"5": 1, 3: -2.5})
    assert p.logit_bias == ((3, -2.5), (5, 1.0)) and p.adjusts_logits and not p.penalized


def test_default_sampling_reads_well_and_zero_temperature_is_plain_greedy():
    from rgemma.sampling import DEFAULT_SAMPLING, default_sampling

    d = default_sampling()
    assert (d.temperature, d.top_p, d.repetition_penalty) == (
        DEFAULT_SAMPLING["temperature"],
        DEFAULT_SAMPLING["top_p"],
        DEFAULT_SAMPLING["repetition_penalty"],
    )
    g = default_sampling(temperature=0.0, max_new_tokens=5)
    assert g.greedy and g.repetition_penalty == 1.0 and g.max_new_tokens == 5
    assert default_sampling(temperature=0, repetition_penalty=1.3).repetition_penalty == 1.3
    assert default_sampling(top_p=None, seed=3).top_p == DEFAULT_SAMPLING["top_p"]
