"""vcpu_op (24): bring secondary vCPUs up and down and ask whether one is up."""

from __future__ import annotations

import struct

from hypervisor import timers
from hypervisor.guestmem import GuestFault, Span
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import Hypercall, VcpuOp
from pvcluster.bus.messages import VcpuAction

NR = Hypercall.vcpu_op

# struct vcpu_guest_context on x86_32: fpu_ctxt[512], flags @512, cpu_user_regs @516 (ebx ecx edx esi edi ebp
# eax, error_code/entry_vector, eip @+32, cs, eflags @+40... see xen/arch-x86/xen-x86_32.h), then the trap
# table and control registers. Only the general registers, eip, eflags and esp are used here.
VCPU_GUEST_CONTEXT_SIZE = 2800
_USER_REGS = 516
_EVENT_CALLBACK_EIP = 2784  # event_callback_cs @2780, event_callback_eip @2784
_REG_OFFSETS = {
    "ebx": 0,
    "ecx": 4,
    "edx": 8,
    "esi": 12,
    "edi": 16,
    "ebp": 20,
    "eax": 24,
    "eip": 32,
    "eflags": 40,
    "esp": 44,
}


# struct vcpu_set_periodic_timer { u64 period_ns; }; struct vcpu_set_singleshot_timer { u64 timeout_abs_ns;
# u32 flags; }: 12 bytes on x86-32, where a u64 is 4-aligned.
_TIMER_STRUCTS: dict[int, int] = {VcpuOp.set_periodic_timer: 8, VcpuOp.set_singleshot_timer: 12}
VCPU_SSHOTTMR_FUTURE = 1
ETIME = 62  # xen/errno.h
MIN_PERIOD_NS = 1_000_000  # Xen refuses periods under MILLISECS(1)
STIME_DELTA_MAX = (1 << 62) - 1


def copy_in(args: list[int], read: Reader) -> list[Span]:
    if args[0] == VcpuOp.initialise:
        return [Span(args[2], VCPU_GUEST_CONTEXT_SIZE)]
    size = _TIMER_STRUCTS.get(args[0] & 0xFFFFFFFF)
    if size is not None:
        return [Span(args[2], size)]
    return []


def _timer_op(call: Call, cmd: int, vid: int) -> int:
    """VCPUOP_{set,stop}_{periodic,singleshot}_timer, in virtual time (``hypervisor/timers.py``)."""
    domid = call.dom.domid
    if cmd == VcpuOp.stop_periodic_timer:
        timers.set_periodic(domid, vid, 0, call.vt_ns)
        call.trace("timer.stop", kind="periodic", target=vid)
        return 0
    if cmd == VcpuOp.set_periodic_timer:
        try:
            (period,) = struct.unpack("<Q", call.mem.read(call.arg(2), 8))
        except GuestFault:
            return -Errno.EFAULT
        if not MIN_PERIOD_NS <= period <= STIME_DELTA_MAX:
            return -Errno.EINVAL
        timers.set_periodic(domid, vid, period, call.vt_ns)
        call.trace("timer.set", kind="periodic", target=vid, period_ns=period)
        return 0
    # the singleshot timer is only the calling vCPU's to set or stop (Xen: v != current is -EINVAL)
    if vid != call.vcpu:
        return -Errno.EINVAL
    if cmd == VcpuOp.stop_singleshot_timer:
        timers.set_singleshot(domid, vid, None)
        call.trace("timer.stop", kind="singleshot", target=vid)
        return 0
    try:
        deadline, flags = struct.unpack("<QI", call.mem.read(call.arg(2), 12))
    except GuestFault:
        return -Errno.EFAULT
    if flags & VCPU_SSHOTTMR_FUTURE and deadline < call.vt_ns:
        return -ETIME
    timers.set_singleshot(domid, vid, deadline)
    call.trace("timer.set", kind="singleshot", target=vid, deadline_ns=deadline)
    return 0


def handle(call: Call) -> int:
    cmd, vid = call.arg(0), call.arg(1)
    if vid >= len(call.dom.vcpus):
        return -Errno.ENOENT
    target = call.dom.vcpus[vid]
    if cmd in (VcpuOp.set_periodic_timer, VcpuOp.stop_periodic_timer, VcpuOp.set_singleshot_timer,
               VcpuOp.stop_singleshot_timer):
        return _timer_op(call, cmd, vid)
    if cmd == VcpuOp.is_up:
        return 1 if target.up else 0
    if cmd == VcpuOp.initialise:
        if target.initialised:
            return -Errno.EEXIST
        try:
            ctx = call.mem.read(call.arg(2) + _USER_REGS, 52)
        except GuestFault:
            return -Errno.EFAULT
        regs = {name: struct.unpack_from("<I", ctx, off)[0] for name, off in _REG_OFFSETS.items()}
        # The guest cannot hand itself privileged flags: IF and IOPL come from the hypervisor.
        regs["eflags"] = (regs["eflags"] & 0x00000CD5) | 0x2
        try:
            callback_eip = call.mem.u32(call.arg(2) + _EVENT_CALLBACK_EIP)
        except GuestFault:
            return -Errno.EFAULT
        target.initialised = True
        call.actions.append(VcpuAction(kind="set_context", vcpu=vid, regs=regs))
        if callback_eip:  # callbacks are per vCPU: a secondary gets its event callback from its first context
            call.actions.append(VcpuAction(kind="set_callback", vcpu=vid, regs={"eip": callback_eip}))
        call.trace("vcpu.initialise", target=vid, eip=regs["eip"], esp=regs["esp"])
        return 0
    if cmd == VcpuOp.up:
        if not target.initialised:
            return -Errno.EINVAL
        if not target.up:
            target.up = True
            call.actions.append(VcpuAction(kind="up", vcpu=vid, regs={}))
            call.trace("vcpu.up", target=vid)
        return 0
    if cmd == VcpuOp.down:
        if target.up:
            target.up = False
            call.actions.append(VcpuAction(kind="down", vcpu=vid, regs={}))
            call.trace("vcpu.down", target=vid)
            if vid == call.vcpu:
                call.deferred = True  # a vCPU that takes itself down returns only when brought up again
        return 0
    return -Errno.ENOSYS
