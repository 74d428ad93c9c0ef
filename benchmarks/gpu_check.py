#!/usr/bin/env python
"""The one prepared GPU check: kernels, exactness and speed on one NVIDIA GPU.

    python benchmarks/gpu_check.py                 # on the GPU: about 8 minutes on one H200
    python benchmarks/gpu_check.py --smoke         # on CPU at tiny shapes, seconds

Sections, in order, each written to benchmarks/results/gpu/ (gpu_check.json and
gpu_check.md, rewritten after every section, so a run cut short keeps what it did):

1. machine: GPU, memory, torch / CUDA / Triton versions, what each op resolves to,
   the measured device-to-device copy bandwidth beside the GPU's nominal HBM figure.
2. kernels: `pytest tests/ops` on real CUDA (the Triton kernels as compiled kernels).
3. parity: the model on the GPU (Triton scan and Conv1D, fused attention) against
   the CPU float32 reference (`ops.use("ref")`), all block kinds, on packed documents
   (resets), left padding, chunked continuation from a state and decode steps:
   max |logit| and |state| differences; float32 must be within 1e-4, bfloat16 is
   reported beside the official torch code's own bfloat16-vs-float32 difference.
4. prefill: tok/s at 2k, 8k, 32k and 128k tokens (batch 1) on the reduced-2B
   (2B widths, 6 layers) and full 2B shapes in bfloat16: rgemma, the official torch
   code and HF RecurrentGemma on the same weights (benchmarks/peers.py), with peak
   memory. A measurement whose estimate (from the previous length) passes the time
   cap, or that runs out of memory, is recorded as skipped with the reason.
5. decode: tok/s at batch 1, 8 and 64 (rgemma eager and with a CUDA-graph
   `compile_decode(mode="reduce-overhead")`, official, HF), peak memory, and decode's
   share of HBM bandwidth: (weight bytes + state bytes) per step / step time, against
   both the nominal and the measured bandwidth.
6. train: one training step (forward + backward) at 8k tokens, rgemma against HF.

`--smoke` runs every section on CPU at tiny shapes and lengths (what
tests/test_gpu_check.py runs), so the script is known to work before a GPU session.
Per the developers' guide: peers measured in the same run, ratios against them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))

import torch

from benchmarks import peers
from rgemma import ops
from rgemma.cli.bench import weight_nbytes
from rgemma.config import GriffinConfig, griffin_pattern
from rgemma.engine import compile_decode, decode_step, prefill

#: Nominal HBM bandwidth (bytes/s) by GPU name fragment, for decode's share.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}
K = 1024


@dataclasses.dataclass
class Plan:
    """What a run measures: the GPU plan, or the tiny CPU plan of `--smoke`."""

    device: str
    shapes: dict[str, GriffinConfig]
    prefill_lengths: list[int]
    decode_batches: list[int]
    decode_steps: int
    train_length: int
    parity_config: GriffinConfig
    measure_cap_s: float  # skip a measurement estimated to take longer than this
    budget_s: float  # the whole run
    kernel_tests: bool
    prefill_chunk: int = 1024  # tokens per prefill call (`rgemma.engine.prefill`)


def tiny_config(vocab: int = 512, window: int = 16) -> GriffinConfig:
    """Every block kind (R, R, A) at toy widths."""
    return GriffinConfig(
        vocab_size=vocab,
        width=64,
        mlp_expanded_width=96,
        num_heads=2,
        lru_width=64,
        block_types=griffin_pattern(3),
        attention_window_size=window,
    )


def make_plan(smoke: bool, budget_s: float) -> Plan:
    if smoke:
        return Plan(
            device="cpu",
            shapes={"tiny": tiny_config()},
            prefill_lengths=[32, 64],
            decode_batches=[1, 2],
            decode_steps=2,
            train_length=32,
            parity_config=tiny_config(window=8),
            measure_cap_s=10.0,
            budget_s=budget_s,
            kernel_tests=False,
        )
    return Plan(
        device="cuda",
        shapes={
            "reduced-2b": GriffinConfig.preset("recurrentgemma-2b-6l"),
            "2b": GriffinConfig.preset("recurrentgemma-2b"),
        },
        prefill_lengths=[2 * K, 8 * K, 32 * K, 128 * K],
        decode_batches=[1, 8, 64],
        decode_steps=64,
        train_length=8 * K,
        # All block kinds, 2B head layout, a window short enough that packed
        # documents, padding and continuation all cross it.
        parity_config=GriffinConfig(
            vocab_size=4096,
            width=512,
            mlp_expanded_width=1536,
            num_heads=4,
            lru_width=512,
            block_types=griffin_pattern(6),
            attention_window_size=128,
        ),
        measure_cap_s=25.0,
        budget_s=budget_s,
        kernel_tests=True,
        prefill_chunk=8192,  # a GPU wants big calls; activations stay ~0.3 GB at 2B
    )


# ----------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(), synchronised on the GPU."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------------
# The implementations on one set of weights
# ----------------------------------------------------------------------------------
class Impl:
    """One implementation: prefill a prompt from nothing, then decode greedily."""

    name = ""

    def prefill(self, tokens: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def state_bytes(self) -> int:
        return 0


class RgemmaImpl(Impl):
    def __init__(self, model, name: str = "rgemma", chunk: int = 1024):
        self.model, self.name, self.chunk = model, name, chunk
        self.state = self.next = None

    def prefill(self, tokens):
        logits, self.state = prefill(self.model, tokens, chunk_size=self.chunk, progress=False)
        self.next = logits.argmax(-1)

    def step(self):
        logits, self.state = decode_step(self.model, self.next, self.state)
        self.next = logits.argmax(-1)

    def state_bytes(self):
        return self.state.nbytes() if self.state is not None else 0


class OfficialImpl(Impl):
    """`recurrentgemma.torch.Griffin` as its sampler drives it."""

    name = "official"

    def __init__(self, model):
        self.model = model
        self.cache = self.pos = self.next = None

    def prefill(self, tokens):
        b, t = tokens.shape
        pos = torch.arange(t, device=tokens.device)[None].expand(b, -1)
        cache = None
        if t > 1:
            _, cache = self.model(tokens[:, :-1], pos[:, :-1], None, return_logits=False)
        logits, self.cache = self.model(tokens[:, -1:], pos[:, -1:], cache)
        self.pos = torch.full((b, 1), t, device=tokens.device)
        self.next = logits[:, -1].argmax(-1, keepdim=True)

    def step(self):
        logits, self.cache = self.model(self.next, self.pos, self.cache)
        self.pos = self.pos + 1
        self.next = logits[:, -1].argmax(-1, keepdim=True)


class HFImpl(Impl):
    """HF `RecurrentGemmaForCausalLM` with its own cache, as `generate` calls it."""

    name = "hf"

    def __init__(self, model):
        self.model = model
        self.cache = self.next = None
        self.pos = 0

    def _forward(self, tokens, start):
        b, t = tokens.shape
        pos = (torch.arange(t, device=tokens.device) + start)[None].expand(b, -1)
        out = self.model(input_ids=tokens, position_ids=pos, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def prefill(self, tokens):
        p = self.model.model.embed_tokens.weight
        self.model._setup_cache(self.model.config, tokens.shape[0], p.device, p.dtype)
        self.next = self._forward(tokens, 0).argmax(-1, keepdim=True)
        self.pos = tokens.shape[1]

    def step(self):
        self.next = self._forward(self.next, self.pos).argmax(-1, keepdim=True)
        self.pos += 1


_IMPLS: dict[str, list[Impl]] = {}  # per shape, built once for prefill and decode


def build_impls(plan: Plan, shape: str, log) -> list[Impl]:
    """rgemma (eager, and on CUDA a CUDA-graph compiled decode step), the official
    torch code and HF, all on rgemma's random weights (peers.random_griffin) in
    bfloat16; built once per shape."""
    if shape in _IMPLS:
        return _IMPLS[shape]
    _IMPLS.clear()  # one shape's models at a time
    cfg, device = plan.shapes[shape], plan.device
    model = peers.random_griffin(cfg, "bfloat16", seed=0).to(device)
    impls: list[Impl] = [RgemmaImpl(model, chunk=plan.prefill_chunk)]
    if device == "cuda":
        graphs = compile_decode(_shallow_copy(model), mode="reduce-overhead")
        impls.append(RgemmaImpl(graphs, "rgemma-graphs"))
    for label, build, wrap in (
        ("official", peers.official_model, OfficialImpl),
        ("hf", peers.hf_model, HFImpl),
    ):
        try:
            sd = {k: v.clone() for k, v in model.state_dict().items()}
            impls.append(wrap(build(cfg, sd)))
        except Exception as err:  # noqa: BLE001 - a missing peer is reported, not fatal
            log(f"  {label}: not available ({type(err).__name__}: {str(err)[:120]})")
    _IMPLS[shape] = impls
    return impls


def _shallow_copy(model):
    """A second Griffin object sharing the parameters (so `compile_decode` on it
    leaves the eager one as it is)."""
    import copy

    clone = copy.copy(model)
    clone.__dict__ = dict(model.__dict__)
    clone.__dict__.pop("decode_step", None)
    return clone


def random_tokens(b: int, t: int, vocab: int, device: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, t), generator=g).to(device)


# ----------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------
def section_machine(plan: Plan, log) -> dict[str, Any]:
    import importlib.util

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "triton": None,
        "ops": ops.describe(plan.device),
    }
    if importlib.util.find_spec("triton") is not None:
        import triton

        out["triton"] = triton.__version__
    if plan.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(
            gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count
        )
        out["nominal_bandwidth"] = next(
            (bw for key, bw in NOMINAL_BANDWIDTH.items() if key in p.name), None
        )
        n = 2**28  # 1 GiB of float32 per buffer
        src, dst = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        dst.copy_(src)
        times = [timed(lambda: dst.copy_(src), "cuda")[0] for _ in range(5)]
        out["measured_bandwidth"] = 2 * 4 * n / sorted(times)[2]  # read + write
        del src, dst
    log(f"  {json.dumps(out, default=str)}")
    return out


def section_kernels(plan: Plan, log) -> dict[str, Any]:
    if not plan.kernel_tests:
        return {"skipped": "--smoke: the kernel tests run in the ordinary test suite"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops"],
        cwd=HERE.parent,
        check=False,
        capture_output=True,
        text=True,
        timeout=150,
    )
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    log(f"  pytest tests/ops: {tail[0]} (rc {proc.returncode})")
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    return {
        "returncode": proc.returncode,
        "summary": tail[0],
        "failed": failures[:40],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _parity_inputs(cfg: GriffinConfig, device: str):
    """Packed documents and left padding in one batch: (tokens, segment_pos) (2, 3w)."""
    w = cfg.attention_window_size
    t = 3 * w
    tokens = random_tokens(2, t, cfg.vocab_size, "cpu", seed=7)
    pos = torch.stack([torch.arange(t), torch.arange(t) - w // 2]).clamp(min=-1)
    pos[0, 2 * w :] = torch.arange(t - 2 * w)  # a second document starts in row 0
    return tokens, pos


def _max_diff(a, b) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def _state_diff(s1, s2) -> float:
    return max(_max_diff(x, y) for b1, b2 in zip(s1.blocks, s2.blocks) for x, y in zip(b1, b2))


def _run_model(model, tokens, pos, device):
    """Logits of: one call over (tokens, pos); a chunked continuation (the first
    half, then the rest from its state); 4 greedy decode steps from the state."""
    tokens, pos = tokens.to(device), pos.to(device)
    with torch.no_grad():
        full, state = model(tokens, pos)
        h = tokens.shape[1] // 2
        _, mid = model(tokens[:, :h], pos[:, :h])
        rest, state2 = model(tokens[:, h:], pos[:, h:], mid)
        steps, s = [], state
        nxt = full[:, -1].argmax(-1)
        for _ in range(4):
            lg, s = model.decode_step(nxt, s)
            steps.append(lg)
            nxt = lg.argmax(-1)
    return {"full": full, "chunked": rest, "decode": torch.stack(steps, 1)}, state, state2, s


def section_parity(plan: Plan, log) -> dict[str, Any]:
    cfg, device = plan.parity_config, plan.device
    tokens, pos = _parity_inputs(cfg, device)
    base = peers.random_griffin(cfg, "float32", seed=3)
    with ops.use("ref"):  # the specification, on CPU in float32
        ref, ref_state, ref_state2, ref_dec = _run_model(base, tokens, pos, "cpu")
    out: dict[str, Any] = {"config": dataclasses.asdict(cfg) | {"block_types": "R,R,A x2"}}
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
        torch.backends.cudnn.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = peers.random_griffin(cfg, name, seed=3).to(device)
        got, st, st2, dec = _run_model(model, tokens, pos, device)
        row = {k: _max_diff(got[k], ref[k]) for k in ref}
        row["state"] = _state_diff(st, ref_state)
        row["state_chunked"] = _state_diff(st2, ref_state2)
        row["state_decode"] = _state_diff(dec, ref_dec)
        row["ops"] = ops.describe(device)
        out[name] = row
        log(f"  {name}: {json.dumps({k: v for k, v in row.items() if k != 'ops'})}")
    # The official torch code's own bfloat16-vs-float32 logits difference (no padding:
    # its prefill does not take left padding), the bar for rgemma's bfloat16.
    try:
        sd32 = base.state_dict()
        o32 = peers.official_model(cfg, {k: v.clone() for k, v in sd32.items()})
        o16 = peers.official_model(cfg, {k: v.to(torch.bfloat16) for k, v in sd32.items()})
        t = tokens[:1]
        p = torch.arange(t.shape[1])[None]
        with torch.no_grad():
            l32, _ = o32(t, p)
            l16, _ = o16(t, p)
            r16, _ = peers.random_griffin(cfg, "bfloat16", seed=3).to(device)(
                t.to(device), p.to(device)
            )
        out["official_bf16_vs_f32"] = _max_diff(l16, l32)
        out["rgemma_bf16_vs_official_f32"] = _max_diff(r16, l32)
        log(
            f"  official bf16 vs f32: {out['official_bf16_vs_f32']:.4f}; "
            f"rgemma bf16 ({device}) vs official f32: {out['rgemma_bf16_vs_official_f32']:.4f}"
        )
    except Exception as err:  # noqa: BLE001 - the official package is a test oracle
        out["official_bf16_vs_f32"] = f"not available ({type(err).__name__}: {str(err)[:120]})"
    f32 = out["float32"]
    out["float32_within_1e-4"] = all(
        f32[k] <= 1e-4 for k in ("full", "chunked", "decode", "state", "state_chunked")
    )
    return out


class Skipper:
    """Skips a measurement estimated (linearly from the last one) to pass the cap,
    or any once the run's budget is nearly spent."""

    def __init__(self, plan: Plan, start: float):
        self.plan, self.start = plan, start
        self.last: dict[str, tuple[int, float]] = {}

    def why(self, key: str, size: int) -> str | None:
        left = self.plan.budget_s - (time.perf_counter() - self.start)
        if left < 20:
            return f"run budget nearly spent ({left:.0f} s left)"
        if key in self.last:
            n, secs = self.last[key]
            est = secs * size / n
            if est > min(self.plan.measure_cap_s, left - 15):
                return f"estimated {est:.0f} s (from {secs:.1f} s at {n})"
        return None

    def record(self, key: str, size: int, secs: float) -> None:
        self.last[key] = (size, secs)


