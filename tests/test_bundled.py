"""The bundled model: it loads with no path, generates, and scores the fixed held-out
slice no worse than the figures written by scripts/eval_bundled.py (and the README)."""

import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch

import rgemma

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


@torch.no_grad()
def test_heldout_slice_perplexity_matches_reported(bundled):
    model, tokenizer, figures = bundled
    text = (ROOT / figures["slice_file"]).read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert len(ids) - 1 == figures["slice_tokens"]
    tokens = torch.tensor([ids])
    logits, _ = model(tokens[:, :-1])
    nats = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:], reduction="mean")
    ppl = math.exp(float(nats))
    assert ppl <= figures["slice_ppl"] * 1.02
    # Clearly better than a unigram model on the same tokenizer, and as in the README.
    assert figures["val_ppl"] < 0.5 * figures["unigram_ppl"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{figures['val_ppl']:.1f}" in readme


def test_bundled_generates_readable_text(bundled):
    model, tokenizer, _ = bundled
    [result] = rgemma.generate(model, tokenizer, ["It is a truth universally acknowledged"],
                               max_new_tokens=24)
    words = result.text.split()
    assert len(words) >= 5
    # Mostly dictionary-like words: letters with punctuation, not byte soup.
    alpha = sum(w.strip(".,;:!?'\"-").isalpha() for w in words)
    assert alpha >= 0.7 * len(words), result.text
