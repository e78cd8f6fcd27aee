"""Hypercall dispatch, keyed by the real Xen hypercall numbers.

What happens on hypercall N lives in one module, ``hypervisor/hypercalls/<family>.py``: its ``copy_in`` names
the guest buffers the call reads or writes (the domain process copies them in before the call crosses the bus)
and its ``handle`` does the work and returns the value the guest sees in EAX.
"""

from __future__ import annotations

from types import ModuleType

from hypervisor.guestmem import Span
from hypervisor.hypercalls import (
    callback_op,
    console_io,
    event_channel_op,
    mmu_update,
    mmuext_op,
    sched_op,
    set_callbacks,
    update_va_mapping,
    vcpu_op,
    xen_version,
)
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.errno import Errno

FAMILIES: dict[int, ModuleType] = {
    int(m.NR): m
    for m in (
        console_io,
        xen_version,
        sched_op,
        vcpu_op,
        mmu_update,
        update_va_mapping,
        mmuext_op,
        event_channel_op,
        callback_op,
        set_callbacks,
    )
}

# Copying in is capped per call, whatever a family asks for, so a hostile length cannot balloon a message.
MAX_COPY_IN = 64 * 1024


def copy_in(nr: int, args: list[int], read: Reader) -> list[Span]:
    family = FAMILIES.get(nr)
    if family is None:
        return []
    spans: list[Span] = family.copy_in(args, read)
    return [s for s in spans if 0 < s.length <= MAX_COPY_IN]


def dispatch(call: Call) -> int:
    family = FAMILIES.get(call.nr)
    if family is None:
        return -Errno.ENOSYS
    result: int = family.handle(call)
    return result


__all__ = ["FAMILIES", "Call", "copy_in", "dispatch"]
