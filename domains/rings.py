"""Ring 1 for Xen PV guest kernels (the ``xen`` backend): the hypervisor hole, each vCPU's GDT, and ring changes.

A 32-bit PV kernel runs in ring 1 on Xen's flat selectors (FLAT_RING1_CS 0xe019, FLAT_RING1_DS 0xe021) and its user
code in ring 3 (0xe02b, 0xe033). Those selectors index Xen's reserved GDT entries, past the guest's own
(FIRST_RESERVED_GDT_PAGE), so every vCPU's GDT register points at a window of the hypervisor hole: 14 pages showing
the frames the guest gave set_gdt (or a zero page: no descriptor), then the page of Xen's reserved entries, then
the trampoline page (below). The hole (non-PAE) is two L2 slots the domain process writes into every page directory
the guest runs on (``install_hole``, as Xen's init_xen_l2_slots when a frame becomes an L2), both pointing at hypervisor
frames: the m2p's L1 at MACH2PHYS_VIRT_START and the per-domain L1 of the GDT windows. Every PTE there is read-only
and supervisor-only, so ring 1 reads its descriptors and the m2p but writes neither, and ring 3 reads nothing.
For a PAE guest the hole starts at HYPERVISOR_VIRT_START_PAE (0xF5800000) and lives in the L2 under L3 slot 3
(xen-x86_32.h; Xen's PGT_pae_xen_l2): three 2 MiB slots there, the m2p's L1 at 0xF5800000 and the per-domain
area's two L1s at 0xFC400000 (32 vCPUs' 128 KiB windows are 4 MiB), all with 64-bit entries.

Changing rings. Unicorn checks segment loads from the host as the CPU would: SS takes only a selector whose RPL is
the current privilege level, and the CPL follows SS (QEMU's cpu_x86_load_seg_cache). So the domain process moves a
vCPU the way Xen's exit path does, with ``iretd``: the trampoline page holds that one instruction, and the domain
process writes the frame it pops (eip, cs, eflags, esp, ss) and points the vCPU at it. An iret can only go outward,
so a move inward (ring 3 to ring 1 for a trap from user mode, or the first entry from ring 0) first drops the CPU
to ring 0 by loading SS with protected mode off for two register writes; no instruction runs meanwhile. A move
within one ring is plain register writes.

Exceptions. Unicorn hands every exception to the domain process's hook instead of the IDT, and QEMU then never
clears its record of the exception in flight (cleared only on a delivery through the IDT), so the second
contributory exception of a vCPU's life arrives as a double fault, and the third resets the CPU (unicorn#1883).
``clear_exception`` resets that record in the saved CPU context after each exception the domain process takes.
"""

from __future__ import annotations

import ctypes
import functools
import struct

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, Uc
from unicorn import x86_const as X

from domains import paging_pae
from domains.memory import GuestRam
from domains.paging import PDE_FLAGS, PTE_M2P, PTE_RAM_RO
from pvcluster.abi.platform import (
    GDT_VCPU_VA_SHIFT,
    PERDOMAIN_VIRT_START,
    TRAMPOLINE_WINDOW_PAGE,
    HoleFrame,
    hole_frame,
)
from pvcluster.abi.xen import (
    FIRST_RESERVED_GDT_BYTE,
    FIRST_RESERVED_GDT_PAGE,
    FLAT_RING1_CS,
    FLAT_RING1_DS,
    FLAT_RING3_CS,
    FLAT_RING3_DS,
    HYPERVISOR_CS,
    HYPERVISOR_DS,
    MACH2PHYS_VIRT_START_NONPAE,
    MACH2PHYS_VIRT_START_PAE,
    PAGE_SIZE,
    XEN_LEGACY_MAX_VCPUS,
)

