"""Unit tests of grant_table_op (20), memory_op (12) and xen_version's extraversion / capabilities / get_features.

Each test runs a family's ``handle`` on a real Domain of an in-process hypervisor core (the default spec: alpha and
beta, 4 MiB = 1024 frames each) over guest memory copied in exactly as a domain process copies it: the spans the
copy-in descriptor (pvcluster/abi/copyin.py) names, read from a small fake guest memory; the call's writes are then
applied to that memory, so each test reads back what the guest would see.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers import assert_matches_xen_headers, call_events, core, make_call, pin_table, run_handler

from hypervisor import mm
from hypervisor.domain import Domain
from hypervisor.hypercalls import grant_table_op, memory_op, mmu_update, mmuext_op, update_va_mapping, xen_version
from hypervisor.hypercalls.base import Call
from pvcluster.abi import layouts
from pvcluster.abi.copyin import Span, copy_in
from pvcluster.abi.errno import Errno
from pvcluster.abi.platform import GRANT_FRAME_BASE, M2P_FRAME_BASE, MAX_GRANT_FRAMES, m2p_frames
from pvcluster.abi.xen import (
    DOMID_SELF,
    FEATURES_SUBMAP0,
    MACH2PHYS_VIRT_END_NONPAE,
    MACH2PHYS_VIRT_START_NONPAE,
    XEN_CAPABILITIES,
    XEN_EXTRAVERSION,
    Gntst,
    GnttabOp,
    Hypercall,
    MemoryOp,
    MmuCmd,
    MmuextCmd,
    XenFeat,
    XenVer,
)
from pvcluster.bus.effects import SetVaPte
from pvcluster.bus.messages import Region

BASE, SIZE = 0x10000, 0x4000  # the fake guest memory: [BASE, BASE + SIZE) is mapped, the rest is not
ARG, LIST = BASE, BASE + 0x1000  # an argument struct, and the array it points at
UNMAPPED = 0x900000
NO_SUCH_DOMAIN = 77
GRANT0 = 1024 + GRANT_FRAME_BASE  # alpha's first grant frame
P, RW = 0x1, 0x2


class Guest:
    """Guest memory as the domain process holds it, for one domain's hypercalls."""

    def __init__(self, hv: object, dom: Domain) -> None:
        self.hv, self.dom = hv, dom
        self.mem = bytearray(SIZE)

    def read(self, addr: int, length: int) -> bytes | None:
        if BASE <= addr and addr + length <= BASE + SIZE:
            return bytes(self.mem[addr - BASE : addr - BASE + length])
        return None

    def put(self, addr: int, data: bytes) -> None:
        self.mem[addr - BASE : addr - BASE + len(data)] = data

    def u32s(self, addr: int, n: int) -> tuple[int, ...]:
        data = self.read(addr, 4 * n)
        assert data is not None
        return struct.unpack(f"<{n}I", data)

    def call(self, family: object, nr: int, args: list[int]) -> tuple[int, Call]:
        """Trap: copy in what the descriptor names, run the handler, copy its writes back."""
        spans = copy_in(nr, args, self.read)
        regions = [Region(s.addr, s.length, self.read(s.addr, s.length), s.writable) for s in spans]
        c = make_call(self.hv, self.dom, nr, args, regions)
        rc = run_handler(family, c)
        for w in c.mem.writes:
            self.put(w.addr, w.data)
        return rc, c


@pytest.fixture
def guests() -> tuple[Guest, Guest]:
    hv = core()
    alpha, beta = (hv.create_domain(spec) for spec in hv.spec.domains[:2])
    assert (alpha.domid, alpha.nr_pages, beta.domid) == (1, 1024, 2)
    return Guest(hv, alpha), Guest(hv, beta)


@pytest.fixture
def g(guests: tuple[Guest, Guest]) -> Guest:
    return guests[0]


def _denied(c: Call, event: str) -> list[str]:
    return [kw["reason"] for ev, kw in call_events(c) if ev == event]


