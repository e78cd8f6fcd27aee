"""x86-32 PAE paging (3 levels, 64-bit entries, 4 KiB pages) as the domain process sees it: the walks of a PAE
guest's tables (guest type xen-3.0-x86_32p) that ``domains.paging`` hands over to when ``ram.pae`` is set, and the
builder's initial PAE tables.

The layout is the CPU's (Intel SDM vol. 3, 4.4) and Xen's for a 32-bit PAE PV guest (xen/include/asm-x86/
x86_32/page-3level.h in Xen 4.0, the last with a 32-bit hypervisor; tools/libs/guest/xg_dom_x86.c's
setup_pgtables_x86_32_pae builds the same shape): CR3 names an L3 of 4 entries (one per GiB), each present one an
L2 of 512 entries (2 MiB each), each of whose present entries is an L1 of 512 PTEs. Entries are 64 bits; the frame
is bits 12..51. An L3 entry has only the present bit (and the cache bits) as flags: RW and USER are in the L2 and
L1 entries, which a write must find both writable (CR0.WP is on). The PS bit of an L2 entry is never set in a PV
guest's tables (Xen refuses superpages to PV guests), so the walk ignores it, as ``domains.paging`` ignores it.
"""

from __future__ import annotations

import struct

import attrs

from domains.memory import GuestRam
from pvcluster.abi.x86 import PTE_PRESENT, PTE_RW
from pvcluster.abi.xen import PAGE_SIZE

ENTRIES = 512  # per L2 and per L1
L3_ENTRIES = 4
ADDR_MASK = 0x000FFFFFFFFFF000  # bits 12..51: the frame an entry names
CR3_MASK = 0xFFFFFFE0  # a PAE CR3 names a 32-byte-aligned L3
L3_FLAGS = PTE_PRESENT  # what Xen's builder writes in an L3 entry (l3e_from_pfn(..., _PAGE_PRESENT))
_u64 = struct.Struct("<Q")


def indices(va: int) -> tuple[int, int, int]:
    """(L3, L2, L1) slot of ``va``."""
    return va >> 30 & 3, va >> 21 & (ENTRIES - 1), va >> 12 & (ENTRIES - 1)


def _entry(ram: GuestRam, pa: int) -> int | None:
    if 0 <= pa <= ram.size - 8:
        return int(_u64.unpack_from(ram.buf, pa)[0])
    return None


def entry_addresses(ram: GuestRam, cr3: int, va: int) -> list[int]:
    """The physical addresses of the entries the walk of ``va`` reads, in order (L3, then L2 and L1 while the one
    before is present)."""
    va &= 0xFFFFFFFF
    i3, i2, i1 = indices(va)
    at = (cr3 & CR3_MASK) + i3 * 8
    out = [at]
    for index in (i2, i1):
        e = _entry(ram, at)
        if e is None or not e & PTE_PRESENT:
            break
        at = (e & ADDR_MASK) + index * 8
        out.append(at)
    return out


def pte_address(ram: GuestRam, cr3: int, va: int) -> int | None:
    """Physical address of the L1 entry that maps ``va``, or None if the L3 or L2 entry is not present."""
    found = entry_addresses(ram, cr3, va)
    if len(found) < 3 or not 0 <= found[2] <= ram.size - 8:
        return None
    return found[2]


def translate(ram: GuestRam, cr3: int, va: int, write: bool) -> int | None:
    """``domains.paging.translate`` for PAE tables."""
    va &= 0xFFFFFFFF
    found = entry_addresses(ram, cr3, va)
    if len(found) < 3:
        return None
    l2e, l1e = _entry(ram, found[1]), _entry(ram, found[2])
    if l2e is None or l1e is None or not l1e & PTE_PRESENT:
        return None
    if write and not (l2e & PTE_RW and l1e & PTE_RW):
        return None
    return int((l1e & ADDR_MASK) | (va & (PAGE_SIZE - 1)))


def walk(ram: GuestRam, cr3: int, va: int, length: int) -> tuple[list[int], list[int]]:
    """``domains.paging.walk`` for PAE tables: each page's L3, L2 and L1 entry addresses (as far as present)."""
    va &= 0xFFFFFFFF
    first, last = va >> 12, min(va + max(length, 1) - 1, 0xFFFFFFFF) >> 12
    entries: list[int] = []
    frames: list[int] = []
    for page in range(first, last + 1):
        found = entry_addresses(ram, cr3, page << 12)
        entries.extend(found)
        pte = _entry(ram, found[2]) if len(found) == 3 else None
        frames.append((pte & ADDR_MASK) >> 12 if pte is not None and pte & PTE_PRESENT else -1)
    return entries, frames


# -- the builder's initial PAE tables ------------------------------------------------------------------------


@attrs.frozen
class PaeTables:
    l3: int  # physical address of the L3 (CR3)
    l2s: tuple[int, ...]  # physical addresses of the L2s, in L3-slot order
    l1s: tuple[int, ...]  # physical addresses of the L1s, in address order

    @property
    def root(self) -> int:
        return self.l3

    @property
    def frames(self) -> tuple[int, ...]:
        """Every page-table frame number: the L3, the L2s, then the L1s."""
        return tuple(pa // PAGE_SIZE for pa in (self.l3, *self.l2s, *self.l1s))


def tables_needed(maps: dict[int, tuple[int, int]], l3_slots: tuple[int, ...] = ()) -> int:
    """How many frames the tables for ``maps`` take: the L3, an L2 per GiB used (and per slot of ``l3_slots``),
    an L1 per 2 MiB used."""
    return 1 + len({va >> 30 for va in maps} | set(l3_slots)) + len({va >> 21 for va in maps})


def build_tables(
    ram: GuestRam, at: int, maps: dict[int, tuple[int, int]], *, pde_flags: int, read_only: tuple[int, int] | None,
    l3_slots: tuple[int, ...] = (),
) -> PaeTables:
    """Write an L3 at physical ``at``, then its L2s (one for each GiB ``maps`` uses and each of ``l3_slots``: Xen
    requires slot 3's, where the hypervisor hole is), then the L1s. ``read_only`` = (flags, flags_ro): a table
    frame's own linear mapping with ``flags`` becomes ``flags_ro`` (a PV guest's tables are read-only to it).
    The caller has checked that ``tables_needed(maps, l3_slots)`` frames fit at ``at``."""
    slots3 = sorted({va >> 30 for va in maps} | set(l3_slots))
    slots2 = sorted({va >> 21 for va in maps})
    l2_of = {s: at + (1 + i) * PAGE_SIZE for i, s in enumerate(slots3)}
    l1_of = {s: at + (1 + len(slots3) + i) * PAGE_SIZE for i, s in enumerate(slots2)}
    table_pas = {at, *l2_of.values(), *l1_of.values()}
    for pa in table_pas:
        ram.write_pa(pa, bytes(PAGE_SIZE))
    for s, l2 in l2_of.items():
        _u64.pack_into(ram.buf, at + s * 8, l2 | L3_FLAGS)
    for s, l1 in l1_of.items():
        _u64.pack_into(ram.buf, l2_of[s >> 9] + (s & (ENTRIES - 1)) * 8, l1 | pde_flags)
    for va, (pa, flags) in maps.items():
        if read_only is not None and pa in table_pas and flags == read_only[0]:
            flags = read_only[1]
        _u64.pack_into(ram.buf, l1_of[va >> 21] + (va >> 12 & (ENTRIES - 1)) * 8, pa | flags)
    return PaeTables(l3=at, l2s=tuple(l2_of[s] for s in slots3), l1s=tuple(l1_of[s] for s in slots2))
