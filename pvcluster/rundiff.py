"""The first point where two runs' virtual-time traces part ways.

The same spec and seed must give the same trace, up to what the host decides: wall-clock times, pids, socket
paths. ``first_divergence`` compares two run directories trace file by trace file (matched by name), each event
reduced to its virtual view (``normalize``), and reports where each diverging file first differs.

What is host-dependent and so not compared: the fields ``pvcluster.trace.virtual_view`` drops (``WALL_FIELDS``),
the ``HOST_FIELDS`` (pids, endpoints, paths), the ``HOST_EVENTS`` (the listening endpoints; control requests,
whose number depends on how often a client polled; a send that failed because the peer process had already exited;
who joined from where and what authentication let in), the pid in dmesg's "created, process NNN" text, and any
event marked ``hostdep`` (a log line about which process runs a domain where: the same cluster run locally or
across hosts differs only there). A ``HOST_ORDERED`` event (a process's exit) is compared, but not its position
among the others. ``level`` and everything else is compared.

Order. A domain-process trace is one process in virtual time: compared in file order. The hypervisor trace
interleaves every domain, and that interleaving is not all virtual: at start-up each domain's build reply lands
when its process gets there, so d2's first run-state may precede d1's in one run and follow it in the next (seen
in two runs of the default spec).
With ``by_domain`` (the default) the hypervisor trace is compared as one stream per ``dom`` (plus one for events
about no domain), each in file order: the order that the simulation does fix. ``by_domain=False`` compares the
file as written.

A killed process's trace ends at its last completed window, so with ``upto_shortest`` a stream that merely ends
early (a prefix of the other side's) is not a divergence; a file missing on one side is an empty stream.

Both files are read in lockstep, one event from each in turn; an event waits in a queue only until the other
side's event of the same stream arrives, so memory is bounded by how far the two files' interleavings drift apart,
not by their length.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from pvcluster.jsonl import JsonLines
from pvcluster.trace import WALL_FIELDS

HYPERVISOR_TRACE = "hypervisor.jsonl"
HOST_FIELDS = frozenset({"pid", "bus", "control", "endpoint", "run_dir", "path"})
HOST_EVENTS = frozenset({"hypervisor.listening", "control.request", "bus.send_failed",
                         # who joined from where, and what the bus's authentication let in or kept out
                         "domain.joined", "domain.join_refused", "auth.accepted", "auth.refused",
                         "auth.handshake_failed", "auth.suppressed", "control.refused", "control.create_refused",
                         # a dump holds the cluster at a boundary and moves no virtual time: a run dumped along the
                         # way is the same run (the debugger's stops do cut windows, so gdb.* events are compared)
                         "dump.paused", "dump.resumed", "dump.failed",
                         # the toolstack's dump of an ended domain is written beside the run, when the host gets to it
                         "domain.coredump", "domain.coredump_failed"})
# Events whose place among the others is the host's: a process exits (and its exit is traced) when the host gets
# to it. Each is compared in a stream of its own, so its fields count but not its position.
HOST_ORDERED = frozenset({"domain.process_exit"})
_PID_TEXT = re.compile(r"\bprocess \d+")
_NOT_COMPARED = WALL_FIELDS | HOST_FIELDS  # what pvcluster.trace.virtual_view drops, and the host's own fields
_MISSING = object()  # a field one event lacks: differs from any value, None included

Stream = tuple[str, int | None]  # (file name, dom of the hypervisor stream or None)


@attrs.frozen
class StreamDivergence:
    """Where one stream first differs: its ``index``-th compared event (0-based, after the ignored ones). An event
    of None means that side ends there. ``line_a``/``line_b`` are the events' line numbers, to look them up."""

    file: str
    dom: int | None  # the hypervisor trace's stream about this domain (by_domain); None: the whole file
    index: int
    event_a: dict[str, Any] | None
    event_b: dict[str, Any] | None
    line_a: int | None
    line_b: int | None
    vt_ns: int  # the earlier of the two events' virtual times: what orders divergences

    @property
    def where(self) -> str:
        return self.file if self.dom is None else f"{self.file} (d{self.dom})"

    @property
    def differing_fields(self) -> list[str]:
        if self.event_a is None or self.event_b is None:
            return []
        a, b = self.event_a, self.event_b
        return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


@attrs.frozen
class Divergence:
    """The earliest divergence by virtual time, and every diverging stream (earliest first, ``first`` included)."""

    first: StreamDivergence
    streams: tuple[StreamDivergence, ...]

    @property
    def file(self) -> str:
        return self.first.file

    @property
    def index(self) -> int:
        return self.first.index

    @property
    def event_a(self) -> dict[str, Any] | None:
        return self.first.event_a

    @property
    def event_b(self) -> dict[str, Any] | None:
        return self.first.event_b

    @property
    def files(self) -> list[str]:
        """Every file that diverges, earliest first."""
        return list(dict.fromkeys(s.file for s in self.streams))


def normalize(event: dict[str, Any]) -> dict[str, Any] | None:
    """The part of ``event`` that must match between two runs of the same spec and seed; None for an event that is
    host-dependent as a whole."""
    if event["event"] in HOST_EVENTS or event.get("hostdep"):
        return None
    # virtual_view and HOST_FIELDS in one pass: a trace has millions of events
    out = {k: v for k, v in event.items() if k not in _NOT_COMPARED}
    if out["event"] == "dmesg" and isinstance(out.get("text"), str):
        out["text"] = _PID_TEXT.sub("process <pid>", out["text"])
    return out


