"""Unit tests of event channels: the port state machine (hypervisor/evtchn.py), event_channel_op (32),
callback_op (30) and set_callbacks (4).

Each hypercall test runs a family's ``handle`` on a real Domain of an in-process hypervisor core (alpha: 2 vCPUs,
domid 1; beta, domid 2, is the other end of interdomain channels) with the command struct in a hand-made guest
region, and checks the result, the effects, the exact bytes copied back and the trace.
"""

from __future__ import annotations

import struct
import weakref
from pathlib import Path
from typing import Any

import attrs
import pytest
from helpers import assert_matches_xen_headers, call_events, core, make_call, run_handler

from hypervisor import evtchn, trap
from hypervisor.core import Hypervisor
from hypervisor.domain import Domain, DomainState, IllegalTransition
from hypervisor.evtchn import EvtchnStat, Port, PortState, Virq
from hypervisor.guestmem import NotCopied
from hypervisor.hypercalls import callback_op, event_channel_op, set_callbacks
from hypervisor.hypercalls.base import Call
from hypervisor.hypercalls.callback_op import CallbackOp, CallbackType
from hypervisor.hypercalls.event_channel_op import EvtchnOp
from pvcluster.abi import layouts, structs
from pvcluster.abi.copyin import Span, copy_in
from pvcluster.abi.errno import Errno, as_signed
from pvcluster.abi.xen import DOMID_SELF, Hypercall
from pvcluster.bus.effects import ClearPending, SetCallback, SetPending, Unmask
from pvcluster.bus.messages import HypercallReq, Region

BUF = 0x10000
OTHER = 2  # beta's domid: the far end of interdomain channels, set up through hypervisor/evtchn.py directly
_S = PortState

# The core each test's domain belongs to, and the events each call traced (the domain's log is shared by all its
# calls, so a call's own events are cut out of it as the call runs).
_HV: weakref.WeakKeyDictionary[Domain, Hypervisor] = weakref.WeakKeyDictionary()


@pytest.fixture
def dom() -> Domain:
    hv = core()
    d = hv.create_domain(hv.spec.domains[0])
    other = hv.create_domain(hv.spec.domains[1])
    assert (d.domid, len(d.vcpus), other.domid) == (1, 2, OTHER)
    _HV[d] = hv
    return d


def _other(dom: Domain) -> Domain:
    other = _HV[dom].domains.get(OTHER)
    assert other is not None
    return other


_handle = run_handler


_events = call_events


def _call(dom: Domain, nr: int, args: list[int], regions: list[Region], *, vcpu: int = 0) -> Call:
    return make_call(_HV[dom], dom, nr, args, regions, vcpu=vcpu)


def _run(dom: Domain, cmd: int, payload: bytes, *, vcpu: int = 0, writable: bool = True) -> tuple[int, Call]:
    call = _call(dom, Hypercall.event_channel_op, [cmd, BUF], [Region(BUF, len(payload), payload, writable)],
                 vcpu=vcpu)
    return _handle(event_channel_op.handle, call), call


def _trap(dom: Domain, nr: int, args: list[int], regions: list[Region]) -> int:
    """The hypercall as the clock applies it (``trap.apply``): the signed value the vCPU sees."""
    out = trap.apply(_HV[dom], dom, HypercallReq(vcpu=0, seq=1, vt_ns=0, nr=nr, args=args, regions=regions))
    assert out.result is not None
    return as_signed(out.result.value)


def _out(call: Call) -> bytes:
    """The one write the call made: the whole struct, copied back where it came from."""
    assert [w.addr for w in call.mem.writes] == [BUF]
    return call.mem.writes[0].data


def _denied(call: Call) -> list[str]:
    return [kw["reason"] for ev, kw in _events(call) if ev.endswith(".denied")]


def _pending(vcpu: int, port: int) -> SetPending:
    return SetPending(vcpu=vcpu, port=port)


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


def _bind_interdomain(dom: Domain, remote_domid: int, remote_port: int) -> Port | Errno:
    return evtchn.bind_interdomain(dom.domid, dom.evtchn, remote_domid, _HV[dom].evtchn_of, remote_port)


