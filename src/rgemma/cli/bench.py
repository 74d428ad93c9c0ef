"""`rgemma bench`: how fast rgemma runs on this machine, gpt-fast style.

Prefill: tokens/s of one prompt. Decode, at a few batch sizes: tokens/s, ms per step,
and the bytes a step reads (every weight once, plus the state) over the step time in
GB/s, as a share of the machine's memory bandwidth measured by a large tensor copy.
Batch-1 decode is bound by that bandwidth, so the share says how close it runs to
the hardware's limit.

rgemma's state has a fixed size, so a decode step costs the same at any position:
decode is timed after a short prompt. The comparison with the official and HF
implementations and a transformer baseline (memory, long prompts, plots, RESULTS.md)
is `python benchmarks/run_all.py`, outside the package.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from . import options

EPILOG = """\
examples:
  rgemma bench                                   # the bundled model
  rgemma bench --model ./recurrentgemma-2b --dtype bfloat16 --batch-sizes 1,8
  rgemma bench --preset recurrentgemma-2b --dtype bfloat16   # random weights, 2B shape
  rgemma bench --quantize int8 --compile --threads 4

Compare with the official and HF implementations: python benchmarks/run_all.py --quick
"""


def _ints(text: str) -> tuple[int, ...]:
    """argparse type of a comma-separated list of positive ints."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like 1,4,16, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, description and examples of `rgemma bench`."""
    p.description = "Time rgemma's prefill and decode on this machine (tok/s, GB/s)."
    p.epilog = EPILOG
    options.add_model_options(p)
    p.add_argument(
        "--preset",
        metavar="NAME",
        help="random weights of a GriffinConfig preset (e.g. recurrentgemma-2b) instead "
        "of a checkpoint",
    )
    p.add_argument(
        "--prompt-length", type=int, default=512, metavar="T", help="prefill prompt (default 512)"
    )
    p.add_argument(
        "--batch-sizes",
        type=_ints,
        default=(1, 4, 16),
        metavar="B,..",
        help="decode batch sizes (default 1,4,16)",
    )
    p.add_argument(
        "--steps", type=int, default=32, metavar="N", help="timed decode steps (default 32)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, metavar="N", help="timed prefill runs (default 3)"
    )
    p.add_argument(
        "--bandwidth-mib",
        type=int,
        default=256,
        metavar="MIB",
        help="buffer of the memory bandwidth test (default 256)",
    )
    options.add_speed_options(p)


# ----------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(mib: int = 256, repeats: int = 5, device: Any = "cpu") -> dict[str, list]:
    """Memory bandwidth of `device`, one figure per run after a warm-up run.

    Returns:
        {"copy": GB/s of copying a `mib` MiB float32 buffer into another (bytes read +
        written per second), "read": GB/s of summing it (bytes read per second)}.
    """
    import torch

    device = torch.device(device)
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    out: dict[str, list] = {"copy": [], "read": []}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        t1 = time.perf_counter()
        float(src.sum())
        t2 = time.perf_counter()
        if i:  # the first run is a warm-up (page faults)
            out["copy"].append(2 * nbytes / (t1 - t0) / 1e9)
            out["read"].append(nbytes / (t2 - t1) / 1e9)
    return out


def weight_nbytes(model) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (a tied
    embedding is read once per step)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measure(
    model, prompt_length: int, batch_sizes: tuple[int, ...], steps: int, repeats: int = 3
) -> list[dict[str, Any]]:
    """Time prefill (batch 1, `prompt_length` random tokens, median of `repeats`) and
    decode (`steps` greedy steps per batch size, after 2 warm-up steps that also
    compile a `compile_decode`d step).

    Returns:
        one dict per row: phase ("prefill" / "decode"), batch, seconds (median prefill
        run / mean decode step), tokens_per_s; decode rows also bytes_per_step
        (weights + state of the batch) and gbs (bytes_per_step / seconds / 1e9).
    """
    import torch

    from ..engine import decode_step, prefill

    p = next(model.parameters())
    vocab, weights = model.config.vocab_size, weight_nbytes(model)
    gen = torch.Generator().manual_seed(0)

    def tokens(b: int, t: int):
        return torch.randint(3, vocab, (b, t), generator=gen).to(p.device)

    rows = []
    with torch.inference_mode():
        prompt = tokens(1, prompt_length)
        prefill(model, prompt[:, :16], progress=False)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            prefill(model, prompt, progress=False)
            _sync(p.device)
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        rows.append(
            {"phase": "prefill", "batch": 1, "seconds": s, "tokens_per_s": prompt_length / s}
        )
        for b in batch_sizes:
            logits, state = prefill(model, tokens(b, 8), progress=False)
            for i in range(2 + steps):
                if i == 2:
                    _sync(p.device)
                    t0 = time.perf_counter()
                logits, state = decode_step(model, logits.argmax(-1), state, donate=True)
            _sync(p.device)
            s = (time.perf_counter() - t0) / steps
            nbytes = weights + state.nbytes()
            rows.append(
                {
                    "phase": "decode",
                    "batch": b,
                    "seconds": s,
                    "tokens_per_s": b / s,
                    "bytes_per_step": nbytes,
                    "gbs": nbytes / s / 1e9,
                }
            )
    return rows


