"""The `rgemma` command: one entry point with subcommands.

Each subcommand is a `Command`: a function that adds its parser to the
subparsers, and a handler `(args) -> exit code`. Register more with
`register_command` (or by adding to `COMMANDS` below). Handlers import torch and
the model lazily, so `rgemma --help` is fast.

Errors a user can cause (a missing or invalid checkpoint, a bad option value,
an unreadable prompt file: `RgemmaError`, `OSError`, `ValueError`) are printed as
one line `rgemma: error: ...` on stderr with exit code 2; set `RGEMMA_DEBUG=1` for
the traceback. Ctrl-C exits quietly with code 130.

Text read from stdin or a prompt file must be UTF-8: invalid bytes are replaced
with U+FFFD and a warning saying so is printed on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["COMMANDS", "Command", "build_parser", "main", "register_command"]

PROG = "rgemma"


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: `add_parser(subparsers)` returns its parser; `handler(args)`
    runs it and returns the exit code."""

    name: str
    add_parser: Callable[[Any], argparse.ArgumentParser]
    handler: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str,
    add_parser: Callable[[Any], argparse.ArgumentParser],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    """Add (or replace) a subcommand."""
    COMMANDS[name] = Command(name, add_parser, handler)


# ----------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------
def warn(message: str) -> None:
    """Print a one-line warning on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def new_parser(
    subparsers: Any, name: str, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """A subcommand parser whose --help shows the description and examples as written."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_common_options(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """--model, --dtype, --device, --threads."""
    if model:
        parser.add_argument(
            "--model",
            metavar="PATH",
            help="checkpoint directory or file: rgemma or Hugging Face directory, or an "
            "official .pt (tokenizer.model beside it); default: the bundled model",
        )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="parameter dtype (default: the checkpoint's)",
    )
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads for torch (torch.set_num_threads)"
    )


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    """--quantize, --compile (applied by `load_model_and_tokenizer`)."""
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        help="weight-only int8 quantization (linear and embedding weights; faster "
        "batch-1 decode on CPU)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (the first token waits for the compiler; "
        "falls back to eager if compiling fails)",
    )


def seed_type(text: str) -> int:
    """argparse type of --seed: an int in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**63), got {text}")
    return value


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        metavar="N",
        help=f"most tokens to generate per reply (default {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 = greedy (default)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="sample among the K most likely tokens (0 = all)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus sampling mass in (0, 1] (1 = all)",
    )
    parser.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        metavar="P",
        help="drop tokens less likely than P x the best one (0 = none)",
    )
    parser.add_argument(
        "--seed", type=seed_type, metavar="S", help="random seed (prompt i of a batch uses S + i)"
    )
    parser.add_argument(
        "--stop",
        action="append",
        metavar="STR",
        default=None,
        help="stop when the text contains STR (repeatable; the escapes "
        "\\n, \\t and \\\\ are understood)",
    )


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options, checked (before any model is loaded)."""
    from .errors import InputError
    from .sampling import validate_sampling

    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    names = {
        "temperature": "--temperature",
        "top_k": "--top-k",
        "top_p": "--top-p",
        "min_p": "--min-p",
    }
    try:
        validate_sampling(args.temperature, args.top_k, args.top_p, args.min_p)
    except InputError as err:  # name the option as typed
        msg = str(err)
        for name, option in names.items():
            if msg.startswith(name):
                msg = option + msg[len(name) :]
        raise InputError(msg) from None
    stop = None
    if args.stop is not None:
        stop = [unescape(s) for s in args.stop]
        if any(not s for s in stop):
            raise InputError("--stop needs a non-empty string")
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=stop,
    )


def unescape(text: str) -> str:
    """Turn the escapes \\n, \\t and \\\\ typed on a command line into characters."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def setup_torch(args: argparse.Namespace) -> None:
    """Apply --threads and check --device before anything is loaded."""
    import torch

    from .errors import InputError

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    device = getattr(args, "device", None)
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise InputError(f"invalid --device {device!r}: {err}") from None
        if dev.type == "meta":
            raise InputError("--device meta holds no data: choose cpu or cuda")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        try:  # e.g. mps or xla on a build without them
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as err:
            why = _one_line(err).split(". ")[0][:160]
            raise InputError(f"--device {device}: this torch build cannot use it ({why})") from None


