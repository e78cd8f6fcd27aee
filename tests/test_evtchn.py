"""Unit tests of event channels: the port state machine (hypervisor/evtchn.py), event_channel_op (32),
callback_op (30) and set_callbacks (4).

Each hypercall test runs a family's ``handle`` on a real Domain (alpha: 2 vCPUs, domid 1) with the command struct
in a hand-made guest region, and checks the result, the vCPU actions, and the exact bytes copied back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RecordingLog, assert_matches_xen_headers

from hypervisor import evtchn
from hypervisor.domain import Domain, DomainTable, IllegalTransition
from hypervisor.evtchn import EvtchnStat, Port, PortState, Virq
from hypervisor.guestmem import GuestView, Span
from hypervisor.hypercalls import callback_op, event_channel_op, set_callbacks
from hypervisor.hypercalls.base import Call
from hypervisor.hypercalls.callback_op import CallbackOp, CallbackType
from hypervisor.hypercalls.event_channel_op import EvtchnOp
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import DOMID_SELF
from pvcluster.bus.messages import Region, VcpuAction

BUF = 0x10000
OTHER = 2  # a second domid, used through hypervisor/evtchn.py directly (the hypercalls act on the caller only)
_S = PortState


_Log = RecordingLog


@pytest.fixture
def dom() -> Iterator[Domain]:
    from pvcluster.spec import load_spec

    d = DomainTable().create(load_spec().domains[0])
    assert (d.domid, len(d.vcpus)) == (1, 2)
    for domid in (d.domid, OTHER):  # every DomainTable starts at domid 1: start from clean tables, and leave them
        evtchn.forget(domid)
    yield d
    for domid in (d.domid, OTHER):
        evtchn.forget(domid)


def _run(dom: Domain, cmd: int, payload: bytes, *, vcpu: int = 0, writable: bool = True) -> tuple[int, Call]:
    regions = [Region(BUF, len(payload), payload, writable)]
    call = Call(dom=dom, vcpu=vcpu, vt_ns=0, nr=32, args=[cmd, BUF], mem=GuestView(regions), log=_Log())
    return event_channel_op.handle(call), call


def _out(call: Call) -> bytes:
    """The one write the call made: the whole struct, copied back where it came from."""
    assert [w.addr for w in call.mem.writes] == [BUF]
    return call.mem.writes[0].data


def _denied(call: Call) -> list[str]:
    return [kw["reason"] for ev, kw in call.log.events if ev.endswith(".denied")]


def _pending(vcpu: int, port: int) -> VcpuAction:
    return VcpuAction(kind="evtchn_pending", vcpu=vcpu, regs={"port": port})


# Hypercall shorthands: each returns (result, call).


def _ipi(dom: Domain, vcpu: int, **kw: Any) -> tuple[int, Call]:
    return _run(dom, EvtchnOp.bind_ipi, struct.pack("<II", vcpu, 0xFFFFFFFF), **kw)


def _virq(dom: Domain, virq: int, vcpu: int) -> tuple[int, Call]:
    return _run(dom, EvtchnOp.bind_virq, struct.pack("<III", virq, vcpu, 0xFFFFFFFF))


def _unbound(dom: Domain, d: int = DOMID_SELF, remote: int = DOMID_SELF) -> tuple[int, Call]:
    return _run(dom, EvtchnOp.alloc_unbound, struct.pack("<HHI", d, remote, 0xFFFFFFFF))


def _port_op(dom: Domain, cmd: int, port: int, *, vcpu: int = 0) -> tuple[int, Call]:
    return _run(dom, cmd, struct.pack("<I", port), vcpu=vcpu)


def _status(dom: Domain, port: int, d: int = DOMID_SELF, fill: int = 0xAA) -> tuple[int, Call]:
    return _run(dom, EvtchnOp.status, struct.pack("<H2sI", d, bytes([fill]) * 2, port) + bytes([fill]) * 16)


def _bind_vcpu(dom: Domain, port: int, vcpu: int) -> tuple[int, Call]:
    return _run(dom, EvtchnOp.bind_vcpu, struct.pack("<II", port, vcpu))


def _new_port(rc_call: tuple[int, Call], offset: int) -> int:
    rc, call = rc_call
    assert rc == 0, _denied(call)
    return int(struct.unpack_from("<I", _out(call), offset)[0])


def _connect(dom: Domain) -> tuple[int, int]:
    """An interdomain channel between ``dom`` and OTHER, made with the module (the hypercall path is tested in
    test_evtchn_interdomain.py): (dom's port, OTHER's port)."""
    theirs = evtchn.alloc_unbound(OTHER, dom.domid)
    assert isinstance(theirs, Port)
    ours = evtchn.bind_interdomain(dom.domid, OTHER, theirs.number)
    assert isinstance(ours, Port)
    return ours.number, theirs.number


# -- the port state machine ---------------------------------------------------------------------------------

_LEGAL = {
    (_S.FREE, _S.UNBOUND),
    (_S.FREE, _S.INTERDOMAIN),
    (_S.FREE, _S.VIRQ),
    (_S.FREE, _S.IPI),
    (_S.UNBOUND, _S.INTERDOMAIN),
    (_S.UNBOUND, _S.FREE),
    (_S.INTERDOMAIN, _S.UNBOUND),
    (_S.INTERDOMAIN, _S.FREE),
    (_S.VIRQ, _S.FREE),
    (_S.IPI, _S.FREE),
}
_BIND: dict[PortState, dict[str, int]] = {
    _S.RESERVED: {},
    _S.FREE: {},
    _S.UNBOUND: {"remote_dom": 3},
    _S.INTERDOMAIN: {"remote_dom": 3, "remote_port": 9},
    _S.VIRQ: {"virq": 2, "vcpu": 0},
    _S.IPI: {"vcpu": 1},
}


@pytest.mark.parametrize("old", list(PortState))
@pytest.mark.parametrize("new", list(PortState))
def test_every_transition_is_checked(old: PortState, new: PortState) -> None:
    p = Port(5, state=old, notify_vcpu=1)
    if (old, new) in _LEGAL:
        p.transition(new, **_BIND[new])
        assert p.state is new
    else:
        with pytest.raises(IllegalTransition, match=f"port 5: {old.value} -> {new.value}"):
            p.transition(new, **_BIND[new])
        assert p == Port(5, state=old, notify_vcpu=1)  # a refused move changes nothing


def test_a_transition_must_name_exactly_its_binding() -> None:
    p = Port(5)
    with pytest.raises(evtchn.IllegalPortTransition, match="binds"):
        p.transition(_S.VIRQ, virq=2)  # no vCPU
    with pytest.raises(evtchn.IllegalPortTransition, match="binds"):
        p.transition(_S.IPI, vcpu=1, remote_dom=3)  # a stray field
    with pytest.raises(evtchn.IllegalPortTransition, match="binds"):
        p.transition(_S.UNBOUND)
    assert p == Port(5)


def test_free_resets_the_binding_and_notify_vcpu_and_unbound_keeps_the_vcpu() -> None:
    p = Port(5)
    p.transition(_S.INTERDOMAIN, remote_dom=3, remote_port=9)
    p.rebind(1)
    p.transition(_S.UNBOUND, remote_dom=3)  # the peer closed: Xen keeps notify_vcpu_id
    assert p == Port(5, state=_S.UNBOUND, notify_vcpu=1, remote_dom=3)
    p.transition(_S.FREE)
    assert p == Port(5)


def test_rebind_only_unbound_interdomain_and_global_virq_ports() -> None:
    for state, fields in ((_S.UNBOUND, {"remote_dom": 3}), (_S.VIRQ, {"virq": Virq.CONSOLE, "vcpu": 0})):
        p = Port(5)
        p.transition(state, **fields)
        p.rebind(1)
        assert p.notify_vcpu == 1
    for state, fields in ((_S.IPI, {"vcpu": 0}), (_S.VIRQ, {"virq": Virq.TIMER, "vcpu": 0})):
        p = Port(5)
        p.transition(state, **fields)
        with pytest.raises(evtchn.IllegalPortTransition):
            p.rebind(1)
        assert p.notify_vcpu == 0
    with pytest.raises(evtchn.IllegalPortTransition):
        Port(5).rebind(1)


def test_port_zero_is_reserved_and_never_handed_out(dom: Domain) -> None:
    zero = evtchn.lookup(dom.domid, 0)
    assert zero is not None and zero.state is _S.RESERVED
    assert _new_port(_ipi(dom, 0), 4) == 1
    assert evtchn.lookup(dom.domid, evtchn.NR_EVENT_CHANNELS) is None
    with pytest.raises(evtchn.IllegalPortTransition):
        zero.transition(_S.IPI, vcpu=0)


def test_status_names_every_state() -> None:
    assert {s: s.status for s in PortState} == {
        _S.RESERVED: EvtchnStat.closed,
        _S.FREE: EvtchnStat.closed,
        _S.UNBOUND: EvtchnStat.unbound,
        _S.INTERDOMAIN: EvtchnStat.interdomain,
        _S.VIRQ: EvtchnStat.virq,
        _S.IPI: EvtchnStat.ipi,
    }


# -- copy_in ------------------------------------------------------------------------------------------------


def test_copy_in_names_the_whole_struct_writable_where_it_has_out_fields() -> None:
    def spans(cmd: int) -> list[Span]:
        return event_channel_op.copy_in([cmd, BUF], lambda a, n: None)

    assert spans(EvtchnOp.bind_interdomain) == [Span(BUF, 12, writable=True)]
    assert spans(EvtchnOp.bind_virq) == [Span(BUF, 12, writable=True)]
    assert spans(EvtchnOp.bind_pirq) == [Span(BUF, 12, writable=True)]
    assert spans(EvtchnOp.close) == spans(EvtchnOp.send) == spans(EvtchnOp.unmask) == [Span(BUF, 4)]
    assert spans(EvtchnOp.status) == [Span(BUF, 24, writable=True)]
    assert spans(EvtchnOp.alloc_unbound) == [Span(BUF, 8, writable=True)]
    assert spans(EvtchnOp.bind_ipi) == [Span(BUF, 8, writable=True)]
    assert spans(EvtchnOp.bind_vcpu) == [Span(BUF, 8)]
    assert spans(EvtchnOp.reset) == [Span(BUF, 2)]
    for cmd in (EvtchnOp.init_control, EvtchnOp.expand_array, EvtchnOp.set_priority, 99, -1):
        assert spans(cmd) == []
    assert event_channel_op.copy_in([EvtchnOp.send, -4], lambda a, n: None) == [Span(0xFFFFFFFC, 4)]


def test_an_unmapped_struct_is_efault(dom: Domain) -> None:
    for cmd in (EvtchnOp.bind_ipi, EvtchnOp.send, EvtchnOp.status, EvtchnOp.close, EvtchnOp.reset):
        call = Call(dom=dom, vcpu=0, vt_ns=0, nr=32, args=[cmd, BUF], mem=GuestView([]), log=_Log())
        assert event_channel_op.handle(call) == -Errno.EFAULT
        assert call.actions == [] and _denied(call) == ["struct-unmapped"]
    assert evtchn.in_use(dom.domid) == []


# -- bind_ipi, send ----------------------------------------------------------------------------------------


def test_bind_ipi_allocates_the_lowest_free_port_and_writes_it_back(dom: Domain) -> None:
    rc, call = _ipi(dom, 1)
    assert rc == 0 and call.actions == []
    assert _out(call) == struct.pack("<II", 1, 1)
    assert call.log.events == [("evtchn.bind_ipi", {"vt_ns": 0, "dom": 1, "vcpu": 0, "port": 1, "target": 1})]
    assert _new_port(_ipi(dom, 0), 4) == 2
    p = evtchn.lookup(dom.domid, 1)
    assert p == Port(1, state=_S.IPI, notify_vcpu=1)


def test_bind_ipi_to_a_vcpu_the_domain_lacks_is_enoent(dom: Domain) -> None:
    for vcpu in (2, 32, 0xFFFFFFFF):
        rc, call = _ipi(dom, vcpu)
        assert rc == -Errno.ENOENT and call.mem.writes == [] and _denied(call) == ["no-such-vcpu"]
    assert evtchn.in_use(dom.domid) == []


def test_copy_out_fault_leaves_the_port_allocated_as_xen_does(dom: Domain) -> None:
    rc, call = _ipi(dom, 1, writable=False)
    assert rc == -Errno.EFAULT and _denied(call) == ["copy-out-failed"]
    assert [p.number for p in evtchn.in_use(dom.domid)] == [1]


def test_send_on_an_ipi_port_makes_it_pending_on_its_vcpu(dom: Domain) -> None:
    port = _new_port(_ipi(dom, 1), 4)
    rc, call = _port_op(dom, EvtchnOp.send, port, vcpu=0)
    assert rc == 0 and call.actions == [_pending(1, port)] and call.mem.writes == []


def test_send_on_an_unbound_port_is_dropped_silently(dom: Domain) -> None:
    port = _new_port(_unbound(dom), 4)
    rc, call = _port_op(dom, EvtchnOp.send, port)
    assert rc == 0 and call.actions == []
    assert [ev for ev, _ in call.log.events] == ["evtchn.send_dropped"]


def test_send_on_a_port_that_is_not_the_callers_to_send_on_is_einval(dom: Domain) -> None:
    virq = _new_port(_virq(dom, Virq.TIMER, 0), 8)
    for port in (0, virq, 7, evtchn.NR_EVENT_CHANNELS, 0xFFFFFFFF):  # reserved, VIRQ, free, out of range
        rc, call = _port_op(dom, EvtchnOp.send, port)
        assert rc == -Errno.EINVAL and call.actions == [], port
    # A port another domain has open is free in the caller's table.
    evtchn.bind_ipi(OTHER, 0)
    rc, call = _port_op(dom, EvtchnOp.send, 1)
    assert rc == -Errno.EINVAL and call.actions == []


def test_send_on_an_interdomain_port_makes_the_peer_port_pending_in_the_peer_domain(dom: Domain) -> None:
    ours, theirs = _connect(dom)
    rc, call = _port_op(dom, EvtchnOp.send, ours)
    assert rc == 0 and call.actions == [] and call.remote == [(OTHER, _pending(0, theirs))]


# -- close --------------------------------------------------------------------------------------------------


def test_close_frees_the_port_clears_its_pending_bit_and_the_port_is_reused(dom: Domain) -> None:
    first = _new_port(_ipi(dom, 0), 4)
    second = _new_port(_ipi(dom, 1), 4)
    rc, call = _port_op(dom, EvtchnOp.close, second)
    assert rc == 0 and call.mem.writes == []
    assert call.actions == [VcpuAction(kind="evtchn_clear", vcpu=1, regs={"port": second})]
    assert evtchn.lookup(dom.domid, second) == Port(second)  # notify vCPU back to 0, as Xen resets it
    assert _new_port(_unbound(dom), 4) == second
    assert [p.number for p in evtchn.in_use(dom.domid)] == [first, second]


def test_close_of_a_free_reserved_or_out_of_range_port_is_einval(dom: Domain) -> None:
    port = _new_port(_ipi(dom, 0), 4)
    assert _port_op(dom, EvtchnOp.close, port)[0] == 0
    for p in (port, 0, 5, evtchn.NR_EVENT_CHANNELS, 0xFFFFFFFF):
        rc, call = _port_op(dom, EvtchnOp.close, p)
        assert rc == -Errno.EINVAL and call.actions == [] and _denied(call) == ["port-not-open"], p


def test_close_of_a_virq_port_lets_the_virq_be_bound_again(dom: Domain) -> None:
    port = _new_port(_virq(dom, Virq.TIMER, 1), 8)
    assert _virq(dom, Virq.TIMER, 1)[0] == -Errno.EEXIST
    rc, call = _port_op(dom, EvtchnOp.close, port)
    assert rc == 0 and call.actions == [VcpuAction(kind="evtchn_clear", vcpu=1, regs={"port": port})]
    assert _new_port(_virq(dom, Virq.TIMER, 1), 8) == port


def test_close_of_a_rebound_global_virq_frees_its_slot_on_vcpu0(dom: Domain) -> None:
    port = _new_port(_virq(dom, Virq.CONSOLE, 0), 8)
    assert _bind_vcpu(dom, port, 1)[0] == 0
    rc, call = _port_op(dom, EvtchnOp.close, port)
    assert rc == 0 and call.actions == [VcpuAction(kind="evtchn_clear", vcpu=1, regs={"port": port})]
    assert evtchn.virq_port(dom.domid, 0, Virq.CONSOLE) is None
    assert _new_port(_virq(dom, Virq.CONSOLE, 0), 8) == port


def test_close_of_an_interdomain_port_sends_the_peer_back_to_unbound(dom: Domain) -> None:
    ours, theirs = _connect(dom)
    rc, call = _port_op(dom, EvtchnOp.close, ours)
    assert rc == 0 and call.actions == [VcpuAction(kind="evtchn_clear", vcpu=0, regs={"port": ours})]
    assert evtchn.lookup(OTHER, theirs) == Port(theirs, state=_S.UNBOUND, remote_dom=dom.domid)
    assert evtchn.lookup(dom.domid, ours) == Port(ours)


# -- status -------------------------------------------------------------------------------------------------


def _status_out(status: int, vcpu: int, union: bytes, port: int, d: int = DOMID_SELF) -> bytes:
    return struct.pack("<H2sIII", d, b"\xaa\xaa", port, status, vcpu) + union


def test_status_of_each_state(dom: Domain) -> None:
    ipi = _new_port(_ipi(dom, 1), 4)
    virq = _new_port(_virq(dom, Virq.DEBUG, 1), 8)
    unbound = _new_port(_unbound(dom, remote=7), 4)
    ours, theirs = _connect(dom)
    keep = b"\xaa" * 8  # the union is left as the guest gave it where the state defines none of it
    expected = {
        0: _status_out(EvtchnStat.closed, 0, keep, 0),
        ipi: _status_out(EvtchnStat.ipi, 1, keep, ipi),
        virq: _status_out(EvtchnStat.virq, 1, struct.pack("<I", Virq.DEBUG) + b"\xaa" * 4, virq),
        unbound: _status_out(EvtchnStat.unbound, 0, struct.pack("<H", 7) + b"\xaa" * 6, unbound),
        ours: _status_out(EvtchnStat.interdomain, 0, struct.pack("<H2sI", OTHER, b"\xaa\xaa", theirs), ours),
        100: _status_out(EvtchnStat.closed, 0, keep, 100),
    }
    for port, want in expected.items():
        rc, call = _status(dom, port)
        assert rc == 0 and call.actions == []
        assert _out(call) == want, port


def test_status_of_an_unbound_port_allocated_for_self_names_the_domain(dom: Domain) -> None:
    port = _new_port(_unbound(dom, d=dom.domid, remote=DOMID_SELF), 4)
    rc, call = _status(dom, port, d=dom.domid, fill=0)
    assert rc == 0
    assert _out(call) == struct.pack("<HHIIIH6x", dom.domid, 0, port, EvtchnStat.unbound, 0, dom.domid)


def test_status_of_another_domain_is_eperm_and_a_bad_port_einval(dom: Domain) -> None:
    for d in (0, OTHER, 0x7FF1, 0xFFFF):
        rc, call = _status(dom, 1, d=d)
        assert rc == -Errno.EPERM and call.mem.writes == [] and _denied(call) == ["foreign-domid"], d
    for port in (evtchn.NR_EVENT_CHANNELS, 0xFFFFFFFF):
        rc, call = _status(dom, port)
        assert rc == -Errno.EINVAL and call.mem.writes == [] and _denied(call) == ["bad-port"]


# -- unmask -------------------------------------------------------------------------------------------------


def test_unmask_acts_on_the_vcpu_the_port_notifies(dom: Domain) -> None:
    port = _new_port(_ipi(dom, 1), 4)
    rc, call = _port_op(dom, EvtchnOp.unmask, port, vcpu=0)
    assert rc == 0 and call.actions == [VcpuAction(kind="evtchn_unmask", vcpu=1, regs={"port": port})]


def test_unmask_of_any_port_in_range_is_accepted_as_in_xen(dom: Domain) -> None:
    for port in (0, 77, evtchn.NR_EVENT_CHANNELS - 1):
        rc, call = _port_op(dom, EvtchnOp.unmask, port)
        assert rc == 0 and call.actions == [VcpuAction(kind="evtchn_unmask", vcpu=0, regs={"port": port})]
    for port in (evtchn.NR_EVENT_CHANNELS, 0xFFFFFFFF):
        rc, call = _port_op(dom, EvtchnOp.unmask, port)
        assert rc == -Errno.EINVAL and call.actions == [] and _denied(call) == ["bad-port"]


# -- bind_vcpu ----------------------------------------------------------------------------------------------


def test_bind_vcpu_moves_unbound_interdomain_and_global_virq_ports(dom: Domain) -> None:
    unbound = _new_port(_unbound(dom), 4)
    console = _new_port(_virq(dom, Virq.CONSOLE, 0), 8)
    ours, _ = _connect(dom)
    for port in (unbound, console, ours):
        rc, call = _bind_vcpu(dom, port, 1)
        assert rc == 0 and call.actions == [] and call.mem.writes == []
        p = evtchn.lookup(dom.domid, port)
        assert p is not None and p.notify_vcpu == 1
    rc, call = _status(dom, console)
    assert struct.unpack_from("<II", _out(call), 8) == (EvtchnStat.virq, 1)
    # From now on its events and unmasks go to vCPU 1.
    assert _port_op(dom, EvtchnOp.unmask, unbound)[1].actions == [
        VcpuAction(kind="evtchn_unmask", vcpu=1, regs={"port": unbound})
    ]


def test_bind_vcpu_refuses_ipi_per_vcpu_virq_and_closed_ports(dom: Domain) -> None:
    ipi = _new_port(_ipi(dom, 0), 4)
    timer = _new_port(_virq(dom, Virq.TIMER, 0), 8)
    for port in (ipi, timer, 0, 50, evtchn.NR_EVENT_CHANNELS):
        rc, call = _bind_vcpu(dom, port, 1)
        assert rc == -Errno.EINVAL and _denied(call) == ["port-not-rebindable"], port
    assert [(p.number, p.notify_vcpu) for p in evtchn.in_use(dom.domid)] == [(ipi, 0), (timer, 0)]


def test_bind_vcpu_to_a_vcpu_the_domain_lacks_is_enoent_before_the_port_is_looked_at(dom: Domain) -> None:
    port = _new_port(_unbound(dom), 4)
    for p in (port, 0xFFFFFFFF):
        rc, call = _bind_vcpu(dom, p, 2)
        assert rc == -Errno.ENOENT and _denied(call) == ["no-such-vcpu"]


# -- alloc_unbound ------------------------------------------------------------------------------------------


def test_alloc_unbound_records_the_remote_domain(dom: Domain) -> None:
    rc, call = _unbound(dom, d=DOMID_SELF, remote=5)
    assert rc == 0 and call.actions == []
    assert _out(call) == struct.pack("<HHI", DOMID_SELF, 5, 1)
    assert evtchn.lookup(dom.domid, 1) == Port(1, state=_S.UNBOUND, remote_dom=5)
    # DOMID_SELF as the remote is resolved to the caller, as Xen does (loopback).
    assert _new_port(_unbound(dom, d=dom.domid, remote=DOMID_SELF), 4) == 2
    assert evtchn.lookup(dom.domid, 2) == Port(2, state=_S.UNBOUND, remote_dom=dom.domid)


def test_alloc_unbound_in_another_domain_is_eperm(dom: Domain) -> None:
    for d in (0, OTHER, 0x7FF2):
        rc, call = _unbound(dom, d=d)
        assert rc == -Errno.EPERM and call.mem.writes == [] and _denied(call) == ["foreign-domid"]
    assert evtchn.in_use(dom.domid) == [] and evtchn.in_use(OTHER) == []


# -- bind_virq ----------------------------------------------------------------------------------------------


def test_bind_virq_per_vcpu_and_global(dom: Domain) -> None:
    rc, call = _virq(dom, Virq.TIMER, 1)
    assert rc == 0 and call.actions == []
    assert _out(call) == struct.pack("<III", Virq.TIMER, 1, 1)
    assert _new_port(_virq(dom, Virq.TIMER, 0), 8) == 2  # per-vCPU: one binding on each vCPU
    assert _new_port(_virq(dom, Virq.DOM_EXC, 0), 8) == 3
    assert evtchn.lookup(dom.domid, 1) == Port(1, state=_S.VIRQ, notify_vcpu=1, virq=Virq.TIMER)
    assert evtchn.virq_port(dom.domid, 1, Virq.TIMER) == 1


def test_bind_virq_errors(dom: Domain) -> None:
    _new_port(_virq(dom, Virq.TIMER, 1), 8)
    _new_port(_virq(dom, Virq.CONSOLE, 0), 8)
    cases = [
        (Virq.TIMER, 1, Errno.EEXIST, "virq-already-bound"),
        (Virq.CONSOLE, 0, Errno.EEXIST, "virq-already-bound"),
        (Virq.CONSOLE, 1, Errno.EINVAL, "global-virq-off-vcpu0"),  # a global VIRQ is bound on vCPU 0
        (evtchn.NR_VIRQS, 0, Errno.EINVAL, "bad-virq"),
        (0xFFFFFFFF, 0, Errno.EINVAL, "bad-virq"),
        (Virq.TIMER, 2, Errno.ENOENT, "no-such-vcpu"),
        (Virq.DEBUG, 0xFFFFFFFF, Errno.ENOENT, "no-such-vcpu"),
    ]
    for virq, vcpu, err, reason in cases:
        rc, call = _virq(dom, virq, vcpu)
        assert (rc, _denied(call), call.mem.writes) == (-err, [reason], []), (virq, vcpu)
    assert len(evtchn.in_use(dom.domid)) == 2


# -- ENOSPC, refused and unknown ops ------------------------------------------------------------------------


def test_every_port_but_zero_can_be_used_then_enospc_until_one_is_closed(dom: Domain) -> None:
    ports = [_new_port(_ipi(dom, n % 2), 4) for n in range(evtchn.NR_EVENT_CHANNELS - 1)]
    assert ports == list(range(1, evtchn.NR_EVENT_CHANNELS))
    for rc, call in (_ipi(dom, 0), _unbound(dom), _virq(dom, Virq.TIMER, 0)):
        assert rc == -Errno.ENOSPC and call.mem.writes == [] and _denied(call) == ["no-free-port"]
    assert evtchn.virq_port(dom.domid, 0, Virq.TIMER) is None  # the failed bind left no trace
    assert _port_op(dom, EvtchnOp.close, 500)[0] == 0
    assert _new_port(_virq(dom, Virq.TIMER, 0), 8) == 500


def test_bind_interdomain_to_a_port_not_offered_is_einval(dom: Domain) -> None:
    evtchn.bind_ipi(OTHER, 0)
    rc, call = _run(dom, EvtchnOp.bind_interdomain, struct.pack("<HHII", OTHER, 0, 1, 0))
    assert rc == -Errno.EINVAL and call.mem.writes == [] and call.actions == []
    assert _denied(call) == ["remote-port-not-offered"]


def test_bind_pirq_is_eperm_and_fifo_and_unknown_ops_are_enosys(dom: Domain) -> None:
    rc, call = _run(dom, EvtchnOp.bind_pirq, struct.pack("<III", 3, 0, 0))
    assert rc == -Errno.EPERM and call.mem.writes == [] and _denied(call) == ["no-pirq-access"]
    for cmd in (EvtchnOp.init_control, EvtchnOp.expand_array, EvtchnOp.set_priority, 14, 0xFFFFFFFF):
        rc, call = _run(dom, cmd, b"\0" * 24)
        assert rc == -Errno.ENOSYS and call.mem.writes == [] and _denied(call) == ["unsupported-cmd"]


# -- close_all, forget, bind_interdomain (the module side of issue 5) ---------------------------------------


def test_bind_interdomain_connects_both_ends(dom: Domain) -> None:
    ours, theirs = _connect(dom)
    assert (ours, theirs) == (1, 1)
    assert evtchn.lookup(dom.domid, ours) == Port(1, state=_S.INTERDOMAIN, remote_dom=OTHER, remote_port=1)
    assert evtchn.lookup(OTHER, theirs) == Port(1, state=_S.INTERDOMAIN, remote_dom=dom.domid, remote_port=1)


def test_bind_interdomain_refusals(dom: Domain) -> None:
    not_for_us = evtchn.alloc_unbound(OTHER, 9)
    ipi = evtchn.bind_ipi(OTHER, 0)
    assert isinstance(not_for_us, Port) and isinstance(ipi, Port)
    for rdom, rport in ((OTHER, not_for_us.number), (OTHER, ipi.number), (OTHER, 0), (OTHER, 50), (OTHER, 5000)):
        assert evtchn.bind_interdomain(dom.domid, rdom, rport) is Errno.EINVAL, rport
    assert evtchn.bind_interdomain(dom.domid, 77, 1) is Errno.EINVAL  # a domain with no ports at all
    assert 77 not in evtchn._tables  # and asking did not create a table for it
    assert evtchn.in_use(dom.domid) == []


def test_loopback_channel_closes_from_either_end(dom: Domain) -> None:
    waiting = evtchn.alloc_unbound(dom.domid, dom.domid)
    assert isinstance(waiting, Port)
    local = evtchn.bind_interdomain(dom.domid, dom.domid, waiting.number)
    assert isinstance(local, Port) and (waiting.number, local.number) == (1, 2)
    assert (waiting.state, waiting.remote_port, local.remote_port) == (_S.INTERDOMAIN, 2, 1)
    assert _port_op(dom, EvtchnOp.close, 2)[0] == 0
    assert evtchn.lookup(dom.domid, 1) == Port(1, state=_S.UNBOUND, remote_dom=dom.domid)


def test_close_all_frees_every_port_and_returns_the_peers_sent_back_to_unbound(dom: Domain) -> None:
    _new_port(_ipi(dom, 1), 4)
    _new_port(_virq(dom, Virq.TIMER, 1), 8)
    _new_port(_unbound(dom, remote=OTHER), 4)
    a_ours, a_theirs = _connect(dom)
    b_ours, b_theirs = _connect(dom)
    _bind_vcpu(dom, b_ours, 1)
    waiting = evtchn.alloc_unbound(dom.domid, dom.domid)
    assert isinstance(waiting, Port)
    assert isinstance(evtchn.bind_interdomain(dom.domid, dom.domid, waiting.number), Port)  # loopback: not a peer
    bystander = evtchn.bind_ipi(OTHER, 1)
    assert isinstance(bystander, Port)

    assert evtchn.close_all(dom.domid) == [(OTHER, a_theirs), (OTHER, b_theirs)]
    assert evtchn.in_use(dom.domid) == []
    assert evtchn.virq_port(dom.domid, 1, Virq.TIMER) is None
    assert [(p.number, p.state, p.remote_dom) for p in evtchn.in_use(OTHER)] == sorted(
        [(a_theirs, _S.UNBOUND, dom.domid), (b_theirs, _S.UNBOUND, dom.domid), (bystander.number, _S.IPI, None)]
    )
    assert evtchn.close_all(dom.domid) == [] and evtchn.close_all(12345) == []


def test_forget_drops_a_domains_ports(dom: Domain) -> None:
    _new_port(_ipi(dom, 0), 4)
    evtchn.forget(dom.domid)
    assert evtchn.in_use(dom.domid) == []
    assert _new_port(_ipi(dom, 0), 4) == 1


def test_a_peer_forgotten_without_close_all_does_not_block_close(dom: Domain) -> None:
    ours, _ = _connect(dom)
    evtchn.forget(OTHER)
    assert _port_op(dom, EvtchnOp.close, ours)[0] == 0
    assert evtchn.lookup(dom.domid, ours) == Port(ours)


# -- callback_op, set_callbacks -----------------------------------------------------------------------------


def _cb(dom: Domain, cmd: int, payload: bytes, vcpu: int = 1) -> tuple[int, Call]:
    regions = [Region(BUF, len(payload), payload, False)]
    call = Call(dom=dom, vcpu=vcpu, vt_ns=0, nr=30, args=[cmd, BUF], mem=GuestView(regions), log=_Log())
    return callback_op.handle(call), call


def _register(kind: int, eip: int, flags: int = 0, cs: int = 0x61) -> bytes:
    return struct.pack("<HHII", kind, flags, cs, eip)


def test_callback_op_copy_in() -> None:
    assert callback_op.copy_in([CallbackOp.register, BUF], lambda a, n: None) == [Span(BUF, 12)]
    assert callback_op.copy_in([CallbackOp.unregister, BUF], lambda a, n: None) == [Span(BUF, 4)]
    assert callback_op.copy_in([2, BUF], lambda a, n: None) == []


def test_register_event_callback_sets_the_callers_upcall_entry(dom: Domain) -> None:
    rc, call = _cb(dom, CallbackOp.register, _register(CallbackType.event, 0xC0101234), vcpu=1)
    assert rc == 0 and call.mem.writes == []
    assert call.actions == [VcpuAction(kind="set_callback", vcpu=1, regs={"eip": 0xC0101234})]
    assert [ev for ev, _ in call.log.events] == ["callback.register"]


def test_register_failsafe_callback_is_accepted_with_no_action(dom: Domain) -> None:
    rc, call = _cb(dom, CallbackOp.register, _register(CallbackType.failsafe, 0xC0105678, flags=1))
    assert rc == 0 and call.actions == []
    assert call.log.events[0][1]["mask_events"] is True


def test_register_other_callback_types_is_enosys(dom: Domain) -> None:
    for kind, reason in (
        (CallbackType.nmi, "type-not-modelled"),
        (CallbackType.sysenter, "type-not-modelled"),
        (CallbackType.syscall32, "type-not-modelled"),
        (CallbackType.sysenter_deprecated, "type-not-modelled"),
        (6, "unknown-type"),
        (0xFFFF, "unknown-type"),
    ):
        rc, call = _cb(dom, CallbackOp.register, _register(kind, 0xC0100000))
        assert rc == -Errno.ENOSYS and call.actions == [] and _denied(call) == [reason], kind


def test_unregister_follows_xen(dom: Domain) -> None:
    for kind in (CallbackType.event, CallbackType.failsafe, CallbackType.syscall32, CallbackType.sysenter):
        rc, call = _cb(dom, CallbackOp.unregister, struct.pack("<HH", kind, 0))
        assert rc == -Errno.EINVAL and call.actions == [] and _denied(call) == ["cannot-unregister"]
    assert _cb(dom, CallbackOp.unregister, struct.pack("<HH", CallbackType.nmi, 0))[0] == 0
    rc, call = _cb(dom, CallbackOp.unregister, struct.pack("<HH", 6, 0))
    assert rc == -Errno.ENOSYS and _denied(call) == ["unknown-type"]


def test_callback_op_unknown_cmd_is_einval_and_unmapped_struct_efault(dom: Domain) -> None:
    rc, call = _cb(dom, 2, _register(CallbackType.event, 0xC0100000))
    assert rc == -Errno.EINVAL and call.actions == [] and _denied(call) == ["unsupported-cmd"]
    call = Call(dom=dom, vcpu=0, vt_ns=0, nr=30, args=[CallbackOp.register, BUF], mem=GuestView([]), log=_Log())
    assert callback_op.handle(call) == -Errno.EFAULT and call.actions == []
    short = [Region(BUF, 8, b"\0" * 8, False)]  # the struct must be there whole
    call = Call(dom=dom, vcpu=0, vt_ns=0, nr=30, args=[CallbackOp.register, BUF], mem=GuestView(short), log=_Log())
    assert callback_op.handle(call) == -Errno.EFAULT


def test_set_callbacks_registers_the_event_entry_and_always_succeeds(dom: Domain) -> None:
    assert set_callbacks.copy_in([0x61, 0xC0101000, 0x61, 0xC0102000], lambda a, n: None) == []
    call = Call(
        dom=dom, vcpu=1, vt_ns=0, nr=4, args=[0x61, 0xC0101000, 0x61, 0xC0102000], mem=GuestView([]), log=_Log()
    )
    assert set_callbacks.handle(call) == 0
    assert call.actions == [VcpuAction(kind="set_callback", vcpu=1, regs={"eip": 0xC0101000})]
    assert [(ev, kw["type"], kw["eip"]) for ev, kw in call.log.events] == [
        ("callback.register", "event", 0xC0101000),
        ("callback.register", "failsafe", 0xC0102000),
    ]


# -- against Xen's public headers ---------------------------------------------------------------------------

HEADERS = Path("/usr/include/xen/event_channel.h")


def _header_checks() -> list[tuple[str, int]]:
    sizes = event_channel_op.SIZES
    out: list[tuple[str, int]] = [(f"EVTCHNOP_{op.name}", int(op)) for op in EvtchnOp]
    out += [(f"EVTCHNSTAT_{s.name}", int(s)) for s in EvtchnStat]
    out += [(f"VIRQ_{v.name}", int(v)) for v in Virq]
    out += [("NR_VIRQS", evtchn.NR_VIRQS), ("EVTCHN_2L_NR_CHANNELS", evtchn.NR_EVENT_CHANNELS)]
    out += [
        ("sizeof(struct evtchn_alloc_unbound)", sizes[EvtchnOp.alloc_unbound]),
        ("offsetof(struct evtchn_alloc_unbound, remote_dom)", 2),
        ("offsetof(struct evtchn_alloc_unbound, port)", 4),
        ("sizeof(struct evtchn_bind_interdomain)", sizes[EvtchnOp.bind_interdomain]),
        ("offsetof(struct evtchn_bind_interdomain, remote_port)", 4),
        ("offsetof(struct evtchn_bind_interdomain, local_port)", 8),
        ("sizeof(struct evtchn_bind_virq)", sizes[EvtchnOp.bind_virq]),
        ("offsetof(struct evtchn_bind_virq, vcpu)", 4),
        ("offsetof(struct evtchn_bind_virq, port)", 8),
        ("sizeof(struct evtchn_bind_pirq)", sizes[EvtchnOp.bind_pirq]),
        ("sizeof(struct evtchn_bind_ipi)", sizes[EvtchnOp.bind_ipi]),
        ("offsetof(struct evtchn_bind_ipi, port)", 4),
        ("sizeof(struct evtchn_close)", sizes[EvtchnOp.close]),
        ("sizeof(struct evtchn_send)", sizes[EvtchnOp.send]),
        ("sizeof(struct evtchn_unmask)", sizes[EvtchnOp.unmask]),
        ("sizeof(struct evtchn_status)", sizes[EvtchnOp.status]),
        ("offsetof(struct evtchn_status, port)", 4),
        ("offsetof(struct evtchn_status, status)", 8),
        ("offsetof(struct evtchn_status, vcpu)", 12),
        ("offsetof(struct evtchn_status, u.unbound.dom)", 16),
        ("offsetof(struct evtchn_status, u.interdomain.dom)", 16),
        ("offsetof(struct evtchn_status, u.interdomain.port)", 20),
        ("offsetof(struct evtchn_status, u.virq)", 16),
        ("sizeof(struct evtchn_bind_vcpu)", sizes[EvtchnOp.bind_vcpu]),
        ("offsetof(struct evtchn_bind_vcpu, vcpu)", 4),
        ("sizeof(struct evtchn_reset)", sizes[EvtchnOp.reset]),
    ]
    out += [(f"CALLBACKOP_{c.name}", int(c)) for c in CallbackOp]
    out += [(f"CALLBACKTYPE_{t.name}", int(t)) for t in CallbackType if t is not CallbackType.sysenter]
    out += [
        # Below interface version 0x00030207 the header renames sysenter to the deprecated number.
        ("CALLBACKTYPE_sysenter", int(CallbackType.sysenter_deprecated)),
        ("CALLBACKF_mask_events", callback_op.CALLBACKF_MASK_EVENTS),
        ("sizeof(struct callback_register)", callback_op.CALLBACK_REGISTER_SIZE),
        ("offsetof(struct callback_register, flags)", 2),
        ("offsetof(struct callback_register, address)", 4),
        ("offsetof(struct callback_register, address.cs)", 4),
        ("offsetof(struct callback_register, address.eip)", 8),
        ("sizeof(struct callback_unregister)", callback_op.CALLBACK_UNREGISTER_SIZE),
    ]
    return out


def test_layouts_match_xen_public_headers(tmp_path: Path) -> None:
    assert_matches_xen_headers(tmp_path, ("xen", "event_channel", "callback"), _header_checks())
