"""x86-32 page-table layout facts both processes need, non-PAE and PAE: which L2 slots belong to the guest, and
which frames a table's guest slots name (what validating it as Xen's alloc_l2_table / alloc_l3_table must look at).

A 32-bit non-PAE PV guest owns the L2 slots below HYPERVISOR_VIRT_START >> 22; the slots from there on map the
hypervisor's own area (the m2p table among it) and are never the guest's to change (Xen's is_guest_l2_slot).

A 32-bit PAE PV guest (xen-3.0-x86_32p) has 512 64-bit entries per L2 and L1 and an L3 of 4: the hole is the top
of the 4th GiB, from HYPERVISOR_VIRT_START_PAE (0xF5800000), so only the L2 under L3 slot 3 (Xen's PGT_pae_xen_l2)
has Xen's slots, from (HYPERVISOR_VIRT_START_PAE >> 21) & 511 = 428 on (is_guest_l2_slot with PGT_pae_xen_l2;
xen/include/asm-x86/x86_32/page-3level.h's L2_PAGETABLE_FIRST_XEN_SLOT in Xen 4.0).
"""

from __future__ import annotations

import struct

from pvcluster.abi.x86 import PTE_PRESENT, PTE_PSE
from pvcluster.abi.xen import HYPERVISOR_VIRT_START_NONPAE, HYPERVISOR_VIRT_START_PAE, PAGE_SHIFT, PAGE_SIZE

ENTRIES = PAGE_SIZE // 4  # 1024 four-byte entries per table
FIRST_XEN_L2_SLOT = HYPERVISOR_VIRT_START_NONPAE >> 22  # 1008
_TABLE = struct.Struct(f"<{ENTRIES}I")

PAE_ENTRIES = PAGE_SIZE // 8  # 512 eight-byte entries per L2 / L1
PAE_L3_ENTRIES = 4
PAE_XEN_L3_SLOT = 3  # the L2 holding the hole
PAE_FIRST_XEN_L2_SLOT = HYPERVISOR_VIRT_START_PAE >> 21 & (PAE_ENTRIES - 1)  # 428
PAE_ADDR_MASK = 0x000FFFFFFFFFF000  # bits 12..51: the frame a PAE entry names
_PAE_TABLE = struct.Struct(f"<{PAE_ENTRIES}Q")


def is_guest_l2_slot(slot: int, *, pae: bool = False, xen_l2: bool = False) -> bool:
    """Xen's is_guest_l2_slot: non-PAE, every slot below the hypervisor hole; PAE, every slot of an L2 but the one
    under L3 slot 3 (``xen_l2``), whose slots below the hole."""
    if not pae:
        return 0 <= slot < FIRST_XEN_L2_SLOT
    return 0 <= slot < (PAE_FIRST_XEN_L2_SLOT if xen_l2 else PAE_ENTRIES)


def entries(data: bytes, pae: bool = False) -> list[int]:
    """A table frame's entries (``data`` is one whole frame): 1024 u32s, or 512 u64s for PAE."""
    return list((_PAE_TABLE if pae else _TABLE).unpack(data))


def frame_of(e: int, pae: bool = False) -> int:
    """The frame a table entry names."""
    return (e & PAE_ADDR_MASK) >> PAGE_SHIFT if pae else e >> PAGE_SHIFT


def l2_targets(data: bytes) -> list[int]:
    """The frames the present, non-superpage guest slots of an L2 frame name, once each, in slot order: the
    L1 tables validating it would validate."""
    seen: dict[int, None] = {}
    for pde in entries(data)[:FIRST_XEN_L2_SLOT]:
        if pde & PTE_PRESENT and not pde & PTE_PSE:
            seen.setdefault(pde >> PAGE_SHIFT, None)
    return list(seen)


def pae_targets(data: bytes, limit: int = PAE_ENTRIES) -> list[int]:
    """The frames the present, non-superpage entries of a PAE table frame name (the first ``limit``), once each."""
    seen: dict[int, None] = {}
    for e in entries(data, pae=True)[:limit]:
        if e & PTE_PRESENT and not e & PTE_PSE:
            seen.setdefault(frame_of(e, pae=True), None)
    return list(seen)