def load_model_and_tokenizer(args: argparse.Namespace):
    """`rgemma.generation.load` for --model/--dtype/--device."""
    from .errors import InputError, RgemmaError
    from .generation import load

    try:
        model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    except OSError as err:  # not an RgemmaError: name the option
        if isinstance(err, RgemmaError) or args.model is None:
            raise
        if err.strerror:
            where = f" ({err.filename})" if err.filename not in (None, args.model) else ""
            raise InputError(f"--model {args.model}: {err.strerror}{where}") from None
        raise InputError(f"--model {args.model}: {_one_line(err)}") from None
    if getattr(args, "quantize", None):
        from .quantization import quantize

        model = quantize(model, args.quantize)
    if getattr(args, "compile", False):
        from .generation import compile_decode

        compile_decode(model)
    return model, tokenizer


def check_input_file(path: str, option: str) -> None:
    """Raise InputError naming `option` unless `path` is "-" or a readable file."""
    from .errors import InputError

    if path == "-":
        return
    if not os.path.exists(path):
        raise InputError(f"{option} {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{option} {path}: is a directory, not a file")


def check_output_file(path: str, option: str) -> None:
    """Raise InputError naming `option` unless a file can be written at `path`."""
    from .errors import InputError

    if os.path.isdir(path):
        raise InputError(f"{option} {path}: is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{option} {path}: directory {parent} does not exist")


def decode_utf8(data: bytes, source: str) -> str:
    """Decode UTF-8; invalid bytes become U+FFFD, with a warning naming `source`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        warn(
            f"{source} is not valid UTF-8 (first bad byte at offset {err.start}); "
            "invalid bytes were replaced with U+FFFD"
        )
        return data.decode("utf-8", errors="replace")


def read_text(path: str) -> str:
    """Read a file, or stdin for "-", as UTF-8 (see `decode_utf8`)."""
    if path == "-":
        return decode_utf8(sys.stdin.buffer.read(), "stdin")
    with open(path, "rb") as f:
        return decode_utf8(f.read(), path)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _preview(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ----------------------------------------------------------------------------------
# rgemma generate
# ----------------------------------------------------------------------------------
GENERATE_EPILOG = """\
examples:
  rgemma generate "The capital of France is"
  rgemma generate "Tell me a story" --temperature 0.8 --top-p 0.95 --seed 1
  rgemma generate "Write a haiku" --chat --model ./recurrentgemma-2b-it
  rgemma generate --file prompts.txt --max-new-tokens 64 --stop "\\n\\n"
  echo "Once upon a time" | rgemma generate - --verbose

A single prompt is streamed to stdout. With --file, each non-blank line is a
prompt; they are generated as one batch and printed in order, each under a
"=== [i/n] prompt ===" header. Prompts read from stdin or a file must be UTF-8;
invalid bytes are replaced with U+FFFD and a warning is printed.
"""


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = new_parser(
        subparsers,
        "generate",
        help="generate text from a prompt (or a file of prompts)",
        description="Generate a continuation of PROMPT (or of each line of --file).",
        epilog=GENERATE_EPILOG,
    )
    p.add_argument(
        "prompt", nargs="?", metavar="PROMPT", help='the prompt; "-" reads it from stdin'
    )
    p.add_argument(
        "--file",
        metavar="PROMPTS.txt",
        help='one prompt per line ("-" for stdin), generated as a batch',
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="format each prompt as a user turn of the Gemma chat template",
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print token counts, speeds and the state size on stderr",
    )
    add_sampling_options(p)
    add_common_options(p)
    add_speed_options(p)
    return p


def _prompts(args: argparse.Namespace) -> list[str]:
    from .errors import InputError

    if args.file is not None:
        if args.prompt is not None:
            raise InputError("give either PROMPT or --file, not both")
        check_input_file(args.file, "--file")
        try:
            text = read_text(args.file)
        except OSError as err:
            raise InputError(f"--file {args.file}: {err.strerror or err}") from None
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            where = "stdin" if args.file == "-" else args.file
            raise InputError(f"no prompts in {where}: it is empty (one prompt per line)")
        return prompts
    if args.prompt is None:
        raise InputError('no prompt: give PROMPT, "-" to read it from stdin, or --file')
    if args.prompt == "-":
        text = read_text("-")
        return [text.removesuffix("\n")]
    return [args.prompt]


def run_generate(args: argparse.Namespace) -> int:
    kwargs = sampling_kwargs(args)
    prompts = _prompts(args)
    setup_torch(args)
    model, tokenizer = load_model_and_tokenizer(args)
    from .generation import generate, stream

    compile_s0 = getattr(model.decode_step, "compile_seconds", 0.0)
    if len(prompts) == 1 and args.file is None:
        s = stream(model, tokenizer, prompts[0], chat=args.chat, **kwargs)
        for piece in s:
            _write(piece)
        _write("\n")
        results = [s.result]
    else:
        results = generate(model, tokenizer, prompts, chat=args.chat, **kwargs)
        for i, (prompt, res) in enumerate(zip(prompts, results), 1):
            _write(f"=== [{i}/{len(prompts)}] {_preview(prompt)} ===\n{res.text}\n\n")
    if args.verbose:
        r0 = results[0]
        n_prompt = sum(r.prompt_tokens for r in results)
        n_gen = sum(len(r.token_ids) + (r.stop_token_id is not None) for r in results)
        prefill_tps = n_prompt / r0.prefill_seconds if r0.prefill_seconds > 0 else float("inf")
        # Compiling the decode step (--compile) happens in the first steps: left out.
        compile_s = getattr(model.decode_step, "compile_seconds", 0.0) - compile_s0
        decode_s, n_timed = r0.decode_seconds, n_gen
        if compile_s > 0:
            decode_s, n_timed = decode_s - compile_s, n_gen - len(results)
        decode_tps = n_timed / decode_s if decode_s > 0 else float("inf")
        compiling = f" (compiling the decode step: {compile_s:.1f} s, left out)" if compile_s else ""
        print(
            f"prompt tokens: {n_prompt}, generated tokens: {n_gen}, "
            f"prefill: {prefill_tps:.1f} tok/s, decode: {decode_tps:.1f} tok/s{compiling}, "
            f"state: {model.state_nbytes(1)} bytes per sequence (batch {len(results)})",
            file=sys.stderr,
        )
    return 0


# ----------------------------------------------------------------------------------
# rgemma chat
# ----------------------------------------------------------------------------------
CHAT_EPILOG = """\
examples:
  rgemma chat --model ./recurrentgemma-2b-it
  rgemma chat --system "Answer in one sentence." --temperature 0.7 --seed 0
  rgemma chat --save-state talk.state          # keep the conversation at exit
  rgemma chat --load-state talk.state          # ... and continue it later

