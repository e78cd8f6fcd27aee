"""sched_op (29): yield, block and shutdown. poll and remote_shutdown wait for event channels / privilege."""

from __future__ import annotations

from hypervisor.guestmem import GuestFault, Span
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import Hypercall, SchedOp, ShutdownReason
from pvcluster.bus.messages import VcpuAction

NR = Hypercall.sched_op


def copy_in(args: list[int], read: Reader) -> list[Span]:
    if args[0] == SchedOp.shutdown:
        return [Span(args[1], 4)]  # struct sched_shutdown { unsigned int reason; }
    return []


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
    if cmd == SchedOp.remote_shutdown:
        return -Errno.EPERM  # only a privileged domain may shut another down
    return -Errno.ENOSYS
