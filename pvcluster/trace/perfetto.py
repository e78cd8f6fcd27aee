"""``pvcluster trace --perfetto FILE``: a run as a binary Perfetto trace (protobuf ``TrackEvent``s) for ui.perfetto.dev.

Layout, with virtual ns as timestamps:

* a process per domain (``domN NAME``, pid ``1000 + N``) holding, per vCPU, a thread track ``vcpuV`` with its run
  states as slices and three sibling tracks: ``vcpuV hypercalls`` (trap to result), ``vcpuV shootdowns`` (request
  to done mark, the latency breakdown as arguments) and ``vcpuV events`` (instants: TLB flushes, IPIs sent,
  interrupts taken, event-channel sends and deliveries, faults aimed at the vCPU);
* a ``hypervisor`` process with a track per pCPU (which vCPU it ran) and tracks for what belongs to no vCPU;
* flows (arrows): each shootdown to every target's flush, each IPI to the target's next interrupt of that vector,
  each event-channel event from its send to its delivery.

Slices on one Perfetto track must nest strictly, so every kind of slice has its own track, and overlapping slices
of one kind (which the simulator should not produce, but a damaged trace might) go to extra tracks of the same name,
which the UI shows as one. Packets are streamed into the file in timestamp order through a reorder heap (the end of a
slice is known at its start, and is held back until the records are ``LAG_NS`` past it), so memory stays flat in the
length of the run; only the shootdowns (from the analysis pass) are held in full. Trace processor sorts a trace
without flush markers in full anyway, but an ordered file is what it prefers and what other readers expect.

The ``perfetto`` package (the ``perfetto`` extra) provides the protos and the streaming builder; its trace processor
is not used (it downloads a binary at run time).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvcluster.trace.records import (
    DomainEnd,
    EventDelivered,
    EventSent,
    Fault,
    Hypercall,
    Ipi,
    IrqEnter,
    Multicall,
    Other,
    Record,
    RunState,
)

if TYPE_CHECKING:
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TracePacket, TrackEvent

    from pvcluster.trace.run import Run
    from pvcluster.trace.shootdowns import Shootdown

INSTALL_HINT = "pip install 'pvcluster[perfetto]'"
SEQUENCE_ID = 0x5056  # one trusted packet sequence for the whole trace ("PV")
HV_PID = 1000
# per-vCPU track kinds, in their display order under the domain
KINDS = ("hypercalls", "shootdowns", "events")
# How far behind the records the reorder heap is drained: the reader's merge may deliver an event up to its slack
# late, and a vCPU's first run-state change reaches back to the state before it.
LAG_NS = 100_000
# IPIs per (vCPU, vector) awaiting the interrupt they raise; older ones are left without an arrow beyond this
MAX_WAITING = 64


def _protos() -> tuple[Any, Any]:
    """(the ``perfetto_trace_pb2`` module, ``StreamingTraceProtoBuilder``), or a RuntimeError saying what to install."""
    try:
        from perfetto.protos.perfetto.trace import perfetto_trace_pb2
        from perfetto.trace_builder.proto_builder import StreamingTraceProtoBuilder
    except ImportError as exc:
        raise RuntimeError(f"writing a Perfetto trace needs the perfetto package: {INSTALL_HINT} ({exc})") from None
    return perfetto_trace_pb2, StreamingTraceProtoBuilder


def domain_pid(dom: int) -> int:
    return HV_PID + dom


def vcpu_tid(dom: int, vcpu: int) -> int:
    """Unique across the trace, as Perfetto wants tids (a domain has at most 32 vCPUs)."""
    return domain_pid(dom) * 100 + vcpu


class _Writer:
    """Packets into the file in timestamp order: descriptors at once, events through a reorder heap that is drained
    up to the virtual time the records have reached (ties keep the order they were queued in)."""

    def __init__(self, pb: Any, builder: Any) -> None:
        self.pb = pb
        self.builder = builder
        self.heap: list[tuple[int, int, TracePacket]] = []
        self.seq = itertools.count()
        self.packets = 0
        self.slices = 0
        self.instants = 0

    def write(self, packet: TracePacket) -> None:
        self.builder.write_packet(packet)
        self.packets += 1

    def event(self, ts: int, track: int, kind: int, name: str | None = None, *, flows: Iterable[int] = (),
              ends: Iterable[int] = (), args: dict[str, Any] | None = None) -> None:
        packet = self.pb.TracePacket()
        packet.timestamp = max(ts, 0)
        packet.trusted_packet_sequence_id = SEQUENCE_ID
        ev = packet.track_event
        ev.type = kind
        ev.track_uuid = track
        if name is not None:
            ev.name = name
        ev.flow_ids.extend(flows)
        ev.terminating_flow_ids.extend(ends)
        if args:
            _annotate(ev, args)
        heapq.heappush(self.heap, (packet.timestamp, next(self.seq), packet))

    def slice(self, start: int, end: int, track: int, name: str, *, flows: Iterable[int] = (),
              args: dict[str, Any] | None = None) -> None:
        """A whole slice (its end is held in the heap until the stream reaches it)."""
        self.event(start, track, self.pb.TrackEvent.TYPE_SLICE_BEGIN, name, flows=flows, args=args)
        self.event(max(end, start), track, self.pb.TrackEvent.TYPE_SLICE_END)
        self.slices += 1

    def begin(self, ts: int, track: int, name: str, args: dict[str, Any] | None = None) -> None:
        self.event(ts, track, self.pb.TrackEvent.TYPE_SLICE_BEGIN, name, args=args)
        self.slices += 1

    def end(self, ts: int, track: int) -> None:
        self.event(ts, track, self.pb.TrackEvent.TYPE_SLICE_END)

    def instant(self, ts: int, track: int, name: str, *, flows: Iterable[int] = (), ends: Iterable[int] = (),
                args: dict[str, Any] | None = None) -> None:
        self.event(ts, track, self.pb.TrackEvent.TYPE_INSTANT, name, flows=flows, ends=ends, args=args)
        self.instants += 1

    def drain(self, upto_ns: int | None = None) -> None:
        """Write every queued event stamped at or before ``upto_ns`` (None: all of them)."""
        heap = self.heap
        while heap and (upto_ns is None or heap[0][0] <= upto_ns):
            self.write(heapq.heappop(heap)[2])


def _annotate(ev: TrackEvent, args: dict[str, Any]) -> None:
    """``args`` as the event's debug annotations (shown under Arguments in the UI); a dict becomes nested entries."""
    for key, value in args.items():
        if value is None:
            continue
        _set_value(ev.debug_annotations.add(), key, value)


