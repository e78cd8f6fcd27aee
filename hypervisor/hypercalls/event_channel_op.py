"""event_channel_op (32): allocate, bind, send on, close, query and unmask event-channel ports.

Port states live in the caller's ``EvtchnTable`` (``hypervisor/evtchn.py``); the pending and mask bits live in the
guest's shared_info, so a delivery is an effect the domain process carries out: ``SetPending`` (set the port pending
and, unless it is masked, raise the upcall on ``vcpu``), ``Unmask`` (clear the mask bit; re-raise the upcall if the
port is still pending) and ``ClearPending`` (clear the pending bit of a port being closed, so a reused port starts
clean).

As Xen's do_event_channel_op: the command struct is copied in whole (-EFAULT if it cannot be), and for the ops with
out fields copied back whole after success; a failed copy-back leaves the port allocated and returns -EFAULT.
Interdomain delivery acts on another domain's process: the handler puts the peer's ``SetPending`` in
``call.remote`` and the clock hands it to that domain in its next window, ``link_ns`` after the send.
Closing one end of an interdomain channel (close, reset, or the domain dying) leaves the other end UNBOUND and
raises an event on it, so its owner sees the peer go. A send on the xenstore or console ring's port (interdomain
with dom0, whose daemons the hypervisor plays) goes to its backend (``hypervisor/backends.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from hypervisor import backends, evtchn
from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.structs import EVTCHNOP_SIZE
from pvcluster.abi.xen import DOMID_SELF, EvtchnOp, Hypercall
from pvcluster.bus.effects import ClearPending, SetPending, Unmask

NR = Hypercall.event_channel_op


_O = EvtchnOp

# The FIFO ABI ops (init_control, expand_array, set_priority) are not offered: -ENOSYS makes a guest stay with the
# 2-level ABI, as Linux does when EVTCHNOP_init_control fails.
SIZES: dict[int, int] = {int(op): EVTCHNOP_SIZE[op] for op in EvtchnOp if op in EVTCHNOP_SIZE}


def handle(call: Call) -> int:
    cmd, ptr = call.arg(0), call.arg(1)
    size = SIZES.get(cmd)
    if size is None:
        return _deny(call, Errno.ENOSYS, "unsupported-cmd", cmd=cmd)
    op = EvtchnOp(cmd)
    try:
        raw = call.mem.read(ptr, size)
    except GuestFault:
        return _deny(call, Errno.EFAULT, "struct-unmapped", op=op.name, addr=ptr)
    return _OPS[op](call, ptr, raw)


def _deny(call: Call, err: Errno, reason: str, **fields: Any) -> int:
    call.trace("evtchn.denied", reason=reason, errno=err.name, **fields)
    return -err


def _is_self(call: Call, domid: int) -> bool:
    """An unprivileged domain may name only itself (DOMID_SELF or its own id) as the domain a port belongs to."""
    return domid in (DOMID_SELF, call.dom.domid)


def _copy_out(call: Call, op: EvtchnOp, ptr: int, data: bytes) -> int:
    """Write the struct back whole; 0, or -EFAULT (the op's effect stands: Xen's "cleaning up would be a mess")."""
    try:
        call.mem.write(ptr, data)
    except GuestFault:
        return _deny(call, Errno.EFAULT, "copy-out-failed", op=op.name, addr=ptr)
    return 0


def _with_port(raw: bytes, offset: int, port: int) -> bytes:
    """The struct as copied in, with its out ``port`` field filled in."""
    out = bytearray(raw)
    struct.pack_into("<I", out, offset, port)
    return bytes(out)


def _pending(port: evtchn.Port) -> SetPending:
    return SetPending(vcpu=port.notify_vcpu, port=port.number)


def _alloc_unbound(call: Call, ptr: int, raw: bytes) -> int:
    dom, remote_dom = struct.unpack_from("<HH", raw)
    if not _is_self(call, dom):
        return _deny(call, Errno.EPERM, "foreign-domid", op="alloc_unbound", target_dom=dom)
    if remote_dom == DOMID_SELF:
        remote_dom = call.dom.domid
    r = call.dom.evtchn.alloc_unbound(remote_dom)
    if isinstance(r, Errno):
        return _deny(call, r, "no-free-port", op="alloc_unbound")
    call.trace("evtchn.alloc_unbound", port=r.number, remote_dom=remote_dom)
    return _copy_out(call, _O.alloc_unbound, ptr, _with_port(raw, 4, r.number))


def _alive(call: Call, domid: int) -> bool:
    return domid == call.dom.domid or call.hv.alive(domid)


def _notify(call: Call, domid: int, port: evtchn.Port) -> None:
    """An event on ``port`` of ``domid``: the caller's own through its effects, another domain's through remote."""
    if domid == call.dom.domid:
        call.effects.append(_pending(port))
    else:
        call.remote.append((domid, _pending(port)))


def _bind_interdomain(call: Call, ptr: int, raw: bytes) -> int:
    remote_dom, remote_port = struct.unpack_from("<H2xI", raw)
    if remote_dom == DOMID_SELF:
        remote_dom = call.dom.domid
    if not _alive(call, remote_dom):  # Xen: rcu_lock_domain_by_id fails
        return _deny(call, Errno.ESRCH, "no-such-domain", op="bind_interdomain", remote_dom=remote_dom)
    r = evtchn.bind_interdomain(call.dom.domid, call.dom.evtchn, remote_dom, call.hv.evtchn_of, remote_port)
    if isinstance(r, Errno):
        reason = "no-free-port" if r is Errno.ENOSPC else "remote-port-not-offered"
        return _deny(call, r, reason, op="bind_interdomain", remote_dom=remote_dom, remote_port=remote_port)
    # As Xen: the local end starts pending, since anything sent while the remote end was unbound was dropped.
    call.effects.append(_pending(r))
    call.trace("evtchn.bind_interdomain", port=r.number, remote_dom=remote_dom, remote_port=remote_port)
    return _copy_out(call, _O.bind_interdomain, ptr, _with_port(raw, 8, r.number))


def _bind_virq(call: Call, ptr: int, raw: bytes) -> int:
    virq, vcpu = struct.unpack_from("<II", raw)
    if virq >= evtchn.NR_VIRQS:
        return _deny(call, Errno.EINVAL, "bad-virq", virq=virq)
    if evtchn.virq_is_global(virq) and vcpu != 0:
        return _deny(call, Errno.EINVAL, "global-virq-off-vcpu0", virq=virq, target=vcpu)
    if vcpu >= len(call.dom.vcpus):
        return _deny(call, Errno.ENOENT, "no-such-vcpu", op="bind_virq", target=vcpu)
    r = call.dom.evtchn.bind_virq(virq, vcpu)
    if isinstance(r, Errno):
        reason = "virq-already-bound" if r is Errno.EEXIST else "no-free-port"
        return _deny(call, r, reason, op="bind_virq", virq=virq, target=vcpu)
    call.trace("evtchn.bind_virq", port=r.number, virq=virq, target=vcpu)
    return _copy_out(call, _O.bind_virq, ptr, _with_port(raw, 8, r.number))


def _bind_pirq(call: Call, ptr: int, raw: bytes) -> int:
    (pirq,) = struct.unpack_from("<I", raw)
    # Xen answers -EPERM to a domain that was given no access to the physical IRQ; none is given any here.
    return _deny(call, Errno.EPERM, "no-pirq-access", pirq=pirq)


def _close(call: Call, ptr: int, raw: bytes) -> int:
    (port,) = struct.unpack_from("<I", raw)
    r = evtchn.close(call.dom.domid, call.dom.evtchn, port, call.hv.evtchn_of)
    if isinstance(r, Errno):
        return _deny(call, r, "port-not-open", op="close", port=port)
    call.effects.append(ClearPending(port=port))
    call.trace("evtchn.close", port=port, was=r.state.value)
    _notify_peer(call, r)
    return 0


def _notify_peer(call: Call, was: evtchn.Port) -> None:
    """``was`` (as it was before closing) was INTERDOMAIN: its peer is UNBOUND now; tell the peer's owner."""
    if was.state is not evtchn.PortState.INTERDOMAIN or was.remote_dom is None or was.remote_port is None:
        return
    table = call.hv.evtchn_of(was.remote_dom)
    peer = table.lookup(was.remote_port) if table is not None else None
    if peer is not None and peer.state is evtchn.PortState.UNBOUND:
        _notify(call, was.remote_dom, peer)
        call.trace("evtchn.peer_closed", port=was.number, remote_dom=was.remote_dom, remote_port=was.remote_port)


