"""set_gdt (2): install the calling vCPU's GDT, as Xen 4.17's compat_set_gdt / pv_set_gdt
(xen/arch/x86/pv/descriptor-tables.c).

Args: a guest array of 32-bit frame numbers, and the number of entries (at most FIRST_RESERVED_GDT_ENTRY: Xen's own
entries follow the guest's). Each frame must be the domain's own and typable as a descriptor table (not a pinned
page table); the frames are then typed (``Frames.seg_desc``) so that they can be neither mapped writable nor pinned
while in use, and the old GDT's frames are released. Every refusal is -EINVAL, a frame list the guest cannot read
-EFAULT. The domain process records the GDT on the vCPU (``SetGdt``) and flushes its TLB, as Xen's
flush_tlb_local.
"""

from __future__ import annotations

from hypervisor import mm
from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
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
        # get_page_from_gfn fails for a frame not the domain's; get_page_type(PGT_seg_desc_page) for a page table
        if not mm.owned(call.dom, mfn):
            return mm.deny(call, Errno.EINVAL, "gdt-frame-not-owned", mfn=mfn)
        if call.dom.frames.is_pinned(mfn):
            return mm.deny(call, Errno.EINVAL, "gdt-frame-is-pagetable", mfn=mfn)
    install(call, frames, entries)
    return 0


def install(call: Call, frames: list[int], entries: int) -> None:
    """Xen's pv_destroy_gdt then the new GDT's install: the old frames lose their type, the new ones take it."""
    vcpu = call.dom.vcpus[call.vcpu]
    for mfn in vcpu.gdt_frames:
        call.dom.frames.drop_seg_desc(mfn)
    for mfn in frames:
        call.dom.frames.use_seg_desc(mfn)
    vcpu.gdt_frames, vcpu.gdt_ents = tuple(frames), entries
    call.effects += [SetGdt(vcpu=call.vcpu, frames=list(frames), entries=entries), FlushTlb(vcpu=call.vcpu)]
    call.trace("desc.set_gdt", frames=list(frames), entries=entries)
