"""A C guest built against Xen's public headers checks, in its own code, the privilege model of a 32-bit PV kernel:
it runs in ring 1 on Xen's flat selectors with %esi at start_info; its privileged instructions trap and are emulated
as Xen emulates them (CR reads, TS, CPUID through the forced-emulation prefix) or come back to it as #GP / #UD;
set_trap_table's handlers get exception bounce frames (error code, CR2 in vcpu_info.arch.cr2, the saved upcall
mask); ``int n`` is checked against each gate's DPL; HYPERVISOR_iret takes it to ring 3 and back, where a trap
lands on the stack_switch stack. And it cannot clear CR0.WP, load a GDT or IDT, or write its page tables or the
hypervisor's GDT window. Skips where the headers or a gcc that builds 32-bit freestanding code are missing."""

from __future__ import annotations

from pathlib import Path

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

from pvcluster.rundiff import first_divergence

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

XEN_HEADER = Path("/usr/include/xen/arch-x86/xen-x86_32.h")

GUEST_C = r"""
/* A PV guest that checks ring 1, traps, iret and privileged-instruction emulation, built against Xen's headers. */
""" + C_HEAD + r"""
#include <xen/arch-x86/cpuid.h>

""" + C_ELFNOTE + c_xen_notes("mini-ring1") + c_entry(4096, r"""
    ".globl user_stack\n"
    "user_stack:\n"
    "    .skip 4096\n"
    "user_stack_top:\n"
    ".globl gdt_page\n"
    "gdt_page:\n"
    "    .skip 4096\n"
    ".globl kernel_stack\n"
    "kernel_stack:\n"
    "    .skip 4096\n"
    ".globl kernel_stack_top\n"
    "kernel_stack_top:\n"
""") + r"""
extern char hypercall_page[4096];
extern char user_stack[4096], kernel_stack[4096], kernel_stack_top[], user_page[];
extern uint32_t gdt_page[1024];
""" + C_HYPERCALLS + C_CONSOLE_SCHED + r"""
static int HYPERVISOR_set_trap_table(const trap_info_t *table)
{ return _hypercall1(int, set_trap_table, table); }
static int HYPERVISOR_stack_switch(unsigned long ss, unsigned long esp)
{ return _hypercall2(int, stack_switch, ss, esp); }
static int HYPERVISOR_fpu_taskswitch(int set)
{ return _hypercall1(int, fpu_taskswitch, set); }
static int HYPERVISOR_set_gdt(unsigned long *frames, int entries)
{ return _hypercall2(int, set_gdt, frames, entries); }
static int HYPERVISOR_update_va_mapping(unsigned long va, unsigned long pte, unsigned long flags)
{ return _hypercall4(int, update_va_mapping, va, pte, 0, flags); }

""" + C_REPORT + r"""
/* What the last trap saw: the handlers (below, in assembly) call trap_c with the vector and their frame. */
struct trap_seen { unsigned long vector, error, eip, cs, eflags, esp, ss, handler_esp; };
static volatile struct trap_seen seen;
static volatile unsigned long counts[256];
static volatile unsigned long skip;     /* bytes the handler steps over on return (kernel-mode checks) */
volatile unsigned long kernel_word = 0x5a5a5a5a;
unsigned long saved_kernel_esp;

#define HAS_ERROR(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17)

/* regs: the handler's pushal block; the bounce frame follows it. Returns 1 to leave user mode for good. */
unsigned long trap_c(unsigned long vector, unsigned long *regs)
{
    unsigned long *frame = regs + 8;
    int e = HAS_ERROR(vector);
    seen.vector = vector;
    seen.error = e ? frame[0] : 0;
    frame += e;
    seen.eip = frame[0];
    seen.cs = frame[1];
    seen.eflags = frame[2];
    seen.esp = (frame[1] & 3) == 3 ? frame[3] : 0;
    seen.ss = (frame[1] & 3) == 3 ? frame[4] : 0;
    seen.handler_esp = (unsigned long)regs;
    counts[vector & 0xff]++;
    if ((frame[1] & 3) == 3) {
        if (vector == 0x80)
            return regs[7] == 2;             /* eax 2: the user code is done */
        frame[0] += vector == 14 ? 5 : 2;    /* a user #GP is an int n (2 bytes), the #PF a 5-byte mov */
        return 0;
    }
    frame[0] += skip;
    return 0;
}

#define HANDLER(name, vector, has_error)                         \
__asm__(".pushsection .text\n"                                  \
        #name ":\n"                                             \
        "    pushal\n"                                          \
        "    pushl %esp\n"                                      \
        "    pushl $" #vector "\n"                              \
        "    call trap_c\n"                                     \
        "    addl $8, %esp\n"                                   \
        "    testl %eax, %eax\n"                                \
        "    jnz 1f\n"                                          \
        "    popal\n"                                           \
        "    addl $" #has_error "*4, %esp\n"                    \
        "    iret\n"                                            \
        "1:  movl saved_kernel_esp, %esp\n"                     \
        "    jmp user_done\n"                                   \
        ".popsection\n")
HANDLER(trap_bp, 3, 0);
HANDLER(trap_ud, 6, 0);
HANDLER(trap_np, 11, 1);
HANDLER(trap_gp, 13, 1);
HANDLER(trap_pf, 14, 1);
HANDLER(trap_int80, 0x80, 0);
HANDLER(trap_int81, 0x81, 0);
extern char trap_bp[], trap_ud[], trap_np[], trap_gp[], trap_pf[], trap_int80[], trap_int81[];

/* enter_user(): HYPERVISOR_iret to user_entry in ring 3 on user_stack; back when the user code's last int 0x80
   makes trap_c return 1. The user page: int 0x80 (eax 1), int 0x81 and int 0x82 (#GP: their gates do not admit
   ring 3), a read of a kernel page (#PF), int 0x80 (eax 2). */
void enter_user(void);
__asm__(".pushsection .text\n"
        ".globl enter_user\n"
        "enter_user:\n"
        "    pushal\n"
        "    movl %esp, saved_kernel_esp\n"
        "    pushl $0xe033\n"
        "    pushl $user_stack_top\n"
        "    pushl $0x202\n"
        "    pushl $0xe02b\n"
        "    pushl $user_page\n"
        "    jmp hypercall_page + 23 * 32\n"
        "user_done:\n"
        "    popal\n"
        "    ret\n"
        ".balign 4096\n"
        ".globl user_page\n"
        "user_page:\n"
        "    movl $1, %eax\n"
        "    int $0x80\n"
        "    int $0x81\n"
        "    int $0x82\n"
        "    movl kernel_word, %eax\n"
        "    movl $2, %eax\n"
        "    int $0x80\n"
        "2:  jmp 2b\n"
        ".balign 4096\n"
        ".popsection\n");

/* iret_to_ring1(flags): HYPERVISOR_iret back into ring 1 with the given EFLAGS (its IF sets the upcall mask). */
static void iret_to_ring1(unsigned long flags)
{
    __asm__ volatile ("pushl %%ss\n"
                      "pushl %%esp\n"
                      "addl $4, (%%esp)\n"    /* the ESP of the caller's frame, unused in ring 1 */
                      "pushl %0\n"
                      "pushl $0xe019\n"
                      "pushl $1f\n"
                      "jmp hypercall_page + 23 * 32\n"
                      "1: addl $8, %%esp\n"   /* ring 1: iret pops eip, cs, eflags only; drop esp, ss */
                      : : "r" (flags) : "eax", "memory");
}

static unsigned long read_cr(int n)
{
    unsigned long v = 0;
    if (n == 0) __asm__ volatile ("mov %%cr0, %0" : "=r" (v));
    if (n == 2) __asm__ volatile ("mov %%cr2, %0" : "=r" (v));
    if (n == 3) __asm__ volatile ("mov %%cr3, %0" : "=r" (v));
    return v;
}

static void xen_cpuid(unsigned long leaf, unsigned long *r)
{
    __asm__ volatile (".byte 0x0f, 0x0b, 0x78, 0x65, 0x6e\n cpuid"
                      : "=a" (r[0]), "=b" (r[1]), "=c" (r[2]), "=d" (r[3]) : "0" (leaf), "2" (0));
}

void start_kernel(start_info_t *si)
{
    static trap_info_t first[] = {
        { 13, 0, FLAT_KERNEL_CS, 0 }, { 0, 0, 0, 0 },
    };
    static trap_info_t second[] = {
        { 3, 3, FLAT_KERNEL_CS, 0 }, { 6, 0, FLAT_KERNEL_CS, 0 }, { 11, 0, FLAT_KERNEL_CS, 0 },
        { 14, 0, FLAT_KERNEL_CS, 0 },
        { 0x80, 3, FLAT_KERNEL_CS, 0 }, { 0x81, 1, FLAT_KERNEL_CS, 0 }, { 0, 0, 0, 0 },
    };
    shared_info_t *shared = (shared_info_t *)(si->shared_info + 0xC0000000UL);
    unsigned long cs, ss, r[4], cr0, before, frame, sel, pt = si->pt_base;
    struct sched_shutdown sd;
    volatile uint32_t *gdt_window = (volatile uint32_t *)0xFC400000UL;

    __asm__ volatile ("mov %%cs, %0; mov %%ss, %1" : "=r" (cs), "=r" (ss));
    check("runs in ring 1 on FLAT_KERNEL_CS", cs & 0xffff, FLAT_KERNEL_CS);
    check("stack on FLAT_KERNEL_SS", ss & 0xffff, FLAT_KERNEL_SS);
    check("esi pointed at start_info", si->magic[0] == 'x' && si->magic[8] == 'x'
          && (si->magic[14] == 0 || (si->magic[14] == 'p' && si->magic[15] == 0)), 1);

    first[0].address = (unsigned long)trap_gp;
    second[0].address = (unsigned long)trap_bp;
    second[1].address = (unsigned long)trap_ud;
    second[2].address = (unsigned long)trap_np;
    second[3].address = (unsigned long)trap_pf;
    second[4].address = (unsigned long)trap_int80;
    second[5].address = (unsigned long)trap_int81;
    check("set_trap_table #GP", HYPERVISOR_set_trap_table(first), 0);
    check("set_trap_table the rest", HYPERVISOR_set_trap_table(second), 0);

    /* privileged instructions: CR0 reads are emulated, WP and PG cannot be cleared, TS can */
    cr0 = read_cr(0);
    check("cr0 read: PG", cr0 >> 31, 1);
    check("cr0 read: WP", (cr0 >> 16) & 1, 1);
    skip = 3;
    before = counts[13];
    __asm__ volatile ("mov %0, %%cr0" : : "r" (cr0 & ~(1UL << 16)));
    check("clearing cr0.wp is #GP", counts[13] - before, 1);
    check("#GP error code 0", seen.error, 0);
    check("#GP frame cs is ring 1", seen.cs & 0xffff, FLAT_KERNEL_CS);
    check("cr0.wp still set", (read_cr(0) >> 16) & 1, 1);
    check("fpu_taskswitch 1", HYPERVISOR_fpu_taskswitch(1), 0);
    check("cr0.ts set", (read_cr(0) >> 3) & 1, 1);
    __asm__ volatile ("clts");
    check("clts clears ts", (read_cr(0) >> 3) & 1, 0);
    check("cr3 read is the page directory", read_cr(3), pt - 0xC0000000UL);
    /* mov to cr3: the hypervisor's NEW_BASEPTR (validated); a frame it refuses is #GP */
    __asm__ volatile ("mov %0, %%cr3" : : "r" (pt - 0xC0000000UL) : "memory");
    check("cr3 reloaded", read_cr(3), pt - 0xC0000000UL);
    skip = 3;
    before = counts[13];
    __asm__ volatile ("mov %0, %%cr3" : : "r" ((si->nr_pages + 100) << 12) : "memory");
    check("cr3 on a frame not its own is #GP", counts[13] - before, 1);
    check("cr3 unchanged", read_cr(3), pt - 0xC0000000UL);
    skip = 1;
    before = counts[13];
    __asm__ volatile ("hlt");
    check("hlt is #GP", counts[13] - before, 1);
    skip = 3;
    before = counts[13];
    __asm__ volatile ("lgdt (%0)" : : "a" (kernel_stack));
    __asm__ volatile ("lidt (%0)" : : "a" (kernel_stack));
    check("lgdt and lidt are #GP", counts[13] - before, 2);

    /* CPUID through the forced-emulation prefix; the prefix without cpuid is #UD */
    xen_cpuid(XEN_CPUID_FIRST_LEAF, r);
    check("xen cpuid signature", r[1] == XEN_CPUID_SIGNATURE_EBX && r[2] == XEN_CPUID_SIGNATURE_ECX
          && r[3] == XEN_CPUID_SIGNATURE_EDX, 1);
    check("xen cpuid max leaf", r[0] >= XEN_CPUID_FIRST_LEAF + 2, 1);
    xen_cpuid(XEN_CPUID_FIRST_LEAF + 1, r);
    check("xen cpuid version 4.17", r[0], (4 << 16) | 17);
    xen_cpuid(XEN_CPUID_FIRST_LEAF + 2, r);
    check("xen cpuid hypercall pages", r[0], 1);
    xen_cpuid(1, r);
    check("cpuid leaf 1 hypervisor bit", r[2] >> 31, 1);
    skip = 6;
    before = counts[6];
    __asm__ volatile (".byte 0x0f, 0x0b, 0x78, 0x65, 0x6e, 0x90");
    check("prefix without cpuid is #UD", counts[6] - before, 1);

    /* page faults: error code, CR2 in vcpu_info.arch.cr2 and in the emulated cr2 */
    skip = 2;
    before = counts[14];
    __asm__ volatile ("movl %%eax, (%%edx)" : : "a" (0), "d" (pt) : "memory");
    check("writing its page directory is #PF", counts[14] - before, 1);
    check("#PF error code: present, write", seen.error, 3);
    check("arch.cr2", shared->vcpu_info[0].arch.cr2, pt);
    check("emulated cr2", read_cr(2), pt);
    before = counts[14];
    __asm__ volatile ("movl %%eax, (%%edx)" : : "a" (0), "d" (gdt_window) : "memory");
    check("writing the GDT window is #PF", counts[14] - before, 1);
    check("ring 1 reads Xen's FLAT_RING1_CS descriptor", gdt_window[0xe018 / 4 + 1], 0x00cfbb00);
    before = counts[14];
    __asm__ volatile ("movl %%eax, (%%edx)" : : "a" (0), "d" (MACH2PHYS_VIRT_START_NONPAE) : "memory");
    check("writing the m2p is #PF", counts[14] - before, 1);

    /* its own GDT: a flat ring-1 data descriptor at index 2 (accessed bit clear: the CPU sets it on the load) */
    gdt_page[4] = 0x0000ffff;
    gdt_page[5] = 0x00cfb200;
    check("gdt page read-only", HYPERVISOR_update_va_mapping((unsigned long)gdt_page,
          ((unsigned long)gdt_page - 0xC0000000UL) | 0x61, UVMF_INVLPG | UVMF_LOCAL), 0);
    frame = ((unsigned long)gdt_page - 0xC0000000UL) >> 12;
    check("set_gdt", HYPERVISOR_set_gdt(&frame, 16), 0);
    __asm__ volatile ("movw $0x11, %%ax; movw %%ax, %%es; movw %%es, %%ax; movl %%eax, %0" : "=m" (sel) : : "eax");
    check("es loaded from its own GDT", sel & 0xffff, 0x11);
    check("the load set the accessed bit", (gdt_page[5] >> 8) & 1, 1);
    __asm__ volatile ("movw %w0, %%es" : : "r" (FLAT_KERNEL_DS));
    skip = 2;  /* mov %ax, %fs */
    before = counts[11] + counts[13];
    __asm__ volatile ("movw $0x19, %%ax; movw %%ax, %%fs" : : : "eax");  /* index 3: no descriptor */
    check("an empty GDT slot faults", counts[11] + counts[13] - before, 1);

    /* software interrupts against the gates' DPL; int3 (both resume after the instruction) */
    skip = 0;
    before = counts[0x81];
    __asm__ volatile ("int $0x81");
    check("int 0x81 (DPL 1) from ring 1", counts[0x81] - before, 1);
    skip = 2;
    before = counts[13];
    __asm__ volatile ("int $0x83");
    check("int 0x83 (no gate) is #GP", counts[13] - before, 1);
    check("#GP error code names the IDT entry", seen.error, (0x83 << 3) | 2);
    skip = 0;  /* #GP for int 0x83 was at the instruction: skip = 2 above */
    __asm__ volatile ("int3");
    check("int3 reaches #BP", counts[3], 1);

    /* events: a bounce frame folds the saved upcall mask into CS and EFLAGS.IF */
    shared->vcpu_info[0].evtchn_upcall_mask = 1;
    __asm__ volatile ("int $0x81");
    check("saved upcall mask in cs bits 16-23", seen.cs >> 16, 1);
    check("eflags.if = !saved mask", (seen.eflags >> 9) & 1, 0);
    shared->vcpu_info[0].evtchn_upcall_mask = 0;
    __asm__ volatile ("int $0x81");
    check("unmasked: eflags.if set", (seen.eflags >> 9) & 1, 1);

    /* HYPERVISOR_iret within ring 1 sets the upcall mask from EFLAGS.IF */
    iret_to_ring1(0x002);
    check("iret with IF clear masks events", shared->vcpu_info[0].evtchn_upcall_mask, 1);
    iret_to_ring1(0x202);
    check("iret with IF set unmasks events", shared->vcpu_info[0].evtchn_upcall_mask, 0);

    /* ring 3: map the user page and stack for user access, switch stacks, iret there and come back */
    check("user page", HYPERVISOR_update_va_mapping((unsigned long)user_page,
          ((unsigned long)user_page - 0xC0000000UL) | 0x67, UVMF_INVLPG | UVMF_LOCAL), 0);
    check("user stack", HYPERVISOR_update_va_mapping((unsigned long)user_stack,
          ((unsigned long)user_stack - 0xC0000000UL) | 0x67, UVMF_INVLPG | UVMF_LOCAL), 0);
    check("stack_switch", HYPERVISOR_stack_switch(FLAT_KERNEL_SS, (unsigned long)kernel_stack_top), 0);
    enter_user();
    check("back in ring 1", ({ unsigned long c; __asm__ volatile ("mov %%cs, %0" : "=r" (c)); c & 0xffff; }),
          FLAT_KERNEL_CS);
    check("int 0x80 from ring 3, twice", counts[0x80], 2);
    check("its frame: user cs", seen.cs & 0xffff, FLAT_USER_CS);
    check("its frame: user ss", seen.ss & 0xffff, FLAT_USER_SS);
    check("its frame: user esp", seen.esp <= (unsigned long)user_stack + 4096 && seen.esp > (unsigned long)user_stack,
          1);
    check("on the stack_switch stack", seen.handler_esp < (unsigned long)kernel_stack_top
          && seen.handler_esp > (unsigned long)kernel_stack, 1);
    check("user int 0x81 and int 0x82 were #GP", counts[13] >= 2, 1);
    check("user read of a kernel page is #PF", counts[14], 4);

""" + c_finish("mini-ring1")


