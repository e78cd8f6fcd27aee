"""The fault layer in-process (issue 9): the catalog's checks, seeded random schedules, the modelled link and its
receiver, and determinism under faults (the same seed gives the same trace; faults of one partition leave another
domain's trace alone), driven through ``tests/fakes.py``."""

from __future__ import annotations

import random

import pytest
from fakes import Cluster
from helpers import RecordingLog
from test_core import _ping_programs

from domains.link import LinkReceiver
from hypervisor.core import Hypervisor
from hypervisor.link import Link
from hypervisor.tracing import DomainTrace
from pvcluster.abi.xen import ShutdownReason
from pvcluster.bus.messages import Hello
from pvcluster.faults import KINDS, FaultError, RandomFaults, random_schedule, request
from pvcluster.spec import SpecError, parse_spec

SPEC = """
[cluster]
name = "fc"
seed = {seed}
[hypervisor]
pcpus = 2
[[domain]]
name = "alpha"
vcpus = 2
cpus = [0]
[[domain]]
name = "beta"
vcpus = 2
cpus = [1]
{extra}
"""
RANDOM = ('[faults]\nrandom = {{ rate = 60.0, kinds = ["preempt", "delay", "drop", "dup", "reorder", "slow", '
          '"pause", "skew", "offline", "pin", "partition"], until_ns = 150000, targets = [{targets}] }}')


def _run(seed: int = 5, extra: str = "") -> RecordingLog:
    log = RecordingLog()
    programs = {"alpha": _ping_programs(20, 3000), "beta": _ping_programs(20, 4100)}
    Cluster(parse_spec(SPEC.format(seed=seed, extra=extra)), programs, log).run()
    return log


# -- the catalog ---------------------------------------------------------------------------------------------


def test_every_kind_the_issue_names_is_in_the_catalog() -> None:
    assert list(KINDS) == ["kill", "crash", "pause", "unpause", "destroy", "shutdown", "stop", "preempt", "offline",
                           "online", "pin", "slow", "delay", "drop", "dup", "reorder", "partition", "skip-flush",
                           "lose-event", "dup-event", "corrupt-result", "delay-flush", "skew", "sched"]


