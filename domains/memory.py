"""Guest RAM: one anonymous mapping shared by every vCPU's Unicorn instance (``mem_map_ptr``)."""

from __future__ import annotations

import ctypes
import mmap
import struct

from pvcluster.abi.platform import (
    GDT_FRAME,
    HOLE_FRAMES,
    HOLE_FRAMES_PAE,
    HYPERVISOR_FRAMES,
    M2P_FRAME_BASE,
    SHARED_INFO_FRAME,
    m2p_frames,
)
from pvcluster.abi.xen import PAGE_SIZE


def identity_table(nr_pages: int) -> bytes:
    """``nr_pages`` little-endian u32s, entry i holding i: the p2m (mfn_list) and the m2p alike, here."""
    return struct.pack(f"<{nr_pages}I", *range(nr_pages))


class GuestRam:
    """Guest-physical memory of ``nr_pages`` pages plus the hypervisor's frames after it (``HYPERVISOR_FRAMES``,
    pvcluster.abi.platform): ``shared_info``, the GDT the vCPUs run with (flat code and data segments, as Xen's
    reserved GDT entries provide) and the grant table's frames, zeroed as Xen clears them; then the machine-to-phys
    table's frames for the domain's RAM (``m2p_frames``), entry mfn holding pfn: the identity, written here once
    as Xen's set_gpfn_from_mfn writes each entry when it gives the domain its frames; then the hypervisor hole's
    frames (``HoleFrame``), which only a ring-1 guest's tables point at (``domains/rings.py``).

    Each vCPU maps the buffer at physical address 0 and runs with paging on; the builder's initial tables map it
    linearly at ``virt_base`` (so the GDT, for one, is at virtual ``virt_base + gdt_paddr``). Access by virtual
    address goes through a vCPU's page tables: see ``domains.paging``.

    ``pae``: the domain's paging mode (a PAE guest, xen-3.0-x86_32p: 3-level tables of 64-bit entries), which every
    walk of its tables (``domains.paging``, the block hook) reads from here; a PAE hole has one frame more.
    """

    def __init__(self, memory_bytes: int, virt_base: int, pae: bool = False) -> None:
        if memory_bytes <= 0 or memory_bytes % PAGE_SIZE:
            raise ValueError(f"memory size {memory_bytes} is not a positive multiple of {PAGE_SIZE}")
        self.nr_pages = memory_bytes // PAGE_SIZE
        self.m2p_paddr = memory_bytes + M2P_FRAME_BASE * PAGE_SIZE
        self.m2p_pages = m2p_frames(self.nr_pages)
        self.pae = pae
        hole = HOLE_FRAMES_PAE if pae else HOLE_FRAMES
        self.size = memory_bytes + (HYPERVISOR_FRAMES + self.m2p_pages + hole) * PAGE_SIZE
        self.virt_base = virt_base
        self.shared_info_paddr = memory_bytes + SHARED_INFO_FRAME * PAGE_SIZE
        self.gdt_paddr = memory_bytes + GDT_FRAME * PAGE_SIZE
        self.buf = mmap.mmap(-1, self.size)
        self._anchor = ctypes.c_char.from_buffer(self.buf)
        self.host_addr = ctypes.addressof(self._anchor)
        self.write_pa(self.m2p_paddr, identity_table(self.nr_pages))

    def write_pa(self, pa: int, data: bytes) -> None:
        self.buf[pa : pa + len(data)] = data

    def read_pa(self, pa: int, length: int) -> bytes:
        return bytes(self.buf[pa : pa + length])