def _connect(dom: Domain) -> tuple[int, int]:
    """An interdomain channel between ``dom`` and OTHER, made with the module (the hypercall path is tested in
    test_evtchn_interdomain.py): (dom's port, OTHER's port)."""
    theirs = _other(dom).evtchn.alloc_unbound(dom.domid)
    assert isinstance(theirs, Port)
    ours = _bind_interdomain(dom, OTHER, theirs.number)
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
    zero = dom.evtchn.lookup(0)
    assert zero is not None and zero.state is _S.RESERVED
    assert _new_port(_ipi(dom, 0), 4) == 1
    assert dom.evtchn.lookup(evtchn.NR_EVENT_CHANNELS) is None
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
    def spans(cmd: int, ptr: int = BUF) -> list[Span]:
        return copy_in(Hypercall.event_channel_op, [cmd, ptr], lambda a, n: None)

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
    assert spans(EvtchnOp.send, -4) == [Span(0xFFFFFFFC, 4)]
    # the handler reads exactly the size the domain process copies
    assert event_channel_op.SIZES == {int(op): structs.EVTCHNOP_SIZE[op] for op in EvtchnOp
                                      if op in structs.EVTCHNOP_SIZE}


def test_an_unmapped_struct_is_efault(dom: Domain) -> None:
    for cmd in (EvtchnOp.bind_ipi, EvtchnOp.send, EvtchnOp.status, EvtchnOp.close, EvtchnOp.reset):
        unmapped = Region(BUF, event_channel_op.SIZES[cmd], None, True)
        call = _call(dom, Hypercall.event_channel_op, [cmd, BUF], [unmapped])
        assert _handle(event_channel_op.handle, call) == -Errno.EFAULT
        assert call.effects == [] and _denied(call) == ["struct-unmapped"]
        # a struct the domain process did not copy in at all is not the guest's fault: the handler does not
        # turn it into -EFAULT itself, the trap does (and traces it)
        call = _call(dom, Hypercall.event_channel_op, [cmd, BUF], [])
        with pytest.raises(NotCopied):
            event_channel_op.handle(call)
        assert _trap(dom, Hypercall.event_channel_op, [cmd, BUF], []) == -Errno.EFAULT
    assert [kw["addr"] for ev, kw in _HV[dom].log.events if ev == "guestmem.not_copied"] == [BUF] * 5
    assert dom.evtchn.in_use() == []


# -- bind_ipi, send ----------------------------------------------------------------------------------------


def test_bind_ipi_allocates_the_lowest_free_port_and_writes_it_back(dom: Domain) -> None:
    rc, call = _ipi(dom, 1)
    assert rc == 0 and call.effects == []
    assert _out(call) == struct.pack("<II", 1, 1)
    assert _events(call) == [("evtchn.bind_ipi", {"vt_ns": 0, "dom": 1, "vcpu": 0, "port": 1, "target": 1})]
    assert _new_port(_ipi(dom, 0), 4) == 2
    p = dom.evtchn.lookup(1)
    assert p == Port(1, state=_S.IPI, notify_vcpu=1)


def test_bind_ipi_to_a_vcpu_the_domain_lacks_is_enoent(dom: Domain) -> None:
    for vcpu in (2, 32, 0xFFFFFFFF):
        rc, call = _ipi(dom, vcpu)
        assert rc == -Errno.ENOENT and call.mem.writes == [] and _denied(call) == ["no-such-vcpu"]
    assert dom.evtchn.in_use() == []


def test_copy_out_fault_leaves_the_port_allocated_as_xen_does(dom: Domain) -> None:
    rc, call = _ipi(dom, 1, writable=False)
    assert rc == -Errno.EFAULT and _denied(call) == ["copy-out-failed"]
    assert [p.number for p in dom.evtchn.in_use()] == [1]


def test_send_on_an_ipi_port_makes_it_pending_on_its_vcpu(dom: Domain) -> None:
    port = _new_port(_ipi(dom, 1), 4)
    rc, call = _port_op(dom, EvtchnOp.send, port, vcpu=0)
    assert rc == 0 and call.effects == [_pending(1, port)] and call.mem.writes == [] and call.remote == []


def test_send_on_an_unbound_port_is_dropped_silently(dom: Domain) -> None:
    port = _new_port(_unbound(dom), 4)
    rc, call = _port_op(dom, EvtchnOp.send, port)
    assert rc == 0 and call.effects == [] and call.remote == []
    assert [ev for ev, _ in _events(call)] == ["evtchn.send_dropped"]


