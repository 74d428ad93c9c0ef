"""Stops that lose nothing: SIGTERM (preemption) and SIGINT (Ctrl-C) ask the training
loop to write a checkpoint at the next step boundary and return.

The handlers set a flag and write one line to stderr with a raw `os.write` (a
signal can land inside a `print`, whose buffer is not reentrant). The loop reads it once per optimiser step with `StopSignals.agreed`, which takes the
largest request over all ranks (one all-reduce), so every rank stops after the same
step and writes its part of the same checkpoint even when only one of them got the
signal. A second SIGINT (Ctrl-C) while stopping raises `KeyboardInterrupt` at once: the
checkpoint being written, if any, is discarded (its temporary directory removed,
see `training.checkpoint`), and the previous one stays the newest.

Under torchrun a signal to one worker is enough (the others follow at the same
step). A signal to torchrun itself is forwarded to every worker, and torchrun kills
them (SIGKILL) 30 s later (torch's default): a step plus a checkpoint must fit in
that, or the kill lands inside the checkpoint and the previous one stays the newest.

Exit codes of `rgemma train` after a stop (documented in `cli/train.py`): 0 after
SIGTERM (a preemption that was honoured: the work is saved and the job can be
requeued with `--resume`), 130 after SIGINT (the shell convention for Ctrl-C).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import torch

#: Signals that stop training with a checkpoint, and the exit code of each.
STOP_SIGNALS = {signal.SIGTERM: 0, signal.SIGINT: 130}


class StopSignals:
    """While installed, SIGTERM and SIGINT request a stop instead of killing the
    process; `restore` (or leaving the `with` block) puts the previous handlers back.

    Outside the main thread (where Python cannot install handlers) it installs
    nothing and `agreed` reports only the other ranks' requests.

    Attributes:
        received: the signal this process got first (None: none yet).
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGINT from now on."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self):  # -> Self (typing.Self needs Python 3.11)
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:
            # A second Ctrl-C: stop now, save nothing more. A repeated SIGTERM is not
            # a person insisting: torchrun sends its workers SIGTERM twice within
            # milliseconds, then SIGKILL after its grace period, so it is ignored.
            if sig == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = sig
        if os.environ.get("RANK", "0") == "0":  # one line per job, not per rank
            again = " (Ctrl-C again stops at once, without one)" if sig == signal.SIGINT else ""
            os.write(
                2,
                f"rgemma: {sig.name} received: stopping after this step with a "
                f"checkpoint{again}\n".encode(),
            )

    def agreed(self, device: torch.device) -> signal.Signals | None:
        """The stop request of the whole job: SIGTERM if any rank got SIGTERM, else
        SIGINT if any got SIGINT, else None. A collective under torch.distributed:
        every rank must call it at the same step.

        Args:
            device: the training device (the all-reduce's tensor lives there, as
                NCCL needs).
        """
        from .checkpoint import max_over_ranks

        # SIGINT 2 < SIGTERM 15: the largest request prefers SIGTERM (exit code 0).
        got = max_over_ranks(int(self.received or 0), device)
        return signal.Signals(got) if got else None


def stop_exit_code(name: str) -> int:
    """The exit code of `rgemma train` stopped by signal `name` ("SIGTERM": 0,
    "SIGINT": 130)."""
    return STOP_SIGNALS[signal.Signals[name]]
