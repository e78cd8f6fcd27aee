"""x86-32 two-level paging (non-PAE, 4 KiB pages) as the domain process sees it; for a PAE domain (``ram.pae``)
each walk here hands over to ``domains.paging_pae``, so callers need not know the mode.

Every vCPU's Unicorn instance runs with CR0.PG on over the guest RAM mapped at physical address 0, so the CPU's
own page walker (and each vCPU's own TLB) translates guest code's accesses. Whatever the domain process does to
guest memory *by virtual address* on a vCPU's behalf (copying hypercall arguments in, writing results back,
pushing an interrupt frame, reading an IDT gate) goes through the software walk here, with that vCPU's CR3.
The walk reads the tables as they are now, not as a TLB may still hold them: it is what a hypervisor's
``copy_from_guest`` would do after a TLB miss.

CR4.PSE and PAE are off (Xen gives PV guests neither on x86-32 non-PAE), so bit 7 of a PDE is ignored, as the CPU
ignores it then. Only addresses inside the RAM buffer are readable or writable here: a mapping of the APIC page
or the VMI ROM translates, but reading or writing through it with these helpers fails (None / False).

Also here: the initial page tables Xen's PV domain builder makes (``build_initial_tables``).
"""

from __future__ import annotations

import struct

import attrs

from domains import paging_pae
from domains.memory import GuestRam
from pvcluster.abi.x86 import PTE_ACCESSED, PTE_DIRTY, PTE_PCD, PTE_PRESENT, PTE_PWT, PTE_RW, PTE_USER
from pvcluster.abi.xen import PAGE_SIZE

# What the builder writes (the values Xen's PV builder uses for x86-32 non-PAE).
PDE_FLAGS = PTE_PRESENT | PTE_RW | PTE_USER | PTE_ACCESSED  # 0x27
PTE_RAM = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY  # 0x63
PTE_RAM_RO = PTE_RAM & ~PTE_RW  # 0x61: page-table frames as a PV guest must see them
PTE_MMIO = PTE_PRESENT | PTE_RW | PTE_PCD | PTE_PWT  # 0x1b
PTE_ROM = PTE_PRESENT  # read-only
PTE_M2P = PTE_RAM_RO  # the machine-to-phys table: the guest reads it, never writes it

ENTRIES = 1024
_FRAME = 0xFFFFF000
_ADDR_LIMIT = 1 << 32
_u32 = struct.Struct("<I")
_unpack = _u32.unpack_from


def _entry(ram: GuestRam, pa: int) -> int | None:
    if 0 <= pa <= ram.size - 4:
        return int(_u32.unpack_from(ram.buf, pa)[0])
    return None


def pte_address(ram: GuestRam, cr3: int, va: int) -> int | None:
    """Physical address of the L1 entry that maps ``va``, or None if its PDE is not present (or the tables are
    not in RAM)."""
    if ram.pae:
        return paging_pae.pte_address(ram, cr3, va)
    va &= 0xFFFFFFFF
    pde = _entry(ram, (cr3 & _FRAME) + (va >> 22) * 4)
    if pde is None or not pde & PTE_PRESENT:
        return None
    pa = (pde & _FRAME) + ((va >> 12) & (ENTRIES - 1)) * 4
    return pa if 0 <= pa <= ram.size - 4 else None


def translate(ram: GuestRam, cr3: int, va: int, write: bool) -> int | None:
    """The physical address ``va`` maps to through the tables at ``cr3``; None if it is not mapped, or if
    ``write`` and the PDE or the PTE lacks RW (CR0.WP is on: supervisor writes honour read-only entries).

    The vCPU's block hook calls this for every block it runs, hence the one flat function."""
    if ram.pae:
        return paging_pae.translate(ram, cr3, va, write)
    va &= 0xFFFFFFFF
    buf = ram.buf
    try:  # an entry beyond the end of RAM: struct.error
        pde = _unpack(buf, (cr3 & _FRAME) | (va >> 20 & 0xFFC))[0]
        if not pde & PTE_PRESENT or (write and not pde & PTE_RW):
            return None
        pte = _unpack(buf, (pde & _FRAME) | (va >> 10 & 0xFFC))[0]
    except struct.error:
        return None
    if not pte & PTE_PRESENT or (write and not pte & PTE_RW):
        return None
    return int((pte & _FRAME) | (va & (PAGE_SIZE - 1)))


def walk(ram: GuestRam, cr3: int, va: int, length: int) -> tuple[list[int], list[int]]:
    """How ``[va, va+length)`` translates through the tables at ``cr3``, page by page (a zero length: ``va``'s page
    alone): the physical addresses of the entries the walk reads (each page's PDE, then its PTE when the PDE is
    present), and the frame each page maps to (-1: not present). A write to one of those entries, and only that,
    can change what the span translates to. (PAE: each page's L3, L2 and L1 entries.)"""
    if ram.pae:
        return paging_pae.walk(ram, cr3, va, length)
    va &= 0xFFFFFFFF
    first, last = va >> 12, min(va + max(length, 1) - 1, _ADDR_LIMIT - 1) >> 12
    entries: list[int] = []
    frames: list[int] = []
    for page in range(first, last + 1):
        pde_at = (cr3 & _FRAME) + (page >> 10) * 4
        entries.append(pde_at)
        pde = _entry(ram, pde_at)
        if pde is None or not pde & PTE_PRESENT:
            frames.append(-1)
            continue
        pte_at = (pde & _FRAME) + (page & (ENTRIES - 1)) * 4
        entries.append(pte_at)
        pte = _entry(ram, pte_at)
        frames.append(pte >> 12 if pte is not None and pte & PTE_PRESENT else -1)
    return entries, frames


