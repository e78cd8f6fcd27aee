"""Unit tests of issue 5's event-channel part: interdomain channels (bind_interdomain, send, close, reset, a hostile
domain naming another's ports), the cross-domain delivery queue (``Hypervisor.deliver``, ``Domain.deliveries``),
virtual-time timers (set_timer_op, VCPUOP_*_timer) and SCHEDOP_poll.

Hypercalls run a family's ``handle`` on real Domains of one in-process hypervisor core (alpha, domid 1, is the
caller; beta, domid 2, the peer; gamma, domid 3, a third party where a test needs one) with the command struct in a
hand-made guest region.
"""

from __future__ import annotations

import struct
import weakref
from typing import Any

import attrs
import keystone
import pytest
from helpers import RecordingLog, call_events, core, make_call, run_handler

from domains import events as guest_events
from domains.memory import GuestRam
from domains.paging import build_initial_tables, initial_mappings
from domains.runtime import DomainProcess
from domains.vcpu import InsnCounter, Vcpu, VcpuState, flat_gdt
from hypervisor import evtchn, timers, trap
from hypervisor.clock import OpenWindow
from hypervisor.core import Hypervisor
from hypervisor.domain import Domain, DomainState
from hypervisor.evtchn import Port, PortState, Virq
from hypervisor.guestmem import NotCopied
from hypervisor.hypercalls import event_channel_op, sched_op, set_timer_op, vcpu_op
from hypervisor.hypercalls.base import Call
from hypervisor.hypercalls.event_channel_op import EvtchnOp
from pvcluster.abi.copyin import copy_in
from pvcluster.abi.errno import Errno, as_signed
from pvcluster.abi.xen import DOMID_SELF, Hypercall, SchedOp, VcpuOp
from pvcluster.bus.effects import ClearPending, Poll, PollTimeout, SetPending
from pvcluster.bus.messages import Delivery, HypercallReq, HypercallResult, Region, Window, WindowDone

BUF = 0x10000
PORTS = 0x20000
VIRT = 0xC0000000
_S = PortState

_HV: weakref.WeakKeyDictionary[Domain, Hypervisor] = weakref.WeakKeyDictionary()


@pytest.fixture
def doms() -> tuple[Domain, Domain]:
    hv = core()
    a, b = hv.create_domain(hv.spec.domains[0]), hv.create_domain(hv.spec.domains[1])
    assert (a.domid, b.domid) == (1, 2)
    _HV[a] = _HV[b] = hv
    return a, b


def _third(dom: Domain) -> Domain:
    """Domain 3 (gamma), in the same hypervisor: a third party to channels between alpha and beta."""
    hv = _HV[dom]
    c = hv.create_domain(attrs.evolve(hv.spec.domains[0], name="gamma"))
    assert c.domid == 3
    _HV[c] = hv
    return c


def _call(dom: Domain, nr: int, args: list[int], regions: list[Region], *, vcpu: int = 0, vt: int = 0) -> Call:
    return make_call(_HV[dom], dom, nr, args, regions, vcpu=vcpu, vt=vt)


_handle = run_handler


def _ev(dom: Domain, cmd: int, payload: bytes, **kw: Any) -> tuple[int, Call]:
    call = _call(dom, Hypercall.event_channel_op, [cmd, BUF], [Region(BUF, len(payload), payload, True)], **kw)
    return _handle(event_channel_op, call), call


def _denied(call: Call) -> list[str]:
    return [kw["reason"] for ev, kw in call_events(call) if ev.endswith(".denied")]


def _pending(vcpu: int, port: int) -> SetPending:
    return SetPending(vcpu=vcpu, port=port)


def _offer(dom: Domain, remote: int) -> int:
    rc, call = _ev(dom, EvtchnOp.alloc_unbound, struct.pack("<HHI", DOMID_SELF, remote, 0))
    assert rc == 0, _denied(call)
    return int(struct.unpack_from("<I", call.mem.writes[0].data, 4)[0])


