"""Guest-supplied timer deadlines as Xen reads them, and bounded periodic catch-up (hypervisor/timers.py).

set_timer_op follows Xen's do_set_timer_op (xen/common/sched/core.c): 0 cancels; a deadline with bit 63 set, or
2^50 ns or more ahead (Linux's jiffies wrapping), fires 100 ms from now. VCPUOP_set_singleshot_timer and the
SCHEDOP_poll timeout are read as s_time_t: bit 63 set is in the past and fires now. Nothing is ever armed at or past
``timers.END_OF_TIME``, so every virtual time stays well inside msgpack's range.
"""

from __future__ import annotations

import struct
import weakref
from typing import Any

import pytest
from helpers import call_events, core, make_call, run_handler

from hypervisor import timers
from hypervisor.domain import Domain
from hypervisor.hypercalls import sched_op, set_timer_op, vcpu_op
from hypervisor.hypercalls.base import Call
from pvcluster.abi.xen import VCPU_SSHOTTMR_FUTURE, Hypercall, SchedOp, VcpuOp
from pvcluster.bus.messages import Region

NOW = 1_000_000  # the virtual time of every hypercall here
MS = 1_000_000
HUGE = 100 * MS  # do_set_timer_op's "100 ms from now"
U64 = (1 << 64) - 1
BUF, PORTS = 0x10000, 0x20000
SET_TIMER_OP, SCHED_OP, VCPU_OP = Hypercall.set_timer_op, Hypercall.sched_op, Hypercall.vcpu_op
SCHEDOP_POLL = SchedOp.poll
VCPUOP_SET_PERIODIC_TIMER, VCPUOP_SET_SINGLESHOT_TIMER = VcpuOp.set_periodic_timer, VcpuOp.set_singleshot_timer

_HV: weakref.WeakKeyDictionary[Domain, Any] = weakref.WeakKeyDictionary()


@pytest.fixture
def dom() -> Domain:
    hv = core()
    d = hv.create_domain(hv.spec.domains[0])
    _HV[d] = hv
    return d


_handle = run_handler


def _set_timer_op(dom: Domain, raw: int, *, vt: int = NOW, vcpu: int = 0) -> Call:
    """set_timer_op(raw) on x86-32: the 64-bit deadline in two argument registers, low word first."""
    call = make_call(_HV[dom], dom, SET_TIMER_OP, [raw & 0xFFFFFFFF, (raw >> 32) & 0xFFFFFFFF], [], vcpu=vcpu,
                     vt=vt)
    assert _handle(set_timer_op, call) == 0
    return call


def _traced(call: Call, event: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in kw.items() if k not in ("dom", "vt_ns", "vcpu")} for ev, kw in call_events(call)
            if ev == event]


# -- set_timer_op -----------------------------------------------------------------------------------------------


def test_set_timer_op_with_every_bit_set_fires_100ms_from_now_and_is_traced_as_huge(dom: Domain) -> None:
    call = _set_timer_op(dom, U64)
    assert dom.vcpus[0].timers.singleshot == NOW + HUGE
    assert _traced(call, "timer.huge") == [{"kind": "singleshot", "requested": U64, "deadline_ns": NOW + HUGE}]
    assert _traced(call, "timer.set") == [{"kind": "singleshot", "deadline_ns": NOW + HUGE}]


@pytest.mark.parametrize("raw", [1 << 63, (1 << 63) | NOW, U64 - NOW], ids=["bit63", "bit63-now", "minus-now"])
def test_set_timer_op_with_a_negative_deadline_fires_100ms_from_now(dom: Domain, raw: int) -> None:
    call = _set_timer_op(dom, raw)
    assert dom.vcpus[0].timers.singleshot == NOW + HUGE
    assert [e["requested"] for e in _traced(call, "timer.huge")] == [raw]


@pytest.mark.parametrize("ahead", [(1 << 50) + 1, 1 << 50, 1 << 51, (1 << 62) - NOW - 1],
                         ids=["2^50+1", "2^50", "2^51", "end-of-time"])
def test_set_timer_op_more_than_2_50_ns_ahead_fires_100ms_from_now(dom: Domain, ahead: int) -> None:
    call = _set_timer_op(dom, NOW + ahead)
    assert dom.vcpus[0].timers.singleshot == NOW + HUGE
    assert len(_traced(call, "timer.huge")) == 1


@pytest.mark.parametrize("ahead", [5, 1, 0, -1, -NOW + 1, (1 << 50) - 1], ids=["5", "1", "now", "past", "at-1",
                                                                              "2^50-1"])