def test_send_on_a_port_that_is_not_the_callers_to_send_on_is_einval(dom: Domain) -> None:
    virq = _new_port(_virq(dom, Virq.TIMER, 0), 8)
    for port in (0, virq, 7, evtchn.NR_EVENT_CHANNELS, 0xFFFFFFFF):  # reserved, VIRQ, free, out of range
        rc, call = _port_op(dom, EvtchnOp.send, port)
        assert rc == -Errno.EINVAL and call.effects == [] and call.remote == [], port
    # A port another domain has open is free in the caller's table.
    assert isinstance(_other(dom).evtchn.bind_ipi(0), Port)
    rc, call = _port_op(dom, EvtchnOp.send, 1)
    assert rc == -Errno.EINVAL and call.effects == [] and call.remote == []


def test_send_on_an_interdomain_port_makes_the_peer_port_pending_in_the_peer_domain(dom: Domain) -> None:
    ours, theirs = _connect(dom)
    rc, call = _port_op(dom, EvtchnOp.send, ours)
    assert rc == 0 and call.effects == [] and call.remote == [(OTHER, _pending(0, theirs))]


# -- close --------------------------------------------------------------------------------------------------


def test_close_frees_the_port_clears_its_pending_bit_and_the_port_is_reused(dom: Domain) -> None:
    first = _new_port(_ipi(dom, 0), 4)
    second = _new_port(_ipi(dom, 1), 4)
    rc, call = _port_op(dom, EvtchnOp.close, second)
    assert rc == 0 and call.mem.writes == []
    assert call.effects == [ClearPending(port=second)]
    assert dom.evtchn.lookup(second) == Port(second)  # notify vCPU back to 0, as Xen resets it
    assert _new_port(_unbound(dom), 4) == second
    assert [p.number for p in dom.evtchn.in_use()] == [first, second]


def test_close_of_a_free_reserved_or_out_of_range_port_is_einval(dom: Domain) -> None:
    port = _new_port(_ipi(dom, 0), 4)
    assert _port_op(dom, EvtchnOp.close, port)[0] == 0
    for p in (port, 0, 5, evtchn.NR_EVENT_CHANNELS, 0xFFFFFFFF):
        rc, call = _port_op(dom, EvtchnOp.close, p)
        assert rc == -Errno.EINVAL and call.effects == [] and _denied(call) == ["port-not-open"], p


def test_close_of_a_virq_port_lets_the_virq_be_bound_again(dom: Domain) -> None:
    port = _new_port(_virq(dom, Virq.TIMER, 1), 8)
    assert _virq(dom, Virq.TIMER, 1)[0] == -Errno.EEXIST
    rc, call = _port_op(dom, EvtchnOp.close, port)
    assert rc == 0 and call.effects == [ClearPending(port=port)]
    assert _new_port(_virq(dom, Virq.TIMER, 1), 8) == port


def test_close_of_a_rebound_global_virq_frees_its_slot_on_vcpu0(dom: Domain) -> None:
    port = _new_port(_virq(dom, Virq.CONSOLE, 0), 8)
    assert _bind_vcpu(dom, port, 1)[0] == 0
    rc, call = _port_op(dom, EvtchnOp.close, port)
    assert rc == 0 and call.effects == [ClearPending(port=port)]
    assert dom.evtchn.virq_port(0, Virq.CONSOLE) is None
    assert _new_port(_virq(dom, Virq.CONSOLE, 0), 8) == port


def test_close_of_an_interdomain_port_sends_the_peer_back_to_unbound(dom: Domain) -> None:
    ours, theirs = _connect(dom)
    rc, call = _port_op(dom, EvtchnOp.close, ours)
    assert rc == 0 and call.effects == [ClearPending(port=ours)]
    assert call.remote == [(OTHER, _pending(0, theirs))]  # the peer's owner sees its end go unbound
    assert _other(dom).evtchn.lookup(theirs) == Port(theirs, state=_S.UNBOUND, remote_dom=dom.domid)
    assert dom.evtchn.lookup(ours) == Port(ours)


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
        assert rc == 0 and call.effects == []
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
    assert rc == 0 and call.effects == [Unmask(vcpu=1, port=port)]


