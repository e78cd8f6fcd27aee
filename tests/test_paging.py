"""Two-level x86-32 paging on the domain side: the software walk, the builder's initial tables, per-vCPU TLBs
(a PTE change is not seen by another vCPU until its TLB is flushed), read-only page tables, and the domain
process's accesses by virtual address (the SetVaPte effect, copy-in, hypercall results)."""

from __future__ import annotations

import struct

import keystone
import pytest
from helpers import RecordingLog
from unicorn.x86_const import UC_X86_REG_CR0

from domains import paging
from domains.builder import SPECIAL_PAGES, build_domain
from domains.memory import GuestRam
from domains.paging import PTE_PRESENT, PTE_RW, pte_address, read_virt, translate, write_virt
from domains.runtime import DomainProcess
from domains.vcpu import APIC_BASE, InsnCounter, Vcpu, VcpuState, flat_gdt
from hypervisor.hypercall_page import hypercall_page
from hypervisor.vmi_rom import VMI_ROM_BASE, vmi_rom
from pvcluster.abi.layouts import StartInfo
from pvcluster.abi.platform import (
    GRANT_FRAME_BASE,
    HOLE_FRAMES,
    M2P_FRAME_BASE,
    MAX_GRANT_FRAMES,
    HoleFrame,
    hole_frame,
)
from pvcluster.abi.xen import MACH2PHYS_VIRT_START_NONPAE, PAGE_SIZE
from pvcluster.bus.effects import Effect, SetVaPte
from pvcluster.bus.messages import Build, HypercallResult, MemWrite

BASE = 0xC0000000
MEM = 1 << 20


def _u32(ram: GuestRam, pa: int) -> int:
    return int(struct.unpack_from("<I", ram.buf, pa)[0])


def _put(ram: GuestRam, pa: int, value: int) -> None:
    struct.pack_into("<I", ram.buf, pa, value)


# -- the walk on a hand-built table ----------------------------------------------------------------------------

L2, L1 = 0x10000, 0x11000
RW, RO = PTE_PRESENT | PTE_RW, PTE_PRESENT


def _hand_built() -> GuestRam:
    """VA BASE+0 -> PA 0x20000 (rw), BASE+0x1000 -> 0x30000 (ro), BASE+0x2000 not present, BASE+0x3000 ->
    0x40000 (rw), BASE+0x4000 -> the APIC page; VA 0x400000 under a read-only PDE -> 0x50000."""
    ram = GuestRam(MEM, BASE)
    _put(ram, L2 + (BASE >> 22) * 4, L1 | RW)
    _put(ram, L1 + 0 * 4, 0x20000 | RW)
    _put(ram, L1 + 1 * 4, 0x30000 | RO)
    _put(ram, L1 + 3 * 4, 0x40000 | RW)
    _put(ram, L1 + 4 * 4, APIC_BASE | RW)
    _put(ram, L2 + 1 * 4, 0x12000 | RO)
    _put(ram, 0x12000, 0x50000 | RW)
    for pa, byte in ((0x20000, 0x11), (0x30000, 0x22), (0x40000, 0x44), (0x50000, 0x55)):
        ram.write_pa(pa, bytes([byte]) * PAGE_SIZE)
    return ram


def test_walk_present_missing_and_read_only() -> None:
    ram = _hand_built()
    assert translate(ram, L2, BASE + 0x123, False) == 0x20123
    assert translate(ram, L2, BASE + 0x123, True) == 0x20123
    assert translate(ram, L2, BASE + 0x1FFF, False) == 0x30FFF
    assert translate(ram, L2, BASE + 0x1000, True) is None  # read-only PTE
    assert translate(ram, L2, BASE + 0x2000, False) is None  # PTE not present
    assert translate(ram, L2, BASE + (4 << 22), False) is None  # PDE not present
    assert translate(ram, L2, 0x400010, False) == 0x50010
    assert translate(ram, L2, 0x400010, True) is None  # read-only PDE, writable PTE
    assert translate(ram, L2 | 0x18, BASE, False) == 0x20000  # CR3's flag bits are not part of the address


