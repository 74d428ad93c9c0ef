"""Quality cost of each weight format: perplexity on the bundled model's held-out
text and logit error on a larger random-weight model, float32 as the baseline.

* Bundled model: the validation documents `rgemma train` holds out
  (`configs/bundled.json`: SHA-256 split by document, `val_fraction`, `doc_chars`;
  the split `scripts/eval_bundled.py` scores), each scored whole by
  `rgemma.scoring.score_texts` (BOS + text + EOS, chunks over the state), in float32,
  bfloat16, int8 and int4 with each group size.
* Random-weight model (`--width`, `--layers`, `--vocab`; the Griffin pattern, rgemma's
  own initialisation): max and mean |logit difference| against float32 on a random
  prompt, relative to the float32 logits' max |logit|.

Prints one table; `--json FILE` writes it. Example (about 2-4 minutes on 2 cores):

    python benchmarks/quant_quality.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import rgemma
from rgemma import GriffinConfig, quantize
from rgemma.data import expand_paths, read_documents, split_documents
from rgemma.scoring import score_texts

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ["float32", "bfloat16", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g256"]


def convert(model, fmt: str):
    """A copy of a float32 `model` in the weight format `fmt`."""
    m = copy.deepcopy(model)
    if fmt == "float32":
        return m
    if fmt == "bfloat16":
        return m.to(torch.bfloat16)
    if fmt == "int8":
        return quantize(m, "int8")
    return quantize(m, "int4", group_size=int(fmt.removeprefix("int4-g")))


def validation_texts(config_path: Path, max_docs: int | None) -> list[str]:
    """The held-out documents of the bundled model's training config."""
    conf = json.loads(config_path.read_text())
    paths = expand_paths([str(ROOT / p) for p in conf["train_data"]], "train_data")
    docs = read_documents(paths, doc_chars=conf.get("doc_chars", 16000))
    _, val = split_documents(docs, conf.get("val_fraction", 0.01))
    return [d.text for d in val[:max_docs]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--config", default=str(ROOT / "configs" / "bundled.json"))
    ap.add_argument("--max-docs", type=int, default=None, help="validation documents (all)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompt", type=int, default=256, help="random prompt tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = args.formats.split(",")
    rows: list[dict] = []

    model, tokenizer = rgemma.load(dtype=torch.float32)
    texts = validation_texts(Path(args.config), args.max_docs)
    base = None
    for fmt in formats:
        t0 = time.perf_counter()
        m = convert(model, fmt).eval()
        s = sum(score_texts(m, tokenizer, texts))
        base = base or s.perplexity
        rows.append(
            {
                "model": "bundled",
                "format": fmt,
                "tokens": s.tokens,
                "perplexity": s.perplexity,
                "change_pct": 100 * (s.perplexity / base - 1),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    cfg = GriffinConfig(
        vocab_size=args.vocab,
        width=args.width,
        mlp_expanded_width=3 * args.width,
        num_heads=max(1, args.width // 256),
        lru_width=args.width,
        block_types=GriffinConfig.preset("recurrentgemma-2b").block_types[: args.layers],
        attention_window_size=2048,
    )
    ref_model = rgemma.Griffin(cfg, dtype=torch.float32)
    ref_model.reset_parameters(seed=0)
    tokens = torch.randint(
        0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ref, _ = ref_model(tokens)
        for fmt in formats[1:]:
            out, _ = convert(ref_model, fmt).eval()(tokens)
            diff = (out.float() - ref).abs()
            rows.append(
                {
                    "model": f"random d={cfg.width} L={cfg.num_layers} v={cfg.vocab_size}",
                    "format": fmt,
                    "max_logit_diff": diff.max().item(),
                    "mean_logit_diff": diff.mean().item(),
                    "max_abs_logit": ref.abs().max().item(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    print(
        f"\n{'model':<30} {'format':<10} {'ppl':>8} {'change':>8} {'max |dlogit|':>13} {'mean':>8}"
    )
    for r in rows:
        ppl = f"{r['perplexity']:8.3f} {r['change_pct']:+7.2f}%" if "perplexity" in r else " " * 17
        diff = (
            f"{r['max_logit_diff']:13.4f} {r['mean_logit_diff']:8.4f}"
            if "max_logit_diff" in r
            else ""
        )
        print(f"{r['model']:<30} {r['format']:<10} {ppl} {diff}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