def _measure(skip: Skipper, key: str, size: int, fn: Callable[[], float], device: str) -> dict:
    reason = skip.why(key, size)
    if reason:
        return {"skipped": reason}
    reset_peak(device)
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - recorded: the next measurement runs
        if not is_oom(err):
            return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
        skip.record(key, 1, float("inf"))
        return {"skipped": "out of memory"}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    skip.record(key, size, result["seconds"])
    result["peak_gib"] = peak_gib(device)
    return result


def section_prefill(plan: Plan, log, skip: Skipper) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for shape, cfg in plan.shapes.items():
        impls = build_impls(plan, shape, log)
        impls = [i for i in impls if i.name != "rgemma-graphs"]  # same prefill as rgemma
        rows: dict[str, Any] = {}
        for impl in impls:
            with torch.no_grad():  # warm-up (Triton autotuning, cuBLAS plans)
                impl.prefill(random_tokens(1, plan.prefill_lengths[0], cfg.vocab_size, plan.device))
            for n in plan.prefill_lengths:
                tokens = random_tokens(1, n, cfg.vocab_size, plan.device)

                def run(impl=impl, tokens=tokens, n=n):
                    with torch.no_grad():
                        wall, cpu = timed(lambda: impl.prefill(tokens), plan.device)
                    return {"seconds": wall, "cpu_seconds": cpu, "tok_s": n / wall}

                r = _measure(skip, f"prefill/{shape}/{impl.name}", n, run, plan.device)
                rows[f"{impl.name}@{n}"] = r
                log(f"  prefill {shape} {impl.name} {n}: {_fmt(r)}")
                impl.state = impl.cache = None
        out[shape] = rows
    return out