def test_set_timer_op_within_the_horizon_is_armed_as_given(dom: Domain, ahead: int) -> None:
    # a deadline already past stays as given: the window that opens next covers it, so it fires at once
    call = _set_timer_op(dom, NOW + ahead)
    assert dom.vcpus[0].timers.singleshot == NOW + ahead
    assert _traced(call, "timer.huge") == []
    assert _traced(call, "timer.set") == [{"kind": "singleshot", "deadline_ns": NOW + ahead}]


def test_set_timer_op_now_plus_5(dom: Domain) -> None:
    _set_timer_op(dom, NOW + 5, vcpu=1)
    assert dom.vcpus[1].timers.singleshot == NOW + 5 and dom.vcpus[0].timers.singleshot is None
    assert [(e.vcpu, e.kind, e.vt_ns) for e in timers.due(dom.vcpus, NOW + 5)] == [(1, "singleshot", NOW + 5)]


def test_set_timer_op_zero_cancels(dom: Domain) -> None:
    _set_timer_op(dom, NOW + 5)
    call = _set_timer_op(dom, 0)
    assert dom.vcpus[0].timers.singleshot is None and dom.vcpus[0].timers.next_deadline() is None
    assert _traced(call, "timer.huge") == []
    assert _traced(call, "timer.set") == [{"kind": "singleshot", "deadline_ns": 0}]
    # a huge one, then 0: cancelled too
    _set_timer_op(dom, U64)
    _set_timer_op(dom, 0)
    assert dom.vcpus[0].timers.singleshot is None


def test_set_timer_op_rule_as_a_function() -> None:
    f = timers.set_timer_op_deadline
    assert f(0, NOW) is None
    assert f(U64, NOW) == f(1 << 63, NOW) == f(NOW + (1 << 50), NOW) == NOW + HUGE
    assert f(NOW + (1 << 50) - 1, NOW) == NOW + (1 << 50) - 1
    assert f(NOW - 1, NOW) == NOW - 1
    # the arguments are read as a u64: bits past 64 are not the guest's to set
    assert f((1 << 64) | (NOW + 5), NOW) == NOW + 5


def test_set_timer_op_never_arms_at_or_past_the_end_of_time() -> None:
    end = timers.END_OF_TIME
    now = end - 50 * MS
    assert timers.set_timer_op_deadline(now + 5, now) == now + 5
    assert timers.set_timer_op_deadline(end + 5, now) is None  # within the horizon but past the end: never fires


def test_a_huge_set_timer_op_near_the_end_of_time_is_not_armed_at_the_end_of_time() -> None:
    end = timers.END_OF_TIME
    for now in (end - 1, end - 50 * MS):
        deadline = timers.set_timer_op_deadline(U64, now)
        assert deadline is None or deadline < end, (now, deadline)


# -- VCPUOP_set_singleshot_timer, SCHEDOP_poll: s_time_t -------------------------------------------------------


def _vcpu_op(dom: Domain, cmd: int, payload: bytes, *, vcpu: int = 0) -> int:
    call = make_call(_HV[dom], dom, VCPU_OP, [cmd, vcpu, BUF], [Region(BUF, len(payload), payload, False)], vcpu=vcpu,
                     vt=NOW)
    return _handle(vcpu_op, call)


@pytest.mark.parametrize("flags", [0, VCPU_SSHOTTMR_FUTURE], ids=["plain", "future"])
def test_vcpuop_singleshot_with_every_bit_set_fires_now(dom: Domain, flags: int) -> None:
    # Xen compares the u64 with NOW() unsigned (so VCPU_SSHOTTMR_future does not refuse it) and arms it as an
    # s_time_t: -1, in the past
    assert _vcpu_op(dom, VCPUOP_SET_SINGLESHOT_TIMER, struct.pack("<QI", U64, flags)) == 0
    assert dom.vcpus[0].timers.singleshot == NOW
    assert [(e.kind, e.vt_ns) for e in timers.due(dom.vcpus, NOW)] == [("singleshot", NOW)]


@pytest.mark.parametrize("raw, want", [(1 << 63, NOW), (NOW + 5, NOW + 5), (NOW + (1 << 51), NOW + (1 << 51)),
                                       ((1 << 62) - 1, (1 << 62) - 1), (1 << 62, None), ((1 << 63) - 1, None)],
                         ids=["bit63", "now+5", "no-horizon", "last", "end-of-time", "max-s_time_t"])
