"""Training step: rgemma against HF RecurrentGemma on this CPU, per core (issue 12).

One step is forward + backward + AdamW on a batch of random tokens (one document per
row, next-token loss on every position), float32 parameters, in float32 or under
bf16 autocast, for both implementations:

* rgemma: `training.objective.LMObjective` (the trunk, then the fused chunked head +
  loss `ops.linear_cross_entropy`), loss = NLL sum / tokens;
* HF: `RecurrentGemmaForCausalLM(input_ids, use_cache=False)`, then
  `F.cross_entropy` over its float32-cast soft-capped logits (what its
  `labels=` loss computes, on the same targets as rgemma's).

Both hold the same weights (rgemma's initialisation, handed to HF as an
official-format state_dict by `benchmarks.peers`) and use `torch.optim.AdamW`
(lr 1e-4, CPU for-loop implementation); the two losses are printed (they agree to
the dtype's rounding). Runs alternate (rgemma, HF, HF, rgemma, ...) in one process
so load from other jobs falls on both alike: first `--rounds` steps each at 1 torch
thread, timed by process CPU time (what the step cost one core, which other jobs on
a shared machine barely move), then `--rounds` steps each at `--wall-threads`
threads, timed by wall clock. Tokens/s are batch x length / median step time.

Peak memory: each (implementation, dtype) in a subprocess of its own that builds only
that model, runs a warm-up step (AdamW's state and lazy initialisations), resets the
kernel's resident-set high-water mark (`/proc/self/clear_refs`, Linux) and reads it
after one more step (`VmHWM`): the peak resident memory of a step, weights,
gradients and optimizer state included (both processes import transformers, so the
libraries weigh the same). tracemalloc does not see torch's allocator.

Shapes (window 2,048, MLP 3 x width, head dim 128, the Griffin pattern R, R, A of
`--layers` blocks):

* small: width 256, 2 heads, vocabulary 4,096, 8 x 512 tokens;
* large: width 512, 4 heads, vocabulary 32,000, 4 x 1,024 tokens.

`--ops` adds the kernels of the step against their references at the large shape
(the RG-LRU scan, the head + loss, the attention prefill; forward and forward +
backward, 1 thread, CPU time, best of `--op-repeats`).

    python benchmarks/train_vs_hf.py                       # both shapes, 6 layers, ~15 min
    python benchmarks/train_vs_hf.py --shapes small --layers 3 --rounds 2 --no-memory

Prints the table and writes `train_vs_hf.json` and `train_vs_hf.png` under `--out`
(default benchmarks/results/train_vs_hf/).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers
from benchmarks.machine import measure_machine
from rgemma.config import BlockType, GriffinConfig, griffin_pattern
from rgemma.training.objective import LMObjective

OUT = Path(__file__).resolve().parent / "results" / "train_vs_hf"
IMPLS = ("rgemma", "hf")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A benchmark shape: the model's widths and the batch."""

    name: str
    width: int
    heads: int
    vocab: int
    batch: int
    length: int

    def config(self, layers: int) -> GriffinConfig:
        return GriffinConfig(
            vocab_size=self.vocab,
            width=self.width,
            mlp_expanded_width=3 * self.width,
            num_heads=self.heads,
            lru_width=self.width,
            block_types=griffin_pattern(layers),
            attention_window_size=2048,
        )

    @property
    def tokens(self) -> int:
        return self.batch * self.length


SHAPES = {
    "small": Shape("small", width=256, heads=2, vocab=4096, batch=8, length=512),
    "large": Shape("large", width=512, heads=4, vocab=32_000, batch=4, length=1024),
}


def batch(shape: Shape, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tokens: inputs, next-token targets, positions (one document per row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.length + 1), generator=g)
    return {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_pos": torch.arange(shape.length).expand(shape.batch, shape.length),
        "loss_mask": torch.ones(shape.batch, shape.length),
    }