def _send(call: Call, ptr: int, raw: bytes) -> int:
    (port,) = struct.unpack_from("<I", raw)
    p = call.dom.evtchn.lookup(port)
    if p is None:
        return _deny(call, Errno.EINVAL, "bad-port", op="send", port=port)
    if p.state is evtchn.PortState.IPI:
        call.effects.append(_pending(p))
        call.trace("evtchn.send", port=port, target=p.notify_vcpu)
        return 0
    if p.state is evtchn.PortState.UNBOUND:
        call.trace("evtchn.send_dropped", port=port)  # nobody at the far end yet: Xen drops it silently
        return 0
    if backends.is_backend_port(p):  # the console or xenstore ring's port: its backend is the hypervisor's
        call.trace("evtchn.send", port=port, remote_dom=p.remote_dom, remote_port=p.remote_port)
        backends.notified(call, p)
        return 0
    if p.state is evtchn.PortState.INTERDOMAIN:
        assert p.remote_dom is not None and p.remote_port is not None
        table = call.hv.evtchn_of(p.remote_dom)
        peer = table.lookup(p.remote_port) if table is not None else None
        if peer is None:  # the peer domain is gone and nobody closed this end: nothing to deliver to
            call.trace("evtchn.send_dropped", port=port, remote_dom=p.remote_dom)
            return 0
        _notify(call, p.remote_dom, peer)
        call.trace("evtchn.send", port=port, remote_dom=p.remote_dom, remote_port=p.remote_port,
                   target=peer.notify_vcpu)
        return 0
    return _deny(call, Errno.EINVAL, "port-not-sendable", op="send", port=port, state=p.state.value)


