"""vm_assist (21): enable or disable a VMASST_TYPE_* assist for the calling domain, as Xen 4.17's do_vm_assist
(xen/common/domain.c) with arch_vm_assist_valid_mask for a 32-bit PV domain (PV32_VM_ASSIST_MASK).

Args: cmd, type. A type outside the mask (m2p_strict, which is 64-bit only, among them) is -EINVAL, checked before
the command; a command other than VMASST_CMD_enable / disable is -ENOSYS. The domain's assist bits are recorded
(``Domain.vm_assist``); none changes what this hypervisor does yet (see the README's list of what is modelled).
"""

from __future__ import annotations

from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import (
    PV32_VM_ASSIST_MASK,
    VM_ASSIST_BITS_PER_LONG,
    Hypercall,
    VMASST_CMD_disable,
    VMASST_CMD_enable,
)

NR = Hypercall.vm_assist


def handle(call: Call) -> int:
    cmd, kind = call.arg(0), call.arg(1)
    if kind >= VM_ASSIST_BITS_PER_LONG or not PV32_VM_ASSIST_MASK >> kind & 1:
        call.trace("vm_assist.denied", cmd=cmd, type=kind, errno=Errno.EINVAL.name)
        return -Errno.EINVAL
    if cmd == VMASST_CMD_enable:
        call.dom.vm_assist |= 1 << kind
    elif cmd == VMASST_CMD_disable:
        call.dom.vm_assist &= ~(1 << kind)
    else:
        call.trace("vm_assist.denied", cmd=cmd, type=kind, errno=Errno.ENOSYS.name)
        return -Errno.ENOSYS
    call.trace("vm_assist", cmd=cmd, type=kind, assists=call.dom.vm_assist)
    return 0