class Trainer:
    """One implementation's model, optimizer and batch; `step()` runs one training
    step and returns the loss (float)."""

    def __init__(self, impl: str, cfg: GriffinConfig, shape: Shape, dtype: str, seed: int):
        self.impl, self.dtype = impl, dtype
        if impl == "rgemma":
            self.model = LMObjective(peers.random_griffin(cfg, "float32", seed))
        else:
            self.model = peers.hf_model(cfg, peers.random_state_dict(cfg, "float32", seed))
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, foreach=False)
        self.batch = batch(shape)
        self.vocab = cfg.vocab_size

    def _loss(self) -> torch.Tensor:
        b = self.batch
        if self.impl == "rgemma":
            nll_sum, _ = self.model(b["tokens"], b["segment_pos"], b["targets"], b["loss_mask"])
            return nll_sum / b["loss_mask"].sum()
        logits = self.model(input_ids=b["tokens"], use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), b["targets"].reshape(-1))

    def step(self) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            loss = self._loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def timed(fn) -> tuple[float, float, Any]:
    """(process CPU seconds, wall seconds, result) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - t0, out


def alternate(trainers: dict[str, Trainer], rounds: int) -> dict[str, list]:
    """{impl: [(cpu_s, wall_s, loss), ...]}: `rounds` steps each, the order flipped
    every round."""
    runs: dict[str, list] = {name: [] for name in trainers}
    for r in range(rounds):
        for name in list(trainers)[:: 1 if r % 2 == 0 else -1]:
            runs[name].append(timed(trainers[name].step))
    return runs


def step_matmul_flops(cfg: GriffinConfig, shape: Shape) -> float:
    """Matmul FLOPs of one training step: every weight matrix (the block-diagonal
    RG-LRU gates as heads x (e/h)^2) and the tied head, 2 FLOPs per multiply-add per
    token, times 3 (forward, and the two matmuls of its backward); attention's scores
    and values over the causal window, times 3. Conv1D, norms and element-wise work
    are not matmuls and are left out."""
    d, e, m, v = cfg.width, cfg.lru_width, cfg.mlp_expanded_width, cfg.vocab_size
    per_token = d * v  # head
    for bt in cfg.block_types:
        per_token += 3 * d * m  # MLP: two up-projections, one down
        if bt == BlockType.RECURRENT:
            per_token += 3 * d * e + 2 * e * e // cfg.num_heads
        else:
            per_token += 2 * d * d + 2 * d * cfg.head_dim
    flops = 3 * 2.0 * per_token * shape.tokens
    keys = sum(min(i + 1, cfg.attention_window_size + 1) for i in range(shape.length))
    n_attn = sum(bt == BlockType.ATTENTION for bt in cfg.block_types)
    flops += 3 * n_attn * shape.batch * 2 * 2 * keys * d
    return flops


# ----------------------------------------------------------------------------------
# Peak memory, one subprocess per (implementation, dtype)
# ----------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(args: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: build one implementation, warm up, then the peak resident
    memory of one step (bytes), the resident memory before it and before the model
    (the libraries alone)."""
    import transformers  # noqa: F401  (both processes carry the same libraries)

    torch.set_num_threads(args["threads"])
    libraries = _status_kib("VmRSS")
    shape = SHAPES[args["shape"]]
    trainer = Trainer(args["impl"], shape.config(args["layers"]), shape, args["dtype"], 0)
    trainer.step()
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    trainer.step()
    return {
        "rss_libraries": libraries * 1024,  # the interpreter, torch, transformers
        "rss_before": before * 1024,
        "peak": _status_kib("VmHWM") * 1024,
    }


def measure_memory(impl: str, dtype: str, shape: str, layers: int, threads: int) -> dict:
    args = {"impl": impl, "dtype": dtype, "shape": shape, "layers": layers, "threads": threads}
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-worker", json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------
# The kernels of the step against their references (--ops)
# ----------------------------------------------------------------------------------
def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    return min(timed(fn)[0] for _ in range(repeats))


