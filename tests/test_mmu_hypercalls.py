"""Unit tests of the memory-management hypercalls: mmu_update (1), update_va_mapping (14), mmuext_op (26).

Each test runs a family's ``handle`` on a real Domain of an in-process hypervisor core (alpha: 4 MiB = 1024
frames, 2 vCPUs) with hand-made guest regions, and checks the result, the effects in order, and the done count
written back. Batch continuations (a spent work budget, a batch longer than what was copied in) are tested in
tests/test_continuations.py.
"""

from __future__ import annotations

import re
import struct
import weakref
from pathlib import Path
from typing import Any

import pytest
from helpers import call_events, core, make_call, pin_table, run_handler

from hypervisor import mm
from hypervisor.domain import Domain
from hypervisor.guestmem import NotCopied
from hypervisor.hypercalls import mmu_update, mmuext_op, update_va_mapping
from hypervisor.hypercalls.base import Call
from hypervisor.pagetypes import PageType
from pvcluster.abi import layouts, xen
from pvcluster.abi.copyin import MAX_BATCH_COPY, Span, copy_in
from pvcluster.abi.errno import Errno
from pvcluster.abi.platform import M2P_FRAME_BASE
from pvcluster.abi.xen import DOMID_SELF, Hypercall, MmuextCmd
from pvcluster.bus.effects import FlushTlb, Invlpg, SetCr3, SetVaPte, WriteMachine
from pvcluster.bus.messages import Region

REQS, DONE, OPS, MASK = 0x10000, 0x20000, 0x30000, 0x40000
UNOWNED = 5000  # alpha owns frames 0..1023; 1024 is its shared_info frame
PT, PT2, DATA = 0x100, 0x101, 0x200  # a page-table frame, a second one, and a data frame
P, RW, PSE = 0x1, 0x2, 0x80

_HV: weakref.WeakKeyDictionary[Domain, Any] = weakref.WeakKeyDictionary()


@pytest.fixture
def dom() -> Domain:
    hv = core()
    d = hv.create_domain(hv.spec.domains[0])
    assert (d.nr_pages, len(d.vcpus)) == (1024, 2)
    d.work_left = hv.work_budget  # as the clock sets it when a window opens
    _HV[d] = hv
    return d


def _call(dom: Domain, nr: int, args: list[int], regions: list[Region], vcpu: int = 0) -> Call:
    return make_call(_HV[dom], dom, nr, args, regions, vcpu=vcpu)


_handle = run_handler


_events = call_events


def _done(addr: int = DONE) -> Region:
    return Region(addr, 4, b"\0" * 4, True)


def _mask(bits: int, addr: int = MASK) -> Region:
    return Region(addr, 4, struct.pack("<I", bits), False)


def _denied(call: Call) -> list[str]:
    return [kw["reason"] for ev, kw in _events(call) if ev == "mmu.denied"]


def _writes(call: Call) -> list[tuple[int, int]]:
    return [(w.addr, struct.unpack("<I", w.data)[0]) for w in call.mem.writes]


def _wpa(addr: int, value: int) -> WriteMachine:
    return WriteMachine(addr=addr, data=struct.pack("<I", value))


def _flush(v: int) -> FlushTlb:
    return FlushTlb(vcpu=v)


def _invlpg(v: int, va: int) -> Invlpg:
    return Invlpg(vcpu=v, va=va)


# -- mmu_update ---------------------------------------------------------------------------------------------


def _mmu(dom: Domain, reqs: list[tuple[int, int]], *, foreign: int = DOMID_SELF, vcpu: int = 0) -> tuple[int, Call]:
    data = b"".join(struct.pack("<QQ", p, v) for p, v in reqs)
    regions = [Region(REQS, len(data), data, False), _done()]
    call = _call(dom, 1, [REQS, len(reqs), DONE, foreign], regions, vcpu=vcpu)
    return _handle(mmu_update, call), call