def _bind(dom: Domain, rdom: int, rport: int, **kw: Any) -> tuple[int, Call]:
    return _ev(dom, EvtchnOp.bind_interdomain, struct.pack("<HHII", rdom, 0, rport, 0xFFFFFFFF), **kw)


def _port(dom: Domain, cmd: int, port: int, **kw: Any) -> tuple[int, Call]:
    return _ev(dom, cmd, struct.pack("<I", port), **kw)


def _connected(a: Domain, b: Domain) -> tuple[int, int]:
    theirs = _offer(b, a.domid)
    rc, call = _bind(a, b.domid, theirs)
    assert rc == 0, _denied(call)
    return int(struct.unpack_from("<I", call.mem.writes[0].data, 8)[0]), theirs


def _ipi_port(dom: Domain, vcpu: int) -> Port:
    p = dom.evtchn.bind_ipi(vcpu)
    assert isinstance(p, Port)
    return p


def _running(*doms: Domain) -> None:
    """Built and taking part in windows, as far as the clock and ``deliver`` are concerned."""
    for d in doms:
        d.move(DomainState.RUNNING, "test")
        d.joined = True


# -- bind_interdomain ---------------------------------------------------------------------------------------


def test_bind_interdomain_connects_both_ends_writes_the_local_port_and_sets_it_pending(doms: Any) -> None:
    a, b = doms
    theirs = _offer(b, a.domid)
    _ipi_port(a, 0)  # port 1 taken: the new local port is 2
    rc, call = _bind(a, b.domid, theirs)
    assert rc == 0
    assert call.mem.writes[0].data == struct.pack("<HHII", b.domid, 0, theirs, 2)
    assert call.effects == [_pending(0, 2)] and call.remote == []
    assert a.evtchn.lookup(2) == Port(2, state=_S.INTERDOMAIN, remote_dom=b.domid, remote_port=theirs)
    assert b.evtchn.lookup(theirs) == Port(theirs, state=_S.INTERDOMAIN, remote_dom=a.domid, remote_port=2)


def test_bind_interdomain_to_domid_self_is_a_loopback_channel(doms: Any) -> None:
    a, _ = doms
    waiting = _offer(a, DOMID_SELF)
    rc, call = _bind(a, DOMID_SELF, waiting)
    assert rc == 0 and call.effects == [_pending(0, 2)]
    rc, call = _port(a, EvtchnOp.send, 2)
    assert rc == 0 and call.effects == [_pending(0, waiting)] and call.remote == []


def test_bind_interdomain_to_a_domain_that_does_not_exist_is_esrch(doms: Any) -> None:
    a, _ = doms
    for rdom in (9, 77, 0):
        rc, call = _bind(a, rdom, 1)
        assert rc == -Errno.ESRCH and _denied(call) == ["no-such-domain"] and call.mem.writes == [], rdom
    # a domain that has crashed is no longer there to bind to, even with a port that was offered to the caller
    c = _third(a)
    offered = _offer(c, a.domid)
    _HV[a].crash(c, "test")
    rc, call = _bind(a, c.domid, offered)
    assert rc == -Errno.ESRCH and _denied(call) == ["no-such-domain"] and a.evtchn.in_use() == []


def test_bind_interdomain_refuses_ports_not_offered_to_the_caller(doms: Any) -> None:
    a, b = doms
    for_c = _offer(b, 3)  # offered to domain 3, not to alpha
    ipi = _ipi_port(b, 0)
    connected, _ = _connected(b, a)  # b's end of a channel that already exists
    for rport in (for_c, ipi.number, connected, 0, 600, evtchn.NR_EVENT_CHANNELS, 0xFFFFFFFF):
        rc, call = _bind(a, b.domid, rport)
        assert rc == -Errno.EINVAL and call.effects == [] and call.mem.writes == [], rport
        assert _denied(call) == ["remote-port-not-offered"]
    # nothing changed on either side
    assert b.evtchn.lookup(for_c) == Port(for_c, state=_S.UNBOUND, remote_dom=3)
    assert [p.number for p in a.evtchn.in_use()] == [1]


