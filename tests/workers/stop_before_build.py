"""Run the sftdist CLI (`python stop_before_build.py ARGS...` = `sftdist ARGS...`), stopping itself
with SIGSTOP just before it creates the hidden directory it builds `--out` in.

A test then changes the inputs while the process is stopped, as a concurrent writer (a running
training rotating its checkpoints away) may at any moment, and resumes it with SIGCONT. Nothing
in sftdist is replaced: the process is only paused, at a point the test can name.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

stopped = False


def stop_before_build(event: str, args: tuple) -> None:
    global stopped
    if event == "os.mkdir" and not stopped and ".partial-" in os.path.basename(os.fsdecode(args[0])):
        stopped = True
        os.kill(os.getpid(), signal.SIGSTOP)


sys.addaudithook(stop_before_build)
sys.argv = ["sftdist", *sys.argv[1:]]
runpy.run_module("sftdist", run_name="__main__")