def section_decode(plan: Plan, log, skip: Skipper, bandwidth: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The last shape prefill built first: its models are still there.
    for shape, cfg in reversed(plan.shapes.items()):
        impls = build_impls(plan, shape, log)
        wbytes = weight_nbytes(impls[0].model)
        rows: dict[str, Any] = {}
        for impl in impls:
            for b in plan.decode_batches:
                steps = plan.decode_steps if impl.name.startswith("rgemma") else 16

                def run(impl=impl, b=b, steps=steps, cfg=cfg, wbytes=wbytes):
                    with torch.no_grad():
                        impl.prefill(random_tokens(b, 64, cfg.vocab_size, plan.device))
                        for _ in range(3):  # warm-up (compiles, captures the graph)
                            impl.step()
                        wall, cpu = timed(lambda: [impl.step() for _ in range(steps)], plan.device)
                    per_step = wall / steps
                    r = {"seconds": wall, "cpu_seconds": cpu, "tok_s": b / per_step}
                    moved = wbytes + 2 * impl.state_bytes()  # weights read, state read + written
                    for kind, bw in bandwidth.items():
                        if bw:
                            r[f"hbm_share_{kind}"] = moved / per_step / bw
                    impl.state = impl.cache = None
                    return r

                r = _measure(skip, f"decode/{shape}/{impl.name}/{b}", 1, run, plan.device)
                rows[f"{impl.name}@{b}"] = r
                log(f"  decode {shape} {impl.name} batch {b}: {_fmt(r)}")
        out[shape] = rows
    return out


def section_train(plan: Plan, log, skip: Skipper) -> dict[str, Any]:
    cfg = next(iter(plan.shapes.values()))
    n = plan.train_length
    tokens = random_tokens(1, n + 1, cfg.vocab_size, plan.device)
    out: dict[str, Any] = {"shape": next(iter(plan.shapes)), "tokens": n}
    model = peers.random_griffin(cfg, "bfloat16", seed=0).to(plan.device).requires_grad_(True)

    def rgemma_step():
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[0, 1:])
        loss.backward()

    steps = [("rgemma", rgemma_step)]
    try:
        hf = peers.hf_model(cfg, {k: v.detach().clone() for k, v in model.state_dict().items()})
        hf.train().requires_grad_(True)

        def hf_step():
            logits = hf(input_ids=tokens[:, :-1], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[0, 1:])
            loss.backward()

        steps.append(("hf", hf_step))
    except Exception as err:  # noqa: BLE001 - HF is a peer, reported if missing
        out["hf"] = {"error": f"not available ({type(err).__name__})"}
    for name, step in steps:

        def run(step=step):
            step()  # warm-up (autotuning)
            wall, cpu = timed(step, plan.device)
            return {"seconds": wall, "cpu_seconds": cpu, "tok_s": n / wall}

        out[name] = _measure(skip, f"train/{name}", n, run, plan.device)
        log(f"  train {name} {n}: {_fmt(out[name])}")
    return out


