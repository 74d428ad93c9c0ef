"""`rgemma serve`: the OpenAI-compatible server (`rgemma.serve`) on a model.

FastAPI, uvicorn and torch are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..defaults import MAX_TOKENS_DEFAULT, SAMPLING
from . import options

EPILOG = """\
examples:
  rgemma serve                                 # the bundled chat model
  rgemma serve --model ./recurrentgemma-2b-it
  rgemma serve --model ./recurrentgemma-2b-it --max-batch-size 32 --api-key sk-local
  rgemma serve --quantize int8 --port 8080

Then point any OpenAI client at it:
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
  client.chat.completions.create(model="rgemma", messages=[{"role": "user",
                                 "content": "Hi"}], max_tokens=64)

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with
"stream": true), GET /v1/models, GET /health, GET /metrics (Prometheus).
The server binds 127.0.0.1 unless --host says otherwise; give --api-key before
exposing it. Needs the serve extra: pip install 'rgemma[serve]'.
"""


def check_listen(host: str, port: int) -> None:
    """Bind (and close) a socket on host:port as uvicorn will, so that a port in use
    or an unresolvable host fails before the model is loaded.

    Raises:
        InputError: `cannot listen on HOST:PORT: <reason>`.
    """
    import socket

    from ..errors import InputError

    def fail(reason: str) -> InputError:
        return InputError(f"cannot listen on {host}:{port}: {reason}")

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise fail(getattr(err, "strerror", None) or str(err)) from None
    family, socktype, proto, _, addr = infos[0]
    try:
        with socket.socket(family, socktype, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(addr)
    except OSError as err:
        raise fail(err.strerror or str(err)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, description and examples of `rgemma serve`."""
    p.description = (
        "Serve a model with continuous batching over an OpenAI-compatible "
        "HTTP API (completions and chat completions, streaming)."
    )
    p.epilog = EPILOG
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        metavar="N",
        help="most sequences decoded together (default 16)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="most requests waiting for a slot; more get 503 (default 64)",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("RGEMMA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $RGEMMA_API_KEY, else no key)",
    )
    p.add_argument(
        "--model-name",
        metavar="NAME",
        help="model id in /v1/models and responses (default: the checkpoint "
        "directory's name, or 'rgemma')",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=8192,
        metavar="N",
        help="longest prompt accepted (default 8192)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=4096,
        metavar="N",
        help="largest max_tokens accepted (default 4096)",
    )
    p.add_argument(
        "--max-tokens-default",
        type=int,
        default=MAX_TOKENS_DEFAULT,
        metavar="N",
        help=f"max_tokens of a request that gives none (default {MAX_TOKENS_DEFAULT}); "
        "sampling fields a request leaves out take the CLI's defaults (temperature "
        f"{SAMPLING['temperature']:g}, top_p {SAMPLING['top_p']:g}, repetition_penalty "
        f"{SAMPLING['repetition_penalty']:g} when sampling)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=8.0,
        metavar="MB",
        help="largest request body; larger ones get 413 before they are read (default 8)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="stop a request still queued or running after S seconds with 504; 0 = no "
        "limit (default 600)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        metavar="N",
        help="prompt tokens per prefill step: the longest pause a new prompt "
        "causes the running requests (default 256)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=1024.0,
        metavar="MB",
        help="memory for cached prefix states, 0 = no cache (default 1024)",
    )
    p.add_argument(
        "--prefix-block",
        type=int,
        default=256,
        metavar="N",
        help="prefix-cache boundaries every N tokens (default 256)",
    )
    p.add_argument(
        "--no-shape-buckets",
        dest="shape_buckets",
        action="store_false",
        help="run every prefill chunk and decode batch at its exact size (by default "
        "the model only sees a fixed set of prompt-piece lengths and batch sizes, which keeps the "
        "per-shape kernel caches, and so memory, bounded)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn log level (default info)",
    )
    options.add_model_options(p, chat=True)
    options.add_speed_options(p)


def run(args: argparse.Namespace) -> int:
    """Run `rgemma serve` until interrupted; returns 0.

    Raises:
        InputError: a bad limit, a port in use or an unresolvable host (before the
            model is loaded), FastAPI or uvicorn not installed.
        CheckpointError: see --model.
    """
    options.configure_inference(args)  # before torch is imported
    from ..errors import InputError

    for name in (
        "max_batch_size",
        "prefill_chunk",
        "prefix_block",
        "max_prompt_tokens",
        "max_tokens",
        "max_tokens_default",
    ):
        options.positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.max_tokens_default > args.max_tokens:
        raise InputError(
            f"--max-tokens-default ({args.max_tokens_default}) must not exceed --max-tokens "
            f"({args.max_tokens})"
        )
    if args.max_body_mb <= 0:
        raise InputError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.request_timeout < 0:
        raise InputError(
            f"--request-timeout must be >= 0 (0 = no limit), got {args.request_timeout}"
        )
    options.positive("--max-queue", args.max_queue, 0)
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if args.prefix_cache_mb < 0:
        raise InputError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    try:
        import uvicorn

        from ..serve.app import ServeConfig, create_app
    except ImportError as err:
        raise InputError(
            f"rgemma serve needs FastAPI and uvicorn ({err}); install them "
            "with: pip install 'rgemma[serve]'"
        ) from None
    check_listen(args.host, args.port)
    options.setup_torch(args)
    model, tokenizer = options.load_model_and_tokenizer(args)  # with --quantize / --compile
    name = args.model_name
    if name is None:
        name = os.path.basename(os.path.normpath(args.model)) if args.model else "rgemma"
    config = ServeConfig(
        model_name=name,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        default_max_tokens=args.max_tokens_default,
        api_key=args.api_key or None,
        max_body_bytes=int(args.max_body_mb * 2**20),
        request_timeout_s=args.request_timeout or None,
        prefill_chunk=args.prefill_chunk,
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
        prefix_block=args.prefix_block,
        shape_buckets=args.shape_buckets,
    )
    app = create_app(model, tokenizer, config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(
            f"rgemma: warning: serving on {args.host} without --api-key: anyone who can "
            "reach this address can use the model",
            file=sys.stderr,
        )
    print(
        f"rgemma: serving {name!r} on http://{args.host}:{args.port}/v1 "
        f"(batch {config.max_batch_size}, queue {config.max_queue}, state "
        f"{model.state_nbytes(1):,} bytes per sequence)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