def test_bind_interdomain_with_no_free_local_port_is_enospc(doms: Any) -> None:
    a, b = doms
    theirs = _offer(b, a.domid)
    for _ in range(1, evtchn.NR_EVENT_CHANNELS):
        _ipi_port(a, 0)
    rc, call = _bind(a, b.domid, theirs)
    assert rc == -Errno.ENOSPC and _denied(call) == ["no-free-port"]
    assert b.evtchn.lookup(theirs) == Port(theirs, state=_S.UNBOUND, remote_dom=a.domid)


# -- send, close, reset -------------------------------------------------------------------------------------


def test_send_marks_the_remote_port_pending_on_the_vcpu_it_notifies(doms: Any) -> None:
    a, b = doms
    ours, theirs = _connected(a, b)
    assert b.evtchn.bind_vcpu(theirs, 1) is None
    rc, call = _port(a, EvtchnOp.send, ours)
    assert rc == 0 and call.effects == [] and call.remote == [(b.domid, _pending(1, theirs))]
    rc, call = _port(b, EvtchnOp.send, theirs)
    assert rc == 0 and call.remote == [(a.domid, _pending(0, ours))]


def test_close_leaves_the_peer_unbound_and_notifies_it(doms: Any) -> None:
    a, b = doms
    ours, theirs = _connected(a, b)
    rc, call = _port(b, EvtchnOp.close, theirs)
    assert rc == 0
    assert call.effects == [ClearPending(port=theirs)]
    assert call.remote == [(a.domid, _pending(0, ours))]
    assert a.evtchn.lookup(ours) == Port(ours, state=_S.UNBOUND, remote_dom=b.domid)
    # sending on the now unbound end is dropped silently, as Xen does
    rc, call = _port(a, EvtchnOp.send, ours)
    assert rc == 0 and call.remote == [] and call.effects == []


def test_close_of_a_loopback_end_notifies_the_other_end_locally(doms: Any) -> None:
    a, _ = doms
    waiting = _offer(a, DOMID_SELF)
    assert _bind(a, DOMID_SELF, waiting)[0] == 0
    rc, call = _port(a, EvtchnOp.close, 2)
    assert rc == 0 and call.remote == []
    assert call.effects == [ClearPending(port=2), _pending(0, waiting)]


def test_reset_closes_every_port_of_the_caller_and_notifies_peers(doms: Any) -> None:
    a, b = doms
    _ipi_port(a, 1)
    ours, theirs = _connected(a, b)
    _offer(a, b.domid)
    rc, call = _ev(a, EvtchnOp.reset, struct.pack("<H", DOMID_SELF))
    assert rc == 0 and a.evtchn.in_use() == []
    assert sorted(e.port for e in call.effects if isinstance(e, ClearPending)) == [1, 2, 3]
    assert call.remote == [(b.domid, _pending(0, theirs))]
    assert b.evtchn.lookup(theirs) == Port(theirs, state=_S.UNBOUND, remote_dom=a.domid)
    rc, call = _ev(a, EvtchnOp.reset, struct.pack("<H", a.domid))  # its own id works as DOMID_SELF
    assert rc == 0 and call.effects == []


# -- a hostile domain -----------------------------------------------------------------------------------------


