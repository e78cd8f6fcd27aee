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

# CR0.TS: the next FPU/SSE instruction raises #NM (fpu_taskswitch sets and clears it for a PV guest).
CR0_TS = 1 << 3

# Segment descriptor bits, in the high 32-bit word of an 8-byte GDT/LDT entry (Xen's _SEGMENT_* in asm/desc.h).
SEG_TYPE = 15 << 8
SEG_CODE = 1 << 11
SEG_S = 1 << 12  # a code or data segment (clear: a system descriptor or a gate)
SEG_DPL = 3 << 13
SEG_DPL_SHIFT = 13
SEG_P = 1 << 15
SEG_L = 1 << 21  # a 64-bit code segment
SEG_G = 1 << 23  # the limit counts 4 KiB pages
SEG_TYPE_CALL_GATE = 0xC << 8  # a 32-bit call gate's type field in place (SYS_DESC_call_gate << 8)
# A 32-bit call gate's parameter count is bits 0-4 of the high word; bits 5-7 are reserved and must be zero.
CALL_GATE_RESERVED = 0xE0
SELECTOR_RPL = 3
SELECTOR_TI = 4  # the selector names an LDT entry
