"""Page types with type counts (hypervisor/pagetypes.py, hypervisor/ptops.py), as Xen's xen/arch/x86/mm.c keeps
them for a 32-bit non-PAE PV guest: get_page_type / put_page_type, alloc_l1_table / alloc_l2_table,
get_page_from_l1e / l2e, mod_l1_entry / mod_l2_entry, pin / unpin / new_baseptr, and the builder's tables.

Each test runs the hypercall handlers on a real Domain of an in-process hypervisor core (alpha: 1024 frames,
2 vCPUs), the frames a pin, a new base or an L2 update validates copied in by machine address as the domain
process copies them (``domains/tablecopy.py``). Every test here fails on the code before page types (which kept
only pins, validated nothing and took no writable references).
"""

from __future__ import annotations

import struct
import weakref
from typing import Any

import pytest
from helpers import call_events, core, make_call, run_handler

from domains.memory import GuestRam
from domains.tablecopy import table_regions
from hypervisor.domain import Domain
from hypervisor.hypercalls import mmu_update, mmuext_op, set_gdt, update_descriptor, update_va_mapping
from hypervisor.hypercalls.base import Call
from pvcluster.abi.copyin import MAX_TABLE_FRAMES, Span, copy_in
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import DOMID_SELF, Hypercall, MmuextCmd
from pvcluster.bus.effects import SetCr3, SetVaPte, WriteMachine
from pvcluster.bus.messages import BuildResult, Hello, Region

REQS, DONE, OPS, LIST = 0x10000, 0x20000, 0x30000, 0x50000
L2, L2B, L1, L1B, DATA, DATA2 = 0x100, 0x101, 0x110, 0x111, 0x200, 0x201
UNOWNED = 5000
P, RW, PSE = 0x1, 0x2, 0x80
HOLE = 1008  # HYPERVISOR_VIRT_START_NONPAE >> 22
_C = MmuextCmd


_HV: weakref.WeakKeyDictionary[Domain, Any] = weakref.WeakKeyDictionary()


def _domain(index: int) -> Domain:
    hv = core()
    d = hv.create_domain(hv.spec.domains[index])
    d.work_left = hv.work_budget
    _HV[d] = hv
    return d


@pytest.fixture
def dom() -> Domain:
    return _domain(0)


@pytest.fixture
def pv_dom() -> Domain:
    """A xen-backend domain: its builder's tables are typed (a native one's are not)."""
    d = _domain(1)
    assert d.spec.backend == "xen" and d.nr_pages > UNOWNED // 8
    return d


class Memory:
    """The guest's frames as the domain process would copy them: mfn -> {slot: entry}."""

    def __init__(self) -> None:
        self.frames: dict[int, dict[int, int]] = {}

    def set(self, mfn: int, slot: int, value: int) -> None:
        self.frames.setdefault(mfn, {})[slot] = value

    def region(self, mfn: int) -> Region:
        table = [0] * 1024
        for slot, value in self.frames.get(mfn, {}).items():
            table[slot] = value
        return Region(mfn << 12, 4096, struct.pack("<1024I", *table), False, [], [mfn], machine=True)

    def regions(self, *mfns: int) -> list[Region]:
        return [self.region(m) for m in mfns]


def _call(dom: Domain, nr: int, args: list[int], regions: list[Region], vcpu: int = 0) -> Call:
    return make_call(_HV[dom], dom, nr, args, regions, vcpu=vcpu)


def _denied(call: Call) -> list[str]:
    return [kw["reason"] for ev, kw in call_events(call) if ev == "mmu.denied"]


def _ext(dom: Domain, ops: list[tuple[int, int]], tables: list[Region], vcpu: int = 0) -> tuple[int, Call]:
    data = b"".join(struct.pack("<3I", cmd, arg, 0) for cmd, arg in ops)
    regions = [Region(OPS, len(data), data, False), Region(DONE, 4, bytes(4), True), *tables]
    call = _call(dom, Hypercall.mmuext_op, [OPS, len(ops), DONE, DOMID_SELF], regions, vcpu=vcpu)
    return run_handler(mmuext_op, call), call


