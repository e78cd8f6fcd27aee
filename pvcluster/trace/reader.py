"""One streaming pass over a run's trace files, merged by virtual time, in memory that does not grow with the run.

Each process writes its own file in nearly virtual-time order: the hypervisor logs a window's events as it closes the
window, so they may run up to about a window behind one another, and a few events are stamped with an earlier time
than the line before them on purpose (a shootdown span stamped with its start, written at its end). The merge reads
the files in *epochs* of virtual time: it reads each file until it has seen an event ``slack_ns`` past the epoch's
end, sorts what falls inside the epoch (C-level ``list.sort`` on nearly sorted data) and hands it on. An event
stamped earlier than an epoch already handed on is still delivered, in the next epoch, and counted in
``ReadStats.late``; consumers that care about order (the shootdown analysis) only need an order that holds within
``slack_ns``.

Lines that do not parse are counted, never fatal: a torn last line (a process killed mid-write) in
``ReadStats.torn``, anything else in ``ReadStats.corrupt``, by file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs

_DECODE = json.JSONDecoder().decode
# Events per epoch the adaptive step aims at: large enough to amortise the sort, small enough to stay flat in memory.
_EPOCH_TARGET = 20_000


@attrs.define
class ReadStats:
    """What the pass read: files, events, and lines it could not use."""

    files: list[str] = attrs.Factory(list)
    events: int = 0
    corrupt: dict[str, int] = attrs.Factory(dict)  # file -> lines that were not a JSON trace event
    torn: list[str] = attrs.Factory(list)  # files whose last line was cut short
    late: int = 0  # events stamped before an epoch already handed on (delivered out of order)
    schema: dict[str, int] = attrs.Factory(dict)  # file -> schema version of its trace.start (1 when missing)

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "events": self.events, "corrupt_lines": self.corrupt, "torn_files": self.torn,
                "late_events": self.late, "schema": self.schema}


def trace_files(trace_dir: Path) -> list[Path]:
    """The hypervisor's file first, then the domains' by id (their order breaks ties in virtual time)."""
    def domid(p: Path) -> int:
        text = p.stem.removeprefix("dom").partition("-")[0]
        return int(text) if text.isdigit() else 1 << 30

    doms = sorted(trace_dir.glob("dom*-*.jsonl"), key=lambda p: (domid(p), p.name))
    hv = trace_dir / "hypervisor.jsonl"
    return ([hv] if hv.exists() else []) + doms


class _FileStream:
    """One file's events as (vt_ns, rank, seq, event), read on demand; events with no virtual time take the time of
    the event before them, so they keep their place."""

    def __init__(self, path: Path, rank: int, stats: ReadStats) -> None:
        self.path = path
        self.rank = rank
        self.stats = stats
        self.fh: IO[bytes] | None = open(path, "rb")  # noqa: SIM115 - closed at EOF by read_until
        self.buffer: list[tuple[int, int, int, dict[str, Any]]] = []
        self.seen_ns = 0  # the latest virtual time read so far
        self.seq = 0
        stats.schema[path.name] = 1

    def read_until(self, limit_ns: int) -> None:
        """Read until an event at or past ``limit_ns`` has been read, or the file ends."""
        fh = self.fh
        if fh is None:
            return
        name, buffer, rank = self.path.name, self.buffer, self.rank
        seen, seq = self.seen_ns, self.seq
        for line in fh:
            try:
                event = _DECODE(line.decode("utf-8"))
            except ValueError:
                self._bad(line)
                continue
            if not isinstance(event, dict) or "event" not in event:
                self._bad(line)
                continue
            vt = event.get("vt_ns")
            if type(vt) is not int:
                vt = seen
                if event["event"] == "trace.start":
                    schema = event.get("schema")
                    self.stats.schema[name] = schema if type(schema) is int else 1
            elif vt > seen:
                seen = vt
            seq += 1
            buffer.append((vt, rank, seq, event))
            if seen >= limit_ns:
                break
        else:
            fh.close()
            self.fh = None
        self.seen_ns, self.seq = seen, seq

    def _bad(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            self.stats.torn.append(self.path.name)
        else:
            self.stats.corrupt[self.path.name] = self.stats.corrupt.get(self.path.name, 0) + 1

    def take_before(self, end_ns: int) -> list[tuple[int, int, int, dict[str, Any]]]:
        """Remove and return the buffered events stamped before ``end_ns``."""
        keep: list[tuple[int, int, int, dict[str, Any]]] = []
        out: list[tuple[int, int, int, dict[str, Any]]] = []
        for item in self.buffer:
            (out if item[0] < end_ns else keep).append(item)
        self.buffer = keep
        return out

    @property
    def done(self) -> bool:
        return self.fh is None and not self.buffer


def merged(trace_dir: Path, stats: ReadStats | None = None, slack_ns: int = 100_000) -> Iterator[dict[str, Any]]:
    """Every event of every file in ``trace_dir``, in virtual-time order (ties: hypervisor, then domains by id, then
    file order), in one pass. ``stats`` (if given) is filled in as the pass goes."""
    stats = stats if stats is not None else ReadStats()
    streams = []
    for rank, path in enumerate(trace_files(trace_dir)):
        stats.files.append(path.name)
        streams.append(_FileStream(path, rank, stats))
    horizon, step, last_ns = 0, 100_000, -1
    while streams:
        end = horizon + step
        batch: list[tuple[int, int, int, dict[str, Any]]] = []
        for s in streams:
            s.read_until(end + slack_ns)
            batch += s.take_before(end)
        if all(s.fh is None for s in streams):  # every file read to its end: the rest is one last epoch
            for s in streams:
                batch += s.buffer
                s.buffer = []
        batch.sort(key=_sort_key)
        if batch and batch[0][0] < last_ns:
            stats.late += sum(1 for item in batch if item[0] < last_ns)
        stats.events += len(batch)
        for item in batch:
            yield item[3]
        if batch:
            last_ns = max(last_ns, batch[-1][0])
        streams = [s for s in streams if not s.done]
        horizon = end
        # aim each epoch at about _EPOCH_TARGET events (a sparse stretch of virtual time takes bigger steps)
        if len(batch) < _EPOCH_TARGET // 4:
            step *= 2
        elif len(batch) > _EPOCH_TARGET * 2:
            step = max(1_000, step // 2)


def _sort_key(item: tuple[int, int, int, dict[str, Any]]) -> tuple[int, int, int]:
    return item[0], item[1], item[2]
