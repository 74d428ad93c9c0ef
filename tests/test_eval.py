"""`rgemma eval`: perplexity over files equals the scorer run directly (whole
documents, JSONL masks, --context windows, files read in blocks), and the lm-eval
adapter's scores equal the same quantities computed with the scorer and
`rgemma.generate` (multiple choice, rolling perplexity, generation), batch 1 ==
batch 8. Tiny random models with the bundled tokenizer; the repo's own tasks
(tests/data/tasks), no download."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from oracle import random_model

import rgemma
from rgemma.checkpoint import save_model
from rgemma.cli import main
from rgemma.config import GriffinConfig
from rgemma.scoring import score_batch, score_ids, score_stream, score_texts
from rgemma.tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "tasks"
CFG = dataclasses.replace(GriffinConfig.preset("test-tiny"), vocab_size=4096)
DOCS = [
    (
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife."
    ),
    (
        "Call me Ishmael.\nSome years ago, never mind how long precisely.\n\nI thought I "
        "would sail about a little and see the watery part of the world.\n"
    ),
    "To be, or not to be: that is the question.",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(BUNDLED_TOKENIZER_PATH)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=5, std=0.15)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(model, d, tokenizer_path=BUNDLED_TOKENIZER_PATH)
    return str(d)


def run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------
# The scorer's additions
# ----------------------------------------------------------------------------------
def test_score_stream_equals_whole_and_greedy_flag(model, tok):
    ids = tok.encode(DOCS[1], add_eos=True)
    whole = score_ids(model, ids)
    for cuts in ([1], [5, 6, 40], [len(ids) - 1]):
        bounds = [0, *cuts, len(ids)]
        pieces = [ids[a:b] for a, b in itertools.pairwise(bounds)]
        got = score_stream(model, pieces, chunk_size=7)
        assert got.tokens == whole.tokens and got.nll == pytest.approx(whole.nll, rel=1e-6)
    with pytest.raises(rgemma.InputError, match="fewer than 2 tokens"):
        score_stream(model, [[2], []])

    greedy_row = ids[:3]  # then 8 greedy tokens: each the argmax after what precedes it
    with torch.no_grad():
        for _ in range(8):
            greedy_row.append(int(model(torch.tensor([greedy_row]))[0][0, -1].argmax()))
        best = model(torch.tensor([ids]))[0][0, :-1].argmax(-1).tolist()
    only_greedy = [False] * 3 + [True] * 8
    [g, n] = score_batch(model, [greedy_row, ids], masks=[only_greedy, None], greedy=True)
    assert g.greedy is True and n.greedy is (best == ids[1:]) is False
    masked = score_batch(model, [ids], masks=[[i < 3 for i in range(len(ids))]], greedy=True)
    assert masked[0].greedy is (best[:2] == ids[1:3])
    assert score_ids(model, ids).greedy is None  # not asked


# ----------------------------------------------------------------------------------
# rgemma eval perplexity
# ----------------------------------------------------------------------------------
def test_perplexity_text_jsonl_dir_equal_direct(capsys, tmp_path, model_dir, model, tok):
    data = tmp_path / "data"
    data.mkdir()
    for i, d in enumerate(DOCS[:2]):
        (data / f"doc{i}.txt").write_text(d, encoding="utf-8")
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text(
        json.dumps({"text": DOCS[2]})
        + "\n"
        + json.dumps({"prompt": "Question: who? Answer:", "completion": " Mr. Darcy."})
        + "\n",
        encoding="utf-8",
    )
    out_json = tmp_path / "r.json"
    rc, out, err = run(
        capsys,
        ["eval", "perplexity", str(data), str(jsonl), "--model", model_dir, "--output",
         str(out_json)],
    )  # fmt: skip
    assert rc == 0, err
    assert "perplexity" in out and "bits/byte" in out and "total" in out
    result = json.loads(out_json.read_text())
    files = {Path(r["path"]).name: r for r in result["files"]}

    direct = score_texts(model, tok, DOCS)
    for i in range(2):
        r = files[f"doc{i}.txt"]
        assert r["tokens"] == direct[i].tokens and r["bytes"] == direct[i].bytes
        assert r["nll"] == pytest.approx(direct[i].nll, rel=1e-6)
        assert r["perplexity"] == pytest.approx(direct[i].perplexity, rel=1e-6)
    # JSONL: a text document whole, a completion with only the completion (+ EOS) scored
    ids = tok.encode("Question: who? Answer: Mr. Darcy.", add_eos=True)
    n_prompt = len(tok.encode("Question: who? Answer:"))
    mask = [False] * n_prompt + [True] * (len(ids) - n_prompt)
    completion = score_ids(model, ids, mask=mask)
    r = files["mixed.jsonl"]
    assert r["documents"] == 2 and r["tokens"] == direct[2].tokens + completion.tokens
    assert r["nll"] == pytest.approx(direct[2].nll + completion.nll, rel=1e-6)
    total = result["total"]
    assert total["documents"] == 4
    assert total["bits_per_byte"] == pytest.approx(
        total["nll"] / math.log(2) / total["bytes"], rel=1e-12
    )
    rc, out, _ = run(capsys, ["eval", "perplexity", str(data), "--model", model_dir, "--json"])
    assert rc == 0 and json.loads(out)["total"]["documents"] == 2


def test_perplexity_context_windows_and_blocks(
    capsys, tmp_path, model_dir, model, tok, monkeypatch
):
    f = tmp_path / "long.txt"
    f.write_text(DOCS[1] * 3, encoding="utf-8")
    ids = tok.encode(DOCS[1] * 3, add_eos=True)
    n = 9  # --context 9: windows of 8 tokens after BOS
    body = ids[1:]
    windows = [[tok.bos_id, *body[i : i + n - 1]] for i in range(0, len(body), n - 1)]
    expected = sum(s.nll for s in score_batch(model, windows))
    rc, out, err = run(
        capsys,
        ["eval", "perplexity", str(f), "--model", model_dir, "--context", str(n), "--json",
         "--batch-size", "3"],
    )  # fmt: skip
    assert rc == 0, err
    got = json.loads(out)["total"]
    assert got["tokens"] == len(ids) - 1 and got["nll"] == pytest.approx(expected, rel=1e-6)

    # a file read in small blocks (cut at line ends) scores as its blocks' tokens whole
    import rgemma.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "BLOCK_CHARS", 40)
    blocks = list(eval_cli.text_blocks(f, 40))
    assert len(blocks) > 3 and "".join(blocks) == DOCS[1] * 3
    block_ids = [tok.bos_id] + [t for b in blocks for t in tok.encode(b, add_bos=False)]
    expected = score_ids(model, [*block_ids, tok.eos_id])
    rc, out, err = run(capsys, ["eval", "perplexity", str(f), "--model", model_dir, "--json"])
    got = json.loads(out)["total"]
    assert rc == 0 and got["tokens"] == expected.tokens
    assert got["nll"] == pytest.approx(expected.nll, rel=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "perplexity"], "needs FILES"),
        (["eval", "perplexity", "/no/such/file.txt"], "FILES path not found: /no/such/file.txt"),
        (["eval", "perplexity", "README.md", "--context", "1"], "--context must be >= 2"),
        (["eval", "tasks"], "needs --tasks"),
        (["eval", "tasks", "x.txt", "--tasks", "a"], "takes no files"),
        (["eval", "perplexity", "README.md", "--tasks", "a"], "--tasks belongs to"),
    ],
)
def test_eval_bad_input_is_one_line(capsys, model_dir, argv, message):
    rc, _, err = run(capsys, [*argv, "--model", model_dir])
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------
# lm-eval
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harness(model, tok):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (extra .[eval])")
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from rgemma.lm_eval import run_tasks

    cwd = os.getcwd()
    os.chdir(ROOT)  # the tasks' data_files are relative to the repo root
    try:
        return {
            b: run_tasks(
                ["rgemma_mc", "rgemma_ppl", "rgemma_gen"],
                model=model,
                tokenizer=tok,
                batch_size=b,
                include_path=[str(TASKS)],
                include_defaults=False,  # only the repo's tasks: no indexing of lm-eval's
                log_samples=True,
            )
            for b in (1, 8)
        }
    finally:
        os.chdir(cwd)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_harness_multiple_choice_equals_scorer(harness, model, tok):
    docs = _rows(TASKS / "rgemma_mc.jsonl")
    correct = 0
    samples = sorted(harness[1]["samples"]["rgemma_mc"], key=lambda s: s["doc_id"])
    for doc, sample in zip(docs, samples, strict=True):
        lls = []
        for choice, resp in zip(doc["choices"], sample["resps"], strict=True):
            ctx = tok.encode(doc["context"])
            whole = tok.encode(doc["context"] + " " + choice)
            assert whole[: len(ctx)] == ctx
            s = score_ids(model, whole, mask=[False] * len(ctx) + [True] * (len(whole) - len(ctx)))
            ll = resp[0][0]
            assert ll == pytest.approx(-s.nll, rel=1e-6, abs=1e-6)
            lls.append(-s.nll)
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
    acc = harness[1]["results"]["rgemma_mc"]["acc,none"]
    assert acc == pytest.approx(correct / len(docs))


def test_harness_rolling_perplexity_equals_scorer(harness, model, tok):
    texts = [r["text"] for r in _rows(TASKS / "rgemma_ppl.jsonl")]
    direct = [score_ids(model, tok.encode(t)) for t in texts]  # <bos> text, no EOS
    nll = sum(s.nll for s in direct)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    got = harness[1]["results"]["rgemma_ppl"]
    assert got["bits_per_byte,none"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-6)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(nll / nbytes), rel=1e-6)


def test_harness_generation_equals_generate(harness, model, tok):
    docs = _rows(TASKS / "rgemma_gen.jsonl")
    samples = sorted(harness[1]["samples"]["rgemma_gen"], key=lambda s: s["doc_id"])
    hits = 0
    for doc, sample in zip(docs, samples, strict=True):
        r = rgemma.generate(model, tok, doc["prompt"], max_new_tokens=16, stop=("\n", "."))[0]
        text = r.text.split("\n")[0].split(".")[0]
        assert sample["resps"][0][0] == text
        hits += text == doc["answer"]
    assert harness[1]["results"]["rgemma_gen"]["exact_match,none"] == hits / len(docs)


def test_harness_batch_1_equals_batch_8(harness):
    one, eight = harness[1]["results"], harness[8]["results"]
    for task in one:
        for key, value in one[task].items():
            if isinstance(value, float):
                assert eight[task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)
            else:
                assert eight[task][key] == value, (task, key)


def test_harness_errors(harness, model, tok):
    from rgemma.lm_eval import run_tasks

    with pytest.raises(rgemma.InputError, match="lm-eval does not know task.* no_such_task"):
        run_tasks(
            ["no_such_task"],
            model=model,
            tokenizer=tok,
            include_path=[str(TASKS)],
            include_defaults=False,
        )


def test_lm_eval_missing_names_the_extra(capsys, monkeypatch, model_dir):
    import sys

    monkeypatch.delitem(sys.modules, "rgemma.lm_eval", raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    rc, _, err = run(capsys, ["eval", "tasks", "--tasks", "rgemma_mc", "--model", model_dir])
    assert rc == 2 and 'pip install "rgemma[eval]"' in err
    assert len(err.strip().splitlines()) == 1
