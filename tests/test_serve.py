"""The OpenAI-compatible server: exactness under continuous batching, streaming,
stopping, cancellation, the prefix state cache, errors, and the `openai` client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest_gen import ScriptedModel, tiny_model, tokenizer

from rgemma.generation import generate
from rgemma.sampling import SamplingParams
from rgemma.serve.app import ServeConfig, create_app
from rgemma.serve.prefix_cache import PrefixCache
from rgemma.serve.scheduler import GenerationRequest, Scheduler

PROMPTS = [
    "Hello world",
    "It is a truth universally acknowledged, that a single man in possession",
    "Call me Ishmael.",
    "To be, or not to be",
    "The quick brown fox jumps over the lazy dog. 0123456789 The quick brown fox",
    "a",
    "Some years ago, never mind how long precisely, having little or no money",
    "whether 'tis nobler in the mind to suffer",
]


def small_config(**kw) -> ServeConfig:
    base = {
        "max_batch_size": 16,
        "max_queue": 32,
        "prefill_chunk": 8,
        "prefix_block": 8,
        "prefix_min_tokens": 4,
        "max_prompt_tokens": 200,
        "max_tokens": 64,
        "prefix_cache_bytes": 1 << 24,
    }
    base.update(kw)
    return ServeConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread is ~10x faster than two on a busy 2-core box
    (the scheduler thread and the event loop share the cores anyway)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run_async(app, coro_fn):
    """Run `coro_fn(client)` against `app` over ASGI, with the scheduler running."""
    sched = app.state.server.scheduler

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await coro_fn(client)

    sched.start()
    try:
        return asyncio.run(main())
    finally:
        sched.stop()


def sse_data(text: str) -> list:
    """The JSON payloads of a server-sent-events body, checking the final [DONE]."""
    items = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert items[-1] == "[DONE]"
    return [json.loads(x) for x in items[:-1]]


def greedy_ref(model, tok, prompt, max_tokens, **kw):
    return generate(model, tok, [prompt], max_new_tokens=max_tokens, temperature=0.0, **kw)[0]


# ----------------------------------------------------------------------------------
# Scheduler: exact tokens with continuous batching
# ----------------------------------------------------------------------------------
def test_scheduler_greedy_rows_equal_generate_alone(model, tok):
    """16 requests of different prompt lengths and max_tokens, joining and leaving the
    batch at different steps (prefill chunked over several steps, prefix cache on):
    each gets exactly the token ids of `generate` on its prompt alone."""
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i // len(PROMPTS)) for i in range(16)]
    max_tokens = [5 + (7 * i) % 23 for i in range(16)]
    sched = Scheduler(
        model,
        tok,
        max_batch_size=6,
        prefill_chunk=8,
        prefill_budget=8,
        prefix_cache=PrefixCache(1 << 24, block_size=8, min_tokens=4),
    )
    events = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        sched.submit(
            GenerationRequest(
                [tok.encode(p)],
                SamplingParams(max_new_tokens=max_tokens[i]),
                on_event=events[i].append,
            )
        )
    peak = 0
    while sched.has_work():
        sched.step()
        peak = max(peak, sched.num_rows)
        assert sched.num_rows <= 6
    assert peak == 6
    for i, p in enumerate(prompts):
        ref = greedy_ref(model, tok, p, max_tokens[i])
        ids = [e.token_id for e in events[i] if e.kind == "token" and e.token_id is not None]
        assert ids == ref.token_ids, i
        assert "".join(e.text for e in events[i] if e.kind == "token") == ref.text
        done = [e for e in events[i] if e.kind == "done"]
        assert len(done) == 1 and done[0].finish_reason == ref.finish_reason
    assert sched.num_active == 0 and sched.state_nbytes == 0


def test_scheduler_seeded_sampling_matches_generate(model, tok):
    """n choices with a seed: choice i draws like row i of `generate(..., seed)`."""
    p = PROMPTS[1]
    ref = generate(
        model, tok, [p, p, p], max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7
    )
    sched = Scheduler(model, tok, max_batch_size=8, prefill_chunk=8)
    ev = []
    other = []  # a greedy neighbour in the same batch
    sched.submit(
        GenerationRequest(
            [tok.encode(PROMPTS[0])], SamplingParams(max_new_tokens=20), on_event=other.append
        )
    )
    sched.submit(
        GenerationRequest(
            [tok.encode(p)],
            SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7),
            n=3,
            on_event=ev.append,
        )
    )
    while sched.has_work():
        sched.step()
    for i in range(3):
        assert "".join(e.text for e in ev if e.kind == "token" and e.index == i) == ref[i].text


# ----------------------------------------------------------------------------------
# HTTP: exactness alone and in a batch of 16, streaming, malformed neighbours
# ----------------------------------------------------------------------------------
def test_http_greedy_alone_and_with_15_others(model, tok):
    # prefill budget above the 16 prompts' tokens: all join in the first step, so the
    # batch surely reaches 16 rows even if a sampled request stops after a few tokens
    app = create_app(model, tok, small_config(prefill_chunk=512))
    target = PROMPTS[1]
    ref = greedy_ref(model, tok, target, 40)
    body = {"model": "rgemma", "prompt": target, "max_tokens": 40, "temperature": 0}

    async def scenario(client):
        alone = (await client.post("/v1/completions", json=body)).json()
        others = [
            client.post(
                "/v1/completions",
                json={
                    "prompt": PROMPTS[i % len(PROMPTS)] * (1 + i % 3),
                    "max_tokens": 40 + i,
                    "temperature": 0.7,
                    "seed": i,
                },
            )
            for i in range(15)
        ]
        bad = [
            client.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}),
            client.post(
                "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
            ),
            client.post("/v1/chat/completions", json={"messages": []}),
        ]
        # Queue all 16 before the scheduler runs, so that they surely share the batch.
        sched = app.state.server.scheduler
        sched.stop()
        batch = asyncio.gather(client.post("/v1/completions", json=body), *others)
        while sched.num_queued < 16:
            await asyncio.sleep(0.005)
        sched.start()
        results = await asyncio.gather(batch, *bad)  # the bad ones arrive mid-batch
        return alone, [r.json() for r in results[0]], [r.status_code for r in results[1:]]

    alone, batch, bad_status = run_async(app, scenario)
    assert alone["choices"][0]["text"] == ref.text
    assert batch[0]["choices"][0]["text"] == ref.text
    assert batch[0]["choices"][0]["finish_reason"] == ref.finish_reason
    n_out = len(ref.token_ids) + (ref.stop_token_id is not None)
    assert batch[0]["usage"] == {
        "prompt_tokens": ref.prompt_tokens,
        "completion_tokens": n_out,
        "total_tokens": ref.prompt_tokens + n_out,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert all(b["choices"][0]["finish_reason"] in ("stop", "length") for b in batch)
    assert bad_status == [400, 400, 400]
    hist = app.state.server.metrics.batch_size
    assert hist.count > 0 and app.state.server.scheduler.peak_rows == 16


def test_streaming_concatenates_to_non_streamed(model, tok):
    app = create_app(model, tok, small_config())
    comp = {"prompt": PROMPTS[2], "max_tokens": 30, "temperature": 0, "n": 2}
    chat = {
        "messages": [{"role": "user", "content": PROMPTS[3]}],
        "max_tokens": 30,
        "temperature": 0,
    }

    async def scenario(client):
        out = []
        for path, body in (("/v1/completions", comp), ("/v1/chat/completions", chat)):
            full = (await client.post(path, json=body)).json()
            usage = {"stream_options": {"include_usage": True}} if "messages" in body else {}
            streamed = await client.post(path, json={**body, "stream": True, **usage})
            assert streamed.headers["content-type"].startswith("text/event-stream")
            out.append((full, sse_data(streamed.text)))
        return out

    (c_full, c_chunks), (h_full, h_chunks) = run_async(app, scenario)
    for i in range(2):
        text = "".join(
            ch["choices"][0]["text"]
            for ch in c_chunks
            if ch["choices"] and ch["choices"][0]["index"] == i
        )
        assert text == c_full["choices"][i]["text"]
    assert all("usage" not in ch for ch in c_chunks)  # not asked for: no usage
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in h_chunks[:-1])
    assert text == h_full["choices"][0]["message"]["content"]
    assert h_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert h_chunks[-2]["choices"][0]["finish_reason"] == h_full["choices"][0]["finish_reason"]
    assert h_chunks[-1]["choices"] == [] and all("usage" not in ch for ch in h_chunks[:-1])
    usage = dict(h_chunks[-1]["usage"])
    assert usage.pop("prompt_tokens_details")["cached_tokens"] > 0  # the same chat again
    assert usage == {k: v for k, v in h_full["usage"].items() if k != "prompt_tokens_details"}
    assert (
        h_full["object"] == "chat.completion" and h_chunks[0]["object"] == "chat.completion.chunk"
    )


def test_stop_sequences_and_end_of_turn(model, tok):
    scripted = ScriptedModel(model, after=tok.encode("z", add_bos=False)[0])
    chat_ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    reply = tok.encode("Call me Ishmael.", add_bos=False)
    scripted.script(chat_ids, reply + [tok.end_of_turn_id])
    comp_ids = tok.encode("To be")
    words = tok.encode(" or not to be, that is the question", add_bos=False)
    scripted.script(comp_ids, words)
    ref = generate(scripted, tok, [comp_ids], max_new_tokens=40, stop=["that", "qu"])[0]
    assert ref.stop_string == "that"
    app = create_app(scripted, tok, small_config(prefix_cache_bytes=0))

    async def scenario(client):
        chat = await client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 50,
                "temperature": 0,
            },
        )
        comp = await client.post(
            "/v1/completions",
            json={"prompt": "To be", "max_tokens": 40, "temperature": 0, "stop": ["that", "qu"]},
        )
        comp_stream = await client.post(
            "/v1/completions",
            json={
                "prompt": "To be",
                "max_tokens": 40,
                "temperature": 0,
                "stop": "that",
                "stream": True,
            },
        )
        return chat.json(), comp.json(), sse_data(comp_stream.text)

    chat, comp, chunks = run_async(app, scenario)
    assert chat["choices"][0]["message"]["content"] == "Call me Ishmael."
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert chat["usage"]["completion_tokens"] == len(reply) + 1  # <end_of_turn> counted
    assert comp["choices"][0]["text"] == ref.text == " or not to be, "
    assert comp["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == ref.text


def test_logprobs_and_echo(model, tok):
    app = create_app(model, tok, small_config())

    async def scenario(client):
        r = await client.post(
            "/v1/completions",
            json={
                "prompt": "Hello world",
                "max_tokens": 4,
                "temperature": 0,
                "logprobs": 2,
                "echo": True,
            },
        )
        c = await client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 3,
            },
        )
        return r.json(), c.json()

    comp, chat = run_async(app, scenario)
    choice = comp["choices"][0]
    ref = greedy_ref(model, tok, "Hello world", 4)
    assert choice["text"] == "Hello world" + ref.text
    lp = choice["logprobs"]
    n_prompt = len(tok.encode("Hello world"))
    assert len(lp["tokens"]) == n_prompt + len(ref.token_ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ids = tok.encode("Hello world") + ref.token_ids
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)  # (t, v)
    want = [full[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)  # prompt and output
    for value, top in zip(lp["token_logprobs"][n_prompt:], lp["top_logprobs"][n_prompt:]):
        assert len(top) <= 2 and value == pytest.approx(max(top.values()))  # greedy = best
    content = chat["choices"][0]["logprobs"]["content"]
    chat_ref = greedy_ref(model, tok, tok.encode_chat([{"role": "user", "content": "Hi"}]), 3)
    assert len(content) == len(chat_ref.token_ids)
    assert all(len(e["top_logprobs"]) == 3 and e["logprob"] <= 0 for e in content)


# ----------------------------------------------------------------------------------
# Prefix state cache
# ----------------------------------------------------------------------------------
def test_prefix_cache_exact_and_counted(model, tok):
    system = "You are a helpful assistant who answers in the style of " + PROMPTS[1]
    questions = ["Hello world", "Call me Ishmael.", "To be, or not to be"]
    refs = []
    for q in questions:
        ids = tok.encode_chat(
            [{"role": "system", "content": system}, {"role": "user", "content": q}]
        )
        refs.append(greedy_ref(model, tok, ids, 20))
    header = PROMPTS[4] + " " + PROMPTS[6] + "\n"
    comp_refs = [greedy_ref(model, tok, header + q, 15) for q in questions]

    def scenario_for(results):
        async def scenario(client):
            for q in questions:
                r = await client.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [
                            {"role": "system", "content": system},
                            {"role": "user", "content": q},
                        ],
                        "max_tokens": 20,
                        "temperature": 0,
                    },
                )
                results.append(r.json())
            for q in questions:  # few-shot header: cached on its 2nd use, hit on the 3rd
                r = await client.post(
                    "/v1/completions",
                    json={"prompt": header + q, "max_tokens": 15, "temperature": 0},
                )
                results.append(r.json())
            return (await client.get("/metrics")).text

        return scenario

    cached, plain = [], []
    app = create_app(model, tok, small_config())
    metrics = run_async(app, scenario_for(cached))
    run_async(create_app(model, tok, small_config(prefix_cache_bytes=0)), scenario_for(plain))
    texts = [
        r["choices"][0].get("message", {}).get("content") or r["choices"][0].get("text")
        for r in cached
    ]
    assert texts == [r.text for r in refs] + [r.text for r in comp_refs]
    assert [r["choices"] for r in cached] == [r["choices"] for r in plain]
    cached_tokens = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in cached]
    assert cached_tokens[0] == 0 and cached_tokens[1] > 0 and cached_tokens[2] > 0
    assert cached_tokens[3] == cached_tokens[4] == 0 and cached_tokens[5] >= 16
    hits = [
        line for line in metrics.splitlines() if line.startswith("rgemma_prefix_cache_hits_total ")
    ]
    assert hits == ["rgemma_prefix_cache_hits_total 3"]
    cache = app.state.server.scheduler.prefix_cache
    assert 0 < cache.nbytes <= cache.max_bytes and len(cache) >= 2


def test_prefix_cache_is_bounded_lru(model):
    state = model.init_state(1)
    size = state.nbytes()
    cache = PrefixCache(max_bytes=2 * size + 1, block_size=4, min_tokens=1)
    keys = [cache.keys(list(range(i, i + 8)), [4])[4] for i in range(3)]
    for k in keys:
        assert cache.store(k, state)
    assert len(cache) == 2 and cache.nbytes == 2 * size and cache.evictions == 1
    assert cache.lookup({4: keys[0]}) is None and cache.lookup({4: keys[2]})[0] == 4


# ----------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "seed": "1"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"400": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "unknown_field": [1, 2]}, 400, "unknown_field"),
    ("/v1/completions", {"prompt": "x", "store": True}, 400, "store"),
    (
        "/v1/completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    (
        "/v1/completions",
        {"prompt": "x", "stream": True, "stream_options": {"x": 1}},
        400,
        "stream_options.x",
    ),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"},
        400,
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
        400,
        "functions",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        400,
        "messages[0].tool_calls",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
        },
        400,
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "prediction": {"type": "content", "content": "x"},
        },
        400,
        "prediction",
    ),
    ("/v1/completions", {"prompt": [5, 10_000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 300}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]},
        400,
        "messages",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1000},
        400,
        "max_completion_tokens",
    ),
]


def test_bad_requests_get_openai_errors(model, tok):
    app = create_app(model, tok, small_config())

    async def scenario(client):
        out = []
        for path, body, _, _ in BAD:
            if isinstance(body, bytes):
                r = await client.post(
                    path, content=body, headers={"content-type": "application/json"}
                )
            else:
                r = await client.post(path, json=body)
            out.append((r.status_code, r.json()))
        ok = await client.post(  # labels that change no output are accepted
            "/v1/completions",
            json={
                "prompt": "x",
                "max_tokens": 2,
                "user": "u1",
                "metadata": {"k": "v"},
                "store": False,
                "model": "any",
            },
        )
        out.append((ok.status_code, ok.json()))
        missing = await client.get("/v1/nope")
        out.append((missing.status_code, missing.json()))
        return out

    results = run_async(app, scenario)
    for (path, body, status, param), (got_status, got) in zip(BAD, results):
        assert got_status == status, (body, got)
        err = got["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["type"] == "invalid_request_error"
        assert err["param"] == param, (body, err)
        if isinstance(body, dict) and "unknown_field" in body:
            assert err["code"] == "unsupported_parameter" and "unknown_field" in err["message"]
    assert results[len(BAD)][0] == 200, results[len(BAD)]
    assert results[-1][0] == 404 and "error" in results[-1][1]


def test_api_key_and_queue_full(model, tok):
    app = create_app(model, tok, small_config(api_key="sk-test", max_queue=1))
    sched = app.state.server.scheduler  # not started: submitted requests wait in the queue
    sched.submit(GenerationRequest([[2, 10]], SamplingParams(max_new_tokens=1)))

    async def scenario(client):
        body = {"prompt": "x", "max_tokens": 2}
        no_key = await client.post("/v1/completions", json=body)
        wrong = await client.post(
            "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}
        )
        bad_json_no_key = await client.post(
            "/v1/completions", content=b"{", headers={"content-type": "application/json"}
        )
        full = await client.post(
            "/v1/completions", json=body, headers={"Authorization": "Bearer sk-test"}
        )
        health = await client.get("/health")  # no key needed outside /v1
        return no_key, wrong, bad_json_no_key, full, health

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await scenario(client)

    no_key, wrong, bad_json, full, health = asyncio.run(main())
    for r in (no_key, wrong, bad_json):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "queue_full"
    assert health.status_code == 503  # the scheduler is not running
    assert sched.num_queued == 1


# ----------------------------------------------------------------------------------
# A real server on loopback: cancellation on disconnect, the openai client, metrics
# ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(model, tok):
    import uvicorn

    app = create_app(model, tok, small_config(api_key="sk-live", max_tokens=4000))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def wait_until(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_disconnect_cancels_and_frees_the_slot(live_server):
    app, url = live_server
    sched, metrics = app.state.server.scheduler, app.state.server.metrics
    headers = {"Authorization": "Bearer sk-live"}
    cancelled = metrics.requests_finished.value("cancelled")
    # greedy on this prompt runs to max_tokens (seconds): the client always leaves first
    body = {"prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data: ")
                if lines >= 3:
                    break
            assert sched.num_rows == 1
        # closing the stream closes the connection: the row leaves the batch
        assert wait_until(lambda: sched.num_rows == 0 and sched.num_active == 0)
        assert metrics.requests_finished.value("cancelled") == cancelled + 1
        # a non-streamed request whose client gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", timeout=0.5, json={**body, "stream": False})
        assert wait_until(lambda: sched.num_rows == 0 and sched.num_active == 0)
        assert metrics.requests_finished.value("cancelled") == cancelled + 2


def test_openai_client(live_server, model, tok):
    openai = pytest.importorskip("openai")
    _, url = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-live", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["rgemma"]
    ref = greedy_ref(model, tok, PROMPTS[3], 12)
    comp = client.completions.create(
        model="rgemma", prompt=PROMPTS[3], max_tokens=12, temperature=0
    )
    assert comp.choices[0].text == ref.text and comp.usage.prompt_tokens == ref.prompt_tokens
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
    chat = client.chat.completions.create(
        model="rgemma", messages=messages, max_tokens=10, temperature=0, seed=1
    )
    stream = client.chat.completions.create(
        model="rgemma",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="rgemma", prompt="x", temperature=5)
    assert info.value.body["param"] == "temperature"
    metrics = httpx.get(url + "/metrics").text
    for name in (
        "rgemma_requests_total{",
        "rgemma_prompt_tokens_total",
        "rgemma_generation_tokens_total",
        "rgemma_active_requests",
        "rgemma_queued_requests",
        "rgemma_time_to_first_token_seconds_bucket",
        "rgemma_inter_token_latency_seconds_count",
        "rgemma_prefix_cache_hits_total",
        "process_resident_memory_bytes",
    ):
        assert name in metrics, name
    assert 'rgemma_requests_total{endpoint="/v1/models",status="401"} 1' in metrics


def test_cli_serve_is_registered():
    from rgemma.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "9000", "--max-batch-size", "4"])
    assert args.host == "127.0.0.1" and args.port == 9000 and args.max_batch_size == 4


def test_missing_content_empty_body_and_text_plain_json(model, tok):
    app = create_app(model, tok, small_config())

    async def scenario(client):
        no_content = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}, {"role": "user"}]},
        )
        empty = await client.post(
            "/v1/completions", content=b"", headers={"content-type": "application/json"}
        )
        plain = await client.post(
            "/v1/completions",
            content=json.dumps({"prompt": "x", "max_tokens": 1}).encode(),
            headers={"content-type": "text/plain"},
        )
        bad_plain = await client.post(
            "/v1/completions", content=b"{nope", headers={"content-type": "text/plain"}
        )
        return no_content, empty, plain, bad_plain

    no_content, empty, plain, bad_plain = run_async(app, scenario)
    assert no_content.status_code == 400
    err = no_content.json()["error"]
    assert err["param"] == "messages[1].content" and "messages[1].content" in err["message"]
    assert empty.status_code == 400
    err = empty.json()["error"]
    assert err["param"] is None and "empty" in err["message"]
    assert plain.status_code == 200, plain.json()
    assert bad_plain.status_code == 400 and "invalid JSON" in bad_plain.json()["error"]["message"]


def test_cli_serve_checks_the_port_before_loading(capsys):
    import socket

    from rgemma.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rgemma: error: cannot listen on 127.0.0.1:{port}: ")
    assert len(err.strip().splitlines()) == 1
    assert main(["serve", "--host", "no-such-host.invalid", "--model", "/nonexistent"]) == 2
    assert "cannot listen on no-such-host.invalid:8000: " in capsys.readouterr().err


# ----------------------------------------------------------------------------------
# Bounded memory: per-request bookkeeping is freed, the model sees few shapes
# ----------------------------------------------------------------------------------
def test_finished_requests_leave_nothing_behind(model, tok):
    """After requests of every kind end, the scheduler holds no request, row, state or
    reserved slot, and every `GenerationRequest` is freed by reference counting alone
    (no request <-> bridge cycle left for the garbage collector)."""
    import gc
    import weakref

    app = create_app(model, tok, small_config())
    sched = app.state.server.scheduler
    refs = []
    submit = sched.submit

    def tracked(req):
        refs.append(weakref.ref(req))
        submit(req)

    sched.submit = tracked
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    async def scenario(client):
        async def one(i):
            stream = i % 2 == 0
            if i % 3 == 0:
                path, body = "/v1/chat/completions", {"messages": chat}
            else:
                path, body = "/v1/completions", {"prompt": PROMPTS[i % len(PROMPTS)], "n": 2}
            body.update(max_tokens=3 + i, temperature=0.5, seed=i, stream=stream)
            r = await client.post(path, json=body)
            assert r.status_code == 200, r.text
            if stream:
                sse_data(r.text)

        await asyncio.gather(*(one(i) for i in range(12)))
        bad = await client.post("/v1/completions", json={"prompt": "x", "n": 99})
        assert bad.status_code == 400
        # the last "done" event can reach the client just before the scheduler
        # thread retires its request
        for _ in range(500):
            if sched.num_active == 0:
                break
            await asyncio.sleep(0.01)

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        run_async(app, scenario)
        alive = sum(r() is not None for r in refs)
    finally:
        if was_enabled:
            gc.enable()
    assert len(refs) == 12
    assert alive == 0
    assert sched.num_active == sched.num_queued == sched.num_rows == 0
    assert sched._reserved == 0 and not sched._prefills and sched._state is None


def test_shape_buckets_bound_the_model_shapes(model, tok):
    """With shape buckets, prompts of every length from 1 to 40 tokens and batches of
    every size only make prefill pieces of 2^k or 3 * 2^k tokens and power-of-two
    decode batch sizes (capped at max_batch_size), the tokens being those of
    `generate` alone; without, the exact sizes."""
    base = tok.encode(" ".join(PROMPTS))
    prompts = [base[:n] for n in range(1, 41)]

    def serve(buckets):
        shapes = set()
        handle = model.register_forward_pre_hook(lambda m, a: shapes.add(tuple(a[0].shape)))
        sched = Scheduler(model, tok, max_batch_size=6, prefill_chunk=32, shape_buckets=buckets)
        events = [[] for _ in prompts]
        try:
            for i, p in enumerate(prompts):
                params = SamplingParams(max_new_tokens=2 + i % 5)
                sched.submit(GenerationRequest([p], params, on_event=events[i].append))
            while sched.has_work():
                sched.step()
                if sched.num_rows:
                    assert sched._state.batch_size == sched._bucket(sched.num_rows)
        finally:
            handle.remove()
        ids = [[e.token_id for e in ev if e.kind == "token"] for ev in events]
        return shapes, ids

    shapes, ids = serve(True)
    prefill = {t for b, t in shapes if b == 1}
    decode = {b for b, t in shapes if t == 1}
    assert prefill <= {1, 2, 3, 4, 6, 8, 12, 16, 24, 32}
    assert decode == {1, 2, 4, 6}  # 3 -> 4, 5 -> 6 (max_batch_size)
    assert {(b, t) for b, t in shapes if b > 1 and t > 1} == set()
    exact_shapes, exact_ids = serve(False)
    assert ids == exact_ids
    assert {t for b, t in exact_shapes if b == 1} >= set(range(1, 33))
    assert {b for b, t in exact_shapes if t == 1} - {1, 2, 4, 6}  # e.g. 3 or 5
    for p, got in list(zip(prompts, ids))[::7]:
        ref = generate(model, tok, [p], max_new_tokens=len(got), temperature=0.0)[0]
        assert got[: len(ref.token_ids)] == ref.token_ids


def test_idle_scheduler_hands_memory_back(model, tok):
    """glibc: once idle after some work, the scheduler trims the heap (malloc_trim),
    once per idle period."""
    import platform

    from rgemma.serve.scheduler import release_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert release_memory() is False
        pytest.skip("malloc_trim is glibc's")
    assert release_memory() is True
    sched = Scheduler(model, tok, max_batch_size=2, idle_trim_s=0.0)
    sched.start()
    try:
        assert sched.trims == 0  # idle, but no work done yet
        for expected in (1, 2):
            done = threading.Event()

            def on_event(event, done=done):
                if event.kind == "done":
                    done.set()

            sched.submit(
                GenerationRequest(
                    [tok.encode("Hi")], SamplingParams(max_new_tokens=3), on_event=on_event
                )
            )
            assert done.wait(20)
            assert wait_until(lambda n=expected: sched.trims >= n)
            assert sched.trims == expected
    finally:
        sched.stop()


def test_scheduler_decodes_through_compiled_decode_step(model, tok, monkeypatch):
    """`compile_decode` (here with a counting stand-in for torch.compile, so the test
    does not wait for a compiler) is what the scheduler's decode steps call."""
    import copy

    import rgemma.generation as gen_mod

    calls = []

    def counting_compile(fn, **kw):
        def run(*args):
            calls.append(args[0].shape[0])  # batch size (padded to a bucket)
            return fn(*args)

        return run

    monkeypatch.setattr(gen_mod.torch, "compile", counting_compile)
    compiled = gen_mod.compile_decode(copy.deepcopy(model))
    sched = Scheduler(compiled, tok, max_batch_size=4, prefill_chunk=64)
    events = [[] for _ in PROMPTS[:3]]
    for i, p in enumerate(PROMPTS[:3]):
        sched.submit(
            GenerationRequest(
                [tok.encode(p)], SamplingParams(max_new_tokens=6), on_event=events[i].append
            )
        )
    while sched.has_work():
        sched.step()
    assert calls and set(calls) <= {1, 2, 4}
    for i, p in enumerate(PROMPTS[:3]):
        ids = [e.token_id for e in events[i] if e.kind == "token" and e.token_id is not None]
        assert ids == greedy_ref(model, tok, p, 6).token_ids