def _chunks(ram: GuestRam, cr3: int, va: int, length: int, write: bool) -> list[tuple[int, int]] | None:
    """``[va, va+length)`` as (physical address, length) pieces, one per page; None if any page is unmapped,
    not writable when ``write``, or not RAM."""
    if length < 0 or va < 0 or va + length > _ADDR_LIMIT:
        return None
    out: list[tuple[int, int]] = []
    while length > 0:
        n = min(length, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
        pa = translate(ram, cr3, va, write)
        if pa is None or pa + n > ram.size:
            return None
        out.append((pa, n))
        va += n
        length -= n
    return out


def read_virt(ram: GuestRam, cr3: int, va: int, length: int, write: bool = False) -> bytes | None:
    """The bytes at ``[va, va+length)``; None if any of it is not mapped to RAM (or, with ``write``, not mapped
    writable: for a buffer the caller will write back)."""
    chunks = _chunks(ram, cr3, va, length, write)
    if chunks is None:
        return None
    if len(chunks) == 1:
        pa, n = chunks[0]
        return bytes(ram.buf[pa : pa + n])
    return b"".join(bytes(ram.buf[pa : pa + n]) for pa, n in chunks)


def write_virt(ram: GuestRam, cr3: int, va: int, data: bytes) -> bool:
    """Write ``data`` at ``va`` if every byte of it is mapped writable to RAM; otherwise write nothing."""
    chunks = _chunks(ram, cr3, va, len(data), True)
    if chunks is None:
        return False
    off = 0
    for pa, n in chunks:
        ram.buf[pa : pa + n] = data[off : off + n]
        off += n
    return True


# -- the builder's initial tables ---------------------------------------------------------------------------


@attrs.frozen
class InitialTables:
    l2: int  # physical address of the page directory (CR3)
    l1s: tuple[int, ...]  # physical addresses of the L1 tables, in PDE order

    @property
    def root(self) -> int:
        return self.l2

    @property
    def frames(self) -> tuple[int, ...]:
        """Every page-table frame number, the L2 first."""
        return tuple(pa // PAGE_SIZE for pa in (self.l2, *self.l1s))


def initial_mappings(
    virt_base: int, linear_bytes: int, mmio: tuple[int, ...] = (), rom: tuple[int, ...] = (),
) -> dict[int, tuple[int, int]]:
    """va page -> (pa, flags) before page-table frames are known: ``[virt_base, virt_base+linear_bytes)`` to
    physical 0 onwards (RAM, writable), each page of ``mmio`` identity-mapped uncached and each of ``rom``
    identity-mapped read-only. (The m2p at MACH2PHYS_VIRT_START is the hypervisor hole's: ``domains/rings.py``.)
    Raises ValueError when two of them overlap or one leaves the address space."""
    if virt_base % PAGE_SIZE or linear_bytes % PAGE_SIZE or virt_base + linear_bytes > _ADDR_LIMIT:
        raise ValueError(f"linear map [{virt_base:#x}, +{linear_bytes:#x}) is not page-aligned in 4 GiB")
    maps = {virt_base + off: (off, PTE_RAM) for off in range(0, linear_bytes, PAGE_SIZE)}
    for pages, flags in ((mmio, PTE_MMIO), (rom, PTE_ROM)):
        for va in pages:
            if va in maps:
                raise ValueError(f"page {va:#010x} is mapped twice")
            maps[va] = (va, flags)
    return maps


def l1_tables_needed(maps: dict[int, tuple[int, int]]) -> int:
    return len({va >> 22 for va in maps})


def build_initial_tables(
    ram: GuestRam, at: int, maps: dict[int, tuple[int, int]], *, tables_read_only: bool
) -> InitialTables:
    """Write an L2 at physical ``at`` and the L1 tables after it that map ``maps``. The page-table frames'
    own entries in the linear map are made read-only when ``tables_read_only`` (a Xen PV guest's tables must
    be). The caller has checked that ``1 + l1_tables_needed(maps)`` frames fit at ``at``."""
    pdes = sorted({va >> 22 for va in maps})
    l2 = at
    l1_of = {pde: at + (1 + i) * PAGE_SIZE for i, pde in enumerate(pdes)}
    table_pas = {l2, *l1_of.values()}
    ram.write_pa(l2, bytes(PAGE_SIZE))
    for pde, l1 in l1_of.items():
        ram.write_pa(l1, bytes(PAGE_SIZE))
        _u32.pack_into(ram.buf, l2 + pde * 4, l1 | PDE_FLAGS)
    for va, (pa, flags) in maps.items():
        if tables_read_only and pa in table_pas and flags == PTE_RAM:
            flags = PTE_RAM_RO
        _u32.pack_into(ram.buf, l1_of[va >> 22] + ((va >> 12) & (ENTRIES - 1)) * 4, pa | flags)
    return InitialTables(l2=l2, l1s=tuple(l1_of[p] for p in pdes))