def test_a_domain_cannot_send_on_close_or_reset_another_domains_ports(doms: Any) -> None:
    a, b = doms
    c = _third(a)
    _, theirs = _connected(b, c)
    bports = [p.number for p in b.evtchn.in_use()]
    # alpha names beta's port numbers: in alpha's own table they are free
    for port in bports:
        rc, call = _port(a, EvtchnOp.send, port)
        assert rc == -Errno.EINVAL and call.remote == [] and call.effects == []
        rc, call = _port(a, EvtchnOp.close, port)
        assert rc == -Errno.EINVAL and call.remote == [] and call.effects == []
    rc, call = _ev(a, EvtchnOp.reset, struct.pack("<H", b.domid))
    assert rc == -Errno.EPERM and _denied(call) == ["foreign-domid"]
    rc, call = _ev(a, EvtchnOp.reset, struct.pack("<H", 9))
    assert rc == -Errno.ESRCH
    rc, call = _ev(a, EvtchnOp.status, struct.pack("<HHI", b.domid, 0, theirs) + bytes(16))
    assert rc == -Errno.EPERM
    rc, call = _ev(a, EvtchnOp.alloc_unbound, struct.pack("<HHI", b.domid, a.domid, 0))
    assert rc == -Errno.EPERM
    assert [p.number for p in b.evtchn.in_use()] == bports
    assert c.evtchn.lookup(theirs) == Port(theirs, state=_S.INTERDOMAIN, remote_dom=b.domid, remote_port=bports[0])


def test_a_domain_cannot_steal_a_port_offered_to_another_or_already_bound(doms: Any) -> None:
    a, b = doms
    offered_to_c = _offer(b, 3)
    c_port, b_port = _connected(_third(a), b)
    for rport in (offered_to_c, b_port):
        rc, call = _bind(a, b.domid, rport)
        assert rc == -Errno.EINVAL and call.effects == [] and call.remote == []
    assert b.evtchn.lookup(offered_to_c) == Port(offered_to_c, state=_S.UNBOUND, remote_dom=3)
    assert b.evtchn.lookup(b_port) == Port(b_port, state=_S.INTERDOMAIN, remote_dom=3, remote_port=c_port)
    assert a.evtchn.in_use() == []


# -- the cross-domain delivery queue ------------------------------------------------------------------------------


def test_an_interdomain_send_reaches_the_peer_link_ns_later_in_the_window_that_covers_it(doms: Any) -> None:
    a, b = doms
    hv = _HV[a]
    ours, theirs = _connected(a, b)
    _running(a, b)
    req = HypercallReq(vcpu=0, seq=1, vt_ns=12_345, nr=Hypercall.event_channel_op,
                       args=[EvtchnOp.send, BUF, 0, 0, 0], regions=[Region(BUF, 4, struct.pack("<I", ours), False)])
    out = trap.apply(hv, a, req)
    assert out.result is not None and out.result.value == 0 and out.result.effects == []
    assert out.remote == [(b.domid, _pending(0, theirs))]
    assert a.results == [out.result]  # the answer is on a's link, waiting for a's next window
    a.results.clear()
    # the clock applies the window's hypercalls and hands each remote effect to its domain link_ns later
    assert hv.cost.link_ns == 10_000
    window = OpenWindow(index=1, grid=1, start_ns=10_000, end_ns=20_000, participants={1: a, 2: b}, runs={})
    shutdowns, stopped, fresh = hv.clock._apply_hypercalls(
        window, {a.domid: WindowDone(index=1, vcpus=[], hypercalls=[req], faults=[])})
    assert (shutdowns, stopped) == ([], set())
    assert [r.seq for r in a.results] == [1] and fresh == {a.domid: a.results}
    assert b.take_deliveries(20_000) == []  # not due yet
    # the notification is b's first (event id 1) and the first message on b's link (sequence number 1)
    sent = SetPending(vcpu=0, port=theirs, eid=1)
    assert b.take_deliveries(22_345) == [Delivery(vt_ns=22_345, effect=sent, seq=1)]
    assert b.take_deliveries(10**9) == [] and a.take_deliveries(10**9) == []


def test_deliveries_are_taken_in_arrival_order_and_dropped_when_the_domain_leaves(doms: Any) -> None:
    a, b = doms
    hv = _HV[a]
    hv.deliver(b, _pending(0, 5), 300)  # still being built: nothing is queued for it
    assert b.deliveries == []
    _running(b)
    hv.deliver(b, _pending(0, 5), 300)
    hv.deliver(b, _pending(1, 6), 100)
    hv.deliver(b, _pending(0, 7), 900)
    hv.deliver(b, _pending(0, 8), 300)  # the same time as port 5's: after it, in the order they arrived
    assert [d.effect.port for d in b.take_deliveries(500)] == [6, 5, 8]
    hv.crash(b, "test")
    assert b.take_deliveries(1000) == []
    hv.deliver(b, _pending(0, 9), 2000)  # a domain that left gets nothing more
    assert b.deliveries == []