# -- xen_version ----------------------------------------------------------------------------------------------


def test_extraversion_and_capabilities_are_nul_padded_strings(g: Guest) -> None:
    g.put(ARG, b"\xff" * 1024)
    assert g.call(xen_version, Hypercall.xen_version, [XenVer.extraversion, ARG])[0] == 0
    assert g.read(ARG, 16) == XEN_EXTRAVERSION.ljust(16, b"\0") == b".0-pvcluster\0\0\0\0"
    assert g.call(xen_version, Hypercall.xen_version, [XenVer.capabilities, ARG])[0] == 0
    # arch_get_xen_caps for a non-PAE x86-32 build: each entry followed by a space
    assert g.read(ARG, 1024) == XEN_CAPABILITIES.ljust(1024, b"\0") and XEN_CAPABILITIES == b"xen-3.0-x86_32 "
    assert g.call(xen_version, Hypercall.xen_version, [XenVer.capabilities, UNMAPPED])[0] == -Errno.EFAULT


def test_get_features_submap0_advertises_only_direct_mapped(g: Guest) -> None:
    g.put(ARG, struct.pack("<II", 0, 0xFFFFFFFF))
    assert g.call(xen_version, Hypercall.xen_version, [XenVer.get_features, ARG])[0] == 0
    assert g.u32s(ARG, 2) == (0, FEATURES_SUBMAP0) == (0, 1 << XenFeat.direct_mapped)
    g.put(ARG, struct.pack("<II", 1, 0))
    assert g.call(xen_version, Hypercall.xen_version, [XenVer.get_features, ARG])[0] == -Errno.EINVAL
    assert g.u32s(ARG, 2) == (1, 0)  # nothing written back
    assert g.call(xen_version, Hypercall.xen_version, [XenVer.get_features, UNMAPPED])[0] == -Errno.EFAULT


# -- memory_op: reservations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [MemoryOp.current_reservation, MemoryOp.maximum_reservation])
def test_reservation_of_self_is_the_domains_page_count(g: Guest, op: MemoryOp) -> None:
    for domid in (DOMID_SELF, g.dom.domid):
        g.put(ARG, struct.pack("<H", domid))
        rc, c = g.call(memory_op, Hypercall.memory_op, [op, ARG])
        assert rc == 1024
        assert [(ev, kw["pages"]) for ev, kw in call_events(c)] == [("memop.reservation", 1024)]


@pytest.mark.parametrize("op", [MemoryOp.current_reservation, MemoryOp.maximum_reservation])
def test_reservation_of_another_domain_is_eperm_and_of_none_esrch(g: Guest, op: MemoryOp) -> None:
    for domid, err in ((2, Errno.EPERM), (NO_SUCH_DOMAIN, Errno.ESRCH), (0, Errno.ESRCH)):
        g.put(ARG, struct.pack("<H", domid))
        rc, c = g.call(memory_op, Hypercall.memory_op, [op, ARG])
        assert rc == -err and _denied(c, "memop.denied") == ["foreign-domid"]


def test_reservation_bad_pointer_and_start_extent(g: Guest) -> None:
    assert g.call(memory_op, Hypercall.memory_op, [MemoryOp.current_reservation, UNMAPPED])[0] == -Errno.EFAULT
    g.put(ARG, struct.pack("<H", DOMID_SELF))
    cmd = MemoryOp.current_reservation | 1 << 6  # a continuation's start extent: do_memory_op refuses it here
    assert g.call(memory_op, Hypercall.memory_op, [cmd, ARG])[0] == -Errno.EINVAL


def test_unimplemented_memory_ops_are_enosys(g: Guest) -> None:
    for cmd in (MemoryOp.increase_reservation, MemoryOp.populate_physmap, MemoryOp.maximum_gpfn, 63,
                MemoryOp.machphys_mfn_list | 1 << 6):
        rc, c = g.call(memory_op, Hypercall.memory_op, [cmd, ARG])
        assert rc == -Errno.ENOSYS and _denied(c, "memop.denied") == ["unsupported-cmd"]


