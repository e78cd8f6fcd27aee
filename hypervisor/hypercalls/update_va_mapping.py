"""update_va_mapping (14): set the L1 entry that maps one virtual address, then flush TLBs as asked, as Xen's
do_update_va_mapping.

The hypervisor cannot walk the guest's page tables (it holds no guest RAM): the domain process's walk of ``va``
comes with the trap (the copy-in's zero-length span), and names the L1 entry. That L1 must be a validated L1
(-EINVAL otherwise, as Xen's check of the page found through guest_table, and when the PDE is not present), and the
update is Xen's mod_l1_entry on it (``ptops.mod_entry``): a writable mapping of a page table or a GDT frame is
-EBUSY. For a PAE guest the entry is 64 bits, passed as (va, low word, high word, flags), as Xen's
do_update_va_mapping takes it on x86-32 PAE (and Linux's HYPERVISOR_update_va_mapping splits it); a non-PAE guest's
high word must be 0. The domain process then writes the entry (a ``SetVaPte`` effect), followed by the requested
flushes. Everything is checked before any effect is emitted, so a refused call changes nothing (Xen writes the
entry before it reads the flush bitmap). A hand-made call without the walk gets the entry's checks without type
references.
"""

from __future__ import annotations

from hypervisor import mm, ptops
from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from hypervisor.pagetypes import Refused
from pvcluster.abi.errno import Errno
from pvcluster.abi.structs import uvmf_bitmap_ptr
from pvcluster.abi.xen import PAGE_SHIFT, PAGE_SIZE, UVMF_ALL, UVMF_FLUSHTYPE_MASK, UVMF_INVLPG, UVMF_NONE, Hypercall
from pvcluster.bus.effects import SetVaPte

NR = Hypercall.update_va_mapping


def handle(call: Call) -> int:
    va, lo, hi, flags = (call.arg(i) for i in range(4))
    kind = flags & UVMF_FLUSHTYPE_MASK
    if hi and not call.dom.pae:
        return mm.deny(call, Errno.EINVAL, "pte-high-bits", va=va, hi=hi)  # non-PAE entries are 32 bits
    val = lo | hi << 32  # PAE: the 64-bit entry in two argument registers (xen.h's HYPERVISOR_update_va_mapping)
    if kind == UVMF_FLUSHTYPE_MASK:
        return mm.deny(call, Errno.EINVAL, "bad-flush-type", flags=flags)
    targets = _targets(call, flags, kind)
    if isinstance(targets, int):
        return targets
    rc = _set_entry(call, va, val)
    if rc:
        return rc
    call.effects.append(SetVaPte(vcpu=call.vcpu, va=va, value=val))
    call.effects.extend(mm.flush_effects(targets, va if kind == UVMF_INVLPG else None))
    call.trace("mmu.update_va", va=va, val=val, flush=kind, targets=targets)
    return 0


def _set_entry(call: Call, va: int, val: int) -> int:
    """mod_l1_entry on the L1 entry that maps ``va``: 0, or the refusal's negated errno. The walk is the PDE's and
    PTE's addresses, or for PAE the L3 entry's, the L2 entry's and the PTE's."""
    frames = call.dom.frames
    walk = call.mem.translation(va)
    levels = 3 if frames.pae else 2
    try:
        if walk is None:
            frames.check_l1e(val)
            return 0
        if len(walk) < levels:
            return mm.deny(call, Errno.EINVAL, "va-pde-not-present", va=va)
        pte_at = walk[levels - 1]
        l1 = pte_at >> PAGE_SHIFT
        if frames.level(l1) != 1:
            return mm.deny(call, Errno.EINVAL, "va-l1-not-a-pagetable", va=va, mfn=l1)
        ptops.mod_entry(frames, l1, (pte_at % PAGE_SIZE) >> frames.entry_shift, val, call.mem.table)
    except Refused as r:
        return mm.refused(call, r, va=va)
    return 0


def _targets(call: Call, flags: int, kind: int) -> list[int] | int:
    """The vCPUs to flush, or a refusal's negated errno (the bitmap unreadable or naming a vCPU the domain lacks)."""
    if kind == UVMF_NONE:
        return []
    ptr = uvmf_bitmap_ptr(flags)
    if ptr is not None:
        try:
            mask = call.mem.u32(ptr)
        except GuestFault:
            return mm.deny(call, Errno.EFAULT, "vcpumask-unmapped", addr=ptr)
        named = mm.vcpus_in_mask(call.dom, mask)
        if named is None:
            return mm.deny(call, Errno.EINVAL, "vcpumask-bad-vcpu", mask=mask)
        return named
    if flags & ~UVMF_FLUSHTYPE_MASK == UVMF_ALL:
        return list(range(len(call.dom.vcpus)))
    return [call.vcpu]

