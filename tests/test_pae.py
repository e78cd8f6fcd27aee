"""PAE (3-level, 64-bit entries) for a xen-3.0-x86_32p guest, in-process: the domain process's walks of PAE tables
(domains/paging_pae.py through domains/paging.py), the builder's initial PAE tables and hole (domains/builder.py,
domains/rings.py: as setup_pgtables_x86_32_pae in tools/libs/guest/xg_dom_x86.c and the PAE hole of
arch-x86/xen-x86_32.h), and the hypervisor's PAE page types and hypercalls (hypervisor/pagetypes.py, ptops.py,
mmu_update, update_va_mapping, mmuext_op, xen_version) on tables the builder made, copied in as the domain process
copies them. Every test here fails on the code before PAE (which refused PAE images and had no PAE walk).
(tests/test_pae_guest.py checks the same from a C guest in a real cluster.)"""

from __future__ import annotations

import struct
import weakref
from typing import Any

import attrs
import pytest
from helpers import call_events, core, make_call, run_handler
from test_libelf import _image, _notes

from domains import paging_pae, rings
from domains.builder import build_domain
from domains.elf_load import ImageError
from domains.memory import GuestRam
from domains.paging import pte_address, read_virt, translate, walk, write_virt
from domains.tablecopy import table_regions
from hypervisor.domain import Domain
from hypervisor.hypercall_page import hypercall_page
from hypervisor.hypercalls import memory_op, mmu_update, mmuext_op, update_va_mapping, xen_version
from hypervisor.pagetypes import PageType
from hypervisor.ptops import type_initial_pae_tables
from pvcluster.abi.copyin import copy_in
from pvcluster.abi.errno import Errno
from pvcluster.abi.platform import GRANT_FRAME_BASE, PERDOMAIN_VIRT_START, HoleFrame, hole_frame
from pvcluster.abi.xen import (
    DOMID_SELF,
    MACH2PHYS_VIRT_START_PAE,
    PAGE_SIZE,
    UVMF_INVLPG,
    UVMF_LOCAL,
    Hypercall,
    MemoryOp,
    MmuextCmd,
    XenVer,
)
from pvcluster.bus.effects import SetCr3, SetVaPte, WriteMachine
from pvcluster.bus.messages import Build, Region

BASE = 0xC0000000
P, RW, PDE, RO = 0x1, 0x2, 0x27, 0x21
_C = MmuextCmd
_HV: weakref.WeakKeyDictionary[Domain, Any] = weakref.WeakKeyDictionary()


def _u64(ram: GuestRam, pa: int) -> int:
    return int(struct.unpack_from("<Q", ram.buf, pa)[0])


# -- the walks ---------------------------------------------------------------------------------------------------


def _hand_tables(pae: bool) -> GuestRam:
    """An L3 at 0x1000 whose slot 3 names an L2 at 0x2000, whose slot 5 names an L1 at 0x3000, whose slot 7 maps
    frame 0x9 writable and slot 8 frame 0xA read-only (va 0xC0A07000 and 0xC0A08000)."""
    ram = GuestRam(1 << 20, BASE, pae=pae)
    struct.pack_into("<Q", ram.buf, 0x1000 + 3 * 8, 0x2000 | P)
    struct.pack_into("<Q", ram.buf, 0x2000 + 5 * 8, 0x3000 | PDE)
    struct.pack_into("<Q", ram.buf, 0x3000 + 7 * 8, 0x9000 | 0x63)
    struct.pack_into("<Q", ram.buf, 0x3000 + 8 * 8, 0xA000 | RO)
    return ram


