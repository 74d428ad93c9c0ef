"""Training metrics (rgemma.training.metrics): metrics.jsonl records and their time
accounting (on a fake clock), console lines off a terminal and the bar on one,
TensorBoard events read back with TensorBoard's own reader (resume included), the
loss plot and its errors, and one real tiny run with all of them."""

from __future__ import annotations

import io
import json
import random
import struct
import sys
from pathlib import Path

import pytest
import torch

from rgemma.errors import ConfigError, InputError
from rgemma.training import TrainConfig, train
from rgemma.training.metrics import (
    MetricsLogger,
    TrainingDiverged,
    format_summary,
    plot_metrics,
    read_metrics,
    smooth,
)

TOKENIZER = (
    Path(__file__).parent.parent / "src" / "rgemma" / "assets" / "bundled" / "tokenizer.model"
)


class FakeClock:
    """A clock the test advances by hand (seconds)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _logger(tmp_path: Path, clock: FakeClock, **kw) -> MetricsLogger:
    args = {"total_steps": 6, "log_every": 2, "progress": False, "plot": False, "clock": clock}
    args.update(kw)
    args.setdefault("stream", io.StringIO())
    return MetricsLogger(tmp_path, **args)


def _records(path: Path, event: str) -> list[dict]:
    return [r for r in read_metrics(path) if r["event"] == event]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ----------------------------------------------------------------------------------
# Records and time accounting
# ----------------------------------------------------------------------------------
def test_records_and_throughput_exclude_eval_and_checkpoint_time(tmp_path):
    """Each step takes 1 s and trains 100 tokens; an evaluation (5 s) and a
    checkpoint (3 s) in between change the elapsed time but not the throughput."""
    clock = FakeClock()
    log = _logger(tmp_path, clock)
    log.write({"event": "start", "step": 0})
    losses = [3.0, 2.5, 2.25, 2.0, 1.75, 1.5]
    for step in range(1, 7):
        clock.t += 1.0
        log.log_step(
            step, torch.tensor(losses[step - 1]), torch.tensor(0.5 * step), 1e-3, step * 100
        )
        if step == 3:
            with log.timed("eval"):
                clock.t += 5.0
                log.log_eval(step, {"val_loss": 2.4, "val_ppl": 11.0, "val_bpb": 1.1})
        if step == 5:
            with log.timed("checkpoint"):
                log.flush()  # as the loop does before saving: step 5 alone
                clock.t += 3.0
                log.log_checkpoint(step, tmp_path / "checkpoints" / "step_0000005")

    train_recs = _records(log.path, "train")
    assert [r["step"] for r in train_recs] == [2, 4, 5, 6]
    assert [r["loss"] for r in train_recs] == [2.5, 2.0, 1.75, 1.5]
    assert [r["loss_avg"] for r in train_recs] == [2.75, 2.125, 1.75, 1.5]
    assert [r["grad_norm"] for r in train_recs] == [1.0, 2.0, 2.5, 3.0]
    assert [r["lr"] for r in train_recs] == [1e-3] * 4
    assert [r["tokens_seen"] for r in train_recs] == [200, 400, 500, 600]
    assert [r["tokens_per_s"] for r in train_recs] == [100.0] * 4
    assert [r["train_s"] for r in train_recs] == [2.0, 4.0, 5.0, 6.0]
    assert [r["elapsed_s"] for r in train_recs] == [2.0, 9.0, 10.0, 14.0]
    assert all(r["peak_rss_mib"] > 10 for r in train_recs)  # the process's, in MiB
    (ev,) = _records(log.path, "eval")
    assert ev == {
        "event": "eval",
        "step": 3,
        "val_loss": 2.4,
        "val_ppl": 11.0,
        "val_bpb": 1.1,
        "eval_s": 5.0,
    }
    (ck,) = _records(log.path, "checkpoint")
    assert ck["step"] == 5 and ck["checkpoint_s"] == 3.0 and ck["path"].endswith("step_0000005")
    assert log.losses == [[s, v] for s, v in zip(range(1, 7), losses)]

    last = {"train_loss": 1.5, "val_loss": 2.4, "val_ppl": 11.0, "val_bpb": 1.1}
    summary = log.finish({"step": 6, "tokens_seen": 600, "losses": log.losses, **last})
    assert {
        k: summary[k] for k in ("tokens_per_s", "train_s", "eval_s", "checkpoint_s", "elapsed_s")
    } == {
        "tokens_per_s": 100.0,
        "train_s": 6.0,
        "eval_s": 5.0,
        "checkpoint_s": 3.0,
        "elapsed_s": 14.0,
    }
    assert (summary["best_val_loss"], summary["best_val_step"]) == (2.4, 3)
    (end,) = _records(log.path, "end")
    assert "losses" not in end and end["train_loss"] == 1.5 and end["tokens_per_s"] == 100.0
    assert [r["event"] for r in read_metrics(log.path)] == [
        "start", "train", "eval", "train", "train", "checkpoint", "train", "end"
    ]  # fmt: skip
    printed = log._stream.getvalue()
    assert printed == format_summary(end) + "\n"
    assert "throughput:  100 tokens/s (training time only)" in printed
    assert "time:        14.0 s: train 6.0 s, eval 5.0 s, checkpoints 3.0 s" in printed
    assert "val loss:    2.4000  ppl 11.00  bits/byte 1.1000  (best 2.4000 at step 3)" in printed


def test_non_tty_progress_lines(tmp_path):
    clock = FakeClock()
    out = io.StringIO()
    log = _logger(tmp_path, clock, total_steps=4, progress=True, stream=out)
    for step in (1, 2):
        clock.t += 1.5
        log.log_step(step, torch.tensor(2.5), torch.tensor(0.5), 1e-3, step * 300)
    with log.timed("eval"):
        clock.t += 2.0
        log.log_eval(2, {"val_loss": 2.25, "val_ppl": 9.4877})
    for step in (3, 4):
        clock.t += 1.5
        log.log_step(step, torch.tensor(2.0), torch.tensor(0.25), 5e-4, step * 300)
    assert out.getvalue().splitlines() == [
        # 600 tokens in 3 s of training; 2 steps in 3 s of wall time, 2 left: 3 s
        "step 2/4 | loss 2.5000 | lr 1.00e-03 | grad_norm 0.500 | 200 tok/s | elapsed 3.0 s | eta 3.0 s",
        "step 2/4 | val_loss 2.2500 | ppl 9.49 | eval 2.0 s",
        # the evaluation is out of the throughput, in the elapsed time and the ETA
        "step 4/4 | loss 2.0000 | lr 5.00e-04 | grad_norm 0.250 | 200 tok/s | elapsed 8.0 s | eta 0.0 s",
    ]
    log.close()


def test_terminal_gets_a_bar(tmp_path):
    out = FakeTTY()
    log = _logger(tmp_path, FakeClock(), total_steps=4, progress=True, stream=out)
    for step in (1, 2):
        log.log_step(step, torch.tensor(2.5), torch.tensor(0.5), 1e-3, step * 300)
    log.log_eval(2, {"val_loss": 2.25, "val_ppl": 9.4877})
    log.close()
    text = out.getvalue()
    assert "train:  50%|" in text and "2/4" in text and "loss=2.5000" in text
    assert "step 2/4 | val_loss 2.2500 | ppl 9.49" in text
    assert "grad_norm" not in text  # the plain lines are for non-terminals only


def test_only_the_main_process_writes_and_all_see_divergence(tmp_path):
    out = io.StringIO()
    log = _logger(tmp_path, FakeClock(), is_main=False, progress=True, stream=out)
    log.log_step(1, torch.tensor(2.0), torch.tensor(1.0), 1e-3, 100)
    log.log_step(2, torch.tensor(1.5), torch.tensor(1.0), 1e-3, 200)
    log.log_eval(2, {"val_loss": 2.0, "val_ppl": 7.39})
    assert log.losses == [[1, 2.0], [2, 1.5]]
    log.log_step(3, torch.tensor(float("nan")), torch.tensor(1.0), 1e-3, 300)
    with pytest.raises(TrainingDiverged, match=r"not finite at step 3\.\.4"):
        log.log_step(4, torch.tensor(1.0), torch.tensor(1.0), 1e-3, 400)
    assert log.finish({"step": 4, "tokens_seen": 400})["best_val_loss"] == 2.0
    assert list(tmp_path.iterdir()) == [] and out.getvalue() == ""


def test_timed_rejects_unknown_phase_and_bills_nested_sections_once(tmp_path):
    clock = FakeClock()
    log = _logger(tmp_path, clock)
    with pytest.raises(ValueError, match="unknown phase 'save'"), log.timed("save"):
        pass
    with log.timed("checkpoint"):
        clock.t += 1.0
        with log.timed("eval"):
            clock.t += 2.0
    clock.t += 0.5
    assert log.seconds() == {"train_s": 0.5, "eval_s": 0.0, "checkpoint_s": 3.0, "elapsed_s": 3.5}


# ----------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------
def test_tensorboard_events_and_resume_purge(tmp_path):
    """A run logs steps 1..5 and dies; resuming from its step-3 checkpoint drops
    steps 4 and 5 from metrics.jsonl and hides them in TensorBoard."""
    first = [4.0, 3.5, 3.25, 3.0, 2.875]
    resumed = [3.125, 2.9375, 2.75]
    log = _logger(tmp_path, FakeClock(), log_every=1, tensorboard=True)
    for step, loss in enumerate(first, 1):
        log.log_step(step, torch.tensor(loss), torch.tensor(1.0), 1e-3 * step, step * 10)
        if step == 2:
            log.log_eval(2, {"val_loss": 3.75, "val_ppl": 42.5, "val_bpb": 1.5})
    log.close()  # killed after step 5 (its last checkpoint: step 3)
    logdir = tmp_path / "tensorboard"
    (old,) = logdir.iterdir()
    # Event files are read in name order, which starts with their creation second:
    # make the killed run's file a second older, as it is in a real restart.
    parts = old.name.split(".")
    parts[3] = f"{int(parts[3]) - 1:010d}"
    old.rename(logdir / ".".join(parts))

    log = _logger(tmp_path, FakeClock(), log_every=1, tensorboard=True, resume=True, start_step=3)
    for step, loss in enumerate(resumed, 4):
        log.log_step(step, torch.tensor(loss), torch.tensor(2.0), 1e-4, step * 10)
    log.log_eval(6, {"val_loss": 3.875, "val_ppl": 48.2, "val_bpb": 1.55})
    summary = log.finish({"step": 6, "tokens_seen": 60})
    assert (summary["best_val_loss"], summary["best_val_step"]) == (3.75, 2)  # the run's

    expect = list(enumerate(first[:3] + resumed, 1))
    assert [(r["step"], r["loss"]) for r in _records(log.path, "train")] == expect
    assert _scalars(logdir, "train/loss") == expect  # exact: dyadic values
    assert _scalars(logdir, "train/grad_norm") == [(s, 1.0 if s <= 3 else 2.0) for s in range(1, 7)]
    lrs = _scalars(logdir, "train/lr")
    assert [s for s, _ in lrs] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in lrs] == pytest.approx([1e-3, 2e-3, 3e-3, 1e-4, 1e-4, 1e-4], rel=1e-6)
    assert _scalars(logdir, "val/loss") == [(2, 3.75), (6, 3.875)]
    assert [s for s, _ in _scalars(logdir, "val/bpb")] == [2, 6]
    assert [s for s, _ in _scalars(logdir, "memory/peak_rss_mib")] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_missing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(
        ConfigError, match=r"needs the tensorboard package: pip install tensorboard"
    ):
        _logger(tmp_path, FakeClock(), tensorboard=True)
    _logger(tmp_path, FakeClock()).close()  # not asked for: not needed


# ----------------------------------------------------------------------------------
# The plot
# ----------------------------------------------------------------------------------
def _write_run(run: Path, n: int = 60) -> None:
    run.mkdir()
    rng = random.Random(0)
    lines = [{"event": "start", "step": 0}]
    for step in range(1, n + 1):
        loss = 8.0 / (1 + 0.05 * step) + rng.random() * 0.2
        lines.append({"event": "train", "step": step, "loss": loss, "loss_avg": loss, "lr": 1e-3})
        if step % 20 == 0:
            lines.append({"event": "eval", "step": step, "val_loss": loss + 0.1, "val_ppl": 1.0})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (run / "metrics.jsonl").write_text(text + '{"event": "train", "st', encoding="utf-8")


def test_plot_from_metrics_file_and_cli(tmp_path, capsys):
    from rgemma.cli import main

    run = tmp_path / "run"
    _write_run(run)  # a running run: its last line is being written
    out = plot_metrics(run)
    assert out == run / "loss.png" and _png_size(out) == (960, 540)
    out.unlink()
    assert main(["train", "--plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "loss.png")
    assert _png_size(run / "loss.png") == (960, 540)
    assert plot_metrics(run / "metrics.jsonl", tmp_path / "x.png") == tmp_path / "x.png"


def test_plot_errors_name_the_file(tmp_path, capsys):
    from rgemma.cli import main

    missing = tmp_path / "nope"
    with pytest.raises(InputError, match=f"no metrics file {missing / 'metrics.jsonl'}"):
        plot_metrics(missing / "metrics.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "start", "step": 0}\nnot json\n{"event": "end", "step": 1}\n')
    with pytest.raises(InputError, match=f"metrics file {bad} line 2: not a JSON object"):
        plot_metrics(bad)
    bad.write_text('{"event": "start", "step": 0}\n')
    with pytest.raises(InputError, match=f"metrics file {bad} has no training records"):
        plot_metrics(bad)
    assert main(["train", "--plot", str(missing)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"rgemma: error: no metrics file {missing} (is it a run directory of rgemma train?)\n"
    )
    assert main(["train", "--plot", str(missing), "--config", "c.json"]) == 2
    assert "--plot draws an existing run" in capsys.readouterr().err


def test_missing_matplotlib_skips_the_plot_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = io.StringIO()
    log = _logger(tmp_path, FakeClock(), plot=True, stream=out)
    log.log_step(1, torch.tensor(2.0), torch.tensor(1.0), 1e-3, 100)
    log.finish({"step": 1, "tokens_seen": 100, "train_loss": 2.0})
    assert "rgemma: note: matplotlib is not installed: no loss.png" in out.getvalue()
    assert not (tmp_path / "loss.png").exists()


def test_smooth_is_a_debiased_moving_average():
    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert smooth([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])
    assert smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])


# ----------------------------------------------------------------------------------
# A real run
# ----------------------------------------------------------------------------------
@pytest.mark.skipif(not TOKENIZER.is_file(), reason="bundled tokenizer missing")
def test_train_writes_metrics_tensorboard_and_plot(tmp_path, capsys):
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "far", "away"]
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(200))
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    (tmp_path / "val.txt").write_text(text[:2000], encoding="utf-8")
    cfg = TrainConfig(
        model={"preset": "test-tiny", "vocab_size": 4096},
        tokenizer=str(TOKENIZER),
        train_data=[str(tmp_path / "train.txt")],
        val_data=[str(tmp_path / "val.txt")],
        seq_len=32,
        batch_size=2,
        max_steps=4,
        warmup_steps=1,
        save_every=2,
        eval_every=2,
        eval_batches=1,
        log_every=2,
        out_dir=str(tmp_path / "run"),
        progress=True,  # stderr is not a terminal here: lines
        save_final=False,
        tensorboard=True,
    )
    result = train(cfg)
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [r["event"] for r in records] == [
        "start", "train", "eval", "checkpoint", "train", "eval", "checkpoint", "end"
    ]  # fmt: skip
    end = records[-1]
    tokens = 4 * 2 * 32
    assert end["tokens_seen"] == result["tokens_seen"] == tokens
    # Throughput is over training time only; the three parts add up to the total.
    train_s = end["train_s"]  # rounded to 1 ms
    assert tokens / (train_s + 5e-4) <= end["tokens_per_s"] <= tokens / (train_s - 5e-4)
    assert end["eval_s"] > 0 and end["checkpoint_s"] > 0
    assert end["train_s"] + end["eval_s"] + end["checkpoint_s"] == pytest.approx(
        end["elapsed_s"], abs=2e-3
    )
    evals = [r for r in records if r["event"] == "eval"]
    assert sum(r["eval_s"] for r in evals) == pytest.approx(end["eval_s"], abs=2e-3)
    assert {"val_loss", "val_ppl", "val_bpb", "val_tokens"} <= set(evals[-1])
    assert end["val_loss"] == evals[-1]["val_loss"] == result["val_loss"]
    train_recs = [r for r in records if r["event"] == "train"]
    assert [r["tokens_seen"] for r in train_recs] == [tokens // 2, tokens]
    assert [r["loss"] for r in train_recs] == [v for s, v in result["losses"] if s % 2 == 0]
    tb = _scalars(run / "tensorboard", "train/loss")
    assert [s for s, _ in tb] == [1, 2, 3, 4]
    assert [v for _, v in tb] == pytest.approx([v for _, v in result["losses"]], rel=1e-6)
    assert _png_size(run / "loss.png") == (960, 540)
    err = capsys.readouterr().err
    assert (
        "step 2/4 | loss " in err
        and "step 4/4 | val_loss " in err
        and "checkpoint step_0000004" in err
    )
    assert f"steps:       4 ({tokens:,} tokens)" in err and "throughput:" in err and "%|" not in err


def test_cli_tensorboard_flag_sets_the_config(tmp_path, monkeypatch):
    import importlib

    from rgemma.cli import main

    seen = []
    fake = lambda cfg: seen.append(cfg) or {}
    monkeypatch.setattr(importlib.import_module("rgemma.training"), "train", fake)
    argv = ["train", "model=test-tiny", 'train_data=["a.txt"]', "--out", str(tmp_path)]
    assert main(argv) == 0 and seen[-1].tensorboard is False
    assert main([*argv, "--tensorboard"]) == 0 and seen[-1].tensorboard is True
