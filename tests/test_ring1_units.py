"""In-process tests of the ring-1 machinery: privileged-instruction emulation (``domains/privop.py``), the virtual
IDT (``domains/traps.py``), the hypervisor hole's GDT and QEMU's exception-in-flight reset (``domains/rings.py``),
and the set_trap_table / stack_switch hypercalls of the hypervisor core."""

from __future__ import annotations

import struct
import weakref
from typing import Any

import attrs
import pytest
from helpers import core, make_call, run_handler
from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, Uc

from domains import privop, rings, traps
from hypervisor.domain import Domain
from hypervisor.hypercalls import set_trap_table, stack_switch
from pvcluster.abi import copyin
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import (
    FLAT_RING1_CS,
    FLAT_RING1_DS,
    FLAT_RING3_CS,
    FLAT_RING3_DS,
    HYPERVISOR_CS,
    HYPERVISOR_DS,
    XEN_CPUID_SIGNATURE_EBX,
    XEN_CPUID_SIGNATURE_ECX,
    XEN_CPUID_SIGNATURE_EDX,
    Hypercall,
)
from pvcluster.bus.effects import SetKernelStack, SetTrapTable
from pvcluster.bus.messages import Region

CR0 = 0x80010033  # PG, WP, NE, ET, MP, PE


@attrs.define
class FakeVcpu:
    """What emulation reads and writes of a vCPU."""

    regs: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(("eax", "ebx", "ecx", "edx", "esi", "edi"), 0))
    cr0_value: int = CR0
    cr3_value: int = 0x123000
    virt_cr2: int = 0
    virt_cr4: int = 0

    @property
    def cr0(self) -> int:
        return self.cr0_value

    @property
    def cr3(self) -> int:
        return self.cr3_value

    def reg(self, name: str) -> int:
        return self.regs[name]

    def set_regs(self, regs: dict[str, int]) -> None:
        self.regs.update(regs)

    def set_ts(self, ts: bool) -> None:
        self.cr0_value = self.cr0_value | 8 if ts else self.cr0_value & ~8


# -- privileged instructions --------------------------------------------------------------------------------


def test_control_register_reads_are_emulated() -> None:
    v = FakeVcpu(virt_cr2=0xC0DE0000, virt_cr4=0x600)
    assert privop.emulate_gp(v, bytes.fromhex("0f20c0")) == 3 and v.regs["eax"] == CR0  # mov eax, cr0
    assert privop.emulate_gp(v, bytes.fromhex("0f20d3")) == 3 and v.regs["ebx"] == 0xC0DE0000  # mov ebx, cr2
    assert privop.emulate_gp(v, bytes.fromhex("0f20d9")) == 3 and v.regs["ecx"] == 0x123000  # mov ecx, cr3
    assert privop.emulate_gp(v, bytes.fromhex("0f20e2")) == 3 and v.regs["edx"] == 0x600  # mov edx, cr4


def test_cr0_writes_may_change_only_ts() -> None:
    v = FakeVcpu(regs={"eax": CR0 & ~(1 << 16)})
    assert privop.emulate_gp(v, bytes.fromhex("0f22c0")) is None  # clearing WP: #GP
    v.regs["eax"] = CR0 & ~(1 << 31)
    assert privop.emulate_gp(v, bytes.fromhex("0f22c0")) is None  # clearing PG: #GP
    v.regs["eax"] = CR0 | 8
    assert privop.emulate_gp(v, bytes.fromhex("0f22c0")) == 3 and v.cr0 == CR0 | 8
    assert privop.emulate_gp(v, bytes.fromhex("0f06")) == 2 and v.cr0 == CR0  # clts


def test_cr4_keeps_only_the_bits_a_pv_guest_owns_and_cr3_writes_go_to_the_hypervisor() -> None:
    v = FakeVcpu(regs={"eax": 0xFFFFFFFF})
    assert privop.emulate_gp(v, bytes.fromhex("0f22e0")) == 3 and v.virt_cr4 == privop.CR4_PV_OWNED
    assert privop.emulate_gp(v, bytes.fromhex("0f22d8")) is None  # mov cr3, eax: the hypervisor's NEW_BASEPTR
    assert privop.cr3_source(bytes.fromhex("0f22d8")) == "eax" and privop.cr3_source(bytes.fromhex("0f22df")) == "edi"
    assert privop.cr3_source(bytes.fromhex("0f22c0")) is None and privop.cr3_source(bytes.fromhex("0f2218")) is None