def test_mmu_normal_and_preserve_ad_updates_become_machine_writes_in_order(dom: Domain) -> None:
    pte0, pte1 = (PT << 12) + 4 * 3, (PT << 12) + 4 * 4
    rc, call = _mmu(dom, [(pte0 | 0, (DATA << 12) | P | RW), (pte1 | 2, (DATA << 12) | P)], vcpu=1)
    assert rc == 0
    assert call.effects == [_wpa(pte0, (DATA << 12) | P | RW), _wpa(pte1, (DATA << 12) | P)]
    assert _writes(call) == [(DONE, 2)]
    assert [ev for ev, _ in _events(call)] == ["mmu.update", "mmu.update"]


def test_mmu_pte_in_a_frame_the_domain_does_not_own_is_eperm(dom: Domain) -> None:
    for ptr in (UNOWNED << 12, 1024 << 12, 1 << 32 | PT << 12):  # foreign frame, shared_info, past 4 GiB
        rc, call = _mmu(dom, [(ptr, (DATA << 12) | P)])
        assert rc == -Errno.EPERM
        assert call.effects == [] and _writes(call) == [(DONE, 0)]
        assert _denied(call) == ["pte-frame-not-owned"]


def test_mmu_mapping_an_unowned_frame_is_eperm_unless_not_present(dom: Domain) -> None:
    pin_table(dom, PT, 1)
    rc, call = _mmu(dom, [(PT << 12, (UNOWNED << 12) | P)])
    assert rc == -Errno.EPERM and call.effects == []
    assert _denied(call) == ["maps-unowned-frame"]
    # A not-present entry maps nothing; its other bits are the guest's own (Linux keeps swap entries there).
    rc, call = _mmu(dom, [(PT << 12, UNOWNED << 12)])
    assert rc == 0 and call.effects == [_wpa(PT << 12, UNOWNED << 12)]


def test_mmu_shared_info_frame_may_be_mapped(dom: Domain) -> None:
    rc, call = _mmu(dom, [(PT << 12, (dom.nr_pages << 12) | P | RW)])
    assert rc == 0 and len(call.effects) == 1


def test_mmu_high_bits_of_val_are_einval(dom: Domain) -> None:
    rc, call = _mmu(dom, [(PT << 12, 1 << 32 | (DATA << 12) | P)])
    assert rc == -Errno.EINVAL and call.effects == []
    assert _denied(call) == ["pte-high-bits"]


def test_mmu_pinned_l1_may_not_map_a_pinned_table_writable(dom: Domain) -> None:
    pin_table(dom, PT, 1)
    pin_table(dom, PT2, 1)
    rc, call = _mmu(dom, [(PT << 12, (PT2 << 12) | P | RW)])
    assert rc == -Errno.EBUSY and call.effects == []  # get_page_from_l1e's could_not_pin
    assert _denied(call) == ["writable-pagetable"]
    rc, call = _mmu(dom, [(PT << 12, (PT2 << 12) | P)])  # read-only: how a PV guest sees its own tables
    assert rc == 0 and call.effects == [_wpa(PT << 12, (PT2 << 12) | P)]


def test_mmu_unpinned_frame_or_l2_entry_may_name_a_table_with_rw(dom: Domain) -> None:
    pin_table(dom, PT, 2)
    pin_table(dom, PT2, 1)
    # An L2 entry's RW bit governs the pages its L1 maps, not the L1 frame itself.
    rc, call = _mmu(dom, [(PT << 12, (PT2 << 12) | P | RW)])
    assert rc == 0
    # An unpinned frame is data to the hypervisor: what it holds is checked only once it is a table.
    rc, call = _mmu(dom, [(DATA << 12, (PT2 << 12) | P | RW)])
    assert rc == 0


def test_mmu_superpage_in_a_pinned_l2_is_einval(dom: Domain) -> None:
    pin_table(dom, PT, 2)
    rc, call = _mmu(dom, [(PT << 12, P | RW | PSE)])
    assert rc == -Errno.EINVAL and _denied(call) == ["superpage"]


