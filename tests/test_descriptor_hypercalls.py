"""Unit tests of the descriptor-table and CPU-state hypercalls: set_gdt (2), stack_switch (3), fpu_taskswitch (5),
update_descriptor (10) and vm_assist (21), each run on a real Domain of an in-process hypervisor core (alpha: 4 MiB
= 1024 frames, 2 vCPUs) with hand-made guest regions, against Xen 4.17's behaviour for a 32-bit PV guest.
"""

from __future__ import annotations

import struct
import weakref
from typing import Any

import pytest
from helpers import call_events, core, make_call, pin_table, run_handler

from hypervisor.descriptors import check_descriptor
from hypervisor.domain import Domain
from hypervisor.hypercalls import (
    dispatch,
    fpu_taskswitch,
    mmu_update,
    mmuext_op,
    set_gdt,
    stack_switch,
    update_descriptor,
    update_va_mapping,
    vm_assist,
)
from hypervisor.hypercalls.base import Call
from pvcluster.abi.copyin import Span, copy_in
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import (
    DOMID_SELF,
    FIRST_RESERVED_GDT_ENTRY,
    PV32_VM_ASSIST_MASK,
    Hypercall,
    MmuextCmd,
    VMASST_CMD_disable,
    VMASST_CMD_enable,
    VMASST_TYPE_4gb_segments,
    VMASST_TYPE_m2p_strict,
    VMASST_TYPE_runstate_update_flag,
    VMASST_TYPE_writable_pagetables,
)
from pvcluster.bus.effects import FlushTlb, SetGdt, SetKernelStack, SetTs, WriteMachine
from pvcluster.bus.messages import Region

LIST, OPS, DONE = 0x10000, 0x20000, 0x30000
GDT, GDT2, PT, UNOWNED = 0x200, 0x201, 0x100, 5000
P, RW = 0x1, 0x2
# Flat 4 GiB descriptors (base 0, limit 0xFFFFF pages): code and data at DPL 0, 1 and 3.
CODE0, DATA0 = 0x00CF9A000000FFFF, 0x00CF92000000FFFF
CODE1, DATA1 = 0x00CFBA000000FFFF, 0x00CFB2000000FFFF
DATA3 = 0x00CFF2000000FFFF

_HV: weakref.WeakKeyDictionary[Domain, Any] = weakref.WeakKeyDictionary()


@pytest.fixture
def dom() -> Domain:
    hv = core()
    d = hv.create_domain(hv.spec.domains[0])
    assert (d.nr_pages, len(d.vcpus)) == (1024, 2)
    d.work_left = hv.work_budget
    _HV[d] = hv
    return d


def _call(dom: Domain, nr: int, args: list[int], regions: list[Region] | None = None, vcpu: int = 0) -> Call:
    return make_call(_HV[dom], dom, nr, args, regions or [], vcpu=vcpu)


def _denied(call: Call) -> list[str]:
    return [kw["reason"] for ev, kw in call_events(call) if ev == "mmu.denied"]


def _gate(selector: int, offset: int, dpl: int, params: int = 0) -> int:
    """A 32-bit call gate: present, type 0xC, ``params`` dwords copied."""
    lo = (selector << 16) | (offset & 0xFFFF)
    hi = (offset & 0xFFFF0000) | 0x8000 | dpl << 13 | 0xC << 8 | params
    return hi << 32 | lo


# -- check_descriptor -----------------------------------------------------------------------------------------


def test_check_descriptor_raises_a_ring0_dpl_to_ring1_and_keeps_the_rest() -> None:
    assert check_descriptor(CODE0) == CODE1  # __fixup_guest_selector: DPL 0 becomes the guest kernel's 1
    assert check_descriptor(DATA0) == DATA1
    assert check_descriptor(DATA3) == DATA3
    assert check_descriptor(CODE0 & ~(1 << 47)) == CODE0 & ~(1 << 47)  # not present: always faults, kept as is
    assert check_descriptor(0) == 0


def test_check_descriptor_refuses_system_descriptors_but_call_gates_and_64bit_code() -> None:
    tss = 0x0000890000000067 | 1 << 47
    ldt = 0x0000820000000067 | 1 << 47
    intr = _gate(0x08, 0x1000, 0) & ~(0xF << 40) | 0xE << 40
    trap = _gate(0x08, 0x1000, 0) & ~(0xF << 40) | 0xF << 40
    assert [check_descriptor(d) for d in (tss, ldt, intr, trap, CODE0 | 1 << 53)] == [None] * 5
    assert check_descriptor(0x0000800000000000) == 0x0000800000000000  # type 0: a 64-bit gate's second half


