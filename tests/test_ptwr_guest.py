"""Writable page tables: a C guest whose FEATURES note requires them (``!writable_page_tables``, as 32-bit Linux's did)
boots, and writes entries of one of its own L1 tables through its read-only mapping of it with plain ``mov``,
``xchg``, ``lock cmpxchg`` and a byte store; the domain process emulates each as the hypervisor-checked update it
amounts to, as Xen's ptwr emulation (xen/arch/x86/pv/ro-page-fault.c). A write the hypervisor refuses (a frame the
guest does not own, the L1 itself mapped writable) or one to a read-only page that is no page table comes back to
the guest as its page fault. Skips where the headers or a gcc that builds 32-bit freestanding code are missing."""

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
/* A PV guest that needs writable page tables, built against Xen's public headers. */
""" + C_HEAD + r"""

""" + C_ELFNOTE + c_xen_notes("mini-ptwr") + r"""
__asm__(ELFNOTE(XEN_ELFNOTE_FEATURES, ".asciz \"!writable_page_tables\""));
""" + c_entry(4096, r"""
    ".globl l1_page\n"
    "l1_page:\n"
    "    .skip 4096\n"
    ".globl data_page\n"
    "data_page:\n"
    "    .skip 4096\n"
    ".globl plain_page\n"
    "plain_page:\n"
    "    .skip 4096\n"
""") + r"""
extern char hypercall_page[4096];
extern volatile uint32_t l1_page[1024], data_page[1024], plain_page[1024];
""" + C_HYPERCALLS + C_CONSOLE_SCHED + r"""
static int HYPERVISOR_set_trap_table(const trap_info_t *table)
{ return _hypercall1(int, set_trap_table, table); }
static int HYPERVISOR_update_va_mapping(unsigned long va, unsigned long pte, unsigned long flags)
{ return _hypercall4(int, update_va_mapping, va, pte, 0, flags); }
static int HYPERVISOR_mmu_update(mmu_update_t *req, int count, int *done, domid_t dom)
{ return _hypercall4(int, mmu_update, req, count, done, dom); }
static int HYPERVISOR_mmuext_op(struct mmuext_op *op, int count, int *done, domid_t dom)
{ return _hypercall4(int, mmuext_op, op, count, done, dom); }

""" + C_REPORT + r"""
/* The page-fault handler counts, notes the error code, and steps over the faulting store (``skip`` bytes). */
static volatile unsigned long faults, fault_error, skip;
void pf_c(unsigned long *frame) { faults++; fault_error = frame[0]; frame[1] += skip; }
__asm__(".pushsection .text\n"
        "trap_pf:\n"
        "    pushal\n"
        "    leal 32(%esp), %eax\n"
        "    pushl %eax\n"
        "    call pf_c\n"
        "    addl $4, %esp\n"
        "    popal\n"
        "    addl $4, %esp\n"
        "    iret\n"
        ".popsection\n");
extern char trap_pf[];

#define WINDOW 0xD0000000UL
#define MA(p) ((unsigned long)(p) - 0xC0000000UL)

static void invlpg(unsigned long va)
{
    struct mmuext_op op = { .cmd = MMUEXT_INVLPG_LOCAL, .arg1.linear_addr = va };
    HYPERVISOR_mmuext_op(&op, 1, 0, DOMID_SELF);
}

