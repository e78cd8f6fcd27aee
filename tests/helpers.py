"""Small helpers shared by the unit tests of hypercall families."""

from __future__ import annotations

from typing import Any


class RecordingLog:
    """Stands in for the structlog logger a hypercall traces to, keeping every event for assertions."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    warning = info