def test_mmu_machphys_update_writes_the_m2p_entry_of_an_owned_frame(dom: Domain) -> None:
    # the m2p follows the domain's RAM and its hypervisor frames (pvcluster.abi.platform): one u32 per frame
    m2p = (dom.nr_pages + M2P_FRAME_BASE) << 12
    rc, call = _mmu(dom, [(DATA << 12 | 1, 0x1234)])
    assert rc == 0 and call.effects == [_wpa(m2p + 4 * DATA, 0x1234)] and _writes(call) == [(DONE, 1)]
    rc, call = _mmu(dom, [(UNOWNED << 12 | 1, DATA)])  # get_page_from_mfn fails: -EINVAL
    assert rc == -Errno.EINVAL and _denied(call) == ["machphys-frame-not-owned"] and call.effects == []


def test_mmu_unknown_command_is_enosys(dom: Domain) -> None:
    rc, call = _mmu(dom, [(PT << 12 | 3, 0)])
    assert rc == -Errno.ENOSYS and _denied(call) == ["unknown-cmd"]


def test_mmu_foreign_domid(dom: Domain) -> None:
    req = [(PT << 12, (DATA << 12) | P)]
    assert _mmu(dom, req, foreign=dom.domid)[0] == 0
    for other in (0, dom.domid + 1, 0x7FF2):
        rc, call = _mmu(dom, req, foreign=other)
        assert rc == -Errno.EPERM and call.effects == [] and _denied(call) == ["foreign-domid"]


def test_mmu_foreign_domid_still_writes_the_done_count(dom: Domain) -> None:
    rc, call = _mmu(dom, [(PT << 12, (DATA << 12) | P)], foreign=dom.domid + 1)
    assert rc == -Errno.EPERM and _writes(call) == [(DONE, 0)]


def test_mmu_partial_failure_reports_the_successful_prefix(dom: Domain) -> None:
    pin_table(dom, PT, 1)
    ok = (DATA << 12) | P
    rc, call = _mmu(dom, [(PT << 12, ok), (PT << 12 | 4, ok), (PT << 12 | 8, (UNOWNED << 12) | P), (PT << 12 | 12, ok)])
    assert rc == -Errno.EPERM
    assert call.effects == [_wpa(PT << 12, ok), _wpa(PT << 12 | 4, ok)]
    assert _writes(call) == [(DONE, 2)]


def test_mmu_batch_has_no_size_limit_and_faults(dom: Domain) -> None:
    # No E2BIG (Xen has no cap): a batch past the old 512-request limit runs whole when it was copied in and the
    # work budget allows (longer ones continue: tests/test_continuations.py).
    ok = (DATA << 12) | P
    rc, call = _mmu(dom, [((PT << 12) + 4 * (i % 1024), ok) for i in range(513)])
    assert (rc, len(call.effects), _writes(call), call.continuation) == (0, 513, [(DONE, 513)], None)
    # The first request always comes with the trap: a batch with nothing copied in cannot run, and says so to its
    # caller (a multicall continues at that entry; trap.apply answers -EFAULT).
    call = _call(dom, 1, [REQS, 513, DONE, DOMID_SELF], [_done()])
    with pytest.raises(NotCopied):
        _handle(mmu_update, call)
    assert call.effects == [] and call.continuation is None
    call = _call(dom, 1, [REQS, 1, DONE, DOMID_SELF], [Region(REQS, 16, None, False), _done()])
    assert _handle(mmu_update, call) == -Errno.EFAULT and _denied(call) == ["request-unmapped"]
    # No done pointer: nothing is written back. An empty batch succeeds.
    call = _call(dom, 1, [REQS, 0, 0, DOMID_SELF], [])
    assert _handle(mmu_update, call) == 0 and call.mem.writes == []
    # A done pointer the guest cannot receive does not undo the updates (as in Xen).
    data = struct.pack("<QQ", PT << 12, (DATA << 12) | P)
    call = _call(
        dom, 1, [REQS, 1, DONE, DOMID_SELF], [Region(REQS, 16, data, False), Region(DONE, 4, b"\0" * 4, False)]
    )
    assert _handle(mmu_update, call) == 0 and len(call.effects) == 1 and call.mem.writes == []