def test_one_sampling_params_and_engine(model, tok):
    """The server builds `rgemma.sampling.SamplingParams` (OpenAI's max_tokens is
    max_new_tokens) and runs its rows on the engine `generate` uses."""
    import rgemma
    import rgemma.serve
    from rgemma.engine import RowEngine
    from rgemma.serve.protocol import CompletionRequest

    assert rgemma.serve.SamplingParams is SamplingParams is rgemma.SamplingParams
    app = create_app(model, tok, small_config())
    server = app.state.server
    body = CompletionRequest(prompt="x", max_tokens=7, temperature=0.5, top_k=-1, stop="\n")
    params = server._params(body, body.max_tokens, 2, prompt_logprobs=True)
    assert params == SamplingParams(  # fields not given: the CLI's defaults
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.95,
        repetition_penalty=1.1,
        stop=("\n",),
        logprobs=2,
        prompt_logprobs=True,
    )
    assert isinstance(server.scheduler.engine, RowEngine)


# ----------------------------------------------------------------------------------
# Limits: body size, prompt length before tokenizing, time limit, a free event loop
# ----------------------------------------------------------------------------------
def test_body_limit_refuses_before_reading(model, tok):
    app = create_app(model, tok, small_config(max_body_bytes=2000))
    read = []

    async def scenario(client):
        big = {"prompt": "word " * 1000, "max_tokens": 1}
        declared = await client.post("/v1/completions", json=big)

        async def chunks():  # no Content-Length: counted while it streams in
            read.append(1)
            yield b'{"prompt": "'
            for _ in range(100):
                read.append(1)
                yield b"word " * 20
            yield b'"}'

        streamed = await client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        small = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        return declared, streamed, small

    declared, streamed, small = run_async(app, scenario)
    for r in (declared, streamed):
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "request_too_large" and "2,000 bytes" in err["message"]
    assert len(read) < 101  # stopped reading once past the limit
    assert small.status_code == 200


