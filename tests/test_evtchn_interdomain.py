"""Unit tests of issue 5's event-channel part: interdomain channels (bind_interdomain, send, close, reset, a hostile
domain naming another's ports), the conductor's cross-domain event queue, virtual-time timers (set_timer_op,
VCPUOP_*_timer) and SCHEDOP_poll.

Hypercalls run a family's ``handle`` on real Domains (alpha, domid 1, is the caller; beta, domid 2, the peer) with
the command struct in a hand-made guest region.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import attrs
import keystone
import pytest
from helpers import RecordingLog

from domains import events as guest_events
from domains.memory import GuestRam
from domains.paging import build_initial_tables, initial_mappings
from domains.runtime import DomainProcess
from domains.vcpu import InsnCounter, Vcpu, VcpuState, flat_gdt
from hypervisor import evtchn, timers
from hypervisor.conductor import Conductor
from hypervisor.domain import Domain, DomainState, DomainTable
from hypervisor.evtchn import Port, PortState, Virq
from hypervisor.guestmem import GuestView
from hypervisor.hypercalls import event_channel_op, sched_op, set_timer_op, vcpu_op
from hypervisor.hypercalls.base import Call
from hypervisor.hypercalls.event_channel_op import EvtchnOp
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import DOMID_SELF, SchedOp, VcpuOp
from pvcluster.bus.messages import HypercallReq, HypercallResult, Region, VcpuAction
from pvcluster.spec import load_spec

BUF = 0x10000
PORTS = 0x20000
VIRT = 0xC0000000
_S = PortState


_Log = RecordingLog


@pytest.fixture
def doms() -> Iterator[tuple[Domain, Domain]]:
    table = DomainTable()
    spec = load_spec()
    a, b = table.create(spec.domains[0]), table.create(spec.domains[1])
    assert (a.domid, b.domid) == (1, 2)
    for d in (1, 2, 3):
        evtchn.forget(d)
        timers.forget(d)
    yield a, b
    for d in (1, 2, 3):
        evtchn.forget(d)
        timers.forget(d)


def _alive(*domids: int) -> Any:
    return lambda d: d in domids


def _call(dom: Domain, nr: int, args: list[int], regions: list[Region], *, vcpu: int = 0, vt: int = 0,
          alive: Any = None) -> Call:
    return Call(dom=dom, vcpu=vcpu, vt_ns=vt, nr=nr, args=args, mem=GuestView(regions), log=_Log(),
                domain_alive=alive if alive is not None else _alive(1, 2, 3))


def _ev(dom: Domain, cmd: int, payload: bytes, **kw: Any) -> tuple[int, Call]:
    call = _call(dom, 32, [cmd, BUF], [Region(BUF, len(payload), payload, True)], **kw)
    return event_channel_op.handle(call), call


def _denied(call: Call) -> list[str]:
    return [kw["reason"] for ev, kw in call.log.events if ev.endswith(".denied")]


def _pending(vcpu: int, port: int) -> VcpuAction:
    return VcpuAction(kind="evtchn_pending", vcpu=vcpu, regs={"port": port})


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


# -- bind_interdomain ---------------------------------------------------------------------------------------


def test_bind_interdomain_connects_both_ends_writes_the_local_port_and_sets_it_pending(doms: Any) -> None:
    a, b = doms
    theirs = _offer(b, a.domid)
    evtchn.bind_ipi(a.domid, 0)  # port 1 taken: the new local port is 2
    rc, call = _bind(a, b.domid, theirs)
    assert rc == 0
    assert call.mem.writes[0].data == struct.pack("<HHII", b.domid, 0, theirs, 2)
    assert call.actions == [_pending(0, 2)] and call.remote == []
    assert evtchn.lookup(a.domid, 2) == Port(2, state=_S.INTERDOMAIN, remote_dom=b.domid, remote_port=theirs)
    assert evtchn.lookup(b.domid, theirs) == Port(theirs, state=_S.INTERDOMAIN, remote_dom=a.domid, remote_port=2)


def test_bind_interdomain_to_domid_self_is_a_loopback_channel(doms: Any) -> None:
    a, _ = doms
    waiting = _offer(a, DOMID_SELF)
    rc, call = _bind(a, DOMID_SELF, waiting)
    assert rc == 0 and call.actions == [_pending(0, 2)]
    rc, call = _port(a, EvtchnOp.send, 2)
    assert rc == 0 and call.actions == [_pending(0, waiting)] and call.remote == []


def test_bind_interdomain_to_a_domain_that_does_not_exist_is_esrch(doms: Any) -> None:
    a, _ = doms
    rc, call = _bind(a, 9, 1)
    assert rc == -Errno.ESRCH and _denied(call) == ["no-such-domain"] and call.mem.writes == []
    # without a liveness check (domain_alive None), a domid with no event-channel state is unknown
    payload = struct.pack("<HHII", 77, 0, 1, 0)
    call = Call(dom=a, vcpu=0, vt_ns=0, nr=32, args=[0, BUF], mem=GuestView([Region(BUF, 12, payload, True)]),
                log=_Log())
    assert event_channel_op.handle(call) == -Errno.ESRCH


def test_bind_interdomain_refuses_ports_not_offered_to_the_caller(doms: Any) -> None:
    a, b = doms
    for_c = _offer(b, 3)  # offered to domain 3, not to alpha
    ipi = evtchn.bind_ipi(b.domid, 0)
    assert isinstance(ipi, Port)
    connected, _ = _connected(b, a)  # b's end of a channel that already exists
    for rport in (for_c, ipi.number, connected, 0, 600, evtchn.NR_EVENT_CHANNELS, 0xFFFFFFFF):
        rc, call = _bind(a, b.domid, rport)
        assert rc == -Errno.EINVAL and call.actions == [] and call.mem.writes == [], rport
        assert _denied(call) == ["remote-port-not-offered"]
    # nothing changed on either side
    assert evtchn.lookup(b.domid, for_c) == Port(for_c, state=_S.UNBOUND, remote_dom=3)
    assert [p.number for p in evtchn.in_use(a.domid)] == [1]


def test_bind_interdomain_with_no_free_local_port_is_enospc(doms: Any) -> None:
    a, b = doms
    theirs = _offer(b, a.domid)
    for _ in range(1, evtchn.NR_EVENT_CHANNELS):
        evtchn.bind_ipi(a.domid, 0)
    rc, call = _bind(a, b.domid, theirs)
    assert rc == -Errno.ENOSPC and _denied(call) == ["no-free-port"]
    assert evtchn.lookup(b.domid, theirs) == Port(theirs, state=_S.UNBOUND, remote_dom=a.domid)


# -- send, close, reset -------------------------------------------------------------------------------------


def test_send_marks_the_remote_port_pending_on_the_vcpu_it_notifies(doms: Any) -> None:
    a, b = doms
    ours, theirs = _connected(a, b)
    assert evtchn.bind_vcpu(b.domid, theirs, 1) is None
    rc, call = _port(a, EvtchnOp.send, ours)
    assert rc == 0 and call.actions == [] and call.remote == [(b.domid, _pending(1, theirs))]
    rc, call = _port(b, EvtchnOp.send, theirs)
    assert rc == 0 and call.remote == [(a.domid, _pending(0, ours))]


def test_close_leaves_the_peer_unbound_and_notifies_it(doms: Any) -> None:
    a, b = doms
    ours, theirs = _connected(a, b)
    rc, call = _port(b, EvtchnOp.close, theirs)
    assert rc == 0
    assert call.actions == [VcpuAction(kind="evtchn_clear", vcpu=0, regs={"port": theirs})]
    assert call.remote == [(a.domid, _pending(0, ours))]
    assert evtchn.lookup(a.domid, ours) == Port(ours, state=_S.UNBOUND, remote_dom=b.domid)
    # sending on the now unbound end is dropped silently, as Xen does
    rc, call = _port(a, EvtchnOp.send, ours)
    assert rc == 0 and call.remote == [] and call.actions == []


def test_close_of_a_loopback_end_notifies_the_other_end_locally(doms: Any) -> None:
    a, _ = doms
    waiting = _offer(a, DOMID_SELF)
    assert _bind(a, DOMID_SELF, waiting)[0] == 0
    rc, call = _port(a, EvtchnOp.close, 2)
    assert rc == 0 and call.remote == []
    assert call.actions == [VcpuAction(kind="evtchn_clear", vcpu=0, regs={"port": 2}), _pending(0, waiting)]


def test_reset_closes_every_port_of_the_caller_and_notifies_peers(doms: Any) -> None:
    a, b = doms
    evtchn.bind_ipi(a.domid, 1)
    ours, theirs = _connected(a, b)
    _offer(a, b.domid)
    rc, call = _ev(a, EvtchnOp.reset, struct.pack("<H", DOMID_SELF))
    assert rc == 0 and evtchn.in_use(a.domid) == []
    assert sorted(act.regs["port"] for act in call.actions if act.kind == "evtchn_clear") == [1, 2, 3]
    assert call.remote == [(b.domid, _pending(0, theirs))]
    assert evtchn.lookup(b.domid, theirs) == Port(theirs, state=_S.UNBOUND, remote_dom=a.domid)
    rc, call = _ev(a, EvtchnOp.reset, struct.pack("<H", a.domid))  # its own id works as DOMID_SELF
    assert rc == 0 and call.actions == []


# -- a hostile domain -----------------------------------------------------------------------------------------


def test_a_domain_cannot_send_on_close_or_reset_another_domains_ports(doms: Any) -> None:
    a, b = doms
    _, theirs = _connected(b, _third())
    bports = [p.number for p in evtchn.in_use(b.domid)]
    # alpha names beta's port numbers: in alpha's own table they are free
    for port in bports:
        rc, call = _port(a, EvtchnOp.send, port)
        assert rc == -Errno.EINVAL and call.remote == [] and call.actions == []
        rc, call = _port(a, EvtchnOp.close, port)
        assert rc == -Errno.EINVAL and call.remote == [] and call.actions == []
    rc, call = _ev(a, EvtchnOp.reset, struct.pack("<H", b.domid))
    assert rc == -Errno.EPERM and _denied(call) == ["foreign-domid"]
    rc, call = _ev(a, EvtchnOp.reset, struct.pack("<H", 9))
    assert rc == -Errno.ESRCH
    rc, call = _ev(a, EvtchnOp.status, struct.pack("<HHI", b.domid, 0, theirs) + bytes(16))
    assert rc == -Errno.EPERM
    rc, call = _ev(a, EvtchnOp.alloc_unbound, struct.pack("<HHI", b.domid, a.domid, 0))
    assert rc == -Errno.EPERM
    assert [p.number for p in evtchn.in_use(b.domid)] == bports
    assert evtchn.lookup(3, theirs) == Port(theirs, state=_S.INTERDOMAIN, remote_dom=b.domid, remote_port=bports[0])


def test_a_domain_cannot_steal_a_port_offered_to_another_or_already_bound(doms: Any) -> None:
    a, b = doms
    offered_to_c = _offer(b, 3)
    c_port, b_port = _connected(_third(), b)
    for rport in (offered_to_c, b_port):
        rc, call = _bind(a, b.domid, rport, alive=_alive(1, 2, 3))
        assert rc == -Errno.EINVAL and call.actions == [] and call.remote == []
    assert evtchn.lookup(b.domid, offered_to_c) == Port(offered_to_c, state=_S.UNBOUND, remote_dom=3)
    assert evtchn.lookup(b.domid, b_port) == Port(b_port, state=_S.INTERDOMAIN, remote_dom=3, remote_port=c_port)
    assert evtchn.in_use(a.domid) == []


def _third() -> Domain:
    """Domain 3 (gamma), from a table of its own: a third party to channels between alpha and beta."""
    t = DomainTable()
    spec = load_spec()
    t.create(spec.domains[0])
    t.create(spec.domains[1])
    return t.create(attrs.evolve(spec.domains[0], name="gamma"))


# -- the conductor's cross-domain queue ---------------------------------------------------------------------------


def _conductor() -> Conductor:
    return Conductor(window_ns=10_000, hypercall_ns=500, jitter_ns=0, seed=1, log=_Log(), link_ns=10_000,
                     domain_alive=_alive(1, 2))


def test_an_interdomain_send_reaches_the_peer_link_ns_later_in_the_window_that_covers_it(doms: Any) -> None:
    a, b = doms
    ours, theirs = _connected(a, b)
    c = _conductor()
    a.state = DomainState.RUNNING
    req = HypercallReq(vcpu=0, seq=1, vt_ns=12_345, nr=32, args=[EvtchnOp.send, BUF, 0, 0, 0],
                       regions=[Region(BUF, 4, struct.pack("<I", ours), False)])
    result, _ = c._apply(a, req)
    assert result is not None and result.value == 0 and result.actions == []
    c.end_ns = 20_000
    assert c.take_events(b.domid) == []  # not due yet
    c.end_ns = 22_345
    assert c.take_events(b.domid) == [VcpuAction("evtchn_pending", 0, {"port": theirs, "vt_ns": 22_345})]
    assert c.take_events(b.domid) == [] and c.take_events(a.domid) == []


def test_events_are_taken_in_arrival_order_and_dropped_when_the_domain_leaves(doms: Any) -> None:
    a, b = doms
    c = _conductor()
    c.post(2, _pending(0, 5), 300)
    c.post(2, _pending(1, 6), 100)
    c.post(2, _pending(0, 7), 900)
    c.end_ns = 500
    assert [e.regs["port"] for e in c.take_events(2)] == [6, 5]
    c.leave(b)
    c.end_ns = 1000
    assert c.take_events(2) == []


# -- timers -----------------------------------------------------------------------------------------------------


def _hc(dom: Domain, module: Any, nr: int, args: list[int], payload: bytes = b"", *, vcpu: int = 0,
        vt: int = 1000) -> tuple[int, Call]:
    regions = [Region(BUF, len(payload), payload, False)] if payload else []
    call = _call(dom, nr, args, regions, vcpu=vcpu, vt=vt)
    return int(module.handle(call)), call


def test_set_timer_op_arms_and_cancels_the_callers_singleshot_timer(doms: Any) -> None:
    a, _ = doms
    deadline = (5 << 32) | 0x1234
    assert _hc(a, set_timer_op, 15, [deadline & 0xFFFFFFFF, deadline >> 32, 0, 0, 0], vcpu=1)[0] == 0
    assert timers.get(a.domid, 1).singleshot == deadline and timers.next_deadline(a.domid, 1) == deadline
    assert _hc(a, set_timer_op, 15, [0, 0, 0, 0, 0], vcpu=1)[0] == 0
    assert timers.next_deadline(a.domid, 1) is None
    assert set_timer_op.copy_in([1, 2, 0, 0, 0], lambda _a, _n: None) == []


def test_vcpu_op_periodic_timer(doms: Any) -> None:
    a, _ = doms
    period = struct.pack("<Q", 2_000_000)
    assert vcpu_op.copy_in([VcpuOp.set_periodic_timer, 1, BUF], lambda _a, _n: None)[0].length == 8
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_periodic_timer, 1, BUF], period, vt=1000)[0] == 0
    assert timers.next_deadline(a.domid, 1) == 2_001_000
    # expiries come one per period, in time order, and the timer re-arms
    due = timers.due(6_500_000)
    assert [(e.kind, e.vt_ns) for e in due] == [("periodic", 2_001_000), ("periodic", 4_001_000),
                                                ("periodic", 6_001_000)]
    assert timers.next_deadline(a.domid, 1) == 8_001_000
    assert _hc(a, vcpu_op, 24, [VcpuOp.stop_periodic_timer, 1, 0])[0] == 0
    assert timers.next_deadline(a.domid, 1) is None
    # Xen's bounds: under a millisecond is -EINVAL; an unmapped struct -EFAULT; a vCPU it lacks -ENOENT
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_periodic_timer, 0, BUF], struct.pack("<Q", 999_999))[0] == -Errno.EINVAL
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_periodic_timer, 0, BUF])[0] == -Errno.EFAULT
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_periodic_timer, 5, BUF], period)[0] == -Errno.ENOENT
    assert timers.armed() == []


def test_vcpu_op_singleshot_timer(doms: Any) -> None:
    a, _ = doms
    assert vcpu_op.copy_in([VcpuOp.set_singleshot_timer, 0, BUF], lambda _a, _n: None)[0].length == 12
    sshot = struct.pack("<QI", 50_000, 0)
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_singleshot_timer, 0, BUF], sshot)[0] == 0
    assert timers.next_deadline(a.domid, 0) == 50_000
    # only the calling vCPU's own
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_singleshot_timer, 1, BUF], sshot, vcpu=0)[0] == -Errno.EINVAL
    assert _hc(a, vcpu_op, 24, [VcpuOp.stop_singleshot_timer, 1, 0], vcpu=0)[0] == -Errno.EINVAL
    # VCPU_SSHOTTMR_future: a deadline already past is -ETIME
    past = struct.pack("<QI", 500, 1)
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_singleshot_timer, 0, BUF], past, vt=1000)[0] == -vcpu_op.ETIME
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_singleshot_timer, 0, BUF], struct.pack("<Q", 1))[0] == -Errno.EFAULT
    assert [(e.kind, e.vt_ns) for e in timers.due(60_000)] == [("singleshot", 50_000)]
    assert timers.next_deadline(a.domid, 0) is None
    assert _hc(a, vcpu_op, 24, [VcpuOp.set_singleshot_timer, 0, BUF], sshot)[0] == 0
    assert _hc(a, vcpu_op, 24, [VcpuOp.stop_singleshot_timer, 0, 0])[0] == 0
    assert timers.next_deadline(a.domid, 0) is None


def test_timers_are_forgotten_with_their_domain(doms: Any) -> None:
    timers.set_singleshot(1, 0, 10)
    timers.set_periodic(2, 1, 1_000_000, 0)
    assert timers.armed() == [(1, 0), (2, 1)]
    timers.forget(1)
    assert timers.armed() == [(2, 1)]


# -- SCHEDOP_poll -------------------------------------------------------------------------------------------------


def _poll(dom: Domain, ports: list[int], timeout: int = 0, *, nr: int | None = None,
          ports_mapped: bool = True) -> tuple[int, Call]:
    n = len(ports) if nr is None else nr
    regions = [Region(BUF, 16, struct.pack("<IIQ", PORTS, n, timeout), False)]
    if ports_mapped:
        regions.append(Region(PORTS, 4 * len(ports), struct.pack(f"<{len(ports)}I", *ports), False))
    call = _call(dom, 29, [SchedOp.poll, BUF, 0, 0, 0], regions, vcpu=1, vt=7000)
    return sched_op.handle(call), call


def test_poll_copy_in_names_the_struct_and_the_port_array() -> None:
    mem = {BUF: struct.pack("<IIQ", PORTS, 3, 0)}
    spans = sched_op.copy_in([SchedOp.poll, BUF, 0, 0, 0], lambda a, n: mem.get(a))
    assert [(s.addr, s.length) for s in spans] == [(BUF, 16), (PORTS, 12)]
    assert [(s.addr, s.length) for s in sched_op.copy_in([SchedOp.poll, 0x999, 0, 0, 0], lambda a, n: None)] == [
        (0x999, 16)]


def test_poll_defers_with_the_port_list_and_arms_the_timeout(doms: Any) -> None:
    a, _ = doms
    p1 = evtchn.bind_ipi(a.domid, 1)
    p2 = evtchn.bind_ipi(a.domid, 0)
    assert isinstance(p1, Port) and isinstance(p2, Port)
    rc, call = _poll(a, [p1.number, p2.number], timeout=90_000)
    assert rc == 0 and call.deferred
    assert call.actions == [VcpuAction(kind="poll", vcpu=1, regs={"nr": 2, "p0": 1, "p1": 2})]
    assert timers.get(a.domid, 1).poll == 90_000 and timers.get(a.domid, 1).poll_seq == 7000
    assert [(e.kind, e.seq) for e in timers.due(100_000)] == [("poll", 7000)]
    rc, call = _poll(a, [p1.number])  # timeout 0: none
    assert rc == 0 and timers.next_deadline(a.domid, 1) is None


def test_poll_refuses_ports_that_are_not_the_callers(doms: Any) -> None:
    a, b = doms
    theirs = evtchn.bind_ipi(b.domid, 0)
    assert isinstance(theirs, Port)
    mine = evtchn.bind_ipi(a.domid, 0)
    assert isinstance(mine, Port)
    for ports in ([theirs.number + 1], [0], [mine.number, 4000], [0xFFFFFFFF]):
        rc, call = _poll(a, ports)
        assert rc == -Errno.EINVAL and not call.deferred and call.actions == [], ports
    rc, call = _poll(a, [mine.number] * 2, nr=129)
    assert rc == -Errno.EINVAL
    rc, call = _poll(a, [mine.number], ports_mapped=False)
    assert rc == -Errno.EFAULT
    assert timers.armed() == []


def test_virq_timer_port_lookup_for_expiry(doms: Any) -> None:
    a, _ = doms
    p = evtchn.bind_virq(a.domid, Virq.TIMER, 1)
    assert isinstance(p, Port) and evtchn.virq_port(a.domid, 1, Virq.TIMER) == p.number


def test_a_poller_is_known_until_its_next_hypercall_which_also_cancels_its_timeout(doms: Any) -> None:
    a, _ = doms
    p = evtchn.bind_ipi(a.domid, 0)
    assert isinstance(p, Port)
    assert _poll(a, [p.number], timeout=50_000)[0] == 0
    assert timers.pollers(a.domid) == [1] and timers.next_deadline(a.domid, 1) == 50_000
    c = _conductor()
    a.state = DomainState.RUNNING
    c._apply(a, HypercallReq(vcpu=1, seq=2, vt_ns=9000, nr=17, args=[0, 0, 0, 0, 0], regions=[]))
    assert timers.pollers(a.domid) == [] and timers.next_deadline(a.domid, 1) is None
    assert timers.due(10**9) == []


# -- the domain side: window events, poll and its timeout -----------------------------------------------------

_POLLER = "mov eax, 29\n mov ebx, 3\n int 0x82\n hlt"  # SCHEDOP_poll, then halt


def _polling_domain(pending: tuple[int, ...] = ()) -> tuple[DomainProcess, Vcpu, GuestRam]:
    """A domain process with one vCPU trapped in SCHEDOP_poll on ports 5 and 9, its ``poll`` action applied."""
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    ram = GuestRam(1 << 20, VIRT)
    ram.write_pa(0, bytes(ks.asm(_POLLER, VIRT)[0]))
    ram.write_pa(ram.gdt_paddr, flat_gdt())
    tables = build_initial_tables(ram, 0xF0000, initial_mappings(VIRT, ram.size), tables_read_only=True)
    vcpu = Vcpu(0, ram, InsnCounter(), 1000, tables.l2)
    vcpu.set_regs({"eip": VIRT, "esp": VIRT + 0x80000, "eflags": 0x2})
    vcpu.state = VcpuState.RUNNING
    proc = DomainProcess("inproc://unused", b"d1", 1, "alpha", _Log())
    proc.ram, proc.vcpus = ram, [vcpu]
    vcpu.run(50_000)
    trap = vcpu.trap
    assert vcpu.state is VcpuState.HYPERCALL and trap is not None
    for port in pending:
        guest_events.set_pending(ram, port, 0)
    poll = VcpuAction(kind="poll", vcpu=0, regs={"nr": 2, "p0": 5, "p1": 9})
    proc._apply(HypercallResult(vcpu=0, seq=trap.seq, vt_ns=trap.vt_ns + 400, value=0, writes=[], actions=[poll],
                                complete=False))
    return proc, vcpu, ram


def test_a_poll_wakes_only_for_a_polled_port_and_not_before_the_event_arrives() -> None:
    proc, vcpu, ram = _polling_domain()
    assert vcpu.state is VcpuState.BLOCKED and vcpu.poll_ports == [5, 9]
    proc._event(VcpuAction(kind="evtchn_pending", vcpu=0, regs={"port": 7, "vt_ns": 200_000}))
    vcpu.run(300_000)
    assert vcpu.state is VcpuState.BLOCKED and vcpu.trap is not None  # 7 is not polled; the upcall does not count
    proc._event(VcpuAction(kind="evtchn_pending", vcpu=0, regs={"port": 9, "vt_ns": 400_000}))
    assert guest_events.is_pending(ram, 9) and vcpu.clock_ns >= 400_000
    vcpu.run(500_000)
    assert vcpu.trap is None and vcpu.poll_ports is None and vcpu.reg("eax") == 0


def test_a_poll_timeout_ends_only_the_poll_it_was_set_for() -> None:
    proc, vcpu, _ = _polling_domain()
    assert vcpu.trap is not None
    trap_vt = vcpu.trap.vt_ns
    proc._event(VcpuAction(kind="poll_timeout", vcpu=0, regs={"trap_vt": trap_vt - 1, "vt_ns": 90_000}))
    assert vcpu.state is VcpuState.BLOCKED and vcpu.trap is not None  # a stale timeout, of an earlier poll
    assert vcpu.clock_ns < 90_000
    proc._event(VcpuAction(kind="poll_timeout", vcpu=0, regs={"trap_vt": trap_vt, "vt_ns": 95_000}))
    assert vcpu.trap is None and vcpu.poll_ports is None and vcpu.clock_ns >= 95_000 and vcpu.reg("eax") == 0


def test_a_poll_returns_at_once_when_a_polled_port_is_already_pending() -> None:
    _, vcpu, _ = _polling_domain(pending=(5,))
    assert vcpu.trap is None and vcpu.state is VcpuState.RUNNING and vcpu.poll_ports is None
