"""What the `rgemma` commands share: their options, loading, input checks and the
one-line error report.

Options: `--model/--adapter/--dtype/--device/--threads` (`add_model_options`), the sampling
options turned into one `SamplingParams` (`add_sampling_options`, `sampling_params`),
`--quantize/--compile` (`add_speed_options`). This module imports no command, and
nothing heavy: torch and the model are imported inside the functions that need them.

Errors a user can cause (a missing or invalid checkpoint, a bad option value, an
unreadable prompt file: `RgemmaError`, `OSError`, `ValueError`) are printed by
`run_command` as one line `rgemma: error: ...` on stderr with exit code 2;
`RGEMMA_DEBUG=1` shows the traceback instead. Ctrl-C exits quietly with code 130.

Text read from stdin or a prompt file must be UTF-8: invalid bytes are replaced with
U+FFFD and a warning saying so is printed on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

PROG = "rgemma"


class CommandParser(argparse.ArgumentParser):
    """A command's parser: options and positional arguments may come in any order,
    as GNU getopt allows (`rgemma train --config c.json lr=1e-3 --out X seed=3`).

    `parse_known_args` parses in two passes (`parse_known_intermixed_args`): first
    the options, then the positionals left between them.
    """

    _intermixed = False

    def error(self, message: str):
        """A usage error as one line on stderr (`rgemma generate: error: ...`, with a
        pointer to --help), exit code 2: not argparse's whole usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixed:  # the inner passes of parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


def warn(message: str) -> None:
    """Print a one-line warning on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def one_line(err: BaseException) -> str:
    """The message of an exception on one line (its type name if it has none)."""
    msg = str(err) or type(err).__name__
    if isinstance(err, UnicodeDecodeError):
        msg = f"not valid UTF-8: {msg}"
    return " ".join(msg.split())


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's handler and turn what it raises into an exit code.

    Exit codes: the handler's (0 success), 2 a usage or input error (`RgemmaError`,
    `OSError`, `ValueError`: one line on stderr), 130 interrupted (Ctrl-C), 141 stdout
    closed early (broken pipe). With `RGEMMA_DEBUG` set (not "0"), errors and Ctrl-C
    raise with their traceback.
    """
    debug = os.environ.get("RGEMMA_DEBUG", "") not in ("", "0")
    try:
        return handler(args)
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
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------
def add_model_options(parser: argparse.ArgumentParser, *, chat: bool = False) -> None:
    """--model, --adapter, --dtype, --device, --threads. With `chat=True` the default
    model is the bundled chat model (`rgemma.defaults.CHAT_MODEL`; the bundled base
    when an --adapter is given), else the bundled base model."""
    default = (
        "the bundled chat model (with --adapter: the bundled base model)"
        if chat
        else "the bundled model"
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="checkpoint directory or file: rgemma or Hugging Face directory, or an "
        f"official .pt (tokenizer.model beside it); default: {default}",
    )
    parser.set_defaults(chat_model=chat)
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="a LoRA adapter directory (PEFT format, e.g. from rgemma train with "
        "lora_rank > 0) to merge into --model's weights after loading",
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
        choices=("int8", "int4"),
        help="weight-only quantization of the linear and embedding weights: int8 (per "
        "channel) or int4 (groups of 32 columns); faster few-row decode on CPU, the "
        "RG-LRU and the state stay float32",
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


