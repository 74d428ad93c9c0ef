"""The server's tokenizer endpoints (vLLM's `/tokenize`, `/detokenize`,
`/tokenizer_info`), BOS in front of token-id prompts, and lm-eval's
`local-completions` model scoring through `rgemma serve` exactly as rgemma's own
lm-eval model does (the repo's multiple-choice and rolling-perplexity tasks, tiny
random model, bundled tokenizer, no download)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from oracle import random_model

from rgemma.config import GriffinConfig
from rgemma.serve.app import ServeConfig, create_app
from rgemma.tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "tasks"
CFG = dataclasses.replace(GriffinConfig.preset("test-tiny"), vocab_size=4096)
TEXTS = [
    "Call me Ishmael.",
    "<bos>It is a truth",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "<bos>",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(BUNDLED_TOKENIZER_PATH)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=5, std=0.15)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(**kw) -> ServeConfig:
    base = {"max_batch_size": 8, "max_prompt_tokens": 300, "max_tokens": 16}
    return ServeConfig(**{**base, **kw})


def post_all(app, calls):
    """[(method, path, json or raw JSON text, headers)] against `app` over ASGI,
    scheduler running."""
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        return [
            client.request(m, p, content=j, headers=h)
            if isinstance(j, str)
            else client.request(m, p, json=j, headers=h)
            for m, p, j, h in calls
        ]


def test_tokenize_detokenize_and_info_are_vllms(model, tok):
    app = create_app(model, tok, config())
    calls = []
    for text in TEXTS:
        calls.append(("POST", "/tokenize", {"model": "rgemma", "prompt": text}, None))
        calls.append(("POST", "/tokenize", {"prompt": text, "add_special_tokens": False}, None))
    calls += [
        ("POST", "/tokenize", {"prompt": "Call me", "return_token_strs": True}, None),
        ("POST", "/detokenize", {"model": "rgemma", "tokens": tok.encode(TEXTS[0])}, None),
        ("GET", "/tokenizer_info", None, None),
    ]
    *tokenized, strs, detok, info = post_all(app, calls)
    for i, text in enumerate(TEXTS):
        with_bos, without = tokenized[2 * i].json(), tokenized[2 * i + 1].json()
        assert with_bos["tokens"] == tok.encode(text)  # BOS first, control text parsed
        assert without["tokens"] == tok.encode(text, add_bos=False)
        assert with_bos["count"] == len(with_bos["tokens"]) and with_bos["max_model_len"] == 300
    # A text starting with "<bos>" gets no second one; lm-eval finds BOS's id so.
    assert tokenized[2].json()["tokens"] == tokenized[3].json()["tokens"]
    assert tokenized[6].json()["tokens"] == tokenized[7].json()["tokens"] == [tok.bos_id]
    got = strs.json()
    assert got["token_strs"] == [tok.id_to_piece(i) for i in got["tokens"]]
    assert detok.json() == {"prompt": TEXTS[0]}
    info = info.json()
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    assert "<start_of_turn>" in info["chat_template"]


def test_tokenizer_endpoints_bad_input_and_api_key(model, tok):
    app = create_app(model, tok, config(api_key="sk-t"))
    key = {"Authorization": "Bearer sk-t"}
    calls = [
        ("POST", "/tokenize", {"prompt": "x"}, None),
        ("POST", "/tokenize", {"prompt": "x", "bogus": 1}, key),
        ("POST", "/tokenize", '{"prompt": "\\ud800"}', key),  # not valid Unicode
        ("POST", "/tokenize", {"prompt": "x" * 100_000}, key),
        ("POST", "/detokenize", {"tokens": [5, 4096]}, key),
        ("POST", "/detokenize", {"tokens": ["5"]}, key),
        ("GET", "/tokenizer_info", None, None),
        ("POST", "/tokenize", {"prompt": "x"}, key),
    ]
    r = post_all(app, calls)
    assert [x.status_code for x in r] == [401, 400, 400, 400, 400, 400, 401, 200]
    assert r[1].json()["error"]["param"] == "bogus"
    assert r[2].json()["error"]["param"] == "prompt" and "surrogate" in r[2].text
    assert r[3].json()["error"]["code"] == "context_length_exceeded"
    assert r[4].json()["error"]["param"] == "tokens" and "4096" in r[4].text
    assert r[5].json()["error"]["param"] == "tokens[0]"


def test_token_prompt_without_bos_gets_one_not_echoed(model, tok):
    """A token-id prompt without BOS is run as BOS + ids; echo and its logprobs cover
    the ids as sent, the first one's logprob given BOS (a text prompt echoes BOS)."""
    app = create_app(model, tok, config())
    ids = tok.encode("Call me Ishmael. Some years ago", add_bos=False)
    body = {"max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    plain, with_bos, text = post_all(
        app,
        [
            ("POST", "/v1/completions", {**body, "prompt": ids}, None),
            ("POST", "/v1/completions", {**body, "prompt": [tok.bos_id, *ids]}, None),
            ("POST", "/v1/completions", {**body, "prompt": tok.decode(ids)}, None),
        ],
    )
    plain, with_bos, text = plain.json()["choices"][0], with_bos.json(), text.json()
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([[tok.bos_id, *ids]]))[0][0], -1)  # (t, v)
    want = [full[i, ids[i]].item() for i in range(len(ids))]
    lp = plain["logprobs"]["token_logprobs"]
    assert len(lp) == len(ids) + 1  # the prompt's ids as sent, then the one new token
    assert lp[: len(ids)] == pytest.approx(want, abs=1e-4)
    assert plain["text"].startswith(tok.decode(ids))
    for other in (with_bos, text):  # BOS sent (or added to text) is echoed, logprob None
        olp = other["choices"][0]["logprobs"]["token_logprobs"]
        assert olp[0] is None and olp[1:] == pytest.approx(lp, abs=1e-5)
    assert with_bos["usage"]["prompt_tokens"] == len(ids) + 1


