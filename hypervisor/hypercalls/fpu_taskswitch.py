"""fpu_taskswitch (5): set or clear the calling vCPU's CR0.TS, as Xen 4.17's do_fpu_taskswitch
(xen/arch/x86/pv/misc-hypercalls.c).

Arg: ``int set``; any non-zero value sets TS (the guest's next FPU instruction raises #NM), zero clears it. Always
returns 0. Xen keeps it in the vCPU's virtual CR0 (arch.pv.ctrlreg[0]); here the hypervisor records it and the
domain process sets the bit in the vCPU's CR0 (``SetTs``), which the guest, running in ring 0 here, can read.
"""

from __future__ import annotations

from hypervisor.hypercalls.base import Call
from pvcluster.abi.xen import Hypercall
from pvcluster.bus.effects import SetTs

NR = Hypercall.fpu_taskswitch


def handle(call: Call) -> int:
    ts = call.arg(0) != 0
    call.dom.vcpus[call.vcpu].cr0_ts = ts
    call.effects.append(SetTs(vcpu=call.vcpu, ts=ts))
    call.trace("fpu.taskswitch", ts=ts)
    return 0
