"""Stopping a training run on a signal without losing it.

A scheduler's time limit or preemption (SLURM, Kubernetes, ``docker stop``) sends SIGTERM
and, a grace period later, SIGKILL; Ctrl-C sends SIGINT. Lightning's own SIGTERM handling
stops a single process only at the end of the epoch (hours into an atlas) and exits with
status 0, as if training had finished. During a fit, :class:`StopRequest` takes both
signals instead: the first asks the training plan to stop at the end of the current step,
where it saves the run's state and raises :class:`~cellsift.errors.TrainingInterrupted`; a
second signal stops at once (``KeyboardInterrupt``; :class:`~cellsift._utils.Terminated`
for SIGTERM), for a step that does not end.

Lightning answers a ``KeyboardInterrupt`` inside ``trainer.fit`` by ignoring SIGINT for the
rest of the process and calling ``sys.exit(1)``: a script would end with status 1 as if it had
failed, and a notebook could not be interrupted again. :func:`interrupts_kept` around the fit
raises the interrupt again instead and gives SIGINT its handler back.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from .._utils import Terminated

__all__ = ["SIGNALS", "StopRequest", "interrupts_kept"]

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
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Around a Lightning entry point (``trainer.fit``, a LightningCLI run): an interrupt
    that Lightning turned into ``sys.exit(1)`` is raised again as the ``KeyboardInterrupt``
    (or :class:`~cellsift._utils.Terminated`) it was, after Lightning's teardown, and SIGINT
    gets back the handler it had before, where Lightning left it ignored."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as err:
        interrupt = err.__context__  # (Lightning exits inside its `except KeyboardInterrupt`)
        if err.code != 1 or not isinstance(interrupt, KeyboardInterrupt):
            raise
        raise interrupt from None
    finally:
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        if ignored and before not in (signal.SIG_IGN, None):
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, before)