def _mmu(dom: Domain, reqs: list[tuple[int, int]], tables: list[Region] | None = None) -> tuple[int, Call]:
    data = b"".join(struct.pack("<QQ", p, v) for p, v in reqs)
    regions = [Region(REQS, len(data), data, False), Region(DONE, 4, bytes(4), True), *(tables or [])]
    call = _call(dom, Hypercall.mmu_update, [REQS, len(reqs), DONE, DOMID_SELF], regions)
    return run_handler(mmu_update, call), call


def _entry(table: int, slot: int) -> int:
    return table << 12 | slot * 4


def _types(dom: Domain, *mfns: int) -> list[tuple[str, int]]:
    return [(dom.frames.type_of(m).value, dom.frames.count(m)) for m in mfns]


# -- writable references and L1 validation ----------------------------------------------------------------------


def test_a_writable_entry_of_a_validated_l1_holds_its_frame_writable(dom: Domain) -> None:
    mem = Memory()
    mem.set(L1, 0, DATA << 12 | P | RW)
    mem.set(L1, 1, DATA << 12 | P | RW)  # two writable mappings: two references
    mem.set(L1, 2, DATA2 << 12 | P)  # read-only: none
    assert _ext(dom, [(_C.PIN_L1_TABLE, L1)], mem.regions(L1))[0] == 0
    assert _types(dom, L1, DATA, DATA2) == [("l1", 1), ("writable", 2), ("none", 0)]
    # a frame mapped writable can be neither an L1 nor a GDT frame (Xen's "Bad type": -EINVAL)
    rc, call = _ext(dom, [(_C.PIN_L1_TABLE, DATA)], mem.regions(DATA))
    assert rc == -Errno.EINVAL and _denied(call) == ["writable-frame-not-l1"]
    gdt = _call(dom, Hypercall.set_gdt, [LIST, 16], [Region(LIST, 4, struct.pack("<I", DATA), False)])
    assert run_handler(set_gdt, gdt) == -Errno.EINVAL and _denied(gdt) == ["gdt-frame-mapped-writable"]
    # the read-only frame may become one; then no entry may map it writable (could_not_pin: -EBUSY)
    assert _ext(dom, [(_C.PIN_L1_TABLE, DATA2)], mem.regions(DATA2))[0] == 0
    rc, call = _mmu(dom, [(_entry(L1, 3), DATA2 << 12 | P | RW)])
    assert rc == -Errno.EBUSY and _denied(call) == ["writable-pagetable"] and call.effects == []


def test_mod_l1_entry_moves_the_writable_reference_and_a_frame_at_zero_loses_its_type(dom: Domain) -> None:
    mem = Memory()
    mem.set(L1, 0, DATA << 12 | P | RW)
    assert _ext(dom, [(_C.PIN_L1_TABLE, L1)], mem.regions(L1))[0] == 0
    rc, call = _mmu(dom, [(_entry(L1, 0), DATA << 12 | P)])  # read-only now: the reference goes
    assert rc == 0 and call.effects == [WriteMachine(addr=_entry(L1, 0), data=struct.pack("<I", DATA << 12 | P))]
    assert _types(dom, DATA) == [("none", 0)] and dom.frames.entry(L1, 0) == DATA << 12 | P
    assert _ext(dom, [(_C.PIN_L1_TABLE, DATA)], mem.regions(DATA))[0] == 0


def test_pinning_an_l1_whose_entry_maps_a_page_table_writable_is_refused_and_takes_nothing(dom: Domain) -> None:
    mem = Memory()
    assert _ext(dom, [(_C.PIN_L1_TABLE, L1B)], mem.regions(L1B))[0] == 0
    mem.set(L1, 0, DATA << 12 | P | RW)
    mem.set(L1, 1, L1B << 12 | P | RW)
    rc, call = _ext(dom, [(_C.PIN_L1_TABLE, L1)], mem.regions(L1))
    assert rc == -Errno.EBUSY and _denied(call) == ["writable-pagetable"]
    assert _types(dom, L1, DATA, L1B) == [("none", 0), ("none", 0), ("l1", 1)]  # entry 0's reference undone