def test_prompt_that_cannot_fit_is_refused_without_tokenizing(model, tok, monkeypatch):
    app = create_app(model, tok, small_config(max_prompt_tokens=50))
    server = app.state.server
    calls = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    too_long = "x" * (50 * server.max_piece_bytes + 1)

    async def scenario(client):
        a = await client.post("/v1/completions", json={"prompt": too_long, "max_tokens": 1})
        b = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": too_long}], "max_tokens": 1},
        )
        return a, b

    a, b = run_async(app, scenario)
    assert (a.status_code, a.json()["error"]["param"]) == (400, "prompt")
    assert (b.status_code, b.json()["error"]["param"]) == (400, "messages")
    assert a.json()["error"]["code"] == "context_length_exceeded" and calls == []


def test_time_limit_stops_the_request(model, tok):
    app = create_app(model, tok, small_config(request_timeout_s=0.0))
    sched = app.state.server.scheduler

    async def scenario(client):
        body = {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}
        plain = await client.post("/v1/completions", json=body)
        streamed = await client.post("/v1/completions", json={**body, "stream": True})
        return plain, streamed

    plain, streamed = run_async(app, scenario)
    assert plain.status_code == 504 and plain.json()["error"]["code"] == "timeout"
    assert "time limit" in plain.json()["error"]["message"]
    last = streamed.text.strip().splitlines()[-1]
    assert json.loads(last[len("data: ") :])["error"]["code"] == "timeout"
    assert sched.num_rows == 0 and sched.num_active == 0
    assert sched.metrics.requests_finished.value("error") == 2


