"""The paravirt_ops slots of the built-in kernel's table, in table order (domains/kernel/pvops.S).

Shared by the kernel builder (PVCALL sites, patching) and the hypervisor's VMI ROM, whose table covers the first
``VMI_ROM_SLOTS`` of them: a guest slot past the ROM's table has no ROM entry, so it stays native.
"""

from __future__ import annotations

PV_OPS: tuple[str, ...] = (
    "init",  # init ops
    "set_tss_desc",  # cpu ops
    "irq_disable",  # irq ops
    "irq_enable",
    "save_fl",
    "restore_fl",
    "halt",
    "read_cr3",  # mmu ops
    "write_cr3",
    "set_pte",
    "flush_tlb_user",
    "flush_tlb_kernel",
    "flush_tlb_single",
    "flush_tlb_others",
    "send_ipi",  # apic ops
    "clock_ns",  # time ops
    "lazy_mmu_begin",  # mmu ops added with lazy MMU batching (issue 5)
    "lazy_mmu_end",
)
NR_PV_OPS = len(PV_OPS)
VMI_ROM_SLOTS = 16
