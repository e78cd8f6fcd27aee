"""Writable page tables: what the hypervisor checks before it applies a guest write the domain process emulated.

A ring-1 guest that writes one of its page-table entries through its read-only mapping of the table faults; the
domain process decodes the write and sends it as a one-entry mmu_update marked ``emulated`` (``domains/ptwr.py``).
Xen's pv_ro_page_fault / ptwr_do_page_fault (xen/arch/x86/pv/ro-page-fault.c) emulate only a write into a page of
the domain's own whose type is L1 page table, always for a 32-bit PV guest (4.17 has no VM_ASSIST check there);
the new entry then goes through the same checks as mod_l1_entry, here mmu_update's own. Anything else is the
guest's page fault: the call fails and the domain process injects the #PF.

A PAE guest's entries are 64 bits, which it writes as two 4-byte halves; the domain process widens each to the
whole entry. When a plain (not cmpxchg) 4-byte store to the upper half leaves a present entry the checks refuse,
Xen's ptwr_emulated_update assumes the guest wrote the halves the wrong way round and clears the present bit
instead of failing ("fixing up invalid PAE PTE"): ``upper_half_fixup``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hypervisor import mm
from hypervisor.guestmem import GuestFault, NotCopied
from pvcluster.abi.errno import Errno
from pvcluster.abi.x86 import PTE_PRESENT
from pvcluster.abi.xen import PAGE_SHIFT, MmuCmd

if TYPE_CHECKING:
    from hypervisor.hypercalls.base import Call


def refuse(call: Call) -> int | None:
    """-EINVAL (traced) unless the emulated write is one update of an entry in one of the domain's L1 tables."""
    if call.arg(1) != 1:
        return mm.deny(call, Errno.EINVAL, "ptwr-not-one-entry", count=call.arg(1))
    try:
        ptr, val = struct.unpack("<QQ", call.mem.read(call.arg(0), 16))
    except (GuestFault, NotCopied):
        return mm.deny(call, Errno.EFAULT, "ptwr-request-unmapped", addr=call.arg(0))
    frame = (ptr & ~3) >> PAGE_SHIFT
    if ptr & 3 != MmuCmd.NORMAL_PT_UPDATE or call.dom.frames.level(frame) != 1:
        return mm.deny(call, Errno.EINVAL, "ptwr-not-an-l1", mfn=frame)
    call.trace("mmu.ptwr", addr=ptr & ~3, val=val)
    return None


UPPER_HALF = 1  # domains/ptwr.py's fifth argument for a PAE upper-half store


def upper_half_fixup(call: Call, val: int) -> int | None:
    """The entry to write instead of a refused ``val``: ``val`` without the present bit when the emulated write
    was a PAE guest's plain 4-byte store to an entry's upper half and ``val`` is present (ptwr_emulated_update's
    fix-up for a 32-bit guest); None otherwise (the refusal stands)."""
    if not (call.emulated and call.dom.pae and call.arg(4) == UPPER_HALF and val & PTE_PRESENT):
        return None
    call.trace("mmu.ptwr_pae_fixup", val=val)
    return val & ~PTE_PRESENT