@pytest.mark.parametrize("code", ["f4", "fa", "fb", "0f32", "0f30", "0f0110", "0f0118", "0f00d8", "0f0138",
                                  "0f23c0", "0f2000"], ids=str)
def test_the_rest_is_left_to_the_guests_gp_handler(code: str) -> None:
    # hlt, cli, sti, rdmsr, wrmsr, lgdt, lidt, ltr, invlpg, mov dr0, a CR read with a memory operand
    assert privop.emulate_gp(FakeVcpu(), bytes.fromhex(code)) is None


def test_wbinvd_and_invd_do_nothing_and_are_skipped() -> None:
    assert privop.emulate_gp(FakeVcpu(), bytes.fromhex("0f09")) == 2
    assert privop.emulate_gp(FakeVcpu(), bytes.fromhex("0f08")) == 2


def test_forced_emulation_prefix_runs_cpuid_with_xens_leaves() -> None:
    v = FakeVcpu(regs={"eax": 0x40000000, "ebx": 0, "ecx": 0, "edx": 0})
    assert privop.emulate_ud(v, privop.FORCED_CPUID + b"\x90") == 7
    assert (v.regs["ebx"], v.regs["ecx"], v.regs["edx"]) == (
        XEN_CPUID_SIGNATURE_EBX, XEN_CPUID_SIGNATURE_ECX, XEN_CPUID_SIGNATURE_EDX)
    assert v.regs["eax"] == 0x40000002
    v.regs["eax"] = 0x40000001
    privop.emulate_ud(v, privop.FORCED_CPUID)
    assert v.regs["eax"] == 4 << 16 | 17
    v.regs.update(eax=1, ecx=0)
    privop.emulate_ud(v, privop.FORCED_CPUID)
    assert v.regs["ecx"] >> 31 == 1  # the hypervisor bit
    assert privop.cpuid(0, 0) == privop._native_cpuid(0, 0)  # other leaves: the CPU's own


@pytest.mark.parametrize("code", ["0f0b", "0f0b78656e90", "0f0b78656f0fa2"], ids=str)
def test_ud2_and_a_broken_prefix_stay_ud(code: str) -> None:
    assert privop.emulate_ud(FakeVcpu(), bytes.fromhex(code)) is None


# -- the virtual IDT and the hole --------------------------------------------------------------------------


def test_trap_table_updates_are_incremental_and_null_clears_it() -> None:
    pv = traps.PvCpu()
    pv.set_traps([[13, 0, FLAT_RING1_CS, 0xC0001000], [0x80, 3, FLAT_RING1_CS, 0xC0002000]], clear=False)
    pv.set_traps([[14, 4, FLAT_RING1_CS, 0xC0003000]], clear=False)
    assert sorted(pv.traps) == [13, 14, 0x80]
    assert pv.traps[0x80].dpl == 3 and not pv.traps[0x80].masks_events and pv.traps[14].masks_events
    pv.set_traps([], clear=True)
    assert pv.traps == {}


def test_xens_reserved_gdt_entries_are_flat_and_at_their_selectors() -> None:
    page = rings.reserved_gdt_page()

    def desc(sel: int) -> int:
        return int(struct.unpack_from("<Q", page, sel - 0xE000 & ~7)[0])

    assert {sel: desc(sel) >> 40 & 0xFF for sel in (HYPERVISOR_CS, HYPERVISOR_DS, FLAT_RING1_CS, FLAT_RING1_DS,
                                                     FLAT_RING3_CS, FLAT_RING3_DS)} == {
        HYPERVISOR_CS: 0x9B, HYPERVISOR_DS: 0x93, FLAT_RING1_CS: 0xBB, FLAT_RING1_DS: 0xB3,
        FLAT_RING3_CS: 0xFB, FLAT_RING3_DS: 0xF3}
    assert all(desc(sel) & 0xFFFF == 0xFFFF and desc(sel) >> 52 == 0xC for sel in (FLAT_RING1_CS, FLAT_RING3_DS))


