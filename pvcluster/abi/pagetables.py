"""Non-PAE x86-32 page-table layout facts both processes need: which L2 slots belong to the guest, and which frames
a page directory's guest slots name (what validating it as Xen's alloc_l2_table does must look at).

A 32-bit non-PAE PV guest owns the L2 slots below HYPERVISOR_VIRT_START >> 22; the slots from there on map the
hypervisor's own area (the m2p table among it) and are never the guest's to change (Xen's is_guest_l2_slot).
"""

from __future__ import annotations

import struct

from pvcluster.abi.x86 import PTE_PRESENT, PTE_PSE
from pvcluster.abi.xen import HYPERVISOR_VIRT_START_NONPAE, PAGE_SHIFT, PAGE_SIZE

ENTRIES = PAGE_SIZE // 4  # 1024 four-byte entries per table
FIRST_XEN_L2_SLOT = HYPERVISOR_VIRT_START_NONPAE >> 22  # 1008
_TABLE = struct.Struct(f"<{ENTRIES}I")


def is_guest_l2_slot(slot: int) -> bool:
    """Xen's is_guest_l2_slot for a non-PAE L2: every slot below the hypervisor hole."""
    return 0 <= slot < FIRST_XEN_L2_SLOT


def entries(data: bytes) -> list[int]:
    """A table frame's 1024 entries (``data`` is one whole frame)."""
    return list(_TABLE.unpack(data))


def l2_targets(data: bytes) -> list[int]:
    """The frames the present, non-superpage guest slots of an L2 frame name, once each, in slot order: the
    L1 tables validating it would validate."""
    seen: dict[int, None] = {}
    for pde in entries(data)[:FIRST_XEN_L2_SLOT]:
        if pde & PTE_PRESENT and not pde & PTE_PSE:
            seen.setdefault(pde >> PAGE_SHIFT, None)
    return list(seen)