# ----------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------
def _model(args: argparse.Namespace):
    """The model to time: --preset with random weights (rgemma's initialisation), or
    the checkpoint of --model (the bundled model by default)."""
    if args.preset is None:
        return options.load_model_and_tokenizer(args, tokenizer=False)[0]
    import torch

    from ..config import GriffinConfig
    from ..errors import InputError
    from ..model import Griffin

    if args.model is not None:
        raise InputError("give either --model or --preset, not both")
    cfg = GriffinConfig.preset(args.preset)
    dtype = getattr(torch, args.dtype or "float32")
    model = Griffin(cfg, device="meta", dtype=dtype).to_empty(device=args.device or "cpu")
    with torch.no_grad():
        for t in model.parameters():  # what reset_parameters leaves: 0 (the final norm)
            t.zero_()
    torch.manual_seed(0)  # the device's own generator: a seeded CPU one cannot fill CUDA
    model.reset_parameters()
    return options.apply_speed_options(model.eval(), args)


def run(args: argparse.Namespace) -> int:
    """Run `rgemma bench`: print the table on stdout (the model and machine on
    stderr); returns 0.

    Raises:
        InputError: a count < 1, both --model and --preset, or a bad --device.
        ConfigError: an unknown --preset. CheckpointError: see --model.
    """
    for name in ("prompt_length", "steps", "repeats", "bandwidth_mib"):
        options.positive("--" + name.replace("_", "-"), getattr(args, name))
    options.setup_torch(args)
    import torch

    model = _model(args)
    p = next(model.parameters())
    source = getattr(model, "source", None) or {}
    what = f"preset {args.preset}, random weights" if args.preset else source.get("path")
    bw = measure_bandwidth(args.bandwidth_mib, device=p.device)
    bandwidth = max(statistics.median(bw["copy"]), statistics.median(bw["read"]))
    print(
        f"model: {what} ({sum(t.numel() for t in model.parameters()):,} parameters, "
        f"{str(p.dtype).removeprefix('torch.')}"
        f"{f', {args.quantize} weights' if args.quantize else ''}{', compiled decode' if args.compile else ''}"
        f"); {p.device}, {torch.get_num_threads()} thread"
        f"{'s' * (torch.get_num_threads() != 1)}\n"
        f"weights {weight_nbytes(model) / 1e6:,.1f} MB, state {model.state_nbytes(1) / 1e6:.2f} "
        f"MB per sequence; memory bandwidth {bandwidth:.1f} GB/s (copy and sum of "
        f"{args.bandwidth_mib} MiB)\n",
        file=sys.stderr,
    )
    rows = measure(model, args.prompt_length, args.batch_sizes, args.steps, args.repeats)
    head = ["phase", "batch", "tokens/s", "ms/step", "GB/s", "of bandwidth"]
    table = [head]
    for r in rows:
        decode = r["phase"] == "decode"
        table.append(
            [
                r["phase"] if decode else f"prefill {args.prompt_length}",
                f"{r['batch']}",
                f"{r['tokens_per_s']:,.1f}",
                f"{1000 * r['seconds']:.2f}" if decode else "-",
                f"{r['gbs']:.1f}" if decode else "-",
                f"{100 * r['gbs'] / bandwidth:.0f}%" if decode else "-",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        options.write("  ".join(cells) + "\n")
    from .. import ops

    kernels = "; ".join(f"{k}: {v}" for k, v in ops.describe(p.device, why=True).items())
    print(f"\nkernels: {kernels}", file=sys.stderr)
    print(
        "\nGB/s: weights + state read per decode step / step time.\n"
        "Compare with the official and HF implementations: python benchmarks/run_all.py",
        file=sys.stderr,
    )
    return 0