def test_pae_walks_read_three_levels_of_64_bit_entries() -> None:
    ram = _hand_tables(pae=True)
    va, ro_va = 0xC0A07000, 0xC0A08000
    assert paging_pae.indices(va) == (3, 5, 7)
    assert translate(ram, 0x1000, va + 0x123, False) == 0x9123
    assert translate(ram, 0x1000, va, True) == 0x9000
    assert translate(ram, 0x1000, ro_va, True) is None and translate(ram, 0x1000, ro_va, False) == 0xA000
    assert translate(ram, 0x1000, 0x80A07000, False) is None  # L3 slot 2 not present
    assert pte_address(ram, 0x1000, va) == 0x3000 + 7 * 8
    assert pte_address(ram, 0x1000, 0xC0C00000) is None  # L2 slot 6 not present
    entries, frames = walk(ram, 0x1000, va + 0xFF0, 0x20)  # two pages
    assert entries == [0x1018, 0x2028, 0x3038, 0x1018, 0x2028, 0x3040] and frames == [0x9, 0xA]
    assert walk(ram, 0x1000, 0x40000000, 0) == ([0x1008], [-1])
    assert write_virt(ram, 0x1000, va + 4, b"pae!") and read_virt(ram, 0x1000, va + 4, 4) == b"pae!"
    assert not write_virt(ram, 0x1000, ro_va, b"x") and read_virt(ram, 0x1000, ro_va, 1, write=True) is None
    # the same bytes read as a non-PAE directory mean something else altogether
    assert translate(_hand_tables(pae=False), 0x1000, va, False) is None


def test_pae_hole_has_one_more_frame() -> None:
    assert GuestRam(1 << 20, BASE, pae=True).size == GuestRam(1 << 20, BASE).size + PAGE_SIZE


# -- the builder ---------------------------------------------------------------------------------------------------


def _pae_image(mode: str = "yes") -> bytes:
    return _image(notes=_notes(PAE_MODE=mode))


def _build(memory: int = 4 << 20, backend: str = "xen", vcpus: int = 2, mode: str = "yes") -> Build:
    return Build(domid=1, name="t", vcpus=vcpus, memory_bytes=memory, kernel="", cmdline="", backend=backend,
                 boot="ebx", patching=True, hypercall_page=hypercall_page(), ps_per_instr=1000,
                 rom=b"", image=_pae_image(mode))


@pytest.mark.parametrize("mode", ["yes", "yes[extended-cr3]"])
def test_builder_makes_3_level_tables_for_a_pae_guest(mode: str) -> None:
    ram, boot = build_domain(_build(mode=mode))
    assert ram.pae and boot.pae and boot.cr3 == boot.l2_mfn * PAGE_SIZE and boot.pt_base == BASE + boot.cr3
    l3 = boot.cr3
    # one L2 (slot 3: the kernel's GiB and the hole), three L1s (4 MiB + shared_info and the GDT frame)
    assert [_u64(ram, l3 + 8 * i) for i in range(4)] == [0, 0, 0, boot.l2_mfns[0] << 12 | P]
    assert len(boot.l2_mfns) == 1 and len(boot.l1_mfns) == 3 and boot.nr_pt_frames == 5
    l2 = boot.l2_mfns[0] << 12
    assert [_u64(ram, l2 + 8 * i) for i in range(3)] == [m << 12 | PDE for m in boot.l1_mfns]
    raw = ram.read_pa(boot.start_info - BASE, 72)
    assert raw[:16] == b"xen-3.0-x86_32p\0"
    pt_base, nr_pt_frames, mfn_list = struct.unpack_from("<III", raw, 60)
    assert (pt_base, nr_pt_frames, mfn_list) == (boot.pt_base, 5, boot.mfn_list)
    assert read_virt(ram, l3, mfn_list, 16) == struct.pack("<4I", 0, 1, 2, 3)
    frames = {boot.l2_mfn, *boot.l2_mfns, *boot.l1_mfns}
    for pa in range(0, (ram.nr_pages + GRANT_FRAME_BASE) * PAGE_SIZE, PAGE_SIZE):
        assert translate(ram, l3, BASE + pa + 5, False) == pa + 5
        assert (translate(ram, l3, BASE + pa, True) is None) is (pa >> 12 in frames), hex(pa)
    # the PAE hole: the m2p read-only at 0xF5800000, the GDT windows at 0xFC400000, no APIC page (it is Xen's)
    assert read_virt(ram, l3, MACH2PHYS_VIRT_START_PAE, 8) == struct.pack("<2I", 0, 1)
    assert translate(ram, l3, MACH2PHYS_VIRT_START_PAE, True) is None
    assert _u64(ram, l2 + rings.PAE_M2P_SLOT * 8) & ~0xFFF == hole_frame(ram.nr_pages, HoleFrame.m2p_l1) << 12
    xen_gdt = hole_frame(ram.nr_pages, HoleFrame.xen_gdt) << 12
    for vid in (0, 1, 16, 31):  # the last vCPUs' windows are in the second per-domain L1
        assert translate(ram, l3, rings.gdt_base(vid) + 14 * PAGE_SIZE, False) == xen_gdt
    assert rings.gdt_base(31) - PERDOMAIN_VIRT_START >= 2 << 20
    assert translate(ram, l3, 0xFEE00000, False) is None


