"""Clean early exits: SIGTERM/SIGUSR1 (slurm's pre-emption and time-limit warnings) and a wall-time
budget. The trainer checks :meth:`stop_requested` once per step (reduced over all ranks), saves a
checkpoint and returns exit code 75 (``EXIT_INCOMPLETE``), so a launcher can requeue the job.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Optional

from megatron_apex.training.trainer import Callback

logger = logging.getLogger(__name__)


class GracefulExit(Callback):
    """Turns signals and ``train.exit_after_minutes`` into a save-and-stop at a step boundary."""

    def __init__(self, exit_after_minutes: Optional[float], handle_signals: bool,
                 signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.deadline = time.monotonic() + 60 * exit_after_minutes if exit_after_minutes else None
        self.received: Optional[int] = None
        self.deadline_logged = False
        self._previous = {}
        if handle_signals:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.received is None:
            logger.warning("received %s: will save a checkpoint and exit after this step",
                           signal.Signals(signum).name)
        self.received = signum

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