def test_a_domain_that_leaves_sends_its_interdomain_peers_back_to_unbound_and_tells_them(doms: Any) -> None:
    a, b = doms
    hv = _HV[a]
    ours, theirs = _connected(a, b)
    assert a.evtchn.bind_vcpu(ours, 1) is None
    _running(a, b)
    hv.destroy(b)
    assert b.evtchn.in_use() == []
    assert a.evtchn.lookup(ours) == Port(ours, state=_S.UNBOUND, notify_vcpu=1, remote_dom=b.domid)
    closed = SetPending(vcpu=1, port=ours, eid=a.events_sent)
    assert a.deliveries == [Delivery(vt_ns=hv.clock.now_ns + hv.cost.link_ns, effect=closed, seq=a.link.seq)]
    assert [kw["port"] for ev, kw in hv.log.events if ev == "evtchn.peer_closed" and kw["dom"] == a.domid] == [ours]


# -- timers -----------------------------------------------------------------------------------------------------


def _hc(dom: Domain, module: Any, nr: int, args: list[int], payload: bytes | None = b"", *, size: int = 0,
        vcpu: int = 0, vt: int = 1000) -> tuple[int, Call]:
    """Hypercall ``nr`` with ``payload`` at BUF (none if empty; with ``payload`` None, ``size`` unmapped bytes)."""
    if payload is None:
        regions = [Region(BUF, size, None, False)]
    else:
        regions = [Region(BUF, len(payload), payload, False)] if payload else []
    call = _call(dom, nr, args, regions, vcpu=vcpu, vt=vt)
    return _handle(module, call), call


def _armed(dom: Domain) -> list[tuple[int, int]]:
    return [(v.domid, v.vid) for d in _HV[dom].domains for v in d.vcpus if v.timers.next_deadline() is not None]


def test_set_timer_op_arms_and_cancels_the_callers_singleshot_timer(doms: Any) -> None:
    a, _ = doms
    deadline = (5 << 32) | 0x1234
    assert _hc(a, set_timer_op, 15, [deadline & 0xFFFFFFFF, deadline >> 32, 0, 0, 0], vcpu=1)[0] == 0
    assert a.vcpus[1].timers.singleshot == deadline and a.vcpus[1].timers.next_deadline() == deadline
    assert _hc(a, set_timer_op, 15, [0, 0, 0, 0, 0], vcpu=1)[0] == 0
    assert a.vcpus[1].timers.next_deadline() is None
    assert copy_in(Hypercall.set_timer_op, [1, 2, 0, 0, 0], lambda _a, _n: None) == []


def test_vcpu_op_periodic_timer(doms: Any) -> None:
    a, _ = doms
    period = struct.pack("<Q", 2_000_000)
    assert copy_in(Hypercall.vcpu_op, [VcpuOp.set_periodic_timer, 1, BUF], lambda _a, _n: None)[0].length == 8
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_periodic_timer, 1, BUF], period, vt=1000)[0] == 0
    assert a.vcpus[1].timers.next_deadline() == 2_001_000
    # expiries come one per period, in time order, and the timer re-arms
    due = timers.due(a.vcpus, 6_500_000)
    assert [(e.kind, e.vt_ns) for e in due] == [("periodic", 2_001_000), ("periodic", 4_001_000),
                                                ("periodic", 6_001_000)]
    assert a.vcpus[1].timers.next_deadline() == 8_001_000
    assert _hc(a, vcpu_op, 24, [VcpuOp.stop_periodic_timer, 1, 0])[0] == 0
    assert a.vcpus[1].timers.next_deadline() is None
    # Xen's bounds: under a millisecond is -EINVAL; an unmapped struct -EFAULT; a vCPU it lacks -ENOENT
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_periodic_timer, 0, BUF], struct.pack("<Q", 999_999))[0] == -Errno.EINVAL
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_periodic_timer, 0, BUF], None, size=8)[0] == -Errno.EFAULT
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_periodic_timer, 5, BUF], period)[0] == -Errno.ENOENT
    # a struct the domain process did not copy in is -EFAULT too, from the trap
    req = HypercallReq(vcpu=0, seq=1, vt_ns=1000, nr=24, args=[VcpuOp.set_periodic_timer, 0, BUF], regions=[])
    with pytest.raises(NotCopied):
        vcpu_op.handle(_call(a, 24, req.args, []))
    out = trap.apply(_HV[a], a, req)
    assert out.result is not None and as_signed(out.result.value) == -Errno.EFAULT
    assert _armed(a) == []