def test_unmask_of_any_port_in_range_is_accepted_as_in_xen(dom: Domain) -> None:
    for port in (0, 77, evtchn.NR_EVENT_CHANNELS - 1):
        rc, call = _port_op(dom, EvtchnOp.unmask, port)
        assert rc == 0 and call.effects == [Unmask(vcpu=0, port=port)]
    for port in (evtchn.NR_EVENT_CHANNELS, 0xFFFFFFFF):
        rc, call = _port_op(dom, EvtchnOp.unmask, port)
        assert rc == -Errno.EINVAL and call.effects == [] and _denied(call) == ["bad-port"]


# -- bind_vcpu ----------------------------------------------------------------------------------------------


def test_bind_vcpu_moves_unbound_interdomain_and_global_virq_ports(dom: Domain) -> None:
    unbound = _new_port(_unbound(dom), 4)
    console = _new_port(_virq(dom, Virq.CONSOLE, 0), 8)
    ours, _ = _connect(dom)
    for port in (unbound, console, ours):
        rc, call = _bind_vcpu(dom, port, 1)
        assert rc == 0 and call.effects == [] and call.mem.writes == []
        p = dom.evtchn.lookup(port)
        assert p is not None and p.notify_vcpu == 1
    rc, call = _status(dom, console)
    assert struct.unpack_from("<II", _out(call), 8) == (EvtchnStat.virq, 1)
    # From now on its events and unmasks go to vCPU 1.
    assert _port_op(dom, EvtchnOp.unmask, unbound)[1].effects == [Unmask(vcpu=1, port=unbound)]


def test_bind_vcpu_refuses_ipi_per_vcpu_virq_and_closed_ports(dom: Domain) -> None:
    ipi = _new_port(_ipi(dom, 0), 4)
    timer = _new_port(_virq(dom, Virq.TIMER, 0), 8)
    for port in (ipi, timer, 0, 50, evtchn.NR_EVENT_CHANNELS):
        rc, call = _bind_vcpu(dom, port, 1)
        assert rc == -Errno.EINVAL and _denied(call) == ["port-not-rebindable"], port
    assert [(p.number, p.notify_vcpu) for p in dom.evtchn.in_use()] == [(ipi, 0), (timer, 0)]


def test_bind_vcpu_to_a_vcpu_the_domain_lacks_is_enoent_before_the_port_is_looked_at(dom: Domain) -> None:
    port = _new_port(_unbound(dom), 4)
    for p in (port, 0xFFFFFFFF):
        rc, call = _bind_vcpu(dom, p, 2)
        assert rc == -Errno.ENOENT and _denied(call) == ["no-such-vcpu"]


# -- alloc_unbound ------------------------------------------------------------------------------------------


def test_alloc_unbound_records_the_remote_domain(dom: Domain) -> None:
    rc, call = _unbound(dom, d=DOMID_SELF, remote=5)
    assert rc == 0 and call.effects == []
    assert _out(call) == struct.pack("<HHI", DOMID_SELF, 5, 1)
    assert dom.evtchn.lookup(1) == Port(1, state=_S.UNBOUND, remote_dom=5)
    # DOMID_SELF as the remote is resolved to the caller, as Xen does (loopback).
    assert _new_port(_unbound(dom, d=dom.domid, remote=DOMID_SELF), 4) == 2
    assert dom.evtchn.lookup(2) == Port(2, state=_S.UNBOUND, remote_dom=dom.domid)


def test_alloc_unbound_in_another_domain_is_eperm(dom: Domain) -> None:
    for d in (0, OTHER, 0x7FF2):
        rc, call = _unbound(dom, d=d)
        assert rc == -Errno.EPERM and call.mem.writes == [] and _denied(call) == ["foreign-domid"]
    assert dom.evtchn.in_use() == [] and _other(dom).evtchn.in_use() == []


# -- bind_virq ----------------------------------------------------------------------------------------------


