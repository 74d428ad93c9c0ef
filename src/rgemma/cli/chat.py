"""`rgemma chat`: an interactive multi-turn chat over a `ChatSession`, streaming
replies; the conversation's state can be saved and continued later."""

from __future__ import annotations

import argparse
import re
import sys

from . import options

EPILOG = """\
examples:
  rgemma chat                                  # the bundled chat model
  rgemma chat --model ./recurrentgemma-2b-it
  rgemma chat --system "Answer in one sentence." --temperature 0.7 --seed 0
  rgemma chat --save-state talk.state          # keep the conversation at exit
  rgemma chat --load-state talk.state          # ... and continue it later

In the chat: type a message and press Enter; /reset starts over, /exit,
Ctrl-D or Ctrl-C at the prompt leaves, /help lists the commands. Ctrl-C while
a reply is being written stops that reply and returns to the prompt (the
conversation keeps its complete turns). Each turn feeds only its new tokens to
the model's fixed-size state. --save-state writes the state (and talk.state.json,
the conversation) when the chat ends.
"""

HELP = """\
commands:
  /reset   start the conversation over (the system prompt is kept)
  /exit    leave the chat (also /quit or Ctrl-D)
  /help    show this list"""

_COMMAND_RE = re.compile(r"/[A-Za-z][A-Za-z0-9_-]*")  # a line that is one /word


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, description and examples of `rgemma chat`."""
    p.description = "Chat with an instruction-tuned model, streaming replies."
    p.epilog = EPILOG
    p.add_argument("--system", metavar="TEXT", help="system prompt (first turn)")
    p.add_argument("--load-state", metavar="FILE", help="continue a chat saved by --save-state")
    p.add_argument("--save-state", metavar="FILE", help="save the chat state at exit")
    options.add_sampling_options(p, max_new_tokens=512)
    options.add_model_options(p, chat=True)
    options.add_speed_options(p)


def _read_line(prompt: str) -> str:
    """One line of input; invalid UTF-8 bytes are replaced (with a warning)."""
    line = input(prompt)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from surrogateescape
        line = options.decode_utf8(line.encode("utf-8", errors="surrogateescape"), "input")
    return line


def _reply(session, line: str, interactive: bool) -> bool:
    """Stream the reply to `line`. Ctrl-C stops it: the session keeps the
    conversation up to the last complete turn (an abandoned stream changes nothing)
    and the chat goes on. Returns False when the reply was stopped."""
    try:
        for piece in session.send_stream(line):
            options.write(piece)
    except KeyboardInterrupt:
        options.write("\n")
        print(
            "(reply stopped; the conversation is kept up to the last complete turn"
            + ("; Ctrl-C at the prompt or Ctrl-D leaves)" if interactive else ")"),
            file=sys.stderr,
        )
        return False
    return True


def run(args: argparse.Namespace) -> int:
    """Run `rgemma chat` until /exit, Ctrl-D or the end of stdin; returns 0.

    Raises:
        InputError: a bad sampling option, --load-state / --save-state path or --device.
        CheckpointError: see --model and --load-state.
    """
    options.configure_inference(args)  # before torch is imported
    sampling = options.sampling_params(args)
    if args.load_state:
        options.check_input_file(args.load_state, "--load-state")
        if args.load_state == "-":
            from ..errors import InputError

            raise InputError("--load-state needs a file, not stdin")
    if args.save_state:
        options.check_output_file(args.save_state, "--save-state")
    options.setup_torch(args)
    model, tokenizer = options.load_model_and_tokenizer(args)
    from ..generation import ChatSession

    args.system = options.argv_text(args.system, "--system")
    session = ChatSession(model, tokenizer, system=args.system, sampling=sampling)
    if args.load_state:
        session.load_state(args.load_state)
        if args.system is not None:
            if session.state is not None:
                options.warn(
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
            f"{options.PROG} chat: /reset to start over, /exit or Ctrl-D to leave, /help for help",
            file=sys.stderr,
        )

    def save() -> None:
        if not args.save_state:
            return
        if session.state is None:
            options.warn(f"nothing to save to {args.save_state}: the chat has no turn yet")
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
                    options.write("\n")
                break
            command = line.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                print("(conversation reset)", file=sys.stderr)
                continue
            if command == "/help":
                print(HELP, file=sys.stderr)
                continue
            if _COMMAND_RE.fullmatch(command):
                print(f"unknown command {command} (try /help)", file=sys.stderr)
                continue
            if not command:
                continue
            if not _reply(session, line, interactive):
                continue
            options.write("\n")
    except KeyboardInterrupt:
        save()
        raise
    save()
    return 0
