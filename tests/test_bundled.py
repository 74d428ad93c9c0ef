"""The bundled model: it loads with no path, generates, and scores the fixed held-out
slice no worse than the figures written by scripts/eval_bundled.py (and the README)."""

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

import rgemma
from rgemma.scoring import score_text

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = resources.files("rgemma") / "assets" / "bundled"


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = rgemma.load(dtype=torch.float32)
    eval_figures = json.loads((BUNDLED / "eval.json").read_text())
    return model.eval(), tokenizer, eval_figures


def test_bundled_config_is_the_repo_config(bundled):
    model, tokenizer, _ = bundled
    train_cfg = json.loads((ROOT / "configs" / "bundled.json").read_text())
    assert model.config == rgemma.GriffinConfig.from_dict(train_cfg["model"])
    assert tokenizer.vocab_size == model.config.vocab_size
    assert model.source["bundled"] is True


def test_heldout_slice_perplexity_matches_reported(bundled):
    model, tokenizer, figures = bundled
    text = (ROOT / figures["slice_file"]).read_text(encoding="utf-8")
    score = score_text(model, tokenizer, text)  # the scorer of scripts/eval_bundled.py
    assert score.tokens == figures["slice_tokens"]
    assert score.bytes == len(text.encode("utf-8"))
    # No worse than reported (and no better: the figures are of this very model).
    assert score.perplexity <= figures["slice_ppl"] * 1.02
    assert score.perplexity == pytest.approx(figures["slice_ppl"], rel=0.02)
    # Clearly better than a unigram model on the same tokenizer, and as in the README.
    assert figures["val_ppl"] < 0.5 * figures["unigram_ppl"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{figures['val_ppl']:.1f}" in readme


def test_bundled_generates_readable_text(bundled):
    model, tokenizer, _ = bundled
    [result] = rgemma.generate(
        model, tokenizer, ["It is a truth universally acknowledged"], max_new_tokens=24
    )
    words = result.text.split()
    assert len(words) >= 5
    # Mostly dictionary-like words: letters with punctuation, not byte soup.
    alpha = sum(w.strip(".,;:!?'\"-").isalpha() for w in words)
    assert alpha >= 0.7 * len(words), result.text
