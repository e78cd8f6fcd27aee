"""Guest MIPS: how fast guest code runs on a pvcluster vCPU against bare Unicorn, measured in one run.

The same code runs at the same address over the same memory and page tables (RAM mapped at physical 0 with
``mem_map_ptr``, paging and CR0.WP on, the flat GDT) twice: on a ``domains.vcpu.Vcpu`` (its block hook counts
instructions into virtual time and checks the window end before every translated block) and on a bare ``Uc`` with
no hooks at all. Each loop ends in ``hlt``, where both return from ``emu_start``. The instruction count is the
vCPU's; the bare run executes the very same instructions.

* tight: ``dec ecx; jnz`` (2 instructions a block): the per-block cost of the hook at its worst.
* mem32: a 32-instruction block with loads and stores: ordinary straight-line code.
* pause: ``pause; dec ecx; jnz``: ``pause`` ends its block and leaves Unicorn's CPU loop every time.

Wall-clock numbers are this machine's; the ratio (vCPU MIPS / bare MIPS) is what to compare between runs.
"""

from __future__ import annotations

import time
from typing import Any

import keystone
from unicorn import UC_ARCH_X86, UC_MODE_32, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from domains.memory import GuestRam
from domains.paging import build_initial_tables, initial_mappings
from domains.vcpu import CR0_PG, CR0_WP, InsnCounter, Vcpu, VcpuState, flat_gdt
from pvcluster.abi.platform import KERNEL_CS, KERNEL_DS

BASE = 0xC0000000
DATA = BASE + 0x40000  # what mem32 loads and stores
STACK = BASE + 0x80000
TABLES_AT = 0xF0000
MEMORY = 1 << 20
REPEATS = 3  # the best of: the least disturbed by whatever else the machine runs
TARGETS = {"tight": 0.25, "mem32": 0.5}  # the floor for the vCPU/bare ratio

_MEM32_BODY = """
    mov eax, [esi]
    add eax, ebx
    mov [esi + 4], eax
    mov edx, [esi + 8]
    xor edx, eax
    mov [esi + 12], edx
    lea ebx, [ebx + eax * 2]
    mov edi, [esi + 16]
    sub edi, edx
    mov [esi + 20], edi
    inc eax
    and eax, 0xffff
    mov [esi + 24], eax
    mov edx, [esi + 28]
    add edx, edi
    mov [esi + 32], edx
    shl edx, 3
    or ebx, edx
    mov [esi + 36], ebx
    mov eax, [esi + 40]
    add eax, 7
    mov [esi + 40], eax
    mov edi, [esi + 44]
    adc edi, eax
    mov [esi + 44], edi
    not edx
    mov [esi + 48], edx
    mov eax, [esi + 52]
    add eax, edx
    mov [esi + 52], eax
"""

# name -> (assembly, iterations); each loop is a block of its own, the label at its start
LOOPS: dict[str, tuple[str, int]] = {
    "tight": ("mov ecx, {n}\nl: dec ecx\n jnz l\n hlt", 20_000_000),
    "mem32": (f"mov esi, {DATA}\n xor ebx, ebx\n mov ecx, {{n}}\nl:{_MEM32_BODY} dec ecx\n jnz l\n hlt", 1_000_000),
    "pause": ("mov ecx, {n}\nl: pause\n dec ecx\n jnz l\n hlt", 300_000),
}


def _ram(code: bytes) -> tuple[GuestRam, int]:
    """Guest RAM with the code at BASE and the builder's page tables over it: (ram, cr3)."""
    ram = GuestRam(MEMORY, BASE)
    ram.write_pa(0, code)
    ram.write_pa(ram.gdt_paddr, flat_gdt())
    tables = build_initial_tables(ram, TABLES_AT, initial_mappings(BASE, ram.size), tables_read_only=True)
    return ram, tables.l2


def _assemble(name: str) -> bytes:
    source, n = LOOPS[name]
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    return bytes(ks.asm(source.format(n=n), BASE)[0])


