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
    multicall,
    sched_op,
    set_callbacks,
    set_timer_op,
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
        multicall,
        event_channel_op,
        callback_op,
        set_callbacks,
        set_timer_op,
    )
}

# Copying in is capped, whatever a family asks for, so a hostile length cannot balloon a message: each span at
# MAX_COPY_IN, and all the spans of one trap together at MAX_COPY_IN_TOTAL (a multicall names the buffers of up
# to 512 entries). Spans past the total are dropped in order, so the first ones (a multicall's entry array) stay;
# a dropped span reads as unmapped, -EFAULT for whatever needed it.
MAX_COPY_IN = 64 * 1024
MAX_COPY_IN_TOTAL = 256 * 1024


def copy_in(nr: int, args: list[int], read: Reader) -> list[Span]:
    family = FAMILIES.get(nr)
    if family is None:
        return []
    spans: list[Span] = family.copy_in(args, read)
    kept: list[Span] = []
    total = 0
    for s in spans:
        if 0 < s.length <= MAX_COPY_IN and total + s.length <= MAX_COPY_IN_TOTAL:
            kept.append(s)
            total += s.length
    return kept


def dispatch(call: Call) -> int:
    family = FAMILIES.get(call.nr)
    if family is None:
        return -Errno.ENOSYS
    result: int = family.handle(call)
    return result


__all__ = ["FAMILIES", "Call", "copy_in", "dispatch"]