def test_vcpu_op_singleshot_timer(doms: Any) -> None:
    a, _ = doms
    assert copy_in(Hypercall.vcpu_op, [VcpuOp.set_singleshot_timer, 0, BUF], lambda _a, _n: None)[0].length == 12
    sshot = struct.pack("<QI", 50_000, 0)
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_singleshot_timer, 0, BUF], sshot)[0] == 0
    assert a.vcpus[0].timers.next_deadline() == 50_000
    # only the calling vCPU's own
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_singleshot_timer, 1, BUF], sshot, vcpu=0)[0] == -Errno.EINVAL
    assert _hc(a, vcpu_op, 24, [VcpuOp.stop_singleshot_timer, 1, 0], vcpu=0)[0] == -Errno.EINVAL
    # VCPU_SSHOTTMR_future: a deadline already past is -ETIME
    past = struct.pack("<QI", 500, 1)
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_singleshot_timer, 0, BUF], past, vt=1000)[0] == -Errno.ETIME
    # the struct must be there whole (12 bytes, of which the domain process could read only 8)
    short = _call(a, 24, [VcpuOp.set_singleshot_timer, 0, BUF], [Region(BUF, 12, struct.pack("<Q", 1), False)])
    assert _handle(vcpu_op, short) == -Errno.EFAULT
    assert [(e.kind, e.vt_ns) for e in timers.due(a.vcpus, 60_000)] == [("singleshot", 50_000)]
    assert a.vcpus[0].timers.next_deadline() is None
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_singleshot_timer, 0, BUF], sshot)[0] == 0
    assert _hc(a, vcpu_op, 24, [VcpuOp.stop_singleshot_timer, 0, 0])[0] == 0
    assert a.vcpus[0].timers.next_deadline() is None


def test_timers_go_with_their_domain(doms: Any) -> None:
    a, b = doms
    a.vcpus[0].timers.singleshot = 10
    timers.set_periodic(b.vcpus[1], 1_000_000, 0)
    assert _armed(a) == [(1, 0), (2, 1)]
    _HV[a].crash(a, "test")
    assert _armed(a) == [(2, 1)]
    _HV[a].destroy(b)
    assert _armed(a) == []


# -- SCHEDOP_poll -------------------------------------------------------------------------------------------------


def _poll(dom: Domain, ports: list[int], timeout: int = 0, *, nr: int | None = None,
          ports_mapped: bool = True) -> tuple[int, Call]:
    n = len(ports) if nr is None else nr
    regions = [Region(BUF, 16, struct.pack("<IIQ", PORTS, n, timeout), False)]
    data = struct.pack(f"<{len(ports)}I", *ports)
    regions.append(Region(PORTS, len(data), data if ports_mapped else None, False))
    call = _call(dom, Hypercall.sched_op, [SchedOp.poll, BUF, 0, 0, 0], regions, vcpu=1, vt=7000)
    return _handle(sched_op, call), call


