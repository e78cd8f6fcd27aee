"""The vCPU's hardware model in isolation: ROM write protection, APIC IPIs, IDT delivery and the clock port."""

from __future__ import annotations

import keystone

from domains.memory import GuestRam
from domains.paging import build_initial_tables, initial_mappings
from domains.vcpu import APIC_BASE, InsnCounter, Vcpu, VcpuState, flat_gdt
from hypervisor.vmi_rom import VMI_ROM_BASE, vmi_rom

BASE = 0xC0000000


def _vcpu(source: str, vid: int = 0) -> tuple[Vcpu, GuestRam]:
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    code = bytes(ks.asm(source, BASE)[0])
    ram = GuestRam(1 << 20, BASE)
    ram.write_pa(0, code)
    ram.write_pa(ram.gdt_paddr, flat_gdt())
    maps = initial_mappings(BASE, ram.size, mmio=(APIC_BASE,), rom=(VMI_ROM_BASE,))
    tables = build_initial_tables(ram, 0xF0000, maps, tables_read_only=True)
    vcpu = Vcpu(vid, ram, InsnCounter(), 1000, tables.l2)
    vcpu.set_regs({"eip": BASE, "esp": BASE + 0x80000, "eflags": 0x2})
    vcpu.state = VcpuState.RUNNING
    return vcpu, ram


def test_a_guest_write_to_the_vmi_rom_faults() -> None:
    vcpu, _ = _vcpu(f"mov eax, {VMI_ROM_BASE + 0x100}\n mov dword ptr [eax], 1\n hlt")
    vcpu.map_rom(VMI_ROM_BASE, vmi_rom())
    vcpu.run(100_000)
    assert vcpu.state is VcpuState.CRASHED and vcpu.fault is not None
    assert vcpu.fault.kind == "page-fault" and f"{VMI_ROM_BASE + 0x100:#010x}" in vcpu.fault.detail
    assert bytes(vcpu.uc.mem_read(VMI_ROM_BASE, 4)) == vmi_rom()[:4]


def test_clock_port_reads_virtual_time() -> None:
    vcpu, _ = _vcpu("mov ecx, 1000\nl: dec ecx\n jnz l\n mov edx, 0x5c\n in eax, dx\n hlt")
    vcpu.run(1_000_000)
    assert vcpu.state is VcpuState.BLOCKED
    # 2002 instructions at 1 ns each before the `in` executes, within one translated block of slack
    assert 2000 <= vcpu.reg("eax") <= 2010


def test_apic_ipi_is_delivered_through_the_idt_and_wakes_hlt() -> None:
    # vCPU 0 points vector 0xf0 at a handler that counts into ebx, enables interrupts and halts;
    # a self-IPI through the ICR must wake it, run the handler, and return past the hlt.
    src = f"""
        mov eax, handler
        mov word ptr [idt + 0xf0*8], ax
        mov word ptr [idt + 0xf0*8 + 2], 0x08
        mov byte ptr [idt + 0xf0*8 + 5], 0x8e
        shr eax, 16
        mov word ptr [idt + 0xf0*8 + 6], ax
        mov eax, idtr
        .byte 0x0f, 0x01, 0x18
        xor ebx, ebx
        mov dword ptr [{APIC_BASE + 0x310}], 0
        mov dword ptr [{APIC_BASE + 0x300}], 0x40f0
        sti
        hlt
        mov ecx, 77
        hlt
    handler:
        inc ebx
        iretd
    .align 8
    idt: .space 2048
    idtr: .word 2047
        .long idt
    """
    vcpu, _ = _vcpu(src)
    sent: list[tuple[int, int, int, int]] = []

    def sink(src_vcpu: int, dest: int, vector: int, vt: int) -> None:
        sent.append((src_vcpu, dest, vector, vt))
        vcpu.post_irq(vt, src_vcpu, vector)

    vcpu.ipi_sink = sink
    vcpu.run(10_000)
    assert sent and sent[0][:3] == (0, 0, 0xF0)
    assert vcpu.reg("ebx") == 1 and vcpu.reg("ecx") == 77  # handled once, resumed after the first hlt
    assert vcpu.state is VcpuState.BLOCKED
