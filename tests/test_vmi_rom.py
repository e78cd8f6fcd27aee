"""The VMI ROM page: header, op table, code shape, and each op executed under Unicorn."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import capstone
import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ, Uc
from unicorn import x86_const as X

from hypervisor import vmi_rom as vr
from hypervisor.vmi_rom import (
    GUEST_VIRT_BASE,
    VMI_OP_INDEX,
    VMI_OPS,
    VMI_ROM_BASE,
    VmiRomError,
    parse_vmi_rom,
    vmi_rom,
    vmi_rom_entries,
)
from pvcluster.abi.xen import PAGE_SIZE

NULL_OPS = {"set_tss_desc", "halt", "send_ipi", "clock_ns"}
RAM = 0x10000
RET_ADDR = RAM  # a hlt the ops return to
BITMAP = RAM + 0x800
STACK_TOP = RAM + 0xF00
EFLAGS_IF = 1 << 9
EFLAGS_DF = 1 << 10
PRESERVED = {"ebx": 0x11111111, "esi": 0x22222222, "edi": 0x33333333, "ebp": 0x44444444}
REGS = {
    "eax": X.UC_X86_REG_EAX,
    "ebx": X.UC_X86_REG_EBX,
    "ecx": X.UC_X86_REG_ECX,
    "edx": X.UC_X86_REG_EDX,
    "esi": X.UC_X86_REG_ESI,
    "edi": X.UC_X86_REG_EDI,
    "ebp": X.UC_X86_REG_EBP,
    "esp": X.UC_X86_REG_ESP,
    "eflags": X.UC_X86_REG_EFLAGS,
    "cr3": X.UC_X86_REG_CR3,
}


def u32s(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data))


# -- static shape ---------------------------------------------------------------------------------------------


def test_op_names_and_index() -> None:
    assert VMI_OPS == (
        "init", "set_tss_desc", "irq_disable", "irq_enable", "save_fl", "restore_fl", "halt", "read_cr3",
        "write_cr3", "set_pte", "flush_tlb_user", "flush_tlb_kernel", "flush_tlb_single", "flush_tlb_others",
        "send_ipi", "clock_ns",
    )  # fmt: skip
    assert VMI_OP_INDEX == {name: i for i, name in enumerate(VMI_OPS)}
    assert VMI_ROM_BASE == 0xFFFF0000
    assert GUEST_VIRT_BASE == 0xC0000000


def test_header() -> None:
    rom = vmi_rom()
    assert len(rom) == PAGE_SIZE
    assert rom[:4] == b"VMI1"
    magic, version, count, reserved = struct.unpack_from("<4I", rom, 0)
    assert (magic, version, count, reserved) == (0x31494D56, 1, len(VMI_OPS), 0)
    assert vmi_rom() is rom  # cached


def test_null_entries_exactly_for_native_ops() -> None:
    rom = vmi_rom()
    table = u32s(rom[16 : 16 + 4 * len(VMI_OPS)])
    assert {VMI_OPS[i] for i, entry in enumerate(table) if entry == 0} == NULL_OPS
    assert dict(zip(VMI_OPS, table, strict=True)) == vmi_rom_entries() == parse_vmi_rom(rom)


def test_entries_point_at_code_ending_in_ret() -> None:
    rom = vmi_rom()
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    entries = vmi_rom_entries()
    code_start = 16 + 4 * len(VMI_OPS)
    starts = sorted(e for e in entries.values() if e)
    for name, entry in entries.items():
        if not entry:
            continue
        assert code_start <= entry < PAGE_SIZE, name
        end = next((s for s in starts if s > entry), PAGE_SIZE)
        insns = list(md.disasm(rom[entry:end], VMI_ROM_BASE + entry))
        assert insns, name
        # The whole op disassembles: no undecodable bytes before the ret, and it ends in ret (then int3 fill).
        mnemonics = [i.mnemonic for i in insns]
        assert "ret" in mnemonics, name
        last = mnemonics.index("ret")
        body_len = sum(i.size for i in insns[: last + 1])
        assert set(rom[entry + body_len : end]) <= {0xCC}, name
        assert all(m != "int3" for m in mnemonics[:last]), name


def test_unused_space_is_int3() -> None:
    rom = vmi_rom()
    last = max(vmi_rom_entries().values())
    assert rom[-1] == 0xCC
    assert set(rom[last + 0x80 :]) == {0xCC}


def test_rom_assembles_at_other_bases() -> None:
    assert vmi_rom_entries(0x00400000) == vmi_rom_entries()
    assert len(vmi_rom(0x00400000)) == PAGE_SIZE
    with pytest.raises(ValueError):
        vmi_rom(0xFFFF0010)


def test_oversized_op_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vr._SOURCES, "halt", lambda: "nop\n" * 5000 + "ret")
    with pytest.raises(VmiRomError, match="'halt'"):
        vr._build.__wrapped__(VMI_ROM_BASE)


def test_unassemblable_op_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vr._SOURCES, "clock_ns", lambda: "frobnicate eax")
    with pytest.raises(VmiRomError, match="'clock_ns'"):
        vr._build.__wrapped__(VMI_ROM_BASE)


def test_parse_rejects_bad_roms() -> None:
    rom = bytearray(vmi_rom())
    with pytest.raises(VmiRomError, match="magic"):
        parse_vmi_rom(b"\0" * 4 + bytes(rom[4:]))
    with pytest.raises(VmiRomError, match="bytes"):
        parse_vmi_rom(bytes(rom[:100]))
    rom[16 + 4 * VMI_OP_INDEX["halt"] : 20 + 4 * VMI_OP_INDEX["halt"]] = struct.pack("<I", 4)
    with pytest.raises(VmiRomError, match="halt"):
        parse_vmi_rom(bytes(rom))


# -- execution under Unicorn --------------------------------------------------------------------------------


@dataclass
class HypercallRecord:
    nr: int
    ebx: int
    ecx: int
    edx: int
    esi: int
    mem: bytes  # 16 bytes at ebx


@dataclass
class Machine:
    uc: Uc
    calls: list[HypercallRecord] = field(default_factory=list)
    result: int = 0

    def reg(self, name: str) -> int:
        return int(self.uc.reg_read(REGS[name]))

    def call(self, op: str, eax: int = 0, edx: int = 0, ecx: int = 0, eflags: int = 0x2) -> dict[str, int]:
        entry = vmi_rom_entries()[op]
        assert entry, op
        uc = self.uc
        for name, value in {**PRESERVED, "eax": eax, "edx": edx, "ecx": ecx, "eflags": eflags}.items():
            uc.reg_write(REGS[name], value)
        uc.mem_write(STACK_TOP - 4, struct.pack("<I", RET_ADDR))
        uc.reg_write(X.UC_X86_REG_ESP, STACK_TOP - 4)
        uc.emu_start(VMI_ROM_BASE + entry, RET_ADDR, count=10_000)
        regs = {name: self.reg(name) for name in REGS}
        assert uc.reg_read(X.UC_X86_REG_EIP) == RET_ADDR, f"{op} did not return"
        assert regs["esp"] == STACK_TOP, op  # ret popped exactly the return address
        for name, value in PRESERVED.items():
            assert regs[name] == value, f"{op} clobbered {name}"
        assert regs["eflags"] & EFLAGS_DF == eflags & EFLAGS_DF, f"{op} changed DF"
        return regs


@pytest.fixture
def machine() -> Machine:
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(VMI_ROM_BASE, PAGE_SIZE, UC_PROT_READ | UC_PROT_EXEC)
    uc.mem_write(VMI_ROM_BASE, vmi_rom())
    uc.mem_map(RAM, PAGE_SIZE, UC_PROT_ALL)
    uc.mem_write(RET_ADDR, b"\xf4")  # hlt
    m = Machine(uc)

    def on_intr(uc: Uc, intno: int, _: object) -> None:
        assert intno == 0x82
        ebx = m.reg("ebx")
        m.calls.append(
            HypercallRecord(m.reg("eax"), ebx, m.reg("ecx"), m.reg("edx"), m.reg("esi"), bytes(uc.mem_read(ebx, 16)))
        )
        uc.reg_write(X.UC_X86_REG_EAX, m.result)

    uc.hook_add(UC_HOOK_INTR, on_intr)
    return m


def _only_call(m: Machine) -> HypercallRecord:
    assert len(m.calls) == 1
    call = m.calls.pop()
    assert (call.ecx, call.edx, call.esi) == (1, 0, 0x7FF0)  # count 1, no done pointer, DOMID_SELF
    assert STACK_TOP - 64 <= call.ebx < STACK_TOP  # the array lives on the caller's stack
    return call


def test_init_returns_signature(machine: Machine) -> None:
    assert machine.call("init")["eax"] == 0x564D4931
    assert not machine.calls


def test_write_cr3(machine: Machine) -> None:
    regs = machine.call("write_cr3", eax=0x5000)
    call = _only_call(machine)
    assert call.nr == 26
    assert u32s(call.mem[:12]) == [5, 5, 0]  # MMUEXT_NEW_BASEPTR, mfn 5
    assert regs["eax"] == 0


def test_write_cr3_returns_hypercall_result(machine: Machine) -> None:
    machine.result = 0xFFFFFFEA  # -EINVAL
    assert machine.call("write_cr3", eax=0x7000)["eax"] == 0xFFFFFFEA
    assert u32s(_only_call(machine).mem[:12]) == [5, 7, 0]


def test_set_pte(machine: Machine) -> None:
    regs = machine.call("set_pte", eax=0xC0003000, edx=0x00007067)
    call = _only_call(machine)
    assert call.nr == 1
    ptr, val = struct.unpack("<QQ", call.mem)
    assert (ptr, val) == (0x3000, 0x7067)  # machine address, MMU_NORMAL_PT_UPDATE
    assert regs["eax"] == 0


def test_set_pte_forces_normal_update_command(machine: Machine) -> None:
    machine.call("set_pte", eax=0xC0003006, edx=0xABCD0063)
    ptr, val = struct.unpack("<QQ", _only_call(machine).mem)
    assert (ptr, val) == (0x3004, 0xABCD0063)


@pytest.mark.parametrize("op", ["flush_tlb_user", "flush_tlb_kernel"])
def test_flush_tlb_local(machine: Machine, op: str) -> None:
    machine.call(op, eax=0xDEAD, edx=0xBEEF)
    call = _only_call(machine)
    assert call.nr == 26
    assert u32s(call.mem[:12]) == [6, 0, 0]


def test_flush_tlb_single(machine: Machine) -> None:
    machine.call("flush_tlb_single", eax=0xC0123000)
    call = _only_call(machine)
    assert call.nr == 26
    assert u32s(call.mem[:12]) == [7, 0xC0123000, 0]


def test_flush_tlb_others_full(machine: Machine) -> None:
    machine.uc.mem_write(BITMAP, struct.pack("<I", 0b110))
    machine.call("flush_tlb_others", eax=BITMAP, edx=0xFFFFFFFF)
    call = _only_call(machine)
    assert call.nr == 26
    assert u32s(call.mem[:12]) == [8, 0, BITMAP]


def test_flush_tlb_others_single(machine: Machine) -> None:
    machine.call("flush_tlb_others", eax=BITMAP, edx=0xC0456000)
    call = _only_call(machine)
    assert call.nr == 26
    assert u32s(call.mem[:12]) == [9, 0xC0456000, BITMAP]


@pytest.mark.parametrize("op", ["write_cr3", "set_pte", "flush_tlb_single", "flush_tlb_others"])
def test_direction_flag_preserved(machine: Machine, op: str) -> None:
    machine.call(op, eax=0xC0001000, edx=0, eflags=0x2 | EFLAGS_DF)


def test_irq_flags(machine: Machine) -> None:
    assert not machine.call("irq_disable", eflags=0x2 | EFLAGS_IF)["eflags"] & EFLAGS_IF
    assert machine.call("irq_enable", eflags=0x2)["eflags"] & EFLAGS_IF
    assert machine.call("save_fl", eflags=0x2 | EFLAGS_IF)["eax"] & EFLAGS_IF
    assert not machine.call("save_fl", eflags=0x2)["eax"] & EFLAGS_IF
    assert machine.call("restore_fl", eax=0x2 | EFLAGS_IF, eflags=0x2)["eflags"] & EFLAGS_IF
    assert not machine.call("restore_fl", eax=0x2, eflags=0x2 | EFLAGS_IF)["eflags"] & EFLAGS_IF
    assert not machine.calls


def test_read_cr3(machine: Machine) -> None:
    machine.uc.reg_write(X.UC_X86_REG_CR3, 0x5000)
    assert machine.call("read_cr3")["eax"] == 0x5000
    assert not machine.calls
