"""One command in a fresh child process, timed, with that child's own peak RSS (not every child's: os.wait4)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence

import attrs


class ChildFailed(Exception):
    pass


@attrs.frozen
class ChildRun:
    stdout: str
    wall_s: float  # fork to exit
    maxrss_kib: int  # ru_maxrss of this child alone (KiB on Linux)
    cpu_s: float  # its user + system CPU time: what the wall time would be on an idle machine, less I/O waits


def run(argv: Sequence[str], *, timeout_s: float) -> ChildRun:
    """Run ``argv`` to its end. Its output goes to files rather than pipes: nothing has to read them while the child
    runs, so the parent can sit in ``wait4`` and the wall time is the child's alone. ChildFailed on a non-zero exit
    or after ``timeout_s`` (the child is then killed)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, text=True)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall_s = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if wall_s >= timeout_s and proc.returncode < 0:
        raise ChildFailed(f"`{' '.join(argv)}` did not finish within {timeout_s:.0f} s")
    if proc.returncode != 0:
        raise ChildFailed(f"`{' '.join(argv)}` exited {proc.returncode}:\n{stderr[-2000:]}")
    return ChildRun(stdout, wall_s, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