# -- L2 entries and recursive validation ------------------------------------------------------------------------


def test_an_l2_entry_makes_its_frame_an_l1_only_once_nothing_maps_it_writable(dom: Domain) -> None:
    mem = Memory()
    mem.set(L1, 0, L1B << 12 | P | RW)  # L1B is mapped writable through L1
    mem.set(L1B, 5, DATA << 12 | P | RW)
    assert _ext(dom, [(_C.PIN_L2_TABLE, L2), (_C.PIN_L1_TABLE, L1)], mem.regions(L2, L1))[0] == 0
    rc, call = _mmu(dom, [(_entry(L2, 3), L1B << 12 | P | RW)], mem.regions(L1B))
    assert rc == -Errno.EINVAL and _denied(call) == ["writable-frame-not-l1"] and call.effects == []
    # unmap it, and the same update validates it: its own entries take their references
    rc, call = _mmu(dom, [(_entry(L1, 0), L1B << 12 | P), (_entry(L2, 3), L1B << 12 | P | RW)], mem.regions(L1B))
    assert rc == 0 and len(call.effects) == 2
    assert _types(dom, L1B, DATA) == [("l1", 1), ("writable", 1)]
    # and now it is read-only to the guest
    rc, call = _mmu(dom, [(_entry(L1, 0), L1B << 12 | P | RW)])
    assert rc == -Errno.EBUSY and _denied(call) == ["writable-pagetable"]
    # replacing the L2 entry frees it: the L1 loses its type, its data page its writable reference
    assert _mmu(dom, [(_entry(L2, 3), 0)])[0] == 0
    assert _types(dom, L1B, DATA) == [("none", 0), ("none", 0)]


def test_pinning_an_l2_validates_its_l1s_and_their_entries(dom: Domain) -> None:
    mem = Memory()
    mem.set(L2, 0, L1 << 12 | P | RW)
    mem.set(L2, 1, L1 << 12 | P | RW)  # the same L1 twice: two references
    mem.set(L1, 0, DATA << 12 | P | RW)
    assert _ext(dom, [(_C.PIN_L2_TABLE, L2)], mem.regions(L2, L1))[0] == 0
    assert _types(dom, L2, L1, DATA) == [("l2", 1), ("l1", 2), ("writable", 1)]
    assert dom.frames.is_pinned(L2) and not dom.frames.is_pinned(L1)
    # unpin: every reference the tables held goes with it
    assert _ext(dom, [(_C.UNPIN_TABLE, L2)], [])[0] == 0
    assert _types(dom, L2, L1, DATA) == [("none", 0)] * 3


def test_pinning_an_l2_that_names_a_writable_mapped_frame_is_einval_and_changes_nothing(dom: Domain) -> None:
    mem = Memory()
    mem.set(L1, 0, L1B << 12 | P | RW)
    assert _ext(dom, [(_C.PIN_L1_TABLE, L1)], mem.regions(L1))[0] == 0
    mem.set(L2, 0, DATA << 12 | P)  # a fine L1 (empty)
    mem.set(L2, 1, L1B << 12 | P)  # but this one is mapped writable
    rc, call = _ext(dom, [(_C.PIN_L2_TABLE, L2)], mem.regions(L2, DATA, L1B))
    assert rc == -Errno.EINVAL and _denied(call) == ["writable-frame-not-l1"]
    assert _types(dom, L2, DATA, L1B) == [("none", 0), ("none", 0), ("writable", 1)]


