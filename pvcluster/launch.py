"""Starting the cluster's child processes so that none outlives its parent."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# What a domain process receives when the hypervisor process dies (domains/__main__.py)
HYPERVISOR_GONE_SIGNAL = signal.SIGHUP


def _die_with_parent(death_signal: int) -> Callable[[], None]:
    """Runs in the child before exec: send it ``death_signal`` when the parent dies, and keep terminal Ctrl-C away
    from it.

    The parent owns the child's shutdown; a Ctrl-C in the terminal reaches only the toolstack, which then brings
    the cluster down in order. A signal of its own (not the SIGTERM a live parent terminates it with) lets the
    child tell its parent's death from a termination: the kernel sends it as the forking thread exits, before the
    child's parent pid changes, so the parent pid cannot tell.
    """

    def preexec() -> None:
        os.setpgrp()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, death_signal)
        except (OSError, AttributeError):  # not Linux: the hypervisor's watchdog still stops orphans
            pass

    return preexec


def detach() -> None:
    """For ``--detach``: a new session, no death signal, so the hypervisor outlives the toolstack."""
    os.setsid()


def python_module_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def preexec(detached: bool, death_signal: int = signal.SIGTERM) -> Callable[[], None]:
    return detach if detached else _die_with_parent(death_signal)


def log_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def spawn(argv: list[str], *, log: Path, detached: bool = False,
          death_signal: int = signal.SIGTERM) -> subprocess.Popen[bytes]:
    fd = log_file(log)
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            preexec_fn=preexec(detached, death_signal),  # noqa: PLW1509 - needed for the death signal
            close_fds=True,
        )
    finally:
        os.close(fd)


async def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait for ``proc`` to exit without a thread (a death signal follows the thread that forked the child)."""
    import trio

    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        while proc.poll() is None:
            if pidfd >= 0:
                await trio.lowlevel.wait_readable(pidfd)
            else:
                await trio.sleep(0.02)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return int(proc.returncode)
