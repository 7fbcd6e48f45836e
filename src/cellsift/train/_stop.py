"""Stopping a training run on a signal without losing it.

A scheduler's time limit or preemption (SLURM, Kubernetes, ``docker stop``) sends SIGTERM
and, a grace period later, SIGKILL; Ctrl-C sends SIGINT. Lightning's own SIGTERM handling
stops a single process only at the end of the epoch (hours into an atlas) and exits with
status 0, as if training had finished. During a fit, :class:`StopRequest` takes both
signals instead: the first asks the training plan to stop at the end of the current step,
where it saves the run's state and raises :class:`~cellsift.errors.TrainingInterrupted`; a
second signal stops at once (``KeyboardInterrupt``), for a step that does not end.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["SIGNALS", "StopRequest"]

#: The signals a fit answers by saving its state at the end of the step.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Holds SIGTERM and SIGINT while installed: ``signum`` is the first one received (None
    until then). The handler only records it (what runs between two bytecodes of the main
    thread must not write files or print); the plan acts on it at the end of the step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Take the signals (only the main thread can); False where they cannot be taken."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return True

    def restore(self) -> None:
        """Give the signals back to the handlers they had before :meth:`install`."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            if handler is not None:  # (None: installed outside Python, not restorable)
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            return
        self.restore()  # the second signal: at once, as without this request
        raise KeyboardInterrupt