class _GatedTokenizer:
    """The test tokenizer whose `encode` of a long text waits (at most 20 s) until
    `gate` is set: /health must be answered while a prompt is being tokenized."""

    def __init__(self, tok, gate: threading.Event):
        self._tok, self.gate, self.started, self.waited = tok, gate, threading.Event(), []

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, *args, **kwargs):
        if len(text) > 1000:
            self.started.set()
            self.waited.append(self.gate.wait(20))
        return self._tok.encode(text, *args, **kwargs)


def test_health_and_metrics_answer_while_a_long_prompt_is_tokenized(model, tok):
    gate = threading.Event()
    gated = _GatedTokenizer(tok, gate)
    app = create_app(model, gated, small_config(max_prompt_tokens=20_000, max_tokens=2))
    long_prompt = " ".join(PROMPTS) * 40  # some 10k tokens

    async def scenario(client):
        job = asyncio.ensure_future(
            client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
        )
        while not gated.started.is_set() and not job.done():  # until encode has started
            await asyncio.sleep(0.01)
        health = await client.get("/health")  # answered while encode waits on the gate
        metrics = await client.get("/metrics")
        pending = not job.done()
        gate.set()
        return health, metrics, pending, await job

    health, metrics, pending, done = run_async(app, scenario)
    assert health.status_code == 200 and metrics.status_code == 200
    # the gate was opened by this loop, not by the 20 s timeout: the loop was free
    assert pending and gated.waited == [True]
    assert done.status_code == 200, done.text


