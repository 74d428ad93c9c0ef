"""`rgemma train`: train a model from scratch or fine-tune a checkpoint, as a train
config (JSON or TOML) and KEY=VALUE overrides describe it (`rgemma.training`).

Torch and the training code are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

EPILOG = """\
examples:
  rgemma train --config configs/bundled.json
  rgemma train --config configs/bundled.json --resume          # continue after a stop
  rgemma train --config configs/bundled.json --max-steps 20 warmup_steps=2 --out runs/bench
  rgemma train --config ft.toml lr=3e-4 bf16=true train_data='["chat.jsonl"]'
  rgemma train --config c.json model.width=128 out_dir=runs/wide

Overrides are KEY=VALUE pairs of TrainConfig fields (see rgemma.training.TrainConfig),
anywhere on the line (or each as --set KEY=VALUE); VALUE is
parsed as JSON when it can be (numbers, true/false, null, lists), else taken as a
string; a dotted KEY sets a field of an inline model config.

Checkpoints go to OUT/checkpoints/step_XXXXXXX/ (atomic; the last keep_last are
kept), metrics to OUT/metrics.jsonl, the final model to OUT/final/ (load it with
`rgemma generate --model OUT/final`). After a stop or a crash, the same command
with --resume continues exactly where the last checkpoint left off.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, description and examples of `rgemma train`."""
    p.description = (
        "Train a Griffin model from scratch or fine-tune a checkpoint, as "
        "described by a JSON or TOML train config."
    )
    p.epilog = EPILOG
    p.add_argument(
        "--config",
        metavar="FILE",
        help="train config (.json or .toml); without it, overrides give every field",
    )
    p.add_argument("--out", metavar="DIR", help="output directory (overrides out_dir)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in the output directory",
    )
    p.add_argument("--max-steps", type=int, metavar="N", help="total optimiser steps")
    p.add_argument(
        "--init-from",
        metavar="PATH",
        help="fine-tune this checkpoint (official .pt, HF or rgemma directory)",
    )
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1 or auto")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="set_overrides",
        help="a config override; repeatable, allowed anywhere on the line",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides (anywhere on the line; or use --set)",
    )


def _train_config(args: argparse.Namespace):
    from ..errors import ConfigError
    from ..training import TrainConfig, apply_overrides, read_config_file

    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    data = apply_overrides(data, list(args.set_overrides) + list(args.overrides))
    flags = {
        "out_dir": args.out,
        "max_steps": args.max_steps,
        "init_from": args.init_from,
        "device": args.device,
        "num_threads": args.threads,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.resume:
        data["resume"] = True
    if args.no_progress:
        data["progress"] = False
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(_blame(str(err), args, flags)) from None


_FLAG_NAMES = {
    "out_dir": "--out",
    "max_steps": "--max-steps",
    "init_from": "--init-from",
    "device": "--device",
    "num_threads": "--threads",
}


def _blame(message: str, args: argparse.Namespace, flags: dict[str, Any]) -> str:
    """`message` of an invalid train config, prefixed with what set the fields it
    names: the overrides or options that did, else the config file."""
    import re

    named = re.findall(r"TrainConfig\.(\w+)", message)
    match = re.match(r"unknown train config key\(s\): ([^;]*)", message)
    if match:
        named += [k.strip() for k in match.group(1).split(",")]
    sources: list[str] = []
    for name in dict.fromkeys(named):
        items = [
            item
            for item in list(args.set_overrides) + list(args.overrides)
            if item.split("=", 1)[0].strip().split(".")[0] == name
        ]
        if items:
            sources.append(f"override {items[-1]}")
        elif flags.get(name) is not None:
            sources.append(f"{_FLAG_NAMES[name]} {flags[name]}")
    if sources:
        return f"{', '.join(sources)}: {message}"
    return f"{args.config}: {message}" if args.config else message


def run(args: argparse.Namespace) -> int:
    """Run `rgemma train`; prints a summary; returns 0.

    Unless the environment says otherwise, OpenMP threads wait passively
    (`OMP_WAIT_POLICY=PASSIVE`): on a machine whose cores are shared with other
    jobs, spinning threads made 2-thread training 4-8x slower (450 vs 2100 tokens/s
    for configs/bundled.json on 2 busy cores); on idle cores passive waiting costs
    about 20% (2900 vs 3800 tokens/s). Set OMP_WAIT_POLICY=ACTIVE for the latter.
    """
    if "torch" not in sys.modules:  # read by the OpenMP runtime when torch loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cfg = _train_config(args)
    from ..training import train

    result = train(cfg)
    lines = [
        f"steps:       {result['step']} ({result['tokens_seen']:,} tokens)",
        f"train loss:  {result['train_loss']:.4f}" if result["train_loss"] is not None else None,
        (
            f"val loss:    {result['val_loss']:.4f}  ppl {result['val_ppl']:.2f}"
            + (f"  bits/byte {result['val_bpb']:.4f}" if result.get("val_bpb") else "")
        )
        if result["val_loss"] is not None
        else None,
        f"throughput:  {result['tokens_per_s']:.0f} tokens/s" if result["tokens_per_s"] else None,
        f"checkpoint:  {result['checkpoint']}",
        f"final model: {result['final_dir']}" if result["final_dir"] else None,
    ]
    print("\n".join(x for x in lines if x), file=sys.stderr)
    return 0
