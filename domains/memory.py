"""Guest RAM: one anonymous mapping shared by every vCPU's Unicorn instance (``mem_map_ptr``)."""

from __future__ import annotations

import ctypes
import mmap

from pvcluster.abi.platform import GDT_FRAME, HYPERVISOR_FRAMES, SHARED_INFO_FRAME
from pvcluster.abi.xen import PAGE_SIZE


class GuestRam:
    """Guest-physical memory of ``nr_pages`` pages plus the hypervisor's frames after it (``HYPERVISOR_FRAMES``,
    pvcluster.abi.platform): ``shared_info``, the GDT the vCPUs run with (flat code and data segments, as Xen's
    reserved GDT entries provide) and the grant table's frames, zeroed as Xen clears them.

    Each vCPU maps the buffer at physical address 0 and runs with paging on; the builder's initial tables map it
    linearly at ``virt_base`` (so the GDT, for one, is at virtual ``virt_base + gdt_paddr``). Access by virtual
    address goes through a vCPU's page tables: see ``domains.paging``.
    """

    def __init__(self, memory_bytes: int, virt_base: int) -> None:
        if memory_bytes <= 0 or memory_bytes % PAGE_SIZE:
            raise ValueError(f"memory size {memory_bytes} is not a positive multiple of {PAGE_SIZE}")
        self.nr_pages = memory_bytes // PAGE_SIZE
        self.size = memory_bytes + HYPERVISOR_FRAMES * PAGE_SIZE
        self.virt_base = virt_base
        self.shared_info_paddr = memory_bytes + SHARED_INFO_FRAME * PAGE_SIZE
        self.gdt_paddr = memory_bytes + GDT_FRAME * PAGE_SIZE
        self.buf = mmap.mmap(-1, self.size)
        self._anchor = ctypes.c_char.from_buffer(self.buf)
        self.host_addr = ctypes.addressof(self._anchor)

    def write_pa(self, pa: int, data: bytes) -> None:
        self.buf[pa : pa + len(data)] = data

    def read_pa(self, pa: int, length: int) -> bytes:
        return bytes(self.buf[pa : pa + length])
