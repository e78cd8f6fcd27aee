"""set_gdt (2): install the calling vCPU's GDT, as Xen 4.17's compat_set_gdt / pv_set_gdt
(xen/arch/x86/pv/descriptor-tables.c).

Args: a guest array of 32-bit frame numbers, and the number of entries (at most FIRST_RESERVED_GDT_ENTRY: Xen's own
entries follow the guest's). Each frame must be the domain's own and typable as a descriptor table (not a pinned
page table, not mapped writable: Xen's get_page_and_type(PGT_seg_desc_page)); each takes a seg_desc type reference
(``pagetypes.Frames``) so that it can be neither mapped writable nor pinned while in use, and the old GDT's frames
drop theirs. Every refusal is -EINVAL, a frame list the guest cannot read
-EFAULT. The domain process records the GDT on the vCPU (``SetGdt``) and flushes its TLB, as Xen's
flush_tlb_local.
"""

from __future__ import annotations

from hypervisor import mm
from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from hypervisor.pagetypes import PageType, Refused
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import FIRST_RESERVED_GDT_ENTRY, GDT_ENTRIES_PER_FRAME, Hypercall
from pvcluster.bus.effects import FlushTlb, SetGdt

NR = Hypercall.set_gdt


def nr_frames(entries: int) -> int:
    """DIV_ROUND_UP(entries, 512): the frames ``entries`` descriptors span."""
    return -(-entries // GDT_ENTRIES_PER_FRAME)


def handle(call: Call) -> int:
    frame_list, entries = call.arg(0), call.arg(1)
    if entries > FIRST_RESERVED_GDT_ENTRY:  # checked before the copy, so the list it reads is bounded
        return mm.deny(call, Errno.EINVAL, "gdt-too-many-entries", entries=entries)
    try:
        frames = [call.mem.u32(frame_list + 4 * i) for i in range(nr_frames(entries))]
    except GuestFault:
        return mm.deny(call, Errno.EFAULT, "gdt-frame-list-unmapped", addr=frame_list)
    for mfn in frames:
        # get_page_from_gfn fails for a frame not the domain's
        if not mm.owned(call.dom, mfn):
            return mm.deny(call, Errno.EINVAL, "gdt-frame-not-owned", mfn=mfn)
    taken: list[int] = []
    for mfn in frames:  # get_page_and_type(PGT_seg_desc_page) for each, all or none
        try:
            call.dom.frames.get_type(mfn, PageType.SEG_DESC)
        except Refused:
            held = call.dom.frames.type_of(mfn)
            for done in taken:
                call.dom.frames.put_type(done)
            why = "gdt-frame-mapped-writable" if held is PageType.WRITABLE else "gdt-frame-is-pagetable"
            return mm.deny(call, Errno.EINVAL, why, mfn=mfn, type=held.value)
        taken.append(mfn)
    install(call, frames, entries)
    return 0


def install(call: Call, frames: list[int], entries: int) -> None:
    """Xen's pv_destroy_gdt then the new GDT's install: the old frames drop their seg_desc references (the new ones
    hold theirs already)."""
    vcpu = call.dom.vcpus[call.vcpu]
    for mfn in vcpu.gdt_frames:
        call.dom.frames.put_type(mfn)
    vcpu.gdt_frames, vcpu.gdt_ents = tuple(frames), entries
    call.effects += [SetGdt(vcpu=call.vcpu, frames=list(frames), entries=entries), FlushTlb(vcpu=call.vcpu)]
    call.trace("desc.set_gdt", frames=list(frames), entries=entries)