def test_poll_copy_in_names_the_struct_and_the_port_array() -> None:
    mem = {BUF: struct.pack("<IIQ", PORTS, 3, 0)}
    spans = copy_in(Hypercall.sched_op, [SchedOp.poll, BUF, 0, 0, 0], lambda a, n: mem.get(a))
    assert [(s.addr, s.length) for s in spans] == [(BUF, 16), (PORTS, 12)]
    spans = copy_in(Hypercall.sched_op, [SchedOp.poll, 0x999, 0, 0, 0], lambda a, n: None)
    assert [(s.addr, s.length) for s in spans] == [(0x999, 16)]


def test_poll_defers_with_the_port_list_and_arms_the_timeout(doms: Any) -> None:
    a, _ = doms
    p1, p2 = _ipi_port(a, 1), _ipi_port(a, 0)
    rc, call = _poll(a, [p1.number, p2.number], timeout=90_000)
    assert rc == 0 and call.deferred
    assert call.effects == [Poll(vcpu=1, ports=[1, 2])]
    assert a.vcpus[1].timers.poll == 90_000 and a.vcpus[1].timers.poll_seq == 7000
    assert [(e.kind, e.seq) for e in timers.due(a.vcpus, 100_000)] == [("poll", 7000)]
    rc, call = _poll(a, [p1.number])  # timeout 0: none
    assert rc == 0 and a.vcpus[1].timers.next_deadline() is None


def test_poll_refuses_ports_that_are_not_the_callers(doms: Any) -> None:
    a, b = doms
    theirs = _ipi_port(b, 0)
    mine = _ipi_port(a, 0)
    for ports in ([theirs.number + 1], [0], [mine.number, 4000], [0xFFFFFFFF]):
        rc, call = _poll(a, ports)
        assert rc == -Errno.EINVAL and not call.deferred and call.effects == [], ports
    rc, call = _poll(a, [mine.number] * 2, nr=129)
    assert rc == -Errno.EINVAL
    rc, call = _poll(a, [mine.number], ports_mapped=False)
    assert rc == -Errno.EFAULT and not call.deferred
    assert _armed(a) == []


def test_virq_timer_port_lookup_for_expiry(doms: Any) -> None:
    a, _ = doms
    p = a.evtchn.bind_virq(Virq.TIMER, 1)
    assert isinstance(p, Port) and a.evtchn.virq_port(1, Virq.TIMER) == p.number


def test_a_poller_is_known_until_its_next_hypercall_which_also_cancels_its_timeout(doms: Any) -> None:
    a, _ = doms
    p = _ipi_port(a, 0)
    assert _poll(a, [p.number], timeout=50_000)[0] == 0
    assert [v.vid for v in a.vcpus if v.timers.polling] == [1] and a.vcpus[1].timers.next_deadline() == 50_000
    _running(a)
    trap.apply(_HV[a], a, HypercallReq(vcpu=1, seq=2, vt_ns=9000, nr=17, args=[0, 0, 0, 0, 0], regions=[]))
    assert [v.vid for v in a.vcpus if v.timers.polling] == [] and a.vcpus[1].timers.next_deadline() is None
    assert timers.due(a.vcpus, 10**9) == []


# -- the domain side: window events, poll and its timeout -----------------------------------------------------

_POLLER = "mov eax, 29\n mov ebx, 3\n int 0x82\n hlt"  # SCHEDOP_poll, then halt


def _polling_domain(pending: tuple[int, ...] = ()) -> tuple[DomainProcess, Vcpu, GuestRam]:
    """A domain process with one vCPU trapped in SCHEDOP_poll on ports 5 and 9, its ``Poll`` effect applied."""
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    ram = GuestRam(1 << 20, VIRT)
    ram.write_pa(0, bytes(ks.asm(_POLLER, VIRT)[0]))
    ram.write_pa(ram.gdt_paddr, flat_gdt())
    tables = build_initial_tables(ram, 0xF0000, initial_mappings(VIRT, ram.size), tables_read_only=True)
    vcpu = Vcpu(0, ram, InsnCounter(), 1000, tables.l2)
    vcpu.set_regs({"eip": VIRT, "esp": VIRT + 0x80000, "eflags": 0x2})
    vcpu.state = VcpuState.RUNNING
    proc = DomainProcess(None, 1, "alpha", RecordingLog())  # type: ignore[arg-type]
    proc.ram, proc.vcpus = ram, [vcpu]
    vcpu.run(50_000)
    trapped = vcpu.trap
    assert vcpu.state is VcpuState.HYPERCALL and trapped is not None
    for port in pending:
        guest_events.set_pending(ram, port, 0)
    proc._apply(HypercallResult(vcpu=0, seq=trapped.seq, vt_ns=trapped.vt_ns + 400, value=0, writes=[],
                                effects=[Poll(vcpu=0, ports=[5, 9])], complete=False))
    return proc, vcpu, ram