def test_vcpuop_singleshot_reads_the_deadline_as_s_time_t(dom: Domain, raw: int, want: int | None) -> None:
    assert _vcpu_op(dom, VCPUOP_SET_SINGLESHOT_TIMER, struct.pack("<QI", raw, 0)) == 0
    assert dom.vcpus[0].timers.singleshot == want


def _poll(dom: Domain, timeout: int) -> int:
    port = dom.evtchn.bind_ipi(0)
    assert not isinstance(port, int)
    regions = [Region(BUF, 16, struct.pack("<IIQ", PORTS, 1, timeout), False),
               Region(PORTS, 4, struct.pack("<I", port.number), False)]
    call = make_call(_HV[dom], dom, SCHED_OP, [SCHEDOP_POLL, BUF], regions, vcpu=1, vt=NOW)
    assert _handle(sched_op, call) == 0 and call.deferred
    return port.number


def test_sched_poll_with_every_bit_set_times_out_now(dom: Domain) -> None:
    _poll(dom, U64)
    t = dom.vcpus[1].timers
    assert (t.poll, t.poll_seq, t.polling) == (NOW, NOW, True)
    assert [(e.vcpu, e.kind, e.vt_ns, e.seq) for e in timers.due(dom.vcpus, NOW)] == [(1, "poll", NOW, NOW)]


@pytest.mark.parametrize("timeout, want", [(0, None), (NOW + 5, NOW + 5), (1 << 63, NOW), (1 << 62, None)],
                         ids=["none", "now+5", "bit63", "end-of-time"])
def test_sched_poll_timeout_is_read_as_s_time_t(dom: Domain, timeout: int, want: int | None) -> None:
    _poll(dom, timeout)
    assert dom.vcpus[1].timers.poll == want and dom.vcpus[1].timers.polling


# -- the periodic timer ------------------------------------------------------------------------------------------


def test_periodic_catch_up_is_bounded(dom: Domain) -> None:
    v = dom.vcpus[0]
    timers.set_periodic(v, MS, 0)
    assert v.timers.periodic_next == MS
    due = timers.due(dom.vcpus, 10**12)  # a million periods missed
    assert 0 < len(due) <= timers.MAX_CATCH_UP_TICKS
    assert [e.vt_ns for e in due] == [MS * k for k in range(1, len(due) + 1)]  # the first ticks, in order
    assert all(e.kind == "periodic" and e.vcpu == 0 for e in due)
    # the rest are skipped: the next tick is the first on the period's grid after the end
    assert v.timers.periodic_next is not None and v.timers.periodic_next > 10**12
    assert v.timers.periodic_next == 10**12 + MS
    assert timers.due(dom.vcpus, 10**12) == []


def test_periodic_catch_up_near_the_end_of_time_does_not_arm_past_it(dom: Domain) -> None:
    v = dom.vcpus[0]
    timers.set_periodic(v, MS, 0)
    timers.due(dom.vcpus, timers.END_OF_TIME - 1)
    assert v.timers.periodic_next is None or v.timers.periodic_next < timers.END_OF_TIME


def test_periodic_catch_up_within_the_bound_gets_every_tick(dom: Domain) -> None:
    v = dom.vcpus[1]
    timers.set_periodic(v, MS, 500)
    due = timers.due(dom.vcpus, 500 + 10 * MS)
    assert [e.vt_ns for e in due] == [500 + MS * k for k in range(1, 11)]
    assert v.timers.periodic_next == 500 + 11 * MS


def test_a_periodic_timer_is_never_armed_at_or_past_the_end_of_time(dom: Domain) -> None:
    v = dom.vcpus[0]
    end = timers.END_OF_TIME
    timers.set_periodic(v, end, 0)
    assert v.timers.periodic_next is None and v.timers.next_deadline() is None
    timers.set_periodic(v, 10 * MS, end - 15 * MS)
    assert v.timers.periodic_next == end - 5 * MS
    assert [e.vt_ns for e in timers.due(dom.vcpus, end)] == [end - 5 * MS]
    assert v.timers.periodic_next is None  # the next tick would be past the end: disarmed
    # through the hypercall: Xen's largest period is accepted, and arms nothing past the end
    assert _vcpu_op(dom, VCPUOP_SET_PERIODIC_TIMER, struct.pack("<Q", (1 << 62) - 1)) == 0
    assert v.timers.period == (1 << 62) - 1 and v.timers.periodic_next is None
