"""`rgemma train` and `rgemma train-tokenizer`: parsers and handlers.

Registered in `rgemma.cli` with `register_command`. Torch and the training code
are imported only when a handler runs, so `rgemma --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = [
    "add_train_parser",
    "add_train_tokenizer_parser",
    "run_train",
    "run_train_tokenizer",
]

TRAIN_EPILOG = """\
examples:
  rgemma train --config configs/bundled.json
  rgemma train --config configs/bundled.json --resume          # continue after a stop
  rgemma train --config configs/bundled.json --max-steps 20 warmup_steps=2 --out runs/bench
  rgemma train --config ft.toml lr=3e-4 bf16=true train_data='["chat.jsonl"]'
  rgemma train --config c.json model.width=128 out_dir=runs/wide

Overrides are KEY=VALUE pairs of TrainConfig fields (see rgemma.training.TrainConfig),
anywhere on the line (or each as --set KEY=VALUE); VALUE is
parsed as JSON when it can be (numbers, true/false, null, lists), else taken as a
string; a dotted KEY sets a field of an inline model config.

Checkpoints go to OUT/checkpoints/step_XXXXXXX/ (atomic; the last keep_last are
kept), metrics to OUT/metrics.jsonl, the final model to OUT/final/ (load it with
`rgemma generate --model OUT/final`). After a stop or a crash, the same command
with --resume continues exactly where the last checkpoint left off.
"""


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The `train` subcommand's parser."""
    from .cli import new_parser  # cli imports this module at its end

    p = new_parser(
        subparsers,
        "train",
        help="train or fine-tune a model (checkpoints, resume, eval)",
        description="Train a Griffin model from scratch or fine-tune a checkpoint, as "
        "described by a JSON or TOML train config.",
        epilog=TRAIN_EPILOG,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="train config (.json or .toml); without it, overrides give every field",
    )
    p.add_argument("--out", metavar="DIR", help="output directory (overrides out_dir)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in the output directory",
    )
    p.add_argument("--max-steps", type=int, metavar="N", help="total optimiser steps")
    p.add_argument(
        "--init-from",
        metavar="PATH",
        help="fine-tune this checkpoint (official .pt, HF or rgemma directory)",
    )
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1 or auto")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="set_overrides",
        help="a config override; repeatable, allowed anywhere on the line",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides (anywhere on the line; or use --set)",
    )
    return p


def _train_config(args: argparse.Namespace):
    from .errors import ConfigError
    from .training import TrainConfig, apply_overrides, read_config_file

    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    data = apply_overrides(data, list(args.set_overrides) + list(args.overrides))
    flags = {
        "out_dir": args.out,
        "max_steps": args.max_steps,
        "init_from": args.init_from,
        "device": args.device,
        "num_threads": args.threads,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.resume:
        data["resume"] = True
    if args.no_progress:
        data["progress"] = False
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(_blame(str(err), args, flags)) from None


_FLAG_NAMES = {
    "out_dir": "--out",
    "max_steps": "--max-steps",
    "init_from": "--init-from",
    "device": "--device",
    "num_threads": "--threads",
}


def _blame(message: str, args: argparse.Namespace, flags: dict[str, Any]) -> str:
    """`message` of an invalid train config, prefixed with what set the fields it
    names: the overrides or options that did, else the config file."""
    import re

    named = re.findall(r"TrainConfig\.(\w+)", message)
    match = re.match(r"unknown train config key\(s\): ([^;]*)", message)
    if match:
        named += [k.strip() for k in match.group(1).split(",")]
    sources: list[str] = []
    for name in dict.fromkeys(named):
        items = [
            item
            for item in list(args.set_overrides) + list(args.overrides)
            if item.split("=", 1)[0].strip().split(".")[0] == name
        ]
        if items:
            sources.append(f"override {items[-1]}")
        elif flags.get(name) is not None:
            sources.append(f"{_FLAG_NAMES[name]} {flags[name]}")
    if sources:
        return f"{', '.join(sources)}: {message}"
    return f"{args.config}: {message}" if args.config else message


def run_train(args: argparse.Namespace) -> int:
    """Run `rgemma train`; prints a summary; returns 0.

    Unless the environment says otherwise, OpenMP threads wait passively
    (`OMP_WAIT_POLICY=PASSIVE`): on a machine whose cores are shared with other
    jobs, spinning threads made 2-thread training 4-8x slower (450 vs 2100 tokens/s
    for configs/bundled.json on 2 busy cores); on idle cores passive waiting costs
    about 20% (2900 vs 3800 tokens/s). Set OMP_WAIT_POLICY=ACTIVE for the latter.
    """
    if "torch" not in sys.modules:  # read by the OpenMP runtime when torch loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cfg = _train_config(args)
    from .training import train

    result = train(cfg)
    lines = [
        f"steps:       {result['step']} ({result['tokens_seen']:,} tokens)",
        f"train loss:  {result['train_loss']:.4f}" if result["train_loss"] is not None else None,
        (
            f"val loss:    {result['val_loss']:.4f}  ppl {result['val_ppl']:.2f}"
            + (f"  bits/byte {result['val_bpb']:.4f}" if result.get("val_bpb") else "")
        )
        if result["val_loss"] is not None
        else None,
        f"throughput:  {result['tokens_per_s']:.0f} tokens/s" if result["tokens_per_s"] else None,
        f"checkpoint:  {result['checkpoint']}",
        f"final model: {result['final_dir']}" if result["final_dir"] else None,
    ]
    print("\n".join(x for x in lines if x), file=sys.stderr)
    return 0


TOKENIZER_EPILOG = """\
examples:
  rgemma train-tokenizer --input data/corpus/*.txt --vocab-size 4096 \\
      --output src/rgemma/assets/tokenizer.model
  rgemma train-tokenizer --input data/corpus --vocab-size 8192 --output tok.model

A Gemma-style SentencePiece BPE model (byte fallback, split digits, <pad>=0,
<eos>=1, <bos>=2, <unk>=3, <start_of_turn>, <end_of_turn>). Directories are
searched recursively for *.txt files.
"""


def add_train_tokenizer_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The `train-tokenizer` subcommand's parser."""
    from .cli import seed_type

    from .cli import new_parser  # cli imports this module at its end

    p = new_parser(
        subparsers,
        "train-tokenizer",
        help="train a SentencePiece tokenizer on text files",
        description="Train a Gemma-style SentencePiece tokenizer.",
        epilog=TOKENIZER_EPILOG,
    )
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
    p.add_argument("--seed", type=seed_type, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=int, metavar="N", help="trainer threads")
    return p


def run_train_tokenizer(args: argparse.Namespace) -> int:
    """Run `rgemma train-tokenizer`; prints the output path; returns 0."""
    from pathlib import Path

    from .errors import InputError
    from .tokenizer import Tokenizer, train_tokenizer

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
    if args.vocab_size < 1:
        raise InputError(f"--vocab-size must be positive, got {args.vocab_size}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.input_sentence_size < 0:
        raise InputError(f"--input-sentence-size must be >= 0, got {args.input_sentence_size}")
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
