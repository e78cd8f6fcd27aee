"""The C block hook (domains/blockhook.py, domains/native/blockhook.c) on in-process vCPUs: instruction counts and
virtual time per translated block, the window stop, when Python is called back, and building the hook."""

from __future__ import annotations

import struct
from pathlib import Path

import capstone
import keystone
import pytest

from domains import blockhook
from domains.memory import GuestRam
from domains.paging import build_initial_tables, initial_mappings, pte_address
from domains.vcpu import APIC_BASE, InsnCounter, Vcpu, VcpuState, flat_gdt
from hypervisor.vmi_rom import VMI_ROM_BASE
from pvcluster.costs import InsnClass

BASE = 0xC0000000
CODE = BASE + 0x1000
TABLES_AT = 0xF0000
_ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)


# These tests are about counting blocks, so every instruction class is priced alike (one ps_per_instr each);
# tests/test_insn_cost.py checks the classes' prices.
UNIFORM = tuple(1000 for _ in InsnClass)


class SpyCounter(InsnCounter):
    """Records every block Python is asked to count: (address, bytes)."""

    def __init__(self) -> None:
        super().__init__(UNIFORM)
        self.calls: list[tuple[int, bytes]] = []

    def count(self, addr: int, code: bytes) -> int:
        self.calls.append((addr, code))
        return super().count(addr, code)


def asm(source: str, at: int) -> bytes:
    return bytes(_ks.asm(source, at)[0])


def capstone_count(code: bytes, at: int) -> int:
    return sum(1 for _ in _md.disasm_lite(code, at))


def machine(counter: InsnCounter | None = None) -> tuple[GuestRam, int, InsnCounter]:
    """RAM linearly mapped at BASE (plus the APIC and ROM pages), the builder's tables: (ram, cr3, counter)."""
    ram = GuestRam(1 << 20, BASE)
    ram.write_pa(ram.gdt_paddr, flat_gdt())
    maps = initial_mappings(BASE, ram.size, mmio=(APIC_BASE,), rom=(VMI_ROM_BASE,))
    tables = build_initial_tables(ram, TABLES_AT, maps, tables_read_only=True)
    return ram, tables.l2, counter or SpyCounter()


def vcpu_at(ram: GuestRam, cr3: int, counter: InsnCounter, eip: int, ps: int = 1000, vid: int = 0) -> Vcpu:
    vcpu = Vcpu(vid, ram, counter, ps, cr3)
    vcpu.set_regs({"eip": eip, "esp": BASE + 0x80000, "eflags": 0x2})
    vcpu.state = VcpuState.RUNNING
    return vcpu


def load(source: str, at: int = CODE, ps: int = 1000) -> tuple[Vcpu, SpyCounter]:
    ram, cr3, counter = machine()
    ram.write_pa(at - BASE, asm(source, at))
    assert isinstance(counter, SpyCounter)
    return vcpu_at(ram, cr3, counter, at, ps), counter


# -- counts and the clock -----------------------------------------------------------------------------------------


def test_straight_line_code_and_a_loop_count_as_capstone_does() -> None:
    straight = "mov eax, 1\n add eax, 2\n imul eax, eax, 3\n lea ebx, [eax + 4]\n push ebx\n pop edx\n"
    n_straight = capstone_count(asm(straight, CODE), CODE)
    vcpu, _ = load(straight + "mov ecx, 5\nl: dec ecx\n jnz l\n hlt", ps=1234)
    vcpu.run(1_000_000)
    assert vcpu.state is VcpuState.BLOCKED and vcpu.reg("edx") == 13
    executed = n_straight + 1 + 2 * 5 + 1  # the straight code, mov ecx, five dec/jnz, hlt
    assert vcpu.instructions == executed
    assert vcpu.clock_ps == executed * 1234


