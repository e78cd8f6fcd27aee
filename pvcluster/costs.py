"""The virtual cost of what a guest does: one definition of the instruction classes and of every default, each with
where its order of magnitude comes from. Shared by the spec (``[hypervisor.cost]`` and ``[hypervisor.cost.insn]``),
the domain process (which classifies each translated block once and charges its cost per run) and the hypervisor.

The figures model a 2006-era x86 server core at about 2.5 GHz (0.4 ns a cycle). They are orders of magnitude, not
measurements of one part; ``bench`` (section ``calibration``) prints what they add up to beside published figures.
Instruction classes are priced per instruction at ``ps_per_instr = 1000``; ``ps_per_instr`` scales every class (a
faster or slower CPU, and the ``slow`` fault), so the plain instruction costs exactly ``ps_per_instr``.
"""

from __future__ import annotations

import enum


class InsnClass(enum.IntEnum):
    """What an instruction costs depends on its class; the order is the wire order of ``Build.insn_ps``."""

    ALU = 0  # everything else: register arithmetic, direct jumps and calls
    MEM = 1  # a load or store through a memory operand (push/pop included)
    INDIRECT = 2  # call or jmp through a register or memory: what pvops call-site patching removes
    RET = 3
    IRET = 4
    SERIALISING = 5  # cpuid, lgdt/lidt/lldt/ltr, mov to cr0/cr2/cr4, wbinvd, wrmsr/rdmsr, clts
    CR3_WRITE = 6  # mov to cr3: serialises and flushes the non-global TLB (the refill is the next class's price)
    INVLPG = 7
    CLI_STI = 8
    PUSHF_POPF = 9
    IO = 10  # in/out and the string forms: a port access leaves the core
    PAUSE = 11  # the spin-wait hint
    LOCKED = 12  # a locked read-modify-write (lock prefix, xchg with memory): the line comes over exclusively


# ps per instruction at ps_per_instr = 1000, and why (cycle counts: Agner Fog's instruction tables and
# microarchitecture guide for the Pentium 4 / Core 2 generation, the figures, the Intel SDM).
INSN_PS: dict[InsnClass, int] = {
    InsnClass.ALU: 1000,  # ~2.5 cycles: kernel code retires well under one instruction a cycle
    InsnClass.MEM: 2000,  # an L1 hit is 3-4 cycles of latency on top of the operation
    InsnClass.INDIRECT: 5000,  # ~12 cycles: an indirect branch through the BTB, costlier when it mispredicts
    InsnClass.RET: 2000,  # return stack buffer hit
    InsnClass.IRET: 40000,  # ~100 cycles: IRET reloads CS/EFLAGS (and SS:ESP) with its privilege checks
    InsnClass.SERIALISING: 60000,  # ~150 cycles: CPUID, descriptor-table loads, control-register writes
    InsnClass.CR3_WRITE: 100000,  # "a full local flush ~100 cycles" plus the serialisation: ~250 cycles (the
    # refill of what it dropped is TLB_REFILL_NS, added to the instruction's price)
    InsnClass.INVLPG: 100000,  # "INVLPG a few hundred cycles": ~250 cycles
    InsnClass.CLI_STI: 4000,  # ~10 cycles (they serialise the interrupt flag, not the pipeline)
    InsnClass.PUSHF_POPF: 8000,  # POPF ~20 cycles: it may change IF, TF and IOPL
    InsnClass.IO: 500000,  # ~0.5 µs: a port access crosses to the chipset's LPC bus and back
    InsnClass.PAUSE: 4000,  # ~10 cycles on cores of the era (140 on Skylake and later)
    # ~125 cycles: the cache line comes over from the core that last wrote it, as a flag another CPU spins on or
    # counts into does (cross-core transfers of the era: 40-100+ ns), and the locked operation completes on it
    InsnClass.LOCKED: 50000,
}

# The platform's clock port (CLOCK_PORT) is the guest's cycle counter: priced as RDTSC (~25 cycles), not as I/O. RDTSC
# itself costs the same.
CLOCK_READ_PS = 10000
# The virtual TSC's rate: the modelled core's clock (0.4 ns a cycle). RDTSC returns the vCPU's virtual time in these
# ticks, and vcpu_time_info's tsc_to_system_mul / tsc_shift are computed from it (pvcluster/abi/pvclock.py).
TSC_HZ = 2_500_000_000
PS_PER_TSC_TICK = 10**12 // TSC_HZ
assert PS_PER_TSC_TICK * TSC_HZ == 10**12, "a TSC tick must be a whole number of ps"

# Costs the hypervisor and the domain process charge outside instruction classes (virtual ns).
IRQ_ENTRY_NS = 100  # delivering an interrupt or exception through a gate (or Xen's bounce frame): ~250 cycles
MMIO_NS = 150  # a trapped MMIO access (the local APIC's registers: an ICR write sends an IPI): ~400 cycles
MULTICALL_ENTRY_NS = 50  # Xen's do_multicall decoding and dispatching one entry: ~100 cycles, beside one trap
FLUSH_LOCAL_NS = 40  # the hypervisor flushing one pCPU's TLB (write to CR3): ~100 cycles
FLUSH_PAGE_NS = 100  # INVLPG on one pCPU: ~250 cycles
# A flush of other pCPUs: Xen's flush_area_mask sends them an IPI and waits for each to acknowledge: "a remote
# shootdown acknowledgement ~1000+ cycles" (Amit, "Optimizing the TLB Shootdown Algorithm with Page Access
# Tracking", USENIX ATC 2017, measures a few µs for a full shootdown on modern parts).
FLUSH_REMOTE_NS = 500
# Refilling the translations a full TLB flush dropped, charged to the flushed vCPU (a guest's own cr3 write, or a
# flush the hypervisor applied for it): a kernel loop touches a handful of pages again, a page walk of ~30 cycles
# each (two levels, mostly cached): ~8 walks ~ 100 ns. A single-page INVLPG's one walk is in its class price.
TLB_REFILL_NS = 100
