"""Stopping on a signal: SIGTERM and SIGUSR1 (a scheduler's preemption, slurm's time limit) and Ctrl-C
ask the run to save a checkpoint at the next step boundary and exit with `EXIT_PREEMPTED`; a second
Ctrl-C stops at once.

A leaf module: `sftdist train` installs the handlers before its heavy imports, the trainer checks the
request at every step (checkpoint.py), and a rank waiting for the data cache gives up its wait
(data/cache.py), so that a launch being shut down does not hang on it.
"""

from __future__ import annotations

import signal
from typing import Any


class _StopOnSignal:
    """Turns a preemption signal into 'save at the next step boundary, then stop'."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        # After a first signal, SIGINT keeps the handler `_handle` left (a second Ctrl-C stops at once).
        for sig in (signal.SIGTERM, signal.SIGUSR1) + (() if self.requested else (signal.SIGINT,)):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


_stop = _StopOnSignal()


def install() -> _StopOnSignal:
    """Record preemption signals from now on, keeping any already recorded. `sftdist train` calls it
    before its heavy imports: uncaught, SIGUSR1/SIGTERM during imports or model loading would end the
    run with 138/143, which slurm's requeue does not take for a preemption. The trainer calls it again,
    in case a library replaced the handlers in between."""
    _stop.install()
    return _stop


def requested() -> bool:
    """Whether a preemption signal has arrived in this process."""
    return _stop.requested
