"""Event channels: each domain's table of ports, and the state machine every port follows.

Modelled on Xen's common/event_channel.c with the 2-level ABI a 32-bit guest uses: NR_EVENT_CHANNELS ports (the
``evtchn_pending`` / ``evtchn_mask`` bitmaps of shared_info hold 1024 bits), port 0 reserved and never handed out,
free ports allocated lowest first. The hypervisor owns the port states; the pending and mask bits live in guest
memory, in the domain process, and change only through the effects the hypercall handlers emit
(``pvcluster/bus/effects.py``).

Each domain owns one ``EvtchnTable`` (``Domain.evtchn``, as Xen hangs its evtchn buckets off ``struct domain``).
Operations on one domain's ports are methods of its table; the few that touch two domains (binding to a peer's
port, closing one end of a channel) are module functions that take the peer's table, found through a ``Peers``
lookup the hypervisor supplies, so no module keeps any table. A destroyed domain's channels are closed with
``close_all`` (which sends its interdomain peers back to UNBOUND).

The functions here check port state and return an ``Errno`` where Xen refuses; the hypercall layer checks what
needs the ``Domain`` (does the vCPU exist, may the caller name that domid) before calling them. A move the state
machine does not allow raises ``IllegalPortTransition``: that is a bug in the caller, never a guest error.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs

from hypervisor.errors import IllegalTransition
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import NR_EVENT_CHANNELS, NR_VIRQS, EvtchnStat, Virq

# As Xen's virq_is_global(): these are per-vCPU; every other VIRQ below NR_VIRQS (VIRQ_ARCH_* included, on x86) is
# global and is bound on vCPU 0.
PER_VCPU_VIRQS = frozenset({Virq.TIMER, Virq.DEBUG, Virq.XENOPROF, Virq.XENPMU})



def virq_is_global(virq: int) -> bool:
    return virq not in PER_VCPU_VIRQS


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


class EvtchnTable:
    """One domain's ports. Port 0 is reserved for ever; free ports are handed out lowest first."""

    def __init__(self) -> None:
        self.ports = [Port(0, PortState.RESERVED)] + [Port(p) for p in range(1, NR_EVENT_CHANNELS)]
        # (vcpu, virq) -> port, as Xen's per-vCPU virq_to_evtchn: a global VIRQ sits under vCPU 0 whatever vCPU it
        # notifies; a per-vCPU VIRQ under the vCPU it was bound on (which it cannot leave).
        self.virqs: dict[tuple[int, int], int] = {}
        # Ports are handed out lowest first, so every port at or above this mark has always been free: scans stop
        # there (the toolstack's status asks for in_use() of every domain several times a second).
        self._high = 1

    def _free_port(self) -> Port | None:
        p = next((p for p in self.ports[1 : self._high] if p.free), None)
        if p is None and self._high < NR_EVENT_CHANNELS:
            p = self.ports[self._high]
        return p

    def _allocate(self, state: PortState, **fields: Any) -> Port | Errno:
        """The lowest free port, moved to ``state``; -ENOSPC when the table is full."""
        p = self._free_port()
        if p is None:
            return Errno.ENOSPC
        p.transition(state, **fields)
        self.taken(p)
        return p

    def lookup(self, port: int) -> Port | None:
        """Port ``port``; None if the number is past the table (Xen: not a valid port, -EINVAL)."""
        if not 0 <= port < NR_EVENT_CHANNELS:
            return None
        return self.ports[port]

    def taken(self, p: Port) -> None:
        """``p``, a free port, was just taken: scans must now reach it."""
        self._high = max(self._high, p.number + 1)

    def in_use(self) -> list[Port]:
        """Every port that is neither free nor reserved, lowest first."""
        return [p for p in self.ports[1 : self._high] if p.state not in (PortState.FREE, PortState.RESERVED)]

    def virq_port(self, vcpu: int, virq: int) -> int | None:
        return self.virqs.get((vcpu, virq))

    def alloc_unbound(self, remote_dom: int) -> Port | Errno:
        """A fresh port waiting for ``remote_dom`` (already resolved from DOMID_SELF) to bind to it."""
        return self._allocate(PortState.UNBOUND, remote_dom=remote_dom)

    def bind_virq(self, virq: int, vcpu: int) -> Port | Errno:
        """Bind ``virq`` on ``vcpu`` (0 for a global VIRQ; the caller checks both are in range)."""
        if not 0 <= virq < NR_VIRQS or (virq_is_global(virq) and vcpu != 0):
            raise IllegalPortTransition(f"virq {virq} cannot be bound on vcpu {vcpu}")
        if (vcpu, virq) in self.virqs:
            return Errno.EEXIST
        p = self._allocate(PortState.VIRQ, virq=virq, vcpu=vcpu)
        if isinstance(p, Port):
            self.virqs[(vcpu, virq)] = p.number
        return p

    def bind_ipi(self, vcpu: int) -> Port | Errno:
        return self._allocate(PortState.IPI, vcpu=vcpu)

    def bind_vcpu(self, port: int, vcpu: int) -> Errno | None:
        """Send ``port``'s notifications to ``vcpu`` (which the caller has checked exists) from now on."""
        p = self.lookup(port)
        if p is None or not p.rebindable:
            return Errno.EINVAL
        p.rebind(vcpu)
        return None