def test_an_l2_naming_an_l2_or_a_superpage_is_refused(dom: Domain) -> None:
    mem = Memory()
    mem.set(L2, 0, L2 << 12 | P)  # itself: no linear page tables here
    assert _ext(dom, [(_C.PIN_L2_TABLE, L2)], mem.regions(L2))[0] == -Errno.EINVAL
    mem.set(L2, 0, DATA << 12 | P | PSE)
    rc, call = _ext(dom, [(_C.PIN_L2_TABLE, L2)], mem.regions(L2))
    assert rc == -Errno.EINVAL and _denied(call) == ["superpage"]


def test_a_frame_to_validate_that_was_not_copied_in_continues_the_batch(dom: Domain) -> None:
    mem = Memory()
    assert _ext(dom, [(_C.PIN_L2_TABLE, L2)], mem.regions(L2))[0] == 0
    # request 0 needs nothing validated; request 1 makes L1 an L1, whose frame did not come with this trap
    rc, call = _mmu(dom, [(_entry(DATA, 0), 0), (_entry(L2, 0), L1 << 12 | P)])
    assert rc == 0 and call.continuation is not None and len(call.effects) == 1
    assert _types(dom, L1) == [("none", 0)]


def test_a_frame_an_earlier_request_wrote_is_validated_from_a_fresh_copy(dom: Domain) -> None:
    mem = Memory()
    assert _ext(dom, [(_C.PIN_L2_TABLE, L2)], mem.regions(L2))[0] == 0
    # request 0 writes L1B (plain data) after the trap copied it: request 1 must not validate that copy, so the
    # batch continues there, in a trap whose copy has request 0's write
    rc, call = _mmu(dom, [(_entry(L1B, 0), DATA << 12 | P | RW), (_entry(L2, 0), L1B << 12 | P)], mem.regions(L1B))
    assert rc == 0 and len(call.effects) == 1 and call.continuation is not None
    assert _types(dom, L1B, DATA) == [("none", 0), ("none", 0)]
    mem.set(L1B, 0, DATA << 12 | P | RW)
    assert _mmu(dom, [(_entry(L2, 0), L1B << 12 | P)], mem.regions(L1B))[0] == 0
    assert _types(dom, L1B, DATA) == [("l1", 1), ("writable", 1)]


def test_a_page_table_no_pin_holds_is_still_no_descriptor_table(dom: Domain) -> None:
    mem = Memory()
    mem.set(L2, 0, L1 << 12 | P)
    assert _ext(dom, [(_C.PIN_L2_TABLE, L2)], mem.regions(L2, L1))[0] == 0  # L1 typed through L2, not pinned
    upd = _call(dom, Hypercall.update_descriptor, [L1 << 12, 0, 0x0000FFFF, 0x00CFB200], [])
    assert run_handler(update_descriptor, upd) == -Errno.EINVAL and _denied(upd) == ["desc-frame-is-pagetable"]
    gdt = _call(dom, Hypercall.set_gdt, [LIST, 16], [Region(LIST, 4, struct.pack("<I", L1), False)])
    assert run_handler(set_gdt, gdt) == -Errno.EINVAL and _denied(gdt) == ["gdt-frame-is-pagetable"]


# -- the hypervisor hole ----------------------------------------------------------------------------------------


def test_l2_slots_in_the_hypervisor_hole_are_not_the_guests(dom: Domain) -> None:
    mem = Memory()
    mem.set(L2, HOLE, UNOWNED << 12 | P | PSE)  # the hypervisor's own mappings: not looked at, not counted
    mem.set(L2, 1023, L1 << 12 | P)
    assert _ext(dom, [(_C.PIN_L2_TABLE, L2)], mem.regions(L2))[0] == 0
    assert _types(dom, L1) == [("none", 0)]
    for slot in (HOLE, 1023):
        rc, call = _mmu(dom, [(_entry(L2, slot), L1 << 12 | P)], mem.regions(L1))
        assert rc == -Errno.EPERM and _denied(call) == ["l2-slot-in-hypervisor-hole"] and call.effects == []
    assert _mmu(dom, [(_entry(L2, HOLE - 1), L1 << 12 | P)], mem.regions(L1))[0] == 0