def logit_bias_type(text: str) -> tuple[int, float]:
    """argparse type of --logit-bias: `ID=BIAS` (a token id and a number in
    [-100, 100])."""
    ident, sep, value = text.partition("=")
    try:
        token, bias = int(ident), float(value)
    except ValueError:
        token = bias = None
    if not sep or token is None or token < 0 or not -100.0 <= bias <= 100.0:
        raise argparse.ArgumentTypeError(
            f"expected ID=BIAS (a token id >= 0 and a bias in [-100, 100]), got {text!r}"
        )
    return token, bias


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    """The fields of `SamplingParams` a command line sets (see `sampling_params`).

    The sampling defaults are `rgemma.defaults.SAMPLING` (the server's too), shown in
    --help; an option left out is None here and takes its default in
    `sampling_params`."""
    from ..defaults import SAMPLING

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
        metavar="T",
        help=f"sampling temperature; 0 = greedy, the model's plain argmax (default "
        f"{SAMPLING['temperature']:g})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="sample among the K most likely tokens (default 0 = all)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help=f"nucleus sampling mass in (0, 1], 1 = all (default {SAMPLING['top_p']:g})",
    )
    parser.add_argument(
        "--min-p",
        type=float,
        metavar="P",
        help="drop tokens less likely than P x the best one (default 0 = none)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="R",
        help="divide the positive logits (multiply the negative ones) of tokens already in "
        "the prompt or the reply by R; 1 = off (default "
        f"{SAMPLING['repetition_penalty']:g} when sampling, 1 with --temperature 0)",
    )
    parser.add_argument(
        "--presence-penalty",
        type=float,
        metavar="X",
        help="subtract X from the logits of tokens the reply already has, in [-2, 2] (default 0)",
    )
    parser.add_argument(
        "--frequency-penalty",
        type=float,
        metavar="X",
        help="subtract X per earlier occurrence in the reply, in [-2, 2] (default 0)",
    )
    parser.add_argument(
        "--logit-bias",
        action="append",
        type=logit_bias_type,
        metavar="ID=BIAS",
        help="add BIAS (in [-100, 100]) to token ID's logit (repeatable)",
    )
    parser.add_argument(
        "--min-tokens",
        type=int,
        metavar="N",
        help="generate at least N tokens before EOS or a stop string may end the reply (default 0)",
    )
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        default=None,
        help="do not stop at EOS / end of turn (run to --max-new-tokens or a stop string)",
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


def sampling_params(args: argparse.Namespace):
    """The sampling options as one `rgemma.sampling.SamplingParams`, checked before
    any model is loaded; options not given take `rgemma.defaults.SAMPLING`
    (`default_sampling`).

    Raises:
        InputError: a value out of range; the message names the option as typed
            (`--top-p must be in (0, 1] ...`).
    """
    from ..errors import InputError
    from ..sampling import default_sampling

    stop: tuple[str, ...] = ()
    if args.stop is not None:
        stop = tuple(unescape(argv_text(s, "--stop")) for s in args.stop)
        if not all(stop):
            raise InputError("--stop needs a non-empty string")
    fields = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "logit_bias": dict(args.logit_bias) if args.logit_bias else None,
        "min_tokens": args.min_tokens,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "stop": stop,
    }
    try:
        return default_sampling(**fields)
    except InputError as err:  # name the option as typed
        msg = str(err)
        field = next((f for f in fields if msg.startswith(f + " ")), None)
        if field is not None:
            msg = "--" + field.replace("_", "-") + msg[len(field) :]
        raise InputError(msg) from None


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


# ----------------------------------------------------------------------------------
# Torch and the model
# ----------------------------------------------------------------------------------
def configure_inference(args: argparse.Namespace) -> None:
    """The inference commands' first call, before torch is imported: the OpenMP wait
    policy (`rgemma.defaults.configure_inference`); what it did is kept in
    `args.inference_note` for --verbose."""
    from ..defaults import configure_inference as configure

    args.inference_note = configure()


def inference_summary(args: argparse.Namespace) -> str:
    """One line for --verbose: torch's thread count and the wait policy."""
    import torch

    note = getattr(args, "inference_note", None) or "OMP_WAIT_POLICY not configured"
    return f"threads: {torch.get_num_threads()}, {note}"


def setup_torch(args: argparse.Namespace) -> None:
    """Apply --threads and check --device before anything is loaded.

    Raises:
        InputError: --threads < 1, or a --device that is invalid, holds no data
            (meta) or that this machine or torch build cannot use.
    """
    import torch

    from ..device import resolve_device
    from ..errors import InputError

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be >= 1, got {threads}")
        most = 4 * (os.cpu_count() or 1)
        if threads > most:  # torch and OpenMP abort or crash on thousands of threads
            raise InputError(
                f"--threads {threads} is more than 4x this machine's {os.cpu_count()} CPUs"
            )
        torch.set_num_threads(threads)
    device = getattr(args, "device", None)
    if device is not None:
        resolve_device(device, what="--device")


