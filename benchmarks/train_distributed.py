"""Training throughput and memory per process of `rgemma train` on 1 and N processes
(torchrun, gloo on CPU): the same global batch split over the processes.

Each configuration is one `torchrun --standalone --nproc_per_node N` launch of this
file in worker mode, which runs `rgemma.training.train` and records, per rank, the
wall and CPU time at the end of every optimiser step (a global optimizer step hook),
its resident memory after the imports and its peak (`getrusage`). From the end of the
warm-up steps to the last step: wall tokens/s of all ranks together, and CPU seconds
per step of each process. On shared cores the wall figure moves with the other jobs;
CPU time per step does not (waiting in a collective is not CPU time): tokens per CPU
second over all processes is the work each configuration costs.

    python benchmarks/train_distributed.py                  # 1 process, 2 x FSDP2, 2 x DDP
    python benchmarks/train_distributed.py --procs 1,2,4 --threads 1 --steps 20
    python benchmarks/train_distributed.py --json out.json  # also the records

The model is configs/bundled.json's (width 256, 6 blocks, vocab 4,096), trained
from scratch in float32 on `--data` (default: Moby-Dick from data/corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    """This process's current resident memory in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------
# Worker (one rank of a torchrun launch)
# ----------------------------------------------------------------------------------
def worker(config_path: str, out_dir: str) -> None:
    """Train as `config_path` says; write `out_dir/rank_R.json` with this rank's
    memory (MiB: `rss_after_import`, `peak_rss`) and `steps`, the (wall, CPU) seconds
    at the end of each optimiser step."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from rgemma.training import TrainConfig, train

    after_import = _rss_mib()
    cfg = TrainConfig.from_file(config_path)
    rank = int(os.environ.get("RANK", "0"))
    steps: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(
        lambda *_: steps.append((time.perf_counter(), time.process_time()))
    )
    train(cfg)
    del torch
    record = {
        "rank": rank,
        "rss_after_import": after_import,
        "peak_rss": _peak_rss_mib(),
        "steps": steps,
    }
    Path(out_dir, f"rank_{rank}.json").write_text(json.dumps(record), encoding="utf-8")


# ----------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------
def _per_step(steps: list[list[float]], warmup: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step from the end of step `warmup` to the last step."""
    (w0, c0), (w1, c1) = steps[warmup - 1], steps[-1]
    n = len(steps) - warmup
    return (w1 - w0) / n, (c1 - c0) / n


def run_one(procs: int, mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One torchrun launch; returns its record."""
    name = f"{procs}x{mode}"
    model = json.loads((ROOT / "configs" / "bundled.json").read_text(encoding="utf-8"))["model"]
    config = {
        "model": model,
        "tokenizer": str(ROOT / "src" / "rgemma" / "assets" / "bundled" / "tokenizer.model"),
        "train_data": [str(Path(args.data).resolve())],
        "val_fraction": 0.0,
        "seq_len": args.seq_len,
        "batch_size": args.global_batch // procs,
        "global_batch_size": args.global_batch,
        "max_steps": args.steps,
        "warmup_steps": 1,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "save_every": 0,
        "eval_every": 0,
        "log_every": 1,
        "num_threads": args.threads,
        "data_parallel": mode if procs > 1 else "fsdp",
        "gradient_checkpointing": args.activation_checkpointing,
        "bf16": args.bf16,
        "progress": False,
        "save_final": False,
        "out_dir": str(workdir / name),
    }
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    out = workdir / f"{name}.ranks"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(procs), __file__, "--worker", str(config_path), str(out)]
    # As `rgemma train` does: OpenMP threads wait passively (shared cores).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("rank_*.json"))]
    if len(ranks) != procs or any(len(r["steps"]) != args.steps for r in ranks):
        sys.exit(f"{name}: expected {procs} ranks of {args.steps} steps each")
    timing = [_per_step(r["steps"], args.warmup) for r in ranks]
    tokens_per_step = args.global_batch * args.seq_len
    return {
        "procs": procs,
        "mode": "one process" if procs == 1 else mode,
        "rows_per_process": args.global_batch // procs,
        "tokens_per_s": tokens_per_step / max(w for w, _ in timing),
        "cpu_s_per_step": [c for _, c in timing],
        "tokens_per_cpu_s": tokens_per_step / sum(c for _, c in timing),
        "peak_rss_mib": max(r["peak_rss"] for r in ranks),
        "rss_after_import_mib": max(r["rss_after_import"] for r in ranks),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    p.add_argument("--modes", default="fsdp,ddp", help="data_parallel modes for > 1 process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step, all ranks")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--data", default=str(ROOT / "data" / "corpus" / "mobydick.txt"))
    p.add_argument("--json", metavar="FILE", help="also write the records here")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    procs = [int(x) for x in args.procs.split(",")]
    if any(args.global_batch % n for n in procs):
        sys.exit(f"--global-batch {args.global_batch} does not divide by every --procs {procs}")
    if not 0 < args.warmup < args.steps:
        sys.exit("--warmup must be in [1, --steps)")
    import torch

    machine = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads_per_process": args.threads,
        "load_average_before": os.getloadavg()[0],
        "torch": torch.__version__,
        "shape": f"global batch {args.global_batch} x {args.seq_len} tokens, bundled model, "
        + ("bf16 autocast" if args.bf16 else "float32")
        + (", activation checkpointing" if args.activation_checkpointing else ""),
    }
    records = []
    with tempfile.TemporaryDirectory(prefix="rgemma-train-dist-") as tmp:
        for n in procs:
            for mode in args.modes.split(",") if n > 1 else ["fsdp"]:
                records.append(run_one(n, mode, args, Path(tmp)))
                print(f"done: {records[-1]['mode']} x {n}", file=sys.stderr, flush=True)
    machine["load_average_after"] = os.getloadavg()[0]
    print(
        f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"{args.threads} thread(s) per process, torch {machine['torch']}; {machine['shape']}; "
        f"load average {machine['load_average_before']:.1f} before, "
        f"{machine['load_average_after']:.1f} after"
    )
    print()
    print(
        "| processes | data parallel | rows / process | wall tokens/s (all) "
        "| CPU s / step / process | tokens / CPU s (all) | peak RSS / process (MiB) "
        "| RSS after imports (MiB) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        cpu = ", ".join(f"{c:.2f}" for c in r["cpu_s_per_step"])
        print(
            f"| {r['procs']} | {r['mode']} | {r['rows_per_process']} | {r['tokens_per_s']:,.0f} "
            f"| {cpu} | {r['tokens_per_cpu_s']:,.0f} | {r['peak_rss_mib']:,.0f} "
            f"| {r['rss_after_import_mib']:,.0f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine, "records": records}, indent=2), encoding="utf-8"
        )


if __name__ == "__main__":
    main()