def test_bind_virq_per_vcpu_and_global(dom: Domain) -> None:
    rc, call = _virq(dom, Virq.TIMER, 1)
    assert rc == 0 and call.effects == []
    assert _out(call) == struct.pack("<III", Virq.TIMER, 1, 1)
    assert _new_port(_virq(dom, Virq.TIMER, 0), 8) == 2  # per-vCPU: one binding on each vCPU
    assert _new_port(_virq(dom, Virq.DOM_EXC, 0), 8) == 3
    assert dom.evtchn.lookup(1) == Port(1, state=_S.VIRQ, notify_vcpu=1, virq=Virq.TIMER)
    assert dom.evtchn.virq_port(1, Virq.TIMER) == 1


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
    assert len(dom.evtchn.in_use()) == 2


# -- ENOSPC, refused and unknown ops ------------------------------------------------------------------------


def test_every_port_but_zero_can_be_used_then_enospc_until_one_is_closed(dom: Domain) -> None:
    ports = [_new_port(_ipi(dom, n % 2), 4) for n in range(evtchn.NR_EVENT_CHANNELS - 1)]
    assert ports == list(range(1, evtchn.NR_EVENT_CHANNELS))
    for rc, call in (_ipi(dom, 0), _unbound(dom), _virq(dom, Virq.TIMER, 0)):
        assert rc == -Errno.ENOSPC and call.mem.writes == [] and _denied(call) == ["no-free-port"]
    assert dom.evtchn.virq_port(0, Virq.TIMER) is None  # the failed bind left no trace
    assert _port_op(dom, EvtchnOp.close, 500)[0] == 0
    assert _new_port(_virq(dom, Virq.TIMER, 0), 8) == 500


def test_bind_interdomain_to_a_port_not_offered_is_einval(dom: Domain) -> None:
    assert isinstance(_other(dom).evtchn.bind_ipi(0), Port)
    rc, call = _run(dom, EvtchnOp.bind_interdomain, struct.pack("<HHII", OTHER, 0, 1, 0))
    assert rc == -Errno.EINVAL and call.mem.writes == [] and call.effects == []
    assert _denied(call) == ["remote-port-not-offered"]


def test_bind_pirq_is_eperm_and_fifo_and_unknown_ops_are_enosys(dom: Domain) -> None:
    rc, call = _run(dom, EvtchnOp.bind_pirq, struct.pack("<III", 3, 0, 0))
    assert rc == -Errno.EPERM and call.mem.writes == [] and _denied(call) == ["no-pirq-access"]
    for cmd in (EvtchnOp.init_control, EvtchnOp.expand_array, EvtchnOp.set_priority, 14, 0xFFFFFFFF):
        rc, call = _run(dom, cmd, b"\0" * 24)
        assert rc == -Errno.ENOSYS and call.mem.writes == [] and _denied(call) == ["unsupported-cmd"]


# -- close_all, a domain leaving, bind_interdomain (the module side of issue 5) ------------------------------


def test_bind_interdomain_connects_both_ends(dom: Domain) -> None:
    ours, theirs = _connect(dom)
    assert (ours, theirs) == (1, 1)
    assert dom.evtchn.lookup(ours) == Port(1, state=_S.INTERDOMAIN, remote_dom=OTHER, remote_port=1)
    assert _other(dom).evtchn.lookup(theirs) == Port(1, state=_S.INTERDOMAIN, remote_dom=dom.domid, remote_port=1)


def test_bind_interdomain_refusals(dom: Domain) -> None:
    not_for_us = _other(dom).evtchn.alloc_unbound(9)
    ipi = _other(dom).evtchn.bind_ipi(0)
    assert isinstance(not_for_us, Port) and isinstance(ipi, Port)
    for rdom, rport in ((OTHER, not_for_us.number), (OTHER, ipi.number), (OTHER, 0), (OTHER, 50), (OTHER, 5000)):
        assert _bind_interdomain(dom, rdom, rport) is Errno.EINVAL, rport
    assert _bind_interdomain(dom, 77, 1) is Errno.EINVAL  # a domain that does not exist has no ports at all
    assert _HV[dom].domains.get(77) is None and _HV[dom].evtchn_of(77) is None  # and asking created nothing
    assert dom.evtchn.in_use() == []


