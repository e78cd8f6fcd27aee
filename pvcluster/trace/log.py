"""The trace every process writes: one JSON-lines file per process under the run directory.

Every event carries ``proc`` and ``wall_ns``; simulated events add ``vt_ns`` and, where they apply, ``dom``,
``vcpu`` and ``span``. Only the wall-clock field differs between two runs of the same spec and seed. Lines are
buffered and written at the flush points ``TraceFile`` lists; a reader of a live run sees whole lines only.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WALL_FIELDS = frozenset({"wall_ns", "pid"})

# The trace-event schema (docs/trace.md). Each file's first line is a ``trace.start`` event carrying it; a file
# without one predates the field (version 1: no ``irq.enter`` events, no FLUSH_ACK guest marks).
SCHEMA_VERSION = 2


# One encoder for the process: json.dumps with any option builds a new one per call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=repr).encode


class TraceLogger:
    """What a process traces through: ``bind`` adds context to every event, and one method per level writes an event
    as the JSON object ``{**context, **fields, "event": name, "level": level, "wall_ns": now}``.

    That is the line structlog's pipeline (bound context, ``add_log_level``, a wall-clock stamp, JSON) produced, key
    for key, at about half the cost: structlog's machinery cost as much per event as the JSON itself, and both
    processes trace every hypercall.
    """

    __slots__ = ("_sink", "_context")

    def __init__(self, sink: TraceFile, context: dict[str, Any]) -> None:
        self._sink = sink
        self._context = context

    def bind(self, **context: Any) -> TraceLogger:
        return TraceLogger(self._sink, {**self._context, **context})

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        line = {**self._context, **fields}
        line["event"] = event
        line["level"] = level
        line["wall_ns"] = time.time_ns()
        self._sink.msg(_ENCODE(line))

    def debug(self, event: str, /, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, /, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, /, **fields: Any) -> None:
        self._emit("error", event, fields)

    def critical(self, event: str, /, **fields: Any) -> None:
        self._emit("critical", event, fields)


class TraceFile:
    """The file behind a process's trace: each event is one JSON line, kept in memory until ``flush`` writes
    everything kept so far with one ``write``.

    Writing and flushing each line on its own cost a system call per event. Instead each process flushes at the
    points its readers rely on: a domain process before it sends each report (so the trace of a process killed
    outright ends at its last reported window), the hypervisor at every window step, before it answers a control
    command or rejects a frame, and on a timer; both at exit (``atexit``) and in their signal handlers
    (``flush_and_exit``). A buffer that grows past ``MAX_BUFFERED`` lines is flushed at once, so a flood of events
    cannot hold memory.

    Signal handlers run between two bytecodes of the interrupted code, which may be a flush. ``flush`` therefore
    takes the buffer by swapping in a new list (a line appended meanwhile lands in one list or the other, and both
    are written), and ``flush_and_exit`` called during a flush only asks that flush to exit once it has written
    everything, so no line is lost or written twice.
    """

    MAX_BUFFERED = 10_000

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lines: list[str] = []
        self._flushing = False
        self._exit_code: int | None = None
        atexit.register(self.flush)

    def msg(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) >= self.MAX_BUFFERED and not self._flushing:
            self.flush()

    def flush(self) -> None:
        """Write every buffered line."""
        if not self._lines and self._exit_code is None:
            return
        self._flushing = True
        try:
            while self._lines:
                lines, self._lines = self._lines, []
                self._write(("\n".join(lines) + "\n").encode("utf-8", errors="replace"))
        finally:
            self._flushing = False
            if self._exit_code is not None:  # a signal handler asked to exit while this flush was writing
                os._exit(self._exit_code)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        """Write what is buffered and let go of the file (a process's own trace is closed by its exit instead)."""
        self.flush()
        atexit.unregister(self.flush)
        os.close(self._fd)

    def flush_and_exit(self, code: int) -> None:
        """For signal handlers: write everything, then end the process at once with ``code``. Returns only when
        the handler interrupted a flush, which then exits as soon as it has written everything."""
        self._exit_code = code
        if not self._flushing:
            self.flush()


def no_flush() -> None:
    """The trace flush of a process whose logger writes to no file (an in-process test's): nothing to write."""


def configure(path: Path, proc: str) -> tuple[TraceLogger, TraceFile]:
    """The process's logger, writing to ``path``, and the file behind it (whose ``flush`` the process calls)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = TraceFile(path)
    logger = TraceLogger(sink, {"proc": proc})
    if os.fstat(sink._fd).st_size == 0:  # the file's first line; a process continuing a file (restore, migrate) appends
        logger.info("trace.start", schema=SCHEMA_VERSION)
    return logger, sink


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Parse a trace file; a line that is not a JSON object raises ValueError naming the line."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(event, dict) or "event" not in event:
                raise ValueError(f"{path}:{n}: not a trace event")
            yield event


def virtual_view(event: dict[str, Any]) -> dict[str, Any]:
    """The event without its wall-clock fields: what must match between two runs with the same seed."""
    return {k: v for k, v in event.items() if k not in WALL_FIELDS}
