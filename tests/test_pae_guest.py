"""A PAE C guest (XEN_ELFNOTE_PAE_MODE "yes": guest type xen-3.0-x86_32p) built against Xen's public headers boots on
3-level tables and checks from its own code what a 32-bit PAE PV kernel meets on Xen: the start_info magic
"xen-3.0-x86_32p", pt_base an L3 whose slot 3 names the L2 that maps the kernel (its own L1 entry read-only),
nr_pt_frames counting every table frame, XENVER_capabilities and platform_parameters for PAE, the m2p read-only at
MACH2PHYS_VIRT_START_PAE (0xF5800000) agreeing with the p2m, update_va_mapping with a 64-bit PTE passed as
(va, low, high, flags), mmu_update of a 64-bit L1 entry, pinning an L1, an L2 and an L3 and running on that L3
(MMUEXT_NEW_BASEPTR), and the refusals: an L3 without slot 3, a hole slot of the L2 under slot 3, slot 3 itself,
a PTE with high flag bits; and a direct write of a PTE's halves (writable page tables), with Xen's fix-up of an
upper-half write that leaves an invalid entry (the present bit cleared). Skips where the headers or a gcc that
builds 32-bit freestanding code are missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cguest import (
    C_CONSOLE_SCHED,
    C_ELFNOTE,
    C_HYPERCALLS,
    C_REPORT,
    assert_all_passed,
    build_guest,
    c_entry,
    c_finish,
    c_xen_notes,
    run_one,
)

from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

XEN_HEADER = Path("/usr/include/xen/arch-x86/xen-x86_32.h")

GUEST_C = r"""
/* A PAE PV guest, built against Xen's public headers. */
#define __XEN_INTERFACE_VERSION__ 0x0003020a
#include <stdint.h>
#include <xen/xen.h>
#include <xen/sched.h>
#include <xen/version.h>
#include <xen/elfnote.h>
#include <xen/errno.h>

""" + C_ELFNOTE + c_xen_notes("mini-pae") + r"""
__asm__(ELFNOTE(XEN_ELFNOTE_PAE_MODE, ".asciz \"yes\""));
""" + c_entry(4096, r"""
    ".globl spare\n"
    "spare:\n"
    "    .skip 6 * 4096\n"
""") + r"""
extern char hypercall_page[4096];
extern unsigned char spare[6 * 4096];
""" + C_HYPERCALLS + C_CONSOLE_SCHED + r"""
static int HYPERVISOR_xen_version(int cmd, void *arg)
{ return _hypercall2(int, xen_version, cmd, arg); }
/* PAE: the 64-bit PTE goes as its low and high words (Linux's HYPERVISOR_update_va_mapping on x86-32 PAE) */
static int HYPERVISOR_update_va_mapping(unsigned long va, uint64_t pte, unsigned long flags)
{ return _hypercall4(int, update_va_mapping, va, (unsigned long)pte, (unsigned long)(pte >> 32), flags); }
static int HYPERVISOR_mmu_update(mmu_update_t *req, int count, int *done, domid_t dom)
{ return _hypercall4(int, mmu_update, req, count, done, dom); }
static int HYPERVISOR_mmuext_op(struct mmuext_op *op, int count, int *done, domid_t dom)
{ return _hypercall4(int, mmuext_op, op, count, done, dom); }

""" + C_REPORT + r"""
#define BASE 0xC0000000UL
#define RO 0x21ULL  /* present, accessed */
#define RW 0x63ULL  /* present, writable, accessed, dirty */
#define PDE 0x27ULL /* present, writable, user, accessed */
#define L3E 0x01ULL /* present: a PAE L3 entry has no other flag */
#define ADDR 0x000FFFFFFFFFF000ULL

static int set_entry(uint64_t ma, uint64_t val) /* one MMU_NORMAL_PT_UPDATE */
{
    mmu_update_t req;
    req.ptr = ma;
    req.val = val;
    return HYPERVISOR_mmu_update(&req, 1, 0, DOMID_SELF);
}

static int ext(unsigned int cmd, unsigned long mfn)
{
    struct mmuext_op op;
    op.cmd = cmd;
    op.arg1.mfn = mfn;
    op.arg2.nr_ents = 0;
    return HYPERVISOR_mmuext_op(&op, 1, 0, DOMID_SELF);
}

static unsigned long mfn_of(const void *va) { return ((unsigned long)va - BASE) >> 12; }
static void *va_of(uint64_t e) { return (void *)(BASE + (unsigned long)(e & ADDR)); }
static volatile uint64_t *pte_of(const uint64_t *l2, const void *va) /* in the kernel's GiB */
{ return (volatile uint64_t *)va_of(l2[((unsigned long)va >> 21) & 511]) + (((unsigned long)va >> 12) & 511); }

