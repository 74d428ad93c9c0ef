#!/usr/bin/env bash
# Rebuild the bundled demo model's tokenizer, src/rgemma/assets/bundled/tokenizer.model:
# SentencePiece BPE, vocab 4096, Gemma's special ids and settings (see
# rgemma.tokenizer.train_tokenizer), trained on the training split of
# data/corpus/*.txt only. The split (rgemma.data defaults: documents of at most
# 16000 characters, 1% of them by content hash for validation) must be the one
# the model is trained with, so that the tokenizer never saw validation text.
# Takes about 10 seconds on 2 CPU cores; the output is byte-identical on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} python - <<'PY'
from rgemma.data import read_documents, split_documents
from rgemma.tokenizer import Tokenizer, train_tokenizer

train, val = split_documents(read_documents("data/corpus"), val_fraction=0.01)
path = train_tokenizer(
    [], "src/rgemma/assets/bundled/tokenizer.model", 4096,
    texts=[d.text for d in train], num_threads=2, seed=0,
)
tok = Tokenizer(path)
print(f"{path}: vocab {tok.vocab_size}, trained on {len(train)} documents "
      f"({len(val)} held out for validation)")
PY