# -- memory_op: machphys_mfn_list ----------------------------------------------------------------------------


@pytest.mark.parametrize("op", [MemoryOp.machphys_mfn_list, MemoryOp.machphys_compat_mfn_list])
def test_machphys_mfn_list_lists_the_m2p_in_one_extent(g: Guest, op: MemoryOp) -> None:
    # 1024 pages: 4 KiB of m2p, one frame after the grant frames, so one 2 MiB extent starting there
    first = g.dom.nr_pages + M2P_FRAME_BASE
    assert M2P_FRAME_BASE == GRANT_FRAME_BASE + MAX_GRANT_FRAMES and m2p_frames(g.dom.nr_pages) == 1
    g.put(ARG, struct.pack("<III", 8, LIST, 0xDEAD))
    g.put(LIST, b"\xee" * 32)
    rc, c = g.call(memory_op, Hypercall.memory_op, [op, ARG])
    assert rc == 0
    assert g.u32s(ARG, 3) == (8, LIST, 1)  # nr_extents = 1
    assert g.u32s(LIST, 1) == (first,) and g.read(LIST + 4, 28) == b"\xee" * 28  # one extent written
    g.put(ARG, struct.pack("<III", 0, LIST, 0xDEAD))
    assert g.call(memory_op, Hypercall.memory_op, [op, ARG])[0] == 0 and g.u32s(ARG, 3) == (0, LIST, 0)
    assert g.call(memory_op, Hypercall.memory_op, [op, UNMAPPED])[0] == -Errno.EFAULT


def test_machphys_mfn_list_extents_follow_the_table_size() -> None:
    # one extent per 2 MiB of table (512 Ki entries), each starting 512 frames after the last; at most 2
    assert memory_op.m2p_extent_mfns(1024) == (1024 + M2P_FRAME_BASE,)
    assert memory_op.m2p_extent_mfns(512 * 1024) == (512 * 1024 + M2P_FRAME_BASE,)
    n = 512 * 1024 + 1
    assert memory_op.m2p_extent_mfns(n) == (n + M2P_FRAME_BASE, n + M2P_FRAME_BASE + 512)