def test_loopback_channel_closes_from_either_end(dom: Domain) -> None:
    waiting = dom.evtchn.alloc_unbound(dom.domid)
    assert isinstance(waiting, Port)
    local = _bind_interdomain(dom, dom.domid, waiting.number)
    assert isinstance(local, Port) and (waiting.number, local.number) == (1, 2)
    assert (waiting.state, waiting.remote_port, local.remote_port) == (_S.INTERDOMAIN, 2, 1)
    assert _port_op(dom, EvtchnOp.close, 2)[0] == 0
    assert dom.evtchn.lookup(1) == Port(1, state=_S.UNBOUND, remote_dom=dom.domid)


def test_close_all_frees_every_port_and_returns_the_peers_sent_back_to_unbound(dom: Domain) -> None:
    other = _other(dom)
    _new_port(_ipi(dom, 1), 4)
    _new_port(_virq(dom, Virq.TIMER, 1), 8)
    _new_port(_unbound(dom, remote=OTHER), 4)
    a_ours, a_theirs = _connect(dom)
    b_ours, b_theirs = _connect(dom)
    _bind_vcpu(dom, b_ours, 1)
    waiting = dom.evtchn.alloc_unbound(dom.domid)
    assert isinstance(waiting, Port)
    assert isinstance(_bind_interdomain(dom, dom.domid, waiting.number), Port)  # loopback: not a peer
    bystander = other.evtchn.bind_ipi(1)
    assert isinstance(bystander, Port)

    peers = _HV[dom].evtchn_of
    assert evtchn.close_all(dom.domid, dom.evtchn, peers) == [(OTHER, a_theirs), (OTHER, b_theirs)]
    assert dom.evtchn.in_use() == []
    assert dom.evtchn.virq_port(1, Virq.TIMER) is None
    assert [(p.number, p.state, p.remote_dom) for p in other.evtchn.in_use()] == sorted(
        [(a_theirs, _S.UNBOUND, dom.domid), (b_theirs, _S.UNBOUND, dom.domid), (bystander.number, _S.IPI, None)]
    )
    assert evtchn.close_all(dom.domid, dom.evtchn, peers) == []
    assert evtchn.close_all(12345, evtchn.EvtchnTable(), peers) == []


def test_a_domain_that_leaves_drops_its_ports(dom: Domain) -> None:
    hv = _HV[dom]
    _new_port(_ipi(dom, 0), 4)
    ours, theirs = _connect(dom)
    hv.crash(dom, "test")
    assert dom.evtchn.in_use() == [] and hv.evtchn_of(dom.domid) is None
    assert _other(dom).evtchn.lookup(theirs) == Port(theirs, state=_S.UNBOUND, remote_dom=dom.domid)
    # a new domain starts from a table of its own
    gamma = hv.create_domain(attrs.evolve(hv.spec.domains[0], name="gamma"))
    _HV[gamma] = hv
    assert gamma.domid == 3 and _new_port(_ipi(gamma, 0), 4) == 1


def test_a_peer_gone_without_close_all_does_not_block_close(dom: Domain) -> None:
    # the module function, with a peer lookup that finds nothing: returns the port as it was, now free
    first, theirs = _connect(dom)
    was = evtchn.close(dom.domid, dom.evtchn, first, lambda domid: None)
    assert was == Port(first, state=_S.INTERDOMAIN, remote_dom=OTHER, remote_port=theirs)
    assert dom.evtchn.lookup(first) == Port(first)
    # the hypercall: the peer domain is not alive (its table is gone) but nobody closed its ports
    ours, _ = _connect(dom)
    _other(dom).move(DomainState.CRASHED, "test")
    assert _HV[dom].evtchn_of(OTHER) is None
    rc, call = _port_op(dom, EvtchnOp.close, ours)
    assert rc == 0 and call.remote == [] and call.effects == [ClearPending(port=ours)]
    assert dom.evtchn.lookup(ours) == Port(ours)


# -- callback_op, set_callbacks -----------------------------------------------------------------------------


def _cb(dom: Domain, cmd: int, payload: bytes, vcpu: int = 1) -> tuple[int, Call]:
    call = _call(dom, Hypercall.callback_op, [cmd, BUF], [Region(BUF, len(payload), payload, False)], vcpu=vcpu)
    return _handle(callback_op.handle, call), call


def _register(kind: int, eip: int, flags: int = 0, cs: int = 0x61) -> bytes:
    return struct.pack("<HHII", kind, flags, cs, eip)


