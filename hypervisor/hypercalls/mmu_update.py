"""mmu_update (1): checked writes of page-table entries at machine addresses, in a batch, as Xen's do_mmu_update.

A request names an entry by machine address. In a frame that is a validated L1 or L2 it is Xen's mod_l1_entry /
mod_l2_entry (``hypervisor/ptops.py``): the new entry is checked and takes its type reference (a writable mapping a
writable one, an L2 entry an L1 one, validating that L1 if it is new, from the frame copied in with the trap), the
old entry's is dropped, and an L2 slot in the hypervisor hole is refused (-EPERM). In any other frame it is a plain
write, as Xen writes a PGT_writable_page (refused, -EINVAL, in a GDT frame, which cannot be typed writable).
MMU_MACHPHYS_UPDATE sets the m2p entry of a frame the domain owns. A PAE domain's entries are 64 bits (8-byte aligned,
-EINVAL otherwise), in 512-entry tables, and a validated L3's slots are mod_l3_entry's; a non-PAE domain's high
32 bits must be 0.

The hypervisor holds no guest RAM, so an accepted update becomes a ``WriteMachine`` effect the domain process
carries out. Requests run in order and the batch stops at the first refusal; the done count reports how many
succeeded either way, as Xen's does. A long batch continues in a later window (``mm.run_batch``), and so does a
request whose frame to validate did not come with the trap.
"""

from __future__ import annotations

import struct

from hypervisor import mm, ptops, ptwr
from hypervisor.hypercalls.base import Call
from hypervisor.pagetypes import PageType, Refused
from pvcluster.abi.errno import Errno
from pvcluster.abi.platform import M2P_ENTRY_BYTES, M2P_FRAME_BASE
from pvcluster.abi.xen import PAGE_SHIFT, PAGE_SIZE, Hypercall, MmuCmd
from pvcluster.bus.effects import WriteMachine

NR = Hypercall.mmu_update


def handle(call: Call) -> int:
    if call.emulated and (refused := ptwr.refuse(call)) is not None:
        return refused
    return mm.run_batch(call, "<QQ", "request-unmapped", lambda c, i, f: _update(c, i, f[0], f[1]),
                        done_on_refusal=True)


def _update(call: Call, i: int, ptr: int, val: int) -> int:
    cmd, addr = ptr & 3, ptr & ~3
    # A machine address past 4 GiB names a frame no domain owns, so it needs no separate check.
    frame = addr >> PAGE_SHIFT
    if cmd == MmuCmd.MACHPHYS_UPDATE:
        return _machphys(call, i, frame, val)
    if cmd not in (MmuCmd.NORMAL_PT_UPDATE, MmuCmd.PT_UPDATE_PRESERVE_AD):
        return mm.deny(call, Errno.ENOSYS, "unknown-cmd", index=i, cmd=cmd)
    if not mm.owned(call.dom, frame):
        return mm.deny(call, Errno.EPERM, "pte-frame-not-owned", index=i, addr=addr)
    frames = call.dom.frames
    if val >> 32 and not frames.pae:
        return mm.deny(call, Errno.EINVAL, "pte-high-bits", index=i, val=val)  # non-PAE entries are 32 bits
    if frames.pae and addr % 8:
        return mm.deny(call, Errno.EINVAL, "pte-misaligned", index=i, addr=addr)
    try:
        if frames.level(frame):
            val = _mod_entry(call, frame, (addr % PAGE_SIZE) >> frames.entry_shift, val)
        elif frames.type_of(frame) is PageType.SEG_DESC:  # get_page_type(PGT_writable_page) fails
            return mm.deny(call, Errno.EINVAL, "pte-frame-is-descriptor-table", index=i, addr=addr)
    except Refused as r:
        return mm.refused(call, r, index=i)
    # PRESERVE_AD is a plain write here: the hypervisor cannot see the old entry's accessed/dirty bits.
    call.effects.append(WriteMachine(addr=addr, data=struct.pack("<Q" if frames.pae else "<I", val)))
    call.trace("mmu.update", cmd=MmuCmd(cmd).name, addr=addr, val=val, level=frames.level(frame) or 0)
    return 0


def _mod_entry(call: Call, frame: int, slot: int, val: int) -> int:
    """ptops.mod_entry, or for an emulated PAE upper-half write it refuses, the fixed-up entry's (``ptwr``): the
    entry written. Raises Refused."""
    frames = call.dom.frames
    try:
        ptops.mod_entry(frames, frame, slot, val, call.mem.table)
        return val
    except Refused:
        fixed = ptwr.upper_half_fixup(call, val)
        if fixed is None:
            raise
    ptops.mod_entry(frames, frame, slot, fixed, call.mem.table)
    return fixed


def _machphys(call: Call, i: int, mfn: int, gpfn: int) -> int:
    """MMU_MACHPHYS_UPDATE, as Xen's for a PV guest: the m2p entry of a frame the domain owns becomes ``gpfn``
    (set_gpfn_from_mfn; an unsigned long on x86-32). The m2p lives in the hypervisor's frames after the domain's
    RAM, which the domain process holds: a ``WriteMachine`` there. A frame not the domain's: get_page_from_mfn
    fails, -EINVAL."""
    if not mm.owned(call.dom, mfn):
        return mm.deny(call, Errno.EINVAL, "machphys-frame-not-owned", index=i, mfn=mfn)
    addr = (call.dom.nr_pages + M2P_FRAME_BASE) * PAGE_SIZE + mfn * M2P_ENTRY_BYTES
    call.effects.append(WriteMachine(addr=addr, data=struct.pack("<I", gpfn & 0xFFFFFFFF)))
    call.trace("mmu.update", cmd=MmuCmd.MACHPHYS_UPDATE.name, mfn=mfn, pfn=gpfn)
    return 0