def load_model_and_tokenizer(args: argparse.Namespace, *, tokenizer: bool = True):
    """(model, tokenizer) for --model/--dtype/--device, with the --adapter merged
    (`rgemma.lora`), then --quantize and --compile applied; the tokenizer is None when
    `tokenizer=False` (a bare checkpoint will do).

    Raises:
        CheckpointError: see `rgemma.generation.load`; an --adapter that is unreadable
            or made for another base model (`rgemma.lora.load_adapter`).
        InputError: an OS error reading --model (the message names the option).
    """
    from ..errors import InputError, RgemmaError

    path = args.model
    if (
        path is None
        and getattr(args, "chat_model", False)
        and getattr(args, "adapter", None) is None
    ):
        path = _bundled_chat_model()
    try:
        if tokenizer:
            from ..generation import load

            with warnings.catch_warnings(record=True) as caught:  # shown as one line each
                warnings.simplefilter("always", UserWarning)
                model, tok = load(path, dtype=args.dtype, device=args.device)
            for w in caught:
                warn(str(w.message))
        else:
            from ..checkpoint import load_model

            model, tok = load_model(path, dtype=args.dtype, device=args.device), None
    except OSError as err:  # not an RgemmaError: name the option
        if isinstance(err, RgemmaError) or args.model is None:
            raise
        if err.strerror:
            where = f" ({err.filename})" if err.filename not in (None, args.model) else ""
            raise InputError(f"--model {args.model}: {err.strerror}{where}") from None
        raise InputError(f"--model {args.model}: {one_line(err)}") from None
    if getattr(args, "adapter", None) is not None:
        from ..lora import load_adapter, merge_lora

        merge_lora(load_adapter(model, args.adapter)).requires_grad_(False)
    _default_threads(model, args)
    return apply_speed_options(model, args), tok


def _bundled_chat_model() -> str:
    """The bundled chat model's directory (the default --model of `chat` and `serve`).

    Raises:
        CheckpointError: it is not installed (names where it looked).
    """
    from ..checkpoint import RGEMMA_CONFIG_NAME, bundled_model_path
    from ..errors import CheckpointError

    path = bundled_model_path(chat=True)
    if not (path / RGEMMA_CONFIG_NAME).is_file():
        raise CheckpointError(
            f"no bundled chat model is installed (looked in {path}); pass --model PATH "
            "(scripts/build_chat_model.sh builds it)"
        )
    return str(path)


def _default_threads(model, args: argparse.Namespace) -> None:
    """Without --threads, a small model runs on one thread (`rgemma.defaults`) for
    the inference commands (those that called `configure_inference`)."""
    if getattr(args, "threads", None) is not None or not hasattr(args, "inference_note"):
        return
    import torch

    from ..defaults import inference_threads

    threads = inference_threads(sum(p.numel() for p in model.parameters()))
    if threads is not None:
        torch.set_num_threads(threads)
        args.inference_note += f"; {threads} thread for a small model (--threads to change)"


def apply_speed_options(model, args: argparse.Namespace):
    """The model with --quantize (`rgemma.quantize`) and --compile
    (`rgemma.compile_decode`) applied, where the command has them."""
    if getattr(args, "quantize", None):
        from ..quantization import quantize

        model = quantize(model, args.quantize)
    if getattr(args, "compile", False):
        from ..generation import compile_decode

        compile_decode(model)
    return model


# ----------------------------------------------------------------------------------
# Files and text
# ----------------------------------------------------------------------------------
def check_input_file(path: str, option: str) -> None:
    """Raise InputError naming `option` unless `path` is "-" or a readable file."""
    from ..errors import InputError

    if path == "-":
        return
    if not os.path.exists(path):
        raise InputError(f"{option} {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{option} {path}: is a directory, not a file")


def check_output_file(path: str, option: str) -> None:
    """Raise InputError naming `option` unless a file can be written at `path`."""
    from ..errors import InputError

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


def argv_text(text: str | None, what: str) -> str | None:
    """A command-line argument as valid Unicode.

    Python decodes argv with `surrogateescape`, so bytes that are not UTF-8 arrive
    as lone surrogates, which no tokenizer can encode. They are replaced with
    U+FFFD, with a one-line warning naming `what` (as for stdin, `decode_utf8`).
    """
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            data = text.encode("utf-8", errors="surrogateescape")  # the original bytes
        except UnicodeEncodeError:  # a surrogate not from surrogateescape (main([...]))
            data = text.encode("utf-8", errors="surrogatepass")
        return decode_utf8(data, what)
    return text


def read_text(path: str) -> str:
    """Read a file, or stdin for "-", as UTF-8 (see `decode_utf8`)."""
    if path == "-":
        return decode_utf8(sys.stdin.buffer.read(), "stdin")
    with open(path, "rb") as f:
        return decode_utf8(f.read(), path)


def write(text: str) -> None:
    """Write to stdout at once (streamed output)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def positive(option: str, value: Any, minimum: int = 1) -> None:
    """Raise InputError unless `value >= minimum` (the message names `option`)."""
    from ..errors import InputError

    if value < minimum:
        raise InputError(f"{option} must be >= {minimum}, got {value}")