# The same guest as a PAE kernel (guest type xen-3.0-x86_32p): everything it checks holds in both paging modes (its
# write to 0xFC000000 then hits the hole where nothing is mapped, still a #PF).
PAE_NOTE = '__asm__(ELFNOTE(XEN_ELFNOTE_PAE_MODE, ".asciz \\"yes\\""));\n'


@pytest.mark.parametrize("pae", [False, True], ids=["non-pae", "pae"])
def test_c_guest_checks_ring1_traps_iret_and_privileged_instructions(run_dir: Path, pae: bool) -> None:
    work = run_dir / "ring1guest"
    work.mkdir()
    source = GUEST_C.replace("extern char hypercall_page[4096];", PAE_NOTE + "extern char hypercall_page[4096];", 1)
    elf = build_guest(work, source if pae else GUEST_C, headers=(XEN_HEADER,), extra_cflags=("-fno-builtin",))
    dom, console = run_one(run_dir, "ring1", elf)
    assert_all_passed(GUEST_C, "mini-ring1", dom, console)
    # exceptions, emulation and ring changes are virtual-time events like any other: a second run is the same trace
    again = run_dir / "again"
    again.mkdir()
    run_one(again, "ring1", elf)
    assert first_divergence(run_dir / "run", again / "run") is None
