"""sched_op (29): yield, block, shutdown and poll. remote_shutdown needs privilege no domain has here.

SCHEDOP_poll (struct sched_poll { ports ptr @0, u32 nr_ports @4, u64 timeout @8 }) is deferred like block: the
hypervisor cannot see the pending bits, so it checks the ports are the caller's and hands the domain a ``Poll``
effect naming them; the domain completes the call (0) when one of them is pending, or when the ``PollTimeout`` the
poll timer sends arrives (timeout 0: none; a timeout Xen reads as negative has already passed).
"""

from __future__ import annotations

import struct

from hypervisor import timers
from hypervisor.evtchn import PortState
from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from pvcluster.abi import layouts, structs
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import Hypercall, SchedOp, ShutdownReason
from pvcluster.bus.effects import Block, Poll

NR = Hypercall.sched_op


def _poll(call: Call) -> int:
    try:
        ports_ptr, nr, timeout = struct.unpack("<IIQ", call.mem.read(call.arg(1), layouts.SCHED_POLL.size))
    except GuestFault:
        return -Errno.EFAULT
    if nr > structs.SCHED_POLL_MAX_PORTS:
        return -Errno.EINVAL
    try:
        ports = list(struct.unpack(f"<{nr}I", call.mem.read(ports_ptr, 4 * nr))) if nr else []
    except GuestFault:
        return -Errno.EFAULT
    for port in ports:
        p = call.dom.evtchn.lookup(port)
        if p is None or p.state in (PortState.FREE, PortState.RESERVED):
            call.trace("sched.poll_denied", port=port)
            return -Errno.EINVAL
    call.deferred = True
    call.effects.append(Poll(vcpu=call.vcpu, ports=ports))
    deadline = timers.guest_deadline(timeout, call.vt_ns) if timeout else None
    timers.set_poll(call.dom.vcpus[call.vcpu], deadline, call.vt_ns)
    call.trace("sched.poll", ports=ports, timeout_ns=timeout)
    return 0


def handle(call: Call) -> int:
    cmd = call.arg(0)
    if cmd == SchedOp.yield_:
        return 0
    if cmd == SchedOp.block:
        # Xen's SCHEDOP_block re-enables event delivery and sleeps until an event is pending (the result is
        # delivered on wake-up).
        call.deferred = True
        call.effects.append(Block(vcpu=call.vcpu))
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
