"""A C guest built against Xen's public headers checks, in its own code, what xen_version, memory_op and
grant_table_op answer it, maps a grant frame setup_table returned and writes a grant entry through it; it reports
each check on the console and shuts down with poweroff when all passed (crash otherwise). Skips where the headers
or a gcc that builds 32-bit freestanding code are missing, as tests/test_foreign_guest.py does."""

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

from pvcluster.abi.platform import GRANT_FRAME_BASE, M2P_FRAME_BASE, MAX_GRANT_FRAMES
from pvcluster.abi.xen import FEATURES_SUBMAP0, XEN_CAPABILITIES, XEN_EXTRAVERSION, GnttabOp, Hypercall
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

XEN_HEADER = Path("/usr/include/xen/grant_table.h")
NR_PAGES = 1024  # memory_mib = 4

GUEST_C = r"""
/* A PV guest that checks the grant-table, memory and version hypercalls, built against Xen's public headers. */
#define __XEN_INTERFACE_VERSION__ 0x0003020a /* GNTTABOP_set_version exists from here on */
/* The headers place the m2p where a PAE hypervisor has it; this is a non-PAE guest (xen-x86_32.h lets it say so). */
#define machine_to_phys_mapping ((unsigned long *)MACH2PHYS_VIRT_START_NONPAE)
#include <stdint.h>
#include <xen/xen.h>
#include <xen/sched.h>
#include <xen/elfnote.h>
#include <xen/version.h>
#include <xen/features.h>
#include <xen/memory.h>
#include <xen/grant_table.h>
#include <xen/errno.h>

""" + C_ELFNOTE + c_xen_notes("mini-gnt") + c_entry(4096, r"""
    ".globl window_a, window_b\n"
    "window_a:\n"
    "    .skip 4096\n"
    "window_b:\n"
    "    .skip 4096\n"
""") + r"""
/* Two page-aligned .bss pages are remapped onto a grant frame. */
extern char hypercall_page[4096];
extern unsigned char window_a[4096], window_b[4096];
""" + C_HYPERCALLS + C_CONSOLE_SCHED + r"""
static int HYPERVISOR_xen_version(int cmd, void *arg)
{ return _hypercall2(int, xen_version, cmd, arg); }
static long HYPERVISOR_memory_op(unsigned int cmd, void *arg)
{ return _hypercall2(long, memory_op, cmd, arg); }
static int HYPERVISOR_grant_table_op(unsigned int cmd, void *uop, unsigned int count)
{ return _hypercall3(int, grant_table_op, cmd, uop, count); }
static int HYPERVISOR_update_va_mapping(unsigned long va, unsigned long pte, unsigned long flags)
{ return _hypercall4(int, update_va_mapping, va, pte, 0, flags); }

""" + C_REPORT + r"""
static int same(const char *a, const char *b, unsigned int n) /* the first n bytes are equal */
{
    while (n--)
        if (*a++ != *b++)
            return 0;
    return 1;
}

static void fill(void *p, int byte, unsigned int n)
{
    unsigned char *q = p;
    while (n--)
        *q++ = (unsigned char)byte;
}

static int all(const unsigned char *p, int byte, unsigned int n)
{
    while (n--)
        if (*p++ != byte)
            return 0;
    return 1;
}

static const char want_extraversion[XEN_EXTRAVERSION_LEN] = "@EXTRAVERSION@";
static const char want_capabilities[] = "@CAPABILITIES@";

void start_kernel(start_info_t *si)
{
    static xen_capabilities_info_t caps;
    xen_extraversion_t extra;
    xen_feature_info_t fi;
    domid_t domid;
    struct xen_machphys_mfn_list xmml;
    xen_pfn_t m2p[2];
    const unsigned long *p2m, *l2;
    unsigned long pfn, bad;
    gnttab_query_size_t qs;
    gnttab_set_version_t sv;
    gnttab_setup_table_t st;
    unsigned long frames[2];
    grant_entry_v1_t *ga = (grant_entry_v1_t *)window_a, *gb = (grant_entry_v1_t *)window_b;
    struct sched_shutdown sd;
    const unsigned long pte_flags = 0x63; /* present, writable, accessed, dirty */

    /* xen_version */
    check("version", HYPERVISOR_xen_version(XENVER_version, 0), (4 << 16) | 17);
    fill(extra, 0xff, sizeof(extra));
    check("extraversion rc", HYPERVISOR_xen_version(XENVER_extraversion, extra), 0);
    check("extraversion", same(extra, want_extraversion, sizeof(extra)), 1);
    fill(caps, 0xff, sizeof(caps));
    check("capabilities rc", HYPERVISOR_xen_version(XENVER_capabilities, caps), 0);
    check("capabilities", same(caps, want_capabilities, sizeof(want_capabilities)), 1);
    check("capabilities padded", all((unsigned char *)caps + sizeof(want_capabilities), 0,
                                     sizeof(caps) - sizeof(want_capabilities)), 1);
    fi.submap_idx = 0;
    fi.submap = 0xdeadbeef;
    check("get_features rc", HYPERVISOR_xen_version(XENVER_get_features, &fi), 0);
    check("get_features submap", (long)fi.submap, @SUBMAP@);
    check("direct_mapped", (fi.submap >> XENFEAT_direct_mapped) & 1, 1);
    check("no preserve_ad", (fi.submap >> XENFEAT_mmu_pt_update_preserve_ad) & 1, 0);
    fi.submap_idx = XENFEAT_NR_SUBMAPS;
    check("get_features submap 1", HYPERVISOR_xen_version(XENVER_get_features, &fi), -XEN_EINVAL);

    /* memory_op */
    domid = DOMID_SELF;
    check("current_reservation", HYPERVISOR_memory_op(XENMEM_current_reservation, &domid), (long)si->nr_pages);
    check("maximum_reservation", HYPERVISOR_memory_op(XENMEM_maximum_reservation, &domid), (long)si->nr_pages);
    domid = 0; /* no dom0 here */
    check("reservation of dom0", HYPERVISOR_memory_op(XENMEM_current_reservation, &domid), -XEN_ESRCH);
    xmml.max_extents = 2;
    set_xen_guest_handle(xmml.extent_start, m2p);
    xmml.nr_extents = 99;
    check("machphys_mfn_list rc", HYPERVISOR_memory_op(XENMEM_machphys_mfn_list, &xmml), 0);
    check("machphys_mfn_list nr_extents", xmml.nr_extents, 1);
    check("machphys_mfn_list extent 0", (long)m2p[0], @M2P_MFN@);

    /* The p2m the builder left at start_info.mfn_list and the m2p at MACH2PHYS_VIRT_START: both the identity */
    p2m = (const unsigned long *)si->mfn_list;
    check("mfn_list set", si->mfn_list != 0, 1);
    bad = 0;
    for (pfn = 0; pfn < si->nr_pages; pfn++)
        bad += p2m[pfn] != pfn;
    check("p2m is the identity", bad, 0);
    bad = 0;
    for (pfn = 0; pfn < si->nr_pages; pfn++)
        bad += machine_to_phys_mapping[p2m[pfn]] != pfn;
    check("m2p inverts the p2m", bad, 0);
    check("m2p of the page directory frame", (long)machine_to_phys_mapping[p2m[(si->pt_base - 0xC0000000) >> 12]],
          (long)((si->pt_base - 0xC0000000) >> 12));
    /* Its PDE, in the guest's own directory: present, naming the hypervisor's L1 (a frame the guest does not own,
       so it cannot read it; tests/test_ring1_guest.py checks that a write to the m2p faults) */
    l2 = (const unsigned long *)si->pt_base;
    check("m2p pde present", l2[MACH2PHYS_VIRT_START_NONPAE >> 22] & 1, 1);
    check("m2p pde names a hypervisor frame", (l2[MACH2PHYS_VIRT_START_NONPAE >> 22] >> 12) >= si->nr_pages, 1);
    /* The m2p's frames are Xen's: the guest may map them neither writable nor read-only */
    check("map m2p frame rw", HYPERVISOR_update_va_mapping((unsigned long)window_b, (m2p[0] << 12) | pte_flags,
                                                           UVMF_INVLPG | UVMF_LOCAL), -XEN_EPERM);
    check("map m2p frame ro", HYPERVISOR_update_va_mapping((unsigned long)window_b, (m2p[0] << 12) | 0x61,
                                                           UVMF_INVLPG | UVMF_LOCAL), -XEN_EPERM);

    /* grant_table_op: sizes and versions */
    qs.dom = DOMID_SELF;
    check("query_size rc", HYPERVISOR_grant_table_op(GNTTABOP_query_size, &qs, 1), 0);
    check("query_size status", qs.status, GNTST_okay);
    check("query_size nr_frames", qs.nr_frames, 1);
    check("query_size max_nr_frames", qs.max_nr_frames, @MAX_FRAMES@);
    qs.dom = 0;
    HYPERVISOR_grant_table_op(GNTTABOP_query_size, &qs, 1);
    check("query_size of dom0", qs.status, GNTST_bad_domain);
    sv.version = 1;
    check("set_version 1", HYPERVISOR_grant_table_op(GNTTABOP_set_version, &sv, 1), 0);
    sv.version = 2;
    check("set_version 2", HYPERVISOR_grant_table_op(GNTTABOP_set_version, &sv, 1), -XEN_ENOSYS);
    check("version stays 1", sv.version, 1);

    /* setup_table: two frames, both outside the guest's own RAM */
    st.dom = DOMID_SELF;
    st.nr_frames = 2;
    set_xen_guest_handle(st.frame_list, frames);
    frames[0] = frames[1] = 0;
    check("setup_table rc", HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &st, 1), 0);
    check("setup_table status", st.status, GNTST_okay);
    check("frame 0 not RAM", frames[0] >= si->nr_pages, 1);
    check("frame 1 not RAM", frames[1] >= si->nr_pages && frames[1] != frames[0], 1);
    qs.dom = DOMID_SELF;
    HYPERVISOR_grant_table_op(GNTTABOP_query_size, &qs, 1);
    check("query_size after setup", qs.nr_frames, 2);
    st.nr_frames = @MAX_FRAMES@ + 1;
    HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &st, 1);
    check("setup_table past max", st.status, GNTST_general_error);

    /* Map grant frame 1 at two virtual pages, write an entry through one, read it through the other. */
    fill(window_a, 0xaa, 4096);
    fill(window_b, 0xbb, 4096);
    check("map a", HYPERVISOR_update_va_mapping((unsigned long)window_a, (frames[1] << 12) | pte_flags,
                                                UVMF_INVLPG | UVMF_LOCAL), 0);
    check("map b", HYPERVISOR_update_va_mapping((unsigned long)window_b, (frames[1] << 12) | pte_flags,
                                                UVMF_INVLPG | UVMF_LOCAL), 0);
    check("fresh grant frame is zero", all(window_a, 0, 4096), 1);
    ga[GNTTAB_NR_RESERVED_ENTRIES].domid = 7;
    ga[GNTTAB_NR_RESERVED_ENTRIES].frame = 0x123;
    ga[GNTTAB_NR_RESERVED_ENTRIES].flags = GTF_permit_access | GTF_readonly;
    check("entry flags", gb[GNTTAB_NR_RESERVED_ENTRIES].flags, GTF_permit_access | GTF_readonly);
    check("entry domid", gb[GNTTAB_NR_RESERVED_ENTRIES].domid, 7);
    check("entry frame", (long)gb[GNTTAB_NR_RESERVED_ENTRIES].frame, 0x123);
    /* Only frames the table has are mappable: here the next one, which setup_table has not grown to. */
    check("map beyond the table", HYPERVISOR_update_va_mapping((unsigned long)window_b,
                                                               ((frames[1] + 1) << 12) | pte_flags,
                                                               UVMF_INVLPG | UVMF_LOCAL), -XEN_EPERM);

""" + c_finish("mini-gnt")


