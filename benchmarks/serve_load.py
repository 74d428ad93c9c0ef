"""Load benchmark of `rgemma serve`: concurrent streaming clients on loopback.

Starts `rgemma serve` as a subprocess on 127.0.0.1 (a free port) and measures:

1. continuous batching: `--clients` concurrent streaming clients (also the
   server's `--max-batch-size`) share `--requests` requests, each client sending
   its next request as soon as the previous one ends; first a warm-up round, then
   `--rounds` rounds, each with new requests (new prompts: the prefix cache keeps
   filling up to its budget);
2. one at a time: a fresh server (same warm-up round, so the same cache state)
   gets round 1's requests from a single client.

Every round stops by itself: after its requests, or after `--duration` seconds
(requests running then finish, none new is sent). It reports completed requests,
failures (must be 0), aggregate output tokens/s, time to first token and
inter-token latency percentiles (client side: gaps between streamed chunks), and
the server's resident memory (RSS, and the prefix cache's share from /metrics)
after the warm-up round and after each round, read once the server has been idle
for `--settle` seconds (it hands freed heap memory back after 0.5 s idle).

Memory must stay flat whatever the number of requests served: the state per
sequence is fixed, the prefix cache and the metrics are bounded, and the server
runs the model on a fixed set of shapes (prefill pieces of 2^k or 3 * 2^k tokens,
batch sizes padded to a power of two), so oneDNN's per-shape kernel caches stop
growing once each shape has been seen.
The warm-up round is excluded from the check (it loads those kernels, fills the
allocator's pools at full concurrency and starts the prefix cache): the verdict
compares the RSS after each later round with the RSS after the warm-up round,
less the prefix cache's bytes (it fills up to its `--prefix-cache-mb` budget by
design), and fails if it grew by more than `--rss-tolerance-mb`.

Output: a Markdown summary on stdout (`--json FILE` for the raw figures); exit
code 1 if any request failed or memory grew.

Without `--model`, a random model is built (the bundled tokenizer, a small Griffin
of `--width` / `--layers`) in a temporary directory: the numbers then measure the
serving stack, not a real model.

Examples:
    python benchmarks/serve_load.py --requests 48 --clients 16 --max-tokens 32
    python benchmarks/serve_load.py --model ./recurrentgemma-2b-it --requests 256 \\
        --clients 32 --max-tokens 128 --duration 300 --threads 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXTS = [
    (
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife."
    ),
    (
        "Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
        "money in my purse, I thought I would sail about a little."
    ),
    (
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune."
    ),
    "The quick brown fox jumps over the lazy dog.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue in two sentences.",
]
SYSTEM = "You are a concise assistant. Answer in plain English, in a few sentences at most."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_model(directory: Path, width: int, layers: int, seed: int) -> Path:
    """A random Griffin with the bundled tokenizer, saved as an rgemma checkpoint."""
    import torch

    from rgemma.checkpoint import save_model
    from rgemma.config import GriffinConfig, griffin_pattern
    from rgemma.model import Griffin
    from rgemma.tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer

    vocab = Tokenizer(BUNDLED_TOKENIZER_PATH).vocab_size
    heads = max(1, width // 64)
    cfg = GriffinConfig(
        vocab_size=vocab,
        width=width,
        mlp_expanded_width=3 * width,
        num_heads=heads,
        lru_width=width,
        block_types=griffin_pattern(layers),
        attention_window_size=256,
    )
    torch.manual_seed(seed)
    model = Griffin(cfg)
    model.reset_parameters(seed)
    return save_model(model, directory / "model", tokenizer_path=BUNDLED_TOKENIZER_PATH)


def make_requests(n: int, max_tokens: int, seed: int) -> list[tuple[str, dict]]:
    """(path, body) pairs: a mix of chat (shared system prompt) and completions of
    different prompt lengths; sampled with a per-request seed (reproducible)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(TEXTS) for _ in range(rng.randint(1, 4)))
        common = {
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "top_p": 0.95,
            "seed": i,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if i % 2:
            out.append(
                (
                    "/v1/chat/completions",
                    {
                        "messages": [
                            {"role": "system", "content": SYSTEM},
                            {"role": "user", "content": text},
                        ],
                        **common,
                    },
                )
            )
        else:
            out.append(("/v1/completions", {"prompt": text, **common}))
    return out


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "n": 0}
    xs = sorted(xs)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]

    return {
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "mean": statistics.fmean(xs),
        "n": len(xs),
    }


