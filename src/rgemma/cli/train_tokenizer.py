"""`rgemma train-tokenizer`: a Gemma-style SentencePiece tokenizer trained on text
files (`rgemma.tokenizer.train_tokenizer`)."""

from __future__ import annotations

import argparse
import os
import sys

from . import options

EPILOG = """\
examples:
  rgemma train-tokenizer --input data/corpus/*.txt --vocab-size 4096 \\
      --output src/rgemma/assets/bundled/tokenizer.model
  rgemma train-tokenizer --input data/corpus --vocab-size 8192 --output tok.model

A Gemma-style SentencePiece BPE model (byte fallback, split digits, <pad>=0,
<eos>=1, <bos>=2, <unk>=3, <start_of_turn>, <end_of_turn>). Directories are
searched recursively for *.txt files.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, description and examples of `rgemma train-tokenizer`."""
    p.description = "Train a Gemma-style SentencePiece tokenizer."
    p.epilog = EPILOG
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="UTF-8 text files or directories (of *.txt)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="number of pieces, including 256 byte pieces and the specials",
    )
    p.add_argument("--output", required=True, metavar="PATH", help="where to write the .model file")
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=200_000,
        metavar="N",
        help="how many text chunks the trainer samples (0: all; default 200000)",
    )
    p.add_argument("--seed", type=options.seed_type, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=int, metavar="N", help="trainer threads")


def run(args: argparse.Namespace) -> int:
    """Run `rgemma train-tokenizer`; prints the output path; returns 0."""
    from pathlib import Path

    from ..errors import InputError
    from ..tokenizer import Tokenizer, train_tokenizer

    files: list[str] = []
    for item in args.input:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*.txt") if f.is_file())
            if not found:
                raise InputError(f"no *.txt files under directory {path}")
            files += found
        elif path.is_file():
            files.append(item)
        else:
            raise InputError(f"tokenizer training file not found: {item}")
    options.positive("--vocab-size", args.vocab_size)
    if args.threads is not None:
        options.positive("--threads", args.threads)
    options.positive("--input-sentence-size", args.input_sentence_size, 0)
    if os.path.isdir(args.output) or args.output.endswith(("/", os.sep)):
        raise InputError(
            f"--output {args.output} is a directory: give the .model file to write, "
            f"e.g. {os.path.join(args.output, 'tokenizer.model')}"
        )
    out = train_tokenizer(
        files,
        args.output,
        args.vocab_size,
        input_sentence_size=args.input_sentence_size,
        seed=args.seed,
        num_threads=args.threads,
    )
    tok = Tokenizer(out)
    print(f"wrote {out} ({tok.vocab_size} pieces, from {len(files)} file(s))", file=sys.stderr)
    print(os.fspath(out))
    return 0