def _set_value(ann: Any, key: str, value: Any) -> None:
    ann.name = key
    if isinstance(value, bool):
        ann.bool_value = value
    elif isinstance(value, int):
        ann.int_value = value
    elif isinstance(value, float):
        ann.double_value = value
    elif isinstance(value, dict):
        for k, v in value.items():
            if v is not None:
                _set_value(ann.dict_entries.add(), str(k), v)
    elif isinstance(value, list | tuple):
        ann.string_value = ", ".join(str(v) for v in value)
    else:
        ann.string_value = str(value)


class _Tracks:
    """Track descriptors, written the first time a track is used: processes, vCPU threads, their sibling tracks
    (with overflow lanes for overlapping slices) and the hypervisor's tracks."""

    def __init__(self, writer: _Writer, names: dict[int, tuple[str, str]]) -> None:
        self.w = writer
        self.pb = writer.pb
        self.names = names  # domid -> (name, design)
        self.uuids = itertools.count(1)
        self.count = 0
        self.processes: dict[int | None, int] = {}  # dom (None: the hypervisor) -> uuid
        self.threads: dict[tuple[int, int], int] = {}
        self.named: dict[tuple[Any, ...], int] = {}
        self.lanes: dict[tuple[Any, ...], list[list[int]]] = {}  # key -> [[uuid, busy until], ...]

    def _descriptor(self, fill: Callable[[Any], None]) -> int:
        uuid = next(self.uuids)
        packet = self.pb.TracePacket()
        packet.trusted_packet_sequence_id = SEQUENCE_ID
        desc = packet.track_descriptor
        desc.uuid = uuid
        fill(desc)
        self.w.write(packet)
        self.count += 1
        return uuid

    def process(self, dom: int | None) -> int:
        uuid = self.processes.get(dom)
        if uuid is None:
            def fill(d: Any) -> None:
                if dom is None:
                    d.process.pid, d.process.process_name = HV_PID, "hypervisor"
                else:
                    name, design = self.names.get(dom, (f"dom{dom}", ""))
                    d.process.pid, d.process.process_name = domain_pid(dom), f"dom{dom} {name}"
                    if design:
                        d.process.process_labels.append(design)
                # vCPU 10 after vCPU 9, and each vCPU's tracks together
                d.child_ordering = self.pb.TrackDescriptor.EXPLICIT
            uuid = self.processes[dom] = self._descriptor(fill)
        return uuid

    def thread(self, dom: int, vcpu: int) -> int:
        uuid = self.threads.get((dom, vcpu))
        if uuid is None:
            parent = self.process(dom)

            def fill(d: Any) -> None:
                d.parent_uuid = parent
                d.thread.pid, d.thread.tid = domain_pid(dom), vcpu_tid(dom, vcpu)
                d.thread.thread_name = f"vcpu{vcpu}"
                d.sibling_order_rank = vcpu * (len(KINDS) + 1)
            uuid = self.threads[dom, vcpu] = self._descriptor(fill)
        return uuid

    def _child(self, dom: int | None, name: str, rank: int) -> int:
        parent = self.process(dom)

        def fill(d: Any) -> None:
            d.parent_uuid, d.name, d.sibling_order_rank = parent, name, rank
        return self._descriptor(fill)

    def _vcpu_track(self, dom: int, vcpu: int, kind: str) -> tuple[str, int]:
        self.thread(dom, vcpu)  # the vCPU's thread track comes first, so its process knows the thread
        return f"vcpu{vcpu} {kind}", vcpu * (len(KINDS) + 1) + 1 + KINDS.index(kind)

    def vcpu(self, dom: int, vcpu: int, kind: str) -> int:
        """The vCPU's track for instants of ``kind``."""
        key = (dom, vcpu, kind)
        uuid = self.named.get(key)
        if uuid is None:
            uuid = self.named[key] = self._child(dom, *self._vcpu_track(dom, vcpu, kind))
        return uuid

    def other(self, dom: int | None, name: str) -> int:
        """A track of the domain's (or, for None, the hypervisor's) that belongs to no vCPU, listed first."""
        key = (dom, name)
        uuid = self.named.get(key)
        if uuid is None:
            uuid = self.named[key] = self._child(dom, name, -1)
        return uuid

    def lane(self, dom: int, vcpu: int, kind: str, start: int, end: int) -> int:
        """A track of the vCPU's ``kind`` free from ``start`` (ties allowed) to hold a slice until ``end``."""
        lanes = self.lanes.setdefault((dom, vcpu, kind), [])
        for lane in lanes:
            if lane[1] <= start:
                lane[1] = max(end, start)
                return lane[0]
        uuid = self.vcpu(dom, vcpu, kind) if not lanes else self._child(dom, *self._vcpu_track(dom, vcpu, kind))
        lanes.append([uuid, max(end, start)])
        return uuid

    def pcpu(self, pcpu: int) -> int:
        key = (None, "pcpu", pcpu)
        uuid = self.named.get(key)
        if uuid is None:
            uuid = self.named[key] = self._child(None, f"pCPU {pcpu}", pcpu)
        return uuid