def test_mmu_copy_in() -> None:
    def nothing(addr: int, length: int) -> bytes | None:
        return None  # the requests are read only to name the frames they may make L1s

    def spans(args: list[int]) -> list[Span]:
        return copy_in(Hypercall.mmu_update, args, nothing)

    assert spans([REQS, 3, DONE, DOMID_SELF]) == [Span(REQS, 48), Span(DONE, 4, True)]
    assert spans([REQS, 3, 0, DOMID_SELF]) == [Span(REQS, 48)]
    # a long batch copies a prefix of MAX_BATCH_COPY requests (it used to copy none: E2BIG); a continuation's count
    # carries MMU_UPDATE_PREEMPTED, which is not part of the count
    assert MAX_BATCH_COPY == 512
    assert spans([REQS, 513, DONE, DOMID_SELF]) == [Span(REQS, 512 * 16), Span(DONE, 4, True)]
    assert spans([REQS, 3 | xen.MMU_UPDATE_PREEMPTED, DONE, DOMID_SELF]) == [Span(REQS, 48), Span(DONE, 4, True)]
    assert spans([REQS, 0, 0, DOMID_SELF]) == []


# -- update_va_mapping --------------------------------------------------------------------------------------

VA = 0xC0123000


def _uvm(
    dom: Domain, pte: int, flags: int, *, hi: int = 0, regions: list[Region] | None = None, vcpu: int = 0
) -> tuple[int, Call]:
    call = _call(dom, 14, [VA, pte, hi, flags], regions or [], vcpu=vcpu)
    return _handle(update_va_mapping, call), call


def _set(value: int, vcpu: int = 0) -> SetVaPte:
    return SetVaPte(vcpu=vcpu, va=VA, value=value)


def test_uvm_local_scopes(dom: Domain) -> None:
    pte = (DATA << 12) | P | RW
    rc, call = _uvm(dom, pte, 0, vcpu=1)
    assert rc == 0 and call.effects == [_set(pte, 1)]
    rc, call = _uvm(dom, pte, 1, vcpu=1)
    assert rc == 0 and call.effects == [_set(pte, 1), _flush(1)]
    rc, call = _uvm(dom, pte, 2, vcpu=1)
    assert rc == 0 and call.effects == [_set(pte, 1), _invlpg(1, VA)]


def test_uvm_all_scope(dom: Domain) -> None:
    rc, call = _uvm(dom, 0, 4 | 2, vcpu=1)
    assert rc == 0 and call.effects == [_set(0, 1), _invlpg(0, VA), _invlpg(1, VA)]
    rc, call = _uvm(dom, 0, 4 | 1)
    assert rc == 0 and call.effects == [_set(0), _flush(0), _flush(1)]


def test_uvm_multi_scope_reads_the_bitmap(dom: Domain) -> None:
    rc, call = _uvm(dom, 0, MASK | 2, regions=[_mask(0b10)])
    assert rc == 0 and call.effects == [_set(0), _invlpg(1, VA)]
    # Xen takes the pointer as flags & ~3: a 4-aligned bitmap at ...4 is MULTI, not ALL.
    rc, call = _uvm(dom, 0, (MASK + 4) | 1, regions=[_mask(0b01, MASK + 4)])
    assert rc == 0 and call.effects == [_set(0), _flush(0)]


def test_uvm_multi_scope_failures_change_nothing(dom: Domain) -> None:
    rc, call = _uvm(dom, 0, MASK | 1, regions=[_mask(1 << 7)])
    assert rc == -Errno.EINVAL and call.effects == []
    assert _denied(call) == ["vcpumask-bad-vcpu"]
    rc, call = _uvm(dom, 0, MASK | 1, regions=[Region(MASK, 4, None, False)])
    assert rc == -Errno.EFAULT and call.effects == []
    assert _denied(call) == ["vcpumask-unmapped"]


