"""The benchmark worker: one subprocess runs an implementation's measurements, so
that each point's peak resident memory can be read and a crash, an out-of-memory
failure or a time-out is recorded instead of ending the run.

Parent side: `run_worker` refuses (before anything is allocated) the points whose
estimated memory does not fit, starts `python -m benchmarks.worker JOB OUT`, reads
its JSON-lines records, kills it at a time-out and starts a fresh one for the rest.
Worker side: `_Worker` builds the model (`benchmarks.adapters`), then runs each task
(prefill, decode, sample, quantize, compile, quality) and writes one record per task.

Peak resident memory per point: Linux `VmHWM`, reset before each point through
`/proc/self/clear_refs` (`ru_maxrss` where that is not available). The worker caps
its address space (`RLIMIT_AS`) at what the machine has available, so an allocation
too large fails in the worker (recorded as "oom") instead of waking the kernel's
OOM killer.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.adapters import Adapter, RgemmaAdapter, build_adapter
from benchmarks.machine import (
    DEFAULT_RESERVE,
    GiB,
    MemoryEstimate,
    available_memory,
    estimate_memory,
    throughput,
)
from rgemma.data import read_documents, split_documents
from rgemma.engine import compile_decode
from rgemma.errors import RgemmaError
from rgemma.generation import find_tokenizer
from rgemma.quantization import quantize
from rgemma.scoring import score_texts
from rgemma.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> int:
    value = _proc_status("VmRSS")
    if value is not None:
        return value

    return _maxrss()


def _maxrss() -> int:
    """Peak RSS of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def _reset_peak() -> bool:
    """Free what can be freed and reset the peak-RSS mark; False if not supported."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    value = _proc_status("VmHWM")
    if value is not None:
        return value

    return _maxrss()


def _limit_address_space(mem_limit: int | None) -> int | None:
    """Cap the address space so that the resident size can grow by at most what is
    left of `mem_limit`: an allocation beyond fails here with an error, instead of
    the kernel's OOM killer picking a process."""
    if not mem_limit:
        return None
    try:
        import resource

        vm = _proc_status("VmSize")
        if vm is None:
            return None
        headroom = mem_limit - _rss()
        limit = vm + max(headroom, 0)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        return limit
    except (ImportError, ValueError, OSError):
        return None


def _predict_seconds(history: Sequence[tuple[float, float]], x: float) -> float | None:
    """Extrapolate a duration at size x from (size, seconds) of earlier points, by the
    log-log slope of the last two (clamped to [1, 2]), or linearly from one."""
    pts = sorted(p for p in history if p[0] > 0 and p[1] > 0)
    below = [p for p in pts if p[0] <= x]
    if not below:
        return None
    x1, t1 = below[-1]
    slope = 1.0
    if len(below) >= 2:
        x0, t0 = below[-2]
        if x1 > x0:
            slope = min(2.0, max(1.0, math.log(t1 / t0) / math.log(x1 / x0)))
    return t1 * (x / x1) ** slope


def _is_oom(err: BaseException) -> bool:
    msg = str(err).lower()
    return (
        isinstance(err, MemoryError)
        or "can't allocate memory" in msg
        or "out of memory" in msg
        or "cannot allocate memory" in msg
    )