def test_builder_refuses_pae_off_the_xen_backend_and_keeps_bimodal_non_pae() -> None:
    with pytest.raises(ImageError) as exc:
        build_domain(_build(backend="native"))
    assert exc.value.code == "pae-unsupported"
    ram, boot = build_domain(_build(mode="bimodal"))
    assert not ram.pae and not boot.pae and ram.read_pa(boot.start_info - BASE, 15) == b"xen-3.0-x86_32\0"


# -- the hypervisor, on the builder's tables ---------------------------------------------------------------------


class Pae:
    """A PAE domain: its RAM as the builder left it, and the hypervisor's Domain with its tables typed."""

    def __init__(self) -> None:
        hv = core()
        self.dom = hv.create_domain(hv.spec.domains[1])
        assert self.dom.spec.backend == "xen"
        self.dom.work_left = hv.work_budget
        _HV[self.dom] = hv
        self.ram, self.boot = build_domain(_build(memory=self.dom.nr_pages * PAGE_SIZE))
        b = self.boot
        tables = b"".join(self.ram.read_pa(m << 12, PAGE_SIZE) for m in (b.l2_mfn, *b.l2_mfns, *b.l1_mfns))
        type_initial_pae_tables(self.dom.frames, b.l2_mfn, [*b.l2_mfns, *b.l1_mfns], tables, 2)
        self.next_free = (b.l1_mfns[-1] + 8) << 12  # page-table-free frames past the builder's
        self.scratch = 0x300000  # guest buffers for the hypercalls' arguments (mapped writable)

    def regions(self, nr: int, args: list[int]) -> list[Region]:
        """What the domain process copies in (domains/runtime.py ``_copy_in``), through the vCPU's L3."""
        ram, cr3 = self.ram, self.boot.cr3

        def read(va: int, n: int, write: bool = False) -> bytes | None:
            return read_virt(ram, cr3, va, n, write)

        out = []
        spans = copy_in(nr, args, read)
        for s in spans:
            if not s.machine:
                data = read(s.addr, s.length, s.writable)
                entries, frames = walk(ram, cr3, s.addr, s.length)
                out.append(Region(s.addr, s.length, data, s.writable, entries,
                                  frames if data is not None and s.length else []))
        return out + table_regions(ram, spans)

    def call(self, handler: Any, nr: int, args: list[int]) -> tuple[int, Any]:
        call = make_call(_HV[self.dom], self.dom, nr, args, self.regions(nr, args))
        return run_handler(handler, call), call

    def mmu(self, reqs: list[tuple[int, int]]) -> tuple[int, Any]:
        data = b"".join(struct.pack("<QQ", p, v) for p, v in reqs)
        assert write_virt(self.ram, self.boot.cr3, BASE + self.scratch, data)
        return self.call(mmu_update, Hypercall.mmu_update, [BASE + self.scratch, len(reqs), 0, DOMID_SELF])

    def ext(self, cmd: int, mfn: int) -> tuple[int, Any]:
        assert write_virt(self.ram, self.boot.cr3, BASE + self.scratch, struct.pack("<3I", cmd, mfn, 0))
        return self.call(mmuext_op, Hypercall.mmuext_op, [BASE + self.scratch, 1, 0, DOMID_SELF])