void start_kernel(start_info_t *si)
{
    static trap_info_t traps[] = { { 14, 0, FLAT_KERNEL_CS, 0 }, { 0, 0, 0, 0 } };
    struct mmuext_op pin = { .cmd = MMUEXT_PIN_L1_TABLE, .arg1.mfn = MA(l1_page) >> 12 };
    mmu_update_t hook;
    struct sched_shutdown sd;
    volatile uint32_t *window = (volatile uint32_t *)WINDOW;
    unsigned long before, old, ok;
    const unsigned long l2_ma = si->pt_base - 0xC0000000UL;

    traps[0].address = (unsigned long)trap_pf;
    check("set_trap_table", HYPERVISOR_set_trap_table(traps), 0);
    data_page[0] = 0x600df00d;
    plain_page[0] = 1;

    /* a new L1: read-only to the guest, pinned, hooked into the page directory at WINDOW */
    check("l1 read-only", HYPERVISOR_update_va_mapping((unsigned long)l1_page, MA(l1_page) | 0x61,
                                                       UVMF_INVLPG | UVMF_LOCAL), 0);
    check("pin l1", HYPERVISOR_mmuext_op(&pin, 1, 0, DOMID_SELF), 0);
    hook.ptr = l2_ma + (WINDOW >> 22) * 4;
    hook.val = MA(l1_page) | 0x67;
    check("hook l1 into the l2", HYPERVISOR_mmu_update(&hook, 1, 0, DOMID_SELF), 0);

    /* mov: the store is emulated as a checked update */
    l1_page[0] = MA(data_page) | 0x63;
    check("mov wrote the entry", l1_page[0], MA(data_page) | 0x63);
    check("mapped through it", window[0], 0x600df00d);

    /* xchg: the old entry comes back in the register */
    old = MA(data_page) | 0x63;
    __asm__ volatile ("xchgl %0, %1" : "+r" (old), "+m" (l1_page[1]) : : "memory");
    check("xchg returned the old entry", old, 0);
    check("xchg mapped it", window[1024], 0x600df00d);

    /* lock cmpxchg: a stale expected value fails without an update; the right one succeeds */
    old = 12345;
    __asm__ volatile ("lock cmpxchgl %3, %1; sete %b0" : "=q" (ok), "+m" (l1_page[2]), "+a" (old)
                      : "r" (MA(data_page) | 0x63) : "memory");
    /* sete wrote only the low byte of ok: its other bits were left over, so look at that byte */
    check("cmpxchg with a stale value fails", ok & 0xff, 0);
    check("and loads the entry", old, 0);
    old = 0;
    __asm__ volatile ("lock cmpxchgl %3, %1; sete %b0" : "=q" (ok), "+m" (l1_page[2]), "+a" (old)
                      : "r" (MA(data_page) | 0x63) : "memory");
    check("cmpxchg with the current value succeeds", ok & 0xff, 1);
    check("cmpxchg mapped it", window[2048], 0x600df00d);

    /* a byte store into the entry's flags: read-only from then on */
    __asm__ volatile ("movb $0x61, %0" : "+m" (*(volatile uint8_t *)&l1_page[0]) : : "memory");
    check("byte store widened to the entry", l1_page[0], MA(data_page) | 0x61);
    invlpg(WINDOW);
    skip = 6;  /* movl $imm, (%eax): c7 00 imm32 */
    before = faults;
    __asm__ volatile ("movl $1, (%0)" : : "a" (WINDOW) : "memory");
    check("the page is read-only now", faults - before, 1);

    /* refused by the hypervisor: the guest's page fault */
    skip = 2;  /* movl %edx, (%eax) */
    before = faults;
    __asm__ volatile ("movl %%edx, (%%eax)" : : "a" (&l1_page[3]), "d" (((si->nr_pages + 100) << 12) | 0x63)
                      : "memory");
    check("mapping a frame it does not own is #PF", faults - before, 1);
    check("#PF error code: present, write", fault_error, 3);
    check("entry unchanged", l1_page[3], 0);
    before = faults;
    __asm__ volatile ("movl %%edx, (%%eax)" : : "a" (&l1_page[3]), "d" (MA(l1_page) | 0x63) : "memory");
    check("mapping the L1 itself writable is #PF", faults - before, 1);
    check("a read-only mapping of it is fine", ({ l1_page[3] = MA(l1_page) | 0x61; l1_page[3]; }),
          MA(l1_page) | 0x61);

    /* a read-only page that is no page table: not emulated */
    check("plain page read-only", HYPERVISOR_update_va_mapping((unsigned long)plain_page, MA(plain_page) | 0x61,
                                                               UVMF_INVLPG | UVMF_LOCAL), 0);
    before = faults;
    __asm__ volatile ("movl %%edx, (%%eax)" : : "a" (plain_page), "d" (2) : "memory");
    check("a read-only data page is #PF", faults - before, 1);
    check("and unchanged", plain_page[0], 1);

""" + c_finish("mini-ptwr")


def _hv_events(run_dir: Path, domid: int, event: str) -> list[dict[str, Any]]:
    return [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
            if e["event"] == event and e.get("dom") == domid]


def test_c_guest_requiring_writable_page_tables_writes_its_l1_directly(run_dir: Path) -> None:
    work = run_dir / "ptwrguest"
    work.mkdir()
    elf = build_guest(work, GUEST_C, headers=(XEN_HEADER,), extra_cflags=("-fno-builtin",))
    dom, console = run_one(run_dir, "ptwr", elf)
    assert_all_passed(GUEST_C, "mini-ptwr", dom, console)
    # each emulated store reached the hypervisor as an mmu_update marked as such; the refused ones say why
    run = run_dir / "run"
    emulated = [e for e in _hv_events(run, dom["domid"], "hypercall") if e.get("emulated")]
    assert all(e["nr"] == Hypercall.mmu_update for e in emulated)
    # mov, xchg, cmpxchg, the byte store; the store to a data page; a foreign frame; the L1 writable; the L1
    # read-only; the plain page
    assert [e["result"] for e in emulated] == [0, 0, 0, 0, -22, -1, -16, 0, -22]  # -EBUSY: get_page_from_l1e