def test_uvm_entry_checks(dom: Domain) -> None:
    rc, call = _uvm(dom, (DATA << 12) | P, 0, hi=1)
    assert rc == -Errno.EINVAL and _denied(call) == ["pte-high-bits"]
    rc, call = _uvm(dom, (DATA << 12) | P, 3)
    assert rc == -Errno.EINVAL and _denied(call) == ["bad-flush-type"]
    rc, call = _uvm(dom, (UNOWNED << 12) | P, 0)
    assert rc == -Errno.EPERM and _denied(call) == ["maps-unowned-frame"]
    rc, call = _uvm(dom, UNOWNED << 12, 0)  # not present: maps nothing
    assert rc == 0 and call.effects == [_set(UNOWNED << 12)]
    pin_table(dom, PT, 1)
    rc, call = _uvm(dom, (PT << 12) | P | RW, 0)
    assert rc == -Errno.EBUSY and _denied(call) == ["writable-pagetable"]
    rc, call = _uvm(dom, (PT << 12) | P, 0)
    assert rc == 0 and call.effects == [_set((PT << 12) | P)]


def test_uvm_copy_in() -> None:
    def nothing(addr: int, length: int) -> bytes | None:
        raise AssertionError("update_va_mapping needs no second level")

    # first, always, the translation of va alone (no bytes): which L1 entry the call writes, so that a later
    # multicall entry whose buffers it remaps is not run on a stale copy (hypervisor/guestmem.py)
    walk = Span(VA, 0)
    assert copy_in(Hypercall.update_va_mapping, [VA, 0, 0, MASK | 2], nothing) == [walk, Span(MASK, 4)]
    assert copy_in(Hypercall.update_va_mapping, [VA, 0, 0, (MASK + 4) | 1], nothing) == [walk, Span(MASK + 4, 4)]
    for flags in (0, 1, 2, 4 | 1, 4 | 2, MASK | 0, MASK | 3):  # local, all, no flush, or a bad flush type
        assert copy_in(Hypercall.update_va_mapping, [VA, 0, 0, flags], nothing) == [walk]


# -- mmuext_op ----------------------------------------------------------------------------------------------


def _ext(
    dom: Domain,
    ops: list[tuple[int, int, int]],
    *,
    extra: list[Region] | None = None,
    foreign: int = DOMID_SELF,
    vcpu: int = 0,
) -> tuple[int, Call]:
    data = b"".join(struct.pack("<3I", *op) for op in ops)
    # the frames a pin or a new base validates come with the trap, empty tables unless ``extra`` has them
    given = {r.addr for r in extra or [] if r.machine}
    tables = [Region(arg1 << 12, 4096, bytes(4096), False, machine=True) for cmd, arg1, _ in ops
              if cmd in (0, 1, 5) and arg1 << 12 not in given]
    regions = [Region(OPS, len(data), data, False), _done(), *(extra or []), *tables]
    call = _call(dom, 26, [OPS, len(ops), DONE, foreign], regions, vcpu=vcpu)
    return _handle(mmuext_op, call), call


def test_ext_pin_and_unpin(dom: Domain) -> None:
    rc, call = _ext(dom, [(0, PT, 0), (1, PT2, 0)])
    assert rc == 0 and call.effects == [] and _writes(call) == [(DONE, 2)]
    assert (dom.frames.level(PT), dom.frames.level(PT2)) == (1, 2)
    rc, call = _ext(dom, [(1, PT, 0)])  # one type at a time: get_page_type fails
    assert rc == -Errno.EINVAL and _denied(call) == ["l1-frame-not-l2"]
    rc, call = _ext(dom, [(0, PT, 0)])
    assert rc == -Errno.EINVAL and _denied(call) == ["already-pinned"]
    assert dom.frames.level(PT) == 1  # a refused double pin leaves the first one alone
    rc, call = _ext(dom, [(4, PT, 0), (4, PT2, 0)])
    assert rc == 0 and not dom.frames.is_pinned(PT) and not dom.frames.is_pinned(PT2)
    rc, call = _ext(dom, [(4, PT, 0)])
    assert rc == -Errno.EINVAL and _denied(call) == ["not-pinned"]


