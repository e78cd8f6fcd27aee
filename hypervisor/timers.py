"""Per-vCPU timers in virtual time: the singleshot timer, the periodic timer and the SCHEDOP_poll timeout.

The deadlines live on each vCPU (``Vcpu.timers``). The clock asks for the earliest deadline of a domain (so a
window opens that reaches it even when every vCPU is blocked) and, once a window is open, for the timers that come
due by its end: a singleshot or periodic timer becomes an event on the port bound to VIRQ_TIMER for that vCPU (if
one is); a poll timeout ends that vCPU's SCHEDOP_poll.

Guest-supplied deadlines are 64-bit and Xen reads them as ``s_time_t`` (signed). ``guest_deadline`` turns one into
a time this simulator can reach: as Xen, a deadline with bit 63 set is in the past and fires at once, and anything
at or past ``END_OF_TIME`` (far beyond any run) never fires. That keeps every virtual time a window or a message
carries well inside msgpack's 64-bit range.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from hypervisor.vcpu import Vcpu

# Virtual time beyond which nothing is ever scheduled (2^62 ns, 146 years): sums of a time and any modelled delay
# stay below 2^63.
END_OF_TIME = 1 << 62
# do_set_timer_op (xen/common/sched/core.c): a timeout more than 2^50 ns ahead, or negative, is Linux's jiffies
# wrapping; Xen fires the timer 100 ms from now instead.
SET_TIMER_OP_HORIZON_SHIFT = 50
SET_TIMER_OP_HUGE_NS = 100_000_000
# A periodic timer that missed more ticks than this (its domain was paused, say) skips the rest: bounded work.
MAX_CATCH_UP_TICKS = 1000


@attrs.frozen
class Expiry:
    domid: int
    vcpu: int
    kind: str  # "singleshot", "periodic", "poll"
    vt_ns: int
    seq: int = 0


def guest_deadline(raw: int, now: int) -> int | None:
    """An absolute deadline a guest gave as a u64, as Xen's set_timer reads it (s_time_t): negative values are in
    the past (fire at ``now``); None when it lies at or beyond the end of time."""
    raw &= (1 << 64) - 1
    if raw >> 63:
        return now
    return raw if raw < END_OF_TIME else None


def set_timer_op_deadline(raw: int, now: int) -> int | None:
    """do_set_timer_op's rule on top of ``guest_deadline``: 0 cancels (None); a negative timeout, or one more than
    2^50 ns ahead, fires 100 ms from now."""
    raw &= (1 << 64) - 1
    if raw == 0:
        return None
    offset = raw - now
    if raw >> 63 or (offset > 0 and offset >> SET_TIMER_OP_HORIZON_SHIFT):
        soon = now + SET_TIMER_OP_HUGE_NS
        return soon if soon < END_OF_TIME else None
    return guest_deadline(raw, now)


def set_periodic(v: Vcpu, period: int, now: int) -> None:
    """Start (period > 0) or stop (0) the periodic timer; the first tick is one period from ``now``, as Xen."""
    v.timers.period = period
    first = now + period
    v.timers.periodic_next = first if period and first < END_OF_TIME else None


def set_poll(v: Vcpu, deadline: int | None, seq: int) -> None:
    v.timers.poll, v.timers.poll_seq, v.timers.polling = deadline, seq, True


def next_deadline(vcpus: Iterable[Vcpu]) -> int | None:
    """The earliest deadline armed on any of ``vcpus`` that is up."""
    times = [d for v in vcpus if v.up and (d := v.timers.next_deadline()) is not None]
    return min(times) if times else None


def due(vcpus: Iterable[Vcpu], end_ns: int) -> list[Expiry]:
    """Every expiry at or before ``end_ns``, in (time, domid, vcpu) order; periodic timers re-arm (one expiry per
    period, so a vCPU that slept through several periods gets every tick, as Xen's periodic timer catches up one
    period at a time)."""
    out: list[Expiry] = []
    for v in vcpus:
        t = v.timers
        if t.singleshot is not None and t.singleshot <= end_ns:
            out.append(Expiry(v.domid, v.vid, "singleshot", t.singleshot))
            t.singleshot = None
        ticks = 0
        while t.periodic_next is not None and t.periodic_next <= end_ns:
            ticks += 1
            if ticks > MAX_CATCH_UP_TICKS:
                missed = (end_ns - t.periodic_next) // t.period + 1
                following = t.periodic_next + missed * t.period
                t.periodic_next = following if following < END_OF_TIME else None
                break
            out.append(Expiry(v.domid, v.vid, "periodic", t.periodic_next))
            following = t.periodic_next + t.period
            t.periodic_next = following if following < END_OF_TIME else None
        if t.poll is not None and t.poll <= end_ns:
            out.append(Expiry(v.domid, v.vid, "poll", t.poll, t.poll_seq))
            t.poll = None
    return sorted(out, key=lambda e: (e.vt_ns, e.domid, e.vcpu, e.kind))
