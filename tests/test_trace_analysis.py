"""The trace analysis core, in process: the streaming merge, the shootdown breakdown and the tables, on hand-written
run directories whose every number is known."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pvcluster.abi.platform import FLUSH_VECTOR, Mark
from pvcluster.trace import load, records
from pvcluster.trace.compare import compare
from pvcluster.trace.reader import ReadStats, merged
from pvcluster.trace.shootdowns import COMPONENTS, RunStates

SPEC = {"domain": [{"name": "nat", "backend": "native", "cmdline": "workload=shootdown"},
                   {"name": "pv", "backend": "xen", "cmdline": "workload=shootdown"}]}


def _write(run: Path, files: dict[str, list[dict[str, Any] | str]]) -> Path:
    (run / "trace").mkdir(parents=True)
    (run / "spec.json").write_text(json.dumps(SPEC))
    for name, events in files.items():
        lines = [e if isinstance(e, str) else json.dumps({**e, "level": "info", "wall_ns": 1}, separators=(",", ":"))
                 for e in events]
        # a raw string as the last line is a torn write: no newline after it
        tail = "" if isinstance(events[-1], str) else "\n"
        (run / "trace" / name).write_text("\n".join(lines) + tail)
    return run


def _hv(event: str, vt: int, **fields: Any) -> dict[str, Any]:
    return {"proc": "hypervisor", "vt_ns": vt, **fields, "event": event}


def _dom(domid: int, event: str, vt: int, **fields: Any) -> dict[str, Any]:
    return {"proc": f"dom{domid}", "dom": domid, "vt_ns": vt, **fields, "event": event}


def _mark(domid: int, vt: int, vcpu: int, code: int, rnd: int = 0) -> dict[str, Any]:
    return _dom(domid, "guest.mark", vt, vcpu=vcpu, code=code, round=rnd)


def _runstate(dom: int, vcpu: int, vt: int, state: str, previous: str, duration: int) -> dict[str, Any]:
    return _hv("vcpu.runstate", vt, dom=dom, vcpu=vcpu, state=state, previous=previous, duration_ns=duration,
               why="test", pcpu=None)


def native_run(tmp_path: Path) -> Path:
    """One native shootdown, request at 1000 and done at 9000, its one target preempted until 4000:

    initiator 1000-1100 (sends at 1100), target without a pCPU 1100-4000 (wait_pcpu 2900), then running: its
    interrupt enters at 4500 (delivery 500), acknowledges at 4600 (handler 100); the initiator loses its pCPU
    5000-8000 (initiator_preempted 3000) and sees the ack at 9000 (ack 4600-9000 less 3000 = 1400).
    """
    return _write(tmp_path / "nat", {
        "hypervisor.jsonl": [
            _hv("trace.start", 0, schema=2) | {"vt_ns": None},
            _runstate(1, 0, 0, "running", "offline", 0),
            _runstate(1, 1, 0, "runnable", "offline", 0),
            _hv("ipi", 1100, dom=1, vcpu=0, dest=1, vector=FLUSH_VECTOR, target_running=False),
            _runstate(1, 1, 4000, "running", "runnable", 4000),
            _runstate(1, 0, 5000, "runnable", "running", 5000),
            _runstate(1, 0, 8000, "running", "runnable", 3000),
            _hv("domain.shutdown", 10_000, dom=1, reason="poweroff"),
        ],
        "dom1-nat.jsonl": [
            _mark(1, 1000, 0, Mark.SHOOTDOWN_REQUEST, 1),
            _dom(1, "irq.enter", 4500, vcpu=1, vector=FLUSH_VECTOR),
            _mark(1, 4600, 1, Mark.FLUSH_ACK),
            _mark(1, 9000, 0, Mark.SHOOTDOWN_DONE, 1),
        ],
    })


def test_a_native_shootdown_is_broken_down_along_its_critical_path(tmp_path: Path) -> None:
    analysis = load(native_run(tmp_path)).analyse(keep_shootdowns=True)
    (sd,) = analysis.shootdowns
    assert (sd.mode, sd.round, sd.latency_ns, sd.targets, sd.preempted, sd.critical_target) == (
        "native", 1, 8000, (1,), 1, 1)
    assert sd.breakdown == {"initiator": 100, "initiator_preempted": 3000, "hypercall": 0, "wait_pcpu": 2900,
                            "delivery": 500, "handler": 100, "ack": 1400}
    assert sum(sd.breakdown.values()) == sd.latency_ns
    assert sd.flushes == ((1, 4600),) and sd.sends == ((1, 1100),)
    doc = analysis.to_json()
    assert doc["shootdowns"][0]["p50_us"] == 8.0 and doc["shootdowns"][0]["messages_per_shootdown"] == 2
    assert doc["breakdown"][0]["components_us"]["wait_pcpu"] == 2.9
    # the slowest list carries the vCPUs' states at the request and every change until the done mark
    states = {s["vcpu"]: (s["at_start"], s["changes"]) for s in doc["slowest"][0]["vcpu_states"]}
    assert states == {0: ("running", [[5000, "runnable"], [8000, "running"]]), 1: ("runnable", [[4000, "running"]])}
    # run-state totals run to the domain's end (10 µs)
    rows = {r["vcpu"]: r for r in doc["runstates"]}
    assert (rows[0]["running_us"], rows[0]["runnable_us"]) == (7.0, 3.0)
    assert (rows[1]["running_us"], rows[1]["runnable_us"]) == (6.0, 4.0)


def test_a_paravirtual_shootdown_is_its_hypercall_and_the_initiator(tmp_path: Path) -> None:
    run = _write(tmp_path / "pv", {
        "hypervisor.jsonl": [
            _hv("shootdown", 1050, dom=2, vcpu=0, targets=[1, 2], preempted=1, pages=1, end_vt_ns=1470, span="s",
                mode="pv", latency_ns=420, messages=1),
            _hv("hypercall", 1050, dom=2, vcpu=0, nr=26, name="mmuext_op", args=[], result=0, done_vt_ns=1470,
                arrival_vt_ns=1480, span="h", effects=2, deferred=False, continued=False),
        ],
        "dom2-pv.jsonl": [
            _mark(2, 1000, 0, Mark.SHOOTDOWN_REQUEST, 7),
            _dom(2, "tlb.flush", 1480, vcpu=1, by=0, span="h"),
            _dom(2, "tlb.flush", 1480, vcpu=2, by=0, span="h"),
            _mark(2, 1500, 0, Mark.SHOOTDOWN_DONE, 7),
        ],
    })
    analysis = load(run).analyse(keep_shootdowns=True)
    (sd,) = analysis.shootdowns
    assert (sd.mode, sd.latency_ns, sd.targets, sd.preempted, sd.hypercalls, sd.messages) == (
        "pv", 500, (1, 2), 1, 1, 1)
    assert sd.breakdown == dict.fromkeys(COMPONENTS, 0) | {"initiator": 70, "hypercall": 430}
    assert sd.flushes == ((1, 1480), (2, 1480))
    doc = analysis.to_json()
    assert doc["hypercalls_by_nr"] == [{"nr": 26, "name": "mmuext_op", "count": 1, "cost_total_us": 0.42,
                                        "cost_mean_ns": 420.0, "cost_p50_ns": 420, "cost_p99_ns": 420,
                                        "cost_max_ns": 420}]
    assert doc["hypercalls"] == {"by_name": {"mmuext_op": 1}, "count": 1, "p50_ns": 420, "p99_ns": 420}


def test_files_merge_by_virtual_time_and_bad_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    run = _write(tmp_path / "m", {
        "hypervisor.jsonl": [_hv("a", 10), _hv("c", 30), "this is not json", _hv("no_vt", 0) | {"vt_ns": None},
                             _hv("e", 25)],
        "dom1-nat.jsonl": [_dom(1, "b", 20), _dom(1, "d", 30), '{"proc":"dom1","vt_ns":40,"ev'],
    })
    stats = ReadStats()
    got = [(e["event"], e.get("vt_ns")) for e in merged(run / "trace", stats)]
    # by time; ties hypervisor first; an event with no time stays after the one before it; 25 is read before its
    # epoch closes (within the slack) so it is still in order
    assert got == [("a", 10), ("b", 20), ("e", 25), ("c", 30), ("no_vt", None), ("d", 30)]
    assert stats.corrupt == {"hypervisor.jsonl": 1} and stats.torn == ["dom1-nat.jsonl"] and stats.late == 0


def test_an_event_stamped_far_in_the_past_is_still_delivered_and_counted_late(tmp_path: Path) -> None:
    events = [_hv("x", vt) for vt in range(0, 3_000_000, 1000)] + [_hv("old", 5)]
    stats = ReadStats()
    got = [e["event"] for e in merged(_write(tmp_path / "l", {"hypervisor.jsonl": events}) / "trace", stats)]
    assert got.count("old") == 1 and stats.late == 1


def test_only_the_events_asked_for_are_parsed(tmp_path: Path) -> None:
    run = _write(tmp_path / "f", {"hypervisor.jsonl": [_hv("keep", 1), _hv("drop", 2), _hv("keep", 3)]})
    stats = ReadStats()
    assert [e["vt_ns"] for e in merged(run / "trace", stats, events={"keep"})] == [1, 3]
    assert stats.skipped == 1
    # a line written with other separators is recognised once parsed
    (run / "trace" / "dom1-x.jsonl").write_text(json.dumps(_dom(1, "drop", 5)) + "\n")
    assert [e["event"] for e in merged(run / "trace", events={"keep"})] == ["keep", "keep"]


def test_typed_records(tmp_path: Path) -> None:
    recs = list(load(native_run(tmp_path)).records())
    ipi = next(r for r in recs if isinstance(r, records.Ipi))
    assert (ipi.vt_ns, ipi.dom, ipi.vcpu, ipi.dest, ipi.target_running) == (1100, 1, 0, 1, False)
    assert [r.code for r in recs if isinstance(r, records.GuestMark)] == [1, 4, 2]
    assert any(isinstance(r, records.IrqEnter) and r.vector == FLUSH_VECTOR for r in recs)
    assert any(isinstance(r, records.Other) and r.event == "trace.start" for r in recs)
    # an event missing a field its class needs is kept as Other rather than lost
    assert isinstance(records.to_record({"event": "ipi", "vt_ns": 1}), records.Other)


def test_run_states_answer_time_without_a_pcpu() -> None:
    h = RunStates()
    for vt, state in ((0, "running"), (100, "runnable"), (300, "running"), (400, "blocked")):
        h.change(vt, state)
    assert h.not_running(0, 500) == 200 + 100
    assert h.not_running(150, 350) == 150
    assert h.state_at(350) == "running" and h.changes(50, 300) == ((100, "runnable"), (300, "running"))


def test_compare_gives_ratios_and_deltas(tmp_path: Path) -> None:
    doc = load(native_run(tmp_path)).analyse().to_json()
    faster = json.loads(json.dumps(doc))
    faster["shootdowns"][0]["p50_us"] = 4.0
    cmp = compare(doc, faster, "a", "b")
    p50 = cmp["shootdowns"][0]["p50_us"]
    assert (p50["a"], p50["b"], p50["ratio"], p50["delta"]) == (8.0, 4.0, 0.5, -4.0)


def test_a_directory_without_traces_is_refused(tmp_path: Path) -> None:
    from pvcluster.trace.run import RunError

    with pytest.raises(RunError, match="no traces"):
        load(tmp_path)
