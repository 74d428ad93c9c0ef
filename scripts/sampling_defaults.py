"""Compare sampling settings on the bundled model: the evidence for the CLI's and the
server's defaults (`rgemma.defaults.SAMPLING`).

For each setting, continuations of a few prompts (several seeds each, generated as
one batch) are scored on:

- distinct-2 / distinct-3: distinct word n-grams over all n-grams of a continuation
  (Li et al. 2016, arXiv 1510.03055), higher = less repetitive;
- rep-4: the share of word 4-grams that already occurred earlier in the same
  continuation, lower = fewer loops;
- NLL: the mean negative log-likelihood (nats per token) of the sampled tokens under
  the model itself, before any processor: how unusual the text is to the model
  (higher = more erratic; greedy is the floor).

    python scripts/sampling_defaults.py [--tokens 120] [--seeds 4]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import rgemma

PROMPTS = [
    "It is a truth universally acknowledged",
    "Call me Ishmael.",
    "ROMEO.",
    "The whale",
    "Emma Woodhouse, handsome, clever, and rich,",
    "And God said,",
]

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "T 0.8, top-p 0.95": {"temperature": 0.8, "top_p": 0.95},
    "T 0.8, top-p 0.95, rep 1.1": {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1},
    "T 0.8, top-p 0.95, rep 1.2": {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.2},
    "T 1.0": {"temperature": 1.0},
}


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct(words: list[str], n: int) -> float:
    grams = ngrams(words, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated(words: list[str], n: int = 4) -> float:
    grams, seen, rep = ngrams(words, n), set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams) if grams else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--show", action="store_true", help="print one sample per setting")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = rgemma.load()
    prompts = [p for p in PROMPTS for _ in range(args.seeds)]
    print(
        f"bundled model, {len(PROMPTS)} prompts x {args.seeds} seeds, {args.tokens} tokens"
        " (EOS ignored)"
    )
    print(f"{'setting':<28} {'distinct-2':>10} {'distinct-3':>10} {'rep-4':>7} {'NLL':>6}")
    for name, fields in SETTINGS.items():
        results = rgemma.generate(
            model,
            tok,
            prompts,
            max_new_tokens=args.tokens,
            seed=0,
            logprobs=0,
            ignore_eos=True,
            **fields,
        )
        words = [r.text.split() for r in results]
        d2 = statistics.mean(distinct(w, 2) for w in words)
        d3 = statistics.mean(distinct(w, 3) for w in words)
        r4 = statistics.mean(repeated(w) for w in words)
        nll = -statistics.mean(lp.logprob for r in results for lp in r.logprobs)
        print(f"{name:<28} {d2:10.3f} {d3:10.3f} {r4:7.3f} {nll:6.2f}")
        if args.show:
            print("   ", " ".join(results[0].text.split())[:300])


if __name__ == "__main__":
    main()
