"""A C guest built against Xen's public headers calls set_gdt, update_descriptor, stack_switch, fpu_taskswitch and
vm_assist and checks in its own code what they answer and do (its GDT page's entries, CR0.TS, which it can read in
ring 0 here); it reports each check on the console and shuts down with poweroff when all passed (crash otherwise).
Skips where the headers or a gcc that builds 32-bit freestanding code are missing, as tests/test_foreign_gnttab.py
does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cguest import (
    C_CONSOLE_SCHED,
    C_ELFNOTE,
    C_HEAD,
    C_HYPERCALLS,
    C_REPORT,
    assert_all_passed,
    build_guest,
    c_entry,
    c_finish,
    c_xen_notes,
    run_one,
)

from pvcluster.abi.xen import Hypercall
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

XEN_HEADER = Path("/usr/include/xen/arch-x86/xen-x86_32.h")

GUEST_C = r"""
/* A PV guest that checks the descriptor-table and CPU-state hypercalls, built against Xen's public headers. */
""" + C_HEAD + r"""

""" + C_ELFNOTE + c_xen_notes("mini-desc") + c_entry(4096, r"""
    ".globl gdt_page\n"
    "gdt_page:\n"
    "    .skip 4096\n"
""") + r"""
/* A page-aligned .bss page becomes the guest's GDT. */
extern char hypercall_page[4096];
extern unsigned char gdt_page[4096];
""" + C_HYPERCALLS + C_CONSOLE_SCHED + r"""
static int HYPERVISOR_update_va_mapping(unsigned long va, unsigned long pte, unsigned long flags)
{ return _hypercall4(int, update_va_mapping, va, pte, 0, flags); }
static int HYPERVISOR_set_gdt(unsigned long *frames, int entries)
{ return _hypercall2(int, set_gdt, frames, entries); }
static int HYPERVISOR_stack_switch(unsigned long ss, unsigned long esp)
{ return _hypercall2(int, stack_switch, ss, esp); }
static int HYPERVISOR_fpu_taskswitch(int set)
{ return _hypercall1(int, fpu_taskswitch, set); }
static int HYPERVISOR_update_descriptor(uint64_t ma, uint64_t desc)
{ return _hypercall4(int, update_descriptor, (uint32_t)ma, (uint32_t)(ma >> 32), (uint32_t)desc,
                     (uint32_t)(desc >> 32)); }
static int HYPERVISOR_vm_assist(unsigned int cmd, unsigned int type)
{ return _hypercall2(int, vm_assist, cmd, type); }

""" + C_REPORT + r"""
static unsigned long read_cr0(void)
{
    unsigned long cr0;
    __asm__ volatile ("mov %%cr0, %0" : "=r" (cr0));
    return cr0;
}

static uint64_t entry(int i) /* descriptor i of the GDT page, as the guest reads it */
{
    const volatile uint32_t *w = (const volatile uint32_t *)gdt_page;
    return w[2 * i] | ((uint64_t)w[2 * i + 1] << 32);
}

#define X86_CR0_TS 0x8
/* Flat 4 GiB segments (base 0, limit 0xfffff pages); DPL in bits 45-46. */
#define CODE_DPL0 0x00cf9a000000ffffULL
#define CODE_DPL1 0x00cfba000000ffffULL
#define DATA_DPL1 0x00cfb2000000ffffULL
#define DATA_DPL3 0x00cff2000000ffffULL
#define TSS_DESC  0x0000890000000067ULL

