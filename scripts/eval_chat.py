#!/usr/bin/env python3
"""Does a chat model answer in turn? The turn-ending rate on held-out user lines.

Each held-out dialogue's first user line is sent as a one-turn chat (Gemma's
template, `generate(chat=True)`), with the sampling defaults of `rgemma chat`
(`rgemma.sampling.default_sampling`: temperature 0.8, top-p 0.95, repetition
penalty 1.1; row r seeded `seed + r`) and again greedily. A reply *ends its turn*
when the model samples `<end_of_turn>` within `--max-new-tokens` (a reply cut by
the length limit, or ended by `<eos>` instead, does not count).

Reported per decoding: `end_of_turn_rate` (the target: >= 0.9), `eos_rate`,
`length_rate`, reply length in tokens and words (mean, median, p90, max; of every
reply, cut ones included) and a few example exchanges. Written as JSON to `--out`
(and printed).

    python scripts/eval_chat.py [--model DIR] [--data runs/chat_data/valid.jsonl]
                                [--out src/rgemma/assets/bundled-chat/eval.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import rgemma
from rgemma.checkpoint import bundled_model_path
from rgemma.sampling import default_sampling

ROOT = Path(__file__).resolve().parent.parent


def user_lines(path: Path, limit: int | None = None) -> list[str]:
    """The first user turn of each dialogue of a `{"messages"}` JSONL file."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                messages = json.loads(line)["messages"]
                lines.append(next(m["content"] for m in messages if m["role"] == "user"))
    return lines[:limit] if limit else lines


def _shown(path: Path) -> str:
    """`path` relative to the repository when inside it (the report names no machine)."""
    path = path.absolute()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _stats(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 2),
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    sampling: rgemma.SamplingParams,
    batch_size: int = 64,
    examples: int = 5,
) -> dict:
    """Reply to each prompt as a one-turn chat and measure how the replies end.

    Args:
        model, tokenizer: a chat model (its tokenizer has `<end_of_turn>`).
        prompts: user lines.
        sampling: how to decode (its `max_new_tokens` is the length limit; with a
            seed, prompt i is sampled with `seed + i` whatever the batching).
        batch_size: prompts per `generate` call.
        examples: how many (user, reply) pairs to include, the first ones.

    Returns:
        dict with `end_of_turn_rate`, `eos_rate`, `length_rate` (shares of the
        prompts, summing to 1), `reply_tokens`, `reply_words` (length statistics)
        and `examples`.
    """
    eot, eos = tokenizer.end_of_turn_id, tokenizer.eos_id
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = sampling
        if sampling.seed is not None:  # row r of this batch is prompt start + r
            batch = sampling.replace(seed=sampling.seed + start)
        results += rgemma.generate(
            model, tokenizer, prompts[start : start + batch_size], sampling=batch, chat=True
        )
    n = len(results)
    ended = [r.stop_token_id == eot for r in results]
    return {
        "end_of_turn_rate": sum(ended) / n,
        "eos_rate": sum(r.stop_token_id == eos for r in results) / n,
        "length_rate": sum(r.finish_reason == "length" for r in results) / n,
        "reply_tokens": _stats([len(r.token_ids) for r in results]),
        "reply_words": _stats([len(r.text.split()) for r in results]),
        "examples": [
            {"user": p, "model": r.text, "ended_turn": e}
            for p, r, e in list(zip(prompts, results, ended))[:examples]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default=str(bundled_model_path().parent / "bundled-chat"),
        help="chat model directory (default: the bundled chat model)",
    )
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "chat_data" / "valid.jsonl")
    ap.add_argument("--limit", type=int, default=None, help="use the first N dialogues only")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="the length limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the report here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = rgemma.load(args.model, dtype=torch.float32)
    prompts = user_lines(args.data, args.limit)
    if not prompts:
        print(f"eval_chat: no dialogues in {args.data}", file=sys.stderr)
        return 2
    decodings = {
        "chat_defaults": default_sampling(max_new_tokens=args.max_new_tokens, seed=args.seed),
        "greedy": default_sampling(max_new_tokens=args.max_new_tokens, temperature=0.0),
    }
    report = {
        "model": _shown(Path(args.model)),
        "data": _shown(args.data),
        "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
    }
    for name, sampling in decodings.items():
        t0 = time.perf_counter()
        report[name] = {
            "sampling": {
                k: getattr(sampling, k)
                for k in ("temperature", "top_p", "repetition_penalty", "seed")
            },
            **evaluate(model, tokenizer, prompts, sampling, args.batch_size),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
