"""stack_switch (3): the ring-1 stack a ring 3 -> 1 transition lands on, as Xen 4.17's do_stack_switch
(xen/arch/x86/pv/misc-hypercalls.c).

Args: ss, esp. Xen never refuses: fixup_guest_stack_selector raises an RPL below the guest kernel's ring (1) to
it, then both are recorded as the vCPU's kernel_ss / kernel_sp; it returns 0. The domain process, which bounces a
trap from ring 3 onto that stack (``domains/traps.py``), gets them as a ``SetKernelStack``.
"""

from __future__ import annotations

from hypervisor.descriptors import fixup_selector
from hypervisor.hypercalls.base import Call
from pvcluster.abi.xen import Hypercall
from pvcluster.bus.effects import SetKernelStack

NR = Hypercall.stack_switch


def handle(call: Call) -> int:
    ss, esp = call.arg(0), call.arg(1)
    vcpu = call.dom.vcpus[call.vcpu]
    vcpu.kernel_ss, vcpu.kernel_sp = fixup_selector(ss), esp
    call.effects.append(SetKernelStack(vcpu=call.vcpu, ss=vcpu.kernel_ss, esp=esp))
    call.trace("desc.stack_switch", ss=ss, kernel_ss=vcpu.kernel_ss, esp=esp)
    return 0
