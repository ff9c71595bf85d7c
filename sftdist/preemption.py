"""Stopping on a signal: SIGTERM and SIGUSR1 (a scheduler's preemption, slurm's time limit) and Ctrl-C
ask the run to save a checkpoint at the next step boundary and exit with `EXIT_PREEMPTED`; a second
Ctrl-C stops at once. Before training has begun there is nothing to save: SIGTERM and Ctrl-C then stop
every rank at once with 143/130 (`stop_if_requested`), leaving nothing that blocks a rerun.

A leaf module: `sftdist train` installs the handlers before its heavy imports, the trainer checks the
request at every step (checkpoint.py), and the data build and a rank waiting for it check it too
(data/pipeline.py, data/cache.py), so that a launch being shut down neither hangs nor half-claims output_dir.
"""

from __future__ import annotations

import signal
from typing import Any


class _StopOnSignal:
    """Turns a preemption signal into 'save at the next step boundary, then stop'."""

    def __init__(self) -> None:
        self.requested = False
        self.stop_signum: int | None = None  # the first SIGINT/SIGTERM: stop before training (stop_if_requested)

    def install(self) -> None:
        # After a first signal, SIGINT keeps the handler `_handle` left (a second Ctrl-C stops at once).
        for sig in (signal.SIGTERM, signal.SIGUSR1) + (() if self.requested else (signal.SIGINT,)):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if signum in (signal.SIGINT, signal.SIGTERM):
            self.stop_signum = self.stop_signum or signum
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


def stop_requested() -> bool:
    """Whether SIGTERM or Ctrl-C asked this process to stop (SIGUSR1 asks for a checkpoint instead)."""
    return _stop.stop_signum is not None


def stop_if_requested(during: str) -> None:
    """Stop now, before training has saved anything, when Ctrl-C or SIGTERM asked: exit 128 + the signal (130,
    143), not `EXIT_PREEMPTED`, which promises a checkpoint to resume from. Called between the steps that
    come before training (the data build, the wait for it), which leave nothing in output_dir. SIGUSR1
    (slurm's warning before the time limit) still trains to the first step boundary and saves there: the
    job script requeues on `EXIT_PREEMPTED` only. One line, from the process that speaks for the run: a
    launch's workers leave it to the launcher."""
    signum = _stop.stop_signum
    if signum is None:
        return
    import os
    import sys

    if os.environ.get("WORLD_SIZE", "1") == "1":
        print(f"sftdist: stopped by {signal.Signals(signum).name} {during}, before training began; nothing of it was "
              "saved: run the same command again", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)
