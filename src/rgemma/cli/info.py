"""`rgemma info`: a checkpoint's config, parameter count, dtype, state size and
where its weights came from."""

from __future__ import annotations

import argparse

from . import options

EPILOG = """\
examples:
  rgemma info                          # the bundled model
  rgemma info --model ./recurrentgemma-2b --dtype bfloat16
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, description and examples of `rgemma info`."""
    p.description = (
        "Describe a checkpoint: config, parameter count, dtype, "
        "state size and where the weights came from."
    )
    p.epilog = EPILOG
    options.add_model_options(p)


def run(args: argparse.Namespace) -> int:
    """Run `rgemma info`: the description on stdout; returns 0.

    Raises:
        CheckpointError: see --model. InputError: a bad --device or --threads.
    """
    options.setup_torch(args)
    from ..config import PRESETS

    model, _ = options.load_model_and_tokenizer(args, tokenizer=False)
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
    options.write("\n".join(lines) + "\n")
    return 0
