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
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

import attrs

_text_decode = json.JSONDecoder().decode


def _stdlib_decode(line: bytes) -> Any:
    return _text_decode(line.decode("utf-8"))


try:  # orjson parses trace lines several times faster; the standard library does the same job without it
    from orjson import loads as _fast_decode
except ImportError:  # pragma: no cover - orjson is a dependency, but a plain checkout may lack it
    _fast_decode = _stdlib_decode  # type: ignore[assignment]


def _decode(line: bytes) -> Any:
    try:
        return _fast_decode(line)
    except ValueError:  # what orjson refuses and json takes (integers past 64 bits), or a line that is not JSON
        return _stdlib_decode(line)


# The writer (pvcluster.trace.log) puts "event" after every field, so its last occurrence on a line is the event's
# own name (inside a JSON string a quote is always escaped, so the pattern cannot come from a value).
_EVENT_KEY = b'"event":"'
# Events per epoch the adaptive step aims at: large enough to amortise the sort, small enough to stay flat in memory.
_EPOCH_TARGET = 20_000


@attrs.define
class ReadStats:
    """What the pass read: files, events, and lines it could not use."""

    files: list[str] = attrs.Factory(list)
    events: int = 0
    skipped: int = 0  # lines of events the consumer did not ask for, left unparsed
    corrupt: dict[str, int] = attrs.Factory(dict)  # file -> lines that were not a JSON trace event
    torn: list[str] = attrs.Factory(list)  # files whose last line was cut short
    late: int = 0  # events stamped before an epoch already handed on (delivered out of order)
    end_ns: int = 0  # the latest virtual time read
    schema: dict[str, int] = attrs.Factory(dict)  # file -> schema version of its trace.start (1 when missing)

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "events": self.events, "skipped": self.skipped, "corrupt_lines": self.corrupt,
                "torn_files": self.torn, "late_events": self.late, "schema": self.schema}


def trace_domain(path: Path) -> tuple[int, str] | None:
    """(domid, name) of a domain's trace file ``domN-NAME.jsonl``; None for any other file."""
    domid, _, name = path.stem.removeprefix("dom").partition("-")
    return (int(domid), name) if path.name.startswith("dom") and domid.isdigit() else None


def trace_files(trace_dir: Path) -> list[Path]:
    """The hypervisor's file first, then the domains' by id (their order breaks ties in virtual time)."""
    def domid(p: Path) -> int:
        dom = trace_domain(p)
        return dom[0] if dom is not None else 1 << 30

    doms = sorted(trace_dir.glob("dom*-*.jsonl"), key=lambda p: (domid(p), p.name))
    hv = trace_dir / "hypervisor.jsonl"
    return ([hv] if hv.exists() else []) + doms


class _FileStream:
    """One file's events as (vt_ns, rank, seq, event), read on demand; events with no virtual time take the time of
    the event before them, so they keep their place."""

    def __init__(self, path: Path, rank: int, stats: ReadStats, wanted: frozenset[bytes] | None) -> None:
        self.path = path
        self.wanted = wanted
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
        name, buffer, rank, wanted = self.path.name, self.buffer, self.rank, self.wanted
        seen, seq, skipped, at = self.seen_ns, self.seq, 0, -1
        for line in fh:
            if wanted is not None:
                at = line.rfind(_EVENT_KEY)
                if at >= 0:
                    at += 9  # len(_EVENT_KEY)
                    if line[at:line.find(b'"', at)] not in wanted:
                        skipped += 1
                        continue
            try:
                event = _fast_decode(line)
            except ValueError:  # not JSON, not UTF-8, or what only the standard library takes
                try:
                    event = _stdlib_decode(line)
                except ValueError:
                    self._bad(line)
                    continue
            if type(event) is not dict or "event" not in event:
                self._bad(line)
                continue
            if at < 0 and wanted is not None and str(event["event"]).encode() not in wanted:
                skipped += 1  # a line written some other way (spaces after the colons): filtered once parsed
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
        self.stats.skipped += skipped

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

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    @property
    def done(self) -> bool:
        return self.fh is None and not self.buffer


def merged(trace_dir: Path, stats: ReadStats | None = None, slack_ns: int = 100_000,
           events: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every event of every file in ``trace_dir``, in virtual-time order (ties: hypervisor, then domains by id, then
    file order), in one pass. ``stats`` (if given) is filled in as the pass goes. ``events``: only these event names
    (the others are recognised by their name and never parsed, which is most of the time saved)."""
    for batch in merged_batches(trace_dir, stats, slack_ns, events):
        yield from batch


def merged_batches(trace_dir: Path, stats: ReadStats | None = None, slack_ns: int = 100_000,
                   events: Collection[str] | None = None) -> Iterator[list[dict[str, Any]]]:
    """``merged``, one epoch at a time: lists of events, each in order and after the one before (a consumer that
    loops over each list itself saves a generator step per event)."""
    stats = stats if stats is not None else ReadStats()
    wanted = None if events is None else frozenset(e.encode() for e in {*events, "trace.start"})
    streams = []
    for rank, path in enumerate(trace_files(trace_dir)):
        stats.files.append(path.name)
        streams.append(_FileStream(path, rank, stats, wanted))
    try:
        yield from _epochs(streams, stats, slack_ns)
    finally:  # a consumer that stops early (a plot's time window) leaves no file open
        for s in streams:
            s.close()


def _epochs(streams: list[_FileStream], stats: ReadStats, slack_ns: int) -> Iterator[list[dict[str, Any]]]:
    """The merge proper: one sorted epoch of virtual time after another (see the module docstring)."""
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
        batch.sort()  # (vt, rank, seq) is unique, so the event dicts themselves are never compared
        if batch:
            if batch[0][0] < last_ns:
                stats.late += sum(1 for item in batch if item[0] < last_ns)
            last_ns = max(last_ns, batch[-1][0])
            stats.events += len(batch)
            stats.end_ns = max(stats.end_ns, last_ns)
            yield [item[3] for item in batch]
        streams = [s for s in streams if not s.done]
        horizon = end
        # aim each epoch at about _EPOCH_TARGET events (a sparse stretch of virtual time takes bigger steps)
        if len(batch) < _EPOCH_TARGET // 4:
            step *= 2
        elif len(batch) > _EPOCH_TARGET * 2:
            step = max(1_000, step // 2)