def test_check_descriptor_call_gate_gets_dpl0_with_the_guest_dpl_in_its_selector() -> None:
    checked = check_descriptor(_gate(0x60, 0xC0101234, 3, params=2))
    assert checked == _gate(0x63, 0xC0101234, 0, params=2)
    assert check_descriptor(_gate(0x60, 0xC0101234, 0)) == _gate(0x61, 0xC0101234, 0)  # DPL 0 -> 1 first
    assert check_descriptor(_gate(0xE019, 0x1000, 1)) == _gate(0xE019, 0x1000, 0)  # FLAT_RING1_CS is allowed
    assert check_descriptor(_gate(FIRST_RESERVED_GDT_ENTRY << 3, 0x1000, 1)) is None  # Xen's own entries
    assert check_descriptor(_gate(FIRST_RESERVED_GDT_ENTRY << 3 | 4, 0x1000, 1)) is not None  # an LDT selector
    assert check_descriptor(_gate(0x60, 0x1000, 1, params=0x20)) is None  # reserved bits 5-7


def test_check_descriptor_widens_a_flat_segment_that_reaches_the_hypervisor_hole() -> None:
    limit_hole = 0x00CFB2000000FBFF  # base 0, 0xFBFFF pages: past 0xFC000000 by one page
    assert check_descriptor(limit_hole) == DATA1
    short = 0x00C0B2000000FFFF  # base 0, 64 Ki pages: left alone
    assert check_descriptor(short) == short


# -- update_descriptor ------------------------------------------------------------------------------------------


def _upd(dom: Domain, pa: int, desc: int) -> tuple[int, Call]:
    call = _call(dom, Hypercall.update_descriptor, [pa & 0xFFFFFFFF, pa >> 32, desc & 0xFFFFFFFF, desc >> 32])
    return run_handler(update_descriptor, call), call


def test_update_descriptor_writes_the_checked_descriptor_to_the_machine_address(dom: Domain) -> None:
    rc, call = _upd(dom, GDT << 12 | 0x18, CODE0)
    assert rc == 0
    assert call.effects == [WriteMachine(addr=GDT << 12 | 0x18, data=struct.pack("<Q", CODE1))]
    rc, call = _upd(dom, GDT << 12 | 0x20, DATA3)
    assert rc == 0 and call.effects == [WriteMachine(addr=GDT << 12 | 0x20, data=struct.pack("<Q", DATA3))]


@pytest.mark.parametrize(("pa", "desc", "reason"), [
    (GDT << 12 | 0x1C, DATA1, "desc-misaligned"),
    (UNOWNED << 12, DATA1, "desc-frame-not-owned"),
    (1024 << 12, DATA1, "desc-frame-not-owned"),  # shared_info: the hypervisor's frame
    (1 << 32 | GDT << 12, DATA1, "desc-frame-not-owned"),  # past 4 GiB
    (GDT << 12, 0x0000890000000067 | 1 << 47, "desc-refused"),  # a TSS
    (GDT << 12, CODE0 | 1 << 53, "desc-refused"),  # 64-bit code
])
def test_update_descriptor_refusals_are_einval(dom: Domain, pa: int, desc: int, reason: str) -> None:
    rc, call = _upd(dom, pa, desc)
    assert rc == -Errno.EINVAL and call.effects == [] and _denied(call) == [reason]


def test_update_descriptor_into_a_pinned_page_table_is_einval(dom: Domain) -> None:
    pin_table(dom, PT, 1)
    rc, call = _upd(dom, PT << 12, DATA1)
    assert rc == -Errno.EINVAL and _denied(call) == ["desc-frame-is-pagetable"]


# -- set_gdt ----------------------------------------------------------------------------------------------------


def _gdt(dom: Domain, frames: list[int], entries: int, vcpu: int = 0) -> tuple[int, Call]:
    data = b"".join(struct.pack("<I", f) for f in frames)
    call = _call(dom, Hypercall.set_gdt, [LIST, entries], [Region(LIST, len(data), data, False)], vcpu=vcpu)
    return run_handler(set_gdt, call), call


