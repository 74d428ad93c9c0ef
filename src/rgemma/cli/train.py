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
  rgemma train --config configs/bundled.json --tensorboard    # also OUT/tensorboard/
  rgemma train --plot runs/bundled                            # draw runs/bundled/loss.png
  torchrun --standalone --nproc_per_node 2 -m rgemma train --config c.json   # 2 processes
  torchrun --nproc_per_node 2 -m rgemma train --config c.json --data-parallel ddp

Overrides are KEY=VALUE pairs of TrainConfig fields (see rgemma.training.TrainConfig),
anywhere on the line (or each as --set KEY=VALUE); VALUE is
parsed as JSON when it can be (numbers, true/false, null, lists), else taken as a
string; a dotted KEY sets a field of an inline model config.

Checkpoints go to OUT/checkpoints/step_XXXXXXX/ (atomic; the last keep_last are
kept), metrics to OUT/metrics.jsonl (and TensorBoard events to OUT/tensorboard/
with --tensorboard), the loss curve to OUT/loss.png (with matplotlib), the final
model to OUT/final/ (load it with `rgemma generate --model OUT/final`). Progress
goes to stderr: a bar on a terminal, else a line every log_every steps. SIGTERM (a
preemption) or Ctrl-C finishes the current step, writes a checkpoint of it and exits
(0 after SIGTERM, 130 after Ctrl-C; a second one stops at once, without it). After a
stop or a crash, the same command with --resume continues exactly where the last
checkpoint left off; a full disk is a one-line error that keeps the last checkpoint.

Under torchrun every process trains on its share of each batch (batch_size rows
per process; global_batch_size=N fixes the batch over all processes whatever their
number), with FSDP2 (parameters, gradients and optimizer state sharded) or DDP;
gloo on CPU, NCCL on CUDA (--device cuda: one GPU per process). Only rank 0 logs
and writes files; an error is reported by rank 0 and every rank exits.
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
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (per process)")
    p.add_argument(
        "--data-parallel",
        choices=("fsdp", "ddp"),
        help="under torchrun: FSDP2 (sharded, the default) or DDP (replicas)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help="fine-tune LoRA adapters of rank R (base weights frozen; 0: full fine-tune)",
    )
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA scale numerator")
    p.add_argument(
        "--lora-targets",
        nargs="+",
        metavar="NAME",
        help="projections that get adapters (rgemma or HF names; default: every one)",
    )
    p.add_argument(
        "--carry-state",
        action="store_true",
        help="carry the recurrent and attention state from one segment of a document "
        "to the next (truncated backpropagation through time)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log to TensorBoard in OUT/tensorboard (needs: pip install tensorboard)",
    )
    p.add_argument(
        "--plot",
        metavar="RUN",
        help="only draw the loss curve of a finished or running run (its directory or "
        "metrics.jsonl) into loss.png beside its metrics, then exit",
    )
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
        "data_parallel": args.data_parallel,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "lora_targets": args.lora_targets,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.resume:
        data["resume"] = True
    if args.no_progress:
        data["progress"] = False
    if args.tensorboard:
        data["tensorboard"] = True
    if args.carry_state:
        data["carry_state"] = True
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
    "data_parallel": "--data-parallel",
    "lora_rank": "--lora-rank",
    "lora_alpha": "--lora-alpha",
    "lora_targets": "--lora-targets",
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
    """Run `rgemma train`; prints a summary; returns 0, or after a stop by a signal
    (the steps done are checkpointed; `--resume` continues) 0 for SIGTERM (a
    preemption honoured) and 130 for SIGINT (Ctrl-C), see `training.stop`.

    Unless the environment says otherwise, OpenMP threads wait passively
    (`OMP_WAIT_POLICY=PASSIVE`): on a machine whose cores are shared with other
    jobs, spinning threads made 2-thread training 4-8x slower (450 vs 2100 tokens/s
    for configs/bundled.json on 2 busy cores); on idle cores passive waiting costs
    about 20% (2900 vs 3800 tokens/s). Set OMP_WAIT_POLICY=ACTIVE for the latter.
    """
    if args.plot is not None:
        return _plot(args)
    if "torch" not in sys.modules:  # read by the OpenMP runtime when torch loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ..errors import RgemmaError

    try:
        cfg = _train_config(args)
        from ..training import train

        result = train(cfg)  # prints its summary (training.metrics.format_summary)
    except RgemmaError:
        # Under torchrun every rank meets the same bad config or data: rank 0 says
        # it once, the others exit quietly with the same code.
        if os.environ.get("RANK", "0") != "0":
            return 2
        raise
    if result.get("stopped"):  # SIGTERM or SIGINT: the steps done are checkpointed
        from ..training.stop import stop_exit_code

        return stop_exit_code(result["stopped"])
    return 0


def _plot(args: argparse.Namespace) -> int:
    """`rgemma train --plot RUN`: write RUN's loss.png and print its path."""
    from ..errors import InputError
    from ..training import plot_metrics

    if args.config or args.overrides or args.set_overrides or args.resume:
        raise InputError("--plot draws an existing run: give it no --config, --resume or overrides")
    print(plot_metrics(args.plot))
    return 0