M2P_SLOT = MACH2PHYS_VIRT_START_NONPAE >> 22
PERDOMAIN_SLOT = PERDOMAIN_VIRT_START >> 22
# PAE: the hole is in the L2 under L3 slot 3 (the top GiB), whose slots from HYPERVISOR_VIRT_START_PAE on are Xen's
# (a PAE L2 slot maps 2 MiB): the m2p's L1 at MACH2PHYS_VIRT_START_PAE, the per-domain area's two L1s at
# PERDOMAIN_VIRT_START (still inside the PAE hole).
PAE_HOLE_L3_SLOT = 3
PAE_M2P_SLOT = MACH2PHYS_VIRT_START_PAE >> 21 & (paging_pae.ENTRIES - 1)
PAE_PERDOMAIN_SLOT = PERDOMAIN_VIRT_START >> 21 & (paging_pae.ENTRIES - 1)
# The GDT limit every ring-1 vCPU runs with: the guest's 14 pages and Xen's reserved page.
GDT_LIMIT = FIRST_RESERVED_GDT_BYTE + PAGE_SIZE - 1
# Where in the trampoline page vCPU v's iret frame goes (the iretd itself is at offset 0), and the mmu_update request
# its writable-page-table emulation sends (domains/ptwr.py).
_FRAME_AREA = 0x800
_FRAME_STRIDE = 32
_PTWR_AREA = 0x400
_PTWR_STRIDE = 16
_IRETD = b"\xcf"
_CR0_PE, _CR0_PG = 1, 1 << 31
# Flat 4 GiB descriptors (base 0, limit 0xFFFFF pages, 32-bit) by access byte; accessed bits set, so the CPU never
# writes back into the read-only page.
_RESERVED = {
    HYPERVISOR_CS: 0x9B,
    HYPERVISOR_DS: 0x93,
    FLAT_RING1_CS: 0xBB,
    FLAT_RING1_DS: 0xB3,
    FLAT_RING3_CS: 0xFB,
    FLAT_RING3_DS: 0xF3,
}
# The flat data selector of each ring (the stack a ring change runs on).
FLAT_DS = {0: HYPERVISOR_DS, 1: FLAT_RING1_DS, 3: FLAT_RING3_DS}
FLAT_CS = {0: HYPERVISOR_CS, 1: FLAT_RING1_CS, 3: FLAT_RING3_CS}
_DESC_ACCESSED = 1 << 40
_DESC_S_PRESENT = (1 << 44) | (1 << 47)


def gdt_base(vid: int) -> int:
    return PERDOMAIN_VIRT_START + (vid << GDT_VCPU_VA_SHIFT)


def trampoline_va(vid: int) -> int:
    return gdt_base(vid) + TRAMPOLINE_WINDOW_PAGE * PAGE_SIZE


def _frame_offset(vid: int) -> int:
    return _FRAME_AREA + vid * _FRAME_STRIDE


def reserved_gdt_page() -> bytes:
    page = bytearray(PAGE_SIZE)
    for sel, access in _RESERVED.items():
        off = sel - FIRST_RESERVED_GDT_BYTE & ~7
        page[off : off + 8] = struct.pack("<II", 0x0000FFFF, 0x00CF0000 | access << 8)
    return bytes(page)


def _pa(ram: GuestRam, which: HoleFrame) -> int:
    return hole_frame(ram.nr_pages, which) * PAGE_SIZE


def _pte_size(ram: GuestRam) -> int:
    return 8 if ram.pae else 4


def _put_entry(ram: GuestRam, pa: int, value: int) -> None:
    struct.pack_into("<Q" if ram.pae else "<I", ram.buf, pa, value)


def init_hole(ram: GuestRam) -> None:
    """Fill the hole's frames: the m2p's L1, every vCPU's GDT window (no guest GDT yet), Xen's reserved entries, the
    zero page and the trampoline. (PAE: 64-bit entries; a 2 MiB m2p L1 covers 512 m2p pages, 2 GiB of frames.)"""
    m2p_l1 = _pa(ram, HoleFrame.m2p_l1)
    for i in range(ram.m2p_pages):
        _put_entry(ram, m2p_l1 + _pte_size(ram) * i, ram.m2p_paddr + i * PAGE_SIZE | PTE_M2P)
    ram.write_pa(_pa(ram, HoleFrame.xen_gdt), reserved_gdt_page())
    ram.write_pa(_pa(ram, HoleFrame.zero), bytes(PAGE_SIZE))
    ram.write_pa(_pa(ram, HoleFrame.trampoline), _IRETD.ljust(PAGE_SIZE, b"\xcc"))
    for vid in range(XEN_LEGACY_MAX_VCPUS):
        map_gdt(ram, vid, [])
        _set_window_pte(ram, vid, FIRST_RESERVED_GDT_PAGE, _pa(ram, HoleFrame.xen_gdt))
        _set_window_pte(ram, vid, TRAMPOLINE_WINDOW_PAGE, _pa(ram, HoleFrame.trampoline))