def test_each_vcpu_has_its_own_gdt_window_in_the_hole() -> None:
    assert rings.gdt_base(0) == 0xFC400000 and rings.gdt_base(1) == 0xFC420000
    assert rings.gdt_base(31) + 0x20000 == 0xFC800000  # 32 vCPUs fill the per-domain slot
    assert rings.trampoline_va(0) == 0xFC40F000


def _two_divides(reset: bool) -> list[int]:
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x2000)
    uc.mem_write(0x1000, b"\x31\xc9\xf7\xf1\xf7\xf1")  # xor ecx, ecx; div ecx; div ecx
    seen: list[int] = []

    def hook(u: Uc, intno: int, _: object) -> None:
        seen.append(intno)
        u.emu_stop()

    uc.hook_add(UC_HOOK_INTR, hook)
    uc.emu_start(0x1000, 0x1FFF)
    if reset:
        rings.clear_exception(uc)
    uc.emu_start(0x1004, 0x1FFF)
    return seen


def test_a_taken_exception_is_forgotten_so_the_next_is_not_a_double_fault() -> None:
    assert _two_divides(reset=False) == [0, 8]  # unicorn#1883: QEMU still has the first one in flight
    assert _two_divides(reset=True) == [0, 0]


# -- the hypercalls --------------------------------------------------------------------------------------------

_HV: weakref.WeakKeyDictionary[Domain, Any] = weakref.WeakKeyDictionary()
TABLE = 0x10000


@pytest.fixture
def dom() -> Domain:
    hv = core()
    d = hv.create_domain(hv.spec.domains[0])
    _HV[d] = hv
    return d


def _entries(*entries: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("<BBHI", *e) for e in entries)


def test_set_trap_table_sends_the_listed_entries_with_ring1_selectors(dom: Domain) -> None:
    data = _entries((13, 0, 0xE019, 0xC0001000), (0x80, 3, 0x08, 0xC0002000), (0, 0, 0, 0))
    call = make_call(_HV[dom], dom, Hypercall.set_trap_table, [TABLE], [Region(TABLE, len(data), data, False)],
                     vcpu=1)
    assert run_handler(set_trap_table, call) == 0
    assert call.effects == [SetTrapTable(vcpu=1, traps=[[13, 0, 0xE019, 0xC0001000], [0x80, 3, 0x09, 0xC0002000]])]


def test_set_trap_table_null_clears_and_an_unreadable_array_is_efault_after_what_it_read(dom: Domain) -> None:
    call = make_call(_HV[dom], dom, Hypercall.set_trap_table, [0], [])
    assert run_handler(set_trap_table, call) == 0 and call.effects == [SetTrapTable(vcpu=0, traps=[], clear=True)]
    data = _entries((14, 0, 0xE019, 0xC0003000))  # no terminator before the copy ends
    call = make_call(_HV[dom], dom, Hypercall.set_trap_table, [TABLE], [Region(TABLE, len(data), data, False)])
    assert run_handler(set_trap_table, call) == -Errno.EFAULT
    assert call.effects == [SetTrapTable(vcpu=0, traps=[[14, 0, 0xE019, 0xC0003000]])]


def test_set_trap_table_copies_up_to_the_terminator(dom: Domain) -> None:
    data = _entries((13, 0, 0xE019, 0xC0001000), (0, 0, 0, 0), (14, 0, 0xE019, 0xC0003000))

    def read(addr: int, length: int) -> bytes | None:
        off = addr - TABLE
        return data[off : off + length] if 0 <= off and off + length <= len(data) else None

    assert copyin.describe(Hypercall.set_trap_table, [TABLE, 0, 0, 0, 0], read) == [copyin.Span(TABLE, 16)]
    assert copyin.describe(Hypercall.set_trap_table, [0, 0, 0, 0, 0], read) == []


def test_stack_switch_tells_the_domain_process_its_kernel_stack(dom: Domain) -> None:
    call = make_call(_HV[dom], dom, Hypercall.stack_switch, [0x20, 0xC0100000], [], vcpu=1)
    assert run_handler(stack_switch, call) == 0
    assert call.effects == [SetKernelStack(vcpu=1, ss=0x21, esp=0xC0100000)]