@pytest.mark.parametrize(("args", "msg"), [
    (("boom", "a"), "unknown fault kind 'boom'"),
    (("preempt", "a"), "target must be a vCPU"),
    (("kill", "a.1"), "target must be a domain, not a vCPU"),
    (("kill", "A B"), "target must be a domain name or id"),
    (("kill", 7), "target must be a domain name or id"),
    (("preempt", "a.1", None, {}), "duration_ns is required"),
    (("preempt", "a.1", None, {"duration_ns": True}), "duration_ns must be an integer"),
    (("slow", "a.1", None, {"factor": 1, "duration_ns": 5}), "factor must be an integer between 2 and 1000"),
    (("drop", "a", None, {"cnt": 1}), "unknown parameter cnt (takes: count)"),
    (("drop", "a", -1), "at_ns must be an integer between 0"),
    (("drop", "a", None, [1]), "parameters must be a table"),
])
def test_the_catalog_refuses_what_it_cannot_carry_out_and_says_why(args: tuple, msg: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(FaultError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        request(*args)


def test_the_spec_checks_scheduled_and_random_faults_against_its_domains() -> None:
    bad = """
[[fault]]
kind = "preempt"
target = "alpha.5"
at_ns = 10
duration_ns = 5
[[fault]]
kind = "pin"
target = "beta.0"
at_ns = 10
pcpu = 9
[[fault]]
kind = "kill"
target = "gamma"
at_ns = 10
[[fault]]
kind = "kill"
target = "alpha"
[faults]
random = { rate = 0, kinds = ["kill", "nope"] }
"""
    with pytest.raises(SpecError) as err:
        parse_spec(SPEC.format(seed=1, extra=bad))
    text = str(err.value)
    for msg in ("fault[0].target: domain alpha has 2 vCPUs, no vCPU 5", "fault[1].pcpu: pCPU 9 does not exist",
                'fault[2].target: no domain named "gamma"', "fault[3].at_ns: required key missing",
                "faults.random.rate: must be a number greater than 0", '"kill" cannot be drawn at random',
                'unknown fault kind "nope"'):
        assert msg in text, text


def test_random_schedules_are_seeded_per_domain() -> None:
    rf = RandomFaults(rate=5.0, until_ns=2_000_000)
    two = random_schedule(rf, 9, [("alpha", 2), ("beta", 2)], 2)
    three = random_schedule(rf, 9, [("alpha", 2), ("gamma", 1), ("beta", 2)], 2)
    assert len(two) > 10 and [f for f in two if f.domain == "alpha"] == [f for f in three if f.domain == "alpha"]
    assert random_schedule(rf, 9, [("alpha", 2)], 2) == [f for f in two if f.domain == "alpha"]
    assert random_schedule(rf, 10, [("alpha", 2)], 2) != [f for f in two if f.domain == "alpha"]
    assert all(0 <= (f.at_ns or 0) <= 2_000_000 and f.kind in rf.kinds for f in two)


# -- the link -----------------------------------------------------------------------------------------------


def _link() -> tuple[Link, RecordingLog]:
    log = RecordingLog()
    return Link(rto_ns=40_000, reorder_ns=10_000, rng=random.Random(1)), log


def test_a_healthy_link_delivers_at_once_in_order() -> None:
    link, log = _link()
    trace = DomainTrace(log, 1, 0, 0)
    assert [(a.seq, a.vt_ns, a.copies) for a in (link.send(t, "x", trace) for t in (5, 7, 7))] == [
        (1, 5, 1), (2, 7, 1), (3, 7, 1)]
    assert log.events == []


def test_a_dropped_message_is_retransmitted_and_holds_back_the_ones_after_it() -> None:
    link, log = _link()
    trace = DomainTrace(log, 1, 0, 0)
    link.drops = 1
    first, second, later = link.send(100, "x", trace), link.send(110, "y", trace), link.send(50_000, "z", trace)
    assert (first.vt_ns, second.vt_ns, later.vt_ns) == (40_100, 40_100, 50_000)
    assert [e for e, _ in log.events] == ["link.drop"]


def test_a_partition_holds_everything_until_it_heals_and_dup_sends_two_copies_of_one_sequence_number() -> None:
    link, log = _link()
    trace = DomainTrace(log, 1, 0, 0)
    link.partition_from, link.partition_until = 1000, 100_000
    arrivals = [link.send(t, "x", trace).vt_ns for t in (1000, 50_000)]
    assert all(a >= 100_000 for a in arrivals) and arrivals == sorted(arrivals)
    link.dups = 1
    dup = link.send(200_000, "x", trace)
    assert (dup.copies, dup.vt_ns) == (2, 200_000)


def test_the_receiver_takes_each_sequence_number_once() -> None:
    rx, seen = LinkReceiver(), []
    for seq in (1, 2, 2, 3, 1, 0, 0):
        if rx.first(seq, "x", lambda *a, **kw: seen.append(kw["seq"]), 0):
            seen.append(-seq)
    assert seen == [-1, -2, 2, -3, 1, 0, 0]


# -- determinism ---------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_trace_under_random_faults() -> None:
    extra = RANDOM.format(targets='"alpha", "beta"')
    a, b = _run(5, extra), _run(5, extra)
    assert a.events == b.events
    injected = [kw["kind"] for e, kw in a.events if e == "fault.inject"]
    assert len(injected) >= 10 and len(set(injected)) >= 5


def test_faults_on_one_partition_leave_a_domain_pinned_elsewhere_alone() -> None:
    quiet = _run(5)
    faulted = _run(5, RANDOM.format(targets='"beta"'))
    assert any(e == "fault.inject" for e, _ in faulted.events)
    alpha = [(e, kw) for e, kw in quiet.events if kw.get("dom") == 1]
    assert alpha == [(e, kw) for e, kw in faulted.events if kw.get("dom") == 1]


def test_a_dead_domain_s_bus_identity_is_forgotten() -> None:
    hv = Hypervisor(parse_spec(SPEC.format(seed=1, extra="")), RecordingLog())
    dom = hv.create_domain(hv.spec.domains[0])
    assert hv.claim(b"peer", Hello(pid=1, name=dom.name), None) is dom
    assert hv.domains.by_identity(dom.identity) is dom
    hv.process_exited(dom, -9)
    assert hv.domains.by_identity(dom.identity) is None and not dom.alive


def test_a_domain_that_shut_down_takes_only_faults_that_end_its_process() -> None:
    log = RecordingLog()
    hv = Hypervisor(parse_spec(SPEC.format(seed=1, extra="")), log)
    dom = hv.create_domain(hv.spec.domains[0])
    hv.shutdown(dom, ShutdownReason.poweroff, 1000)
    refused = hv.faults.now(request("preempt", "alpha.0", None, {"duration_ns": 5}), "interactive")
    assert refused["outcome"] == "no such live domain (it shut down at 1000 ns)"
    assert not [kw for e, kw in log.events if e == "fault.inject"]  # the checker accepts it as refused
    assert hv.faults.now(request("kill", "alpha"), "interactive")["outcome"] == "killed"  # as `xl destroy` would
    assert [kw["kind"] for e, kw in log.events if e == "fault.inject"] == ["kill"]


def test_pauses_nest_as_xen_s_controller_pause_count() -> None:
    nested = """
[[fault]]
kind = "pause"
target = "alpha"
at_ns = 20000
duration_ns = 30000
[[fault]]
kind = "pause"
target = "alpha"
at_ns = 30000
duration_ns = 5000
"""
    log = _run(5, nested)
    outcomes = [(kw["vt_ns"], kw["outcome"]) for e, kw in log.events if e in ("fault.outcome", "fault.end")]
    assert outcomes == [(20000, "paused"), (30000, "paused again (pause count 2)"),
                        (40000, "still paused (pause count 1)"), (50000, "unpaused")]
    ran = [kw["vt_ns"] for e, kw in log.events
           if e == "vcpu.runstate" and kw["dom"] == 1 and kw["state"] == "running" and 20000 <= kw["vt_ns"] < 50000]
    assert ran == []  # the second pause's end did not let it run: one pause was still held


def test_a_scheduled_sched_fault_sets_the_slice_at_its_window_and_refuses_one_shorter_than_a_window() -> None:
    extra = ('[[fault]]\nkind = "sched"\ntarget = "alpha"\nat_ns = 20000\nslice_ns = 60000\n'
             '[[fault]]\nkind = "sched"\ntarget = "beta"\nat_ns = 30000\nslice_ns = 5000\n')
    log = RecordingLog()
    programs = {"alpha": _ping_programs(20, 3000), "beta": _ping_programs(20, 4100)}
    cluster = Cluster(parse_spec(SPEC.format(seed=5, extra=extra)), programs, log)
    cluster.run()
    outcomes = [kw["outcome"] for ev, kw in log.events if ev == "fault.outcome" and kw["kind"] == "sched"]
    assert outcomes == ["slice 30000 ns -> 60000 ns", "refused: a slice of 5000 ns is shorter than a window (10000 ns)"]
    assert cluster.hv.scheduler.slice_ns == 60000