static int remap(const void *va, uint64_t flags) /* the linear-map entry of va, read-only or writable */
{ return HYPERVISOR_update_va_mapping((unsigned long)va, ((uint64_t)mfn_of(va) << 12) | flags,
                                      UVMF_INVLPG | UVMF_LOCAL); }

static int same(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

void start_kernel(start_info_t *si)
{
    const uint64_t *l3 = (const uint64_t *)si->pt_base;
    const uint64_t *l2 = va_of(l3[BASE >> 30]);  /* the L2 that maps the kernel: under slot 3 */
    const uint64_t *l1 = va_of(l2[(si->pt_base >> 21) & 511]);  /* the L1 that maps the L3 */
    uint64_t l1_ma = (uint64_t)mfn_of(l1) << 12, l2_ma = (uint64_t)mfn_of(l2) << 12;
    unsigned char *new_l1 = spare, *new_l2 = spare + 4096, *new_l3 = spare + 2 * 4096, *data = spare + 3 * 4096;
    unsigned char *other = spare + 4 * 4096, *bad_l3 = spare + 5 * 4096;
    const unsigned long *m2p = (const unsigned long *)MACH2PHYS_VIRT_START_PAE;
    const unsigned long *p2m = (const unsigned long *)si->mfn_list;
    unsigned long i, mismatches = 0, params = 0, zero_slots = 0;
    char caps[1024];
    struct sched_shutdown sd;

    check("magic is xen-3.0-x86_32p", same(si->magic, "xen-3.0-x86_32p"), 1);
    check("xen_version capabilities", HYPERVISOR_xen_version(XENVER_capabilities, caps), 0);
    check("capabilities name x86_32p", same(caps, "xen-3.0-x86_32p "), 1);
    check("platform_parameters", HYPERVISOR_xen_version(XENVER_platform_parameters, &params), 0);
    check("virt_start is the PAE hole", params == HYPERVISOR_VIRT_START_PAE, 1);

    /* 3-level tables, seen without CR4: pt_base is an L3 of 4 entries naming L2s of 64-bit entries */
    for (i = 4; i < 512; i++)
        zero_slots += l3[i] == 0;
    check("l3 has 4 slots", zero_slots, 508);
    check("l3 slot 3 present, only P", (long)(l3[3] & 0xFFF), 1);
    check("l2 maps the kernel's first 2 MiB", (l2[0] & 1) && (((const uint64_t *)va_of(l2[0]))[0] >> 12) == 0, 1);
    check("the l3 is mapped read-only by a 64-bit pte",
          (long)(l1[(si->pt_base >> 12) & 511] & (ADDR | 2)), (long)((uint64_t)mfn_of(l3) << 12));
    check("nr_pt_frames: l3, one l2, three l1s", (long)si->nr_pt_frames, 5);

    /* the m2p, read-only at MACH2PHYS_VIRT_START_PAE, is the inverse of the p2m (both the identity) */
    for (i = 0; i < si->nr_pages; i++)
        mismatches += m2p[p2m[i]] != i || p2m[i] != i;
    check("m2p at 0xF5800000 inverts mfn_list", (long)mismatches, 0);

    /* update_va_mapping with a 64-bit pte: the page at `data` shows `other`'s frame, read-only */
    other[0] = 0x6b;
    data[0] = 0x5a;
    check("update_va_mapping 64-bit pte", HYPERVISOR_update_va_mapping((unsigned long)data,
          ((uint64_t)mfn_of(other) << 12) | RO, UVMF_INVLPG | UVMF_LOCAL), 0);
    check("read through it", *(volatile unsigned char *)data, 0x6b);
    check("high flag bits refused", HYPERVISOR_update_va_mapping((unsigned long)data,
          ((uint64_t)mfn_of(other) << 12) | RO | (1ULL << 63), UVMF_INVLPG | UVMF_LOCAL), -XEN_EINVAL);
    /* mmu_update of the 64-bit L1 entry puts it back */
    check("mmu_update 64-bit l1 entry", set_entry(l1_ma + (((unsigned long)data >> 12) & 511) * 8,
          ((uint64_t)mfn_of(data) << 12) | RW), 0);
    check("invlpg", ext(MMUEXT_INVLPG_LOCAL, (unsigned long)data), 0);
    check("read the data page again", *(volatile unsigned char *)data, 0x5a);

    /* pin an L1, an L2 naming it, an L3 naming that L2 (slot 0) and the boot L2 (slot 3), and run on it */
    ((volatile uint64_t *)new_l1)[1] = ((uint64_t)mfn_of(data) << 12) | RO;  /* va 0x1000 shows data */
    ((volatile uint64_t *)new_l2)[0] = ((uint64_t)mfn_of(new_l1) << 12) | PDE;
    ((volatile uint64_t *)new_l3)[0] = ((uint64_t)mfn_of(new_l2) << 12) | L3E;
    ((volatile uint64_t *)new_l3)[3] = l3[3];
    ((volatile uint64_t *)bad_l3)[0] = ((uint64_t)mfn_of(new_l2) << 12) | L3E;  /* no slot 3 */
    check("new l1 read-only", remap(new_l1, RO), 0);
    check("pin l1", ext(MMUEXT_PIN_L1_TABLE, mfn_of(new_l1)), 0);
    check("pin l2 naming a writable frame", ext(MMUEXT_PIN_L2_TABLE, mfn_of(new_l2)), -XEN_EINVAL);
    check("new l2 read-only", remap(new_l2, RO), 0);
    check("pin l2", ext(MMUEXT_PIN_L2_TABLE, mfn_of(new_l2)), 0);
    check("new l3 read-only", remap(new_l3, RO), 0);
    check("pin l3", ext(MMUEXT_PIN_L3_TABLE, mfn_of(new_l3)), 0);
    check("bad l3 read-only", remap(bad_l3, RO), 0);
    check("pin l3 without slot 3", ext(MMUEXT_PIN_L3_TABLE, mfn_of(bad_l3)), -XEN_EINVAL);
    check("new baseptr", ext(MMUEXT_NEW_BASEPTR, mfn_of(new_l3)), 0);
    check("read va 0x1000 through the new l3", *(volatile unsigned char *)0x1000, 0x5a);
    check("back to the boot l3", ext(MMUEXT_NEW_BASEPTR, mfn_of(l3)), 0);
    check("unpin l3", ext(MMUEXT_UNPIN_TABLE, mfn_of(new_l3)), 0);

    /* writable page tables: the two 4-byte halves of the PTE that maps `data`, written directly */
    {
        volatile uint64_t *pte = pte_of(l2, data);
        volatile uint32_t *half = (volatile uint32_t *)pte;
        half[0] = (mfn_of(other) << 12) | RO;
        check("direct write of a pte's low half", (long)(*pte == (((uint64_t)mfn_of(other) << 12) | RO)), 1);
        check("invlpg after it", ext(MMUEXT_INVLPG_LOCAL, (unsigned long)data), 0);
        check("read through the written pte", *(volatile unsigned char *)data, 0x6b);
        half[1] = 0x80000000u;  /* NX first: an invalid present entry, so Xen clears its present bit */
        check("upper half first is fixed up",
              (long)(*pte == ((0x80000000ULL << 32) | ((((uint64_t)mfn_of(other) << 12) | RO) & ~1ULL))), 1);
        half[1] = 0;
        half[0] = (mfn_of(data) << 12) | RW;
        check("then the low half", (long)(*pte == (((uint64_t)mfn_of(data) << 12) | RW)), 1);
        check("invlpg again", ext(MMUEXT_INVLPG_LOCAL, (unsigned long)data), 0);
        check("the data page is back", *(volatile unsigned char *)data, 0x5a);
    }
    check("l3 slot 3 is the hole's", set_entry(((uint64_t)mfn_of(l3) << 12) + 3 * 8, 0), -XEN_EPERM);

    /* the hole: slots of the L2 under slot 3 from HYPERVISOR_VIRT_START_PAE on are Xen's */
    check("l2 hole slot", set_entry(l2_ma + ((HYPERVISOR_VIRT_START_PAE >> 21) & 511) * 8,
          ((uint64_t)mfn_of(new_l1) << 12) | PDE), -XEN_EPERM);
    check("l2 last slot", set_entry(l2_ma + 511 * 8, 0), -XEN_EPERM);

""" + c_finish("mini-pae")


def _denied(run_dir: Path, domid: int) -> list[tuple[str, str]]:
    return [(e["reason"], e["errno"]) for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
            if e["event"] == "mmu.denied" and e.get("dom") == domid]


def test_c_pae_guest_boots_and_checks_3_level_tables(run_dir: Path) -> None:
    work = run_dir / "paeguest"
    work.mkdir()
    elf = build_guest(work, GUEST_C, headers=(XEN_HEADER,), extra_cflags=("-fno-builtin",))
    dom, console = run_one(run_dir, "pae", elf)
    assert_all_passed(GUEST_C, "mini-pae", dom, console)
    events = read_events(run_dir / "run" / "trace" / "hypervisor.jsonl")
    assert [e["event"] for e in events if e.get("dom") == dom["domid"] and e["event"].startswith("mmu.ptwr")] == [
        "mmu.ptwr", "mmu.ptwr", "mmu.ptwr_pae_fixup", "mmu.ptwr", "mmu.ptwr"]
    denied: list[Any] = _denied(run_dir / "run", dom["domid"])
    assert denied == [
        ("pte-high-flags", "EINVAL"), ("writable-frame-not-l2", "EINVAL"), ("l3-slot-3-not-present", "EINVAL"),
        ("l3-slot-3-holds-hypervisor-hole", "EPERM"), ("l2-slot-in-hypervisor-hole", "EPERM"),
        ("l2-slot-in-hypervisor-hole", "EPERM"),
    ]