# -- the page-table base ----------------------------------------------------------------------------------------


def test_new_baseptr_takes_an_l2_reference_and_drops_the_old_one(dom: Domain) -> None:
    mem = Memory()
    mem.set(L2, 0, L1 << 12 | P)
    rc, call = _ext(dom, [(_C.NEW_BASEPTR, L2)], mem.regions(L2, L1), vcpu=1)
    assert rc == 0 and call.effects == [SetCr3(vcpu=1, cr3=L2 << 12)]
    assert _types(dom, L2, L1) == [("l2", 1), ("l1", 1)]
    assert _ext(dom, [(_C.NEW_BASEPTR, L2B)], mem.regions(L2B), vcpu=1)[0] == 0
    assert _types(dom, L2, L1, L2B) == [("none", 0), ("none", 0), ("l2", 1)]
    # a frame mapped writable cannot be a base (new_guest_cr3: -EINVAL)
    mem.set(L1B, 0, DATA << 12 | P | RW)
    assert _ext(dom, [(_C.PIN_L1_TABLE, L1B)], mem.regions(L1B))[0] == 0
    rc, call = _ext(dom, [(_C.NEW_BASEPTR, DATA)], mem.regions(DATA), vcpu=1)
    assert rc == -Errno.EINVAL and call.effects == [] and dom.frames.bases[1] == L2B


# -- update_va_mapping ------------------------------------------------------------------------------------------

VA = 0x00403000  # slot 1, entry 3


def _uvm(dom: Domain, pte: int, walk: list[int]) -> tuple[int, Call]:
    call = _call(dom, Hypercall.update_va_mapping, [VA, pte, 0, 0], [Region(VA, 0, None, False, walk, [])])
    return run_handler(update_va_mapping, call), call


def test_update_va_mapping_updates_the_l1_its_walk_names(dom: Domain) -> None:
    mem = Memory()
    mem.set(L2, 1, L1 << 12 | P | RW)
    assert _ext(dom, [(_C.PIN_L2_TABLE, L2)], mem.regions(L2, L1))[0] == 0
    walk = [_entry(L2, 1), _entry(L1, 3)]
    rc, call = _uvm(dom, DATA << 12 | P | RW, walk)
    assert rc == 0 and call.effects == [SetVaPte(vcpu=0, va=VA, value=DATA << 12 | P | RW)]
    assert _types(dom, DATA) == [("writable", 1)] and dom.frames.entry(L1, 3) == DATA << 12 | P | RW
    rc, call = _uvm(dom, L2 << 12 | P | RW, walk)  # its own page directory, writable
    assert rc == -Errno.EBUSY and _denied(call) == ["writable-pagetable"] and call.effects == []
    rc, call = _uvm(dom, 0, walk)
    assert rc == 0 and _types(dom, DATA) == [("none", 0)]
    rc, call = _uvm(dom, DATA << 12 | P, [_entry(L2, 1)])  # no L1 maps va
    assert rc == -Errno.EINVAL and _denied(call) == ["va-pde-not-present"]
    rc, call = _uvm(dom, DATA << 12 | P, [_entry(L2, 1), _entry(DATA2, 3)])  # an L1 no L2 validated
    assert rc == -Errno.EINVAL and _denied(call) == ["va-l1-not-a-pagetable"]


# -- the builder's tables ---------------------------------------------------------------------------------------


def _built(dom: Domain, tables: dict[int, dict[int, int]], l2: int, l1s: list[int]) -> None:
    mem = Memory()
    mem.frames = tables
    contents = b"".join(r.data or b"" for r in mem.regions(l2, *l1s))
    hv = _HV[dom]
    hv.receive(dom, Hello(pid=1))
    hv.receive(dom, BuildResult(ok=True, error_code="", error="", entry=0, start_info=0, guest_os="t",
                                l2_mfn=l2, l1_mfns=l1s, tables=contents))


