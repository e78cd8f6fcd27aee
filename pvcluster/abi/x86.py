"""x86-32 architecture numbers both processes use: page-table entry bits (non-PAE, 4 KiB pages).

The domain process walks and builds page tables with them (``domains/paging.py``); the hypervisor validates the
entries a PV guest asks it to write with them (``hypervisor/mm.py``).
"""

from __future__ import annotations

PTE_PRESENT = 0x001
PTE_RW = 0x002
PTE_USER = 0x004
PTE_PWT = 0x008
PTE_PCD = 0x010
PTE_ACCESSED = 0x020
PTE_DIRTY = 0x040
PTE_PSE = 0x080  # in an L2 entry: a 4 MiB superpage (with CR4.PSE), which Xen refuses to PV guests