async def one_request(client, path: str, body: dict, headers: dict) -> dict:
    """Send one streaming request; time its chunks."""
    t0 = time.perf_counter()
    first, last, gaps, tokens, error = None, None, [], 0, None
    try:
        async with client.stream("POST", path, json=body, headers=headers) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for c in chunk.get("choices", []):
                        piece = c.get("text") or (c.get("delta") or {}).get("content")
                        if piece:
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                gaps.append(now - last)
                            last = now
                if not done and error is None:
                    error = "stream ended without [DONE]"
    except Exception as err:  # noqa: BLE001 - a failure to report, not to crash on
        error = f"{type(err).__name__}: {err}"
    return {
        "ttft": None if first is None else first - t0,
        "gaps": gaps,
        "tokens": tokens,
        "error": error,
        "seconds": time.perf_counter() - t0,
    }


async def run_phase(url: str, requests: list, clients: int, duration: float, headers: dict) -> dict:
    import httpx

    queue = list(requests)
    results: list[dict] = []
    t_start = time.perf_counter()
    deadline = t_start + duration
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(600.0), limits=limits
    ) as client:

        async def worker() -> None:
            while queue and time.perf_counter() < deadline:
                path, body = queue.pop(0)
                results.append(await one_request(client, path, body, headers))

        await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t_start
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients,
        "sent": len(results),
        "completed": len(ok),
        "failures": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "itl_s": percentiles([g for r in ok for g in r["gaps"]]),
    }


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s")


def memory_verdict(memory: dict, tolerance_mb: float) -> dict | None:
    """Flat or growing: RSS after the last round vs after the warm-up round (the
    warm-up round itself is excluded: it loads the per-shape kernels and fills the
    allocator's pools once)."""
    if "warm-up" not in memory or len(memory) < 3:
        return None

    def net(v: dict) -> float:  # the prefix cache fills up to its budget by design
        return v["rss"] - (v["cache"] if v["cache"] == v["cache"] else 0.0)  # NaN: none

    base, last_name = memory["warm-up"], list(memory)[-1]
    last = memory[last_name]
    rounds = [net(v) for k, v in memory.items() if k not in ("start", "warm-up")]
    growth, peak = net(last) - net(base), max(rounds) - net(base)
    flat = growth <= tolerance_mb and peak <= tolerance_mb
    text = (
        f"Memory verdict: {'FLAT' if flat else 'GROWING'}: RSS {base['rss']:.0f} MiB after "
        f"the warm-up round (excluded from the check), {last['rss']:.0f} MiB after "
        f"{last_name} ({last['rss'] - base['rss']:+.1f} MiB, of which prefix cache "
        f"{last['cache'] - base['cache']:+.1f} MiB); without the prefix cache (bounded "
        f"by its budget) {growth:+.1f} MiB, peak {peak:+.1f} MiB over {len(rounds)} "
        f"rounds (tolerance {tolerance_mb:g} MiB)."
    )
    return {"flat": flat, "growth_mb": growth, "peak_growth_mb": peak, "text": text}


def fmt_ms(p: dict) -> str:
    return " / ".join(f"{p[k] * 1000:.1f}" for k in ("p50", "p90", "p99")) if p["n"] else "-"