# ----------------------------------------------------------------------------------
# OpenAI conformance: penalties and the other sampling fields, defaults, logprobs
# ----------------------------------------------------------------------------------
def test_sampling_fields_equal_generate_in_one_batch(model, tok):
    """Requests with different penalties, biases, min_tokens and ignore_eos, decoded
    together, each get the tokens `generate` gives with the same SamplingParams."""
    app = create_app(model, tok, small_config(prefix_cache_bytes=0))
    variants = [
        {"repetition_penalty": 1.5},
        {"frequency_penalty": 1.2, "presence_penalty": 0.5},
        {"logit_bias": {"77": 5.0, "20": -100}},
        {"min_tokens": 6, "ignore_eos": True},
        {},
    ]

    async def scenario(client):
        jobs = [
            client.post(
                "/v1/completions",
                json={"prompt": PROMPTS[i], "max_tokens": 8, "temperature": 0, **v},
            )
            for i, v in enumerate(variants)
        ]
        return [r.json() for r in await asyncio.gather(*jobs)]

    got = run_async(app, scenario)
    assert app.state.server.scheduler.peak_rows > 1
    for i, (v, r) in enumerate(zip(variants, got)):
        fields = dict(v)
        if "logit_bias" in fields:
            fields["logit_bias"] = {int(k): b for k, b in fields["logit_bias"].items()}
        want = greedy_ref(model, tok, PROMPTS[i], 8, **fields)
        assert r["choices"][0]["text"] == want.text, v
    plain = greedy_ref(model, tok, PROMPTS[0], 8)
    assert got[0]["choices"][0]["text"] != plain.text  # the penalty changed something


