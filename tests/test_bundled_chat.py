"""The bundled chat model (src/rgemma/assets/bundled-chat/, built by
scripts/build_chat_model.sh): it answers held-out user lines in turn and ends its turn,
its reported turn-ending rate meets the target, its provenance is complete and
reproducible, and it is the default model of `rgemma chat` (and `serve`) while
`generate` keeps the base."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rgemma
from rgemma.checkpoint import bundled_model_path
from rgemma.cli import build_parser, main
from rgemma.sampling import default_sampling

ROOT = Path(__file__).resolve().parent.parent
CHAT = bundled_model_path(chat=True)
HELDOUT = ROOT / "tests" / "data" / "chat_heldout.jsonl"
MAX_NEW_TOKENS = 128  # the length limit of scripts/eval_chat.py


def _dialogues(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in path.read_text("utf-8").splitlines()]


def _user_lines(path: Path) -> list[str]:
    return [messages[0]["content"] for messages in _dialogues(path)]


@pytest.fixture(scope="module")
def chat_model():
    model, tokenizer = rgemma.load(CHAT)
    return model, tokenizer


@pytest.fixture(scope="module")
def figures():
    return json.loads((CHAT / "eval.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def training():
    return json.loads((CHAT / "training.json").read_text("utf-8"))


def test_ends_its_turn_on_heldout_lines(chat_model):
    model, tokenizer = chat_model
    prompts = _user_lines(HELDOUT)[:16]
    for sampling in (
        default_sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0),  # greedy
        default_sampling(max_new_tokens=MAX_NEW_TOKENS, seed=0),  # `rgemma chat`'s defaults
    ):
        results = rgemma.generate(model, tokenizer, prompts, sampling=sampling, chat=True)
        ended = [r.stop_token_id == tokenizer.end_of_turn_id for r in results]
        assert sum(ended) >= 0.9 * len(prompts), [r.text for r in results]
        for r in results:  # an answer: some words, not an echo of the user line
            assert r.text.split(), r
            assert r.text.strip() not in prompts


def test_later_turns_end_too(chat_model):
    # `rgemma chat` continues from the state: each later turn must end as well.
    model, tokenizer = chat_model
    session = rgemma.ChatSession(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS)  # greedy
    for line in _user_lines(HELDOUT)[16:19]:
        stream = session.send_stream(line)
        text = "".join(stream)
        assert text.split() and stream.result.stop_token_id == tokenizer.end_of_turn_id, text
    assert session.turns == 3


def test_reported_turn_ending_rate(figures, training):
    # The target of the chat model: >= 90% of held-out replies end their turn, with
    # `rgemma chat`'s sampling, within the length limit.
    assert figures["max_new_tokens"] == MAX_NEW_TOKENS
    assert figures["chat_defaults"]["sampling"]["temperature"] == 0.8
    assert figures["chat_defaults"]["end_of_turn_rate"] >= 0.9
    assert figures["greedy"]["end_of_turn_rate"] >= 0.9
    assert figures["chat_defaults"]["reply_tokens"]["median"] < 64
    # ... measured on every held-out dialogue of the shipped data set.
    valid = training["data"]["files"]["valid.jsonl"]
    assert figures["prompts"] == valid["dialogues"] >= 500
    assert figures["data_sha256"] == valid["sha256"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{figures['chat_defaults']['end_of_turn_rate']:.1%}" in readme


def test_provenance_is_reproducible(tmp_path, training):
    # The base it was tuned from, the config and the data builder are in the repo.
    base = bundled_model_path() / "model.safetensors"
    assert training["base_sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    config = json.loads((ROOT / training["config"]).read_text("utf-8"))
    assert config["lora_rank"] == training["lora"]["lora_rank"] > 0
    assert training["steps"] == config["max_steps"]
    assert (CHAT / "LICENSE-DATA.md").is_file() and (CHAT / "tokenizer.model").is_file()
    # Rebuilding the dialogue set from the corpus gives the recorded files, byte for byte.
    settings = training["data"]["settings"]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "build_chat_data.py"),
            "--out",
            str(tmp_path),
            "--held-out",
            str(settings["held_out_fraction"]),
            "--max-user-chars",
            str(settings["max_user_chars"]),
            "--max-reply-chars",
            str(settings["max_reply_chars"]),
        ],
        check=True,
        capture_output=True,
    )
    for name, info in training["data"]["files"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == info["sha256"]
    # The tests' held-out sample is held out: in valid.jsonl, no speech of it in training.
    valid = (tmp_path / "valid.jsonl").read_text("utf-8").splitlines()
    sample = HELDOUT.read_text("utf-8").splitlines()
    assert len(sample) >= 19 and set(sample) <= set(valid)
    trained = {m["content"] for d in _dialogues(tmp_path / "train.jsonl") for m in d}
    assert not trained & {
        m["content"] for d in _dialogues(HELDOUT) for m in d if len(m["content"]) > 40
    }


def test_chat_and_serve_default_to_the_chat_model(capsys, monkeypatch, chat_model):
    model, tokenizer = chat_model
    line = _user_lines(HELDOUT)[0]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(line.encode() + b"\n")))
    rc = main(["chat", "--max-new-tokens", str(MAX_NEW_TOKENS), "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    expected = rgemma.ChatSession(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS).send(line)
    assert out == expected + "\n"
    assert build_parser().parse_args(["serve"]).chat_model is True
    # `generate` keeps the base model, which does not answer in turn.
    assert build_parser().parse_args(["generate", "x"]).chat_model is False
    base, base_tok = rgemma.load(dtype=torch.bfloat16)
    [result] = rgemma.generate(
        base, base_tok, [line], chat=True, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0
    )
    assert result.stop_token_id != base_tok.end_of_turn_id


def test_missing_chat_model_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("rgemma.checkpoint.bundled_model_path", lambda chat=False: tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello\n")))
    assert main(["chat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no bundled chat model is installed" in err, err
    assert str(tmp_path) in err and "--model" in err