def test_walk_ranges_crossing_pages() -> None:
    ram = _hand_built()
    assert read_virt(ram, L2, BASE + 0xFFE, 4) == b"\x11\x11\x22\x22"
    assert read_virt(ram, L2, BASE + 0xFFE, 4, write=True) is None  # the second page is read-only
    assert read_virt(ram, L2, BASE + 0x1FFE, 4) is None  # runs into the missing page
    assert read_virt(ram, L2, BASE, 0) == b""
    assert read_virt(ram, L2, 0xFFFFFFFE, 4) is None  # wraps the address space
    # all or nothing: a write that reaches the read-only page writes no byte
    assert not write_virt(ram, L2, BASE + 0xFFE, b"abcd")
    assert ram.read_pa(0x20FFE, 2) == b"\x11\x11"
    _put(ram, L1 + 1 * 4, 0x30000 | RW)
    assert write_virt(ram, L2, BASE + 0xFFE, b"abcd")
    assert ram.read_pa(0x20FFE, 2) == b"ab" and ram.read_pa(0x30000, 2) == b"cd"


def test_walk_does_not_reach_outside_ram() -> None:
    ram = _hand_built()
    assert translate(ram, L2, BASE + 0x4010, False) == APIC_BASE + 0x10  # mapped...
    assert read_virt(ram, L2, BASE + 0x4010, 4) is None  # ...but not RAM
    assert not write_virt(ram, L2, BASE + 0x4010, b"\0")
    assert translate(ram, MEM + 2 * PAGE_SIZE, BASE, False) is None  # a CR3 outside RAM maps nothing


def test_pte_address() -> None:
    ram = _hand_built()
    assert pte_address(ram, L2, BASE + 0x1234) == L1 + 4
    assert pte_address(ram, L2, BASE + 0x2000) == L1 + 8  # the entry exists even when it is not present
    assert pte_address(ram, L2, BASE + (4 << 22)) is None  # no L1 table there


# -- the builder's tables ----------------------------------------------------------------------------------------


def _build(backend: str, memory: int = 4 << 20, rom: bytes = b"") -> Build:
    return Build(domid=1, name="t", vcpus=2, memory_bytes=memory, kernel="pvkern", cmdline="", backend=backend,
                 boot="ebx", patching=True, hypercall_page=hypercall_page(), ps_per_instr=1000, rom=rom)