def _fmt(r: dict) -> str:
    if "tok_s" not in r:
        return r.get("skipped") or r.get("error", "?")
    s = f"{r['tok_s']:,.1f} tok/s ({r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU)"
    if r.get("peak_gib") is not None:
        s += f", peak {r['peak_gib']:.2f} GiB"
    if "hbm_share_nominal" in r:
        s += f", {100 * r['hbm_share_nominal']:.0f}% of nominal HBM"
    return s


# ----------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------
def write_report(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    lines = [f"# GPU check ({results.get('mode')})", "", f"`{results.get('command')}`", ""]
    m = results.get("machine", {})
    lines += [f"- {k}: {v}" for k, v in m.items() if k != "ops"] + [f"- ops: {m.get('ops')}", ""]
    if "kernels" in results:
        lines += [f"Kernel tests: {results['kernels']}", ""]
    if "parity" in results:
        p = results["parity"]
        lines += ["## Parity against the CPU float32 reference (max |difference|)", ""]
        lines += ["| dtype | full | chunked | decode | state | state chunked | state decode |"]
        lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
        for name in ("float32", "bfloat16"):
            if isinstance(p.get(name), dict):
                r = p[name]
                keys = ("full", "chunked", "decode", "state", "state_chunked", "state_decode")
                lines.append(f"| {name} | " + " | ".join(f"{r[k]:.2e}" for k in keys) + " |")
        lines += ["", f"official bfloat16 vs float32: {p.get('official_bf16_vs_f32')}", ""]
    for section in ("prefill", "decode"):
        for shape, rows in results.get(section, {}).items():
            lines += [f"## {section}, {shape}, bfloat16", "", "| impl @ size | result |"]
            lines += ["| --- | --- |"] + [f"| {k} | {_fmt(v)} |" for k, v in rows.items()] + [""]
            lines += _ratios(rows)
    if "train" in results:
        t = results["train"]
        lines += [f"## train step, {t.get('shape')}, {t.get('tokens')} tokens", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in t.items() if isinstance(v, dict)] + [""]
    if results.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()]
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _ratios(rows: dict[str, Any]) -> list[str]:
    """rgemma's tok/s over each peer's at the same size."""
    out = []
    for key, r in rows.items():
        impl, size = key.split("@")
        if not impl.startswith("rgemma") or "tok_s" not in r:
            continue
        for peer in ("official", "hf"):
            p = rows.get(f"{peer}@{size}", {})
            if "tok_s" in p:
                out.append(f"- {impl} / {peer} at {size}: {r['tok_s'] / p['tok_s']:.2f}x")
    return out + ([""] if out else [])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (seconds)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu", help="results folder")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    ap.add_argument(
        "--sections",
        default="machine,kernels,parity,prefill,decode,train",
        help="comma-separated subset of the sections",
    )
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.exit(2, "gpu_check: CUDA is not available here; use --smoke for the CPU dry run\n")
    plan = make_plan(args.smoke, args.budget)
    start = time.perf_counter()
    skip = Skipper(plan, start)
    if plan.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    results: dict[str, Any] = {
        "mode": "smoke (CPU, tiny shapes)" if args.smoke else "gpu",
        "command": " ".join(["python benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
        "errors": {},
    }

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in wanted:
        log(f"{name}")
        try:
            if name == "machine":
                results["machine"] = section_machine(plan, log)
            elif name == "kernels":
                results["kernels"] = section_kernels(plan, log)
            elif name == "parity":
                results["parity"] = section_parity(plan, log)
            elif name == "prefill":
                results["prefill"] = section_prefill(plan, log, skip)
            elif name == "decode":
                m = results.get("machine", {})
                bw = {
                    "nominal": m.get("nominal_bandwidth"),
                    "measured": m.get("measured_bandwidth"),
                }
                results["decode"] = section_decode(plan, log, skip, bw)
            elif name == "train":
                results["train"] = section_train(plan, log, skip)
            else:
                results["errors"][name] = "unknown section"
        except Exception as err:  # noqa: BLE001 - one failed section loses no other
            results["errors"][name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            log(f"  {name} failed: {results['errors'][name]}")
        with contextlib.suppress(Exception):
            write_report(results, args.out)
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    _IMPLS.clear()
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_report(results, args.out)
    log(f"done in {results['seconds']} s: {args.out / 'gpu_check.md'}")
    return results


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res.get("errors") else 0)