def _vcpu_run(code: bytes) -> tuple[float, int]:
    """(seconds, instructions) on a pvcluster vCPU, from eip = BASE to the hlt."""
    ram, cr3 = _ram(code)
    vcpu = Vcpu(0, ram, InsnCounter(), 1000, cr3)
    vcpu.set_regs({"eip": BASE, "esp": STACK, "eflags": 0x2})
    vcpu.state = VcpuState.RUNNING
    start = time.perf_counter()
    vcpu.run(1 << 50)
    elapsed = time.perf_counter() - start
    if vcpu.state is not VcpuState.BLOCKED:
        raise RuntimeError(f"the loop did not end in hlt: {vcpu.state} {vcpu.fault}")
    return elapsed, vcpu.instructions


def _bare_run(code: bytes) -> float:
    """Seconds on a bare Unicorn instance: the same RAM, tables and segments, no hooks."""
    ram, cr3 = _ram(code)
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map_ptr(0, ram.size, UC_PROT_ALL, ram.host_addr)
    uc.ctl_exits_enabled(True)  # as the vCPU: no `until` address to look up when emulation stops
    uc.ctl_set_exits([])
    uc.reg_write(X.UC_X86_REG_CR3, cr3)
    uc.reg_write(X.UC_X86_REG_CR0, int(uc.reg_read(X.UC_X86_REG_CR0)) | CR0_PG | CR0_WP)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, BASE + ram.gdt_paddr, 23, 0))
    uc.reg_write(X.UC_X86_REG_CS, KERNEL_CS)
    for seg in (X.UC_X86_REG_DS, X.UC_X86_REG_ES, X.UC_X86_REG_SS, X.UC_X86_REG_FS, X.UC_X86_REG_GS):
        uc.reg_write(seg, KERNEL_DS)
    uc.reg_write(X.UC_X86_REG_ESP, STACK)
    uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
    start = time.perf_counter()
    uc.emu_start(BASE, 0xFFFFFFFF)
    elapsed = time.perf_counter() - start
    if ram.buf[int(uc.reg_read(X.UC_X86_REG_EIP)) - 1 - BASE] != 0xF4:  # RAM at BASE is physical 0
        raise RuntimeError("the bare loop did not end in hlt")
    return elapsed


def measure() -> dict[str, dict[str, Any]]:
    """Per loop: instructions, the best wall time and MIPS of each side, and ratio = vCPU MIPS / bare MIPS."""
    out: dict[str, dict[str, Any]] = {}
    for name in LOOPS:
        code = _assemble(name)
        vcpu_runs, bare_runs = [], []
        for _ in range(REPEATS):  # interleaved: a busy spell on the machine slows both sides alike
            vcpu_runs.append(_vcpu_run(code))
            bare_runs.append(_bare_run(code))
        instructions = vcpu_runs[0][1]
        vcpu_s, bare_s = min(s for s, _ in vcpu_runs), min(bare_runs)
        vcpu_mips, bare_mips = instructions / vcpu_s / 1e6, instructions / bare_s / 1e6
        out[name] = {"instructions": instructions, "vcpu_s": vcpu_s, "bare_s": bare_s, "vcpu_mips": vcpu_mips,
                     "bare_mips": bare_mips, "ratio": vcpu_mips / bare_mips, "target": TARGETS.get(name)}
    return out


def main() -> None:
    results = measure()
    print("guest MIPS: a pvcluster vCPU against bare Unicorn (same code, mapping and tables; best of "
          f"{REPEATS})")
    print(f"{'loop':<7} {'instructions':>13} {'vCPU MIPS':>10} {'bare MIPS':>10} {'ratio':>7} {'target':>7}")
    for name, r in results.items():
        target = f">={r['target']}" if r["target"] is not None else "-"
        print(f"{name:<7} {r['instructions']:>13,} {r['vcpu_mips']:>10.1f} {r['bare_mips']:>10.1f} "
              f"{r['ratio']:>6.2f}x {target:>7}")


if __name__ == "__main__":
    main()