def _status(call: Call, ptr: int, raw: bytes) -> int:
    dom, port = struct.unpack_from("<H2xI", raw)
    if not _is_self(call, dom):
        return _deny(call, Errno.EPERM, "foreign-domid", op="status", target_dom=dom)
    p = call.dom.evtchn.lookup(port)
    if p is None:
        return _deny(call, Errno.EINVAL, "bad-port", op="status", port=port)
    out = bytearray(raw)
    struct.pack_into("<II", out, 8, p.state.status, p.notify_vcpu)
    # The union is written only where the state defines it; other bytes go back as the guest gave them (Xen copies
    # the whole struct it copied in).
    if p.state is evtchn.PortState.UNBOUND:
        struct.pack_into("<H", out, 16, p.remote_dom)
    elif p.state is evtchn.PortState.INTERDOMAIN:
        struct.pack_into("<H", out, 16, p.remote_dom)  # the padding at 18 stays the guest's too
        struct.pack_into("<I", out, 20, p.remote_port)
    elif p.state is evtchn.PortState.VIRQ:
        struct.pack_into("<I", out, 16, p.virq)
    call.trace("evtchn.status", port=port, status=p.state.status.name, target=p.notify_vcpu)
    return _copy_out(call, _O.status, ptr, bytes(out))


def _bind_ipi(call: Call, ptr: int, raw: bytes) -> int:
    (vcpu,) = struct.unpack_from("<I", raw)
    if vcpu >= len(call.dom.vcpus):
        return _deny(call, Errno.ENOENT, "no-such-vcpu", op="bind_ipi", target=vcpu)
    r = call.dom.evtchn.bind_ipi(vcpu)
    if isinstance(r, Errno):
        return _deny(call, r, "no-free-port", op="bind_ipi")
    call.trace("evtchn.bind_ipi", port=r.number, target=vcpu)
    return _copy_out(call, _O.bind_ipi, ptr, _with_port(raw, 4, r.number))


def _bind_vcpu(call: Call, ptr: int, raw: bytes) -> int:
    port, vcpu = struct.unpack_from("<II", raw)
    if vcpu >= len(call.dom.vcpus):  # checked before the port, as Xen does
        return _deny(call, Errno.ENOENT, "no-such-vcpu", op="bind_vcpu", target=vcpu)
    err = call.dom.evtchn.bind_vcpu(port, vcpu)
    if err is not None:
        return _deny(call, err, "port-not-rebindable", op="bind_vcpu", port=port)
    call.trace("evtchn.bind_vcpu", port=port, target=vcpu)
    return 0


def _unmask(call: Call, ptr: int, raw: bytes) -> int:
    (port,) = struct.unpack_from("<I", raw)
    p = call.dom.evtchn.lookup(port)
    if p is None:
        return _deny(call, Errno.EINVAL, "bad-port", op="unmask", port=port)
    # Any port in range may be unmasked, whatever its state (Xen's evtchn_unmask checks only validity); a pending
    # port raises the upcall on the vCPU it notifies.
    call.effects.append(Unmask(vcpu=p.notify_vcpu, port=port))
    call.trace("evtchn.unmask", port=port, target=p.notify_vcpu)
    return 0


def _reset(call: Call, ptr: int, raw: bytes) -> int:
    (dom,) = struct.unpack_from("<H", raw)
    if not _is_self(call, dom):
        # Xen: -ESRCH for no such domain, then the XSM check refuses an unprivileged caller any other domain
        err = Errno.EPERM if _alive(call, dom) else Errno.ESRCH
        return _deny(call, err, "foreign-domid", op="reset", target_dom=dom)
    for p in reversed(call.dom.evtchn.in_use()):  # highest first, as close_all
        if not p.free:  # a loopback peer closed earlier in this loop is free already
            _close(call, 0, struct.pack("<I", p.number))
    call.trace("evtchn.reset")
    return 0


_OPS: dict[EvtchnOp, Callable[[Call, int, bytes], int]] = {
    _O.alloc_unbound: _alloc_unbound,
    _O.bind_interdomain: _bind_interdomain,
    _O.bind_virq: _bind_virq,
    _O.bind_pirq: _bind_pirq,
    _O.close: _close,
    _O.send: _send,
    _O.status: _status,
    _O.bind_ipi: _bind_ipi,
    _O.bind_vcpu: _bind_vcpu,
    _O.unmask: _unmask,
    _O.reset: _reset,
}