In the chat: type a message and press Enter; /reset starts over, /exit or
Ctrl-D leaves, /help lists the commands. Each turn feeds only its new tokens to the model's fixed-size
state. --save-state writes the state (and talk.state.json, the conversation)
when the chat ends.
"""


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = new_parser(
        subparsers,
        "chat",
        help="interactive multi-turn chat",
        description="Chat with an instruction-tuned model, streaming replies.",
        epilog=CHAT_EPILOG,
    )
    p.add_argument("--system", metavar="TEXT", help="system prompt (first turn)")
    p.add_argument("--load-state", metavar="FILE", help="continue a chat saved by --save-state")
    p.add_argument("--save-state", metavar="FILE", help="save the chat state at exit")
    add_sampling_options(p, max_new_tokens=512)
    add_common_options(p)
    add_speed_options(p)
    return p


_COMMAND_RE = re.compile(r"/[A-Za-z][A-Za-z0-9_-]*")  # a line that is one /word


def _read_line(prompt: str) -> str:
    """One line of input; invalid UTF-8 bytes are replaced (with a warning)."""
    line = input(prompt)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from surrogateescape
        line = decode_utf8(line.encode("utf-8", errors="surrogateescape"), "input")
    return line


CHAT_HELP = """\
commands:
  /reset   start the conversation over (the system prompt is kept)
  /exit    leave the chat (also /quit or Ctrl-D)
  /help    show this list"""


def run_chat(args: argparse.Namespace) -> int:
    kwargs = sampling_kwargs(args)
    if args.load_state:
        check_input_file(args.load_state, "--load-state")
        if args.load_state == "-":
            from .errors import InputError

            raise InputError("--load-state needs a file, not stdin")
    if args.save_state:
        check_output_file(args.save_state, "--save-state")
    setup_torch(args)
    model, tokenizer = load_model_and_tokenizer(args)
    from .generation import ChatSession

    session = ChatSession(model, tokenizer, system=args.system, **kwargs)
    if args.load_state:
        session.load_state(args.load_state)
        if args.system is not None:
            if session.state is not None:
                warn(
                    "--system is ignored for the conversation loaded from "
                    f"{args.load_state}; it is used after /reset"
                )
            session.system = args.system
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(
            f"{PROG} chat: /reset to start over, /exit or Ctrl-D to leave, /help for help",
            file=sys.stderr,
        )

    def save() -> None:
        if not args.save_state:
            return
        if session.state is None:
            warn(f"nothing to save to {args.save_state}: the chat has no turn yet")
            return
        session.save_state(args.save_state)
        if interactive:
            print(f"saved the chat state to {args.save_state}", file=sys.stderr)

    try:
        while True:
            try:
                line = _read_line("> " if interactive else "")
            except EOFError:
                if interactive:
                    _write("\n")
                break
            command = line.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                print("(conversation reset)", file=sys.stderr)
                continue
            if command == "/help":
                print(CHAT_HELP, file=sys.stderr)
                continue
            if _COMMAND_RE.fullmatch(command):
                print(f"unknown command {command} (try /help)", file=sys.stderr)
                continue
            if not command:
                continue
            for piece in session.send_stream(line):
                _write(piece)
            _write("\n")
    except KeyboardInterrupt:
        save()
        raise
    save()
    return 0


# ----------------------------------------------------------------------------------
# rgemma info
# ----------------------------------------------------------------------------------
INFO_EPILOG = """\
examples:
  rgemma info                          # the bundled model
  rgemma info --model ./recurrentgemma-2b --dtype bfloat16
