"""The checker over synthetic run directories: a clean history passes, and each way of breaking an invariant is
reported with its span or eid, domain and virtual time; losses are excused only by the receiver ending."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runfiles import LINK_NS, WINDOW_NS, SyntheticRun, clean_run

from pvcluster.check import Invariant, Report, Violation, check_run, format_report


def only(report: Report) -> Violation:
    assert len(report.violations) == 1, format_report(report)
    return report.violations[0]


def test_a_clean_run_passes(tmp_path: Path) -> None:
    report = check_run(clean_run(tmp_path).write())
    assert report.ok, format_report(report)
    s = report.stats
    assert (s["domains"], s["events_sent"], s["events_delivered"]) == (2, 2, 2)
    assert (s["hypercalls"], s["hypercalls_answered"], s["hypercalls_ended_domain"]) == (8, 6, 2)
    assert s["stale_reads"] == s["violations"] == s["events_lost_explained"] == 0
    assert format_report(report).startswith("check: OK")


def test_a_stale_read_is_flagged_with_its_span_and_the_flush_bug_before_it(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.hyp("fault.skip_flush", 29_000, dom=2, vcpu=0, targets=[1])
    run.shootdown(2, 2, 30_000, stale=True)
    report = check_run(run.write())
    v = only(report)
    assert (v.invariant, v.dom, v.vt_ns, v.span) == (Invariant.STALE_TLB, 2, 30_500, "sd-d2-r2")
    assert "fault.skip_flush at 29000" in v.detail
    assert report.stats["stale_reads"] == 1 and report.stats["bug_skip_flush"] == 1
    assert "sd-d2-r2" in format_report(report) and "stale-tlb-read" in format_report(report)


def _lost_event(tmp_path: Path) -> tuple[SyntheticRun, int]:
    """dom 2 is sent event 7 at 100 us and never applies it; the run then goes on until both shut down."""
    run = clean_run(tmp_path)
    run.event(2, 7, 100_000, deliveries=0)
    return run, 100_000 + LINK_NS


def test_a_lost_event_is_flagged_while_its_receiver_lives_on(tmp_path: Path) -> None:
    run, arrival = _lost_event(tmp_path)
    v = only(check_run(run.write()))
    assert (v.invariant, v.dom, v.vt_ns, v.eid, v.span) == (Invariant.EVENT_ONCE, 2, arrival, 7, None)
    assert "never delivered" in v.detail


@pytest.mark.parametrize("end", ["domain.crash", "domain.destroy", "domain.process_exit", "domain.shutdown"])
def test_a_lost_event_is_explained_when_its_receiver_ended_by_the_deadline(tmp_path: Path, end: str) -> None:
    run, arrival = _lost_event(tmp_path)
    run.hyp(end, arrival + 2 * WINDOW_NS, dom=2, detail="test")  # exactly at the deadline: explained
    report = check_run(run.write())
    assert report.ok, format_report(report)
    assert report.stats["events_lost_explained"] == 1


def test_a_receiver_that_ended_after_the_deadline_does_not_explain_a_loss(tmp_path: Path) -> None:
    run, arrival = _lost_event(tmp_path)
    run.hyp("domain.crash", arrival + 2 * WINDOW_NS + 1, dom=2, detail="too late")
    assert only(check_run(run.write())).eid == 7


def test_a_loss_is_explained_when_the_receivers_process_trace_stops_without_a_clean_stop(tmp_path: Path) -> None:
    """A SIGKILLed domain process: the hypervisor trace has nothing yet, the process trace simply stops."""
    run = SyntheticRun(tmp_path)
    run.start()
    run.hypercall(1, 1, 10_000)  # dom 2's process trace ends with domain.built at 0
    run.event(2, 1, 20_000, deliveries=0)
    span = run.hypercall(2, 1, 20_000, answers=0)
    report = check_run(run.write())
    assert report.ok, format_report(report)
    assert report.stats["events_lost_explained"] == report.stats["hypercalls_unanswered_explained"] == 1
    # the same history with a clean stop in dom 2's trace after the deadline is no kill: both losses are reported
    run.dom(2, "domain.stop", 500_000, reason="destroy")
    found = {(v.invariant, v.span, v.eid) for v in check_run(run.write()).violations}
    assert found == {(Invariant.EVENT_ONCE, None, 1), (Invariant.HYPERCALL_ONCE, span, None)}


def test_the_lose_event_bug_is_flagged_not_excused(tmp_path: Path) -> None:
    run, arrival = _lost_event(tmp_path)
    run.hyp("fault.lose_event", 100_000, dom=2, eid=7)
    report = check_run(run.write())
    v = only(report)
    assert (v.eid, v.dom, v.vt_ns) == (7, 2, arrival)
    assert "fault.lose_event" in v.detail
    assert report.stats["bug_lose_event"] == 1


def test_a_lose_event_strike_without_event_sent_is_still_a_loss(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.hyp("fault.lose_event", 100_000, dom=1, eid=9)
    v = only(check_run(run.write()))
    assert (v.invariant, v.dom, v.eid) == (Invariant.EVENT_ONCE, 1, 9)


def test_a_duplicate_delivery_is_flagged_at_the_second_delivery(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.hyp("fault.dup_event", 100_000, dom=1, eid=5)
    arrival = run.event(1, 5, 100_000, deliveries=2)
    v = only(check_run(run.write()))
    assert (v.invariant, v.dom, v.vt_ns, v.eid) == (Invariant.EVENT_ONCE, 1, arrival, 5)
    assert "2 times" in v.detail and "fault.dup_event" in v.detail


def test_a_delivery_of_an_event_never_sent_is_flagged(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.dom(1, "event.delivered", 120_000, eid=42, port=3, vcpu=0)
    v = only(check_run(run.write()))
    assert (v.invariant, v.dom, v.vt_ns, v.eid) == (Invariant.EVENT_ONCE, 1, 120_000, 42)
    assert "never sent" in v.detail


def test_an_unanswered_hypercall_is_flagged(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    span = run.hypercall(1, 9, 100_000, answers=0)
    v = only(check_run(run.write()))
    assert (v.invariant, v.dom, v.span, v.vt_ns) == (Invariant.HYPERCALL_ONCE, 1, span, 100_000 + 400 + LINK_NS)
    assert "never answered" in v.detail


def test_an_unanswered_hypercall_is_explained_when_its_domain_was_killed(tmp_path: Path) -> None:
    run = SyntheticRun(tmp_path)
    run.start()
    run.hypercall(1, 1, 10_000, answers=0)
    run.hyp("domain.process_exit", 15_000, dom=1, returncode=-9)
    run.shutdown(2, 1, 10_000)
    report = check_run(run.write())
    assert report.ok, format_report(report)
    assert report.stats["hypercalls_unanswered_explained"] == 1


def test_a_hypercall_answered_twice_or_never_made_or_a_bad_result_is_flagged(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    twice = run.hypercall(1, 9, 100_000, answers=2)
    run.dom(2, "hypercall.done", 120_000, vcpu=0, span="hc-d2v0-77", value=0, complete=True, effects=0)
    run.dom(2, "domain.bad_result", 130_000, vcpu=1, seq=78, detail="no such pending hypercall")
    found = [(v.invariant, v.dom, v.vt_ns, v.span) for v in check_run(run.write()).violations]
    once = Invariant.HYPERCALL_ONCE
    assert found == [(once, 1, 110_400, twice), (once, 2, 120_000, "hc-d2v0-77"), (once, 2, 130_000, None)]


def test_a_corrupted_result_is_flagged_with_the_fault_as_hint(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    span = run.hypercall(2, 9, 100_000, result=-14, got=0)
    run.hyp("fault.corrupt_result", 100_000, dom=2, span=span, decided=-14, delivered=0)
    report = check_run(run.write())
    v = only(report)
    assert (v.invariant, v.dom, v.span, v.vt_ns) == (Invariant.EFFECTS, 2, span, 110_400)
    assert "hypercall result corrupted" in v.detail and "0xfffffff2" in v.detail and "decided -14" in v.detail
    assert report.stats["bug_corrupt_result"] == 1


def test_a_deferred_answer_carries_no_value_to_compare(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.hypercall(1, 9, 100_000, name="sched_op", deferred=True, got=12345)
    run.hypercall(1, 10, 110_000, name="mmuext_op", continued=True, result=26)  # a continuation: EAX = nr again
    assert check_run(run.write()).ok


def test_an_effects_mismatch_is_flagged(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    span = run.hypercall(1, 9, 100_000, effects=4, applied=2)
    v = only(check_run(run.write()))
    assert (v.invariant, v.span) == (Invariant.EFFECTS, span)
    assert "decided 4 effects, the domain applied 2" in v.detail


def test_a_completion_that_contradicts_deferral_is_flagged(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    span = run.hypercall(1, 9, 100_000, deferred=True, complete=True)
    v = only(check_run(run.write()))
    assert (v.invariant, v.span) == (Invariant.EFFECTS, span) and "deferred" in v.detail


def test_a_hypercall_executed_twice_is_flagged(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    span = run.hypercall(1, 9, 100_000)
    run.hv.append(dict(run.hv[-1]))
    v = only(check_run(run.write()))
    assert (v.invariant, v.span) == (Invariant.HYPERCALL_ONCE, span) and "twice" in v.detail


def test_an_eid_sent_twice_is_flagged(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.event(1, 8, 100_000)
    run.hyp("event.sent", 100_500, dom=1, arrival_vt_ns=110_500, eid=8, port=3, vcpu=0)
    v = only(check_run(run.write()))
    assert (v.invariant, v.dom, v.vt_ns, v.eid) == (Invariant.EVENT_ONCE, 1, 100_500, 8) and "twice" in v.detail


def test_faults_must_reach_the_hypervisor(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.fault(1, "lose-event", "alpha", 50_000)
    run.fault(2, "dup-event", "gamma", 60_000, outcome="no such live domain", traced=False)
    run.fault(3, "corrupt-result", "beta", 70_000, traced=False)
    run.fault(4, "corrupt-result", "beta", 10**9, traced=False)  # due after the run ended
    report = check_run(run.write())
    v = only(report)
    assert (v.invariant, v.dom, v.vt_ns) == (Invariant.FAULT_TRACED, 2, 70_000)
    assert "fault 3" in v.detail
    s = report.stats
    assert (s["faults"], s["faults_injected"], s["faults_refused"], s["faults_not_due"]) == (4, 1, 1, 1)


def test_violations_are_sorted_by_time_then_domain(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.dom(2, "event.delivered", 150_000, eid=50, port=3, vcpu=0)
    run.dom(1, "event.delivered", 150_000, eid=51, port=3, vcpu=0)
    run.dom(2, "event.delivered", 140_000, eid=52, port=3, vcpu=0)
    report = check_run(run.write())
    assert [(v.vt_ns, v.dom, v.eid) for v in report.violations] == [(140_000, 2, 52), (150_000, 1, 51),
                                                                      (150_000, 2, 50)]
    as_json = json.loads(report.to_json())
    assert as_json["ok"] is False and as_json["stats"]["violations"] == 3
    assert as_json["violations"][0] == {"invariant": "event-delivered-once", "dom": 2, "vt_ns": 140_000,
                                        "span": None, "eid": 52, "detail": "event delivered on port 3 but never sent"}
    text = format_report(report)
    assert text.startswith("check: FAIL: 3 violations") and "eid 52" in text


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.write()
    for path in (tmp_path / "trace" / "hypervisor.jsonl", run.dom_path(1)):
        with open(path, "a", encoding="utf-8") as fh:
            fh.write('{"proc":"x","vt_ns":9999999,"event":"event.sent","dom":1,"ei')  # killed mid-write
    report = check_run(tmp_path)
    assert report.ok, format_report(report)
    assert report.stats["torn_lines"] == 2


def test_a_torn_multibyte_character_is_a_torn_line_too(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.write()
    with open(run.dom_path(2), "ab") as fh:
        fh.write('{"event":"console","text":"é'.encode()[:-1])
    assert check_run(tmp_path).stats["torn_lines"] == 1


@pytest.mark.parametrize("garbage", ["{not json\n", "[1, 2]\n", '{"no_event": 1}\n'])
def test_garbage_in_the_middle_raises_naming_the_line(tmp_path: Path, garbage: str) -> None:
    run = clean_run(tmp_path)
    run.write()
    path = run.dom_path(1)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3] + [garbage] + lines[3:]))
    with pytest.raises(ValueError, match=r"dom1-alpha\.jsonl:4: not"):
        check_run(tmp_path)


def test_garbage_last_line_with_its_newline_is_not_a_torn_write(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.write()
    with open(tmp_path / "trace" / "hypervisor.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{garbage\n")
    with pytest.raises(ValueError, match=r"hypervisor\.jsonl:\d+: not JSON"):
        check_run(tmp_path)


def test_a_contract_event_missing_its_fields_raises_naming_the_line(tmp_path: Path) -> None:
    run = clean_run(tmp_path)
    run.hyp("event.sent", 100_000, dom=1, port=3)  # no eid
    run.write()
    with pytest.raises(ValueError, match=rf"hypervisor\.jsonl:{len(run.hv)}: malformed event.sent"):
        check_run(tmp_path)