def test_callback_op_copy_in() -> None:
    def spans(args: list[int]) -> list[Span]:
        return copy_in(Hypercall.callback_op, args, lambda a, n: None)

    assert spans([CallbackOp.register, BUF]) == [Span(BUF, 12)]
    assert spans([CallbackOp.unregister, BUF]) == [Span(BUF, 4)]
    assert spans([2, BUF]) == []


def test_register_event_callback_sets_the_callers_upcall_entry(dom: Domain) -> None:
    rc, call = _cb(dom, CallbackOp.register, _register(CallbackType.event, 0xC0101234), vcpu=1)
    assert rc == 0 and call.mem.writes == []
    assert call.effects == [SetCallback(vcpu=1, eip=0xC0101234)]
    assert [ev for ev, _ in _events(call)] == ["callback.register"]


def test_register_failsafe_callback_is_accepted_with_no_effect(dom: Domain) -> None:
    rc, call = _cb(dom, CallbackOp.register, _register(CallbackType.failsafe, 0xC0105678, flags=1))
    assert rc == 0 and call.effects == []
    assert _events(call)[0][1]["mask_events"] is True


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
        assert rc == -Errno.ENOSYS and call.effects == [] and _denied(call) == [reason], kind


def test_unregister_follows_xen(dom: Domain) -> None:
    for kind in (CallbackType.event, CallbackType.failsafe, CallbackType.syscall32, CallbackType.sysenter):
        rc, call = _cb(dom, CallbackOp.unregister, struct.pack("<HH", kind, 0))
        assert rc == -Errno.EINVAL and call.effects == [] and _denied(call) == ["cannot-unregister"]
    assert _cb(dom, CallbackOp.unregister, struct.pack("<HH", CallbackType.nmi, 0))[0] == 0
    rc, call = _cb(dom, CallbackOp.unregister, struct.pack("<HH", 6, 0))
    assert rc == -Errno.ENOSYS and _denied(call) == ["unknown-type"]


def test_callback_op_unknown_cmd_is_einval_and_unmapped_struct_efault(dom: Domain) -> None:
    rc, call = _cb(dom, 2, _register(CallbackType.event, 0xC0100000))
    assert rc == -Errno.EINVAL and call.effects == [] and _denied(call) == ["unsupported-cmd"]
    args = [CallbackOp.register, BUF]
    for unmapped in (Region(BUF, 12, None, False), Region(BUF, 12, b"\0" * 8, False)):  # unmapped, or short
        call = _call(dom, Hypercall.callback_op, args, [unmapped])
        assert _handle(callback_op.handle, call) == -Errno.EFAULT and call.effects == []
        assert _denied(call) == ["struct-unmapped"]
    # the struct must have been copied in whole: a span that covers only part of it is not the guest's fault,
    # and the trap answers -EFAULT for it
    short = [Region(BUF, 8, b"\0" * 8, False)]
    with pytest.raises(NotCopied):
        callback_op.handle(_call(dom, Hypercall.callback_op, args, short))
    assert _trap(dom, Hypercall.callback_op, args, short) == -Errno.EFAULT


def test_set_callbacks_registers_the_event_entry_and_always_succeeds(dom: Domain) -> None:
    args = [0x61, 0xC0101000, 0x61, 0xC0102000]
    assert copy_in(Hypercall.set_callbacks, args, lambda a, n: None) == []
    call = _call(dom, Hypercall.set_callbacks, args, [], vcpu=1)
    assert _handle(set_callbacks.handle, call) == 0
    assert call.effects == [SetCallback(vcpu=1, eip=0xC0101000)]
    assert [(ev, kw["type"], kw["eip"]) for ev, kw in _events(call)] == [
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
        ("sizeof(struct callback_register)", layouts.CALLBACK_REGISTER.size),
        ("offsetof(struct callback_register, flags)", 2),
        ("offsetof(struct callback_register, address)", 4),
        ("offsetof(struct callback_register, address.cs)", 4),
        ("offsetof(struct callback_register, address.eip)", 8),
        ("sizeof(struct callback_unregister)", layouts.CALLBACK_UNREGISTER.size),
    ]
    return out


def test_layouts_match_xen_public_headers(tmp_path: Path) -> None:
    assert_matches_xen_headers(tmp_path, ("xen", "event_channel", "callback"), _header_checks())
