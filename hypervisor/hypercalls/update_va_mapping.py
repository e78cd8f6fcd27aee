"""update_va_mapping (14): set the L1 entry that maps one virtual address, then flush TLBs as asked.

The hypervisor cannot walk the guest's page tables (it holds no guest RAM), so it checks the new entry and leaves
finding and writing it to the domain process (a ``set_va_pte`` action), followed by the requested flushes.
Everything is checked before any action is emitted, so a refused call changes nothing (Xen writes the entry
before it reads the flush bitmap).
"""

from __future__ import annotations

from hypervisor import mm
from hypervisor.guestmem import GuestFault, Span
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import Hypercall
from pvcluster.bus.messages import VcpuAction

NR = Hypercall.update_va_mapping


# Flag values (xen.h): the low two bits are the flush kind, the rest the scope (UVMF_MULTI is LOCAL plus a
# bitmap pointer in the same bits).
UVMF_NONE = 0
UVMF_TLB_FLUSH = 1
UVMF_INVLPG = 2
UVMF_FLUSHTYPE_MASK = 3
UVMF_LOCAL = 0
UVMF_ALL = 4


def _bitmap_ptr(flags: int) -> int | None:
    """The vCPU bitmap pointer of a MULTI flush, as Xen reads it: ``flags & ~3`` unless that is LOCAL or ALL.
    (A 4-aligned bitmap may have bit 2 set, so bit 2 alone does not mean ALL.)"""
    if flags & UVMF_FLUSHTYPE_MASK not in (UVMF_TLB_FLUSH, UVMF_INVLPG):
        return None
    scope = flags & ~UVMF_FLUSHTYPE_MASK
    return None if scope in (UVMF_LOCAL, UVMF_ALL) else scope


def copy_in(args: list[int], read: Reader) -> list[Span]:
    ptr = _bitmap_ptr(args[3] & 0xFFFFFFFF)
    return [] if ptr is None else [Span(ptr, 4)]


def handle(call: Call) -> int:
    va, lo, hi, flags = (call.arg(i) for i in range(4))
    kind = flags & UVMF_FLUSHTYPE_MASK
    if hi:
        return mm.deny(call, Errno.EINVAL, "pte-high-bits", va=va, hi=hi)  # non-PAE entries are 32 bits
    if kind == UVMF_FLUSHTYPE_MASK:
        return mm.deny(call, Errno.EINVAL, "bad-flush-type", flags=flags)
    if lo & mm.PTE_PRESENT:
        frame = mm.pte_frame(lo)
        if not mm.mappable(call.dom, frame):
            return mm.deny(call, Errno.EPERM, "maps-unowned-frame", va=va, mfn=frame)
        # The entry for a va is always an L1 entry, so a writable one maps its frame as data.
        if lo & mm.PTE_RW and mm.is_pinned(call.dom, frame):
            return mm.deny(call, Errno.EPERM, "writable-pagetable", va=va, mfn=frame)
    targets: list[int] = []
    if kind != UVMF_NONE:
        ptr = _bitmap_ptr(flags)
        if ptr is not None:
            try:
                mask = call.mem.u32(ptr)
            except GuestFault:
                return mm.deny(call, Errno.EFAULT, "vcpumask-unmapped", addr=ptr)
            named = mm.vcpus_in_mask(call.dom, mask)
            if named is None:
                return mm.deny(call, Errno.EINVAL, "vcpumask-bad-vcpu", mask=mask)
            targets = named
        elif flags & ~UVMF_FLUSHTYPE_MASK == UVMF_ALL:
            targets = list(range(len(call.dom.vcpus)))
        else:
            targets = [call.vcpu]
    call.actions.append(VcpuAction(kind="set_va_pte", vcpu=call.vcpu, regs={"va": va, "value": lo}))
    call.actions.extend(mm.flush_actions(targets, va if kind == UVMF_INVLPG else None))
    call.trace("mmu.update_va", va=va, val=lo, flush=kind, targets=targets)
    return 0