def _denied(call: Any) -> list[str]:
    return [kw["reason"] for ev, kw in call_events(call) if ev == "mmu.denied"]


@pytest.fixture
def pae() -> Pae:
    return Pae()


def test_the_builders_pae_tables_are_typed_l3_l2_pae_xen_l1(pae: Pae) -> None:
    f, b = pae.dom.frames, pae.boot
    assert pae.dom.pae and f.type_of(b.l2_mfn) is PageType.L3 and f.is_pinned(b.l2_mfn)
    assert f.count(b.l2_mfn) == 3  # the pin and two vCPUs' bases
    assert f.type_of(b.l2_mfns[0]) is PageType.PAE_XEN_L2
    assert all(f.type_of(m) is PageType.L1 for m in b.l1_mfns)


def test_mmu_update_writes_64_bit_l1_entries_and_refuses_hole_slots(pae: Pae) -> None:
    b = pae.boot
    l1_entry = (b.l1_mfns[0] << 12) + (pae.next_free >> 12) * 8  # the linear map's entry of that frame
    val = pae.next_free | RO
    rc, call = pae.mmu([(l1_entry, val)])
    assert rc == 0 and call.effects == [WriteMachine(addr=l1_entry, data=struct.pack("<Q", val))]
    assert pae.dom.frames.entry(b.l1_mfns[0], pae.next_free >> 12) == val
    rc, call = pae.mmu([(l1_entry, val | 1 << 63)])  # NX: a flag bit above 51
    assert rc == -Errno.EINVAL and _denied(call) == ["pte-high-flags"]
    rc, call = pae.mmu([(l1_entry + 4, 0)])
    assert rc == -Errno.EINVAL and _denied(call) == ["pte-misaligned"]
    hole_l2 = b.l2_mfns[0] << 12
    for slot in (428, 482, 511):
        rc, call = pae.mmu([(hole_l2 + slot * 8, 0)])
        assert rc == -Errno.EPERM and _denied(call) == ["l2-slot-in-hypervisor-hole"], slot
    rc, call = pae.mmu([(hole_l2 + 427 * 8, 0)])  # the last guest slot of the hole's L2
    assert rc == 0
    rc, call = pae.mmu([((b.l2_mfn << 12) + 3 * 8, 0)])
    assert rc == -Errno.EPERM and _denied(call) == ["l3-slot-3-holds-hypervisor-hole"]


def test_update_va_mapping_takes_the_pae_layout(pae: Pae) -> None:
    va = BASE + pae.next_free
    lo, hi = (pae.next_free + PAGE_SIZE) | RO, 0
    rc, call = pae.call(update_va_mapping, Hypercall.update_va_mapping, [va, lo, hi, UVMF_INVLPG | UVMF_LOCAL])
    assert rc == 0 and call.effects[0] == SetVaPte(vcpu=0, va=va, value=lo)
    slot = (va >> 12) & 511
    assert pae.dom.frames.entry(pae.boot.l1_mfns[(va - BASE) >> 21], slot) == lo
    rc, call = pae.call(update_va_mapping, Hypercall.update_va_mapping, [va, lo, 0x80000000, UVMF_LOCAL])
    assert rc == -Errno.EINVAL and _denied(call) == ["pte-high-flags"] and call.effects == []
    # mapping a page table writable through the 64-bit layout: -EBUSY, as non-PAE
    table_va = BASE + (pae.boot.l1_mfns[0] << 12)
    rc, call = pae.call(update_va_mapping, Hypercall.update_va_mapping,
                        [table_va, pae.boot.l1_mfns[0] << 12 | 0x63, 0, UVMF_LOCAL])
    assert rc == -Errno.EBUSY and _denied(call) == ["writable-pagetable"]


