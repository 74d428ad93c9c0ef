#!/usr/bin/env python
"""Evaluate a model on the bundled corpus's held-out split and write the figures.

Validation documents are those `rgemma train` holds out (`configs/bundled.json`:
SHA-256 split by document, `val_fraction` 0.01, documents of at most `doc_chars`).
They are written to a JSONL file and scored by `rgemma eval perplexity` (each
document whole, as BOS + text + EOS, in chunks over the fixed-size state: the
scorer of training evaluation, `rgemma.scoring`): cross-entropy in nats per token,
perplexity, and bits per UTF-8 byte. The baseline is a unigram model on the same
tokenizer, fitted on the training split (add-one smoothing).

It also writes a fixed slice of the validation text, which the test suite scores
again (tests/test_bundled.py).

    python scripts/eval_bundled.py [--model DIR] [--out src/rgemma/assets/bundled/eval.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

import rgemma
from rgemma.cli import main as rgemma_main
from rgemma.data import expand_paths, read_documents, split_documents

ROOT = Path(__file__).resolve().parent.parent
SLICE_PATH = ROOT / "tests" / "data" / "bundled_val_slice.txt"
SLICE_CHARS = 6000


def unigram_nats(tokenizer, train_docs, val_docs) -> tuple[float, int]:
    counts = np.ones(tokenizer.vocab_size, dtype=np.float64)  # add-one smoothing
    for d in train_docs:
        ids = tokenizer.encode(d.text, add_bos=True, add_eos=True)
        counts += np.bincount(np.asarray(ids[1:]), minlength=tokenizer.vocab_size)
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for d in val_docs:
        ids = tokenizer.encode(d.text, add_bos=True, add_eos=True)[1:]
        total -= float(logp[ids].sum())
        n += len(ids)
    return total, n


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "bundled.json"))
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    ap.add_argument("--write-slice", action="store_true", help=f"(re)write {SLICE_PATH}")
    args = ap.parse_args()

    cfg = json.loads(Path(args.config).read_text())
    model, tokenizer = rgemma.load(args.model, dtype=torch.float32)
    model.eval()
    paths = expand_paths([str(ROOT / pattern) for pattern in cfg["train_data"]], "train_data")
    docs = read_documents(paths, doc_chars=cfg.get("doc_chars", 16000))
    train_docs, val_docs = split_documents(docs, cfg.get("val_fraction", 0.01))
    if args.write_slice:
        SLICE_PATH.parent.mkdir(parents=True, exist_ok=True)
        SLICE_PATH.write_text(val_docs[0].text[:SLICE_CHARS], encoding="utf-8")

    with tempfile.TemporaryDirectory() as tmp:  # `rgemma eval perplexity VAL SLICE`
        val_file, report = Path(tmp) / "val.jsonl", Path(tmp) / "eval.json"
        with open(val_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d.text}, ensure_ascii=False) + "\n" for d in val_docs)
        argv = ["eval", "perplexity", str(val_file), str(SLICE_PATH), "--dtype", "float32"]
        argv += ["--output", str(report)] + (["--model", args.model] if args.model else [])
        with contextlib.redirect_stdout(io.StringIO()):  # its table: this script prints JSON
            rc = rgemma_main(argv)
        if rc != 0:
            raise SystemExit("rgemma eval perplexity failed")
        val, heldout_slice = json.loads(report.read_text())["files"]
    uni_total, uni_tokens = unigram_nats(tokenizer, train_docs, val_docs)
    assert uni_tokens == val["tokens"]

    out = {
        "val_documents": len(val_docs),
        "val_tokens": val["tokens"],
        "val_bytes": val["bytes"],
        "val_loss": val["nll_per_token"],
        "val_ppl": val["perplexity"],
        "val_bpb": val["bits_per_byte"],
        "unigram_ppl": math.exp(uni_total / uni_tokens),
        "unigram_bpb": uni_total / math.log(2) / val["bytes"],
        "slice_file": str(SLICE_PATH.relative_to(ROOT)),
        "slice_tokens": heldout_slice["tokens"],
        "slice_ppl": heldout_slice["perplexity"],
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
