"""The cost model's instruction classes: how instructions are classified and what a vCPU's clock is charged."""

from __future__ import annotations

import keystone
import pytest
from test_native_hook import CODE, machine, vcpu_at

from domains.insn_cost import BlockPricer
from domains.vcpu import InsnCounter, VcpuState
from pvcluster.abi.platform import CLOCK_PORT, MARK_PORT
from pvcluster.costs import CLOCK_READ_PS, INSN_PS, InsnClass
from pvcluster.spec import SpecError, parse_spec

_ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)


def _price(source: str) -> tuple[int, int]:
    code = bytes(_ks.asm(source, CODE)[0])
    return BlockPricer().price(CODE, code)


@pytest.mark.parametrize(("source", "cls"), [
    ("add eax, ebx", InsnClass.ALU),
    ("call 0xc0001100", InsnClass.ALU),  # a direct call: what patching turns an indirect one into
    ("mov eax, [ebx]", InsnClass.MEM),
    ("mov [ebx + 4], eax", InsnClass.MEM),
    ("push eax", InsnClass.MEM),
    ("call dword ptr [0xc0002000]", InsnClass.INDIRECT),
    ("call eax", InsnClass.INDIRECT),
    ("jmp eax", InsnClass.INDIRECT),
    ("ret", InsnClass.RET),
    ("iretd", InsnClass.IRET),
    ("cpuid", InsnClass.SERIALISING),
    ("mov cr0, eax", InsnClass.SERIALISING),
    ("mov cr3, eax", InsnClass.CR3_WRITE),
    ("invlpg [eax]", InsnClass.INVLPG),
    ("cli", InsnClass.CLI_STI),
    ("sti", InsnClass.CLI_STI),
    ("popfd", InsnClass.PUSHF_POPF),
    ("out dx, eax", InsnClass.IO),
    ("in eax, dx", InsnClass.IO),
    ("pause", InsnClass.PAUSE),
    ("lock inc dword ptr [eax]", InsnClass.LOCKED),
    ("xchg dword ptr [eax], ecx", InsnClass.LOCKED),
    ("xchg eax, ecx", InsnClass.ALU),
])
def test_each_instruction_is_priced_by_its_class(source: str, cls: InsnClass) -> None:
    assert _price(source) == (1, INSN_PS[cls])


def test_a_block_costs_the_sum_of_its_instructions() -> None:
    assert _price("mov eax, [ebx]; add eax, 1; call eax") == (3, 2000 + 1000 + 5000)


def test_the_spec_overrides_a_class_and_refuses_what_is_not_one() -> None:
    spec = parse_spec('[hypervisor.cost.insn]\nindirect = 9000\n[[domain]]\nname = "a"\n')
    assert spec.hypervisor.cost.insn_ps[InsnClass.INDIRECT] == 9000
    assert spec.hypervisor.cost.insn_ps[InsnClass.ALU] == 1000
    with pytest.raises(SpecError, match="hypervisor.cost.insn.jump: unknown key"):
        parse_spec('[hypervisor.cost.insn]\njump = 1\n[[domain]]\nname = "a"\n')
    with pytest.raises(SpecError, match="hypervisor.cost.insn.io"):
        parse_spec('[hypervisor.cost.insn]\nio = 0\n[[domain]]\nname = "a"\n')


def _run(source: str, ps: int = 1000) -> tuple[int, list[tuple[int, int, int]]]:
    ram, cr3, _ = machine(InsnCounter())
    ram.write_pa(CODE - 0xC0000000, bytes(_ks.asm(source, CODE)[0]))
    vcpu = vcpu_at(ram, cr3, InsnCounter(), CODE, ps)
    marks: list[tuple[int, int, int]] = []
    vcpu.mark_sink = lambda v, value, vt: marks.append((v, value, vt))
    vcpu.run(1_000_000)
    assert vcpu.state is VcpuState.BLOCKED
    return vcpu.clock_ps, marks


def test_a_guest_mark_costs_no_virtual_time_and_a_clock_read_costs_rdtsc() -> None:
    plain, _ = _run("mov eax, 7; hlt")
    marked, marks = _run(f"mov eax, 7; mov edx, {MARK_PORT}; out dx, eax; hlt")
    # the mark's port write is free; only the instruction that loads the port number costs anything
    assert marked - plain == INSN_PS[InsnClass.ALU] and marks == [(0, 7, (marked - INSN_PS[InsnClass.SERIALISING])
                                                                    // 1000)]
    read, _ = _run(f"mov edx, {CLOCK_PORT}; in eax, dx; hlt")
    assert read - plain == INSN_PS[InsnClass.ALU] + CLOCK_READ_PS - INSN_PS[InsnClass.ALU]


def test_ps_per_instr_scales_every_class() -> None:
    fast, _ = _run("cpuid; hlt", ps=1000)
    slow, _ = _run("cpuid; hlt", ps=3000)
    assert slow == 3 * fast == 3 * (INSN_PS[InsnClass.SERIALISING] * 2)


def test_a_cr3_write_also_pays_the_refill_of_what_it_dropped() -> None:
    code = bytes(_ks.asm("mov cr3, eax; invlpg [eax]", CODE)[0])
    count, cost = BlockPricer(refill_ps=100_000).price(CODE, code)
    # the full flush is refilled; a single page's one walk is in INVLPG's own price
    assert (count, cost) == (2, INSN_PS[InsnClass.CR3_WRITE] + 100_000 + INSN_PS[InsnClass.INVLPG])
