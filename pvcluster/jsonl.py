"""JSON-lines files as a run directory holds them: complete lines, and at most one torn last line.

Every process appends one line per event (``pvcluster.trace``), so a process that was SIGKILLed can leave only
its LAST line incomplete: the bytes after the final newline. Such a tail was never an event and is dropped (a
reader learns that it was from ``JsonLines.torn_tail``). Anything else that does not parse is not a torn write but
a corrupt file: a bad line followed by more lines, or a bad line that does end in a newline, raises ValueError
naming the file and line, worded as ``pvcluster.trace.read_events`` words it.

``read_events`` itself cannot be used for a killed process's trace: it raises on the torn tail. Lines are read as
bytes and decoded per line, so a tail cut inside a multi-byte UTF-8 character is torn like any other, while invalid
UTF-8 in a complete line is still an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# One decoder for every line: json.loads would detect the encoding and build the call anew each time, which costs
# as much as the parse on trace-sized lines.
_DECODE = json.JSONDecoder().decode


class JsonLines:
    """Iterate ``(line number, object)`` over a JSON-lines file, one pass, in constant memory.

    ``require_event``: every object must be a trace event (have an ``event`` key), as ``read_events`` demands;
    False reads other JSON-lines records (``faults.jsonl``), which must still be JSON objects.
    """

    def __init__(self, path: Path, *, require_event: bool = True) -> None:
        self.path = path
        self.require_event = require_event
        self.torn_tail = False  # set once iteration has dropped an incomplete last line

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with open(self.path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = _DECODE(line.decode("utf-8"))
                except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
                    if not line.endswith(b"\n"):  # only the last line can lack its newline: a torn write
                        self.torn_tail = True
                        return
                    raise ValueError(f"{self.path}:{n}: not JSON ({exc})") from None
                if not isinstance(obj, dict) or (self.require_event and "event" not in obj):
                    what = "a trace event" if self.require_event else "a JSON object"
                    raise ValueError(f"{self.path}:{n}: not {what}")
                yield n, obj


def read_trace(path: Path) -> Iterator[dict[str, Any]]:
    """``pvcluster.trace.read_events`` for a trace whose process may have been killed mid-line."""
    for _, event in JsonLines(path):
        yield event
