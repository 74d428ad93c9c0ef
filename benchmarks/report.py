"""The benchmark report: the rows of each section, the tables, the plots and the
generated part of RESULTS.md, from the records the workers return."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import IMPL_LABELS, IMPLS, GiB

GENERATED_BEGIN = "<!-- rgemma bench: generated tables (rewritten by each run) -->"
GENERATED_END = "<!-- rgemma bench: end of generated tables -->"


# ----------------------------------------------------------------------------------
# Rows of each section
# ----------------------------------------------------------------------------------
def prefill_rows(runs: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for impl, run in runs.items():
        for tid, rec in sorted(
            run["results"].items(),
            key=lambda kv: int(kv[0].split(":")[1]) if kv[0].startswith("prefill:") else 0,
        ):
            if not tid.startswith("prefill:"):
                continue
            rows.append(
                {
                    "impl": impl,
                    "length": int(tid.split(":")[1]),
                    "status": rec.get("status"),
                    "tokens_per_s": rec.get("tokens_per_s"),
                    "tokens_per_s_min": rec.get("tokens_per_s_min"),
                    "tokens_per_s_max": rec.get("tokens_per_s_max"),
                    "tokens_per_cpu_s": rec.get("tokens_per_cpu_s"),
                    "n": rec.get("seconds", {}).get("n"),
                    "peak_rss": rec.get("peak_rss"),
                    "note": rec.get("reason") or rec.get("error"),
                }
            )
    return rows


def decode_rows(runs: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for impl, run in runs.items():
        for tid, rec in run["results"].items():
            if not tid.startswith("decode:"):
                continue
            _, b, p = tid.split(":")
            rows.append(
                {
                    "impl": impl,
                    "batch": int(b[1:]),
                    "position": int(p[1:]),
                    "status": rec.get("status"),
                    "tokens_per_s": rec.get("tokens_per_s"),
                    "tokens_per_s_min": rec.get("tokens_per_s_min"),
                    "tokens_per_s_max": rec.get("tokens_per_s_max"),
                    "tokens_per_cpu_s": rec.get("tokens_per_cpu_s"),
                    "step_s": rec.get("seconds", {}).get("median"),
                    "n": rec.get("seconds", {}).get("n"),
                    "weight_bytes": rec.get("weight_bytes"),
                    "state_bytes": rec.get("state_bytes"),
                    "peak_rss": rec.get("peak_rss"),
                    "fill": rec.get("fill"),
                    "note": rec.get("reason") or rec.get("error"),
                }
            )
    rows.sort(key=lambda r: (IMPLS.index(r["impl"]), r["batch"], r["position"]))
    return rows


def integrate_steps(points: Sequence[tuple[int, float]], start: int, n: int) -> float | None:
    """Seconds for decode steps at positions start .. start + n - 1, the per-step time
    linearly interpolated between measured positions (constant beyond the ends)."""
    pts = sorted(points)
    if not pts or n <= 0:
        return None if not pts else 0.0
    xs = [p for p, _ in pts]
    if start < xs[0] and start + n > xs[0] and len(pts) == 1:
        return n * pts[0][1]

    def f(x: float) -> float:
        if x <= xs[0]:
            return pts[0][1]
        if x >= xs[-1]:
            return pts[-1][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            if x0 <= x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return pts[-1][1]

    # Trapezoid over the breakpoints inside [start, start + n].
    a, b = float(start), float(start + n)
    cuts = [a] + [x for x in xs if a < x < b] + [b]
    return sum((x1 - x0) * (f(x0) + f(x1)) / 2 for x0, x1 in itertools.pairwise(cuts))


def sampling_rows(runs: Mapping[str, Any], opts: Any) -> list[dict[str, Any]]:
    """The paper's figure: seconds to sample N tokens after an `sample_prompt` prompt =
    prefill time + the integral of the measured per-step decode times."""
    rows = []
    p0 = opts.sample_prompt
    for impl, run in runs.items():
        res = run["results"]
        pre = res.get(f"prefill:{p0}", {})
        pre_s = pre.get("seconds", {}).get("median") if pre.get("status") == "ok" else None
        for b in opts.batches:
            pts = []
            for tid, rec in res.items():
                if tid.startswith(f"decode:b{b}:") and rec.get("status") == "ok":
                    pts.append((int(tid.split(":p")[1]), rec["seconds"]["median"]))
            near = [q for q in pts if q[0] >= p0]
            for n in opts.sample_new:
                dec = integrate_steps(near or pts, p0, n) if pts else None
                measured_upto = max((q for q, _ in pts), default=0)
                row = {
                    "impl": impl,
                    "batch": b,
                    "prompt": p0,
                    "new": n,
                    "prefill_s": pre_s,
                    "decode_s": dec,
                    "total_s": (pre_s * b + dec if b > 1 else pre_s + dec)
                    if pre_s is not None and dec is not None
                    else None,
                    "extrapolated": p0 + n > measured_upto,
                }
                # Batched prompts are prefilled together; the prefill was measured at
                # batch 1, so scale it by b (prefill is compute-bound).
                row["tokens_per_s"] = b * n / row["total_s"] if row["total_s"] else None
                direct = res.get(f"sample:{n}") if b == 1 else None
                if direct and direct.get("status") == "ok":
                    row["direct_total_s"] = direct["total_s"]
                rows.append(row)
    return rows


def efficiency_rows(
    decode: Sequence[Mapping[str, Any]], machine: Mapping[str, Any]
) -> list[dict[str, Any]]:
    bw = machine["bandwidth_gbs"] * 1e9
    rows = []
    for r in decode:
        if r.get("status") != "ok" or not r.get("step_s"):
            continue
        wb, sb = r["weight_bytes"] or 0, r["state_bytes"] or 0
        rate = wb / r["step_s"]
        rows.append(
            {
                "impl": r["impl"],
                "batch": r["batch"],
                "position": r["position"],
                "weight_gb": wb / 1e9,
                "state_gb": sb / 1e9,
                "step_ms": 1000 * r["step_s"],
                "weight_gbs": rate / 1e9,
                "fraction": rate / bw,
                "fraction_with_state": (wb + sb) / r["step_s"] / bw,
            }
        )
    return rows


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain-text table: columns aligned, numbers right-aligned."""

    def cell(x: Any) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            if x == 0:
                return "0"
            if abs(x) >= 1000:
                return f"{x:,.0f}"
            if abs(x) >= 100:
                return f"{x:.1f}"
            if abs(x) >= 1:
                return f"{x:.2f}"
            return f"{x:.3g}"
        if isinstance(x, int):
            return f"{x:,}"
        return str(x)

    cells = [[cell(x) for x in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and rows
        for i in range(len(headers))
    ]

    def line(parts: Sequence[str]) -> str:
        return "  ".join(
            p.rjust(w) if numeric[i] else p.ljust(w) for i, (p, w) in enumerate(zip(parts, widths))
        ).rstrip()

    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _num(x: float) -> str:
    """About three significant figures, thousands as k: 0.123, 12.3, 456, 7.89k, 12.3k."""
    if x >= 1e5:
        return f"{x / 1e3:.0f}k"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    if x >= 1e3:
        return f"{x / 1e3:.2f}k"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _spread(r: Mapping[str, Any]) -> str:
    lo, hi = r.get("tokens_per_s_min"), r.get("tokens_per_s_max")
    if lo is None or hi is None:
        return "-"
    return f"{_num(lo)}-{_num(hi)}"


def _load(load: Any) -> str:
    return " ".join(f"{x:.2f}" for x in load) if load else "n/a"


def _status(r: Mapping[str, Any]) -> str:
    s = r.get("status") or "-"
    if s == "ok":
        return ""
    return f"{s}: {r['note']}"[:90] if r.get("note") else s


def _impl(r: Mapping[str, Any]) -> str:
    return IMPL_LABELS.get(r["impl"], r["impl"])


def _per(key: str, unit: float) -> Callable[[Mapping[str, Any]], float | None]:
    """A cell: `r[key] / unit`, or None when the row has no (or a zero) value."""
    return lambda r: r[key] / unit if r.get(key) else None


#: Each table: (where its rows are in the results, title, columns). A column is a
#: header and the row's key or a function of the row; titles may name the machine's
#: {bandwidth} (GB/s) and the bundled model's {path}.
TABLES: tuple[tuple[tuple[str, ...], str, list[tuple[str, Any]]], ...] = (
    (
        ("prefill",),
        "1. Prefill: throughput and peak resident memory (median of n runs)",
        [
            ("impl", _impl),
            ("prompt", "length"),
            ("tok/s", "tokens_per_s"),
            ("min-max", _spread),
            ("tok/cpu-s", "tokens_per_cpu_s"),
            ("n", "n"),
            ("peak GiB", _per("peak_rss", GiB)),
            ("status", _status),
        ],
    ),
    (
        ("decode",),
        "2. Decode: throughput against position (median step time)",
        [
            ("impl", _impl),
            ("batch", "batch"),
            ("position", "position"),
            ("tok/s", "tokens_per_s"),
            ("min-max", _spread),
            ("tok/cpu-s", "tokens_per_cpu_s"),
            ("steps", "n"),
            ("state MB", _per("state_bytes", 1e6)),
            ("peak GiB", _per("peak_rss", GiB)),
            ("status", _status),
        ],
    ),
    (
        ("sampling",),
        (
            "2b. Sampling N tokens after the prompt (the paper's figure): "
            "prefill + integral of measured step times"
        ),
        [
            ("impl", _impl),
            ("batch", "batch"),
            ("prompt", "prompt"),
            ("N", "new"),
            ("prefill s", "prefill_s"),
            ("decode s", "decode_s"),
            ("total s", "total_s"),
            ("tok/s", "tokens_per_s"),
            ("direct s", "direct_total_s"),
            ("extrapolated", lambda r: "yes" if r["extrapolated"] else ""),
        ],
    ),
    (
        ("efficiency",),
        (
            "3. Decode efficiency: weight bytes per step / step time, "
            "as a fraction of the measured {bandwidth:.1f} GB/s"
        ),
        [
            ("impl", _impl),
            ("batch", "batch"),
            ("position", "position"),
            ("weights GB", "weight_gb"),
            ("ms/step", "step_ms"),
            ("weights GB/s", "weight_gbs"),
            ("of bandwidth", "fraction"),
            ("incl. state", "fraction_with_state"),
        ],
    ),
    (
        ("int8", "rows"),
        "4. int8 weight-only quantization: decode speed",
        [
            ("model", "model"),
            ("batch", "batch"),
            ("position", "position"),
            ("tok/s", "tokens_per_s"),
            ("ms/step", "ms_per_step"),
            ("weights GB", _per("weight_bytes", 1e9)),
            ("int8 speed-up over it", "int8_speedup"),
            ("status", _status),
        ],
    ),
    (
        ("bundled", "rows"),
        "5. Bundled model ({path}): decode, float32 (int8 row: rgemma int8)",
        [
            ("impl", _impl),
            ("batch", "batch"),
            ("position", "position"),
            ("tok/s", "tokens_per_s"),
            ("vs HF", "speedup_vs_hf"),
            ("status", _status),
        ],
    ),
)


def _rows_at(results: Mapping[str, Any], where: Sequence[str]) -> list[Mapping[str, Any]]:
    x: Any = results
    for key in where:
        x = x.get(key) if isinstance(x, Mapping) else None
    return x or []


def _notes(results: Mapping[str, Any], section: str) -> list[str]:
    """The lines printed after a section's table."""
    out = []
    if section == "int8":
        q = (results.get("int8") or {}).get("quality_random") or {}
        if q.get("status") == "ok":
            out.append(
                f"int8 logit error on the random-weight model (64 random tokens): max "
                f"{q['max_abs_logit_diff']:.4f}, mean {q['mean_abs_logit_diff']:.4f} "
                f"(logit std {q['logit_std']:.3f}); top-1 agreement "
                f"{100 * q['top1_agreement']:.1f}%"
            )
    bd = results.get("bundled") if section == "bundled" else None
    if bd and bd.get("status") == "skipped":
        out.append(f"\n5. Bundled model: skipped ({bd['reason']})")
    elif bd:
        comp = bd.get("runs", {}).get("rgemma-compiled", {}).get("results", {})
        comp = comp.get("compile") or {}
        if comp.get("compile_s"):
            out.append(
                "compiled decode step: first steps (compiling) took "
                + ", ".join(f"{v:.1f} s at batch {b}" for b, v in comp["compile_s"].items())
                + (f"; compile FAILED ({comp['failed']}), eager" if comp.get("failed") else "")
            )
        q = bd.get("quality") or {}
        if q.get("status") == "ok":
            out.append(
                f"int8 quality on {q['tokens']:,} validation tokens: max |logit diff| "
                f"{q['max_abs_logit_diff']:.4f}, mean {q['mean_abs_logit_diff']:.4f}; "
                f"perplexity {q['ppl_fp32']:.3f} (fp32) -> {q['ppl_int8']:.3f} (int8), "
                f"{q['ppl_change']:+.4f} ({q['ppl_change_pct']:+.2f}%)"
            )
        elif q:
            out.append(f"int8 quality: {q.get('status')}: {q.get('reason') or q.get('error')}")
    return out


def machine_features(m: Mapping[str, Any]) -> str:
    """ "CPU features ...; per core: matmul .. / .. GFLOP/s fp32 / bf16" (older
    results without them: "")."""
    parts = []
    feats = m.get("cpu_features")
    if feats:
        flags = " ".join(feats.get("flags") or []) or "none of note"
        parts.append(
            f"CPU {feats.get('vendor') or '?'}, features {flags}, torch dispatch "
            f"{feats.get('torch_cpu_capability') or '?'}"
        )
    if m.get("matmul_fp32_gflops_per_core"):
        parts.append(
            f"per core (1 thread, CPU time): matmul "
            f"{m['matmul_fp32_gflops_per_core']:.0f} GFLOP/s fp32 / "
            f"{(m.get('matmul_bf16_gflops_per_core') or 0):.0f} bf16"
        )
    return "; ".join(parts)


def tables(results: Mapping[str, Any]) -> str:
    """All result tables as plain text."""
    m, opts = results["machine"], results["options"]
    params = results["parameters"]
    machine = (
        f"machine: {m['cpu']}; {m['cores_logical']} logical cores; "
        f"{m['memory_total_bytes'] / GiB:.1f} GiB RAM; torch {m['versions']['torch']}, "
        f"{m['torch_threads']} threads; bandwidth {m['bandwidth_gbs']:.1f} GB/s (copy "
        f"{m['bandwidth_copy_gbs']:.1f}, read {m['bandwidth_read_gbs']:.1f}); matmul "
        f"{m['matmul_fp32_gflops']:.0f} GFLOP/s fp32, "
        f"{(m['matmul_bf16_gflops'] or 0):.0f} bf16; load average {_load(m['load_average'])}"
    )
    gemma = f", Gemma baseline {params['gemma']:,}" if params.get("gemma") else ""
    shape = f"shape: {opts['shape']} (Griffin {params['griffin']:,} params{gemma})"
    out = [machine] + [f for f in [machine_features(m)] if f]
    out.append(f"{shape}, dtype {opts['dtype']}")
    # Decode tables show the sweep's positions; those the sampling figure integrates
    # over are in results.json.
    sweep = set(opts["decode_positions"])
    context = {"bandwidth": m["bandwidth_gbs"], "path": (results.get("bundled") or {}).get("path")}
    for where, title, columns in TABLES:
        rows = [
            r
            for r in _rows_at(results, where)
            if where[0] not in ("decode", "efficiency") or r["position"] in sweep
        ]
        if rows:
            cells = [[c(r) if callable(c) else r.get(c) for _, c in columns] for r in rows]
            headers = [h for h, _ in columns]
            out.append(format_table(headers, cells, "\n" + title.format(**context)))
        out += _notes(results, where[0])
    out.append(f"\nelapsed: {results.get('elapsed_s', 0):.0f} s")
    return "\n".join(out)


def save_results(
    results: Mapping[str, Any],
    out_dir: Path,
    *,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    """Write `results.json`, `tables.txt` and the plots (without matplotlib: a note)
    to `out_dir`, and log the tables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    text = tables(results)
    (out_dir / "tables.txt").write_text(text + "\n")
    log("\n" + text)
    if plots:
        try:
            files = make_plots(results, out_dir)
            log(f"plots: {', '.join(str(f) for f in files)}")
        except ImportError:
            log("note: matplotlib is not installed: no plots (pip install matplotlib)")
    log(f"results: {out_dir / 'results.json'}, {out_dir / 'tables.txt'}")


def _short(n: int) -> str:
    """2048 -> "2k", 32768 -> "32k", 131072 -> "128k", 100 -> "100"."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


@dataclasses.dataclass
class _Panel:
    """One line plot: y against x (log scale) of a section's rows, a line per impl."""

    rows: list[Mapping[str, Any]]
    x: str
    y: str
    xlabel: str
    ylabel: str
    title: str
    scale: float = 1.0  # y is r[y] * scale
    errors: bool = False  # error bars from tokens_per_s_min / _max
    ylog: bool = False  # else the y axis starts at 0


def _line_figures(results: Mapping[str, Any]) -> list[tuple[str, list[_Panel]]]:
    """(file name, panels) of every line plot the results have rows for."""
    shape, dtype = results["options"]["shape"], results["options"]["dtype"]
    p0 = _short(results["options"]["sample_prompt"])
    figures = []
    if results.get("prefill"):
        rows, x = results["prefill"], "prompt length (tokens)"
        figures.append(
            (
                "prefill.png",
                [
                    _Panel(
                        rows,
                        "length",
                        "tokens_per_s",
                        x,
                        "prefill tokens/s",
                        f"Prefill throughput ({shape}, {dtype})",
                        errors=True,
                        ylog=True,
                    ),
                    _Panel(
                        rows,
                        "length",
                        "peak_rss",
                        x,
                        "peak RSS (GiB)",
                        "Peak resident memory (x: failed or skipped)",
                        scale=1 / GiB,
                    ),
                ],
            )
        )
    for key, panel in (
        (
            "decode",
            lambda rows, b: _Panel(
                rows,
                "position",
                "tokens_per_s",
                "position in the sequence (tokens)",
                "decode tokens/s",
                f"Decode, batch {b} ({shape}, {dtype})",
                errors=True,
            ),
        ),
        (
            "sampling",
            lambda rows, b: _Panel(
                rows,
                "new",
                "tokens_per_s",
                f"tokens sampled after a {p0}-token prompt",
                "sampling throughput (tokens/s)",
                f"Sampling throughput, batch {b}",
            ),
        ),
    ):
        if results.get(key):
            batches = sorted({r["batch"] for r in results[key]})
            figures.append(
                (
                    f"{key}.png",
                    [panel([r for r in results[key] if r["batch"] == b], b) for b in batches],
                )
            )
    if results.get("efficiency"):
        bw = results["machine"]["bandwidth_gbs"]
        rows = [r for r in results["efficiency"] if r["batch"] == 1]
        title = f"Batch-1 decode: weight bytes / step time ({bw:.1f} GB/s = 100%)"
        panel = _Panel(
            rows, "position", "fraction", "position", "% of measured bandwidth", title, scale=100
        )
        figures.append(("efficiency.png", [panel]))
    return figures


def make_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots (matplotlib, Agg backend) of every section present: a line plot per
    figure of `_line_figures`, a bar chart for int8 and the bundled model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"rgemma": "C0", "official": "C1", "hf": "C2", "gemma": "C3"}

    def log_ticks(ax, values) -> None:
        values = sorted({int(v) for v in values if v})
        if len(values) > 8:  # keep about 8 labels
            values = values[:: -(-len(values) // 8)]
        kept: list[int] = []
        for v in values:  # labels closer than 1.25x overlap (2000 and 2048)
            if not kept or v >= 1.25 * kept[-1]:
                kept.append(v)
        ax.set_xticks(kept)
        ax.set_xticklabels([_short(v) for v in kept], rotation=0)
        ax.minorticks_off()

    def save(fig, name: str) -> None:
        fig.tight_layout()
        files.append(out_dir / name)
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    files: list[Path] = []
    for name, panels in _line_figures(results):
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, p in zip(axes[0], panels):
            for impl in dict.fromkeys(r["impl"] for r in p.rows):
                rows = [r for r in p.rows if r["impl"] == impl]
                ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get(p.y)]
                xs, ys = [r[p.x] for r in ok], [r[p.y] * p.scale for r in ok]
                style = {"marker": "o", "label": IMPL_LABELS[impl], "color": colors[impl]}
                if ok and p.errors:
                    low = [r["tokens_per_s"] - r["tokens_per_s_min"] for r in ok]
                    high = [r["tokens_per_s_max"] - r["tokens_per_s"] for r in ok]
                    ax.errorbar(xs, ys, yerr=[low, high], capsize=3, **style)
                elif ok:
                    ax.plot(xs, ys, **style)
                for r in rows:  # failed or skipped points: an x on the axis
                    if r.get("status") not in ("ok", None):
                        ax.annotate(
                            "x",
                            (r[p.x], 0),
                            xycoords=("data", "axes fraction"),
                            color=colors[impl],
                            ha="center",
                            va="bottom",
                            fontsize=12,
                        )
            ax.set_xscale("log")
            log_ticks(ax, [r[p.x] for r in p.rows])
            ax.set(xlabel=p.xlabel, ylabel=p.ylabel, title=p.title)
            if p.ylog:
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, name)

    for key, label_key, name, title in (
        ("int8", "model", "int8.png", "int8 vs float32 / bfloat16: decode tok/s"),
        ("bundled", "impl", "bundled.png", "Bundled model: decode tok/s"),
    ):
        rows = [r for r in _rows_at(results, (key, "rows")) if r.get("tokens_per_s")]
        if key == "bundled":  # the longest prompt
            last = max((r["position"] for r in rows), default=0)
            rows = [r for r in rows if r["position"] == last]
        if not rows:
            continue
        batches = sorted({r["batch"] for r in rows})
        fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
        for ax, b in zip(axes[0], batches):
            sub = [r for r in rows if r["batch"] == b]
            ax.bar(
                [r[label_key] for r in sub],
                [r["tokens_per_s"] for r in sub],
                color=[f"C{i}" for i in range(len(sub))],
            )
            ax.set(
                ylabel="tokens/s",
                title=f"{title}, batch {b}, position {_short(sub[0]['position'])}",
            )
            ax.tick_params(axis="x", rotation=20)
        save(fig, name)
    return files


def write_results_md(
    result_dirs: Sequence[str | os.PathLike], path: str | os.PathLike, header: str = ""
) -> Path:
    """Write RESULTS.md from the `results.json` of each directory that has one: the
    command, the machine, every table and links to the plots.

    The generated part sits between two HTML comments (`GENERATED_BEGIN` /
    `GENERATED_END`); when `path` already has them, only that part is replaced and
    the hand-written text before and after it (summaries, other benchmarks) is kept.
    """
    path = Path(path)
    before = after = None
    if path.is_file():
        old = path.read_text()
        if GENERATED_BEGIN in old and GENERATED_END in old.split(GENERATED_BEGIN, 1)[1]:
            before, rest = old.split(GENERATED_BEGIN, 1)
            after = rest.split(GENERATED_END, 1)[1]
    parts = (
        [
            header
            or "# Benchmark results\n\nGenerated by `benchmarks/run_all.py`; see "
            "benchmarks/README.md for what each number is.\n"
        ]
        if before is None
        else []
    )
    for d in result_dirs:
        d = Path(d)
        f = d / "results.json"
        if not f.is_file():
            continue
        res = json.loads(f.read_text())
        m = res["machine"]
        rel = os.path.relpath(d, path.parent)
        parts.append(f"## {res['options']['shape']} shape ({res['options']['dtype']})\n")
        parts.append(
            f"Command: `{res.get('command') or '(library call)'}`  \n"
            f"Started {res.get('started')}, took {res.get('elapsed_s', 0) / 60:.1f} min.\n"
        )
        parts.append(
            f"Machine: {m['cpu']}, {m['cores_logical']} logical cores "
            f"({m.get('cores_physical')} physical), {m['memory_total_bytes'] / GiB:.1f} GiB "
            f"RAM; {m['platform']}; Python {m['python']}; "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
            + f"; torch threads {m['torch_threads']}. Measured: memory bandwidth "
            f"{m['bandwidth_gbs']:.1f} GB/s (copy {m['bandwidth_copy_gbs']:.1f}, read "
            f"{m['bandwidth_read_gbs']:.1f}), matmul {m['matmul_fp32_gflops']:.0f} GFLOP/s "
            f"fp32 / {(m['matmul_bf16_gflops'] or 0):.0f} bf16; load average at start "
            f"{_load(m['load_average'])}."
            + (f" {machine_features(m)}.\n" if machine_features(m) else "\n")
        )
        parts.append("```\n" + tables(res) + "\n```\n")
        pngs = sorted(p.name for p in d.glob("*.png"))
        parts += [f"![{p}]({rel}/{p})\n" for p in pngs]
    generated = GENERATED_BEGIN + "\n" + "\n".join(parts) + GENERATED_END
    if before is None:
        path.write_text(generated + "\n")
    else:
        path.write_text(before + generated + after)
    return path
