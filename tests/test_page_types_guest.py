"""A C guest built against Xen's public headers checks page types from its own code, as a Linux PV kernel meets
them on Xen (xen/arch/x86/mm.c): its page-table frames cannot be mapped writable (mmu_update and
update_va_mapping: -EBUSY); a frame it maps writable cannot become an L1 through an L2 entry (-EINVAL) until it
unmaps it, after which it is an L1 (the guest maps a data page through it and reads it) and read-only; pinning
an L2 that names a writable-mapped frame is -EINVAL until that frame is unmapped too; an L2 slot in the
hypervisor hole is never the guest's (-EPERM); MMU_MACHPHYS_UPDATE sets the m2p entry of its own frame. It
reports each check on the console and powers off when all passed (crash otherwise). Skips where the headers or
a gcc that builds 32-bit freestanding code are missing."""

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

from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

XEN_HEADER = Path("/usr/include/xen/arch-x86/xen-x86_32.h")

GUEST_C = r"""
/* A PV guest that checks page types, built against Xen's public headers. */
""" + C_HEAD + r"""

""" + C_ELFNOTE + c_xen_notes("mini-types") + c_entry(4096, r"""
    ".globl spare\n"
    "spare:\n"
    "    .skip 4 * 4096\n"
""") + r"""
/* Four page-aligned .bss pages: a future L1, a future L2, an L1 that L2 names, and a data page. */
extern char hypercall_page[4096];
extern unsigned char spare[4 * 4096];
""" + C_HYPERCALLS + C_CONSOLE_SCHED + r"""
static int HYPERVISOR_update_va_mapping(unsigned long va, unsigned long pte, unsigned long flags)
{ return _hypercall4(int, update_va_mapping, va, pte, 0, flags); }
static int HYPERVISOR_mmu_update(mmu_update_t *req, int count, int *done, domid_t dom)
{ return _hypercall4(int, mmu_update, req, count, done, dom); }
static int HYPERVISOR_mmuext_op(struct mmuext_op *op, int count, int *done, domid_t dom)
{ return _hypercall4(int, mmuext_op, op, count, done, dom); }

""" + C_REPORT + r"""
#define BASE 0xC0000000UL
#define RO 0x21UL  /* present, accessed */
#define RW 0x63UL  /* present, writable, accessed, dirty */
#define PDE 0x27UL /* present, writable, user, accessed */
#define FAR 0x40000000UL /* L2 slot 256: not mapped at boot */

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

static int remap(const void *va, unsigned long flags) /* the linear-map entry of va, read-only or writable */
{ return HYPERVISOR_update_va_mapping((unsigned long)va, (mfn_of(va) << 12) | flags, UVMF_INVLPG | UVMF_LOCAL); }

void start_kernel(start_info_t *si)
{
    const unsigned long *l2 = (const unsigned long *)si->pt_base;
    unsigned long l2_mfn = mfn_of(l2);
    uint64_t l2_ma = (uint64_t)l2_mfn << 12;
    unsigned long l1_mfn = l2[si->pt_base >> 22] >> 12; /* the L1 that maps the page directory */
    uint64_t l1_entry = ((uint64_t)l1_mfn << 12) + ((si->pt_base >> 12) & 1023) * 4;
    unsigned char *new_l1 = spare, *new_l2 = spare + 4096, *named_l1 = spare + 2 * 4096, *data = spare + 3 * 4096;
    struct sched_shutdown sd;

    /* its own page tables are never writable: could_not_pin is -EBUSY */
    check("mmu_update maps the l2 writable", set_entry(l1_entry, ((uint64_t)l2_mfn << 12) | RW), -XEN_EBUSY);
    check("update_va_mapping maps the l2 writable", remap(l2, RW), -XEN_EBUSY);
    check("update_va_mapping maps the l1 writable",
          HYPERVISOR_update_va_mapping(BASE + (l1_mfn << 12), (l1_mfn << 12) | RW, UVMF_INVLPG | UVMF_LOCAL),
          -XEN_EBUSY);
    check("l2 read-only mapping stays", remap(l2, RO), 0);

    /* an L2 entry naming a frame mapped writable: get_page_type(PGT_l1_page_table) fails, -EINVAL */
    data[0] = 0x5a;
    ((volatile unsigned long *)new_l1)[0] = (mfn_of(data) << 12) | RW;  /* FAR maps the data page */
    check("l2 entry names a writable frame", set_entry(l2_ma + (FAR >> 22) * 4, (mfn_of(new_l1) << 12) | PDE),
          -XEN_EINVAL);
    check("unmap it", remap(new_l1, RO), 0);
    check("l2 entry names it now", set_entry(l2_ma + (FAR >> 22) * 4, (mfn_of(new_l1) << 12) | PDE), 0);
    check("read through the new l1", *(volatile unsigned char *)FAR, 0x5a);
    check("the new l1 is read-only", remap(new_l1, RW), -XEN_EBUSY);
    check("its entries go through mmu_update",
          set_entry(((uint64_t)mfn_of(new_l1) << 12) + 1 * 4, (mfn_of(data) << 12) | RO), 0);
    check("read through the second entry", *(volatile unsigned char *)(FAR + 4096), 0x5a);

    /* pinning an L2 whose guest slot names a writable-mapped frame fails; once unmapped it validates */
    ((volatile unsigned long *)new_l2)[0] = (mfn_of(named_l1) << 12) | PDE;
    check("new l2 read-only", remap(new_l2, RO), 0);
    check("pin l2 naming a writable frame", ext(MMUEXT_PIN_L2_TABLE, mfn_of(new_l2)), -XEN_EINVAL);
    check("unmap the named frame", remap(named_l1, RO), 0);
    check("pin l2", ext(MMUEXT_PIN_L2_TABLE, mfn_of(new_l2)), 0);
    check("the named l1 is read-only", remap(named_l1, RW), -XEN_EBUSY);
    check("pin it again", ext(MMUEXT_PIN_L2_TABLE, mfn_of(new_l2)), -XEN_EINVAL);
    check("unpin l2", ext(MMUEXT_UNPIN_TABLE, mfn_of(new_l2)), 0);
    check("the named l1 is data again", remap(named_l1, RW), 0);

    /* the hypervisor hole: slots from HYPERVISOR_VIRT_START_NONPAE >> 22 are Xen's (non-PAE) */
    check("l2 hole slot", set_entry(l2_ma + (HYPERVISOR_VIRT_START_NONPAE >> 22) * 4, (mfn_of(new_l1) << 12) | PDE),
          -XEN_EPERM);
    check("l2 last slot", set_entry(l2_ma + 1023 * 4, 0), -XEN_EPERM);

    /* MMU_MACHPHYS_UPDATE: the m2p entry of an owned frame, read back where Xen maps the m2p (non-PAE) */
    check("machphys update", set_entry(((uint64_t)mfn_of(data) << 12) | MMU_MACHPHYS_UPDATE, 0x777), 0);
    check("m2p entry changed", (long)((volatile unsigned long *)MACH2PHYS_VIRT_START_NONPAE)[mfn_of(data)], 0x777);
    check("machphys update back", set_entry(((uint64_t)mfn_of(data) << 12) | MMU_MACHPHYS_UPDATE, mfn_of(data)), 0);
    check("machphys foreign frame",
          set_entry(((uint64_t)(si->nr_pages + 100) << 12) | MMU_MACHPHYS_UPDATE, 0), -XEN_EINVAL);

""" + c_finish("mini-types")


def _denied(run_dir: Path, domid: int) -> list[tuple[str, str]]:
    return [(e["reason"], e["errno"]) for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
            if e["event"] == "mmu.denied" and e.get("dom") == domid]


def test_c_guest_checks_page_types(run_dir: Path) -> None:
    work = run_dir / "typesguest"
    work.mkdir()
    elf = build_guest(work, GUEST_C, headers=(XEN_HEADER,), extra_cflags=("-fno-builtin",))
    dom, console = run_one(run_dir, "types", elf)
    assert_all_passed(GUEST_C, "mini-types", dom, console)
    denied: list[Any] = _denied(run_dir / "run", dom["domid"])
    assert denied == [
        ("writable-pagetable", "EBUSY"), ("writable-pagetable", "EBUSY"), ("writable-pagetable", "EBUSY"),
        ("writable-frame-not-l1", "EINVAL"), ("writable-pagetable", "EBUSY"),
        ("writable-frame-not-l1", "EINVAL"), ("writable-pagetable", "EBUSY"), ("already-pinned", "EINVAL"),
        ("l2-slot-in-hypervisor-hole", "EPERM"), ("l2-slot-in-hypervisor-hole", "EPERM"),
        ("machphys-frame-not-owned", "EINVAL"),
    ]