# The event-channel table of a domain by id, or None if no such domain has one (it never existed, or is gone).
Peers = Callable[[int], "EvtchnTable | None"]


def bind_interdomain(domid: int, table: EvtchnTable, remote_domid: int, peers: Peers, remote_port: int) -> Port | Errno:
    """Connect a fresh port of ``domid`` to ``remote_domid``'s UNBOUND ``remote_port``, which must be waiting for
    ``domid``; both ends become INTERDOMAIN. As in Xen the local port is taken first (-ENOSPC before -EINVAL), and
    the caller should then set the local port pending: notifications sent while the remote end was unbound were
    dropped. Loopback (``remote_domid == domid``) is allowed. EVTCHNOP_bind_interdomain checks the remote domain exists
    (-ESRCH) before calling this."""
    local = table._free_port()
    if local is None:
        return Errno.ENOSPC
    remote_table = table if remote_domid == domid else peers(remote_domid)
    remote = remote_table.lookup(remote_port) if remote_table is not None else None
    if remote is None or remote.state is not PortState.UNBOUND or remote.remote_dom != domid:
        return Errno.EINVAL
    local.transition(PortState.INTERDOMAIN, remote_dom=remote_domid, remote_port=remote_port)
    table.taken(local)
    remote.transition(PortState.INTERDOMAIN, remote_dom=domid, remote_port=local.number)
    return local


def close(domid: int, table: EvtchnTable, port: int, peers: Peers) -> Port | Errno:
    """Free ``port``; returns a copy of the port as it was. An INTERDOMAIN port's peer goes back to UNBOUND,
    waiting for ``domid`` again. Free, reserved and out-of-range ports cannot be closed (-EINVAL)."""
    p = table.lookup(port)
    if p is None or p.state in (PortState.FREE, PortState.RESERVED):
        return Errno.EINVAL
    was = attrs.evolve(p)
    if p.state is PortState.VIRQ:
        assert p.virq is not None
        key = (0 if virq_is_global(p.virq) else p.notify_vcpu, p.virq)
        if table.virqs.get(key) != port:
            raise IllegalPortTransition(f"port {port}: virq {p.virq} is not bound to it under vcpu {key[0]}")
        del table.virqs[key]
    elif p.state is PortState.INTERDOMAIN:
        assert p.remote_dom is not None and p.remote_port is not None
        peer_table = table if p.remote_dom == domid else peers(p.remote_dom)
        # A peer whose table is gone was destroyed without close_all: there is no far end left to update.
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


def close_all(domid: int, table: EvtchnTable, peers: Peers) -> list[tuple[int, int]]:
    """Close every port of ``domid`` (its domain is being destroyed), as Xen's evtchn_destroy does.

    Returns the (remote domid, remote port) of every interdomain peer in another domain: those ports have been moved
    back to UNBOUND (waiting for ``domid``, which will never bind again) and their domains may want telling."""
    out: list[tuple[int, int]] = []
    for p in reversed(table.in_use()):  # highest first, as Xen's evtchn_destroy
        if p.state is PortState.FREE:  # closed meanwhile, with a loopback peer
            continue
        if p.state is PortState.INTERDOMAIN and p.remote_dom != domid and peers(p.remote_dom) is not None:  # type: ignore[arg-type]
            assert p.remote_dom is not None and p.remote_port is not None
            out.append((p.remote_dom, p.remote_port))
        close(domid, table, p.number, peers)
    return sorted(out)
