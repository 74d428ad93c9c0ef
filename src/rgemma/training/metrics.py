"""Training metrics people can read: `MetricsLogger`, made once per `train` call.

Where a run reports (only on the main process, rank 0; the others compute the same
values and write nothing):

* `out_dir/metrics.jsonl`, always: one JSON object per event (fields below). A
  resumed run first drops the records after its checkpoint's step, so the file
  reads as one uninterrupted run.
* TensorBoard (`TrainConfig.tensorboard`, `--tensorboard`): the same scalars, per
  step, in `out_dir/tensorboard/` (`torch.utils.tensorboard.SummaryWriter`; a
  resumed run hides the events after its checkpoint's step with `purge_step`).
* the console (stderr; `TrainConfig.progress`): a tqdm bar with ETA on a terminal,
  else one plain line every `log_every` steps (torchrun, CI logs, `nohup`); eval and
  checkpoint lines; a summary at the end (always).
* `out_dir/loss.png` at the end, when matplotlib is installed (`plot_metrics`;
  `rgemma train --plot RUN_DIR` draws it for a finished or running run).

Records of `metrics.jsonl` (times in seconds, memory in MiB, losses in nats per
target token):

* `start` / `resume`: step, resumed_from, num_parameters, data sizes, device, threads.
* `train`, every `log_every` steps: step, loss (that step's), loss_avg (mean over the
  steps since the previous record), grad_norm (before clipping), lr, tokens_seen,
  tokens_per_s (over the training time since the previous record: evaluation and
  checkpointing excluded), train_s, elapsed_s, peak_rss_mib (the process's peak
  resident memory), cuda_peak_mib (`torch.cuda.max_memory_allocated`, on CUDA).
* `eval`: step, val_loss, val_ppl, val_bpb, val_tokens, eval_s.
* `checkpoint`: step, path, checkpoint_s.
* `end`: the `train` result (step, tokens_seen, train_loss, val_loss/ppl/bpb,
  checkpoint, final_dir) and the summary: best_val_loss, best_val_step,
  tokens_per_s (this call's training throughput), train_s, eval_s, checkpoint_s,
  elapsed_s, peak memory.

Time accounting: from the logger's creation, every second is training time except
those spent inside `timed("eval")` and `timed("checkpoint")` (on CUDA both ends of
those sections synchronise, so queued training work is not billed to them).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from ..errors import ConfigError, InputError, RgemmaError
from ..io import atomic_path

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_NAME = "loss.png"
PHASES = ("eval", "checkpoint")  # the timed phases; the rest is training time


class TrainingDiverged(RgemmaError):
    """The training loss became NaN or infinite (the step range is named)."""


# ----------------------------------------------------------------------------------
# The metrics file
# ----------------------------------------------------------------------------------
def write_metrics(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record (a JSON object on one line) to `path`.

    If the run directory was deleted while training, it is made again with a warning
    (the records before are lost, the training is not)."""
    line = json.dumps(record) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except FileNotFoundError:
        print(
            f"rgemma: warning: {path.parent} was deleted during the run: made it again "
            "(earlier metrics are lost)",
            file=sys.stderr,
            flush=True,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records after `step` (they were logged by a run that died before
    its next checkpoint, and the resumed run logs them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def metrics_file(run: str | Path) -> Path:
    """`run/metrics.jsonl` for a run directory, `run` itself for a file."""
    run = Path(run)
    return run / METRICS_NAME if run.is_dir() else run


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (or of a run directory holding one).

    A last line without its newline (being written, or cut by a kill) is skipped;
    any other line must be a JSON object.

    Raises:
        InputError: the file is missing or unreadable, not UTF-8, or a line is not a
            JSON object (the file and line are named).
    """
    path = metrics_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"no metrics file {path} (is it a run directory of rgemma train?)"
        ) from None
    except UnicodeDecodeError as err:
        raise InputError(f"metrics file {path} is not UTF-8 ({err.reason})") from None
    except OSError as err:
        raise InputError(f"cannot read metrics file {path}: {err.strerror}") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: a partial last line
                continue
            record = None
        if not isinstance(record, dict):
            raise InputError(f"metrics file {path} line {number}: not a JSON object")
        records.append(record)
    return records


# ----------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------
def peak_memory(device: torch.device | str = "cpu") -> dict[str, float]:
    """Peak memory so far, in MiB: `peak_rss_mib` (this process's peak resident set,
    from `getrusage`; absent where the `resource` module is missing, e.g. Windows)
    and, on a CUDA device, `cuda_peak_mib` (`torch.cuda.max_memory_allocated`)."""
    out: dict[str, float] = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mib"] = round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except ImportError:  # pragma: no cover - Windows
        pass
    device = torch.device(device)
    if device.type == "cuda":
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def format_duration(seconds: float) -> str:
    """`12.3 s` under a minute, else `H:MM:SS`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _is_main_process() -> bool:
    """Rank 0 of an initialised process group, or a lone process."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _note(message: str, stream: TextIO) -> None:
    print(f"rgemma: note: {message}", file=stream, flush=True)


# ----------------------------------------------------------------------------------
# The logger
# ----------------------------------------------------------------------------------
class MetricsLogger:
    """Everything a training run reports, made once per `train` call.

    The loop calls `log_step` after every optimiser step (tensors stay on the device:
    values reach the host every `log_every` steps, in one transfer), wraps evaluation
    and checkpointing in `timed(...)` (a context manager or a decorator) and reports
    their results with `log_eval` / `log_checkpoint`, and ends with `finish`.

    Args:
        out_dir: the run directory (must exist on the main process).
        total_steps: the run's last step (`TrainConfig.max_steps`).
        start_step: the step this call starts from (0, or a checkpoint's).
        tokens_seen: tokens trained before `start_step`.
        log_every: steps between `train` records and console lines.
        resume: True when continuing from the checkpoint at `start_step`: records
            after it are dropped (kept otherwise: a fresh start deletes the file).
        progress: console progress: a tqdm bar when `stream` is a terminal, else a
            line every `log_every` steps.
        tensorboard: also write TensorBoard events to `out_dir/tensorboard/`.
        plot: write `out_dir/loss.png` at `finish` (skipped with a note when
            matplotlib is missing).
        is_main: whether this process writes anything (None: rank 0 of the
            initialised process group, or True without one).
        device: the training device (CUDA: peak memory and synchronised timing).
        stream: console output (default: `sys.stderr` at construction).
        clock: seconds, monotonic (`time.perf_counter`; tests pass a fake).

    Raises:
        ConfigError: `tensorboard` asked for without the tensorboard package.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        tokens_seen: int = 0,
        log_every: int = 10,
        resume: bool = False,
        progress: bool = True,
        tensorboard: bool = False,
        plot: bool = True,
        is_main: bool | None = None,
        device: torch.device | str = "cpu",
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_NAME
        self.total_steps = total_steps
        self.log_every = log_every
        self.is_main = _is_main_process() if is_main is None else bool(is_main)
        self.device = torch.device(device)
        self.plot = plot
        self.losses: list[list[float]] = []  # [step, loss] of every step of this call
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._start_step = start_step
        self._start_tokens = self._tokens = tokens_seen
        self._pending: list[tuple[int, Tensor, Tensor, float]] = []  # step, loss, norm, lr
        self._train_s_at_log, self._tokens_at_log = 0.0, tokens_seen  # the last record's
        self._phase_s = dict.fromkeys(PHASES, 0.0)
        self._phase: str | None = None
        self._phase_t0 = 0.0
        self._phase_report: tuple[dict[str, Any], Callable[[float | None], str]] | None = None
        self._best_eval: tuple[float, int] | None = None  # (val_loss, step)
        self._writer = None
        self._bar = None
        self._lines = False
        if self.is_main:
            writer_cls = _summary_writer() if tensorboard else None
            if resume:
                truncate_metrics(self.path, start_step)
                self._read_previous_evals()
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # of an earlier attempt that saved no checkpoint
            if writer_cls is not None:
                # purge_step hides the events a killed run logged after the checkpoint
                # (all of them on a fresh start), as the truncation does for the file.
                self._writer = writer_cls(
                    str(self.out_dir / TENSORBOARD_DIR),
                    purge_step=start_step + 1 if resume else 0,
                )
            if progress and self._stream.isatty():
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total_steps,
                    initial=start_step,
                    desc="train",
                    unit="step",
                    dynamic_ncols=True,
                    file=self._stream,
                )
            else:
                self._lines = progress
        self._t0 = self._clock()  # training time starts now

    # -- time -----------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Bill the time inside to `phase` ("eval" or "checkpoint") instead of training.

        Usable as `with logger.timed("eval"):` or as a decorator `@logger.timed("eval")`.
        A section inside another is billed to the outer one. The `log_eval` /
        `log_checkpoint` report made inside a section of its kind is written when the
        section ends, with the section's duration (`eval_s` / `checkpoint_s`); a
        section that raises writes none.

        Raises:
            ValueError: an unknown phase.
        """
        if phase not in self._phase_s:
            raise ValueError(f"unknown phase {phase!r}: one of {', '.join(PHASES)}")
        if self._phase is not None:  # nested: the outer section bills it
            yield
            return
        self._sync()
        self._phase, self._phase_t0, self._phase_report = phase, self._clock(), None
        try:
            yield
        finally:
            self._sync()
            seconds = self._clock() - self._phase_t0
            self._phase_s[phase] += seconds
            self._phase = None
        if self._phase_report is not None:  # reached only when the section succeeded
            record, line = self._phase_report
            self._phase_report = None
            record[f"{phase}_s"] = round(seconds, 3)
            write_metrics(self.path, record)
            self._say(line(seconds))

    def _phase_elapsed(self) -> float:
        return self._clock() - self._phase_t0 if self._phase is not None else 0.0

    def train_seconds(self) -> float:
        """Seconds of training so far in this call (evaluation and checkpointing out)."""
        now = self._phase_t0 if self._phase is not None else self._clock()
        return now - self._t0 - sum(self._phase_s.values())

    def seconds(self) -> dict[str, float]:
        """`train_s`, `eval_s`, `checkpoint_s` and `elapsed_s` (their sum) so far."""
        phases = dict(self._phase_s)
        if self._phase is not None:
            phases[self._phase] += self._phase_elapsed()
        train_s = self.train_seconds()
        return {
            "train_s": train_s,
            "eval_s": phases["eval"],
            "checkpoint_s": phases["checkpoint"],
            "elapsed_s": train_s + sum(phases.values()),
        }

    def _eta(self, step: int) -> float | None:
        """Seconds left at the wall-clock rate of this call (evals and checkpoints
        included, as they will recur)."""
        done = step - self._start_step
        if done <= 0:
            return None
        return (self._clock() - self._t0) / done * (self.total_steps - step)

    # -- output ---------------------------------------------------------------------
    def write(self, record: Mapping[str, Any]) -> None:
        """Append a record to `metrics.jsonl` (main process only)."""
        if self.is_main:
            write_metrics(self.path, record)

    def _say(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self._stream)
        elif self._lines:
            print(line, file=self._stream, flush=True)

    def _prefix(self, step: int) -> str:
        width = len(str(self.total_steps))
        return f"step {step:>{width}}/{self.total_steps}"

    # -- events ---------------------------------------------------------------------
    def log_step(
        self,
        step: int,
        loss: Tensor | float,
        grad_norm: Tensor | float,
        lr: float,
        tokens_seen: int,
    ) -> None:
        """Record one optimiser step; every `log_every` steps (and at the last) `flush`.

        Args:
            step: the step just done (1-based: optimiser steps so far).
            loss: the step's mean loss over its target tokens (all ranks), a 0-d
                tensor on any device (kept there until the flush) or a float.
            grad_norm: the global gradient norm before clipping (0-d tensor or float).
            lr: the learning rate the step used.
            tokens_seen: tokens trained so far, this step's included.

        Raises:
            TrainingDiverged: a loss of the flushed steps is NaN or infinite.
        """
        as_0d = lambda x: torch.as_tensor(x).detach().float().reshape(())
        self._pending.append((step, as_0d(loss), as_0d(grad_norm), float(lr)))
        self._tokens = tokens_seen
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        if step % self.log_every == 0 or step >= self.total_steps:
            self.flush()

    def flush(self) -> None:
        """Bring the buffered steps' values to the host (one transfer), check them and
        write a `train` record (and TensorBoard scalars, and a console line).

        Raises:
            TrainingDiverged: a loss is NaN or infinite (the step range is named).
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        steps = [p[0] for p in pending]
        values = torch.stack([torch.stack([p[1], p[2]]) for p in pending]).cpu().tolist()
        losses, norms = [v[0] for v in values], [v[1] for v in values]
        self.losses.extend([s, v] for s, v in zip(steps, losses))
        if not all(math.isfinite(v) for v in losses):
            raise TrainingDiverged(
                f"training loss is not finite at step {steps[0]}..{steps[-1]}: "
                f"{losses}; lower lr, or enable grad_clip"
            )
        train_s = self.train_seconds()
        window_s = train_s - self._train_s_at_log
        window_tokens = self._tokens - self._tokens_at_log
        self._train_s_at_log, self._tokens_at_log = train_s, self._tokens
        tok_s = window_tokens / window_s if window_s > 0 else None
        if not self.is_main:
            return
        record = {
            "event": "train",
            "step": steps[-1],
            "loss": losses[-1],
            "loss_avg": sum(losses) / len(losses),
            "grad_norm": norms[-1],
            "lr": pending[-1][3],
            "tokens_seen": self._tokens,
            "tokens_per_s": None if tok_s is None else round(tok_s, 1),
            "train_s": round(train_s, 3),
            "elapsed_s": round(self.seconds()["elapsed_s"], 3),
            **peak_memory(self.device),
        }
        write_metrics(self.path, record)
        if self._writer is not None:
            for (s, _, _, lr), loss, norm in zip(pending, losses, norms):
                self._writer.add_scalar("train/loss", loss, s)
                self._writer.add_scalar("train/grad_norm", norm, s)
                self._writer.add_scalar("train/lr", lr, s)
            if tok_s is not None:
                self._writer.add_scalar("train/tokens_per_s", tok_s, steps[-1])
            for key in ("peak_rss_mib", "cuda_peak_mib"):
                if key in record:
                    self._writer.add_scalar(f"memory/{key}", record[key], steps[-1])
        tok_text = "-" if tok_s is None else f"{tok_s:,.0f}"
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{losses[-1]:.4f}", lr=f"{record['lr']:.2e}", tok_s=tok_text, refresh=False
            )
        if self._lines:
            eta = self._eta(steps[-1])
            self._say(
                f"{self._prefix(steps[-1])} | loss {losses[-1]:.4f} | lr {record['lr']:.2e} | "
                f"grad_norm {norms[-1]:.3f} | {tok_text} tok/s | "
                f"elapsed {format_duration(record['elapsed_s'])} | "
                f"eta {'-' if eta is None else format_duration(eta)}"
            )

    def log_eval(self, step: int, values: Mapping[str, float]) -> None:
        """Record an evaluation (`evaluate`'s dict: val_loss, val_ppl, val_bpb, ...);
        inside `timed("eval")` it is written when the section ends, with `eval_s`."""
        loss = values.get("val_loss")
        if loss is not None and (self._best_eval is None or loss < self._best_eval[0]):
            self._best_eval = (loss, step)
        if not self.is_main:
            return
        if self._writer is not None:
            for key in ("val_loss", "val_ppl", "val_bpb"):
                if key in values:
                    self._writer.add_scalar(f"val/{key[4:]}", values[key], step)
        text = f"{self._prefix(step)} | val_loss {values['val_loss']:.4f} | " + (
            f"ppl {values['val_ppl']:.2f}"
            + (f" | bpb {values['val_bpb']:.4f}" if "val_bpb" in values else "")
        )
        self._report(
            {"event": "eval", "step": step, **values},
            lambda s: text + ("" if s is None else f" | eval {format_duration(s)}"),
        )

    def log_checkpoint(self, step: int, path: str | Path) -> None:
        """Record a checkpoint written at `step` into `path`; inside
        `timed("checkpoint")` it is written when the section ends, with `checkpoint_s`."""
        if not self.is_main:
            return
        text = f"{self._prefix(step)} | checkpoint {Path(path).name}"
        self._report(
            {"event": "checkpoint", "step": step, "path": str(path)},
            lambda s: text + ("" if s is None else f" written in {format_duration(s)}"),
        )

    def _report(self, record: dict[str, Any], line: Callable[[float | None], str]) -> None:
        """Write `record` and say `line(seconds)`: now (seconds None), or at the end of
        the timed section of the record's kind we are in."""
        if self._phase == record["event"]:
            self._phase_report = (record, line)
            return
        write_metrics(self.path, record)
        self._say(line(None))

    def _read_previous_evals(self) -> None:
        """The best validation loss of the run so far (a resumed run's file)."""
        with contextlib.suppress(InputError):
            for rec in read_metrics(self.path):
                loss = rec.get("val_loss") if rec.get("event") == "eval" else None
                if isinstance(loss, (int, float)) and (
                    self._best_eval is None or loss < self._best_eval[0]
                ):
                    self._best_eval = (loss, rec["step"])

    # -- the end --------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """This call's figures: tokens_per_s (tokens trained in this call per second
        of training time), train_s, eval_s, checkpoint_s, elapsed_s, best_val_loss,
        best_val_step (over the run's records, rank 0; this call's elsewhere), peak
        memory (MiB)."""
        times = self.seconds()
        tokens = self._tokens - self._start_tokens
        best = self._best_eval
        return {
            "tokens_per_s": tokens / times["train_s"] if times["train_s"] > 0 and tokens else None,
            **{k: round(v, 3) for k, v in times.items()},
            "best_val_loss": best[0] if best else None,
            "best_val_step": best[1] if best else None,
            **peak_memory(self.device),
        }

    def finish(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """End the run's report: flush, write the `end` record (`result` without its
        `losses`, plus `summary()`), print the summary, draw `loss.png`, close.

        Args:
            result: the loop's result (step, tokens_seen, train_loss, val_*,
                out_dir, checkpoint, final_dir).

        Returns:
            `summary()`.
        """
        self.flush()
        summary = self.summary()
        self.close()
        if not self.is_main:
            return summary
        record = {"event": "end", **{k: v for k, v in result.items() if k != "losses"}}
        record.update(summary)
        write_metrics(self.path, record)
        print(format_summary(record), file=self._stream, flush=True)
        if self.plot:
            try:
                plot_metrics(self.path, self.out_dir / PLOT_NAME)
            except _MatplotlibMissing:
                _note(
                    "matplotlib is not installed: no loss.png (pip install matplotlib)",
                    self._stream,
                )
            except Exception as err:  # noqa: BLE001 - a plot never fails a finished run
                _note(f"could not plot the loss curve: {err}", self._stream)
        return summary

    def close(self) -> None:
        """Close the bar and the TensorBoard writer (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer() -> type:
    """`torch.utils.tensorboard.SummaryWriter`, or a ConfigError saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "TrainConfig.tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'rgemma[train]')"
        ) from None
    return SummaryWriter


def format_summary(end: Mapping[str, Any]) -> str:
    """The end-of-run summary printed by `MetricsLogger.finish`, from an `end` record."""

    def get(key: str) -> Any:
        return end.get(key)

    lines = [f"steps:       {end['step']} ({end['tokens_seen']:,} tokens)"]
    if get("stopped"):
        lines.append(f"stopped:     by {end['stopped']}")
    if get("train_loss") is not None:
        lines.append(f"train loss:  {end['train_loss']:.4f}")
    if get("val_loss") is not None:
        line = f"val loss:    {end['val_loss']:.4f}  ppl {end['val_ppl']:.2f}"
        if get("val_bpb") is not None:
            line += f"  bits/byte {end['val_bpb']:.4f}"
        if get("best_val_loss") is not None and get("best_val_step") is not None:
            line += f"  (best {end['best_val_loss']:.4f} at step {end['best_val_step']})"
        lines.append(line)
    if get("tokens_per_s"):
        lines.append(f"throughput:  {end['tokens_per_s']:,.0f} tokens/s (training time only)")
    if get("elapsed_s") is not None:
        lines.append(
            f"time:        {format_duration(end['elapsed_s'])}: train "
            f"{format_duration(end['train_s'])}, eval {format_duration(end['eval_s'])}, "
            f"checkpoints {format_duration(end['checkpoint_s'])}"
        )
    memory = []
    if get("peak_rss_mib") is not None:
        memory.append(f"{end['peak_rss_mib']:,.0f} MiB resident")
    if get("cuda_peak_mib") is not None:
        memory.append(f"{end['cuda_peak_mib']:,.0f} MiB CUDA allocated")
    if memory:
        lines.append("peak memory: " + ", ".join(memory))
    if get("checkpoint"):
        lines.append(f"checkpoint:  {end['checkpoint']}")
    if get("final_dir"):
        lines.append(f"final model: {end['final_dir']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# The loss plot
# ----------------------------------------------------------------------------------
class _MatplotlibMissing(InputError):
    """Plotting needs matplotlib."""


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with bias correction
    (the first points are not pulled towards 0). `weight` in [0, 1): 0 is no
    smoothing."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_metrics(
    run: str | Path, out: str | Path | None = None, *, smoothing: float | None = None
) -> Path:
    """Draw a run's loss curve from its `metrics.jsonl` into a PNG.

    Train loss (each record's `loss_avg`, faint, and smoothed with `smooth`), the
    validation loss at each evaluation (points), and the learning rate on a second
    axis, against the optimiser step. Works on a running run (a partial last line is
    skipped).

    Args:
        run: a run directory or its `metrics.jsonl`.
        out: the PNG to write (default: `loss.png` beside the metrics file), written
            atomically.
        smoothing: the smoothing weight in [0, 1) (None: an average over about 2%
            of the records, `1 - 50 / n`, none under 50 records).

    Returns:
        The PNG's path.

    Raises:
        InputError: a missing or bad metrics file (named), one without training
            records, or matplotlib not installed.
    """
    path = metrics_file(run)
    records = read_metrics(path)
    train = [r for r in records if r.get("event") == "train" and "step" in r and "loss" in r]
    if not train:
        raise InputError(f"metrics file {path} has no training records to plot yet")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise _MatplotlibMissing(
            "plotting needs matplotlib: pip install matplotlib (or pip install 'rgemma[train]')"
        ) from None
    evals = [r for r in records if r.get("event") == "eval" and "val_loss" in r]
    steps = [r["step"] for r in train]
    losses = [r.get("loss_avg", r["loss"]) for r in train]
    if smoothing is None:
        smoothing = max(0.0, 1 - 50 / len(losses))

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="C0", alpha=0.3, linewidth=1)
    ax.plot(steps, smooth(losses, smoothing), color="C0", linewidth=2, label="train loss")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            color="C3",
            markersize=4,
            label="val loss",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any("lr" in r for r in train):
        ax_lr = ax.twinx()
        lr_steps = [r["step"] for r in train if "lr" in r]
        ax_lr.plot(lr_steps, [r["lr"] for r in train if "lr" in r], "--", color="C2", linewidth=1)
        ax_lr.set_ylabel("learning rate", color="C2")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles.append(ax_lr.lines[0])
        labels.append("learning rate")
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(f"{path.parent.name}: step {steps[-1]}, train loss {losses[-1]:.4f}")
    out = Path(out) if out is not None else path.parent / PLOT_NAME
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return out