def test_machphys_mfn_list_writes_at_most_max_extents(g: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    # The seam for a larger m2p table: its extents' frames, at most (END - START) / 2 MiB of them.
    assert (MACH2PHYS_VIRT_END_NONPAE - MACH2PHYS_VIRT_START_NONPAE) >> 21 == 2
    monkeypatch.setattr(memory_op, "m2p_extent_mfns", lambda nr_pages: (0x500, 0x700))
    for max_extents, want in ((1, (0x500,)), (2, (0x500, 0x700)), (100, (0x500, 0x700))):
        g.put(ARG, struct.pack("<III", max_extents, LIST, 0))
        g.put(LIST, bytes(8))
        assert g.call(memory_op, Hypercall.memory_op, [MemoryOp.machphys_mfn_list, ARG])[0] == 0
        assert g.u32s(ARG, 3)[2] == len(want) and g.u32s(LIST, len(want)) == want
    g.put(ARG, struct.pack("<III", 2, UNMAPPED, 0))
    assert g.call(memory_op, Hypercall.memory_op, [MemoryOp.machphys_mfn_list, ARG])[0] == -Errno.EFAULT


# -- grant_table_op ----------------------------------------------------------------------------------------------


def _query(g: Guest, dom: int = DOMID_SELF) -> tuple[int, tuple[int, int, int, int]]:
    g.put(ARG, struct.pack("<HxxIIhxx", dom, 0xAAAA, 0xBBBB, 0x55))
    rc, _ = g.call(grant_table_op, Hypercall.grant_table_op, [GnttabOp.query_size, ARG, 1])
    data = g.read(ARG, layouts.GNTTAB_QUERY_SIZE.size)
    assert data is not None
    return rc, struct.unpack("<HxxIIhxx", data)


def _setup(g: Guest, nr: int, dom: int = DOMID_SELF, frame_list: int = LIST, count: int = 1) -> tuple[int, int, Call]:
    """(rc, status, call) of GNTTABOP_setup_table for ``nr`` frames into ``frame_list``."""
    g.put(ARG, struct.pack("<HxxIhxxI", dom, nr, 0x55, frame_list))
    rc, c = g.call(grant_table_op, Hypercall.grant_table_op, [GnttabOp.setup_table, ARG, count])
    data = g.read(ARG, 16)
    assert data is not None
    (status,) = struct.unpack_from("<h", data, layouts.GNTTAB_SETUP_TABLE.offset("status"))
    return rc, status, c


def test_a_new_grant_table_has_one_frame_of_four(g: Guest) -> None:
    assert _query(g) == (0, (DOMID_SELF, 1, MAX_GRANT_FRAMES, Gntst.okay))
    assert _query(g, g.dom.domid)[1][1:] == (1, 4, Gntst.okay)


def test_setup_table_returns_the_grant_frames_and_grows_the_table(g: Guest) -> None:
    g.put(LIST, b"\xee" * 16)
    rc, status, c = _setup(g, 1)
    assert (rc, status) == (0, Gntst.okay) and g.u32s(LIST, 1) == (GRANT0,)
    assert g.read(LIST + 4, 12) == b"\xee" * 12  # only nr_frames entries are written
    assert [kw["frames"] for ev, kw in call_events(c) if ev == "gnttab.setup_table"] == [[GRANT0]]
    rc, status, _ = _setup(g, 3)
    assert (rc, status, g.u32s(LIST, 3)) == (0, Gntst.okay, (GRANT0, GRANT0 + 1, GRANT0 + 2))
    assert _query(g)[1][1:] == (3, 4, Gntst.okay)
    _setup(g, 1)  # asking for fewer never shrinks it
    assert g.dom.grant.nr_frames == 3


def test_setup_table_past_the_maximum_is_general_error_and_changes_nothing(g: Guest) -> None:
    g.put(LIST, b"\xee" * 32)
    rc, status, _ = _setup(g, MAX_GRANT_FRAMES + 1)
    assert (rc, status) == (0, Gntst.general_error)
    assert g.read(LIST, 32) == b"\xee" * 32 and g.dom.grant.nr_frames == 1


def test_setup_table_and_query_size_of_another_domain_reveal_nothing(guests: tuple[Guest, Guest]) -> None:
    g, other = guests
    _setup(other, 4)  # beta's table has grown
    g.put(LIST, b"\xee" * 16)
    for dom, want in ((other.dom.domid, Gntst.permission_denied), (NO_SUCH_DOMAIN, Gntst.bad_domain)):
        rc, status, _ = _setup(g, 2, dom=dom)
        assert (rc, status) == (0, want) and g.read(LIST, 16) == b"\xee" * 16
        assert _query(g, dom) == (0, (dom, 0xAAAA, 0xBBBB, want))  # sizes left as the guest wrote them
    assert g.dom.grant.nr_frames == 1


def test_setup_table_counts(g: Guest) -> None:
    g.put(LIST, b"\xee" * 4)
    rc, status, _ = _setup(g, 1, count=0)  # the compat loop runs no iteration
    assert (rc, status, g.read(LIST, 4)) == (0, 0x55, b"\xee" * 4)
    for count in (2, 0x80000000):
        assert _setup(g, 1, count=count)[0] == -Errno.EINVAL


def test_setup_table_bad_pointers(g: Guest) -> None:
    assert g.call(grant_table_op, Hypercall.grant_table_op, [GnttabOp.setup_table, UNMAPPED, 1])[0] == -Errno.EFAULT
    # a frame list that wraps the address space fails compat_handle_okay before anything happens
    rc, status, c = _setup(g, 2, frame_list=0xFFFFFFFC)
    assert rc == -Errno.EFAULT and status == 0x55 and _denied(c, "gnttab.denied") == ["frame-list-out-of-range"]
    # an unmapped frame list: the compat layer ignores each failed copy, so the status is okay
    rc, status, c = _setup(g, 2, frame_list=UNMAPPED)
    assert (rc, status) == (0, Gntst.okay) and g.dom.grant.nr_frames == 2
    assert [kw["index"] for ev, kw in call_events(c) if ev == "gnttab.frame_list_fault"] == [0, 1]


def test_query_size_counts_and_pointer(g: Guest) -> None:
    for count in (0, 2):
        assert g.call(grant_table_op, Hypercall.grant_table_op, [GnttabOp.query_size, ARG, count])[0] == -Errno.EINVAL
    assert g.call(grant_table_op, Hypercall.grant_table_op, [GnttabOp.query_size, UNMAPPED, 1])[0] == -Errno.EFAULT


@pytest.mark.parametrize(("version", "rc"), [(1, 0), (2, -Errno.ENOSYS), (0, -Errno.EINVAL), (3, -Errno.EINVAL)])
def test_set_version_keeps_v1_and_writes_it_back(g: Guest, version: int, rc: int) -> None:
    g.put(ARG, struct.pack("<I", version))
    assert g.call(grant_table_op, Hypercall.grant_table_op, [GnttabOp.set_version, ARG, 1])[0] == rc
    assert g.u32s(ARG, 1) == (1,) and g.dom.grant.version == 1


def test_set_version_bad_pointer(g: Guest) -> None:
    assert g.call(grant_table_op, Hypercall.grant_table_op, [GnttabOp.set_version, UNMAPPED, 1])[0] == -Errno.EFAULT


def test_other_grant_table_ops_and_bad_commands(g: Guest) -> None:
    for cmd, err in ((GnttabOp.map_grant_ref, Errno.ENOSYS), (GnttabOp.copy, Errno.ENOSYS), (99, Errno.ENOSYS),
                     (GnttabOp.query_size | 1 << 12, Errno.EINVAL)):
        assert g.call(grant_table_op, Hypercall.grant_table_op, [cmd, ARG, 1])[0] == -err


# -- grant frames are mappable, and only those the table has grown to -----------------------------------------


def _map(g: Guest, mfn: int) -> int:
    return g.call(update_va_mapping, Hypercall.update_va_mapping, [0xC0300000, (mfn << 12) | P | RW, 0, 0])[0]


def test_grant_frames_are_mappable_once_the_table_has_them(g: Guest) -> None:
    assert _map(g, GRANT0) == 0  # the initial frame
    assert _map(g, GRANT0 + 1) == -Errno.EPERM
    _setup(g, 2)
    rc, c = g.call(update_va_mapping, Hypercall.update_va_mapping, [0xC0300000, (GRANT0 + 1) << 12 | P | RW, 0, 0])
    assert rc == 0 and c.effects == [SetVaPte(vcpu=0, va=0xC0300000, value=(GRANT0 + 1) << 12 | P | RW)]
    _setup(g, MAX_GRANT_FRAMES)
    assert all(mm.mappable(g.dom, GRANT0 + i) for i in range(MAX_GRANT_FRAMES))
    # past the maximum, and the GDT frame between shared_info and the grant frames, never
    assert not mm.mappable(g.dom, GRANT0 + MAX_GRANT_FRAMES) and not mm.mappable(g.dom, 1025)


def test_a_grant_frame_is_no_page_table(g: Guest) -> None:
    g.put(ARG, struct.pack("<III", MmuextCmd.PIN_L1_TABLE, GRANT0, 0))
    rc, _ = g.call(mmuext_op, Hypercall.mmuext_op, [ARG, 1, 0, DOMID_SELF])
    assert rc == -Errno.EPERM and not g.dom.frames.is_pinned(GRANT0)


def test_no_guest_pte_may_name_an_m2p_frame(g: Guest) -> None:
    # Xen shares the m2p read-only with privileged domains only: a domU maps it neither writable nor read-only
    m2p = g.dom.nr_pages + M2P_FRAME_BASE
    assert not mm.mappable(g.dom, m2p) and not mm.owned(g.dom, m2p)
    pin_table(g.dom, 0x10, 1)  # an L1's entries are checked (a plain data frame's are the guest's own bytes)
    for flags in (P | RW, P):
        rc, c = g.call(update_va_mapping, Hypercall.update_va_mapping, [0xC0300000, m2p << 12 | flags, 0, 0])
        assert rc == -Errno.EPERM and _denied(c, "mmu.denied") == ["maps-unowned-frame"] and not c.effects
        g.put(ARG, struct.pack("<QQ", 0x10 << 12 | MmuCmd.NORMAL_PT_UPDATE, m2p << 12 | flags))
        rc, c = g.call(mmu_update, Hypercall.mmu_update, [ARG, 1, 0, DOMID_SELF])
        assert rc == -Errno.EPERM and _denied(c, "mmu.denied") == ["maps-unowned-frame"] and not c.effects
    g.put(ARG, struct.pack("<III", MmuextCmd.PIN_L1_TABLE, m2p, 0))
    assert g.call(mmuext_op, Hypercall.mmuext_op, [ARG, 1, 0, DOMID_SELF])[0] == -Errno.EPERM


# -- what the domain process copies in -----------------------------------------------------------------------------


def test_copy_in_names_the_structs_and_their_arrays(g: Guest) -> None:
    g.put(ARG, struct.pack("<HxxIhxxI", DOMID_SELF, 3, 0, LIST))
    assert copy_in(Hypercall.grant_table_op, [GnttabOp.setup_table, ARG, 1], g.read) == [
        Span(ARG, 16, writable=True), Span(LIST, 12, writable=True)]
    g.put(ARG, struct.pack("<HxxIhxxI", DOMID_SELF, MAX_GRANT_FRAMES + 1, 0, LIST))
    assert copy_in(Hypercall.grant_table_op, [GnttabOp.setup_table, ARG, 1], g.read) == [Span(ARG, 16, True)]
    assert copy_in(Hypercall.grant_table_op, [GnttabOp.set_version, ARG, 1], g.read) == [Span(ARG, 4, True)]
    assert copy_in(Hypercall.grant_table_op, [GnttabOp.map_grant_ref, ARG, 1], g.read) == []
    assert copy_in(Hypercall.memory_op, [MemoryOp.current_reservation, ARG], g.read) == [Span(ARG, 2)]
    g.put(ARG, struct.pack("<III", 0xFFFFFFFF, LIST, 0))  # a huge max_extents copies at most the table's 2
    assert copy_in(Hypercall.memory_op, [MemoryOp.machphys_mfn_list, ARG], g.read) == [
        Span(ARG, 12, writable=True), Span(LIST, 8, writable=True)]


def test_new_numbers_match_xen_headers(tmp_path: Path) -> None:
    checks = [("__MACH2PHYS_VIRT_START_NONPAE", MACH2PHYS_VIRT_START_NONPAE),
              ("__MACH2PHYS_VIRT_END_NONPAE", MACH2PHYS_VIRT_END_NONPAE),
              ("sizeof(xen_extraversion_t)", 16), ("sizeof(xen_capabilities_info_t)", 1024)]
    checks += [(f"GNTST_{s.name}", int(s)) for s in Gntst] + [(f"XENMEM_{m.name}", int(m)) for m in MemoryOp]
    assert_matches_xen_headers(tmp_path, ("xen", "version", "grant_table", "memory"), checks,
                               interface_version=0x0003020A)
