"""``pvcluster.trace.perfetto``: the Perfetto export, parsed back with the perfetto package's own protos.

Every test checks the file is well formed the way trace processor needs it (each event on a described track, slices
on a track strictly nested, every flow begun once and ended at most once) and then what the UI would show: a track
per vCPU with its run states, hypercall slices, shootdown slices with a flow to each target's flush, IPI and
event-channel flows, faults as instants. A synthetic run states each case exactly; a real default cluster (with a
scheduled preemption) checks the export against the analysis of the same run.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import attrs
import pytest
from runfiles import SyntheticRun

from pvcluster.abi.platform import FLUSH_VECTOR, Mark
from pvcluster.cluster import Cluster
from pvcluster.spec import default_spec_text, parse_spec
from pvcluster.trace import load

pb2 = pytest.importorskip("perfetto.protos.perfetto.trace.perfetto_trace_pb2")
from pvcluster.trace.perfetto import write_perfetto  # noqa: E402 - after the skip: needs the perfetto extra

BEGIN, END, INSTANT = (pb2.TrackEvent.TYPE_SLICE_BEGIN, pb2.TrackEvent.TYPE_SLICE_END,
                       pb2.TrackEvent.TYPE_INSTANT)
RUN_STATES = {"running", "runnable", "blocked", "offline"}


@attrs.frozen
class Event:
    ts: int
    track: int
    type: int
    name: str
    flows: tuple[int, ...]
    ends: tuple[int, ...]
    args: dict[str, Any]


class Parsed:
    """A Perfetto trace file read back: its track descriptors, its events, and what the UI would call each track."""

    def __init__(self, path: Path) -> None:
        trace = pb2.Trace()
        trace.ParseFromString(path.read_bytes())
        self.packets = len(trace.packet)
        self.tracks: dict[int, Any] = {}
        self.events: list[Event] = []
        for p in trace.packet:
            if p.HasField("track_descriptor"):
                assert p.track_descriptor.uuid not in self.tracks
                self.tracks[p.track_descriptor.uuid] = p.track_descriptor
            elif p.HasField("track_event"):
                e = p.track_event
                self.events.append(Event(p.timestamp, e.track_uuid, e.type, e.name, tuple(e.flow_ids),
                                         tuple(e.terminating_flow_ids), _args(e.debug_annotations)))

    def process_of(self, uuid: int) -> str:
        d = self.tracks[uuid]
        while not d.HasField("process"):
            d = self.tracks[d.parent_uuid]
        return str(d.process.process_name)

    def label(self, uuid: int) -> tuple[str, str]:
        """(process name, track name), e.g. ("dom1 alpha", "vcpu0 hypercalls")."""
        d = self.tracks[uuid]
        return self.process_of(uuid), d.thread.thread_name if d.HasField("thread") else d.name

    def threads(self) -> dict[tuple[str, str], int]:
        return {self.label(u): u for u, d in self.tracks.items() if d.HasField("thread")}

    def on(self, process: str, name: str, type_: int | None = None) -> list[Event]:
        uuids = {u for u in self.tracks if self.label(u) == (process, name)}
        return [e for e in self.events if e.track in uuids and (type_ is None or e.type == type_)]

    def check_well_formed(self) -> None:
        assert all(e.track in self.tracks for e in self.events)
        assert all(a.ts <= b.ts for a, b in zip(self.events, self.events[1:], strict=False)), "not in time order"
        stacks: dict[int, list[int]] = defaultdict(list)
        for e in sorted(self.events, key=lambda e: e.ts):  # stable: file order breaks ties, as trace processor
            if e.type == BEGIN:
                stacks[e.track].append(e.ts)
            elif e.type == END:
                assert stacks[e.track], f"an end without a begin on {self.label(e.track)} at {e.ts}"
                stacks[e.track].pop()
        assert not any(stacks.values()), "slices left open"
        begun = Counter(f for e in self.events for f in e.flows)
        ended = Counter(f for e in self.events for f in e.ends)
        assert all(n == 1 for n in begun.values()) and all(n == 1 for n in ended.values())
        assert set(ended) <= set(begun)

    def flow_end(self, flow: int) -> Event:
        return next(e for e in self.events if flow in e.ends)


def _args(annotations: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in annotations:
        kind = a.WhichOneof("value")
        out[a.name] = _args(a.dict_entries) if a.dict_entries else getattr(a, kind) if kind else None
    return out


def _slices(p: Parsed, process: str, track: str) -> list[Event]:
    return p.on(process, track, BEGIN)


# -- a synthetic run: every case stated exactly ---------------------------------------------------------------------


def _synthetic(root: Path) -> Path:
    run = SyntheticRun(root)
    run.start()

    def rs(dom: int, vcpu: int, vt: int, state: str, previous: str, duration: int, pcpu: int | None) -> None:
        run.hyp("vcpu.runstate", vt, dom=dom, vcpu=vcpu, state=state, previous=previous, duration_ns=duration,
                why="test", pcpu=pcpu)

    for dom in (1, 2):
        rs(dom, 0, 0, "runnable", "offline", 0, None)
    rs(1, 0, 1_000, "running", "runnable", 1_000, 0)
    rs(2, 0, 1_000, "running", "runnable", 1_000, 1)
    rs(1, 1, 5_000, "runnable", "offline", 5_000, None)  # brought up: offline since boot
    rs(2, 1, 5_000, "runnable", "offline", 5_000, None)
    rs(1, 0, 15_000, "runnable", "running", 14_000, None)  # vcpu1 takes pCPU 0 from vcpu0 at the same instant
    rs(1, 1, 15_000, "running", "runnable", 10_000, 0)
    # alpha: a native shootdown (IPI, irq.enter, FLUSH_ACK)
    run.dom(1, "guest.mark", 20_000, vcpu=0, code=Mark.SHOOTDOWN_REQUEST, round=1, span="sd-d1-r1")
    run.hyp("ipi", 20_050, dom=1, vcpu=0, dest=1, vector=FLUSH_VECTOR, target_running=True)
    run.dom(1, "irq.enter", 21_000, vcpu=1, vector=FLUSH_VECTOR)
    run.dom(1, "guest.mark", 21_100, vcpu=1, code=Mark.FLUSH_ACK, round=0)
    run.dom(1, "guest.mark", 22_000, vcpu=0, code=Mark.SHOOTDOWN_DONE, round=1, span="sd-d1-r1")
    # beta: a paravirtual shootdown (one mmuext_op; the hypervisor flushes vcpu1)
    run.dom(2, "guest.mark", 30_000, vcpu=0, code=Mark.SHOOTDOWN_REQUEST, round=1, span="sd-d2-r1")
    span = run.hypercall(2, 1, 30_100, vcpu=0)
    run.hyp("shootdown", 30_100, dom=2, vcpu=0, span="sd-d2v0-1", mode="pv", targets=[1], preempted=1, pages=1,
            end_vt_ns=30_500)
    run.dom(2, "tlb.flush", 30_500, vcpu=1, by=0, span=span)
    run.dom(2, "guest.mark", 41_000, vcpu=0, code=Mark.SHOOTDOWN_DONE, round=1, span="sd-d2-r1")
    # beta: an event from vcpu0 to vcpu1
    run.hyp("evtchn.send", 50_000, dom=2, vcpu=0, port=3, target=1)
    run.event(2, 1, 50_000, port=3, vcpu=1)
    # alpha: a multicall; two hypercalls of vcpu1 that overlap (a second track of the same name)
    run.hyp("multicall", 70_000, dom=1, vcpu=0, entries=3, results=[0, 0, 0], run=3)
    run.hypercall(1, 5, 70_000, vcpu=0, name="multicall", nr=13)
    run.hypercall(1, 6, 80_000, vcpu=1)
    run.hypercall(1, 7, 80_200, vcpu=1)
    # a preemption fault aimed at alpha's vcpu1
    run.hyp("fault.inject", 100_000, dom=1, fid=1, kind="preempt", target="alpha.1", params={}, origin="spec")
    run.hyp("fault.outcome", 100_000, dom=1, fid=1, kind="preempt", outcome="vcpu 1 held until 150000")
    run.hyp("fault.end", 150_000, dom=1, fid=1, kind="preempt", target="alpha.1", outcome="vcpu 1 released")
    run.shutdown(1, 9, 200_000)
    run.shutdown(2, 9, 210_000)
    root = run.write()
    spec = (root / "spec.json").read_text()  # the designs: alpha native, beta paravirtual
    (root / "spec.json").write_text(spec.replace('{"name": "alpha"}', '{"name": "alpha", "backend": "native"}')
                                    .replace('{"name": "beta"}', '{"name": "beta", "backend": "xen"}'))
    return root


def test_a_synthetic_run_exports_every_kind_of_record(tmp_path: Path) -> None:
    out = tmp_path / "run.pftrace"
    summary = write_perfetto(load(_synthetic(tmp_path / "run")), out)
    p = Parsed(out)
    p.check_well_formed()
    assert summary["packets"] == p.packets and summary["tracks"] == len(p.tracks)
    assert summary["flows"] == len({f for e in p.events for f in e.flows}) == 4  # 2 shootdowns, 1 IPI, 1 event
    assert summary["shootdowns"] == 2
    assert set(p.threads()) == {(f"dom{d} {n}", f"vcpu{v}") for d, n in ((1, "alpha"), (2, "beta")) for v in (0, 1)}

    # run states: vcpu1 offline from boot until brought up; pCPU 0 handed from alpha's vcpu0 to its vcpu1
    states = [(e.ts, e.name) for e in _slices(p, "dom1 alpha", "vcpu1")]
    assert states == [(0, "offline"), (5_000, "runnable"), (15_000, "running")]
    assert [e.name for e in _slices(p, "hypervisor", "pCPU 0")] == ["dom1 alpha vcpu0", "dom1 alpha vcpu1"]

    # hypercalls: a multicall's batch as arguments; overlapping calls on two tracks of one name
    calls = _slices(p, "dom1 alpha", "vcpu0 hypercalls")
    assert [e.name for e in calls] == ["multicall", "sched_op"]
    assert (calls[0].args["entries"], calls[0].args["nr"]) == (3, 13) and "entries" not in calls[1].args
    overlapping = {e.track for e in _slices(p, "dom1 alpha", "vcpu1 hypercalls") if e.ts in (80_000, 80_200)}
    assert len(overlapping) == 2

    # shootdowns: a slice on the initiator, a flow to the target's flush
    for proc, mode, flushed in (("dom1 alpha", "native", 21_100), ("dom2 beta", "pv", 30_500)):
        (sd,) = _slices(p, proc, "vcpu0 shootdowns")
        assert sd.name == f"shootdown r1 ({mode})"
        assert sum(sd.args["breakdown_ns"].values()) == sd.args["latency_ns"]
        (flow,) = sd.flows
        flush = p.flow_end(flow)
        assert (p.label(flush.track), flush.type, flush.ts) == ((proc, "vcpu1 events"), INSTANT, flushed)

    # an IPI flows from the sender to the target's interrupt; an event from its send to its delivery
    (ipi,) = [e for e in p.on("dom1 alpha", "vcpu0 events") if e.name.startswith("ipi")]
    irq = p.flow_end(ipi.flows[0])
    assert (p.label(irq.track), irq.name, irq.ts) == (("dom1 alpha", "vcpu1 events"), "irq 0xf1", 21_000)
    (sent,) = [e for e in p.on("dom2 beta", "vcpu0 events") if e.name.startswith("event sent")]
    got = p.flow_end(sent.flows[0])
    assert (p.label(got.track), got.ts, got.args["eid"]) == (("dom2 beta", "vcpu1 events"), 60_000, 1)

    # the fault's three phases as instants on the vCPU it was aimed at
    faults = [(e.ts, e.name) for e in p.on("dom1 alpha", "vcpu1 events", INSTANT) if e.name.startswith("fault")]
    assert faults == [(100_000, "fault preempt inject"), (100_000, "fault preempt outcome"),
                      (150_000, "fault preempt end")]
    assert [e.name for e in p.on("dom2 beta", "lifecycle")] == ["domain.shutdown"]


def test_without_the_perfetto_package_the_error_says_what_to_install(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "perfetto.trace_builder.proto_builder", None)  # import fails
    out = tmp_path / "run.pftrace"
    with pytest.raises(RuntimeError, match=re.escape("pip install 'pvcluster[perfetto]'")):
        write_perfetto(load(_synthetic(tmp_path / "run")), out)
    assert not out.exists()


# -- a real default cluster -----------------------------------------------------------------------------------------

FAULT = '\n[[fault]]\nkind = "preempt"\ntarget = "alpha.1"\nat_ns = 100000\nduration_ns = 50000\n'


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_real_run_exports_tracks_slices_and_flows(run_dir: Path, tmp_path: Path) -> None:
    with Cluster.start(parse_spec(default_spec_text() + FAULT), run_dir=run_dir) as cluster:
        cluster.wait(timeout_s=100)
    run = load(run_dir)
    out = tmp_path / "run.pftrace"
    summary = write_perfetto(run, out)
    p = Parsed(out)
    p.check_well_formed()
    assert summary["packets"] == p.packets

    # a track per vCPU, each with run states; hypercalls on every vCPU of the paravirtual domain
    vcpus = p.threads()
    assert set(vcpus) == {(f"dom{d} {n}", f"vcpu{v}") for d, n in ((1, "alpha"), (2, "beta")) for v in (0, 1)}
    for proc, thread in vcpus:
        states = {e.name for e in _slices(p, proc, thread)}
        assert "running" in states and states <= RUN_STATES, (proc, thread, states)
        if proc == "dom2 beta":
            assert _slices(p, proc, f"{thread} hypercalls")
    assert "mmuext_op" in {e.name for e in _slices(p, "dom2 beta", "vcpu0 hypercalls")}  # the pv flushes

    # every shootdown the analysis found, on its initiator, with a flow to each target's flush at its time
    shootdowns = run.analyse(keep_shootdowns=True).shootdowns
    assert summary["shootdowns"] == len(shootdowns) == 80
    for sd in shootdowns:
        proc = f"dom{sd.dom} {sd.name}"
        (sl,) = [e for e in _slices(p, proc, f"vcpu{sd.initiator} shootdowns") if e.ts == sd.start_ns]
        assert sl.name == f"shootdown r{sd.round} ({sd.mode})"
        assert sl.args["breakdown_ns"] == sd.breakdown and sl.args["latency_ns"] == sd.latency_ns
        assert len(sl.flows) == len(sd.flushes)
        flushes = {(p.label(p.flow_end(f).track), p.flow_end(f).ts) for f in sl.flows}
        assert flushes == {((proc, f"vcpu{v} events"), at) for v, at in sd.flushes}

    # alpha's IPIs flow to its targets' interrupts
    ipis = [e for e in p.on("dom1 alpha", "vcpu0 events") if e.name.startswith("ipi")]
    assert len(ipis) == sum(len(sd.sends) for sd in shootdowns if sd.mode == "native") > 0
    assert all(p.label(p.flow_end(e.flows[0]).track) == ("dom1 alpha", "vcpu1 events") for e in ipis)

    # the preemption fault, as instants on alpha's vcpu1
    faults = {(e.name, e.ts) for e in p.on("dom1 alpha", "vcpu1 events", INSTANT) if e.name.startswith("fault")}
    assert {("fault preempt inject", 100_000), ("fault preempt end", 150_000)} <= faults
