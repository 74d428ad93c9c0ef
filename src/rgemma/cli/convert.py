"""`rgemma convert`: rewrite a checkpoint in Hugging Face or rgemma format.

SRC is anything `load_model` reads (an official `.pt`, a HF directory, an rgemma
directory, an official Flax/orbax checkpoint, a Hub id). DST is written to a
temporary directory beside it and renamed into place, so it is never half-written;
an existing DST is refused unless --force (and even then only a checkpoint
directory or an empty one is replaced).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import options

EPILOG = """\
examples:
  rgemma convert ./recurrentgemma-2b-it.pt ./rg-2b-it-hf --to hf      # for transformers
  rgemma convert google/recurrentgemma-2b-it ./rg-2b-it --to rgemma --dtype bfloat16
  rgemma convert ./rg-2b-it ./rg-2b-it-int8 --to rgemma --quantize int8
  rgemma convert ./flax-ckpt ./rg-hf --to hf --tokenizer ./tokenizer.model --force
  rgemma convert ./rg-2b ./rg-2b-chat --merge-adapter ./runs/lora/adapter --to rgemma

The HF attention window is one key shorter than the official model's (HF sees W keys,
the official model W + 1): --hf-exact-window writes W + 1 into config.json so that
transformers computes the official model exactly past position W.
"""

#: Files of a directory that make it a checkpoint `--force` may replace.
_CHECKPOINT_MARKERS = ("config.json", "rgemma_config.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, description and examples of `rgemma convert`."""
    p.description = (
        "Convert a checkpoint (official .pt, HF, rgemma, official Flax, or a Hub id) "
        "to a Hugging Face directory (--to hf) or rgemma's format (--to rgemma)."
    )
    p.epilog = EPILOG
    p.add_argument("src", metavar="SRC", help="checkpoint to read (anything --model takes)")
    p.add_argument("dst", metavar="DST", help="directory to write")
    p.add_argument("--to", required=True, choices=("hf", "rgemma"), help="output format")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="parameter dtype of the output (default: the checkpoint's)",
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="--to rgemma only: save weight-only int8 weights and scales (loads without "
        "re-quantizing)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="tokenizer.model to ship (default: the one beside SRC, if any)",
    )
    p.add_argument(
        "--merge-adapter",
        metavar="DIR",
        help="fold the LoRA adapter in DIR (PEFT format: adapter_config.json + "
        "adapter_model.safetensors, e.g. from rgemma train with lora_rank > 0) into "
        "SRC's weights before writing",
    )
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument(
        "--hf-exact-window",
        action="store_true",
        help="--to hf only: write attention_window_size + 1 so HF matches the official "
        "model at every position",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="--to hf only: largest safetensors shard (default 5GB)",
    )


def check_destination(dst: Path, src: Path | None, force: bool) -> None:
    """Refuse a DST that exists (unless `force` and it is a checkpoint or empty
    directory) or that is SRC.

    Raises:
        InputError: naming DST and what to do.
    """
    from ..errors import InputError

    if src is not None and dst.resolve() in (src.resolve(), src.resolve().parent):
        raise InputError(f"DST {dst} is SRC's own location; write the conversion elsewhere")
    if not dst.exists():
        return
    if not force:
        raise InputError(f"DST {dst} exists; pass --force to replace it")
    if not dst.is_dir():
        raise InputError(f"DST {dst} is a file, not a checkpoint directory; not replacing it")
    if any(dst.iterdir()) and not any((dst / m).is_file() for m in _CHECKPOINT_MARKERS):
        raise InputError(
            f"DST {dst} is a non-empty directory that is not a checkpoint (no "
            f"{' or '.join(_CHECKPOINT_MARKERS)}); not replacing it even with --force"
        )


def run(args: argparse.Namespace) -> int:
    """Run `rgemma convert`; prints the written directory (and, with --merge-adapter,
    the adapter's size and share of the base); returns 0.

    Raises:
        InputError: an option that does not fit --to, a DST that exists (without
            --force), a missing --tokenizer. CheckpointError: an unreadable SRC; an
            adapter that is unreadable or made for another base model.
    """
    from ..checkpoint import save_hf, save_model
    from ..errors import InputError
    from ..hub import resolve_model_path

    if args.to == "hf" and args.quantize:
        raise InputError("--quantize needs --to rgemma: HF has no int8 layout")
    if args.to == "rgemma" and args.hf_exact_window:
        raise InputError("--hf-exact-window needs --to hf")
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        raise InputError(f"--tokenizer {args.tokenizer}: no such file")
    dst = Path(args.dst).expanduser().absolute()
    local = Path(args.src).expanduser()
    check_destination(dst, local if local.exists() else None, args.force)
    src = resolve_model_path(args.src)

    from ..checkpoint import load_model

    model = load_model(src, dtype=args.dtype, adapter=args.merge_adapter)
    source = getattr(model, "source", None) or {}
    merged = None
    if args.merge_adapter:  # its size beside the base's, before any quantization
        from ..lora import AdapterSize

        base = sum(p.numel() * p.element_size() for p in model.parameters())
        merged = AdapterSize(source["adapter"]["bytes"], base)
    tokenizer = args.tokenizer or source.get("tokenizer")
    if args.to == "hf":
        save_hf(
            model,
            dst,
            tokenizer_path=tokenizer,
            max_shard_size=args.max_shard_size,
            exact_window=args.hf_exact_window,
        )
    else:
        if args.quantize:
            from ..quantization import quantize

            model = quantize(model, args.quantize)
        save_model(model, dst, tokenizer_path=tokenizer)
    n = sum(p.numel() for p in model.state_dict().values())
    kind = f"{args.to}{', ' + args.quantize if args.quantize else ''}"
    options.write(f"wrote {dst} ({kind}, {n:,} values, tokenizer: {tokenizer or 'none'})\n")
    if merged is not None:
        options.write(f"merged {args.merge_adapter}: {merged.describe()}\n")
    return 0