def test_the_builders_tables_start_typed_and_the_hole_l1_is_the_hypervisors(pv_dom: Domain) -> None:
    dom, shared_info = pv_dom, pv_dom.nr_pages
    _built(dom, {L2: {0: L1 << 12 | P | RW, HOLE: L1B << 12 | P},
                 L1: {0: DATA << 12 | P | RW, 1: L1 << 12 | P, 2: shared_info << 12 | P | RW},
                 L1B: {0: UNOWNED << 12 | P}}, L2, [L1, L1B])
    # the L2 pinned and every vCPU's base; its L1 validated; the hole's L1 typed by the hypervisor
    vcpus = len(dom.vcpus)
    assert _types(dom, L2, L1, DATA, L1B) == [("l2", 1 + vcpus), ("l1", 1), ("writable", 1), ("l1", 1)]
    assert dom.frames.is_pinned(L2) and dom.frames.bases == dict.fromkeys(range(vcpus), L2)
    rc, call = _mmu(dom, [(_entry(L1B, 0), DATA2 << 12 | P)])
    assert rc == -Errno.EPERM and _denied(call) == ["xen-private-table"]
    rc, call = _mmu(dom, [(_entry(L2, 5), L1B << 12 | P)])
    assert rc == -Errno.EINVAL and _denied(call) == ["l2e-names-xen-table"]
    rc, call = _mmu(dom, [(_entry(L1, 1), L1 << 12 | P | RW)])
    assert rc == -Errno.EBUSY and _denied(call) == ["writable-pagetable"]


def test_a_domains_types_go_when_its_process_exits(pv_dom: Domain) -> None:
    dom = pv_dom
    _built(dom, {L2: {0: L1 << 12 | P}, L1: {0: DATA << 12 | P | RW}}, L2, [L1])
    assert _types(dom, L2, L1, DATA) == [("l2", 1 + len(dom.vcpus)), ("l1", 1), ("writable", 1)]
    _HV[dom].process_exited(dom, 0)
    assert _types(dom, L2, L1, DATA) == [("none", 0)] * 3 and dom.frames.tables == {}


# -- copy-in by machine address ---------------------------------------------------------------------------------


def test_copy_in_names_the_frames_to_validate_and_the_domain_process_copies_them() -> None:
    ops = struct.pack("<3I", _C.PIN_L2_TABLE, L2, 0) + struct.pack("<3I", _C.NEW_BASEPTR, L2B, 0)
    spans = copy_in(Hypercall.mmuext_op, [OPS, 2, 0, DOMID_SELF], lambda a, n: ops if a == OPS else None)
    assert spans == [Span(OPS, 24), Span(L2 << 12, 4096, machine=True, follow=True),
                     Span(L2B << 12, 4096, machine=True, follow=True)]
    reqs = struct.pack("<QQ", _entry(L2, 0), L1 << 12 | P) + struct.pack("<QQ", _entry(L1, 0), 0)
    spans = copy_in(Hypercall.mmu_update, [REQS, 2, 0, DOMID_SELF], lambda a, n: reqs if a == REQS else None)
    assert spans == [Span(REQS, 32), Span(L1 << 12, 4096, machine=True)]  # only a present entry's frame
    ram = GuestRam(4 << 20, 0xC0000000)
    ram.write_pa(L2 << 12, struct.pack("<3I", L1 << 12 | P, 0, L1B << 12 | P | PSE))
    ram.write_pa((L2 << 12) + HOLE * 4, struct.pack("<I", DATA << 12 | P))  # the hole: not followed
    got = table_regions(ram, [Span(0x1000, 4), Span(L2 << 12, 4096, machine=True, follow=True),
                              Span(UNOWNED << 12, 4096, machine=True)])
    assert [(r.addr >> 12, r.machine, r.data is not None) for r in got] == [(L2, True, True), (L1, True, True),
                                                                            (UNOWNED, True, False)]
    many = [Span(m << 12, 4096, machine=True) for m in range(MAX_TABLE_FRAMES + 5)]
    assert len(table_regions(ram, many)) == MAX_TABLE_FRAMES
