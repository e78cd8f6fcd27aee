"""sched_op (29): yield, block, shutdown and poll. remote_shutdown needs privilege no domain has here.

SCHEDOP_poll (struct sched_poll { ports ptr @0, u32 nr_ports @4, u64 timeout @8 }) is deferred like block: the
hypervisor cannot see the pending bits, so it checks the ports are the caller's and hands the domain a ``poll``
action naming them; the domain completes the call (0) when one of them is pending, or when the ``poll_timeout``
event the poll timer sends arrives (timeout 0: none).
"""

from __future__ import annotations

import struct

from hypervisor import evtchn, timers
from hypervisor.guestmem import GuestFault, Span
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import Hypercall, SchedOp, ShutdownReason
from pvcluster.bus.messages import VcpuAction

NR = Hypercall.sched_op
SCHED_POLL_SIZE = 16
MAX_POLL_PORTS = 128  # Xen: nr_ports > 128 is -EINVAL


def copy_in(args: list[int], read: Reader) -> list[Span]:
    if args[0] == SchedOp.shutdown:
        return [Span(args[1], 4)]  # struct sched_shutdown { unsigned int reason; }
    if args[0] == SchedOp.poll:
        spans = [Span(args[1], SCHED_POLL_SIZE)]
        raw = read(args[1] & 0xFFFFFFFF, SCHED_POLL_SIZE)
        if raw is not None:
            ports, nr = struct.unpack_from("<II", raw)
            if 0 < nr <= MAX_POLL_PORTS:
                spans.append(Span(ports, 4 * nr))
        return spans
    return []


def _poll(call: Call) -> int:
    try:
        ports_ptr, nr, timeout = struct.unpack("<IIQ", call.mem.read(call.arg(1), SCHED_POLL_SIZE))
    except GuestFault:
        return -Errno.EFAULT
    if nr > MAX_POLL_PORTS:
        return -Errno.EINVAL
    try:
        ports = list(struct.unpack(f"<{nr}I", call.mem.read(ports_ptr, 4 * nr))) if nr else []
    except GuestFault:
        return -Errno.EFAULT
    for port in ports:
        p = evtchn.lookup(call.dom.domid, port)
        if p is None or p.state in (evtchn.PortState.FREE, evtchn.PortState.RESERVED):
            call.trace("sched.poll_denied", port=port)
            return -Errno.EINVAL
    call.deferred = True
    regs = {"nr": len(ports), **{f"p{i}": port for i, port in enumerate(ports)}}
    call.actions.append(VcpuAction(kind="poll", vcpu=call.vcpu, regs=regs))
    timers.set_poll(call.dom.domid, call.vcpu, timeout or None, call.vt_ns)
    call.trace("sched.poll", ports=ports, timeout_ns=timeout)
    return 0


def handle(call: Call) -> int:
    cmd = call.arg(0)
    if cmd == SchedOp.yield_:
        return 0
    if cmd == SchedOp.block:
        # Xen's SCHEDOP_block re-enables event delivery and sleeps until an event is pending. With no event
        # source wired to this vCPU yet, it sleeps until one is (the result is delivered on wake-up).
        call.deferred = True
        call.actions.append(VcpuAction(kind="block", vcpu=call.vcpu, regs={}))
        return 0
    if cmd == SchedOp.shutdown:
        try:
            reason = call.mem.u32(call.arg(1))
        except GuestFault:
            return -Errno.EFAULT
        if reason not in ShutdownReason._value2member_map_:
            return -Errno.EINVAL
        call.deferred = True
        call.shutdown = reason
        return 0
    if cmd == SchedOp.poll:
        return _poll(call)
    if cmd == SchedOp.remote_shutdown:
        return -Errno.EPERM  # only a privileged domain may shut another down
    return -Errno.ENOSYS