def test_set_gdt_records_the_frames_types_them_and_tells_the_domain(dom: Domain) -> None:
    rc, call = _gdt(dom, [GDT, GDT2], 600, vcpu=1)
    assert rc == 0
    assert call.effects == [SetGdt(vcpu=1, frames=[GDT, GDT2], entries=600), FlushTlb(vcpu=1)]
    assert (dom.vcpus[1].gdt_frames, dom.vcpus[1].gdt_ents) == ((GDT, GDT2), 600)
    assert dom.frames.is_seg_desc(GDT) and dom.frames.is_seg_desc(GDT2)
    # a new GDT releases the old frames
    rc, call = _gdt(dom, [GDT2], 8, vcpu=1)
    assert rc == 0 and not dom.frames.is_seg_desc(GDT) and dom.frames.is_seg_desc(GDT2)


def test_set_gdt_reads_only_the_frames_its_entries_span(dom: Domain) -> None:
    assert copy_in(Hypercall.set_gdt, [LIST, 513], lambda a, n: None) == [Span(LIST, 8)]
    assert copy_in(Hypercall.set_gdt, [LIST, FIRST_RESERVED_GDT_ENTRY], lambda a, n: None) == [Span(LIST, 4 * 14)]
    assert copy_in(Hypercall.set_gdt, [LIST, FIRST_RESERVED_GDT_ENTRY + 1], lambda a, n: None) == []
    assert copy_in(Hypercall.set_gdt, [LIST, 0], lambda a, n: None) == []


@pytest.mark.parametrize(("frames", "entries", "errno", "reason"), [
    ([GDT] * 15, FIRST_RESERVED_GDT_ENTRY + 1, Errno.EINVAL, "gdt-too-many-entries"),
    ([UNOWNED], 16, Errno.EINVAL, "gdt-frame-not-owned"),
    ([1024], 16, Errno.EINVAL, "gdt-frame-not-owned"),  # shared_info
    ([GDT, UNOWNED], 513, Errno.EINVAL, "gdt-frame-not-owned"),
])
def test_set_gdt_refusals(dom: Domain, frames: list[int], entries: int, errno: Errno, reason: str) -> None:
    rc, call = _gdt(dom, frames, entries)
    assert rc == -errno and call.effects == [] and _denied(call) == [reason]
    assert not any(dom.frames.is_seg_desc(f) for f in frames) and dom.vcpus[0].gdt_frames == ()


def test_set_gdt_of_a_pinned_page_table_is_einval_and_an_unreadable_list_efault(dom: Domain) -> None:
    pin_table(dom, PT, 1)
    rc, call = _gdt(dom, [PT], 16)
    assert rc == -Errno.EINVAL and _denied(call) == ["gdt-frame-is-pagetable"]
    call = _call(dom, Hypercall.set_gdt, [LIST, 16], [Region(LIST, 4, None, False)])
    assert run_handler(set_gdt, call) == -Errno.EFAULT


def test_a_gdt_frame_can_be_neither_mapped_writable_nor_pinned(dom: Domain) -> None:
    assert _gdt(dom, [GDT], 16)[0] == 0
    call = _call(dom, Hypercall.update_va_mapping, [0xC0200000, GDT << 12 | P | RW, 0, 0])
    # get_page_from_l1e's could_not_pin: -EBUSY
    assert run_handler(update_va_mapping, call) == -Errno.EBUSY and _denied(call) == ["writable-descriptor-table"]
    call = _call(dom, Hypercall.update_va_mapping, [0xC0200000, GDT << 12 | P, 0, 0])
    assert run_handler(update_va_mapping, call) == 0  # read-only is how a PV guest sees its GDT
    pin_table(dom, PT, 1)
    data = struct.pack("<QQ", PT << 12, GDT << 12 | P | RW)
    call = _call(dom, Hypercall.mmu_update, [LIST, 1, 0, DOMID_SELF], [Region(LIST, 16, data, False)])
    assert run_handler(mmu_update, call) == -Errno.EBUSY and _denied(call) == ["writable-descriptor-table"]
    op = struct.pack("<3I", MmuextCmd.PIN_L1_TABLE, GDT, 0)
    table = Region(GDT << 12, 4096, bytes(4096), False, machine=True)
    call = _call(dom, Hypercall.mmuext_op, [OPS, 1, 0, DOMID_SELF], [Region(OPS, 12, op, False), table])
    assert run_handler(mmuext_op, call) == -Errno.EINVAL and _denied(call) == ["seg_desc-frame-not-l1"]


