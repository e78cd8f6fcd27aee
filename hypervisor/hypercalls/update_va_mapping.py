"""update_va_mapping (14): set the L1 entry that maps one virtual address, then flush TLBs as asked.

The hypervisor cannot walk the guest's page tables (it holds no guest RAM), so it checks the new entry and leaves
finding and writing it to the domain process (a ``SetVaPte`` effect), followed by the requested flushes.
Everything is checked before any effect is emitted, so a refused call changes nothing (Xen writes the entry
before it reads the flush bitmap).
"""

from __future__ import annotations

from hypervisor import mm
from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.structs import uvmf_bitmap_ptr
from pvcluster.abi.x86 import PTE_PRESENT, PTE_RW
from pvcluster.abi.xen import UVMF_ALL, UVMF_FLUSHTYPE_MASK, UVMF_INVLPG, UVMF_NONE, Hypercall
from pvcluster.bus.effects import SetVaPte

NR = Hypercall.update_va_mapping


def handle(call: Call) -> int:
    va, lo, hi, flags = (call.arg(i) for i in range(4))
    kind = flags & UVMF_FLUSHTYPE_MASK
    if hi:
        return mm.deny(call, Errno.EINVAL, "pte-high-bits", va=va, hi=hi)  # non-PAE entries are 32 bits
    if kind == UVMF_FLUSHTYPE_MASK:
        return mm.deny(call, Errno.EINVAL, "bad-flush-type", flags=flags)
    if lo & PTE_PRESENT:
        frame = mm.pte_frame(lo)
        if not mm.mappable(call.dom, frame):
            return mm.deny(call, Errno.EPERM, "maps-unowned-frame", va=va, mfn=frame)
        # The entry for a va is always an L1 entry, so a writable one maps its frame as data.
        if lo & PTE_RW and (why := call.dom.frames.write_protected(frame)):
            return mm.deny(call, Errno.EPERM, why, va=va, mfn=frame)
    targets: list[int] = []
    if kind != UVMF_NONE:
        ptr = uvmf_bitmap_ptr(flags)
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
    call.effects.append(SetVaPte(vcpu=call.vcpu, va=va, value=lo))
    call.effects.extend(mm.flush_effects(targets, va if kind == UVMF_INVLPG else None))
    call.trace("mmu.update_va", va=va, val=lo, flush=kind, targets=targets)
    return 0