"""


def add_info_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = new_parser(
        subparsers,
        "info",
        help="show a model's config, size and state size",
        description="Describe a checkpoint: config, parameter count, dtype, "
        "state size and where the weights came from.",
        epilog=INFO_EPILOG,
    )
    add_common_options(p)
    return p


def run_info(args: argparse.Namespace) -> int:
    setup_torch(args)
    from .checkpoint import load_model
    from .config import PRESETS

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    cfg = model.config
    preset = next((name for name, p in PRESETS.items() if p == cfg), None)
    n_params = sum(p.numel() for p in model.parameters())
    param = next(model.parameters())
    source = getattr(model, "source", None)
    lines = []
    if isinstance(source, dict):
        lines.append(
            f"weights:     {source.get('path')} (format {source.get('format')}"
            f"{', bundled' if source.get('bundled') else ''})"
        )
        lines.append(f"tokenizer:   {source.get('tokenizer') or 'none found'}")
    elif source is not None:
        lines.append(f"weights:     {source}")
    lines.append(f"config:      {preset or 'custom'}")
    for name, value in cfg.to_dict().items():
        if name == "block_types":
            kinds = "".join("R" if v == "recurrent" else "A" for v in value)
            value = f"{len(value)} blocks {kinds}"
        lines.append(f"  {name + ':':31s}{value}")
    lines.append(f"parameters:  {n_params:,} ({n_params / 1e6:.2f} M)")
    lines.append(f"dtype:       {str(param.dtype).removeprefix('torch.')}")
    lines.append(f"device:      {param.device}")
    lines.append(f"state size:  {model.state_nbytes(1):,} bytes (batch 1, any length)")
    _write("\n".join(lines) + "\n")
    return 0


register_command("generate", add_generate_parser, run_generate)
register_command("chat", add_chat_parser, run_chat)
register_command("info", add_info_parser, run_info)

from . import cli_train

register_command("train", cli_train.add_train_parser, cli_train.run_train)
register_command(
    "train-tokenizer", cli_train.add_train_tokenizer_parser, cli_train.run_train_tokenizer
)

from . import cli_serve

register_command("serve", cli_serve.add_serve_parser, cli_serve.run_serve)

from . import bench

register_command("bench", bench.add_parser, bench.run)


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The `rgemma` parser with every registered subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="RecurrentGemma (Griffin) in PyTorch.",
        epilog="Run `rgemma COMMAND --help` for a command's options and examples.\n"
        "Set RGEMMA_DEBUG=1 to see tracebacks of errors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sub = cmd.add_parser(subparsers)
        sub.set_defaults(_handler=cmd.handler)
    return parser


def _one_line(err: BaseException) -> str:
    msg = str(err) or type(err).__name__
    if isinstance(err, UnicodeDecodeError):
        msg = f"not valid UTF-8: {msg}"
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    """Run the `rgemma` command line; returns the exit code.

    Exit codes: 0 success, 2 a usage or input error (one line on stderr), 130
    interrupted (Ctrl-C), 141 stdout closed early (broken pipe).
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # `train` takes KEY=VALUE overrides anywhere on the line: argparse gives
        # the positional only its first run of them.
        if getattr(args, "command", None) == "train" and all(
            "=" in x and not x.startswith("-") for x in extras
        ):
            args.overrides = list(args.overrides) + extras
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    debug = os.environ.get("RGEMMA_DEBUG", "") not in ("", "0")
    try:
        return args._handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python from
        # complaining when it flushes stdout at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except (OSError, ValueError) as err:  # RgemmaError, UnicodeDecodeError included
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