def test_update_descriptor_into_a_gdt_frame_is_allowed(dom: Domain) -> None:
    assert _gdt(dom, [GDT], 16)[0] == 0
    rc, call = _upd(dom, GDT << 12 | 8, DATA0)
    assert rc == 0 and call.effects == [WriteMachine(addr=GDT << 12 | 8, data=struct.pack("<Q", DATA1))]


# -- stack_switch, fpu_taskswitch ------------------------------------------------------------------------------


@pytest.mark.parametrize(("ss", "kernel_ss"), [(0x21, 0x21), (0x20, 0x21), (0x23, 0x23), (0xE021, 0xE021)])
def test_stack_switch_records_the_stack_with_its_rpl_raised_to_ring1(dom: Domain, ss: int, kernel_ss: int) -> None:
    call = _call(dom, Hypercall.stack_switch, [ss, 0xC0123FF0], vcpu=1)
    assert run_handler(stack_switch, call) == 0
    assert call.effects == [SetKernelStack(vcpu=1, ss=kernel_ss, esp=0xC0123FF0)]
    assert (dom.vcpus[1].kernel_ss, dom.vcpus[1].kernel_sp) == (kernel_ss, 0xC0123FF0)


def test_fpu_taskswitch_sets_and_clears_ts(dom: Domain) -> None:
    for arg, ts in ((1, True), (0, False), (0xFFFFFFFF, True)):  # any non-zero `set` sets it
        call = _call(dom, Hypercall.fpu_taskswitch, [arg], vcpu=1)
        assert run_handler(fpu_taskswitch, call) == 0
        assert call.effects == [SetTs(vcpu=1, ts=ts)] and dom.vcpus[1].cr0_ts is ts


# -- vm_assist --------------------------------------------------------------------------------------------------


def _assist(dom: Domain, cmd: int, kind: int) -> int:
    return run_handler(vm_assist, _call(dom, Hypercall.vm_assist, [cmd, kind]))


def test_vm_assist_enables_and_disables_the_pv32_assists(dom: Domain) -> None:
    assert _assist(dom, VMASST_CMD_enable, VMASST_TYPE_writable_pagetables) == 0
    assert _assist(dom, VMASST_CMD_enable, VMASST_TYPE_4gb_segments) == 0
    assert dom.vm_assist == 1 << VMASST_TYPE_writable_pagetables | 1 << VMASST_TYPE_4gb_segments
    assert _assist(dom, VMASST_CMD_disable, VMASST_TYPE_4gb_segments) == 0
    assert dom.vm_assist == 1 << VMASST_TYPE_writable_pagetables
    assert all(_assist(dom, VMASST_CMD_enable, t) == 0 for t in range(VMASST_TYPE_runstate_update_flag + 1))
    assert dom.vm_assist == PV32_VM_ASSIST_MASK


@pytest.mark.parametrize(("cmd", "kind", "errno"), [
    (VMASST_CMD_enable, VMASST_TYPE_m2p_strict, Errno.EINVAL),  # 64-bit guests only
    (VMASST_CMD_enable, 6, Errno.EINVAL),
    (VMASST_CMD_enable, 64, Errno.EINVAL),
    (VMASST_CMD_enable, 0xFFFFFFFF, Errno.EINVAL),
    (2, VMASST_TYPE_writable_pagetables, Errno.ENOSYS),
    (2, VMASST_TYPE_m2p_strict, Errno.EINVAL),  # the type is checked first
])
def test_vm_assist_refusals(dom: Domain, cmd: int, kind: int, errno: Errno) -> None:
    assert _assist(dom, cmd, kind) == -errno and dom.vm_assist == 0


def test_the_new_families_are_dispatched(dom: Domain) -> None:
    call = _call(dom, Hypercall.vm_assist, [VMASST_CMD_enable, VMASST_TYPE_writable_pagetables])
    assert dispatch(call) == 0
    call = _call(dom, Hypercall.fpu_taskswitch, [1])
    assert dispatch(call) == 0 and call.effects == [SetTs(vcpu=0, ts=True)]
