"""The domain process's walk of a vCPU's page tables for dumps (domains/debug.py), non-PAE and PAE, in process."""

from __future__ import annotations

from domains import paging, paging_pae
from domains.debug import mapped_pages
from domains.memory import GuestRam
from pvcluster.coredump import PAGE, merge_pages

BASE = 0xC0000000


def test_non_pae_walk_finds_ram_mappings_and_their_permissions() -> None:
    ram = GuestRam(1 << 20, BASE)
    maps = paging.initial_mappings(BASE, 64 * PAGE, mmio=(0xFEE00000,))  # the APIC page: not RAM, left out
    maps[0x400000] = (5 * PAGE, paging.PTE_RAM_RO)  # an alias of a RAM page, read-only
    tables = paging.build_initial_tables(ram, 100 * PAGE, maps, tables_read_only=True)
    pages = mapped_pages(ram, tables.l2)
    assert (0x400000, 5 * PAGE, False) in pages
    assert all(va != 0xFEE00000 for va, _, _ in pages)
    assert [(s.vaddr, s.paddr, s.size, s.writable) for s in merge_pages(pages)] == [
        (0x400000, 5 * PAGE, PAGE, False), (BASE, 0, 64 * PAGE, True)]


def test_pae_walk_reads_three_levels() -> None:
    ram = GuestRam(1 << 21, BASE, pae=True)
    maps = {BASE + i * PAGE: (i * PAGE, paging.PTE_RAM) for i in range(8)}
    maps[0x1000] = (3 * PAGE, paging.PTE_RAM_RO)
    tables = paging_pae.build_tables(ram, 200 * PAGE, maps, pde_flags=paging.PDE_FLAGS, read_only=None)
    assert mapped_pages(ram, tables.l3) == [(0x1000, 3 * PAGE, False),
                                           *[(BASE + i * PAGE, i * PAGE, True) for i in range(8)]]


def test_tables_outside_ram_map_nothing() -> None:
    ram = GuestRam(1 << 20, BASE)
    assert mapped_pages(ram, 0xFFFFF000) == []