def _forward(fn, inputs: list[torch.Tensor], amp: bool = False):
    """A call of fn(*inputs) without autograd (under bf16 autocast if `amp`)."""

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            fn(*inputs)

    return run


def _forward_backward(fn, inputs: list[torch.Tensor], n_grad: int, amp: bool = False):
    """fn(*inputs) and the backward of its (first) output's sum, the first `n_grad`
    inputs differentiated."""

    def run():
        args = [x.detach().requires_grad_() if i < n_grad else x for i, x in enumerate(inputs)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def measure_ops(repeats: int) -> list[dict[str, Any]]:
    """Forward and forward + backward CPU seconds of each kernel and its reference at
    the large shape (1 thread)."""
    from rgemma.ops import attention as attn
    from rgemma.ops import loss as loss_ops
    from rgemma.ops import scan

    rows = []
    g = torch.Generator().manual_seed(0)

    def record(op, impl, dtype, fwd, bwd):
        rows.append({"op": op, "impl": impl, "dtype": dtype, "fwd_s": fwd, "fwd_bwd_s": bwd})
        f = "" if fwd is None else f"fwd {fwd * 1e3:8.1f} ms"
        print(f"  {op:<26} {impl:<27} {dtype:<9} {f:<16} fwd+bwd {bwd * 1e3:8.1f} ms", flush=True)

    # The RG-LRU scan over (4, 1024, 512).
    for dtype in ("float32", "bfloat16"):
        a = (torch.rand(4, 1024, 512, generator=g) * 0.5 + 0.5).to(getattr(torch, dtype))
        x = torch.randn(4, 1024, 512, generator=g).to(getattr(torch, dtype))
        for name, fn in (("ref", scan.linear_scan_ref), ("chunked", scan.linear_scan_chunked)):
            fwd = _best(_forward(fn, [a, x]), repeats)
            bwd = _best(_forward_backward(fn, [a, x], 2), repeats)
            record("scan (4, 1024, 512)", name, dtype, fwd, bwd)
    # The head + loss: 4,096 tokens, width 512, vocabulary 32,000, soft-cap 30.
    h = torch.randn(4096, 512, generator=g)
    w = torch.randn(32_000, 512, generator=g) * 0.1
    loss_inputs = [h, w, torch.randint(0, 32_000, (4096,), generator=g), torch.ones(4096)]
    for dtype in ("float32", "bfloat16"):
        amp = dtype == "bfloat16"
        for name, fn in (
            ("ref", loss_ops.linear_cross_entropy_ref),
            ("chunked", loss_ops.linear_cross_entropy_chunked),
        ):
            call = functools.partial(_capped, fn)
            fwd = _best(_forward(call, loss_inputs, amp), repeats)
            bwd = _best(_forward_backward(call, loss_inputs, 2, amp), repeats)
            record("head + loss (4096 x 32k)", name, dtype, fwd, bwd)
        # The other design: the forward keeps only the loss, the backward recomputes
        # the logits (emulated: a loss-only pass, then a pass with both gradients).
        cdt = torch.bfloat16 if amp else torch.float32
        both = functools.partial(_recompute, loss_inputs, cdt)
        record(
            "head + loss (4096 x 32k)",
            "chunked, recompute in bwd",
            dtype,
            None,
            _best(both, repeats),
        )
    # Attention from a fresh state: 4 x 1,024 queries, 4 heads of 128, one document
    # per row (causal) and four packed documents per row.
    for docs in (1, 4):
        pos = torch.arange(1024).expand(4, 1024).clone()
        for start in (300, 650, 900)[: docs - 1]:
            pos[:, start:] = torch.arange(1024 - start)
        doc = torch.cumsum((pos == 0).long(), dim=1)
        for dtype in ("float32", "bfloat16"):
            q = (torch.randn(4, 1024, 4, 128, generator=g) * 128**-0.5).to(getattr(torch, dtype))
            k, v = (torch.randn(4, 1024, 128, generator=g).to(q.dtype) for _ in range(2))
            inputs = [q, k, v, pos, pos, doc, doc, 2048, 0]
            for name, fn in (
                ("ref", attn.local_attention_ref),
                ("blocked", attn.local_attention_blocked),
            ):
                fwd = _best(_forward(fn, inputs), repeats)
                bwd = _best(_forward_backward(fn, inputs, 3), repeats)
                record(f"attention, {docs} doc(s) per row", name, dtype, fwd, bwd)
    return rows


def _capped(fn, h, w, targets, mask):
    return fn(h, w, targets, mask, 30.0)


def _recompute(inputs, compute_dtype):
    from rgemma.ops import loss as loss_ops

    h, w, targets, mask = inputs
    loss_ops._chunked(h, w, targets, mask, 30.0, 262, compute_dtype, False, False)
    loss_ops._chunked(h, w, targets, mask, 30.0, 262, compute_dtype, True, True)


# ----------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------
def median(runs: list, i: int) -> float:
    return statistics.median(r[i] for r in runs)


HEADER = (
    f"{'shape':<6} {'dtype':<9} {'rgemma tok/cpu-s':>16} {'HF tok/cpu-s':>13} {'x cpu':>6} "
    f"{'rgemma tok/s':>12} {'HF tok/s':>9} {'x wall':>6} {'rgemma GB':>9} {'HF GB':>6} "
    f"{'bound':>6}  loss rgemma / HF"
)


def row_text(r: dict[str, Any]) -> str:
    mem = r.get("memory", {})
    gb = {i: mem.get(i, {}).get("peak", float("nan")) / 1e9 for i in IMPLS}
    return (
        f"{r['shape']:<6} {r['dtype']:<9} {r['tok_per_cpu_s']['rgemma']:16.0f} "
        f"{r['tok_per_cpu_s']['hf']:13.0f} {r['x_cpu']:6.2f} {r['tok_per_s']['rgemma']:12.0f} "
        f"{r['tok_per_s']['hf']:9.0f} {r['x_wall']:6.2f} {gb['rgemma']:9.2f} {gb['hf']:6.2f} "
        f"{r['matmul_bound_share']:6.0%}  {r['loss']['rgemma']:.4f} / {r['loss']['hf']:.4f}"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = [f"{r['shape']}\n{r['dtype']}" for r in rows]
    xs = range(len(rows))
    panels = (
        ("tokens / CPU-second (1 thread)", lambda r, i: r["tok_per_cpu_s"][i]),
        ("tokens / s (wall)", lambda r, i: r["tok_per_s"][i]),
        (
            "peak memory of a step (GB)",
            lambda r, i: r.get("memory", {}).get(i, {}).get("peak", 0) / 1e9,
        ),
    )
    for ax, (title, value) in zip(axes, panels):
        for j, impl in enumerate(IMPLS):
            label = {"rgemma": "rgemma", "hf": "HF RecurrentGemma"}[impl]
            ax.bar(
                [x + 0.4 * j - 0.2 for x in xs], [value(r, impl) for r in rows], 0.4, label=label
            )
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("Training step (forward + backward + AdamW): rgemma vs HF RecurrentGemma")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="small,large", help="small, large or both")
    ap.add_argument("--layers", type=int, default=6, help="blocks (pattern R, R, A)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per impl and mode")
    ap.add_argument("--wall-threads", type=int, default=2, help="threads of the wall runs")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--ops", action="store_true", help="also time the kernels alone")
    ap.add_argument("--op-repeats", type=int, default=3)
    ap.add_argument("--out", default=str(OUT), help="directory for the JSON and the plot")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    torch.set_num_threads(1)
    machine = measure_machine(threads=1, bandwidth_mib=256, repeats=3)
    feats = machine["cpu_features"]
    print(
        f"CPU: {machine['cpu']}; {machine['cores_logical']} logical cores; load {machine['load_average']}"
    )
    print(
        f"flags: {' '.join(feats['flags'])}; torch {torch.__version__} -> {feats['torch_cpu_capability']}"
    )
    print(
        f"matmul per core: fp32 {machine['matmul_fp32_gflops_per_core']:.0f}, "
        f"bf16 {machine['matmul_bf16_gflops_per_core']:.0f} GFLOP/s"
    )
    peak = {
        "float32": machine["matmul_fp32_gflops_per_core"] * 1e9,
        "bfloat16": machine["matmul_bf16_gflops_per_core"] * 1e9,
    }
    record: dict[str, Any] = {"args": vars(args), "machine": machine, "rows": []}
    dtypes = [d for d in args.dtypes.split(",") if d]
    for shape_name in [s for s in args.shapes.split(",") if s]:
        shape = SHAPES[shape_name]
        cfg = shape.config(args.layers)
        blocks = "".join("A" if b == BlockType.ATTENTION else "R" for b in cfg.block_types)
        print(
            f"\n{shape_name}: width {shape.width}, vocabulary {shape.vocab}, {shape.batch} x "
            f"{shape.length} tokens, {args.layers} blocks ({blocks}), "
            f"{cfg.num_parameters() / 1e6:.1f}M parameters",
            flush=True,
        )
        for dtype in dtypes:
            trainers = {impl: Trainer(impl, cfg, shape, dtype, 0) for impl in IMPLS}
            torch.set_num_threads(1)
            for t in trainers.values():
                t.step()  # warm-up
            cpu_runs = alternate(trainers, args.rounds)
            torch.set_num_threads(args.wall_threads)
            wall_runs = alternate(trainers, args.rounds)
            torch.set_num_threads(1)
            del trainers
            gc.collect()
            cpu = {i: median(cpu_runs[i], 0) for i in IMPLS}
            wall = {i: median(wall_runs[i], 1) for i in IMPLS}
            row = {
                "shape": shape_name,
                "dtype": dtype,
                "layers": args.layers,
                "cpu_runs": cpu_runs,
                "wall_runs": wall_runs,
                "tok_per_cpu_s": {i: shape.tokens / cpu[i] for i in IMPLS},
                "tok_per_s": {i: shape.tokens / wall[i] for i in IMPLS},
                "x_cpu": cpu["hf"] / cpu["rgemma"],
                "x_wall": wall["hf"] / wall["rgemma"],
                "loss": {i: cpu_runs[i][0][2] for i in IMPLS},
                "matmul_flops": step_matmul_flops(cfg, shape),
            }
            row["matmul_bound_share"] = row["matmul_flops"] / peak[dtype] / cpu["rgemma"]
            if not args.no_memory:
                row["memory"] = {
                    i: measure_memory(i, dtype, shape_name, args.layers, args.wall_threads)
                    for i in IMPLS
                }
            record["rows"].append(row)
            print("  " + row_text(row), flush=True)
    if args.ops:
        print("\nkernels at the large shape (1 thread, CPU time, best of the repeats):")
        torch.set_num_threads(1)
        record["ops"] = measure_ops(args.op_repeats)

    print(f"\n{HEADER}\n" + "-" * len(HEADER))
    for row in record["rows"]:
        print(row_text(row))
    print(
        "x cpu / x wall: HF's step time over rgemma's (1-thread CPU time / "
        f"{args.wall_threads}-thread wall time); bound: rgemma's step at the matmul peak "
        "per core (matmul FLOPs / peak / CPU time); GB: peak resident memory of a step."
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_vs_hf.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    png = plot(record["rows"], out / "train_vs_hf.png") if record["rows"] else None
    print(f"wrote {out / 'train_vs_hf.json'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