void start_kernel(start_info_t *si)
{
    unsigned long gdt_mfn = ((unsigned long)gdt_page - 0xC0000000UL) >> 12;
    uint64_t gdt_ma = (uint64_t)gdt_mfn << 12;
    unsigned long frames[1];
    struct sched_shutdown sd;
    const unsigned long ro = 0x21, rw = 0x63; /* present+accessed; present+writable+accessed+dirty */

    /* vm_assist: a 32-bit guest's assists are enabled; m2p_strict is 64-bit only; unknown commands are ENOSYS */
    check("vm_assist writable_pagetables", HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_writable_pagetables), 0);
    check("vm_assist 4gb_segments", HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_4gb_segments), 0);
    check("vm_assist disable 4gb_segments", HYPERVISOR_vm_assist(VMASST_CMD_disable, VMASST_TYPE_4gb_segments), 0);
    check("vm_assist m2p_strict", HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_m2p_strict), -XEN_EINVAL);
    check("vm_assist type 6", HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_runstate_update_flag + 1),
          -XEN_EINVAL);
    check("vm_assist bad cmd", HYPERVISOR_vm_assist(2, VMASST_TYPE_writable_pagetables), -XEN_ENOSYS);

    /* fpu_taskswitch: the guest runs in ring 0 here, so it reads CR0.TS itself */
    check("fpu_taskswitch 1", HYPERVISOR_fpu_taskswitch(1), 0);
    check("cr0.ts set", (read_cr0() & X86_CR0_TS) != 0, 1);
    check("fpu_taskswitch 0", HYPERVISOR_fpu_taskswitch(0), 0);
    check("cr0.ts clear", (read_cr0() & X86_CR0_TS) != 0, 0);

    /* stack_switch: never refused; a ring-0 SS is raised to ring 1 (the trace shows kernel_ss) */
    check("stack_switch ring-1 ss", HYPERVISOR_stack_switch(0x21, 0xC0100000), 0);
    check("stack_switch ring-0 ss", HYPERVISOR_stack_switch(0x20, 0xC0100000), 0);

    /* update_descriptor into a page of its own */
    check("update_descriptor ring-0 code", HYPERVISOR_update_descriptor(gdt_ma + 8 * 3, CODE_DPL0), 0);
    check("ring-0 code became ring 1", entry(3) == CODE_DPL1, 1);
    check("update_descriptor ring-3 data", HYPERVISOR_update_descriptor(gdt_ma + 8 * 4, DATA_DPL3), 0);
    check("ring-3 data as given", entry(4) == DATA_DPL3, 1);
    check("update_descriptor tss", HYPERVISOR_update_descriptor(gdt_ma + 8 * 5, TSS_DESC | (1ULL << 47)),
          -XEN_EINVAL);
    check("tss not written", entry(5) == 0, 1);
    check("update_descriptor misaligned", HYPERVISOR_update_descriptor(gdt_ma + 4, DATA_DPL1), -XEN_EINVAL);
    check("update_descriptor foreign frame",
          HYPERVISOR_update_descriptor((uint64_t)(si->nr_pages + 100) << 12, DATA_DPL1), -XEN_EINVAL);

    /* set_gdt: its own frame, mapped read-only first as Linux does; a foreign frame or too many entries refused */
    check("gdt page read-only", HYPERVISOR_update_va_mapping((unsigned long)gdt_page, (gdt_mfn << 12) | ro,
                                                             UVMF_INVLPG | UVMF_LOCAL), 0);
    frames[0] = si->nr_pages + 50;
    check("set_gdt foreign frame", HYPERVISOR_set_gdt(frames, 16), -XEN_EINVAL);
    frames[0] = gdt_mfn;
    check("set_gdt too many entries", HYPERVISOR_set_gdt(frames, FIRST_RESERVED_GDT_ENTRY + 1), -XEN_EINVAL);
    check("set_gdt own frame", HYPERVISOR_set_gdt(frames, 512), 0);
    check("gdt page not writable", HYPERVISOR_update_va_mapping((unsigned long)gdt_page, (gdt_mfn << 12) | rw,
                                                                UVMF_INVLPG | UVMF_LOCAL), -XEN_EBUSY);
    check("update_descriptor in the live gdt", HYPERVISOR_update_descriptor(gdt_ma + 8 * 6, DATA_DPL1), 0);
    check("live gdt entry visible", entry(6) == DATA_DPL1, 1);

""" + c_finish("mini-desc")


def _hv_events(run_dir: Path, domid: int, event: str) -> list[dict[str, Any]]:
    return [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
            if e["event"] == event and e.get("dom") == domid]


def test_c_guest_checks_descriptor_tables_stack_switch_fpu_taskswitch_and_vm_assist(run_dir: Path) -> None:
    work = run_dir / "descguest"
    work.mkdir()
    elf = build_guest(work, GUEST_C, headers=(XEN_HEADER,), extra_cflags=("-fno-builtin",))
    dom, console = run_one(run_dir, "desc", elf)
    assert_all_passed(GUEST_C, "mini-desc", dom, console)

    run = run_dir / "run"
    switches = _hv_events(run, dom["domid"], "desc.stack_switch")
    assert [(e["ss"], e["kernel_ss"]) for e in switches] == [(0x21, 0x21), (0x20, 0x21)]
    (gdt,) = _hv_events(run, dom["domid"], "desc.set_gdt")
    assert gdt["entries"] == 512 and len(gdt["frames"]) == 1
    calls = _hv_events(run, dom["domid"], "hypercall")
    results = {nr: [e["result"] for e in calls if e["nr"] == nr]
               for nr in (Hypercall.set_gdt, Hypercall.fpu_taskswitch, Hypercall.vm_assist)}
    assert results == {Hypercall.set_gdt: [-22, -22, 0], Hypercall.fpu_taskswitch: [0, 0],
                       Hypercall.vm_assist: [0, 0, 0, -22, -22, -38]}
    # the domain process applied the GDT to its vCPU
    dom_events = [e for f in (run / "trace").glob("dom*.jsonl") for e in read_events(f) if e["event"] == "vcpu.gdt"]
    assert [(e["frames"], e["entries"]) for e in dom_events] == [(gdt["frames"], 512)]