def _guest_source() -> str:
    subst = {
        "@EXTRAVERSION@": XEN_EXTRAVERSION.decode(),
        "@CAPABILITIES@": XEN_CAPABILITIES.decode(),
        "@SUBMAP@": str(FEATURES_SUBMAP0),
        "@MAX_FRAMES@": str(MAX_GRANT_FRAMES),
        "@M2P_MFN@": str(NR_PAGES + M2P_FRAME_BASE),
    }
    text = GUEST_C
    for key, value in subst.items():
        text = text.replace(key, value)
    return text


def _hv_events(run_dir: Path, domid: int, event: str) -> list[dict[str, Any]]:
    return [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
            if e["event"] == event and e.get("dom") == domid]


def test_c_guest_checks_grant_tables_memory_op_and_version(run_dir: Path) -> None:
    work = run_dir / "gntguest"
    work.mkdir()
    elf = build_guest(work, _guest_source(), headers=(XEN_HEADER,), extra_cflags=("-fno-builtin",))
    dom, console = run_one(run_dir, "gnt", elf)
    assert_all_passed(GUEST_C, "mini-gnt", dom, console)

    # The frames the guest mapped are the grant table's, after its 4 MiB of RAM, shared_info and the GDT.
    grant0 = NR_PAGES + GRANT_FRAME_BASE
    setups = _hv_events(run_dir / "run", dom["domid"], "gnttab.setup_table")
    assert [(e["nr_frames"], e["status"], e["frames"]) for e in setups] == [
        (2, "okay", [grant0, grant0 + 1]), (MAX_GRANT_FRAMES + 1, "general_error", [])]
    calls = _hv_events(run_dir / "run", dom["domid"], "hypercall")
    gnt = [(e["args"][0], e["result"]) for e in calls if e["nr"] == Hypercall.grant_table_op]
    assert gnt == [(GnttabOp.query_size, 0), (GnttabOp.query_size, 0), (GnttabOp.set_version, 0),
                   (GnttabOp.set_version, -38), (GnttabOp.setup_table, 0), (GnttabOp.query_size, 0),
                   (GnttabOp.setup_table, 0)]
    maps = [(e["args"][1] >> 12, e["result"]) for e in calls if e["nr"] == Hypercall.update_va_mapping]
    m2p = NR_PAGES + M2P_FRAME_BASE
    assert maps == [(m2p, -1), (m2p, -1), (grant0 + 1, 0), (grant0 + 1, 0), (grant0 + 2, -1)]