class _Exporter:
    """Turns the records of one pass (and the analysis's shootdowns) into packets."""

    def __init__(self, writer: _Writer, tracks: _Tracks, shootdowns: list[Shootdown]) -> None:
        self.w = writer
        self.t = tracks
        self.shootdowns = sorted(shootdowns, key=lambda s: (s.start_ns, s.dom, s.initiator))
        self.next_sd = 0
        self.flow_ids = itertools.count(1)
        self.flows = 0
        self.now = 0
        self.state: dict[tuple[int, int], int] = {}  # (dom, vcpu) -> open run-state slice's track
        self.seen: set[tuple[int, int]] = set()  # vCPUs whose run states have begun
        self.since: dict[tuple[int, int], int] = {}  # (dom, vcpu) -> when its open run-state slice began
        self.ended: dict[int, int] = {}  # dom -> when it shut down or crashed
        self.ending: list[tuple[int, int]] = []  # heap of (when to close its vCPUs' slices, dom)
        self.on_pcpu: dict[int, tuple[int, int]] = {}  # pcpu -> (dom, vcpu) whose slice is open on it
        self.pcpu_of: dict[tuple[int, int], int] = {}
        self.multicall: dict[tuple[int, int], Multicall] = {}
        self.ipis: dict[tuple[int, int, int], list[int]] = {}  # (dom, dest, vector) -> flows awaiting irq.enter
        self.events: dict[tuple[int, int], int] = {}  # (receiving dom, eid) -> flow awaiting event.delivered
        self.send: Other | None = None  # the last evtchn.send: names the sender of the event.sent after it
        self.fault_vcpu: dict[int, int] = {}  # fid -> the vCPU its inject named (its outcome and end do not)
        self.handlers: dict[type, Callable[[Any], None]] = {
            RunState: self.runstate, Hypercall: self.hypercall, Multicall: self.remember_multicall, Ipi: self.ipi,
            IrqEnter: self.irq, EventSent: self.event_sent, EventDelivered: self.event_delivered, Fault: self.fault,
            DomainEnd: self.domain_end, Other: self.other,
        }

    def flow(self) -> int:
        self.flows += 1
        return next(self.flow_ids)

    def feed(self, records: Iterable[Record]) -> None:
        handlers = self.handlers
        for rec in records:
            vt = rec.vt_ns
            if vt > self.now:
                self.now = vt
                self.shootdowns_until(vt)
                while self.ending and self.ending[0][0] <= vt:
                    dom = heapq.heappop(self.ending)[1]
                    self.close_domain(dom, self.ended[dom])
                self.w.drain(vt - LAG_NS)
            handler = handlers.get(type(rec))
            if handler is not None:
                handler(rec)

    def finish(self, end_ns: int) -> None:
        """Emit the shootdowns not yet emitted, close every open run-state and pCPU slice, write what is queued."""
        self.shootdowns_until(None)
        end = max(end_ns, self.now, max((ts for ts, _, _ in self.w.heap), default=0))
        for dom in {dom for dom, _ in self.state}:
            self.close_domain(dom, self.ended.get(dom, end))
        self.w.drain()

    def close_domain(self, dom: int, end_ns: int) -> None:
        """End the open run-state and pCPU slices of ``dom``'s vCPUs at ``end_ns`` (or where they began)."""
        for key in [k for k in self.state if k[0] == dom]:
            at = max(self.since[key], end_ns)
            self.w.end(at, self.state.pop(key))
            pcpu = self.pcpu_of.pop(key, None)
            if pcpu is not None and self.on_pcpu.get(pcpu) == key:
                del self.on_pcpu[pcpu]
                self.w.end(at, self.t.pcpu(pcpu))

    # -- shootdowns (from the analysis pass) -------------------------------------------------------------------------

    def shootdowns_until(self, vt_ns: int | None) -> None:
        sds = self.shootdowns
        while self.next_sd < len(sds) and (vt_ns is None or sds[self.next_sd].start_ns <= vt_ns):
            self.shootdown(sds[self.next_sd])
            self.next_sd += 1

    def shootdown(self, sd: Shootdown) -> None:
        flows = []
        for target, at in sd.flushes:
            fid = self.flow()
            flows.append(fid)
            self.w.instant(at, self.t.vcpu(sd.dom, target, "events"), f"tlb flush (r{sd.round} by vcpu{sd.initiator})",
                           ends=[fid], args={"round": sd.round, "initiator": sd.initiator, "mode": sd.mode})
        track = self.t.lane(sd.dom, sd.initiator, "shootdowns", sd.start_ns, sd.end_ns)
        self.w.slice(sd.start_ns, sd.end_ns, track, f"shootdown r{sd.round} ({sd.mode})", flows=flows, args={
            "mode": sd.mode, "round": sd.round, "latency_ns": sd.latency_ns, "targets": sd.targets,
            "preempted": sd.preempted, "messages": sd.messages, "hypercalls": sd.hypercalls,
            "critical_target": sd.critical_target, "breakdown_ns": dict(sd.breakdown),
            "sends": [f"vcpu{v}@{t}" for v, t in sd.sends], "flushes": [f"vcpu{v}@{t}" for v, t in sd.flushes],
        })

    # -- records ----------------------------------------------------------------------------------------------------

    def runstate(self, r: RunState) -> None:
        if r.dom is None or r.vcpu is None:
            return
        key = (r.dom, r.vcpu)
        track = self.t.thread(r.dom, r.vcpu)
        if key not in self.seen:
            self.seen.add(key)
            if r.duration_ns > 0:  # the vCPU's first change: show the state it came from (offline until brought up)
                self.w.begin(r.vt_ns - r.duration_ns, track, r.previous)
                self.state[key] = track
        if self.state.get(key) is not None:
            self.w.end(r.vt_ns, track)
        self.w.begin(r.vt_ns, track, r.state, {"why": r.why, "pcpu": r.pcpu, "previous": r.previous,
                                               "previous_ns": r.duration_ns})
        self.state[key] = track
        self.since[key] = r.vt_ns
        self.pcpu_change(key, r)

    def pcpu_change(self, key: tuple[int, int], r: RunState) -> None:
        """Keep the pCPU tracks: a vCPU's slice on its pCPU while it runs there. A vCPU that takes a pCPU closes
        the slice of one still shown on it (same-instant hand-overs may arrive in either order)."""
        old = self.pcpu_of.pop(key, None)
        if old is not None and self.on_pcpu.get(old) == key:
            del self.on_pcpu[old]
            self.w.end(r.vt_ns, self.t.pcpu(old))
        if r.state == "running" and r.pcpu is not None:
            other = self.on_pcpu.pop(r.pcpu, None)
            track = self.t.pcpu(r.pcpu)
            if other is not None:
                self.pcpu_of.pop(other, None)
                self.w.end(r.vt_ns, track)
            name = self.t.names.get(key[0], (f"dom{key[0]}", ""))[0]
            self.w.begin(r.vt_ns, track, f"dom{key[0]} {name} vcpu{key[1]}", {"dom": key[0], "vcpu": key[1]})
            self.on_pcpu[r.pcpu] = key
            self.pcpu_of[key] = r.pcpu

    def remember_multicall(self, r: Multicall) -> None:
        if r.dom is not None and r.vcpu is not None:
            self.multicall[r.dom, r.vcpu] = r

    def hypercall(self, r: Hypercall) -> None:
        if r.dom is None or r.vcpu is None:
            return
        args: dict[str, Any] = {"nr": r.nr, "result": r.result, "span": r.span or None,
                                "arrival_vt_ns": r.arrival_vt_ns}
        batch = self.multicall.pop((r.dom, r.vcpu), None)
        if batch is not None:
            args.update(entries=batch.entries, run=batch.run)
        end = max(r.done_vt_ns, r.vt_ns)
        self.w.slice(r.vt_ns, end, self.t.lane(r.dom, r.vcpu, "hypercalls", r.vt_ns, end), r.name, args=args)

    def ipi(self, r: Ipi) -> None:
        if r.dom is None or r.vcpu is None:
            return
        fid = self.flow()
        waiting = self.ipis.setdefault((r.dom, r.dest, r.vector), [])
        waiting.append(fid)
        if len(waiting) > MAX_WAITING:  # a trace without irq.enter (schema 1): keep memory flat
            del waiting[0]
        self.w.instant(r.vt_ns, self.t.vcpu(r.dom, r.vcpu, "events"), f"ipi {r.vector:#x} -> vcpu{r.dest}",
                       flows=[fid], args={"dest": r.dest, "vector": r.vector, "target_running": r.target_running})

    def irq(self, r: IrqEnter) -> None:
        if r.dom is None or r.vcpu is None:
            return
        ends = self.ipis.pop((r.dom, r.vcpu, r.vector), []) if r.vector is not None else []
        name = "event upcall" if r.vector is None else f"irq {r.vector:#x}"
        self.w.instant(r.vt_ns, self.t.vcpu(r.dom, r.vcpu, "events"), name, ends=ends, args={"vector": r.vector})

    def other(self, r: Other) -> None:
        if r.event == "evtchn.send":
            self.send = r

    def event_sent(self, r: EventSent) -> None:
        if r.dom is None:
            return
        # the hypervisor logs evtchn.send (the sender) just before event.sent (dom and vcpu: the receiver)
        s = self.send
        self.send = None
        if s is not None and s.vt_ns == r.vt_ns and s.dom is not None and s.vcpu is not None \
                and s.fields.get("port") == r.port and (s.fields.get("target") in (None, r.vcpu)):
            track = self.t.vcpu(s.dom, s.vcpu, "events")
        else:
            track = self.t.other(None, "event channels")
        fid = self.flow()
        self.events[r.dom, r.eid] = fid
        self.w.instant(r.vt_ns, track, f"event sent port {r.port} -> vcpu{r.vcpu}", flows=[fid],
                       args={"eid": r.eid, "port": r.port, "dom": r.dom, "vcpu": r.vcpu})

    def event_delivered(self, r: EventDelivered) -> None:
        if r.dom is None or r.vcpu is None:
            return
        fid = self.events.pop((r.dom, r.eid), None)
        self.w.instant(r.vt_ns, self.t.vcpu(r.dom, r.vcpu, "events"), f"event delivered port {r.port}",
                       ends=[fid] if fid is not None else [], args={"eid": r.eid, "port": r.port})

    def fault(self, r: Fault) -> None:
        vcpu = r.vcpu if r.vcpu is not None else _target_vcpu(r.target)
        if vcpu is None:
            vcpu = self.fault_vcpu.get(r.fid)
        elif r.phase == "inject":
            self.fault_vcpu[r.fid] = vcpu
        if r.phase == "end":
            self.fault_vcpu.pop(r.fid, None)
        if r.dom is not None and vcpu is not None:
            track = self.t.vcpu(r.dom, vcpu, "events")
        else:
            track = self.t.other(r.dom, "faults")
        self.w.instant(r.vt_ns, track, f"fault {r.kind} {r.phase}",
                       args={"fid": r.fid, "kind": r.kind, "phase": r.phase, "target": r.target, "outcome": r.outcome})

    def domain_end(self, r: DomainEnd) -> None:
        """An instant; the domain's vCPUs' last states end with it."""
        if r.dom is None:
            return
        if r.dom not in self.ended:
            self.ended[r.dom] = r.vt_ns
            # as the analysis totals them, a vCPU's last state lasts until its domain ended; the hypervisor may
            # still log the vCPUs going offline up to a window later, so the slices are closed a little after
            heapq.heappush(self.ending, (r.vt_ns + LAG_NS // 2, r.dom))
        self.w.instant(r.vt_ns, self.t.other(r.dom, "lifecycle"), r.event, args={"reason": r.reason})


def _target_vcpu(target: str | None) -> int | None:
    """The vCPU of a fault aimed at ``NAME.V``; None for a domain-wide one."""
    if not target:
        return None
    _, dot, tail = target.rpartition(".")
    return int(tail) if dot and tail.isdigit() else None


def write_perfetto(run: Run, path: Path) -> dict[str, int]:
    """Write ``run`` as a Perfetto trace at ``path`` (two passes: the analysis for the shootdowns, then the records).

    Returns a summary: ``packets``, ``tracks``, ``slices``, ``instants``, ``flows``, ``shootdowns``. The file is
    written under a temporary name and renamed, so a failed export leaves no half-written trace. Raises
    RuntimeError when the ``perfetto`` package is missing.
    """
    pb, builder_cls = _protos()
    analysis = run.analyse(keep_shootdowns=True)
    names = dict(run.designs)
    for sd in analysis.shootdowns:
        names.setdefault(sd.dom, (sd.name, sd.mode))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            writer = _Writer(pb, builder_cls(fh))
            tracks = _Tracks(writer, names)
            exporter = _Exporter(writer, tracks, list(analysis.shootdowns))
            exporter.feed(run.records())
            exporter.finish(analysis.end_vt_ns)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"packets": writer.packets, "tracks": tracks.count, "slices": writer.slices, "instants": writer.instants,
            "flows": exporter.flows, "shootdowns": len(analysis.shootdowns)}