@pytest.mark.parametrize("backend", ["xen", "native", "vmi"])
def test_builder_maps_ram_linearly_with_read_only_tables_for_pv(backend: str) -> None:
    rom = vmi_rom() if backend == "vmi" else b""
    ram, boot = build_domain(_build(backend, rom=rom))
    cr3 = boot.cr3
    frames = (boot.l2_mfn, *boot.l1_mfns)
    assert cr3 == boot.l2_mfn * PAGE_SIZE and boot.pt_base == BASE + cr3
    # 4 MiB + 2 pages of RAM need two L1 tables, the APIC page one more, the ROM another (xen's m2p is mapped by the
    # hypervisor's own L1, in the hole)
    assert len(boot.l1_mfns) == 3 + bool(rom)
    assert all(pa * PAGE_SIZE < 4 << 20 for pa in frames)
    assert boot.l1_mfns == tuple(range(boot.l2_mfn + 1, boot.l2_mfn + 1 + len(boot.l1_mfns)))
    assert boot.l2_mfn * PAGE_SIZE >= boot.stack_top - BASE  # after the boot stack
    si = ram.read_pa(boot.start_info - BASE, 68)
    pt_base, nr_pt_frames = struct.unpack_from("<II", si, 60)
    assert (pt_base, nr_pt_frames) == (boot.pt_base, boot.nr_pt_frames) == (BASE + cr3, len(frames))
    mapped = (ram.nr_pages + GRANT_FRAME_BASE) * PAGE_SIZE  # RAM, shared_info, the GDT frame
    for pa in range(0, mapped, PAGE_SIZE):
        va = BASE + pa
        assert translate(ram, cr3, va + 0x7, False) == pa + 0x7
        writable = translate(ram, cr3, va, True) is not None
        assert writable is (backend == "native" or pa // PAGE_SIZE not in frames), hex(pa)
    # nothing past the two extra frames: the grant frames are mapped only once the guest's table has grown to them
    assert translate(ram, cr3, BASE + mapped, False) is None
    assert translate(ram, cr3, BASE - PAGE_SIZE, False) is None
    apic_pte = _u32(ram, pte_address(ram, cr3, APIC_BASE) or -1)
    assert apic_pte == APIC_BASE | 0x1B  # present, rw, PCD, PWT
    rom_pte = pte_address(ram, cr3, VMI_ROM_BASE)
    if rom:
        assert rom_pte is not None and _u32(ram, rom_pte) == VMI_ROM_BASE | PTE_PRESENT
        assert translate(ram, cr3, VMI_ROM_BASE + 4, True) is None
    else:
        assert rom_pte is None
    assert _u32(ram, cr3 + (BASE >> 22) * 4) & 0xFFF == 0x27
    assert _u32(ram, pte_address(ram, cr3, BASE) or -1) & 0xFFF == 0x63


@pytest.mark.parametrize("memory", [4 << 20, 6 << 20])
def test_builder_fills_mfn_list_with_the_identity_p2m_after_the_kernel(memory: int) -> None:
    ram, boot = build_domain(_build("xen", memory))
    mfn_list = struct.unpack_from("<I", ram.read_pa(boot.start_info - BASE, 72), 68)[0]  # start_info.mfn_list
    assert mfn_list == boot.mfn_list
    # xc_dom's "phys2mach" segment: page-aligned right after the kernel, before start_info
    assert mfn_list == (boot.image.image_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    assert mfn_list + ram.nr_pages * 4 <= boot.start_info
    # read through the guest's initial tables, as the guest reads it
    table = read_virt(ram, boot.cr3, mfn_list, ram.nr_pages * 4)
    assert table is not None and struct.unpack(f"<{ram.nr_pages}I", table) == tuple(range(ram.nr_pages))
    assert translate(ram, boot.cr3, mfn_list, True) is not None  # the guest's own page: it may update its p2m


@pytest.mark.parametrize("backend", ["xen", "native", "vmi"])
@pytest.mark.parametrize("memory", [4 << 20, 6 << 20])
def test_builder_maps_the_m2p_read_only_at_mach2phys_virt_start(backend: str, memory: int) -> None:
    ram, boot = build_domain(_build(backend, memory, rom=vmi_rom() if backend == "vmi" else b""))
    pages = -(-ram.nr_pages * 4 // PAGE_SIZE)
    assert (ram.m2p_pages, ram.m2p_paddr) == (pages, memory + M2P_FRAME_BASE * PAGE_SIZE)
    assert M2P_FRAME_BASE == GRANT_FRAME_BASE + MAX_GRANT_FRAMES  # after the grant frames
    assert ram.size == ram.m2p_paddr + (pages + HOLE_FRAMES) * PAGE_SIZE  # then the hole's frames
    m2p = MACH2PHYS_VIRT_START_NONPAE
    if backend != "xen":  # Xen's hypervisor hole: only a Xen guest finds the table there
        assert translate(ram, boot.cr3, m2p, False) is None
        return
    for i in range(pages):
        assert translate(ram, boot.cr3, m2p + i * PAGE_SIZE, False) == ram.m2p_paddr + i * PAGE_SIZE
        assert translate(ram, boot.cr3, m2p + i * PAGE_SIZE, True) is None  # read-only
        assert _u32(ram, pte_address(ram, boot.cr3, m2p + i * PAGE_SIZE) or -1) & 0xFFF == 0x61
    # the L2 slot points at the hypervisor's L1 (a hole frame), not at one of the guest's page-table frames
    m2p_l1 = hole_frame(ram.nr_pages, HoleFrame.m2p_l1)
    assert _u32(ram, boot.cr3 + (m2p >> 22) * 4) >> 12 == m2p_l1 and m2p_l1 not in boot.l1_mfns
    assert translate(ram, boot.cr3, m2p + pages * PAGE_SIZE, False) is None  # only this domain's frames
    table = read_virt(ram, boot.cr3, m2p, ram.nr_pages * 4)
    assert table is not None and struct.unpack(f"<{ram.nr_pages}I", table) == tuple(range(ram.nr_pages))
    assert not write_virt(ram, boot.cr3, m2p, b"\0\0\0\0")
    # the m2p's frames are outside the linear map of RAM + shared_info + GDT frame
    assert translate(ram, boot.cr3, BASE + ram.m2p_paddr, False) is None
    # the vCPUs' GDT windows: Xen's reserved entries at 0xe000 in each, read-only
    gdt = 0xFC400000
    assert read_virt(ram, boot.cr3, gdt + 0xE018, 8) == struct.pack("<II", 0xFFFF, 0x00CFBB00)
    assert not write_virt(ram, boot.cr3, gdt + 0xE018, bytes(8))


def test_start_info_packs_the_page_tables() -> None:
    packed = StartInfo(nr_pages=1, shared_info=0, pt_base=0xC0123000, nr_pt_frames=3).pack()
    assert struct.unpack_from("<II", packed, 60) == (0xC0123000, 3)


def test_builder_refuses_when_the_page_tables_do_not_fit() -> None:
    from domains.elf_load import ImageError

    _, boot = build_domain(_build("xen"))
    # under 4 MiB: the L2, one L1 for RAM, one for the APIC; then the xenstore and console pages
    needed = boot.cr3 + 3 * PAGE_SIZE + SPECIAL_PAGES * PAGE_SIZE
    end = boot.l2_mfn + boot.nr_pt_frames  # the xenstore and console pages follow the tables
    assert (boot.store_mfn, boot.console_mfn) == (end, end + 1)
    with pytest.raises(ImageError) as info:
        build_domain(_build("xen", memory=needed - PAGE_SIZE))
    assert info.value.code == "image-too-large" and "page tables" in info.value.message
    _, small = build_domain(_build("xen", memory=needed))  # exactly enough
    assert small.nr_pt_frames == 3


# -- vCPUs: per-vCPU TLBs, faults -------------------------------------------------------------------------------

_ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
CODE_VA = BASE + 0x1000
X_VA = BASE + 0x10000  # the page both vCPUs read
FRAME_A, FRAME_B = 0x20000, 0x21000


def _machine(backend: str = "xen", vcpus: int = 2) -> tuple[GuestRam, list[Vcpu], int]:
    ram = GuestRam(MEM, BASE)
    ram.write_pa(ram.gdt_paddr, flat_gdt())
    maps = paging.initial_mappings(BASE, ram.size, mmio=(APIC_BASE,))
    tables = paging.build_initial_tables(ram, 0xF0000, maps, tables_read_only=backend != "native")
    counter = InsnCounter()
    cpus = [Vcpu(v, ram, counter, 1000, tables.l2) for v in range(vcpus)]
    ram.write_pa(FRAME_A, b"\xaa" * PAGE_SIZE)
    ram.write_pa(FRAME_B, b"\xbb" * PAGE_SIZE)
    _put(ram, pte_address(ram, tables.l2, X_VA) or -1, FRAME_A | paging.PTE_RAM)
    return ram, cpus, tables.l2


def _run(vcpu: Vcpu, source: str, at: int = CODE_VA) -> None:
    code = bytes(_ks.asm(source, at)[0])
    vcpu.ram.write_pa(at - BASE, code)
    vcpu.set_regs({"eip": at, "esp": BASE + 0x80000, "eflags": 0x2})
    vcpu.state = VcpuState.RUNNING
    vcpu.run(vcpu.clock_ns + 100_000)


def test_vcpus_run_with_paging_on() -> None:
    _, cpus, cr3 = _machine()
    for v in cpus:
        cr0 = int(v.uc.reg_read(UC_X86_REG_CR0))
        assert cr0 & (1 << 31) and cr0 & (1 << 16) and v.cr3 == cr3


def test_a_stale_tlb_entry_survives_a_pte_change_until_that_vcpu_flushes() -> None:
    ram, (v0, v1), cr3 = _machine()
    read_x = f"mov eax, dword ptr [{X_VA:#x}]\n hlt"
    for v in (v0, v1):
        _run(v, read_x)
        assert v.state is VcpuState.BLOCKED and v.reg("eax") == 0xAAAAAAAA
    # the "hypervisor" (the host) repoints X at frame B and flushes only vCPU 0
    _put(ram, pte_address(ram, cr3, X_VA) or -1, FRAME_B | paging.PTE_RAM)
    v0.flush_tlb()
    _run(v0, read_x)
    _run(v1, read_x)
    assert v0.reg("eax") == 0xBBBBBBBB
    assert v1.reg("eax") == 0xAAAAAAAA  # stale: vCPU 1 still holds the old translation
    assert read_virt(ram, v1.cr3, X_VA, 4) == b"\xbb" * 4  # the software walk reads the tables as they are
    v1.flush_tlb()
    _run(v1, read_x)
    assert v1.reg("eax") == 0xBBBBBBBB


def test_a_guest_pte_write_is_stale_on_the_other_vcpu_until_its_invlpg() -> None:
    # native backend: the guest writes its own (writable) page tables, then each vCPU invlpg's for itself
    ram, (v0, v1), cr3 = _machine("native")
    pte_va = BASE + (pte_address(ram, cr3, X_VA) or -1)
    read_x = f"mov eax, dword ptr [{X_VA:#x}]\n hlt"
    for v in (v0, v1):
        _run(v, read_x)
    _run(v0, f"mov dword ptr [{pte_va:#x}], {FRAME_B | 0x63:#x}\n invlpg [{X_VA:#x}]\n"
             f" mov eax, dword ptr [{X_VA:#x}]\n hlt", at=CODE_VA + 0x100)
    assert v0.state is VcpuState.BLOCKED and v0.reg("eax") == 0xBBBBBBBB
    _run(v1, read_x)
    assert v1.reg("eax") == 0xAAAAAAAA
    _run(v1, f"invlpg [{X_VA:#x}]\n mov eax, dword ptr [{X_VA:#x}]\n hlt", at=CODE_VA + 0x200)
    assert v1.reg("eax") == 0xBBBBBBBB


def test_a_guest_write_to_its_read_only_page_table_faults() -> None:
    ram, (v0, _), cr3 = _machine("xen")
    pte_pa = pte_address(ram, cr3, X_VA) or -1
    before = _u32(ram, pte_pa)
    _run(v0, "mov eax, 1\n hlt")  # a hypercall-free warm-up, then the write
    _run(v0, f"mov dword ptr [{BASE + pte_pa:#x}], {FRAME_B | 0x63:#x}\n hlt", at=CODE_VA + 0x100)
    f = v0.fault
    assert v0.state is VcpuState.CRASHED and f is not None
    assert f.kind == "page-fault" and f.cr2 == BASE + pte_pa and f.write is True
    assert f.eip == CODE_VA + 0x100 and f"{BASE + pte_pa:#010x}" in f.detail and "write" in f.detail
    assert f.disasm.startswith("mov dword ptr")
    assert _u32(ram, pte_pa) == before


def test_a_read_of_an_unmapped_page_after_a_hypercall_is_a_read_page_fault() -> None:
    _, (v0, _), _ = _machine()
    _run(v0, "int 0x82")
    assert v0.state is VcpuState.HYPERCALL
    v0.complete_trap(0, v0.clock_ns)
    _run(v0, "mov eax, dword ptr [0x1000]\n hlt", at=CODE_VA + 0x100)
    f = v0.fault
    assert f is not None and f.kind == "page-fault" and f.cr2 == 0x1000 and f.write is False
    assert "not present" in f.detail


def test_interrupt_frames_go_through_the_page_tables() -> None:
    # a stack in a read-only page cannot take the frame: the vCPU double-faults instead of corrupting it
    ram, (v0, _), cr3 = _machine()
    v0.upcall_eip = CODE_VA
    ro_stack = BASE + 0xF0000 + PAGE_SIZE  # top of the (read-only) L2 page
    v0.set_regs({"eip": CODE_VA, "esp": ro_stack, "eflags": 0x2})
    assert not v0._enter(CODE_VA, clear_if=True)
    assert v0.fault is not None and v0.fault.kind == "double-fault"
    _, (v1, _), _ = _machine()
    v1.set_regs({"eip": CODE_VA + 5, "esp": BASE + 0x80000, "eflags": 0x202})
    assert v1._enter(CODE_VA, clear_if=True)
    assert read_virt(ram, cr3, BASE + 0x80000 - 12, 12) is not None


# -- the domain process: SetVaPte, results, copy-in ------------------------------------------------------------


def _domain(backend: str = "xen") -> tuple[DomainProcess, RecordingLog]:
    log = RecordingLog()
    dom = DomainProcess(None, 1, "t", log)  # type: ignore[arg-type]
    result = dom._build(_build(backend))
    assert result.ok
    return dom, log


def _result(vcpu: int, writes: list[MemWrite] | None = None, effects: list[Effect] | None = None,
            ) -> HypercallResult:
    return HypercallResult(vcpu=vcpu, seq=0, vt_ns=0, value=0, writes=writes or [], effects=effects or [],
                           complete=False)


def test_set_va_pte_writes_the_l1_entry_of_the_calling_vcpu_tables() -> None:
    dom, log = _domain()
    assert dom.ram is not None and dom.boot is not None
    ram, cr3 = dom.ram, dom.boot.cr3
    va = BASE + 0x3000
    dom._apply(_result(1, effects=[SetVaPte(vcpu=1, va=va, value=0x5000 | 0x63)]))
    assert translate(ram, cr3, va, True) == 0x5000
    dom._apply(_result(0, effects=[SetVaPte(vcpu=0, va=va, value=0)]))
    assert translate(ram, cr3, va, False) is None
    # a va whose PDE is empty has no L1 entry to write: traced, nothing written
    dom._apply(_result(0, effects=[SetVaPte(vcpu=0, va=0x1000, value=0x63)]))
    assert [f["va"] for e, f in log.events if e == "domain.bad_write"] == [0x1000]
    # an effect for a vCPU the domain lacks is traced and refused, never applied
    dom._apply(_result(0, effects=[SetVaPte(vcpu=5, va=va, value=0x5000 | 0x63)]))
    assert translate(ram, cr3, va, False) is None
    assert [f["kind"] for e, f in log.events if e == "domain.bad_effect"] == [SetVaPte.KIND]


def test_hypercall_results_are_written_through_the_page_tables() -> None:
    dom, log = _domain()
    assert dom.ram is not None and dom.boot is not None
    ram, cr3 = dom.ram, dom.boot.cr3
    target = BASE + 0x2FFE  # crosses into the next page
    dom._apply(_result(0, writes=[MemWrite(target, b"\x01\x02\x03\x04")]))
    assert ram.read_pa(0x2FFE, 4) == b"\x01\x02\x03\x04"
    # the page tables are read-only to a xen guest: the hypervisor's copy_to_guest cannot write them either
    dom._apply(_result(0, writes=[MemWrite(dom.boot.pt_base, b"\xff" * 4)]))
    assert ram.read_pa(cr3, 4) != b"\xff" * 4
    assert [f["addr"] for e, f in log.events if e == "domain.bad_write"] == [dom.boot.pt_base]


def test_copy_in_reads_through_the_trapping_vcpus_tables() -> None:
    dom, _ = _domain()
    assert dom.ram is not None and dom.boot is not None
    ram = dom.ram
    v0 = dom.vcpus[0]
    buf_va = BASE + 0x7000
    ram.write_pa(0x7000, b"hello")
    # console_io write (18): cmd 0, count 5, buffer
    _run(v0, f"mov eax, 18\n xor ebx, ebx\n mov ecx, 5\n mov edx, {buf_va:#x}\n int 0x82", at=BASE + 0x9000)
    assert v0.state is VcpuState.HYPERCALL
    trap = v0.trap
    assert trap is not None and trap.args[:3] == [0, 5, buf_va]
    (region,) = dom._copy_in(v0, trap.nr, trap.args)
    assert (region.addr, region.data) == (buf_va, b"hello")
    # not mapped: data None, so the hypervisor answers -EFAULT
    (region,) = dom._copy_in(v0, trap.nr, [0, 5, 0x1000])
    assert region.data is None
    # another vCPU with other tables reads what its own tables map at that va
    v1 = dom.vcpus[1]
    other = 0x40000  # a copy of the page directory whose L1 for BASE maps buf_va's page to frame 0x8
    ram.write_pa(other, ram.read_pa(dom.boot.cr3, PAGE_SIZE))
    l1 = _u32(ram, dom.boot.cr3 + (BASE >> 22) * 4) & ~0xFFF
    ram.write_pa(other + PAGE_SIZE, ram.read_pa(l1, PAGE_SIZE))
    _put(ram, other + (BASE >> 22) * 4, (other + PAGE_SIZE) | 0x27)
    _put(ram, other + PAGE_SIZE + 7 * 4, 0x8000 | 0x63)
    ram.write_pa(0x8000, b"world")
    v1.set_cr3(other)
    (region,) = dom._copy_in(v1, trap.nr, trap.args)
    assert region.data == b"world"


def test_copy_in_of_a_span_the_hypervisor_writes_needs_it_writable() -> None:
    dom, _ = _domain()
    assert dom.boot is not None
    v0 = dom.vcpus[0]
    # evtchn_bind_ipi (event_channel_op 32, cmd 7) writes its port back into the struct
    (region,) = dom._copy_in(v0, 32, [7, BASE + 0x7000, 0, 0, 0])
    assert region.writable and region.data is not None
    (region,) = dom._copy_in(v0, 32, [7, dom.boot.pt_base, 0, 0, 0])  # a read-only page-table page
    assert region.writable and region.data is None


def test_set_cr3_switches_tables_and_drops_the_old_translations() -> None:
    ram, (v0, _), cr3 = _machine()
    read_x = f"mov eax, dword ptr [{X_VA:#x}]\n hlt"
    _run(v0, read_x)
    assert v0.reg("eax") == 0xAAAAAAAA
    # a copy of the page directory whose L1 for BASE maps X to frame B
    other = 0x60000
    ram.write_pa(other, ram.read_pa(cr3, PAGE_SIZE))
    l1 = _u32(ram, cr3 + (BASE >> 22) * 4) & ~0xFFF
    ram.write_pa(other + PAGE_SIZE, ram.read_pa(l1, PAGE_SIZE))
    _put(ram, other + (BASE >> 22) * 4, (other + PAGE_SIZE) | 0x27)
    _put(ram, (pte_address(ram, other, X_VA) or -1), FRAME_B | 0x63)
    v0.set_cr3(other)
    assert v0.cr3 == other
    _run(v0, read_x)
    assert v0.reg("eax") == 0xBBBBBBBB
    # and back: reloading CR3 drops the TLB even when the tables are the same
    v0.set_cr3(cr3)
    _run(v0, read_x)
    assert v0.reg("eax") == 0xAAAAAAAA
    _put(ram, pte_address(ram, cr3, X_VA) or -1, FRAME_B | 0x63)
    _run(v0, read_x)
    assert v0.reg("eax") == 0xAAAAAAAA  # stale
    v0.set_cr3(cr3)
    _run(v0, read_x)
    assert v0.reg("eax") == 0xBBBBBBBB


def test_code_fetch_follows_a_guest_remapping_its_own_code() -> None:
    # native: the guest calls into a page, points that page at another frame, invlpg's and calls it again, all
    # in one run; the instruction count follows the code that actually ran each time
    ram, (v0, _), cr3 = _machine("native")
    target = BASE + 0x30000
    ram.write_pa(0x30000, bytes(_ks.asm("nop\n nop\n nop\n mov ebx, 1\n ret", target)[0]))
    ram.write_pa(0x31000, bytes(_ks.asm("mov ebx, 7\n ret", target)[0]))
    pte_va = BASE + (pte_address(ram, cr3, target) or -1)
    _run(v0, f"call {target:#x}\n mov ecx, ebx\n mov dword ptr [{pte_va:#x}], {0x31000 | 0x63:#x}\n"
             f" invlpg [{target:#x}]\n call {target:#x}\n hlt")
    assert v0.state is VcpuState.BLOCKED and (v0.reg("ecx"), v0.reg("ebx")) == (1, 7)
    assert v0.instructions == 1 + 5 + 3 + 1 + 2 + 1