def test_a_poll_wakes_only_for_a_polled_port_and_not_before_the_event_arrives() -> None:
    proc, vcpu, ram = _polling_domain()
    assert vcpu.state is VcpuState.BLOCKED and vcpu.poll_ports == [5, 9]
    proc._event(Delivery(vt_ns=200_000, effect=SetPending(vcpu=0, port=7)))
    vcpu.run(300_000)
    assert vcpu.state is VcpuState.BLOCKED and vcpu.trap is not None  # 7 is not polled; the upcall does not count
    proc._event(Delivery(vt_ns=400_000, effect=SetPending(vcpu=0, port=9)))
    assert guest_events.is_pending(ram, 9) and vcpu.clock_ns >= 400_000
    vcpu.run(500_000)
    assert vcpu.trap is None and vcpu.poll_ports is None and vcpu.reg("eax") == 0


def test_a_poll_timeout_ends_only_the_poll_it_was_set_for() -> None:
    proc, vcpu, _ = _polling_domain()
    assert vcpu.trap is not None
    trap_vt = vcpu.trap.vt_ns
    proc._event(Delivery(vt_ns=90_000, effect=PollTimeout(vcpu=0, trap_vt=trap_vt - 1)))
    assert vcpu.state is VcpuState.BLOCKED and vcpu.trap is not None  # a stale timeout, of an earlier poll
    assert vcpu.clock_ns < 90_000
    proc._event(Delivery(vt_ns=95_000, effect=PollTimeout(vcpu=0, trap_vt=trap_vt)))
    assert vcpu.trap is None and vcpu.poll_ports is None and vcpu.clock_ns >= 95_000 and vcpu.reg("eax") == 0


def test_a_delivery_at_the_window_s_very_end_wakes_the_poller_by_the_end() -> None:
    """The hypervisor counts the poller awake from the arrival on; were it still asleep when the window's report is
    made, its wake-up would be lost until the poll timed out."""
    proc, vcpu, _ = _polling_domain()
    done = proc._window(Window(index=1, start_ns=0, end_ns=10_000, results=[], run=[0],
                               events=[Delivery(vt_ns=10_000, effect=SetPending(vcpu=0, port=9), seq=1)]))
    assert vcpu.trap is None and vcpu.state is VcpuState.RUNNING and vcpu.clock_ns == 10_000
    assert [r.state for r in done.vcpus] == ["running"]


def test_a_delivery_inside_the_window_is_applied_at_its_arrival_not_at_the_start() -> None:
    proc, vcpu, ram = _polling_domain()
    proc._window(Window(index=1, start_ns=0, end_ns=10_000, results=[], run=[0],
                        events=[Delivery(vt_ns=6_000, effect=SetPending(vcpu=0, port=9), seq=1)]))
    # woken by the event at 6000, the vCPU ran on to its `hlt`: never earlier than the event
    assert vcpu.trap is None and vcpu.state is VcpuState.BLOCKED and 6_000 <= vcpu.clock_ns < 7_000
    assert proc._seen_ns == 6_000


def test_a_poll_returns_at_once_when_a_polled_port_is_already_pending() -> None:
    _, vcpu, _ = _polling_domain(pending=(5,))
    assert vcpu.trap is None and vcpu.state is VcpuState.RUNNING and vcpu.poll_ports is None