def _stream(path: Path, file: str, by_domain: bool) -> Iterator[tuple[Stream, int, dict[str, Any]]]:
    if not path.exists():
        return
    split = by_domain and file == HYPERVISOR_TRACE
    for n, event in JsonLines(path):
        view = normalize(event)
        if view is not None:
            dom = event.get("dom")
            name = f"{file} ({event['event']})" if event["event"] in HOST_ORDERED else file
            yield (name, dom if split and isinstance(dom, int) else None), n, view


def _vt(*events: dict[str, Any] | None) -> int:
    vts = [e["vt_ns"] for e in events if e is not None and isinstance(e.get("vt_ns"), int)]
    return min(vts) if vts else 0  # an event with no virtual time sorts first: nothing orders it later


class _Lockstep:
    """One file pair, both sides read in turn; ``pending[side][stream]`` holds events the other side has yet to
    reach."""

    def __init__(self, upto_shortest: bool) -> None:
        self.upto_shortest = upto_shortest
        self.pending: tuple[dict[Stream, deque[tuple[int, dict[str, Any]]]], ...] = ({}, {})
        self.matched: dict[Stream, int] = {}
        self.settled: set[Stream] = set()  # diverged, or (upto_shortest) one side ended: skip the rest
        self.found: list[StreamDivergence] = []

    def feed(self, side: int, stream: Stream, line: int, event: dict[str, Any], other_done: bool) -> None:
        if stream in self.settled:
            return
        theirs = self.pending[1 - side].get(stream)
        if theirs:
            other_line, other = theirs.popleft()
            pair = ((line, event), (other_line, other)) if side == 0 else ((other_line, other), (line, event))
            if event == other:
                self.matched[stream] = self.matched.get(stream, 0) + 1
            else:
                self._diverge(stream, pair[0], pair[1])
        elif other_done:  # the other side has nothing more for this stream: this is where it ends
            first = self._first_pending(side, stream) or (line, event)
            self._ends(stream, side, first)
        else:
            self.pending[side].setdefault(stream, deque()).append((line, event))

    def _first_pending(self, side: int, stream: Stream) -> tuple[int, dict[str, Any]] | None:
        queue = self.pending[side].get(stream)
        return queue[0] if queue else None

    def _ends(self, stream: Stream, side: int, first: tuple[int, dict[str, Any]]) -> None:
        """``side`` has ``first`` and more; the other side's stream ended."""
        if self.upto_shortest:
            self._settle(stream)
        elif side == 0:
            self._diverge(stream, first, None)
        else:
            self._diverge(stream, None, first)

    def _diverge(self, stream: Stream, a: tuple[int, dict[str, Any]] | None,
                 b: tuple[int, dict[str, Any]] | None) -> None:
        ev_a, ev_b = (a[1] if a else None), (b[1] if b else None)
        self.found.append(StreamDivergence(stream[0], stream[1], self.matched.get(stream, 0), ev_a, ev_b,
                                           a[0] if a else None, b[0] if b else None, _vt(ev_a, ev_b)))
        self._settle(stream)

    def _settle(self, stream: Stream) -> None:
        self.settled.add(stream)
        for side in self.pending:
            side.pop(stream, None)

    def finish(self) -> None:
        for side in (0, 1):
            for stream, queue in list(self.pending[side].items()):
                if queue and stream not in self.settled:
                    self._ends(stream, side, queue[0])


def _diff_file(file: str, path_a: Path, path_b: Path, upto_shortest: bool, by_domain: bool) -> list[StreamDivergence]:
    step = _Lockstep(upto_shortest)
    sides = (_stream(path_a, file, by_domain), _stream(path_b, file, by_domain))
    done = [False, False]
    for items in itertools.zip_longest(*sides):
        for side, item in enumerate(items):
            if item is None:
                done[side] = True
            else:
                stream, line, event = item
                step.feed(side, stream, line, event, done[1 - side])
    step.finish()
    return step.found


def _trace_files(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "trace").glob("*.jsonl")}


def first_divergence(run_a: Path, run_b: Path, *, upto_shortest: bool = False,
                     by_domain: bool = True) -> Divergence | None:
    """Where the traces of ``run_a`` and ``run_b`` first differ, or None if they do not. Raises ValueError for a
    corrupt trace line (a torn last line is ignored)."""
    found: list[StreamDivergence] = []
    for file in sorted(_trace_files(run_a) | _trace_files(run_b), key=lambda f: (f != HYPERVISOR_TRACE, f)):
        found += _diff_file(file, run_a / "trace" / file, run_b / "trace" / file, upto_shortest, by_domain)
    if not found:
        return None
    found.sort(key=lambda d: (d.vt_ns, d.file != HYPERVISOR_TRACE, d.file, -1 if d.dom is None else d.dom, d.index))
    return Divergence(found[0], tuple(found))


def _show(event: dict[str, Any] | None, line: int | None, ends: str) -> str:
    if event is None:
        return f"({ends} ends here)"
    return f"line {line}: {json.dumps(event, sort_keys=True, default=repr)}"


def format_divergence(div: Divergence | None) -> str:
    if div is None:
        return "no divergence: the virtual-time traces match"
    first = div.first
    lines = [f"first divergence at vt {first.vt_ns} ns: {first.where}, event #{first.index}"]
    if first.differing_fields:
        lines.append(f"  fields that differ: {', '.join(first.differing_fields)}")
    lines += [f"  A {_show(first.event_a, first.line_a, 'A')}", f"  B {_show(first.event_b, first.line_b, 'B')}"]
    if len(div.streams) > 1:
        lines.append("diverging streams (earliest first):")
        lines += [f"  {d.where}: event #{d.index} at vt {d.vt_ns} ns" for d in div.streams]
    return "\n".join(lines)