def test_ext_pin_failures(dom: Domain) -> None:
    for cmd in (0, 1):
        rc, call = _ext(dom, [(cmd, UNOWNED, 0)])
        assert rc == -Errno.EPERM and _denied(call) == ["pin-frame-not-owned"]
    rc, call = _ext(dom, [(0, dom.nr_pages, 0)])  # shared_info may be mapped, never pinned
    assert rc == -Errno.EPERM
    for cmd in (2, 3):
        rc, call = _ext(dom, [(cmd, PT, 0)])
        assert rc == -Errno.EINVAL and _denied(call) == ["no-such-level"]
    assert not dom.frames.is_pinned(PT)


def test_ext_new_baseptr(dom: Domain) -> None:
    rc, call = _ext(dom, [(5, PT, 0)], vcpu=1)
    assert rc == 0
    assert call.effects == [SetCr3(vcpu=1, cr3=PT << 12)]
    rc, call = _ext(dom, [(5, UNOWNED, 0)])
    assert rc == -Errno.EPERM and call.effects == []
    assert _denied(call) == ["baseptr-not-owned"]


def test_ext_local_and_all_flushes(dom: Domain) -> None:
    rc, call = _ext(dom, [(6, 0, 0), (7, VA, 0), (10, 0, 0), (11, VA, 0)], vcpu=1)
    assert rc == 0 and _writes(call) == [(DONE, 4)]
    assert call.effects == [_flush(1), _invlpg(1, VA), _flush(0), _flush(1), _invlpg(0, VA), _invlpg(1, VA)]
    assert [kw["targets"] for ev, kw in _events(call) if ev == "mmuext"] == [[1], [1], [0, 1], [0, 1]]
    assert [kw["cmd"] for ev, kw in _events(call)] == [
        "TLB_FLUSH_LOCAL",
        "INVLPG_LOCAL",
        "TLB_FLUSH_ALL",
        "INVLPG_ALL",
    ]


def test_ext_multi_flushes(dom: Domain) -> None:
    other = MASK + 0x100
    rc, call = _ext(dom, [(8, 0, MASK), (9, VA, other)], extra=[_mask(0b11), _mask(0b10, other)])
    assert rc == 0
    assert call.effects == [_flush(0), _flush(1), _invlpg(1, VA)]
    rc, call = _ext(dom, [(9, VA, MASK)], extra=[_mask(1 << 7)])
    assert rc == -Errno.EINVAL and call.effects == []
    assert _denied(call) == ["vcpumask-bad-vcpu"]
    rc, call = _ext(dom, [(8, 0, MASK)], extra=[Region(MASK, 4, None, False)])
    assert rc == -Errno.EFAULT and call.effects == []
    assert _denied(call) == ["vcpumask-unmapped"]


def test_ext_set_ldt_and_unknown(dom: Domain) -> None:
    for cmd in (MmuextCmd.SET_LDT, 14, 99):
        rc, call = _ext(dom, [(cmd, VA, 16)])
        assert rc == -Errno.ENOSYS and _denied(call) == ["unsupported-cmd"]


def test_ext_foreign_domid_long_batch_and_fault(dom: Domain) -> None:
    assert _ext(dom, [(6, 0, 0)], foreign=dom.domid)[0] == 0
    rc, call = _ext(dom, [(0, PT, 0)], foreign=dom.domid + 1)
    assert rc == -Errno.EPERM and _denied(call) == ["foreign-domid"]
    # as Xen's do_mmuext_op: refused before any op runs, and the done count is left alone (it used to be written 0)
    assert not dom.frames.is_pinned(PT) and _writes(call) == []
    # no E2BIG: a batch past the old 512-op limit runs whole when it was copied in and the budget allows
    rc, call = _ext(dom, [(6, 0, 0)] * 513)
    assert (rc, len(call.effects), _writes(call), call.continuation) == (0, 513, [(DONE, 513)], None)
    call = _call(dom, 26, [OPS, 513, DONE, DOMID_SELF], [_done()])  # the first op was not copied in
    with pytest.raises(NotCopied):
        _handle(mmuext_op, call)
    assert call.effects == [] and call.continuation is None
    call = _call(dom, 26, [OPS, 1, DONE, DOMID_SELF], [Region(OPS, 12, None, False), _done()])
    assert _handle(mmuext_op, call) == -Errno.EFAULT and _denied(call) == ["op-unmapped"]