# ----------------------------------------------------------------------------------
# lm-eval's local-completions through a live server == rgemma's own lm-eval model
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_url(model, tok):
    import socket

    uvicorn = pytest.importorskip("uvicorn")
    app = create_app(model, tok, config(max_prompt_tokens=4096))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_local_completions_through_serve_equals_the_adapter(live_url, model, tok, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (extra .[eval])")
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity")
    import lm_eval

    from rgemma.lm_eval import _TASK_MANAGERS, run_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repo root
    tasks = ["rgemma_mc", "rgemma_ppl"]
    direct = run_tasks(
        tasks,
        model=model,
        tokenizer=tok,
        batch_size=4,
        include_path=[str(TASKS)],
        include_defaults=False,
        log_samples=True,
    )
    manager = _TASK_MANAGERS[(False, os.path.abspath(TASKS))]
    # Plain lm-eval, its own model: the remote tokenizer is detected (/tokenizer_info,
    # /tokenize), requests go as token ids with echo + logprobs.
    served = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{live_url}/v1/completions", "model": "rgemma"},
        tasks=tasks,
        task_manager=manager,
        log_samples=True,
        verbosity="WARNING",
    )
    assert served["config"]["model_args"]["base_url"].endswith("/v1/completions")
    for task in tasks:
        got = sorted(served["samples"][task], key=lambda s: s["doc_id"])
        want = sorted(direct["samples"][task], key=lambda s: s["doc_id"])
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            for g_resp, w_resp in zip(g["resps"], w["resps"], strict=True):
                g_ll = g_resp[0][0] if task == "rgemma_mc" else g_resp[0]
                w_ll = w_resp[0][0] if task == "rgemma_mc" else w_resp[0]
                assert float(g_ll) == pytest.approx(float(w_ll), rel=1e-5, abs=1e-4), task
        for key, value in direct["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert served["results"][task][key] == pytest.approx(value, rel=1e-5), key
