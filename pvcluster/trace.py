"""structlog set-up shared by every process: one JSON-lines file per process under the run directory.

Every event carries ``proc`` and ``wall_ns``; simulated events add ``vt_ns`` and, where they apply, ``dom``,
``vcpu`` and ``span``. Only the wall-clock field differs between two runs of the same spec and seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import IO, Any

import structlog

WALL_FIELDS = frozenset({"wall_ns", "pid"})


def _add_wall(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["wall_ns"] = time.time_ns()
    return event


def _json(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    return json.dumps(dict(event), separators=(",", ":"), default=repr)


class _LineFile:
    """A structlog logger that writes one line per event and flushes, so a crash loses nothing logged."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def msg(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()

    info = debug = warning = error = critical = msg


def configure(path: Path, proc: str) -> structlog.BoundLogger:
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[structlog.processors.add_log_level, _add_wall, _json],
        logger_factory=lambda *_: _LineFile(stream),
        cache_logger_on_first_use=True,
    )
    log: structlog.BoundLogger = structlog.get_logger().bind(proc=proc)
    return log


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
