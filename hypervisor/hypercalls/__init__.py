"""Hypercall dispatch, keyed by the real Xen hypercall numbers.

What happens on hypercall N lives in one module, ``hypervisor/hypercalls/<family>.py``, whose ``handle`` does the
work and returns the value the guest sees in EAX. What the call copies in from guest memory before it crosses the
bus is ABI knowledge shared with the domain process: ``pvcluster/abi/copyin.py``.

The spec's hypercall extensions (``hypervisor/extensions.py``) are looked up first, on the calling hypervisor's own
table: an extension may add a number, and replace a built-in one only when its spec table says ``override``.
"""

from __future__ import annotations

from collections.abc import Callable

from hypervisor import extensions
from hypervisor.hypercalls import (
    callback_op,
    console_io,
    event_channel_op,
    fpu_taskswitch,
    grant_table_op,
    kexec_op,
    memory_op,
    mmu_update,
    mmuext_op,
    multicall,
    sched_op,
    set_callbacks,
    set_gdt,
    set_timer_op,
    set_trap_table,
    stack_switch,
    update_descriptor,
    update_va_mapping,
    vcpu_op,
    vm_assist,
    xen_version,
)
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno

Handler = Callable[[Call], int]

FAMILIES: dict[int, Handler] = {
    int(m.NR): m.handle
    for m in (
        console_io,
        xen_version,
        sched_op,
        vcpu_op,
        mmu_update,
        update_va_mapping,
        mmuext_op,
        multicall,
        event_channel_op,
        callback_op,
        set_callbacks,
        set_timer_op,
        memory_op,
        grant_table_op,
        set_gdt,
        set_trap_table,
        stack_switch,
        fpu_taskswitch,
        update_descriptor,
        vm_assist,
        kexec_op,
    )
}


def dispatch(call: Call) -> int:
    family = call.hv.extensions.families.get(call.nr)
    if family is not None:
        return extensions.run(family, call)
    handle = FAMILIES.get(call.nr)
    if handle is None:
        return -Errno.ENOSYS
    return handle(call)


__all__ = ["FAMILIES", "Call", "dispatch"]