def _make_read_only(pae: Pae, *pas: int) -> None:
    for pa in pas:
        rc, call = pae.call(update_va_mapping, Hypercall.update_va_mapping, [BASE + pa, pa | RO, 0, UVMF_LOCAL])
        assert rc == 0, _denied(call)
        pte = pte_address(pae.ram, pae.boot.cr3, BASE + pa)
        assert pte is not None
        pae.ram.write_pa(pte, struct.pack("<Q", pa | RO))


def test_pin_l3_and_new_baseptr_for_pae(pae: Pae) -> None:
    l1, l2, l3, bad = (pae.next_free + i * PAGE_SIZE for i in range(4))
    data = pae.next_free + 4 * PAGE_SIZE
    pae.ram.write_pa(l1 + 8, struct.pack("<Q", data | RO))
    pae.ram.write_pa(l2, struct.pack("<Q", l1 | PDE))
    pae.ram.write_pa(l3, struct.pack("<4Q", l2 | P, 0, 0, _u64(pae.ram, pae.boot.cr3 + 24)))
    pae.ram.write_pa(bad, struct.pack("<Q", l2 | P))
    _make_read_only(pae, l1, l2, l3, bad)
    rc, call = pae.ext(_C.PIN_L3_TABLE, bad >> 12)
    assert rc == -Errno.EINVAL and _denied(call) == ["l3-slot-3-not-present"]
    assert pae.dom.frames.type_of(l2 >> 12) is PageType.NONE  # nothing kept from the refused validation
    rc, call = pae.ext(_C.PIN_L3_TABLE, l3 >> 12)
    assert rc == 0, _denied(call)
    f = pae.dom.frames
    assert [f.type_of(m >> 12) for m in (l3, l2, l1)] == [PageType.L3, PageType.L2, PageType.L1]
    assert f.count(pae.boot.l2_mfns[0]) == 2  # the hole's L2, shared by both L3s
    rc, call = pae.ext(_C.NEW_BASEPTR, l3 >> 12)
    assert rc == 0 and SetCr3(vcpu=0, cr3=l3) in call.effects
    rc, call = pae.ext(_C.NEW_BASEPTR, l2 >> 12)  # an L2 is no PAE base
    assert rc == -Errno.EINVAL


def test_an_emulated_upper_half_write_that_leaves_an_invalid_entry_is_fixed_up(pae: Pae) -> None:
    """ptwr_emulated_update's fix-up for a 32-bit PAE guest (xen/arch/x86/pv/ro-page-fault.c): the present bit
    cleared instead of a refusal, only for a plain upper-half store (the fifth argument, domains/ptwr.py)."""
    entry = (pae.boot.l1_mfns[0] << 12) + (pae.next_free >> 12) * 8
    bad = 1 << 63 | pae.next_free | RO  # NX: refused as it stands
    for hint, want in ((0, -Errno.EINVAL), (1, 0)):
        data = struct.pack("<QQ", entry, bad)
        assert write_virt(pae.ram, pae.boot.cr3, BASE + pae.scratch, data)
        args = [BASE + pae.scratch, 1, 0, DOMID_SELF, hint]
        call = make_call(_HV[pae.dom], pae.dom, Hypercall.mmu_update, args, pae.regions(Hypercall.mmu_update, args))
        call.emulated = True
        assert run_handler(mmu_update, call) == want, hint
    assert call.effects == [WriteMachine(addr=entry, data=struct.pack("<Q", bad & ~1))]
    assert pae.dom.frames.entry(pae.boot.l1_mfns[0], pae.next_free >> 12) == bad & ~1


