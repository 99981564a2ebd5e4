"""Fault injection for the kill tests: with ``STACKWISE_FAULT_KILL_AT=N`` set, the process kills itself with
SIGKILL at the N-th write point it reaches. A write point sits wherever a crash would be most harmful: after a
temporary file is written but before it is renamed into place, and between the two renames of a folder
replacement. Running a command with N = 1, 2, 3, ... until it completes kills it once inside every write it
makes (``tests/test_faults.py``). Unset (always, outside tests), a write point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "STACKWISE_FAULT_KILL_AT"
_reached = 0


def point() -> None:
    global _reached
    target = os.environ.get(ENV)
    if not target:
        return
    _reached += 1
    if _reached == int(target):
        os.kill(os.getpid(), signal.SIGKILL)
