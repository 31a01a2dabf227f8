"""SIGTERM / SIGINT (preemption, Ctrl-C) become a request to checkpoint and exit at the next step boundary.

Stopping mid-step would lose the step or save a half-updated state; the handler only sets a flag
the loop checks between steps. A second Ctrl-C interrupts at once, for a user who will not wait (train.py then says
so in one line and exits 130, like the first's stop).
"""

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = name
        log.warning(
            "%s received: saving a checkpoint at the end of this step, then stopping (exit code %d); a second "
            "Ctrl-C stops at once, without saving",
            name,
            128 + signum,
        )
