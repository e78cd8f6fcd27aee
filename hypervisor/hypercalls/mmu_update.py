"""mmu_update (1): checked writes of page-table entries at machine addresses, in a batch.

The hypervisor holds no guest RAM, so an accepted update becomes a ``write_pa`` action the domain process
carries out. Requests run in order and the batch stops at the first refusal; the done count reports how many
succeeded either way, as Xen's does.
"""

from __future__ import annotations

import enum

from hypervisor import mm
from hypervisor.guestmem import Span
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import PAGE_SHIFT, Hypercall
from pvcluster.bus.messages import VcpuAction

NR = Hypercall.mmu_update

REQUEST_SIZE = 16  # struct mmu_update { uint64_t ptr; uint64_t val; }


class MmuCmd(enum.IntEnum):
    """The low two bits of ``ptr`` (xen.h). MMU_PT_UPDATE_NO_TRANSLATE (3) is for translated guests only."""

    NORMAL_PT_UPDATE = 0
    MACHPHYS_UPDATE = 1
    PT_UPDATE_PRESERVE_AD = 2


def copy_in(args: list[int], read: Reader) -> list[Span]:
    reqs, count, done = (a & 0xFFFFFFFF for a in args[:3])
    spans = [Span(done, 4, writable=True)] if done else []
    if 0 < count <= mm.MAX_BATCH:
        spans.insert(0, Span(reqs, count * REQUEST_SIZE))
    return spans


def handle(call: Call) -> int:
    return mm.run_batch(call, "<QQ", "request-unmapped", lambda c, i, f: _update(c, i, f[0], f[1]))


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
    if val & mm.PTE_PRESENT:
        target = mm.pte_frame(val)
        if not mm.mappable(call.dom, target):
            return mm.deny(call, Errno.EPERM, "maps-unowned-frame", index=i, mfn=target)
        level = mm.pinned_level(call.dom, frame)
        # Only an L1 entry maps its frame as data; an L2 entry's RW bit governs the pages of the L1 it names.
        # Entries of unpinned frames are plain data to the hypervisor, as in Xen until the frame is pinned.
        if level == 1 and val & mm.PTE_RW and mm.is_pinned(call.dom, target):
            return mm.deny(call, Errno.EPERM, "writable-pagetable", index=i, mfn=target)
        if level == 2 and val & mm.PTE_PSE:
            # A 4 MiB superpage would map 1024 frames past every ownership check; Xen refuses PSE to PV guests.
            return mm.deny(call, Errno.EINVAL, "superpage", index=i, val=val)
    # PRESERVE_AD is a plain write here: the hypervisor cannot see the old entry's accessed/dirty bits.
    call.actions.append(VcpuAction(kind="write_pa", vcpu=call.vcpu, regs={"addr": addr, "value": val}))
    call.trace("mmu.update", cmd=MmuCmd(cmd).name, addr=addr, val=val)
    return 0
