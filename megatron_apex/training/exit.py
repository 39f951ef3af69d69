"""Clean early exits: SIGTERM/SIGUSR1 (slurm's pre-emption and time-limit warnings), SIGINT (Ctrl-C)
and a wall-time budget. The trainer checks :meth:`stop_requested` once per step (reduced over all
ranks), saves a checkpoint and returns exit code 75 (``EXIT_INCOMPLETE``), so a launcher can requeue
the job. Without ``checkpoint.save`` a signal still stops the run at a step boundary, but with exit
code 128 + the signal number, never 75: there is nothing to continue from. A second SIGINT aborts at
once, without saving.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Optional

from megatron_apex.training.trainer import Callback

logger = logging.getLogger(__name__)


class GracefulExit(Callback):
    """Turns signals and ``train.exit_after_minutes`` into a save-and-stop at a step boundary."""

    def __init__(self, exit_after_minutes: Optional[float], handle_signals: bool, saves: bool = True,
                 signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.deadline = time.monotonic() + 60 * exit_after_minutes if exit_after_minutes else None
        self.saves = saves
        self.received: Optional[int] = None
        self.deadline_logged = False
        self._previous = {}
        # Forked children (DataLoader workers, checkpoint writers) inherit the handler, and a Ctrl-C or
        # a scheduler's signal reaches the whole process group: only this process acts on it.
        self._pid = os.getpid()
        if handle_signals:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a forked child: the trainer process stops it (each used to print the warning too)
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now (run_training reports it)
        if self.received is None:
            then = "save a checkpoint and exit" if self.saves else "exit without saving (checkpoint.save is not set)"
            again = "; Ctrl-C again aborts at once" if signum == signal.SIGINT else ""
            logger.warning("received %s: will %s after this step%s", signal.Signals(signum).name, then, again)
            self.received = signum

    @property
    def exit_code_unsaved(self) -> int:
        """The exit code of a stop with nothing saved: 128 + the signal number, as if it had killed us."""
        return 128 + self.received if self.received is not None else 1

    def stop_requested(self, trainer) -> Optional[str]:
        if self.received is not None:
            return f"signal {signal.Signals(self.received).name}"
        # Only rank 0's clock decides, so all ranks stop at the same step (the request is reduced).
        if self.deadline is not None and trainer.ctx.rank == 0 and time.monotonic() >= self.deadline:
            if not self.deadline_logged:  # say why the job stops: the launcher only sees exit code 75
                logger.warning("train.exit_after_minutes reached: will save a checkpoint and exit after this step")
                self.deadline_logged = True
            return "train.exit_after_minutes reached"
        return None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
