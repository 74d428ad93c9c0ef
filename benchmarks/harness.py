"""The benchmark harness: rgemma against the official `recurrentgemma.torch`, HF's
`RecurrentGemmaForCausalLM` and a Gemma transformer baseline (HF `GemmaForCausalLM`).

Everything runs on the same machine in the same run, on identical random weights
(rgemma's initialisation, handed to each implementation as a state_dict:
`benchmarks.peers`); the Gemma baseline gets random weights of the matched shape.
Every measurement runs in a worker subprocess (`benchmarks.worker`), so that its
peak resident memory can be read and a crash or an out-of-memory failure is
recorded, not fatal; shapes that cannot fit are refused *before* anything is
allocated, from an estimate made from the config (`benchmarks.machine`).

Sections (each a table, a plot and a part of `results.json`; `benchmarks.report`):

1. prefill: tokens/s and peak resident memory against prompt length;
2. decode: tokens/s against position, batch 1 and 8; and the paper's figure
   (Griffin, arXiv 2402.19427, figure 1b / RecurrentGemma figure 2): time to sample N
   tokens after a 2k prompt, integrated over the measured per-step times;
3. efficiency: weight bytes read per decode step / time per step, as a share of
   the measured memory bandwidth (the limit for batch-1 decode);
4. int8: decode speed-up of `quantize(model, "int8")` and its logit error;
5. bundled: the bundled small model, rgemma against HF on the same weights, and
   int8's perplexity change on its validation text (`rgemma.scoring`).

Decode at position P needs the state a P-token prompt leaves. By default
(`fill="synthetic"`) it is built directly, with random contents and the exact
shapes, dtypes and positions prefill would leave (rgemma / official: the fixed
window; HF Gemma: a P-token KV cache), since a decode step's cost depends on those
shapes only; `fill="prefill"` runs the real prefill (slow for long P).

Run `python benchmarks/run_all.py --help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.machine import (
    DEFAULT_RESERVE,
    IMPL_LABELS,
    IMPLS,
    BenchMemoryError,
    GiB,
    available_memory,
    check_memory,
    measure_machine,
    weight_bytes,
)
from benchmarks.peers import GemmaShape
from benchmarks.worker import run_worker
from rgemma.checkpoint import bundled_model_path
from rgemma.config import GriffinConfig, griffin_pattern
from rgemma.data import expand_paths
from rgemma.errors import RgemmaError

ROOT = Path(__file__).resolve().parent.parent


def _griffin_config(name: str) -> GriffinConfig:
    if name == "bench-tiny":
        # 256 wide, 3 layers (R, R, A), window 64: every code path in seconds.
        return GriffinConfig(
            vocab_size=4096,
            width=256,
            mlp_expanded_width=768,
            num_heads=2,
            lru_width=256,
            block_types=griffin_pattern(3),
            attention_window_size=64,
        )
    return GriffinConfig.preset(name)


#: shape name -> (Griffin preset, matched Gemma shape). The reduced shape keeps the
#: 2B widths with 6 of 26 layers; its Gemma baseline keeps the Gemma-2B widths with
#: 4 of 18 layers (about the same non-embedding parameters: 0.44 B against 0.47 B).
SHAPES: dict[str, tuple[str, GemmaShape]] = {
    "quick": (
        "bench-tiny",
        GemmaShape(
            vocab_size=4096,
            hidden_size=256,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=128,
            intermediate_size=2048,
        ),
    ),
    "reduced": ("recurrentgemma-2b-6l", GemmaShape(num_layers=4)),
    "full": ("recurrentgemma-2b", GemmaShape()),
}


@dataclasses.dataclass
class BenchOptions:
    """Everything a benchmark run needs (`benchmarks/run_all.py` fills it from its
    options; `for_shape` gives each shape's defaults)."""

    shape: str = "quick"
    preset: str | None = None  # override the Griffin config (no Gemma baseline then)
    dtype: str = "float32"
    impls: tuple[str, ...] = IMPLS
    sections: tuple[str, ...] = ("prefill", "decode", "int8", "bundled")
    prefill_lengths: tuple[int, ...] = (32, 128, 512)
    peer_prefill_lengths: tuple[int, ...] | None = None  # default: prefill_lengths
    prefill_repeats: int = 3
    decode_positions: tuple[int, ...] = (16, 64, 256)
    batches: tuple[int, ...] = (1, 8)
    decode_steps: int = 6
    fill: str = "synthetic"
    sample_prompt: int = 64
    sample_new: tuple[int, ...] = (16, 64, 128)
    sample_direct_max: int = 64  # also measure N <= this directly (validates the integral)
    int8_position: int = 256
    int8_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    bundled_path: str | None = None  # None: the bundled model
    val_paths: tuple[str, ...] | None = None  # None: configs/bundled.json's held-out split
    val_max_tokens: int = 4096
    max_seconds_per_point: float = 20.0  # skip a point whose one run is predicted longer
    target_seconds_per_point: float = 3.0  # stop repeating a point after this long
    bundled_positions: tuple[int, ...] = (16, 128)
    bundled_steps: int = 8
    threads: int | None = None
    memory_limit: int | None = None  # bytes; default: the available memory
    reserve: float = DEFAULT_RESERVE
    isolate: str = "impl"
    machine_bandwidth_mib: int = 256  # buffer size of the bandwidth test
    machine_matmul_n: int = 2048  # matrix size of the GFLOP/s test
    seed: int = 0
    out_dir: str = "benchmarks/results/quick"
    plots: bool = True
    command: str = ""

    @classmethod
    def for_shape(cls, shape: str, **overrides: Any) -> BenchOptions:
        """Defaults of a named run: "quick" (seconds), "reduced" (2B widths, 6 layers;
        ~20-25 min on 2 cores), "full" (the 2B preset)."""
        presets: dict[str, dict[str, Any]] = {
            "quick": {},
            "reduced": {
                "dtype": "bfloat16",
                "prefill_lengths": (128, 512, 2048, 8192, 32768),
                "peer_prefill_lengths": (128, 512, 2048, 8192, 32768),
                "prefill_repeats": 3,
                "decode_positions": (16, 256, 2048, 8192, 32768),
                "decode_steps": 6,
                "sample_prompt": 2048,
                "sample_new": (256, 1024, 2048, 4096, 8192),
                "sample_direct_max": 0,
                "int8_position": 2048,
                "max_seconds_per_point": 150.0,
                "target_seconds_per_point": 30.0,
                "bundled_positions": (16, 256, 2048),
                "bundled_steps": 16,
                "val_max_tokens": 20000,
                "machine_bandwidth_mib": 1024,
                "out_dir": "benchmarks/results/reduced",
            },
        }
        presets["full"] = {
            **presets["reduced"],
            "decode_steps": 5,
            "max_seconds_per_point": 300.0,
            "target_seconds_per_point": 60.0,
            "out_dir": "benchmarks/results/full",
        }
        if shape not in presets:
            raise RgemmaError(f"unknown shape {shape!r}; choose from {', '.join(presets)}")
        return cls(shape=shape, **{**presets[shape], **overrides})

    def griffin(self):
        return _griffin_config(self.preset or SHAPES[self.shape][0])

    def gemma(self) -> GemmaShape | None:
        if self.preset and self.preset != SHAPES[self.shape][0]:
            return None
        return SHAPES[self.shape][1]


def _decode_positions(opts: BenchOptions) -> list[int]:
    """Sweep positions plus those the sampling figure integrates over."""
    pts = set(opts.decode_positions)
    if "decode" in opts.sections:
        p0 = opts.sample_prompt
        pts.add(p0)
        for n in opts.sample_new:
            pts.add(p0 + n)
        pts.add(p0 + max(opts.sample_new) // 2)
    return sorted(pts)


def _model_spec(opts: BenchOptions, impl: str) -> dict[str, Any]:
    if impl == "gemma":
        return {"kind": "gemma", "shape": dataclasses.asdict(opts.gemma()), "seed": opts.seed}
    return {"kind": "random", "config": opts.griffin().to_dict(), "seed": opts.seed}


def _decode_task(batch: int, position: int, steps: int, fill: str) -> dict[str, Any]:
    """A worker task: `steps` timed decode steps at `position` (see `BenchOptions.fill`)."""
    return {
        "id": f"decode:b{batch}:p{position}",
        "kind": "decode",
        "position": position,
        "batch": batch,
        "steps": steps,
        "fill": fill,
    }


def _main_tasks(opts: BenchOptions, impl: str) -> list[dict[str, Any]]:
    """One implementation's prefill tasks (shortest first), then its decode tasks."""
    tasks: list[dict[str, Any]] = []
    lengths: set[int] = set()
    if "prefill" in opts.sections:
        lengths |= set(
            opts.prefill_lengths
            if impl == "rgemma"
            else (opts.peer_prefill_lengths or opts.prefill_lengths)
        )
    if "decode" in opts.sections:
        lengths.add(opts.sample_prompt)  # the sampling figure's prefill
    for n in sorted(lengths):
        tasks.append(
            {"id": f"prefill:{n}", "kind": "prefill", "length": n, "repeats": opts.prefill_repeats}
        )
    if "decode" in opts.sections:
        tasks += [
            _decode_task(b, p, opts.decode_steps, opts.fill)
            for b in opts.batches
            for p in _decode_positions(opts)
        ]
        for n in opts.sample_new:
            if n <= opts.sample_direct_max:
                tasks.append(
                    {
                        "id": f"sample:{n}",
                        "kind": "sample",
                        "prompt": opts.sample_prompt,
                        "new": n,
                        "batch": 1,
                    }
                )
    return tasks


def run_benchmarks(opts: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every requested section; return (and save to `opts.out_dir`) the results.

    Raises:
        BenchMemoryError: rgemma's model of this shape does not fit in memory (said
            before anything is allocated); peers that do not fit are skipped with a
            note.
        RgemmaError: unknown shape, implementation or section.
    """
    for impl in opts.impls:
        if impl not in IMPLS:
            raise RgemmaError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    known = ("prefill", "decode", "int8", "bundled")
    for s in opts.sections:
        if s not in known:
            raise RgemmaError(f"unknown section {s!r}; choose from {', '.join(known)}")
    cfg, gemma = opts.griffin(), opts.gemma()
    avail = opts.memory_limit if opts.memory_limit is not None else available_memory()
    # Pre-check before anything is allocated: the model itself must fit.
    try:
        check_memory(cfg, opts.dtype, "rgemma", available=avail, reserve=opts.reserve)
    except BenchMemoryError as err:
        name = opts.preset or SHAPES[opts.shape][0]
        raise BenchMemoryError(
            f"shape {opts.shape!r} ({name}, {cfg.num_parameters():,} "
            f"parameters) does not fit: {err}"
        ) from None
    impls = []
    for impl in opts.impls:
        conf = gemma if impl == "gemma" else cfg
        if conf is None:
            log(f"note: no Gemma baseline for preset {opts.preset}")
            continue
        try:
            check_memory(conf, opts.dtype, impl, available=avail, reserve=opts.reserve)
            impls.append(impl)
        except BenchMemoryError as err:
            log(f"note: skipping {impl}: {err}")
    if not _have_peer("recurrentgemma") and "official" in impls:
        log("note: skipping official: `recurrentgemma` is not installed")
        impls.remove("official")
    if not _have_peer("transformers"):
        for impl in ("hf", "gemma"):
            if impl in impls:
                log(f"note: skipping {impl}: `transformers` is not installed")
                impls.remove(impl)

    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log("measuring the machine ...")
    machine = measure_machine(
        threads=opts.threads,
        bandwidth_mib=opts.machine_bandwidth_mib,
        matmul_n=opts.machine_matmul_n,
    )
    log(
        f"  {machine['cpu']}, {machine['cores_logical']} cores, torch "
        f"{machine['versions']['torch']} with {machine['torch_threads']} threads, "
        f"bandwidth {machine['bandwidth_gbs']:.1f} GB/s, matmul fp32 "
        f"{machine['matmul_fp32_gflops']:.0f} / bf16 {machine['matmul_bf16_gflops'] or 0:.0f}"
        f" GFLOP/s"
    )
    load = machine.get("load_average")
    if load and load[0] > 0.5 * (machine["cores_logical"] or 1):
        log(
            f"warning: the machine is busy (load average {load[0]:.1f} on "
            f"{machine['cores_logical']} cores): timings will be slow and noisy; run on an "
            "idle machine, or set --threads to the number of idle cores"
        )
    results: dict[str, Any] = {
        "command": opts.command,
        "options": dataclasses.asdict(opts),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine,
        "griffin_config": cfg.to_dict(),
        "gemma_shape": dataclasses.asdict(gemma) if gemma else None,
        "weights": {
            impl: weight_bytes(gemma if impl == "gemma" else cfg, opts.dtype, impl)
            for impl in impls
        },
        "parameters": {
            "griffin": cfg.num_parameters(),
            "gemma": gemma.num_parameters() if gemma else None,
        },
    }
    t_start = time.perf_counter()
    common = {
        "budget_s": opts.max_seconds_per_point,
        "target_s": opts.target_seconds_per_point,
        "threads": opts.threads,
        "memory_limit": opts.memory_limit,
        "reserve": opts.reserve,
        "isolate": opts.isolate,
        "log": log,
    }
    if "prefill" in opts.sections or "decode" in opts.sections:
        runs = {}
        for impl in impls:
            log(f"[prefill/decode] {IMPL_LABELS[impl]} ({opts.dtype}) ...")
            conf = gemma if impl == "gemma" else cfg
            runs[impl] = run_worker(
                impl,
                _model_spec(opts, impl),
                opts.dtype,
                _main_tasks(opts, impl),
                config=conf,
                **common,
            )
        results["runs"] = runs
        results["prefill"] = report.prefill_rows(runs)
        if "decode" in opts.sections:
            results["decode"] = report.decode_rows(runs)
            results["sampling"] = report.sampling_rows(runs, opts)
            results["efficiency"] = report.efficiency_rows(results["decode"], machine)
        _save_partial(results, out_dir)
    if "int8" in opts.sections:
        results["int8"] = bench_int8(opts, cfg, impls, common, log)
        _save_partial(results, out_dir)
    if "bundled" in opts.sections:
        results["bundled"] = bench_bundled(opts, common, log)
    results["elapsed_s"] = time.perf_counter() - t_start
    try:
        results["load_average_end"] = os.getloadavg()
    except OSError:
        pass
    report.save_results(results, out_dir, plots=opts.plots, log=log)
    return results


def _save_partial(results: Mapping[str, Any], out_dir: Path) -> None:
    """Keep what is measured so far (`results.partial.json`) in case the run stops."""
    (out_dir / "results.partial.json").write_text(json.dumps(results, indent=1, default=str))


def _have_peer(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def bench_int8(
    opts: BenchOptions,
    cfg,
    impls: Sequence[str],
    common: Mapping[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Decode speed of int8 against float32 / bfloat16 (rgemma and HF), and int8's
    logit error on a random prompt (the random-weight model of the benchmark)."""
    p = opts.int8_position
    tasks = [_decode_task(b, p, opts.decode_steps, opts.fill) for b in opts.batches]
    runs: dict[str, Any] = {}
    spec = _model_spec(opts, "rgemma")
    for dtype in opts.int8_dtypes:
        for impl in ("rgemma", "hf"):
            if impl != "rgemma" and impl not in impls:
                continue
            key = f"{impl}:{dtype}"
            log(f"[int8] {IMPL_LABELS[impl]} ({dtype}) ...")
            runs[key] = run_worker(impl, spec, dtype, tasks, config=cfg, **common)
    log("[int8] rgemma int8 (quantized from float32 in the worker) ...")
    # The worker quantizes its float32 model in place as its first task, then decodes.
    qtasks = [{"id": "quantize", "kind": "quantize", "length": 64}] + tasks
    runs["rgemma-int8"] = run_worker(
        "rgemma", spec, "float32", qtasks, config=cfg, **{**common, "isolate": "impl"}
    )
    rows = []
    for key, run in runs.items():
        for b in opts.batches:
            rec = run["results"].get(f"decode:b{b}:p{p}", {})
            rows.append(
                {
                    "model": key,
                    "batch": b,
                    "position": p,
                    "status": rec.get("status"),
                    "tokens_per_s": rec.get("tokens_per_s"),
                    "ms_per_step": 1000 * rec["seconds"]["median"] if rec.get("seconds") else None,
                    "weight_bytes": rec.get("weight_bytes"),
                }
            )
    base = {(r["model"], r["batch"]): r["tokens_per_s"] for r in rows}
    for r in rows:
        q = base.get(("rgemma-int8", r["batch"]))
        r["int8_speedup"] = (q / r["tokens_per_s"]) if q and r["tokens_per_s"] else None
    quality = runs["rgemma-int8"]["results"].get("quantize", {})
    return {"rows": rows, "quality_random": quality, "runs": runs}


def _bundled_val_settings(val_paths: Sequence[str] | None) -> dict[str, Any]:
    """Where the bundled model's validation text is: the held-out split of
    configs/bundled.json's data (its train_data, val_fraction and doc_chars), or
    the files `val_paths` whole."""
    settings: dict[str, Any] = {"val_paths": [], "val_fraction": 0.01, "doc_chars": 16000}
    config = ROOT / "configs" / "bundled.json"
    if config.is_file():
        conf = json.loads(config.read_text())
        patterns = [str(ROOT / p) for p in conf.get("val_data") or conf.get("train_data") or []]
        settings["val_paths"] = expand_paths(patterns, "bundled data")
        settings["held_out_files"] = bool(conf.get("val_data"))
        settings.update({k: conf[k] for k in ("val_fraction", "doc_chars") if k in conf})
        settings["config_file"] = str(config)
    if val_paths:
        settings["val_paths"] = list(val_paths)
        settings["held_out_files"] = True
    return settings


def bench_bundled(
    opts: BenchOptions, common: Mapping[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """The bundled model (or `opts.bundled_path`): decode tokens/s of rgemma against
    HF on the same weights, and int8's quality on the validation text."""
    path = opts.bundled_path or str(bundled_model_path())
    if not Path(path).exists() or (
        opts.bundled_path is None and not (Path(path) / "rgemma_config.json").is_file()
    ):
        log(f"[bundled] skipped: no bundled model at {path}")
        return {"status": "skipped", "reason": f"no bundled model at {path}"}
    spec = {"kind": "path", "path": opts.bundled_path}
    positions = sorted(opts.bundled_positions)
    tasks = [
        _decode_task(b, p, opts.bundled_steps, "prefill") for b in opts.batches for p in positions
    ]
    val = _bundled_val_settings(opts.val_paths)
    runs = {}
    for impl in ("rgemma", "hf"):
        if impl == "hf" and not _have_peer("transformers"):
            continue
        log(f"[bundled] {IMPL_LABELS[impl]} (float32) ...")
        runs[impl] = run_worker(impl, spec, "float32", tasks, **common)
    log("[bundled] rgemma compiled decode step (float32) ...")
    ctask = {"id": "compile", "kind": "compile", "batches": list(opts.batches)}
    runs["rgemma-compiled"] = run_worker(
        "rgemma", spec, "float32", [ctask] + tasks, **{**common, "isolate": "impl"}
    )
    log("[bundled] int8 quality and speed ...")
    qtask = {
        "id": "quality",
        "kind": "quality",
        "model_path": opts.bundled_path,
        "max_tokens": opts.val_max_tokens,
        **{k: v for k, v in val.items() if k != "config_file"},
    }
    # One worker: the quality task quantizes its model in place, then it decodes.
    runs["rgemma-int8"] = run_worker(
        "rgemma", spec, "float32", [qtask] + tasks, **{**common, "isolate": "impl"}
    )
    rows = []
    for impl, run in runs.items():
        for b in opts.batches:
            for p in positions:
                rec = run["results"].get(f"decode:b{b}:p{p}", {})
                rows.append(
                    {
                        "impl": impl,
                        "batch": b,
                        "position": p,
                        "status": rec.get("status"),
                        "tokens_per_s": rec.get("tokens_per_s"),
                        "seconds": rec.get("seconds"),
                    }
                )
    ref = {(r["batch"], r["position"]): r["tokens_per_s"] for r in rows if r["impl"] == "hf"}
    for r in rows:
        h = ref.get((r["batch"], r["position"]))
        r["speedup_vs_hf"] = r["tokens_per_s"] / h if h and r["tokens_per_s"] else None
    quality = runs["rgemma-int8"]["results"].get("quality", {})
    return {"path": path, "validation": val, "rows": rows, "quality": quality, "runs": runs}


# ----------------------------------------------------------------------------------
# Command line (benchmarks/run_all.py)
# ----------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    try:
        out = []
        for x in (x.strip() for x in text.split(",")):
            if x:  # "2k" = 2,048 tokens (as the tables print it)
                out.append(int(x[:-1]) * 1024 if x[-1] in "kK" else int(x))
        return tuple(out)
    except ValueError:
        raise RgemmaError(f"expected a comma-separated list of integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="quick",
        help="quick: tiny; reduced: 2B widths, 6 layers; full: the 2B preset",
    )
    p.add_argument(
        "--preset",
        help="any GriffinConfig preset instead of the shape's "
        "(no Gemma baseline unless it is the shape's)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="parameter dtype (default: float32 quick, bfloat16 otherwise)",
    )
    p.add_argument("--impls", help=f"comma-separated, from {','.join(IMPLS)} (default: all)")
    p.add_argument(
        "--sections", help="comma-separated, from prefill,decode,int8,bundled (default: all)"
    )
    p.add_argument(
        "--prefill-lengths",
        type=_ints,
        metavar="L,..",
        help="rgemma prompt lengths (e.g. 128,512,2k,8k,32k)",
    )
    p.add_argument(
        "--peer-prefill-lengths",
        type=_ints,
        metavar="L,..",
        help="prompt lengths of the other implementations",
    )
    p.add_argument("--decode-positions", type=_ints, metavar="P,..")
    p.add_argument("--batches", type=_ints, metavar="B,..", help="decode batch sizes")
    p.add_argument("--decode-steps", type=int, metavar="N", help="timed decode steps per point")
    p.add_argument("--repeats", type=int, metavar="N", help="prefill runs per point (at most)")
    p.add_argument(
        "--sample-prompt",
        type=int,
        metavar="T",
        help="prompt of the sampling figure (default 2048)",
    )
    p.add_argument(
        "--sample-new",
        type=_ints,
        metavar="N,..",
        help="tokens sampled after it (default 256,1k,2k,4k,8k)",
    )
    p.add_argument(
        "--sample-direct-max",
        type=int,
        metavar="N",
        help="also time sampling directly for N up to this",
    )
    p.add_argument(
        "--fill",
        choices=("synthetic", "prefill"),
        help="how decode reaches a position (default synthetic; see docs)",
    )
    p.add_argument(
        "--max-seconds-per-point",
        type=float,
        metavar="S",
        help="skip a point whose single run is predicted to take longer",
    )
    p.add_argument(
        "--target-seconds-per-point",
        type=float,
        metavar="S",
        help="stop repeating a point after this long (at least 1 prefill run, 2 decode steps)",
    )
    p.add_argument(
        "--memory-limit",
        type=float,
        metavar="GiB",
        help="treat this as the available memory (default: measured)",
    )
    p.add_argument(
        "--isolate",
        choices=("impl", "point"),
        help="one worker process per implementation (default) or per point",
    )
    p.add_argument(
        "--bundled",
        metavar="PATH",
        help="model for the bundled section (default: the bundled model)",
    )
    p.add_argument(
        "--val-data",
        metavar="PATH",
        action="append",
        help="validation text for int8 perplexity (default: the bundled model's "
        "split of configs/bundled.json's data)",
    )
    p.add_argument("--threads", type=int, metavar="N", help="torch threads in every worker")
    p.add_argument(
        "--out", metavar="DIR", help="output directory (default benchmarks/results/SHAPE)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def options_from_args(args: argparse.Namespace, command: str = "") -> BenchOptions:
    """The `BenchOptions` of parsed `add_arguments` options (the shape's defaults
    where an option is not given).

    Raises:
        RgemmaError: --threads < 1, or an unknown shape.
    """
    over: dict[str, Any] = {}
    if args.preset:
        over["preset"] = args.preset
    if args.dtype:
        over["dtype"] = args.dtype
    if args.impls:
        over["impls"] = tuple(s.strip() for s in args.impls.split(",") if s.strip())
    if args.sections:
        over["sections"] = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    for name in (
        "prefill_lengths",
        "peer_prefill_lengths",
        "decode_positions",
        "batches",
        "decode_steps",
        "sample_prompt",
        "sample_new",
        "sample_direct_max",
        "fill",
        "max_seconds_per_point",
        "target_seconds_per_point",
        "isolate",
        "threads",
    ):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    if args.repeats is not None:
        over["prefill_repeats"] = args.repeats
    if args.prefill_lengths and not args.peer_prefill_lengths:
        over["peer_prefill_lengths"] = args.prefill_lengths
    if args.memory_limit is not None:
        over["memory_limit"] = int(args.memory_limit * GiB)
    if args.bundled:
        over["bundled_path"] = args.bundled
    if args.val_data:
        over["val_paths"] = tuple(args.val_data)
    if args.out:
        over["out_dir"] = args.out
    if args.no_plots:
        over["plots"] = False
    if args.threads is not None and args.threads < 1:
        raise RgemmaError(f"--threads must be >= 1, got {args.threads}")
    return BenchOptions.for_shape(args.shape, command=command, **over)