def install_hole(ram: GuestRam, l2_pa: int) -> None:
    """Point the hole's slots of the page directory at ``l2_pa`` at the hypervisor's L1s. For PAE ``l2_pa`` is the
    L3 (the CR3), and the slots are those of the L2 its slot 3 names, as Xen's init_xen_pae_l2_slots fills the
    PGT_pae_xen_l2 L2 (nothing when that slot is not present: the hypervisor never lets such an L3 be a base)."""
    if ram.pae:
        _install_pae_hole(ram, l2_pa)
        return
    for slot, which in ((M2P_SLOT, HoleFrame.m2p_l1), (PERDOMAIN_SLOT, HoleFrame.perdomain_l1)):
        if l2_pa + slot * 4 + 4 <= ram.size:
            struct.pack_into("<I", ram.buf, l2_pa + slot * 4, _pa(ram, which) | PDE_FLAGS)


def pae_hole_slots(ram: GuestRam) -> dict[int, int]:
    """A PAE domain's hole L2 slots -> the hypervisor L1 frame's physical address each names."""
    return {PAE_M2P_SLOT: _pa(ram, HoleFrame.m2p_l1), PAE_PERDOMAIN_SLOT: _pa(ram, HoleFrame.perdomain_l1),
            PAE_PERDOMAIN_SLOT + 1: _pa(ram, HoleFrame.perdomain_l1_hi)}


def _install_pae_hole(ram: GuestRam, l3_pa: int) -> None:
    at = l3_pa + PAE_HOLE_L3_SLOT * 8
    if at + 8 > ram.size:
        return
    (l3e,) = struct.unpack_from("<Q", ram.buf, at)
    l2_pa = l3e & paging_pae.ADDR_MASK
    if not l3e & 1 or l2_pa + PAGE_SIZE > ram.size:
        return
    for slot, l1_pa in pae_hole_slots(ram).items():
        struct.pack_into("<Q", ram.buf, l2_pa + slot * 8, l1_pa | PDE_FLAGS)


def _window_pte_pa(ram: GuestRam, index: int) -> int:
    """Physical address of the per-domain area's PTE ``index`` (pages from PERDOMAIN_VIRT_START): one 1024-entry
    L1 non-PAE, two 512-entry ones PAE."""
    if not ram.pae:
        return _pa(ram, HoleFrame.perdomain_l1) + 4 * index
    which = HoleFrame.perdomain_l1 if index < paging_pae.ENTRIES else HoleFrame.perdomain_l1_hi
    return _pa(ram, which) + 8 * (index % paging_pae.ENTRIES)


def _set_window_pte(ram: GuestRam, vid: int, page: int, pa: int) -> None:
    index = (gdt_base(vid) - PERDOMAIN_VIRT_START >> 12) + page
    _put_entry(ram, _window_pte_pa(ram, index), pa | PTE_RAM_RO)


def map_gdt(ram: GuestRam, vid: int, frames: list[int]) -> None:
    """Show the guest's GDT ``frames`` (validated by the hypervisor) in vCPU ``vid``'s window, the zero page after
    them."""
    zero = _pa(ram, HoleFrame.zero)
    for page in range(FIRST_RESERVED_GDT_PAGE):
        pa = frames[page] * PAGE_SIZE if page < len(frames) else zero
        _set_window_pte(ram, vid, page, pa)


def set_descriptor_accessed(ram: GuestRam, vid: int, cr2: int) -> bool:
    """The CPU's own write of a descriptor's accessed bit when it loads a segment from the guest's part of the GDT,
    which faults because the window is read-only to it: done here, where Xen's CPU would do it through Xen's
    writable mapping. False if ``cr2`` is not such a write (the page fault is the guest's)."""
    offset = cr2 - gdt_base(vid)
    if not 0 <= offset < FIRST_RESERVED_GDT_BYTE:
        return False
    pte_pa = _window_pte_pa(ram, (cr2 - PERDOMAIN_VIRT_START) >> 12)
    (pte,) = struct.unpack_from("<Q" if ram.pae else "<I", ram.buf, pte_pa)
    desc_pa = (pte & 0xFFFFF000) + (offset & 0xFF8)
    if pte & 0xFFFFF000 == _pa(ram, HoleFrame.zero) or desc_pa + 8 > ram.nr_pages * PAGE_SIZE:
        return False
    (desc,) = struct.unpack_from("<Q", ram.buf, desc_pa)
    if desc & _DESC_S_PRESENT != _DESC_S_PRESENT or desc & _DESC_ACCESSED:
        return False
    struct.pack_into("<Q", ram.buf, desc_pa, desc | _DESC_ACCESSED)
    return True