def test_the_window_stops_at_the_first_block_boundary_at_or_after_its_end() -> None:
    # blocks: [mov ecx; dec; jnz] (3 instructions), then [dec; jnz] (2) over and over: boundaries at 3, 5, 7, ... ns
    vcpu, _ = load("mov ecx, 1000000\nl: dec ecx\n jnz l\n hlt")
    loop = CODE + len(asm("mov ecx, 1000000", CODE))
    vcpu.run(10)
    assert vcpu.state is VcpuState.RUNNING
    assert (vcpu.clock_ns, vcpu.instructions, vcpu.reg("eip")) == (11, 11, loop)
    assert vcpu.reg("ecx") == 1000000 - 5
    vcpu.run(21)  # a boundary falls exactly at the end: the block there does not run
    assert (vcpu.clock_ns, vcpu.instructions, vcpu.reg("ecx")) == (21, 21, 1000000 - 10)


def test_a_clock_beyond_64_bits_of_picoseconds_still_counts() -> None:
    vcpu, _ = load("nop\n nop\n hlt")
    start_ns = 1 << 62  # the hypervisor's END_OF_TIME: 2**62 ns is far more than 2**64 ps
    vcpu.advance_to(start_ns)
    vcpu.run(start_ns + 100)
    assert vcpu.state is VcpuState.BLOCKED and vcpu.clock_ps == start_ns * 1000 + 3000


def test_a_trap_mid_window_reports_the_clock_at_its_block() -> None:
    # [mov ecx; dec; jnz] 3 + [dec; jnz] x 9 + [mov eax; int 0x82] 2 = 23 instructions when the trap is taken
    vcpu, _ = load("mov ecx, 10\nl: dec ecx\n jnz l\n mov eax, 3\n int 0x82\n hlt")
    vcpu.run(1000)
    assert vcpu.state is VcpuState.HYPERCALL and vcpu.trap is not None
    assert (vcpu.trap.vt_ns, vcpu.trap.nr, vcpu.clock_ns, vcpu.instructions) == (23, 3, 23, 23)
    vcpu.complete_trap(0, 30)
    vcpu.run(1000)
    assert vcpu.state is VcpuState.BLOCKED and (vcpu.clock_ns, vcpu.instructions) == (31, 24)


# -- what the hook reads, and when it calls Python ----------------------------------------------------------------


def test_python_counts_each_block_once_across_runs_and_vcpus() -> None:
    source = "mov ecx, 1000\nl: dec ecx\n jnz l\n hlt"
    ram, cr3, counter = machine()
    assert isinstance(counter, SpyCounter)
    ram.write_pa(CODE - BASE, asm(source, CODE))
    v0 = vcpu_at(ram, cr3, counter, CODE)
    v0.run(1_000_000)
    assert v0.instructions == 1 + 2 * 1000 + 1
    blocks = [addr for addr, _ in counter.calls]
    assert len(blocks) == len(set(blocks)) == 3  # [mov ecx; dec; jnz], [dec; jnz], [hlt]
    assert v0._hook.state.misses == 3 and len(counter.table) == 3
    v1 = vcpu_at(ram, cr3, counter, CODE, vid=1)  # the domain's table is shared
    v1.run(1_000_000)
    v0.set_regs({"eip": CODE})
    v0.state = VcpuState.RUNNING
    v0.run(v0.clock_ns + 1_000_000)
    assert (v1.instructions, v0.instructions) == (2002, 4004)
    assert len(counter.calls) == 3 and v1._hook.state.misses == 0


def test_self_modified_code_at_the_same_address_and_size_is_counted_again() -> None:
    f = BASE + 0x3000  # its own page: the store below does not touch the block that makes it
    vcpu, counter = load(f"call {f:#x}\n mov byte ptr [{f:#x}], 0x90\n call {f:#x}\n hlt")
    vcpu.ram.write_pa(f - BASE, asm("mov eax, 0x90909090\n ret", f))  # B8 90 90 90 90 C3: 2 instructions
    vcpu.run(1_000_000)
    assert vcpu.state is VcpuState.BLOCKED and vcpu.reg("eax") == 0x90909090
    # the patched f is 90 90 90 90 90 C3: 6 instructions in the same 6 bytes
    at_f = [code for addr, code in counter.calls if addr == f]
    assert at_f == [bytes.fromhex("b890909090c3"), bytes.fromhex("9090909090c3")]
    assert vcpu.instructions == 1 + 2 + 2 + 6 + 1  # call, f, [store; call], patched f, hlt
    assert len(counter.table) == 5