class _Worker:
    def __init__(self, job: Mapping[str, Any], out: Any):
        self.job, self.out = job, out
        self.budget = float(job.get("budget_s") or 60.0)  # skip a point predicted longer
        self.target = float(job.get("target_s") or self.budget / 3)  # stop repeating after
        self.history: dict[str, list[tuple[float, float]]] = {
            k: [tuple(p) for p in v] for k, v in job.get("history", {}).items()
        }
        self.adapter: Adapter | None = None
        self.failed_prefill: dict[int, int] = {}  # batch -> shortest failed length

    def emit(self, record: Mapping[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def run(self) -> None:
        if self.job.get("threads"):
            torch.set_num_threads(int(self.job["threads"]))
        torch.manual_seed(0)
        rss_base = _rss()
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.adapter = build_adapter(self.job["impl"], self.job["model"], self.job["dtype"])
        build_s = time.perf_counter() - t0
        _reset_peak()
        limit = _limit_address_space(self.job.get("mem_limit"))
        self.emit(
            {
                "event": "ready",
                "rss_base": rss_base,
                "rss_model": _rss(),
                "build_s": build_s,
                "weight_bytes": self.adapter.weight_bytes(),
                "threads": torch.get_num_threads(),
                "address_space_limit": limit,
                "attn_implementation": getattr(
                    getattr(self.adapter.model, "config", None), "_attn_implementation", None
                ),
            }
        )
        for task in self.job["tasks"]:
            self.emit({"event": "start", "id": task["id"], "time": time.time()})
            scoped = _reset_peak()
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    result = getattr(self, "_" + task["kind"])(task)
                status = result.pop("status", "ok")
            except Exception as err:  # noqa: BLE001 (recorded, not fatal: the next task runs)
                status = "oom" if _is_oom(err) else "error"
                result = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}
                if task["kind"] == "prefill":
                    b = task.get("batch", 1)
                    self.failed_prefill[b] = min(
                        self.failed_prefill.get(b, task["length"]), task["length"]
                    )
            result.update(
                status=status,
                id=task["id"],
                wall_s=time.perf_counter() - t0,
                peak_rss=_peak_rss(),
                peak_rss_scope="point" if scoped else "process",
            )
            self.emit({"event": "result", **result})
            self.adapter.reset()  # free the task's state / cache

    # -- tasks ---------------------------------------------------------------------
    def _skip_for_time(self, key: str, size: float) -> dict[str, Any] | None:
        predicted = _predict_seconds(self.history.get(key, []), size)
        if predicted is not None and predicted > self.budget:
            return {
                "status": "skipped",
                "reason": f"predicted {predicted:.0f} s for one run "
                f"> --max-seconds-per-point {self.budget:.0f}",
                "predicted_s": predicted,
            }
        return None

    def _prefill(self, task: Mapping[str, Any]) -> dict[str, Any]:
        length, batch = task["length"], task.get("batch", 1)
        key = f"prefill:{batch}"
        failed = self.failed_prefill.get(batch)
        if failed is not None and length > failed:
            return {"status": "not-run", "reason": f"prefill of {failed} failed"}
        skip = self._skip_for_time(key, length)
        if skip:
            return skip
        ad = self.adapter
        tokens = ad.random_tokens(batch, length)
        # A short warm-up (code paths, threads); then runs of the full length until
        # `repeats` runs or `target_s` seconds, whichever comes first (at least one).
        # The first full run is dropped as a warm-up too when it is short.
        ad.prefill(tokens[:, : min(length, 64)])
        times: list[float] = []
        cpu: list[float] = []  # process CPU time of each run (all threads)
        warm = False
        max_runs = int(task.get("repeats", 3))
        while True:
            t0, c0 = time.perf_counter(), time.process_time()
            ad.prefill(tokens)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if not times and not warm and dt * 3 <= self.target and max_runs > 1:
                warm = True
                self.history.setdefault(key, []).append((length, dt))
                continue
            times.append(dt)
            cpu.append(dc)
            if len(times) >= max_runs or sum(times) >= self.target:
                break
        if not warm:
            self.history.setdefault(key, []).append((length, statistics.median(times)))
        return {
            **throughput(batch * length, times, cpu),
            "full_warmup": warm,
        }

    def _decode(self, task: Mapping[str, Any]) -> dict[str, Any]:
        position, batch = task["position"], task.get("batch", 1)
        fill = task.get("fill", "synthetic")
        ad = self.adapter
        if fill == "prefill":
            skip = self._skip_for_time(f"prefill:{batch}", position)
            if skip:
                return skip
        t0 = time.perf_counter()
        ad.start_decode(batch, position, fill)
        fill_s = time.perf_counter() - t0
        times, cpu = [], []  # wall and process CPU time (all threads) per step
        warmup = int(task.get("warmup", 2))
        steps = int(task.get("steps", 8))
        for i in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            ad.step()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                times.append(dt)
                cpu.append(dc)
            if len(times) >= 2 and sum(times) >= self.target:
                break
        return {
            **throughput(batch, times, cpu),
            "state_bytes": ad.state_bytes(),
            "fill": fill,
            "fill_s": fill_s,
            "weight_bytes": ad.weight_bytes(),
        }

    def _sample(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """Direct measurement: prefill a prompt, then decode `new` tokens, timed."""
        prompt, new, batch = task["prompt"], task["new"], task.get("batch", 1)
        ad = self.adapter
        tokens = ad.random_tokens(batch, prompt)
        ad.prefill(tokens[:, :8])
        ad.step()  # warm-up
        t0 = time.perf_counter()
        ad.prefill(tokens)
        t1 = time.perf_counter()
        for _ in range(new):
            ad.step()
        t2 = time.perf_counter()
        return {
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "total_s": t2 - t0,
            "tokens_per_s": batch * new / (t2 - t0),
        }

    def _quantize(self, task: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Turn the rgemma model into int8 in place; report the logit error on a
        random prompt against the model before."""
        ad = self.adapter
        if not isinstance(ad, RgemmaAdapter):
            raise RgemmaError("only rgemma models can be quantized")
        tokens = ad.random_tokens(1, int((task or {}).get("length", 64)), seed=7)
        ref = ad.logits(tokens).float()
        quantize(ad.model, "int8")
        ad.impl = "rgemma-int8"
        _reset_peak()
        got = ad.logits(tokens).float()
        diff = (got - ref).abs()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
        return {
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "top1_agreement": float(agree),
            "logit_std": float(ref.std()),
            "weight_bytes": ad.weight_bytes(),
            "dtype_before": str(ref.dtype),
        }

    def _compile(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """`compile_decode` the rgemma model, then compile it for each batch size of
        `task["batches"]` (two warm-up steps each), so decode points time compiled
        steps only; reports the compile time."""
        ad = self.adapter
        if not isinstance(ad, RgemmaAdapter):
            raise RgemmaError("only rgemma models can be compiled")
        compile_decode(ad.model)
        ad.impl += "-compiled"
        seconds = {}
        for b in task.get("batches", [1]):
            t0 = time.perf_counter()
            ad.start_decode(b, 16, "synthetic")
            ad.step()
            ad.step()
            seconds[str(b)] = time.perf_counter() - t0
            ad.reset()
        failed = ad.model.decode_step.failed
        return {"compile_s": seconds, "failed": failed, "status": "error" if failed else "ok"}

    def _quality(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """int8 against float32 on validation text: the perplexity of its documents,
        each scored whole (`rgemma.scoring`), and the logit error on the first one's
        first `probe_tokens` tokens."""
        ad = self.adapter
        tok, texts = _validation_texts(task)
        if not texts:
            return {"status": "skipped", "reason": "no validation text"}
        probe = torch.tensor([tok.encode(texts[0], add_bos=True)[: task.get("probe_tokens", 1024)]])

        def run() -> tuple[Any, Any]:
            score = sum(score_texts(ad.model, tok, texts, batch_size=4))
            return score, ad.logits(probe).float()

        before, ref = run()
        quantize(ad.model, "int8")
        ad.impl = "rgemma-int8"
        after, got = run()
        diff = (got - ref).abs()
        return {
            "documents": len(texts),
            "tokens": before.tokens,
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "ppl_fp32": before.perplexity,
            "ppl_int8": after.perplexity,
            "ppl_change": after.perplexity - before.perplexity,
            "ppl_change_pct": 100 * (after.perplexity / before.perplexity - 1),
            "bpb_fp32": before.bits_per_byte,
            "bpb_int8": after.bits_per_byte,
            "weight_bytes": ad.weight_bytes(),
        }


def _validation_texts(task: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """(tokenizer, texts): the documents of `task["val_paths"]` (all of them for
    held-out files, else the validation split `rgemma train` makes, `rgemma.data`),
    in order until about `task["max_tokens"]` tokens."""
    paths = [p for p in task.get("val_paths", []) if Path(p).exists()]
    if not paths:
        return None, []
    tok = Tokenizer(find_tokenizer(task.get("model_path")))
    docs = read_documents(paths, task.get("doc_chars", 16000))
    if not task.get("held_out_files"):
        _, docs = split_documents(docs, task.get("val_fraction", 0.01))
    texts, tokens = [], 0
    for doc in docs:
        if doc.text is None or tokens >= task.get("max_tokens", 20000):
            continue
        texts.append(doc.text)
        tokens += len(tok.encode(doc.text)) + 1
    return tok, texts


def _worker_main(job_path: str, out_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    with open(out_path, "a", buffering=1) as out:
        _Worker(job, out).run()
    return 0


# ----------------------------------------------------------------------------------
# Parent side: running workers
# ----------------------------------------------------------------------------------
def _task_estimate(task: Mapping[str, Any], impl: str, config, dtype: str) -> MemoryEstimate:
    kind = task["kind"]
    if kind == "prefill":
        return estimate_memory(
            config, dtype, impl, kind="prefill", length=task["length"], batch=task.get("batch", 1)
        )
    if kind == "decode":
        est = estimate_memory(
            config, dtype, impl, kind="decode", length=task["position"], batch=task.get("batch", 1)
        )
        if task.get("fill") == "prefill":
            pre = estimate_memory(
                config,
                dtype,
                impl,
                kind="prefill",
                length=task["position"],
                batch=task.get("batch", 1),
            )
            est = pre if pre.total > est.total else est
        return est
    if kind == "sample":
        return estimate_memory(
            config,
            dtype,
            impl,
            kind="prefill",
            length=task["prompt"] + task["new"],
            batch=task.get("batch", 1),
        )
    if kind in ("quantize", "quality"):  # a float32 model quantized in place
        return estimate_memory(config, dtype, "rgemma-int8", kind="load")
    return estimate_memory(config, dtype, impl, kind="load")


def run_worker(
    impl: str,
    model_spec: Mapping[str, Any],
    dtype: str,
    tasks: Sequence[Mapping[str, Any]],
    *,
    config=None,
    budget_s: float = 60.0,
    target_s: float | None = None,
    threads: int | None = None,
    memory_limit: int | None = None,
    reserve: float = DEFAULT_RESERVE,
    build_timeout: float = 900.0,
    task_timeout: float | None = None,
    isolate: str = "impl",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run `tasks` for one implementation in worker subprocess(es).

    Each task first passes the memory pre-check (`check_memory` on its estimate,
    against `memory_limit` or the available memory): those that do not fit are
    recorded as "skipped" with the estimate. A worker that dies (killed, out of
    memory, timeout) has its current task recorded as failed, and a new worker runs
    the rest; after a failed prefill, longer prefills of that implementation are
    not attempted. `isolate="point"` gives each task a fresh worker.

    Returns:
        {"impl", "dtype", "workers": [ready records], "results": {task id: record}}.
    """
    results: dict[str, Any] = {}
    workers: list[dict[str, Any]] = []
    pending = []
    for task in tasks:
        if config is not None:
            est = _task_estimate(task, impl, config, dtype)
            avail = memory_limit if memory_limit is not None else available_memory()
            if est.total > avail - reserve:
                results[task["id"]] = {
                    "id": task["id"],
                    "status": "skipped-memory",
                    "estimate": est.to_dict(),
                    "reason": f"needs an estimated {est.describe()}; {avail / GiB:.1f} GiB "
                    "available",
                }
                log(
                    f"  {impl:9s} {task['id']}: skipped (memory: needs ~{est.total / GiB:.1f} "
                    f"GiB, {avail / GiB:.1f} GiB available)"
                )
                continue
            task = {**task, "estimate_bytes": est.total}
        pending.append(dict(task))
    task_timeout = task_timeout or max(120.0, 4 * budget_s + 60)
    failed_prefill_len: int | None = None
    history: dict[str, list[list[float]]] = {}
    attempts = 0
    while pending and attempts < len(tasks) + 3:
        attempts += 1
        if failed_prefill_len is not None:
            keep = []
            for t in pending:
                if t["kind"] == "prefill" and t["length"] > failed_prefill_len:
                    results[t["id"]] = {
                        "id": t["id"],
                        "status": "not-run",
                        "reason": f"prefill of {failed_prefill_len} failed",
                    }
                else:
                    keep.append(t)
            pending = keep
            if not pending:
                break
        group = pending[:1] if isolate == "point" else pending
        avail = memory_limit if memory_limit is not None else available_memory()
        job = {
            "impl": impl,
            "model": dict(model_spec),
            "dtype": dtype,
            "tasks": group,
            "budget_s": budget_s,
            "target_s": target_s,
            "threads": threads,
            "mem_limit": int(max(avail - reserve, 0)) if avail else None,
            "history": history,
        }
        done, ready, failure = _spawn(job, build_timeout, task_timeout, log)
        if ready:
            workers.append(ready)
        for rec in done:
            task = next(t for t in group if t["id"] == rec["id"])
            rec["estimate_bytes"] = task.get("estimate_bytes")
            results[rec["id"]] = rec
            _log_result(impl, rec, log)
            if rec.get("status") == "ok":
                task = next(t for t in group if t["id"] == rec["id"])
                if task["kind"] == "prefill":
                    history.setdefault(f"prefill:{task.get('batch', 1)}", []).append(
                        [task["length"], rec["seconds"]["median"]]
                    )
            elif rec.get("status") in ("oom", "killed", "timeout") and rec["id"].startswith(
                "prefill"
            ):
                task = next(t for t in group if t["id"] == rec["id"])
                failed_prefill_len = task["length"]
        finished = {rec["id"] for rec in done}
        if failure is not None:
            current = failure.get("id")
            if current is None:  # died while building the model: every task fails
                for t in group:
                    if t["id"] not in finished:
                        results[t["id"]] = {**failure, "id": t["id"]}
                log(
                    f"  {impl:9s} worker failed before its first task: "
                    f"{failure.get('status')}: {failure.get('error', '')}"
                )
                pending = []
                break
            task = next(t for t in group if t["id"] == current)
            failure["estimate_bytes"] = task.get("estimate_bytes")
            results[current] = failure
            _log_result(impl, failure, log)
            finished.add(current)
            if task["kind"] == "prefill":
                failed_prefill_len = task["length"]
        pending = [t for t in pending if t["id"] not in finished]
    return {"impl": impl, "dtype": dtype, "workers": workers, "results": results}


def _log_result(impl: str, rec: Mapping[str, Any], log: Callable[[str], None]) -> None:
    status = rec.get("status")
    if status == "ok" and "tokens_per_s" in rec:
        extra = f"{rec['tokens_per_s']:10.1f} tok/s"
        if "seconds" in rec:
            extra += f"  (n={rec['seconds']['n']})"
        extra += f"  peak {rec.get('peak_rss', 0) / GiB:.2f} GiB"
    elif status == "ok" and isinstance(rec.get("compile_s"), dict):
        extra = "compiled in " + ", ".join(
            f"{v:.1f} s at batch {b}" for b, v in rec["compile_s"].items()
        )
    elif status == "ok":
        extra = ", ".join(
            f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float) and k not in ("wall_s",)
        )
    else:
        extra = f"{status}: {rec.get('reason') or rec.get('error') or ''}"
    log(f"  {impl:9s} {rec['id']:24s} {extra}")


def _spawn(
    job: Mapping[str, Any], build_timeout: float, task_timeout: float, log: Callable[[str], None]
) -> tuple[list[dict], dict | None, dict | None]:
    """Run one worker; return (finished task records, ready record, failure or None)."""
    with tempfile.TemporaryDirectory(prefix="rgemma-bench-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.jsonl")
        with open(job_path, "w") as f:
            json.dump(job, f)
        open(out_path, "w").close()
        err_path = os.path.join(tmp, "stderr.txt")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("PYTHONWARNINGS", "ignore")
        with open(err_path, "w") as err_f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.worker", job_path, out_path],
                stdout=subprocess.DEVNULL,
                stderr=err_f,
                env=env,
            )
            records: list[dict] = []
            ready: dict | None = None
            started_id, started_at = None, time.monotonic()
            spawn_at = time.monotonic()
            timed_out = False
            pos = 0
            while True:
                rc = proc.poll()
                with open(out_path) as f:
                    f.seek(pos)
                    chunk = f.read()
                lines = chunk.split("\n")
                pos += len(chunk) - len(lines[-1])
                for line in lines[:-1]:
                    rec = json.loads(line)
                    event = rec.pop("event")
                    if event == "ready":
                        ready = rec
                        started_at = time.monotonic()
                    elif event == "start":
                        started_id, started_at = rec["id"], time.monotonic()
                    elif event == "result":
                        records.append(rec)
                        started_id = None
                if rc is not None:
                    break
                now = time.monotonic()
                if (ready is None and now - spawn_at > build_timeout) or (
                    started_id is not None and now - started_at > task_timeout
                ):
                    proc.kill()  # our own child, by its handle
                    proc.wait()
                    timed_out = True
                    break
                time.sleep(0.2)
        with open(err_path, errors="replace") as f:
            stderr_tail = f.read()[-2000:]
    failure = None
    rc = proc.returncode
    if timed_out or rc != 0:
        if timed_out:
            status, why = (
                "timeout",
                (
                    f"no result after {task_timeout:.0f} s"
                    if ready
                    else f"model not built after {build_timeout:.0f} s"
                ),
            )
        elif rc in (-9, 137):
            status, why = "killed", "killed by SIGKILL (likely out of memory)"
        else:
            last = [ln for ln in stderr_tail.strip().splitlines() if ln.strip()]
            status = (
                "oom"
                if any(
                    s in stderr_tail.lower()
                    for s in ("can't allocate memory", "memoryerror", "out of memory")
                )
                else "crashed"
            )
            why = f"exit code {rc}: {last[-1] if last else ''}"
        failure = {
            "id": started_id,
            "status": status,
            "error": why,
            "stderr_tail": stderr_tail[-600:],
        }
    return records, ready, failure


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1], sys.argv[2]))
