"""vcpu_op (24): bring secondary vCPUs up and down, ask whether one is up, and drive its timers."""

from __future__ import annotations

import struct

from hypervisor import timers
from hypervisor.descriptors import fixup_selector
from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from pvcluster.abi import layouts, structs
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import TRAP_INFO_SIZE, VCPU_SSHOTTMR_FUTURE, Hypercall, VcpuOp
from pvcluster.bus.effects import (
    SetCallback,
    SetContext,
    SetKernelStack,
    SetTrapTable,
    VcpuDown,
    VcpuRegs,
    VcpuUp,
)

NR = Hypercall.vcpu_op

MIN_PERIOD_NS = 1_000_000  # Xen refuses periods under MILLISECS(1)
STIME_DELTA_MAX = (1 << 62) - 1
# EFLAGS bits a guest may hand a new vCPU: the arithmetic flags and DF; IF and IOPL come from the hypervisor.
_GUEST_EFLAGS = 0x00000CD5
_TRAP_CTXT_ENTRIES = 256  # vcpu_guest_context.trap_ctxt: one struct trap_info per vector
_TIMER_OPS = (VcpuOp.set_periodic_timer, VcpuOp.stop_periodic_timer, VcpuOp.set_singleshot_timer,
              VcpuOp.stop_singleshot_timer)


def _timer_op(call: Call, cmd: int, vid: int) -> int:
    """VCPUOP_{set,stop}_{periodic,singleshot}_timer, in virtual time (``hypervisor/timers.py``)."""
    target = call.dom.vcpus[vid]
    if cmd == VcpuOp.stop_periodic_timer:
        timers.set_periodic(target, 0, call.vt_ns)
        call.trace("timer.stop", kind="periodic", target=vid)
        return 0
    if cmd == VcpuOp.set_periodic_timer:
        try:
            (period,) = struct.unpack("<Q", call.mem.read(call.arg(2), 8))
        except GuestFault:
            return -Errno.EFAULT
        if not MIN_PERIOD_NS <= period <= STIME_DELTA_MAX:
            return -Errno.EINVAL
        timers.set_periodic(target, period, call.vt_ns)
        call.trace("timer.set", kind="periodic", target=vid, period_ns=period)
        return 0
    # the singleshot timer is only the calling vCPU's to set or stop (Xen: v != current is -EINVAL)
    if vid != call.vcpu:
        return -Errno.EINVAL
    if cmd == VcpuOp.stop_singleshot_timer:
        target.timers.singleshot = None
        call.trace("timer.stop", kind="singleshot", target=vid)
        return 0
    try:
        raw, flags = struct.unpack("<QI", call.mem.read(call.arg(2), 12))
    except GuestFault:
        return -Errno.EFAULT
    deadline = timers.guest_deadline(raw, call.vt_ns)  # Xen's set_timer reads the u64 as s_time_t
    if flags & VCPU_SSHOTTMR_FUTURE and deadline is not None and deadline < call.vt_ns:
        return -Errno.ETIME
    target.timers.singleshot = deadline
    call.trace("timer.set", kind="singleshot", target=vid, deadline_ns=raw)
    return 0


def _initialise(call: Call, vid: int) -> int:
    target = call.dom.vcpus[vid]
    if target.initialised:
        return -Errno.EEXIST
    base = call.arg(2)
    lay = layouts.VCPU_GUEST_CONTEXT
    try:
        ctx = call.mem.read(base + lay.offset("user_regs"), structs.VCPUGCTX_USER_REGS_SPAN)
        callback_eip = call.mem.u32(base + lay.offset("event_callback_eip"))
        trap_ctxt = call.mem.read(base + lay.offset("trap_ctxt"), _TRAP_CTXT_ENTRIES * TRAP_INFO_SIZE)
        kernel_ss = call.mem.u32(base + lay.offset("kernel_ss"))
        kernel_sp = call.mem.u32(base + lay.offset("kernel_sp"))
    except GuestFault:
        return -Errno.EFAULT
    regs = {name: struct.unpack_from("<I", ctx, off)[0] for name, off in structs.CPU_USER_REGS_OFFSETS.items()}
    regs["eflags"] = (regs["eflags"] & _GUEST_EFLAGS) | 0x2
    target.initialised = True
    call.effects.append(SetContext(vcpu=vid, regs=VcpuRegs(**regs)))
    if callback_eip:  # callbacks are per vCPU: a secondary gets its event callback from its first context
        call.effects.append(SetCallback(vcpu=vid, eip=callback_eip))
    # arch_set_info_guest: the context's virtual IDT (indexed by vector) and kernel stack, selectors raised to ring 1
    traps = [[vector, flags, fixup_selector(cs), address]
             for vector, (_, flags, cs, address) in enumerate(struct.iter_unpack("<BBHI", trap_ctxt)) if address]
    target.kernel_ss, target.kernel_sp = fixup_selector(kernel_ss & 0xFFFF), kernel_sp
    call.effects += [SetTrapTable(vcpu=vid, traps=traps, clear=True),
                     SetKernelStack(vcpu=vid, ss=target.kernel_ss, esp=kernel_sp)]
    call.trace("vcpu.initialise", target=vid, eip=regs["eip"], esp=regs["esp"])
    return 0


def handle(call: Call) -> int:
    cmd, vid = call.arg(0), call.arg(1)
    if vid >= len(call.dom.vcpus):
        return -Errno.ENOENT
    target = call.dom.vcpus[vid]
    if cmd in _TIMER_OPS:
        return _timer_op(call, cmd, vid)
    if cmd == VcpuOp.is_up:
        return 1 if target.up else 0
    if cmd == VcpuOp.initialise:
        return _initialise(call, vid)
    if cmd == VcpuOp.up:
        if not target.initialised:
            return -Errno.EINVAL
        if not target.up:
            target.up = True
            call.effects.append(VcpuUp(vcpu=vid))
            call.trace("vcpu.up", target=vid)
        return 0
    if cmd == VcpuOp.down:
        if target.up:
            target.up = False
            call.effects.append(VcpuDown(vcpu=vid))
            call.trace("vcpu.down", target=vid)
            if vid == call.vcpu:
                call.deferred = True  # a vCPU that takes itself down returns only when brought up again
        return 0
    return -Errno.ENOSYS
