"""Event channels: each domain's table of ports, and the state machine every port follows.

Modelled on Xen's common/event_channel.c with the 2-level ABI a 32-bit guest uses: NR_EVENT_CHANNELS ports (the
``evtchn_pending`` / ``evtchn_mask`` bitmaps of shared_info hold 1024 bits), port 0 reserved and never handed out,
free ports allocated lowest first. The hypervisor owns the port states; the pending and mask bits live in guest
memory, in the domain process, and change only through the VcpuActions the hypercall handlers emit.

Port tables are kept per domid (``Domain`` carries no event-channel state); a destroyed domain's channels are closed
with ``close_all`` (which sends its interdomain peers back to UNBOUND) and its table dropped with ``forget``.
Domids come from one ``DomainTable``, which never reuses them.

The functions here check port state and return an ``Errno`` where Xen refuses; the hypercall layer checks what
needs the ``Domain`` (does the vCPU exist, may the caller name that domid) before calling them. A move the state
machine does not allow raises ``IllegalPortTransition``: that is a bug in the caller, never a guest error.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from hypervisor.domain import IllegalTransition
from pvcluster.abi.errno import Errno

NR_EVENT_CHANNELS = 1024  # 2-level ABI on x86-32: 32 words of 32 bits (EVTCHN_2L_NR_CHANNELS for -m32)
NR_VIRQS = 24


class Virq(enum.IntEnum):
    """VIRQ numbers (xen/xen.h). Per-vCPU ones are bound on a chosen vCPU; the others are global."""

    TIMER = 0
    DEBUG = 1
    CONSOLE = 2
    DOM_EXC = 3
    TBUF = 4
    DEBUGGER = 6
    XENOPROF = 7
    CON_RING = 8
    PCPU_STATE = 9
    MEM_EVENT = 10
    ARGO = 11
    ENOMEM = 12
    XENPMU = 13


# As Xen's virq_is_global(): these are per-vCPU; every other VIRQ below NR_VIRQS (VIRQ_ARCH_* included, on x86) is
# global and is bound on vCPU 0.
PER_VCPU_VIRQS = frozenset({Virq.TIMER, Virq.DEBUG, Virq.XENOPROF, Virq.XENPMU})


def virq_is_global(virq: int) -> bool:
    return virq not in PER_VCPU_VIRQS


class EvtchnStat(enum.IntEnum):
    """EVTCHNSTAT_*: a port's state as EVTCHNOP_status reports it."""

    closed = 0
    unbound = 1
    interdomain = 2
    pirq = 3
    virq = 4
    ipi = 5


class PortState(enum.Enum):
    RESERVED = "reserved"  # port 0 only, for ever (Xen's ECS_RESERVED)
    FREE = "free"
    UNBOUND = "unbound"  # waiting for remote_dom to bind to it
    INTERDOMAIN = "interdomain"  # connected to (remote_dom, remote_port)
    VIRQ = "virq"  # bound to virq
    IPI = "ipi"  # notifies notify_vcpu of its own domain

    @property
    def status(self) -> EvtchnStat:
        return _STATUS[self]


_P = PortState
_STATUS = {
    _P.RESERVED: EvtchnStat.closed,
    _P.FREE: EvtchnStat.closed,
    _P.UNBOUND: EvtchnStat.unbound,
    _P.INTERDOMAIN: EvtchnStat.interdomain,
    _P.VIRQ: EvtchnStat.virq,
    _P.IPI: EvtchnStat.ipi,
}

# Every legal move. A bound port is only ever freed (EVTCHNOP_close); an UNBOUND port becomes INTERDOMAIN when its
# remote binds to it, and an INTERDOMAIN port goes back to UNBOUND when its peer closes.
TRANSITIONS: dict[PortState, frozenset[PortState]] = {
    _P.RESERVED: frozenset(),
    _P.FREE: frozenset({_P.UNBOUND, _P.INTERDOMAIN, _P.VIRQ, _P.IPI}),
    _P.UNBOUND: frozenset({_P.INTERDOMAIN, _P.FREE}),
    _P.INTERDOMAIN: frozenset({_P.UNBOUND, _P.FREE}),
    _P.VIRQ: frozenset({_P.FREE}),
    _P.IPI: frozenset({_P.FREE}),
}

# What each state is bound to: the fields a move into it must name (and no others). "vcpu" sets the notify vCPU;
# moves that do not name it keep the port's (0 on a port fresh from FREE, as Xen resets it on close).
_BINDING: dict[PortState, frozenset[str]] = {
    _P.RESERVED: frozenset(),
    _P.FREE: frozenset(),
    _P.UNBOUND: frozenset({"remote_dom"}),
    _P.INTERDOMAIN: frozenset({"remote_dom", "remote_port"}),
    _P.VIRQ: frozenset({"virq", "vcpu"}),
    _P.IPI: frozenset({"vcpu"}),
}


