"""CPU kernels of issue 16, before and after, on the reduced-2B shape (2B widths).

Each row times one kernel the way the model ran it before (the earlier code path,
rebuilt here or forced through `rgemma.ops.use`) and the way it runs now, alternated
in the same process on the same tensors; each figure is the best of `--repeats`
samples. Both wall time and process CPU time are printed: with 1 torch thread (the
default) CPU time is what the kernel cost this core, whatever else the machine runs,
so the before/after ratio holds on a shared machine. The CPU model and its ISA
features are printed first.

Rows:

* head GEMV (one row x (256000, 2560)): `F.linear` against `torch.mv`, and the kernel
  `ops.linear` ("tuned") measured and chose for this machine;
* logits soft-cap over (rows, 256000) float32: three passes with temporaries against
  one in-place chain on the fresh tensor;
* decode attention (window 2048, 10 heads of 256): the window concatenated with the
  new key, then the new window sliced and copied (before) against attention over the
  window and the new key apart plus one in-place ring-buffer write (now);
* first prefill chunk (1024 queries) against 2048 empty window slots, and skipping
  them;
* Conv1D over 1024 tokens: `unfold` against shifted multiply-adds;
* the RG-LRU gate math over 1024 tokens (sigmoids, decay, sqrt(1 - a^2), masks):
  `rglru_gates_ref` (one op per term) against `rglru_gates_fused` (in place, in
  cache-sized blocks);
* one decode step of a 3-block model (recurrent, recurrent, attention) at 2B widths.

Example (about a minute on 2 cores):

    python benchmarks/cpu_kernels.py --threads 1 --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import rgemma
from rgemma import ops
from rgemma.config import BlockType, GriffinConfig
from rgemma.model import Griffin
from rgemma.ops.attention import decode_attention_split, local_attention_ref
from rgemma.ops.conv1d import conv1d_ref, conv1d_shifted
from rgemma.ops.rglru import rglru_gates_fused, rglru_gates_ref
from rgemma.state import AttentionState

WIDTH, HEADS, HEAD_DIM, WINDOW, VOCAB, CHUNK = 2560, 10, 256, 2048, 256_000, 1024


def cpu_description() -> str:
    """'model name' and the ISA features that matter for bf16 / int8 kernels."""
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("unknown", "x86_64", ""):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
    have = [f for f in wanted if f in flags]
    return f"{name}; {os.cpu_count()} CPUs; features: {', '.join(have) or 'none of ' + str(wanted)}"


def timed(fn: Callable[[], object], min_seconds: float = 0.05) -> tuple[float, float]:
    """(wall, process CPU) seconds per call of fn over one sample of >= min_seconds."""
    fn()
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        calls += 1
        wall = time.perf_counter() - wall0
        if wall >= min_seconds:
            return wall / calls, (time.process_time() - cpu0) / calls


def compare(before: Callable, after: Callable, repeats: int) -> list[float]:
    """Alternate the two; best (wall, cpu) of each: [before wall, before cpu, after ...]."""
    best = [float("inf")] * 4
    for _ in range(repeats):
        for i, fn in enumerate((before, after)):
            wall, cpu = timed(fn)
            best[2 * i] = min(best[2 * i], wall)
            best[2 * i + 1] = min(best[2 * i + 1], cpu)
    return best


def row(name: str, before: str, after: str, t: list[float]) -> str:
    ms = [f"{x * 1e3:9.3f}" for x in t]
    return (
        f"| {name} | {before} | {ms[0]} / {ms[1]} | {after} | {ms[2]} / {ms[3]} "
        f"| {t[1] / t[3]:5.2f}x |"
    )


# ----------------------------------------------------------------------------------
# The earlier code paths, rebuilt for comparison
# ----------------------------------------------------------------------------------
def decode_attention_before(q, k, v, cache_k, cache_v, cache_pos, q_pos):
    """Concatenate the window with the new key, attend, keep the last w and copy."""
    b = q.shape[0]
    ctx_k = torch.cat([cache_k, k[:, None]], 1)
    ctx_v = torch.cat([cache_v, v[:, None]], 1)
    ctx_pos = torch.cat([cache_pos, q_pos[:, None]], 1)
    q_doc = torch.zeros(b, 1, dtype=torch.long)
    ctx_doc = torch.zeros_like(ctx_pos)
    out = local_attention_ref(
        q[:, None], ctx_k, ctx_v, q_pos[:, None], ctx_pos, q_doc, ctx_doc, WINDOW, WINDOW
    )
    new = [t[:, -WINDOW:].clone() for t in (ctx_k, ctx_v, ctx_pos)]
    return out, new


def decode_attention_after(q, k, v, cache_k, cache_v, cache_pos, q_pos):
    """Attention over window and new key apart, then one in-place slot write."""
    out = decode_attention_split(q, k, v, cache_k, cache_v, cache_pos, q_pos, WINDOW)
    rows, slot = torch.arange(q.shape[0]), q_pos.remainder(WINDOW)
    cache_k[rows, slot] = k
    cache_v[rows, slot] = v
    cache_pos[rows, slot] = q_pos
    return out


def bench_gemv(dtype, tag: str, repeats: int, g) -> None:
    """Head GEMV: the earlier fixed torch.mv against F.linear, and what "tuned" chose."""
    w = torch.randn(VOCAB, WIDTH, generator=g).to(dtype)
    x = torch.randn(1, WIDTH, generator=g).to(dtype)
    t = compare(lambda: torch.mv(w, x[0]), lambda: F.linear(x, w), repeats)
    print(row(f"head GEMV {tag}", "torch.mv", "F.linear", t))
    ops.linear(x, w)  # "tuned" measures this shape at its first call
    name = str(dtype).removeprefix("torch.")
    chosen = [v for k, v in ops.describe(why=True).items() if f"{name} ({VOCAB}, {WIDTH})" in k]
    print(f"| `ops.linear` (tuned) chose, {tag} | | | {chosen[0] if chosen else '-'} | | |")


def bench_softcap(dtype, tag: str, b: int, repeats: int, g) -> None:
    lg = torch.randn(b, VOCAB, generator=g).to(dtype) * 10

    def before():
        out = lg.float()
        return torch.tanh(out / 30.0) * 30.0

    def after():
        out = lg.float() if lg.dtype != torch.float32 else lg.clone()
        return out.div_(30.0).tanh_().mul_(30.0)

    print(row(f"soft-cap {tag}, {b} rows", "3 passes", "in place", compare(before, after, repeats)))


def bench_decode_attention(dtype, tag: str, b: int, repeats: int, g) -> None:
    q = torch.randn(b, HEADS, HEAD_DIM, generator=g).to(dtype) / 16
    k, v = (torch.randn(b, HEAD_DIM, generator=g).to(dtype) for _ in "kv")
    ck, cv = (torch.randn(b, WINDOW, HEAD_DIM, generator=g).to(dtype) for _ in "kv")
    cpos = (torch.arange(WINDOW) + 5000 - WINDOW).repeat(b, 1)
    qpos = torch.full((b,), 5000)
    t = compare(
        lambda: decode_attention_before(q, k, v, ck, cv, cpos, qpos),
        lambda: decode_attention_after(q, k, v, ck, cv, cpos.clone(), qpos),
        repeats,
    )
    print(row(f"decode attention {tag}, batch {b}", "concat + copy", "split + ring write", t))


def bench_prefill_chunk(dtype, tag: str, repeats: int, g) -> None:
    """The first chunk of a fresh prefill: against 2048 empty slots, or only itself."""
    q = torch.randn(1, CHUNK, HEADS, HEAD_DIM, generator=g).to(dtype) / 16
    k, v = (torch.randn(1, CHUNK, HEAD_DIM, generator=g).to(dtype) for _ in "kv")
    pos = torch.arange(CHUNK)[None]
    doc = torch.ones_like(pos)
    empty = torch.zeros(1, WINDOW, HEAD_DIM, dtype=dtype)
    ctx_k, ctx_v = torch.cat([empty, k], 1), torch.cat([empty, v], 1)
    ctx_pos = torch.cat([torch.full((1, WINDOW), -1), pos], 1)
    ctx_doc = torch.cat([torch.zeros(1, WINDOW, dtype=torch.long), doc], 1)
    t = compare(
        lambda: ops.local_attention(q, ctx_k, ctx_v, pos, ctx_pos, doc, ctx_doc, WINDOW, WINDOW),
        lambda: ops.local_attention(q, k, v, pos, pos, doc, doc, WINDOW, 0),
        repeats,
    )
    print(row(f"prefill chunk of {CHUNK}, attention {tag}", "+2048 empty", "skipped", t))


def bench_conv1d(dtype, tag: str, repeats: int, g) -> None:
    x = torch.randn(1, CHUNK, WIDTH, generator=g).to(dtype)
    pos = torch.arange(CHUNK)[None]
    st = torch.zeros(1, 3, WIDTH, dtype=dtype)
    w, b = torch.randn(4, WIDTH, generator=g).to(dtype), torch.zeros(WIDTH, dtype=dtype)
    t = compare(
        lambda: conv1d_ref(x, pos, st, w, b), lambda: conv1d_shifted(x, pos, st, w, b), repeats
    )
    print(row(f"Conv1D, {CHUNK} tokens {tag}", "unfold", "shifted", t))


def bench_rglru_gates(dtype, tag: str, repeats: int, g) -> None:
    """The RG-LRU gate math of a 1024-token prefill chunk (one document start)."""
    x, gate_x, gate_a = (torch.randn(1, CHUNK, WIDTH, generator=g).to(dtype) for _ in "xia")
    a_param = torch.randn(WIDTH, generator=g).to(dtype)
    pos = torch.arange(CHUNK)[None]
    args = (x, gate_x, gate_a, a_param, pos, None)
    t = compare(lambda: rglru_gates_ref(*args), lambda: rglru_gates_fused(*args), repeats)
    print(row(f"RG-LRU gate math, {CHUNK} tokens {tag}", "one op per term", "fused", t))


def bench_decode_step(model: Griffin, tag: str, b: int, repeats: int) -> None:
    """One decode step with a full window (the cost at any position past 2048)."""
    state = model.init_state(b)
    for s in state.blocks:
        if isinstance(s, AttentionState):
            p = torch.arange(3000 - WINDOW, 3000)
            s.positions[:, p % WINDOW] = p
            s.keys.normal_()
            s.values.normal_()
    state = state._replace(next_pos=torch.full((b,), 3000))
    tokens = torch.randint(0, VOCAB, (b,))
    box = [state.select(list(range(b)))]

    def before():  # the concatenating attention and a new state every step
        with ops.use(decode_attention="ref"):
            return model.decode_step(tokens, state)

    def after():  # the state donated: its window written in place
        box[0] = model.decode_step(tokens, box[0], donate=True)[1]

    t = compare(before, after, repeats)
    print(row(f"decode step {tag}, batch {b} (3 blocks)", "concat, new state", "donated", t))


#: The rows `--only` can choose.
ROWS = ("gemv", "softcap", "attention", "chunk", "conv1d", "rglru", "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batches", default="1,8,64", help="decode batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-step", action="store_true", help="no whole decode step")
    parser.add_argument(
        "--only",
        default=",".join(ROWS),
        help=f"comma-separated rows to run, from {','.join(ROWS)} (default: all)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    only = set(args.only.split(","))
    if only - set(ROWS):
        parser.error(f"--only: unknown rows {sorted(only - set(ROWS))}; choose from {ROWS}")
    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, rgemma {rgemma.__version__}, {args.threads} thread(s)")
    print(f"times: ms per call, wall / process CPU, best of {args.repeats} alternated samples")
    print()
    print("| kernel | before | ms | now | ms | CPU-time speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    g = torch.Generator().manual_seed(0)
    cfg = dataclasses.replace(
        GriffinConfig.preset("recurrentgemma-2b"),
        block_types=(BlockType.RECURRENT, BlockType.RECURRENT, BlockType.ATTENTION),
    )
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        tag = {"bfloat16": "bf16", "float32": "fp32"}.get(name, name)
        with torch.no_grad():
            if "gemv" in only:
                bench_gemv(dtype, tag, args.repeats, g)
            for b in batches if "softcap" in only else []:
                bench_softcap(dtype, tag, b, args.repeats, g)
            for b in batches if "attention" in only else []:
                bench_decode_attention(dtype, tag, b, args.repeats, g)
            if "chunk" in only:
                bench_prefill_chunk(dtype, tag, args.repeats, g)
            if "conv1d" in only:
                bench_conv1d(dtype, tag, args.repeats, g)
            if "rglru" in only:
                bench_rglru_gates(dtype, tag, args.repeats, g)
            if "step" in only and not args.skip_step:
                model = Griffin(cfg, dtype=dtype).eval()
                for b in batches:
                    bench_decode_step(model, tag, b, args.repeats)
                del model


if __name__ == "__main__":
    main()
