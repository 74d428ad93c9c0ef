"""The `rgemma` command: one entry point, one module per subcommand.

`COMMANDS` maps each command name to its module in this package and a one-line
description. A command module has `add_arguments(parser)` (its options, description
and examples) and `run(args) -> exit code`; it is imported only when its command
runs, so `rgemma --help` lists every command without importing any, and
`rgemma generate` imports neither the server, the trainer nor the benchmarks. The
shared options and the one-line error report live in `rgemma.cli.options`, which
imports no command; no command imports this module.

A new command is one file here plus one line in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable
from typing import NamedTuple

from .options import PROG, CommandParser, run_command

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


class Command(NamedTuple):
    """A subcommand: its module in `rgemma.cli` and its one-line description."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "generate": Command("generate", "generate text from a prompt (or a file of prompts)"),
    "chat": Command("chat", "interactive multi-turn chat"),
    "info": Command("info", "show a model's config, size and state size"),
    "serve": Command("serve", "serve the model over an OpenAI-compatible HTTP API"),
    "train": Command("train", "train or fine-tune a model (checkpoints, resume, eval)"),
    "train-tokenizer": Command("train_tokenizer", "train a SentencePiece tokenizer on text files"),
    "bench": Command("bench", "time rgemma's prefill and decode (tok/s, GB/s)"),
    "eval": Command("eval", "perplexity over files, or lm-evaluation-harness tasks"),
    "convert": Command("convert", "convert a checkpoint to Hugging Face or rgemma format"),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The `rgemma` parser.

    Args:
        commands: the commands whose modules are imported and whose options are
            added (None: all). The others are listed by name and description only.
    """
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="RecurrentGemma (Griffin) in PyTorch.",
        epilog="Run `rgemma COMMAND --help` for a command's options and examples.\n"
        "Set RGEMMA_DEBUG=1 to see tracebacks of errors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=CommandParser
    )
    load = set(COMMANDS if commands is None else commands)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(
            name, help=command.help, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        if name in load:
            module = importlib.import_module(f"{__name__}.{command.module}")
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `rgemma` command line; returns the exit code (see
    `rgemma.cli.options.run_command`: 0, 2 for a usage or input error, 130, 141).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option (the top level has only
    # --help and --version); only its module is imported.
    name = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser([name] if name in COMMANDS else []).parse_args(argv)
    return run_command(args._run, args)