class IllegalPortTransition(IllegalTransition):
    pass


@attrs.define
class Port:
    number: int
    state: PortState = PortState.FREE
    notify_vcpu: int = 0  # the vCPU an event on this port is delivered to
    remote_dom: int | None = None  # UNBOUND: the domain allowed to bind; INTERDOMAIN: the peer
    remote_port: int | None = None  # INTERDOMAIN: the peer's port
    virq: int | None = None  # VIRQ

    @property
    def free(self) -> bool:
        return self.state is PortState.FREE

    def transition(
        self,
        new: PortState,
        *,
        vcpu: int | None = None,
        remote_dom: int | None = None,
        remote_port: int | None = None,
        virq: int | None = None,
    ) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalPortTransition(f"port {self.number}: {self.state.value} -> {new.value}")
        given = {"vcpu": vcpu, "remote_dom": remote_dom, "remote_port": remote_port, "virq": virq}
        named = frozenset(k for k, v in given.items() if v is not None)
        if named != _BINDING[new]:
            raise IllegalPortTransition(
                f"port {self.number}: {self.state.value} -> {new.value} binds {sorted(_BINDING[new])}, "
                f"not {sorted(named)}"
            )
        self.state = new
        self.remote_dom, self.remote_port, self.virq = remote_dom, remote_port, virq
        if new is PortState.FREE:
            self.notify_vcpu = 0
        elif vcpu is not None:
            self.notify_vcpu = vcpu

    def rebind(self, vcpu: int) -> None:
        """Move notifications to ``vcpu`` (EVTCHNOP_bind_vcpu): only UNBOUND, INTERDOMAIN and global-VIRQ ports."""
        if not self.rebindable:
            raise IllegalPortTransition(f"port {self.number}: a {self.state.value} port cannot move to vcpu {vcpu}")
        self.notify_vcpu = vcpu

    @property
    def rebindable(self) -> bool:
        if self.state is PortState.VIRQ:
            return self.virq is not None and virq_is_global(self.virq)
        return self.state in (PortState.UNBOUND, PortState.INTERDOMAIN)


@attrs.define
class _Table:
    ports: list[Port]
    # (vcpu, virq) -> port, as Xen's per-vCPU virq_to_evtchn: a global VIRQ sits under vCPU 0 whatever vCPU it
    # notifies; a per-vCPU VIRQ under the vCPU it was bound on (which it cannot leave).
    virqs: dict[tuple[int, int], int] = attrs.Factory(dict)


_tables: dict[int, _Table] = {}


def _table(domid: int) -> _Table:
    t = _tables.get(domid)
    if t is None:
        t = _Table(ports=[Port(0, PortState.RESERVED)] + [Port(p) for p in range(1, NR_EVENT_CHANNELS)])
        _tables[domid] = t
    return t


def _free_port(t: _Table) -> Port | None:
    return next((p for p in t.ports if p.free), None)


def _allocate(t: _Table, state: PortState, **fields: Any) -> Port | Errno:
    """The lowest free port, moved to ``state``; -ENOSPC when the table is full."""
    p = _free_port(t)
    if p is None:
        return Errno.ENOSPC
    p.transition(state, **fields)
    return p


def lookup(domid: int, port: int) -> Port | None:
    """Port ``port`` of ``domid``; None if the number is past the table (Xen: not a valid port, -EINVAL)."""
    if not 0 <= port < NR_EVENT_CHANNELS:
        return None
    return _table(domid).ports[port]


def in_use(domid: int) -> list[Port]:
    """Every port of ``domid`` that is neither free nor reserved, lowest first."""
    t = _tables.get(domid)
    return [p for p in t.ports if p.state not in (PortState.FREE, PortState.RESERVED)] if t else []


def virq_port(domid: int, vcpu: int, virq: int) -> int | None:
    return _table(domid).virqs.get((vcpu, virq))


def alloc_unbound(domid: int, remote_dom: int) -> Port | Errno:
    """A fresh port waiting for ``remote_dom`` (already resolved from DOMID_SELF) to bind to it."""
    return _allocate(_table(domid), PortState.UNBOUND, remote_dom=remote_dom)


def bind_virq(domid: int, virq: int, vcpu: int) -> Port | Errno:
    """Bind ``virq`` on ``vcpu`` (0 for a global VIRQ; the caller checks both are in range)."""
    if not 0 <= virq < NR_VIRQS or (virq_is_global(virq) and vcpu != 0):
        raise IllegalPortTransition(f"virq {virq} cannot be bound on vcpu {vcpu}")
    t = _table(domid)
    if (vcpu, virq) in t.virqs:
        return Errno.EEXIST
    p = _allocate(t, PortState.VIRQ, virq=virq, vcpu=vcpu)
    if isinstance(p, Port):
        t.virqs[(vcpu, virq)] = p.number
    return p