def test_ptwr_widens_a_half_store_to_the_64_bit_entry() -> None:
    from domains import ptwr

    store = ptwr.Store("mov", 2, 4, "eax", 0)
    assert ptwr.merge(0x11111111_22222222, 4, 4, 0xAAAAAAAA, 8) == 0xAAAAAAAA_22222222
    assert ptwr.merge(0x11111111_22222222, 0, 4, 0xAAAAAAAA, 8) == 0x11111111_AAAAAAAA
    assert ptwr.merge(0x11111111_22222222, 4, 4, 0xAAAAAAAA) == 0x22222222  # non-PAE: 32 bits
    assert ptwr.part(0x11111111_22222222, 4, 4) == 0x11111111
    assert ptwr.upper_half(8, 4, store) == 1 and ptwr.upper_half(8, 0, store) == 0 and ptwr.upper_half(4, 0, store) == 0
    assert ptwr.upper_half(8, 4, attrs.evolve(store, kind="cmpxchg")) == 0


def test_mmu_update_of_an_l3_slot_is_mod_l3_entry(pae: Pae) -> None:
    l1, l2 = pae.next_free, pae.next_free + PAGE_SIZE
    pae.ram.write_pa(l2, struct.pack("<Q", l1 | PDE))
    _make_read_only(pae, l1, l2)
    assert pae.ext(_C.PIN_L2_TABLE, l2 >> 12)[0] == 0
    l3 = pae.boot.l2_mfn << 12
    rc, call = pae.mmu([(l3, l2 | P)])
    assert rc == 0 and call.effects == [WriteMachine(addr=l3, data=struct.pack("<Q", l2 | P))]
    assert pae.dom.frames.count(l2 >> 12) == 2  # the pin and the L3 entry
    rc, call = pae.mmu([(l3 + 8, l2 | P | RW)])  # an L3 entry has no RW (L3_DISALLOW_MASK)
    assert rc == -Errno.EINVAL and _denied(call) == ["l3e-bad-flags"]
    rc, call = pae.mmu([(l3 + 4 * 8, 0)])  # past the 4 slots
    assert rc == -Errno.EINVAL and _denied(call) == ["l3-slot-out-of-range"]
    assert pae.mmu([(l3, 0)])[0] == 0 and pae.dom.frames.count(l2 >> 12) == 1


def test_pin_l3_is_refused_for_a_non_pae_domain() -> None:
    hv = core()
    dom = hv.create_domain(hv.spec.domains[1])
    dom.work_left = hv.work_budget
    ops = struct.pack("<3I", _C.PIN_L3_TABLE, 0x100, 0)
    call = make_call(hv, dom, Hypercall.mmuext_op, [0x1000, 1, 0, DOMID_SELF], [Region(0x1000, 12, ops, False)])
    assert run_handler(mmuext_op, call) == -Errno.EINVAL and _denied(call) == ["no-such-level"]


def test_machphys_mfn_list_names_the_frames_mapped_at_the_pae_m2p(pae: Pae) -> None:
    """XENMEM_machphys_mfn_list for a PAE guest: the m2p's frames in 2 MiB extents, the first being the frame the
    builder mapped at MACH2PHYS_VIRT_START_PAE (compat_arch_memory_op lists what the hole maps)."""
    arg, out = BASE + pae.scratch, BASE + pae.scratch + 64
    assert write_virt(pae.ram, pae.boot.cr3, arg, struct.pack("<3I", 4, out, 0))
    rc, call = pae.call(memory_op, Hypercall.memory_op, [MemoryOp.machphys_mfn_list, arg])
    assert rc == 0
    first = struct.unpack("<I", call.mem.writes[0].data)[0]
    assert first << 12 == translate(pae.ram, pae.boot.cr3, MACH2PHYS_VIRT_START_PAE, False)
    assert struct.unpack_from("<I", call.mem.writes[-1].data, 8)[0] == 1  # nr_extents


def test_xen_version_reports_the_pae_guest_type(pae: Pae) -> None:
    buf = BASE + pae.scratch
    rc, call = pae.call(xen_version, Hypercall.xen_version, [XenVer.capabilities, buf])
    assert rc == 0 and call.mem.writes[0].data.rstrip(b"\0") == b"xen-3.0-x86_32p "
    rc, call = pae.call(xen_version, Hypercall.xen_version, [XenVer.platform_parameters, buf])
    assert rc == 0 and call.mem.writes[0].data[:4] == struct.pack("<I", 0xF5800000)