# -- moving a vCPU between rings ----------------------------------------------------------------------------


def cpl(uc: Uc) -> int:
    return int(uc.reg_read(X.UC_X86_REG_SS)) & 3


def _drop_to_ring0(uc: Uc) -> None:
    """CPL 0 on the hypervisor's flat segments: SS loaded in real mode takes DPL 0, then the real load."""
    cr0 = int(uc.reg_read(X.UC_X86_REG_CR0))
    uc.reg_write(X.UC_X86_REG_CR0, cr0 & ~(_CR0_PE | _CR0_PG))
    uc.reg_write(X.UC_X86_REG_SS, 0)
    uc.reg_write(X.UC_X86_REG_CR0, cr0)
    uc.reg_write(X.UC_X86_REG_SS, HYPERVISOR_DS)
    uc.reg_write(X.UC_X86_REG_CS, HYPERVISOR_CS)


def transfer(uc: Uc, ram: GuestRam, vid: int, eip: int, cs: int, eflags: int, esp: int, ss: int) -> bool:
    """Continue the vCPU at cs:eip with ss:esp and ``eflags``, in the ring ``cs`` names (1 or 3). True when it goes
    through the trampoline: its ``iretd`` is then the next instruction the vCPU runs."""
    target, now = cs & 3, cpl(uc)
    if target == now:
        for reg, sel in ((X.UC_X86_REG_CS, cs), (X.UC_X86_REG_SS, ss)):
            if int(uc.reg_read(reg)) != sel:
                uc.reg_write(reg, sel)
        for reg, value in ((X.UC_X86_REG_ESP, esp), (X.UC_X86_REG_EFLAGS, eflags), (X.UC_X86_REG_EIP, eip)):
            uc.reg_write(reg, value & 0xFFFFFFFF)
        return False
    if target < now:
        _drop_to_ring0(uc)
        now = 0
    slot = _pa(ram, HoleFrame.trampoline) + _frame_offset(vid)
    struct.pack_into("<5I", ram.buf, slot, eip & 0xFFFFFFFF, cs, eflags & 0xFFFFFFFF, esp & 0xFFFFFFFF, ss)
    uc.reg_write(X.UC_X86_REG_CS, FLAT_CS[now])
    uc.reg_write(X.UC_X86_REG_SS, FLAT_DS[now])
    uc.reg_write(X.UC_X86_REG_ESP, trampoline_va(vid) + _frame_offset(vid))
    uc.reg_write(X.UC_X86_REG_EIP, trampoline_va(vid))
    return True


def ptwr_slot(ram: GuestRam, vid: int) -> tuple[int, int]:
    """(virtual, physical) address of vCPU ``vid``'s 16 bytes for an emulated page-table write's request: in the
    trampoline page, which the guest can read but not write, so the request cannot change after the trap."""
    offset = _PTWR_AREA + vid * _PTWR_STRIDE
    return trampoline_va(vid) + offset, _pa(ram, HoleFrame.trampoline) + offset


def trampoline_iret() -> bytes:
    """The trampoline's one instruction (the vCPU's clock does not count it: ``Vcpu._transfer``)."""
    return _IRETD


# -- QEMU's exception in flight ------------------------------------------------------------------------------


@functools.cache
def _old_exception_offset() -> int | None:
    """Where the saved CPU context of this Unicorn build keeps QEMU's ``old_exception``: the one int that is -1 in a
    fresh CPU and 0 after a #DE the hook took. None if that cannot be told (then nothing is reset)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x2000)
    uc.mem_write(0x1000, b"\x31\xc9\xf7\xf1")  # xor ecx, ecx; div ecx
    before = bytes(uc.context_save())
    uc.hook_add(UC_HOOK_INTR, lambda u, intno, _: u.emu_stop())
    uc.emu_start(0x1000, 0x1FFF)
    after = bytes(uc.context_save())
    found = [o for o in range(0, len(before) - 3, 4)
             if before[o : o + 4] == b"\xff\xff\xff\xff" and after[o : o + 4] == bytes(4)]
    return found[0] if len(found) == 1 else None


def clear_exception(uc: Uc) -> None:
    """Forget the exception in flight, as a delivery through the IDT would have."""
    offset = _old_exception_offset()
    if offset is None:
        return
    ctx = uc.context_save()
    address = ctypes.cast(ctx.context, ctypes.c_void_p).value
    if address is None:
        return
    ctypes.memmove(address + offset, b"\xff\xff\xff\xff", 4)
    uc.context_restore(ctx)