class Server:
    """`rgemma serve` in a subprocess (its own session) on a free loopback port."""

    def __init__(self, args: argparse.Namespace, model: str, tmp: Path, name: str) -> None:
        self.key = "sk-bench"
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "rgemma", "serve", "--model", model]
        cmd += ["--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1]]
        cmd += ["--max-batch-size", str(args.clients)]
        cmd += ["--max-queue", str(max(64, args.clients * 2))]
        cmd += ["--max-tokens", str(max(args.max_tokens, 16))]
        cmd += ["--prefix-cache-mb", str(args.prefix_cache_mb)]
        cmd += ["--log-level", "warning", "--api-key", self.key]
        if args.no_shape_buckets:
            cmd.append("--no-shape-buckets")
        for opt in ("threads", "device", "dtype", "quantize"):
            if getattr(args, opt) is not None:
                cmd += [f"--{opt}", str(getattr(args, opt))]
        self.log_path = tmp / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=log)
        try:
            wait_ready(self.url, self.proc, timeout=300)
        except BaseException:
            sys.stderr.write(self.log_path.read_text(errors="replace")[-4000:])
            self.close()
            raise
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def phase(self, requests: list, clients: int, duration: float) -> dict:
        return asyncio.run(run_phase(self.url, requests, clients, duration, self.headers))

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return float("nan")

    def memory(self, settle: float = 0.0) -> dict:
        """Server RSS and the prefix cache's share of it, in MiB, after `settle`
        seconds idle."""
        time.sleep(settle)
        return {
            "rss": rss_mb(self.proc.pid),
            "cache": self.metric("rgemma_prefix_cache_bytes") / 2**20,
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the session this script started
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="checkpoint to serve (default: a random model)")
    ap.add_argument("--width", type=int, default=256, help="random model width (default 256)")
    ap.add_argument("--layers", type=int, default=6, help="random model layers (default 6)")
    ap.add_argument("--requests", type=int, default=64, help="requests per round (default 64)")
    ap.add_argument(
        "--clients",
        type=int,
        default=16,
        help="concurrent clients with batching; also --max-batch-size (default 16)",
    )
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens (default 64)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="batched rounds, each with new requests, to see memory stay flat (default 3)",
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=120.0,
        help="most seconds per round or phase (default 120)",
    )
    ap.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=64.0,
        help="server prefix-cache budget (default 64)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=1.5,
        help="idle seconds before reading the server's RSS (default 1.5)",
    )
    ap.add_argument(
        "--rss-tolerance-mb",
        type=float,
        default=10.0,
        help="most RSS growth from the warm-up round to the last round that still "
        "counts as flat (default 10 MiB)",
    )
    ap.add_argument(
        "--no-shape-buckets",
        action="store_true",
        help="serve with --no-shape-buckets (exact shapes: memory grows with new shapes)",
    )
    ap.add_argument("--skip-sequential", action="store_true", help="skip the one-at-a-time phase")
    ap.add_argument("--threads", type=int, help="server torch threads")
    ap.add_argument("--device", help="server device (default cpu)")
    ap.add_argument("--dtype", help="server dtype")
    ap.add_argument("--quantize", choices=("int8",))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="also write the raw figures as JSON")
    args = ap.parse_args(argv)
    if min(args.requests, args.clients, args.max_tokens, args.rounds) < 1:
        ap.error("--requests, --clients, --max-tokens and --rounds must be >= 1")

    tmp = Path(tempfile.mkdtemp(prefix="rgemma-serve-load-"))
    warm = make_requests(args.requests, args.max_tokens, args.seed + 10_000)
    rounds = [
        make_requests(args.requests, args.max_tokens, args.seed + r) for r in range(args.rounds)
    ]
    batched, sequential, memory, hits, warmup = [], None, {}, float("nan"), None
    try:
        model = args.model or str(make_random_model(tmp, args.width, args.layers, args.seed))
        # Continuous batching: a warm-up round at full concurrency (per-shape kernels,
        # the allocator's pools, the prefix cache), then rounds of new requests;
        # memory after each, once the server is idle.
        server = Server(args, model, tmp, "batched")
        try:
            memory["start"] = server.memory(args.settle)
            warmup = server.phase(warm, args.clients, args.duration)
            memory["warm-up"] = server.memory(args.settle)
            for r, requests in enumerate(rounds):
                batched.append(server.phase(requests, args.clients, args.duration))
                memory[f"round {r + 1}"] = server.memory(args.settle)
            hits = server.metric("rgemma_prefix_cache_hits_total")
        finally:
            server.close()
        # One at a time: a fresh server (same warm-up, same cache state), round 1 again.
        if not args.skip_sequential:
            server = Server(args, model, tmp, "sequential")
            try:
                server.phase(warm, args.clients, args.duration)
                sequential = server.phase(rounds[0], 1, args.duration)
            finally:
                server.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    what = args.model or f"random Griffin width {args.width}, {args.layers} layers, vocab 4096"
    lines = [
        f"### rgemma serve load test ({what})",
        "",
        (
            f"{args.requests} streaming requests per round (half chat with a shared system "
            f"prompt, half completions; prompts of 1-4 sentences; new requests each round), "
            f"max_tokens {args.max_tokens}, temperature 0.8; server threads: "
            f"{args.threads or 'default'}, device: {args.device or 'cpu'}, prefix cache "
            f"{args.prefix_cache_mb:g} MiB."
        ),
        "",
        (
            "| phase | clients | completed | failures | wall s | out tokens | tokens/s "
            "| TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    phases = [(f"continuous batching, round {i + 1}", r) for i, r in enumerate(batched)]
    if sequential is not None:
        phases.append(("one at a time (round 1's requests)", sequential))
    shown = ([("continuous batching, warm-up round", warmup)] if warmup else []) + phases
    for name, r in shown:
        lines.append(
            f"| {name} | {r['clients']} | {r['completed']}/{r['sent']} | "
            f"{r['failures']} | {r['wall_s']:.1f} | {r['tokens']} | "
            f"{r['tokens_per_s']:.1f} | {fmt_ms(r['ttft_s'])} | {fmt_ms(r['itl_s'])} |"
        )
    lines.append("")
    if sequential is not None and sequential["tokens_per_s"] > 0 and batched:
        speedup = batched[0]["tokens_per_s"] / sequential["tokens_per_s"]
        mean = statistics.fmean(r["tokens_per_s"] for r in batched)
        lines.append(
            f"Continuous batching / one at a time (same requests, round 1): {speedup:.2f}x "
            f"aggregate tokens/s ({batched[0]['tokens_per_s']:.1f} vs "
            f"{sequential['tokens_per_s']:.1f}; mean over the rounds {mean:.1f})."
        )
    lines += ["", "| server RSS MiB | " + " | ".join(memory) + " |"]
    lines.append("| --- " * (len(memory) + 1) + "|")
    lines.append("| RSS | " + " | ".join(f"{v['rss']:.0f}" for v in memory.values()) + " |")
    lines.append(
        "| of which prefix cache | "
        + " | ".join(f"{v['cache']:.1f}" for v in memory.values())
        + " |"
    )
    lines.append("")
    growth = memory_verdict(memory, args.rss_tolerance_mb)
    if growth is not None:
        lines.append(growth["text"])
    lines.append(f"Prefix-cache hits (batched server): {hits:.0f}.")
    errors = sorted({e for _, r in shown for e in r["errors"]})
    if errors:
        lines.append("Errors: " + "; ".join(errors))
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "warmup": warmup,
                    "batched": batched,
                    "sequential": sequential,
                    "memory_mb": memory,
                    "memory_verdict": growth,
                    "prefix_cache_hits": hits,
                    "args": vars(args),
                },
                f,
                indent=1,
            )
    failures = sum(r["failures"] for _, r in shown)
    return 1 if failures or (growth is not None and not growth["flat"]) else 0


if __name__ == "__main__":
    sys.exit(main())
