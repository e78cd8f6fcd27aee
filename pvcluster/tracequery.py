"""Following a running cluster's traces: the events a test script waits for (``Cluster.wait_for``).

Every process appends one JSON line per event, written out at its flush points (``pvcluster.trace.TraceFile``: a
domain at each report, the hypervisor at each step and on a timer); a ``TraceCursor`` remembers how far each file was
read, so waiting costs one read of what is new, and a line still being written (no newline yet) is read next time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs


@attrs.define
class TraceCursor:
    offsets: dict[Path, int] = attrs.Factory(dict)

    def new_lines(self, path: Path) -> list[str]:
        try:
            with open(path, "rb") as fh:
                fh.seek(self.offsets.get(path, 0))
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offsets[path] = self.offsets.get(path, 0) + len(complete)
        return complete.decode("utf-8", errors="replace").splitlines()


@attrs.frozen
class TraceQuery:
    run_dir: Path
    event: str | None
    dom: int | None
    fields: Mapping[str, Any]
    where: Callable[[dict[str, Any]], bool] | None = None

    def scan(self, cursor: TraceCursor) -> Iterator[dict[str, Any]]:
        """Matching events in what ``cursor`` has not read yet (hypervisor first, then domains by id)."""
        trace = self.run_dir / "trace"
        files = [trace / "hypervisor.jsonl", *sorted(trace.glob("dom*-*.jsonl"))]
        for path in files:
            for line in cursor.new_lines(path):
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(e, dict) and self.matches(e):
                    yield e

    def matches(self, e: dict[str, Any]) -> bool:
        if self.event is not None and e.get("event") != self.event:
            return False
        if self.dom is not None and e.get("dom") != self.dom:
            return False
        if any(e.get(k) != v for k, v in self.fields.items()):
            return False
        return self.where is None or bool(self.where(e))

    def __str__(self) -> str:
        what = [f"event {self.event!r}" if self.event else "trace event"]
        if self.dom is not None:
            what.append(f"for domain {self.dom}")
        if self.fields:
            what.append("with " + ", ".join(f"{k}={v!r}" for k, v in self.fields.items()))
        return " ".join(what)