def test_a_block_across_a_page_boundary_reads_both_pages_through_the_tables() -> None:
    ram, cr3, counter = machine()
    assert isinstance(counter, SpyCounter)
    first, second = BASE + 0x5000, BASE + 0x6000
    # the second page maps to frame 0x9000, not the frame after the first page's: only a walk finds its bytes
    struct.pack_into("<I", ram.buf, pte_address(ram, cr3, second) or -1, 0x9000 | 0x63)
    ram.write_pa(0x6000, b"\xcc" * 0x1000)
    start = first + 0xFFD
    code = asm("mov eax, 0x11223344\n inc eax\n hlt", start)  # the mov's immediate straddles the boundary
    ram.write_pa(0x5FFD, code[:3])
    ram.write_pa(0x9000, code[3:])
    vcpu = vcpu_at(ram, cr3, counter, start)
    vcpu.run(1_000_000)
    assert vcpu.state is VcpuState.BLOCKED and vcpu.reg("eax") == 0x11223345
    assert counter.calls[0] == (start, code)
    assert vcpu.instructions == 3 and vcpu._hook.state.unreadable == 0


def test_code_in_the_rom_page_is_read_from_the_rom() -> None:
    entry = VMI_ROM_BASE + 0x100
    rom = bytearray(0x1000)
    body = asm("mov eax, 7\n inc eax\n ret", entry)
    rom[0x100 : 0x100 + len(body)] = body
    vcpu, counter = load(f"call {entry:#x}\n hlt")
    vcpu.map_rom(VMI_ROM_BASE, bytes(rom))
    vcpu.run(1_000_000)
    assert vcpu.state is VcpuState.BLOCKED and vcpu.reg("eax") == 8
    assert (entry, body) in counter.calls
    assert vcpu.instructions == 1 + 3 + 1 and vcpu._hook.state.unreadable == 0


def test_an_exception_in_the_python_count_stops_the_vcpu_and_is_raised() -> None:
    class Broken(InsnCounter):
        def count(self, addr: int, code: bytes) -> int:
            raise RuntimeError("capstone broke")

    ram, cr3, _ = machine()
    ram.write_pa(CODE - BASE, asm("nop\n hlt", CODE))
    vcpu = vcpu_at(ram, cr3, Broken(), CODE)
    with pytest.raises(RuntimeError, match="capstone broke"):
        vcpu.run(1000)
    assert vcpu.instructions == 0 and vcpu.clock_ns == 0 and not vcpu._hook.state.failed


# -- building ---------------------------------------------------------------------------------------------------


@pytest.fixture
def build_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "cache"
    monkeypatch.setattr(blockhook, "_cache_dirs", lambda: [where])
    return where


def test_the_hook_builds_into_a_file_named_by_its_source(build_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    built = blockhook._build()
    assert built.parent == build_dir and built.name.startswith("blockhook-") and built.suffix == ".so"
    assert blockhook._build() == built and [p.name for p in build_dir.iterdir()] == [built.name]
    edited = tmp_path / "blockhook.c"
    edited.write_text(blockhook._SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(blockhook, "_SOURCE", edited)
    assert blockhook._build() != built


def test_a_failing_compiler_names_the_command_and_its_stderr(build_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'blockhook.c:1: error: no such thing' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(blockhook.BuildError) as err:
        blockhook._build()
    assert f"{cc} -O2" in str(err.value) and "error: no such thing" in str(err.value)
    assert list(build_dir.iterdir()) == []  # no temporary file left behind


def test_a_missing_compiler_is_named(build_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/gcc")
    with pytest.raises(blockhook.BuildError, match="'/nonexistent/gcc' not found"):
        blockhook._build()
