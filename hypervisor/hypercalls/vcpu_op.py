"""vcpu_op (24): bring secondary vCPUs up and down and ask whether one is up."""

from __future__ import annotations

import struct

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


def copy_in(args: list[int], read: Reader) -> list[Span]:
    if args[0] == VcpuOp.initialise:
        return [Span(args[2], VCPU_GUEST_CONTEXT_SIZE)]
    return []


def handle(call: Call) -> int:
    cmd, vid = call.arg(0), call.arg(1)
    if vid >= len(call.dom.vcpus):
        return -Errno.ENOENT
    target = call.dom.vcpus[vid]
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
