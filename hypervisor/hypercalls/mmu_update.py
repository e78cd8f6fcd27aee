"""mmu_update (1): checked writes of page-table entries at machine addresses, in a batch.

The hypervisor holds no guest RAM, so an accepted update becomes a ``WriteMachine`` effect the domain process
carries out. Requests run in order and the batch stops at the first refusal; the done count reports how many
succeeded either way, as Xen's does. A long batch continues in a later window (``mm.run_batch``).
"""

from __future__ import annotations

import struct

from hypervisor import mm, ptwr
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.x86 import PTE_PRESENT, PTE_PSE, PTE_RW
from pvcluster.abi.xen import PAGE_SHIFT, Hypercall, MmuCmd
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
        if not mm.owned(call.dom, frame):
            return mm.deny(call, Errno.EPERM, "machphys-frame-not-owned", index=i, mfn=frame)
        # The p2m is the identity and fixed; the guest's m2p bookkeeping has nothing to change here.
        call.trace("mmu.update", cmd=MmuCmd(cmd).name, mfn=frame, pfn=val)
        return 0
    if cmd not in (MmuCmd.NORMAL_PT_UPDATE, MmuCmd.PT_UPDATE_PRESERVE_AD):
        return mm.deny(call, Errno.ENOSYS, "unknown-cmd", index=i, cmd=cmd)
    if not mm.owned(call.dom, frame):
        return mm.deny(call, Errno.EPERM, "pte-frame-not-owned", index=i, addr=addr)
    if val >> 32:
        return mm.deny(call, Errno.EINVAL, "pte-high-bits", index=i, val=val)  # non-PAE entries are 32 bits
    if val & PTE_PRESENT:
        target = mm.pte_frame(val)
        if not mm.mappable(call.dom, target):
            return mm.deny(call, Errno.EPERM, "maps-unowned-frame", index=i, mfn=target)
        level = call.dom.frames.level(frame)
        # Only an L1 entry maps its frame as data; an L2 entry's RW bit governs the pages of the L1 it names.
        # Entries of unpinned frames are plain data to the hypervisor, as in Xen until the frame is pinned.
        if level == 1 and val & PTE_RW and (why := call.dom.frames.write_protected(target)):
            return mm.deny(call, Errno.EPERM, why, index=i, mfn=target)
        if level == 2 and val & PTE_PSE:
            # A 4 MiB superpage would map 1024 frames past every ownership check; Xen refuses PSE to PV guests.
            return mm.deny(call, Errno.EINVAL, "superpage", index=i, val=val)
    # PRESERVE_AD is a plain write here: the hypervisor cannot see the old entry's accessed/dirty bits.
    call.effects.append(WriteMachine(addr=addr, data=struct.pack("<I", val)))
    call.trace("mmu.update", cmd=MmuCmd(cmd).name, addr=addr, val=val)
    return 0
