"""callback_op (30): register the guest's event upcall entry point (and accept a failsafe callback).

Callbacks are per vCPU in Xen, so registering the event callback becomes a ``SetCallback`` effect on the calling
vCPU, which the domain process enters when it delivers an event upcall. The failsafe callback (entered when Xen
cannot restore guest segment state on return) has nothing to trigger it here: it is accepted and traced.

Return codes are those of Xen's compat path, which is what a 32-bit PV guest meets on a 64-bit Xen: a type Xen does
not know is -ENOSYS; the syscall32 / sysenter / NMI callbacks, which this hypervisor does not deliver, are refused
with -ENOSYS too (Linux then falls back: it clears X86_FEATURE_SEP when sysenter registration fails); the event and
failsafe callbacks cannot be unregistered (-EINVAL); an unknown command is -EINVAL.
"""

from __future__ import annotations

import struct

from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.structs import CALLBACKOP_SIZE
from pvcluster.abi.xen import CALLBACKF_MASK_EVENTS, CallbackOp, CallbackType, Hypercall
from pvcluster.bus.effects import SetCallback

NR = Hypercall.callback_op


def handle(call: Call) -> int:
    cmd, ptr = call.arg(0), call.arg(1)
    size = CALLBACKOP_SIZE.get(cmd)
    if size is None:
        return _deny(call, Errno.EINVAL, "unsupported-cmd", cmd=cmd)
    try:
        raw = call.mem.read(ptr, size)
    except GuestFault:
        return _deny(call, Errno.EFAULT, "struct-unmapped", addr=ptr)
    if cmd == CallbackOp.register:
        kind, flags, cs, eip = struct.unpack("<HHII", raw)
        return register(call, kind, flags, cs, eip)
    (kind,) = struct.unpack_from("<H", raw)
    if kind in (CallbackType.event, CallbackType.failsafe, CallbackType.syscall32, CallbackType.sysenter):
        return _deny(call, Errno.EINVAL, "cannot-unregister", type=kind)
    if kind == CallbackType.nmi:
        call.trace("callback.unregister", type="nmi")  # never registered here: nothing to undo
        return 0
    return _deny(call, Errno.ENOSYS, "unknown-type", type=kind)


def register(call: Call, kind: int, flags: int, cs: int, eip: int) -> int:
    """Register one callback for the calling vCPU (shared with set_callbacks)."""
    if kind == CallbackType.event:
        call.effects.append(SetCallback(vcpu=call.vcpu, eip=eip))
        call.trace("callback.register", type="event", cs=cs, eip=eip)
        return 0
    if kind == CallbackType.failsafe:
        call.trace(
            "callback.register", type="failsafe", cs=cs, eip=eip, mask_events=bool(flags & CALLBACKF_MASK_EVENTS)
        )
        return 0
    if kind in CallbackType._value2member_map_:
        return _deny(call, Errno.ENOSYS, "type-not-modelled", type=CallbackType(kind).name, eip=eip)
    return _deny(call, Errno.ENOSYS, "unknown-type", type=kind)


def _deny(call: Call, err: Errno, reason: str, **fields: object) -> int:
    call.trace("callback.denied", reason=reason, errno=err.name, **fields)
    return -err