def test_ext_partial_failure_keeps_the_prefix(dom: Domain) -> None:
    rc, call = _ext(dom, [(0, PT, 0), (6, 0, 0), (0, PT, 0), (6, 0, 0)])
    assert rc == -Errno.EINVAL
    assert call.effects == [_flush(0)] and _writes(call) == [(DONE, 2)]
    assert dom.frames.is_pinned(PT)  # ops before the refusal took effect


def test_ext_copy_in_names_bitmaps_from_the_op_array() -> None:
    other = MASK + 0x100
    ops = b"".join(struct.pack("<3I", *op) for op in [(8, 0, MASK), (0, PT, other), (9, VA, other), (9, VA, MASK)])
    seen: list[tuple[int, int]] = []

    def read(addr: int, length: int) -> bytes | None:
        seen.append((addr, length))
        return ops if (addr, length) == (OPS, len(ops)) else None

    spans = copy_in(Hypercall.mmuext_op, [OPS, 4, DONE, DOMID_SELF], read)
    # PIN's arg2 is not a pointer; the bitmap shared by two ops is named once.
    assert spans == [Span(OPS, 48), Span(DONE, 4, True), Span(MASK, 4), Span(PT << 12, 4096, machine=True),
                     Span(other, 4)]
    assert seen == [(OPS, 48)]

    def unmapped(addr: int, length: int) -> bytes | None:
        return None

    assert copy_in(Hypercall.mmuext_op, [OPS, 4, 0, DOMID_SELF], unmapped) == [Span(OPS, 48)]
    # a long batch copies a prefix (it used to copy nothing: E2BIG)
    assert copy_in(Hypercall.mmuext_op, [OPS, 513, DONE, DOMID_SELF], unmapped) == [Span(OPS, 512 * 12),
                                                                                    Span(DONE, 4, True)]


# -- mm helpers and the ABI ---------------------------------------------------------------------------------


def test_a_domains_pins_go_when_its_process_exits(dom: Domain) -> None:
    pin_table(dom, PT, 1)
    assert dom.frames.is_pinned(PT)
    _HV[dom].process_exited(dom, 0)
    assert not dom.frames.is_pinned(PT) and dom.frames.type_of(PT) is PageType.NONE


def test_struct_sizes_are_the_ones_the_domain_process_copies() -> None:
    assert (layouts.MMU_UPDATE.size, layouts.MMUEXT_OP.size) == (16, 12)
    assert mm.MMU_UPDATE_PREEMPTED == xen.MMU_UPDATE_PREEMPTED == 0x80000000


HEADERS = Path("/usr/include/xen/xen.h")


@pytest.mark.skipif(not HEADERS.exists(), reason="Xen headers (libxen-dev) not installed")
def test_command_numbers_match_xen_headers() -> None:
    # Plain numbers (MMU_*, MMUEXT_*) and the UVMF_* form "(xen_mk_ulong(N)<<S)".
    defines: dict[str, int] = {}
    for m in re.finditer(r"^#define\s+(\w+)\s+(?:(\d+)\b|\(xen_mk_ulong\((\d+)\)<<(\d+)\))", HEADERS.read_text(), re.M):
        defines[m[1]] = int(m[2]) if m[2] is not None else int(m[3]) << int(m[4])
    for c in mmu_update.MmuCmd:
        assert defines[f"MMU_{c.name}"] == c
    for e in mmuext_op.MmuextCmd:
        assert defines[f"MMUEXT_{e.name}"] == e
    for name in ("UVMF_NONE", "UVMF_TLB_FLUSH", "UVMF_INVLPG", "UVMF_FLUSHTYPE_MASK", "UVMF_LOCAL", "UVMF_ALL"):
        assert defines[name] == getattr(xen, name), name


def test_ext_flush_cache_needs_privilege_no_domain_has(dom: Domain) -> None:
    rc, call = _ext(dom, [(MmuextCmd.FLUSH_CACHE, 0, 0)])
    assert rc == -Errno.EACCES and _denied(call) == ["cache-flush-not-permitted"] and _writes(call) == [(DONE, 0)]
