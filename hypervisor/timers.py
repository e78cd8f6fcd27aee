"""Per-vCPU timers in virtual time: the singleshot timer (set_timer_op, VCPUOP_set_singleshot_timer), the periodic
timer (VCPUOP_set_periodic_timer) and the SCHEDOP_poll timeout.

The hypervisor keeps only deadlines here. The server asks for the earliest deadline of every vCPU that cannot run
(so the conductor opens a window reaching it even when every vCPU is blocked) and, once a window is open, for the
timers that come due by its end: a singleshot or periodic timer becomes an event on the port bound to VIRQ_TIMER
for that vCPU (if one is); a poll timeout ends that vCPU's SCHEDOP_poll.
"""

from __future__ import annotations

import attrs

Key = tuple[int, int]  # (domid, vcpu)


@attrs.define
class VcpuTimers:
    singleshot: int | None = None  # absolute virtual ns
    period: int = 0  # 0: no periodic timer
    periodic_next: int | None = None
    poll: int | None = None  # SCHEDOP_poll timeout, absolute
    poll_seq: int = 0  # the virtual time of the poll's trap, which names the poll it ends
    polling: bool = False  # in SCHEDOP_poll, as far as the hypervisor knows (until the vCPU's next hypercall)


@attrs.frozen
class Expiry:
    domid: int
    vcpu: int
    kind: str  # "singleshot", "periodic", "poll"
    vt_ns: int
    seq: int = 0


_timers: dict[Key, VcpuTimers] = {}


def get(domid: int, vcpu: int) -> VcpuTimers:
    t = _timers.get((domid, vcpu))
    if t is None:
        t = _timers[(domid, vcpu)] = VcpuTimers()
    return t


def set_singleshot(domid: int, vcpu: int, deadline: int | None) -> None:
    get(domid, vcpu).singleshot = deadline


def set_periodic(domid: int, vcpu: int, period: int, now: int) -> None:
    """Start (period > 0) or stop (0) the periodic timer; the first tick is one period from ``now``, as Xen."""
    t = get(domid, vcpu)
    t.period = period
    t.periodic_next = now + period if period else None


def set_poll(domid: int, vcpu: int, deadline: int | None, seq: int) -> None:
    t = get(domid, vcpu)
    t.poll, t.poll_seq, t.polling = deadline, seq, True


def end_poll(domid: int, vcpu: int) -> None:
    """The vCPU made another hypercall, so any poll of its own is over: its timeout no longer matters."""
    t = _timers.get((domid, vcpu))
    if t is not None:
        t.poll, t.polling = None, False


def pollers(domid: int) -> list[int]:
    """vCPUs of ``domid`` that may be in SCHEDOP_poll: an event for the domain must wake them to look."""
    return sorted(v for (d, v), t in _timers.items() if d == domid and t.polling)


def next_deadline(domid: int, vcpu: int) -> int | None:
    t = _timers.get((domid, vcpu))
    if t is None:
        return None
    times = [d for d in (t.singleshot, t.periodic_next, t.poll) if d is not None]
    return min(times) if times else None


def armed() -> list[Key]:
    return sorted(k for k in _timers if next_deadline(*k) is not None)


def due(end_ns: int) -> list[Expiry]:
    """Every expiry at or before ``end_ns``, in (time, domid, vcpu) order; periodic timers re-arm (one expiry per
    period, so a vCPU that slept through several periods gets every tick, as Xen's periodic timer catches up one
    period at a time)."""
    out: list[Expiry] = []
    for (domid, vcpu), t in _timers.items():
        if t.singleshot is not None and t.singleshot <= end_ns:
            out.append(Expiry(domid, vcpu, "singleshot", t.singleshot))
            t.singleshot = None
        while t.periodic_next is not None and t.periodic_next <= end_ns:
            out.append(Expiry(domid, vcpu, "periodic", t.periodic_next))
            t.periodic_next += t.period
        if t.poll is not None and t.poll <= end_ns:
            out.append(Expiry(domid, vcpu, "poll", t.poll, t.poll_seq))
            t.poll = None
    return sorted(out, key=lambda e: (e.vt_ns, e.domid, e.vcpu, e.kind))


def forget(domid: int) -> None:
    for key in [k for k in _timers if k[0] == domid]:
        del _timers[key]