def test_defaults_max_tokens_and_sampling_from_one_place(model, tok):
    from rgemma.sampling import default_sampling

    app = create_app(model, tok, small_config(default_max_tokens=5))
    server = app.state.server
    from rgemma.serve.protocol import ChatCompletionRequest

    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
    assert server._params(body, None, None, False) == default_sampling(max_new_tokens=5)

    async def scenario(client):
        return (
            await client.post("/v1/completions", json={"prompt": "x", "ignore_eos": True})
        ).json()

    out = run_async(app, scenario)
    assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["finish_reason"] == "length"


def test_openai_client_stream_usage_and_logprob_bytes(live_server, tok):
    openai = pytest.importorskip("openai")
    _, url = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-live", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    plain = list(
        client.chat.completions.create(
            model="rgemma", messages=messages, max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)
    with_usage = list(
        client.chat.completions.create(
            model="rgemma",
            messages=messages,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in with_usage[:-1])
    # A byte-fallback piece: token "=" and bytes [61]; half a UTF-8 character: its byte.
    eq, e2 = tok.piece_to_id("<0x3D>"), tok.piece_to_id("<0xE2>")
    chat = client.chat.completions.create(
        model="rgemma",
        messages=messages,
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        logit_bias={str(eq): 100},
        temperature=0,
    )
    content = chat.choices[0].logprobs.content
    assert [(c.token, c.bytes) for c in content] == [("=", [61])] * 3
    assert chat.choices[0].message.content == "==="
    chat = client.chat.completions.create(
        model="rgemma",
        messages=messages,
        max_tokens=1,
        logprobs=True,
        logit_bias={str(e2): 100},
        temperature=0,
    )
    entry = chat.choices[0].logprobs.content[0]
    assert entry.bytes == [0xE2] and entry.token == "\\xe2"
    # penalties through the client (extensions as extra_body)
    comp = client.completions.create(
        model="rgemma",
        prompt=PROMPTS[1],
        max_tokens=6,
        temperature=0,
        frequency_penalty=1.0,
        extra_body={"repetition_penalty": 1.3, "min_tokens": 2},
    )
    assert comp.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="rgemma", prompt="x", extra_body={"best_of": 3, "n": 1})
    assert info.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="rgemma", prompt="x", extra_body={"typical_p": 0.5})
    assert info.value.body["param"] == "typical_p"