def bind_ipi(domid: int, vcpu: int) -> Port | Errno:
    return _allocate(_table(domid), PortState.IPI, vcpu=vcpu)


def bind_interdomain(domid: int, remote_domid: int, remote_port: int) -> Port | Errno:
    """Connect a fresh port of ``domid`` to ``remote_domid``'s UNBOUND ``remote_port``, which must be waiting for
    ``domid``; both ends become INTERDOMAIN. As in Xen the local port is taken first (-ENOSPC before -EINVAL), and
    the caller should then set the local port pending: notifications sent while the remote end was unbound were
    dropped. Loopback (``remote_domid == domid``) is allowed. EVTCHNOP_bind_interdomain checks the remote domain exists
    (-ESRCH) before calling this."""
    local = _free_port(_table(domid))
    if local is None:
        return Errno.ENOSPC
    remote_table = _tables.get(remote_domid)  # a domain with no table has no UNBOUND port to bind to
    remote = remote_table.ports[remote_port] if remote_table and 0 <= remote_port < NR_EVENT_CHANNELS else None
    if remote is None or remote.state is not PortState.UNBOUND or remote.remote_dom != domid:
        return Errno.EINVAL
    local.transition(PortState.INTERDOMAIN, remote_dom=remote_domid, remote_port=remote_port)
    remote.transition(PortState.INTERDOMAIN, remote_dom=domid, remote_port=local.number)
    return local


def bind_vcpu(domid: int, port: int, vcpu: int) -> Errno | None:
    """Send ``port``'s notifications to ``vcpu`` (which the caller has checked exists) from now on."""
    p = lookup(domid, port)
    if p is None or not p.rebindable:
        return Errno.EINVAL
    p.rebind(vcpu)
    return None


def close(domid: int, port: int) -> Port | Errno:
    """Free ``port``; returns a copy of the port as it was. An INTERDOMAIN port's peer goes back to UNBOUND,
    waiting for ``domid`` again. Free, reserved and out-of-range ports cannot be closed (-EINVAL)."""
    p = lookup(domid, port)
    if p is None or p.state in (PortState.FREE, PortState.RESERVED):
        return Errno.EINVAL
    was = attrs.evolve(p)
    t = _table(domid)
    if p.state is PortState.VIRQ:
        assert p.virq is not None
        key = (0 if virq_is_global(p.virq) else p.notify_vcpu, p.virq)
        if t.virqs.get(key) != port:
            raise IllegalPortTransition(f"port {port}: virq {p.virq} is not bound to it under vcpu {key[0]}")
        del t.virqs[key]
    elif p.state is PortState.INTERDOMAIN:
        assert p.remote_dom is not None and p.remote_port is not None
        peer_table = _tables.get(p.remote_dom)
        # A peer whose table is gone was forgotten without close_all: there is no far end left to update.
        if peer_table is not None:
            peer = peer_table.ports[p.remote_port]
            if peer.state is not PortState.INTERDOMAIN or (peer.remote_dom, peer.remote_port) != (domid, port):
                raise IllegalPortTransition(
                    f"port {port} of d{domid} names d{p.remote_dom} port {p.remote_port}, which does not name it back"
                )
            p.transition(PortState.FREE)
            peer.transition(PortState.UNBOUND, remote_dom=domid)
            return was
    p.transition(PortState.FREE)
    return was


def close_all(domid: int) -> list[tuple[int, int]]:
    """Close every port of ``domid`` (its domain is being destroyed), as Xen's evtchn_destroy does.

    Returns the (remote domid, remote port) of every interdomain peer in another domain: those ports have been moved
    back to UNBOUND (waiting for ``domid``, which will never bind again) and their domains may want telling."""
    t = _tables.get(domid)
    if t is None:
        return []
    peers: list[tuple[int, int]] = []
    for p in reversed(t.ports):  # highest first, as Xen's evtchn_destroy
        if p.state in (PortState.FREE, PortState.RESERVED):
            continue
        if p.state is PortState.INTERDOMAIN and p.remote_dom != domid and p.remote_dom in _tables:
            assert p.remote_dom is not None and p.remote_port is not None
            peers.append((p.remote_dom, p.remote_port))
        close(domid, p.number)
    return sorted(peers)


def forget(domid: int) -> None:
    """Drop ``domid``'s table. Call ``close_all`` first, or its interdomain peers keep naming it."""
    _tables.pop(domid, None)
