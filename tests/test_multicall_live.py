"""A multicall runs its entries one after another against live guest memory, as Xen's do_multicall does
(xen/common/multicall.c): each entry is copied from the guest after the entries before it have written theirs back
(a done count, an event channel's out port, a result field) and after their page-table writes.

The in-process tests drive a real domain-side guest (``domains.runtime.DomainProcess``: its RAM, one vCPU over the
builder's page tables, its copy-in and its write-back of results and effects) against a real hypervisor domain,
trap after trap, exactly as across the bus: each trap's regions are what the domain process copies in, and its
writes and effects land in guest memory before the next trap (a continuation's). The slow test boots a C guest
built against Xen's public headers that issues such a dependent multicall and checks the results itself.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from cguest import C_ELFNOTE, C_HYPERCALLS, C_PUT, build_guest, c_entry, c_xen_notes
from helpers import RecordingLog, call_events, core, make_call, run_handler

from domains.memory import GuestRam
from domains.paging import build_initial_tables, initial_mappings, read_virt
from domains.runtime import DomainProcess
from domains.vcpu import InsnCounter, Vcpu, flat_gdt
from hypervisor import hypercalls, ptops
from hypervisor.domain import Domain
from hypervisor.evtchn import PortState
from hypervisor.guestmem import GuestView, NotCopied
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno, as_signed
from pvcluster.abi.x86 import PTE_ACCESSED, PTE_DIRTY, PTE_PRESENT, PTE_RW, PTE_USER
from pvcluster.abi.xen import (
    DOMID_SELF,
    MMU_UPDATE_PREEMPTED,
    PAGE_SIZE,
    UVMF_INVLPG,
    ConsoleIO,
    EvtchnOp,
    Hypercall,
    MmuextCmd,
    XenVer,
)
from pvcluster.bus.effects import SetPending, SetVaPte, WriteMachine
from pvcluster.bus.messages import HypercallResult, Region
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

BASE = 0xC0000000
TABLES = 0x100000  # the builder's L2 here, its two L1 tables in the next frames
L1 = TABLES + PAGE_SIZE  # maps [BASE, BASE + 4 MiB)
ENT, REQS, DONE, TEXT, EVT = (BASE + off for off in (0x10000, 0x20000, 0x21000, 0x22000, 0x23000))
WINDOW = BASE + 0x200000  # a page the multicalls remap; frames 0x200.. hold what each mapping shows
STALE, FRESH, AGAIN = 0x200, 0x201, 0x202
SCRATCH = 0x300  # frames from here: targets of harmless updates
NEW_L1 = 0x3F0  # an L1 table for a 4 MiB region the builder did not map
FAR = 0x40000000  # in that region
PTE = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY
PDE = PTE_PRESENT | PTE_RW | PTE_USER | PTE_ACCESSED
UNTOUCHED = 0xA5A5A5A5
U32 = 0xFFFFFFFF


def _pte_at(va: int) -> int:
    """The machine address of the L1 entry that maps ``va`` (in the builder's first L1)."""
    return L1 + ((va >> 12) & 1023) * 4


def _entry(op: int, args: list[int]) -> bytes:
    return struct.pack("<8I", op, UNTOUCHED, *(args + [0] * (6 - len(args))))


def _mmu(reqs: int, count: int, done: int = 0) -> bytes:
    return _entry(Hypercall.mmu_update, [reqs, count, done, DOMID_SELF])


def _write(buf: int, count: int) -> bytes:
    return _entry(Hypercall.console_io, [ConsoleIO.write, count, buf])


def _evtchn(cmd: int, ptr: int) -> bytes:
    return _entry(Hypercall.event_channel_op, [cmd, ptr])


def _requests(*reqs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<QQ", ptr, val) for ptr, val in reqs)


class Machine:
    """A domain process's guest (its RAM and one vCPU over the builder's tables) and the hypervisor's domain."""

    def __init__(self, hv: Any, dom: Domain) -> None:
        self.hv, self.dom = hv, dom
        ram = GuestRam(dom.nr_pages * PAGE_SIZE, BASE)
        ram.write_pa(ram.gdt_paddr, flat_gdt())
        tables = build_initial_tables(ram, TABLES, initial_mappings(BASE, ram.size), tables_read_only=True)
        contents = b"".join(ram.read_pa(f * PAGE_SIZE, PAGE_SIZE) for f in tables.frames)
        ptops.type_initial_tables(dom.frames, tables.frames[0], list(tables.frames[1:]), contents, 1)
        self.ram = ram
        self.vcpu = Vcpu(0, ram, InsnCounter(), 1000, tables.l2)
        self.proc = DomainProcess(None, dom.domid, dom.name, RecordingLog())  # type: ignore[arg-type]
        self.proc.ram, self.proc.vcpus = ram, [self.vcpu]
        for frame, text in ((STALE, b"stale\n"), (FRESH, b"fresh\n"), (AGAIN, b"again\n")):
            ram.write_pa(frame * PAGE_SIZE, text)

    def put(self, va: int, data: bytes) -> None:
        """Write through the linear map the builder made (BASE + physical address)."""
        self.ram.write_pa(va - BASE, data)

    def u32(self, va: int) -> int:
        raw = read_virt(self.ram, self.vcpu.cr3, va, 4)
        assert raw is not None
        return int(struct.unpack("<I", raw)[0])

    def trap(self, nr: int, args: list[int]) -> Call:
        """One trap: the domain process copies in, the hypervisor runs the call, the domain applies the result.
        Every call here returns 0 (a multicall's entries have results of their own)."""
        call = make_call(self.hv, self.dom, nr, args, self.proc._copy_in(self.vcpu, nr, args))
        self.dom.work_left = self.hv.work_budget  # each trap in a window of its own
        rc = run_handler(hypercalls.dispatch, call)
        assert rc == 0, rc
        self.proc._apply(HypercallResult(vcpu=0, seq=1, vt_ns=0, value=0, writes=call.mem.writes,
                                         effects=call.effects, complete=False))
        return call

    def multicall(self, entries: list[bytes]) -> list[Call]:
        """The multicall and every continuation of it, each trap's call in order."""
        self.put(ENT, b"".join(entries))
        args: list[int] | None = [ENT, len(entries), 0, 0, 0]
        calls: list[Call] = []
        while args is not None and len(calls) < 10:
            calls.append(self.trap(Hypercall.multicall, args))
            args = calls[-1].continuation
        assert args is None, "the multicall did not finish"
        return calls

    def results(self, n: int) -> list[int]:
        return [as_signed(self.u32(ENT + 32 * i + 4)) for i in range(n)]


@pytest.fixture
def machine() -> Machine:
    hv = core()
    return Machine(hv, hv.create_domain(hv.spec.domains[0]))


def _traced(calls: list[Call]) -> list[tuple[int, bool]]:
    """(entries run, continued) of each trap's multicall event."""
    return [(kw["run"], kw["continued"]) for c in calls for ev, kw in call_events(c) if ev == "multicall"]


# -- out fields and done counts --------------------------------------------------------------------------------


def test_a_later_mmu_update_accumulates_the_done_count_an_earlier_one_wrote(machine: Machine) -> None:
    # a hand-made continuation: entry 1 reads back the done count entry 0 wrote (Xen: copy_from_guest(&done)),
    # so the count is 2; before, entry 1 read the count as it was at the trap and wrote 1
    machine.put(REQS, _requests((_pte_at(BASE + 0x380000), SCRATCH << 12 | PTE),
                                (_pte_at(BASE + 0x381000), (SCRATCH + 1) << 12 | PTE)))
    machine.put(DONE, struct.pack("<I", 0))
    calls = machine.multicall([_mmu(REQS, 1, DONE), _mmu(REQS + 16, 1 | MMU_UPDATE_PREEMPTED, DONE)])
    assert machine.u32(DONE) == 2 and machine.results(2) == [0, 0]
    assert _traced(calls) == [(2, False)]  # one trap: nothing either entry reads was made stale


def test_a_done_count_written_into_a_later_entrys_arguments_is_what_that_entry_runs_with(machine: Machine) -> None:
    # entry 0's done count lands on entry 1's console_io count: entry 1 runs with 4, not the 1 it had at the trap.
    # Only 1 byte of TEXT came with the trap, so entry 1 runs in a continuation that copies in all 4.
    reqs = [(_pte_at(BASE + 0x380000 + i * PAGE_SIZE), (SCRATCH + i) << 12 | PTE) for i in range(4)]
    machine.put(REQS, _requests(*reqs))
    machine.put(TEXT, b"abc\n")
    count_arg = ENT + 32 + 8 + 4  # entry 1's args[1]
    calls = machine.multicall([_mmu(REQS, 4, count_arg), _write(TEXT, 1)])
    assert machine.dom.console == ["abc"]
    assert machine.results(2) == [0, 0] and machine.u32(count_arg) == 4
    assert _traced(calls) == [(1, True), (1, False)]
    assert calls[0].continuation == [ENT + 32, 1]


def test_a_result_written_back_is_seen_by_a_later_entry_and_nothing_else_of_the_entry_changes(
        machine: Machine) -> None:
    # entry 1 accumulates into entry 0's result field: it reads the 0 written back after entry 0, not UNTOUCHED
    machine.put(REQS, _requests((_pte_at(BASE + 0x380000), SCRATCH << 12 | PTE)))
    first = _mmu(REQS, 1)
    machine.multicall([first, _mmu(REQS, 1 | MMU_UPDATE_PREEMPTED, ENT + 4)])
    assert machine.u32(ENT + 4) == 1  # entry 0's result (0), plus entry 1's one update
    # as a release build of Xen: only the result field of a finished entry is written
    raw = read_virt(machine.ram, machine.vcpu.cr3, ENT, 32)
    assert raw is not None and raw[:4] + raw[8:] == first[:4] + first[8:]


def test_alloc_unbound_port_is_the_input_of_the_next_entrys_bind_and_send(machine: Machine) -> None:
    # alloc_unbound writes its port at EVT+4; the same 8 bytes read as a bind_interdomain struct name that port
    # (remote_dom = alloc's dom, DOMID_SELF); bind writes the new local port at EVT+8, and send reads it there
    machine.put(EVT, struct.pack("<HHII", DOMID_SELF, DOMID_SELF, 0, 0))
    calls = machine.multicall([_evtchn(EvtchnOp.alloc_unbound, EVT), _evtchn(EvtchnOp.bind_interdomain, EVT),
                               _evtchn(EvtchnOp.send, EVT + 8)])
    unbound, local = machine.u32(EVT + 4), machine.u32(EVT + 8)
    assert machine.results(3) == [0, 0, 0] and 0 < unbound != local > 0
    for port in (unbound, local):
        p = machine.dom.evtchn.lookup(port)
        assert p is not None and p.state is PortState.INTERDOMAIN
    (call,) = calls
    # bind raises its own end, and the send on it reaches the port entry 0 allocated
    assert [e.port for e in call.effects if isinstance(e, SetPending)] == [local, unbound]


def test_a_write_is_seen_through_another_virtual_address_of_the_same_frame(machine: Machine) -> None:
    alias = BASE + 0x3FF000  # remapped to EVT's frame before the call
    machine.ram.write_pa(_pte_at(alias), struct.pack("<I", (EVT - BASE) | PTE))
    machine.put(EVT, struct.pack("<HHI", DOMID_SELF, DOMID_SELF, 0))
    machine.multicall([_evtchn(EvtchnOp.alloc_unbound, EVT), _evtchn(EvtchnOp.send, alias + 4)])
    # the send read the allocated port through the alias (port 0 would be -EINVAL); an unbound port drops it
    assert machine.results(2) == [0, 0] and machine.u32(alias + 4) == machine.u32(EVT + 4) > 0


# -- page-table writes -----------------------------------------------------------------------------------------


def test_an_entry_reads_through_the_pte_an_earlier_entry_wrote_and_update_va_mapping_then_rewrites_it(
        machine: Machine) -> None:
    # entry 0 points WINDOW at FRESH; entry 1 reads WINDOW; entry 2 points it at AGAIN through update_va_mapping
    # (whose L1 entry is the one entry 0 wrote); entry 3 reads WINDOW again. Each read follows the tables as the
    # entries before it left them, so each runs in a continuation copied in after them.
    machine.put(WINDOW, b"stale\n")
    machine.put(REQS, _requests((_pte_at(WINDOW), FRESH << 12 | PTE)))
    calls = machine.multicall([
        _mmu(REQS, 1), _write(WINDOW, 6),
        _entry(Hypercall.update_va_mapping, [WINDOW, AGAIN << 12 | PTE, 0, UVMF_INVLPG]), _write(WINDOW, 6),
    ])
    assert machine.dom.console == ["fresh", "again"]  # before: "stale", "stale"
    assert machine.results(4) == [0, 0, 0, 0]
    assert _traced(calls) == [(1, True), (2, True), (1, False)]
    assert [c.continuation for c in calls] == [[ENT + 32, 3], [ENT + 96, 1], None]
    assert calls[0].effects == [WriteMachine(addr=_pte_at(WINDOW), data=struct.pack("<I", FRESH << 12 | PTE))]


def test_a_pde_written_by_one_entry_maps_the_buffer_of_the_next(machine: Machine) -> None:
    # FAR is not mapped at the trap (its PDE is empty): entry 1 would be -EFAULT on that copy. Entry 0 installs an
    # L1 table that maps it to FRESH, and entry 1, continued, reads it.
    l2_slot = TABLES + (FAR >> 22) * 4
    machine.ram.write_pa(NEW_L1 * PAGE_SIZE + ((FAR >> 12) & 1023) * 4, struct.pack("<I", FRESH << 12 | PTE))
    # a frame becomes an L1 only once nothing maps it writable: its linear-map entry goes read-only first
    machine.put(REQS, _requests((_pte_at(BASE + NEW_L1 * PAGE_SIZE), NEW_L1 << 12 | (PTE & ~PTE_RW))))
    machine.trap(Hypercall.mmu_update, [REQS, 1, 0, DOMID_SELF])
    machine.put(REQS, _requests((l2_slot, NEW_L1 << 12 | PDE)))
    calls = machine.multicall([_mmu(REQS, 1), _write(FAR, 6)])
    assert machine.dom.console == ["fresh"] and machine.results(2) == [0, 0]
    assert _traced(calls) == [(1, True), (1, False)]


def test_a_batch_request_is_read_through_the_mapping_an_earlier_request_of_it_wrote(machine: Machine) -> None:
    # request 0 remaps the page that holds the request array; request 1 is read from the new page (Xen reads
    # each request after the one before it), so mmu_update continues in a new trap and done counts both
    page = REQS & ~(PAGE_SIZE - 1)
    good = (_pte_at(BASE + 0x380000), SCRATCH << 12 | PTE)
    machine.put(REQS, _requests((_pte_at(page), (SCRATCH + 8) << 12 | PTE), (0xFFFFF000, 0)))  # 1: unowned
    machine.ram.write_pa((SCRATCH + 8) * PAGE_SIZE + (REQS - page) + 16, _requests(good))
    calls = [machine.trap(Hypercall.mmu_update, [REQS, 2, DONE, DOMID_SELF])]
    assert calls[0].continuation == [REQS + 16, 1 | MMU_UPDATE_PREEMPTED, DONE, DOMID_SELF]
    calls.append(machine.trap(Hypercall.mmu_update, calls[0].continuation))
    assert machine.u32(DONE) == 2
    assert calls[1].effects == [WriteMachine(addr=good[0], data=struct.pack("<I", good[1]))]


def test_a_new_baseptr_makes_every_later_entry_continue(machine: Machine) -> None:
    # MMUEXT_NEW_BASEPTR to the same tables: nothing moves, but every copy went through the old CR3
    ops = struct.pack("<3I", MmuextCmd.NEW_BASEPTR, TABLES >> 12, 0)
    machine.put(REQS, ops)
    version = _entry(Hypercall.xen_version, [XenVer.version, 0])
    calls = machine.multicall([_entry(Hypercall.mmuext_op, [REQS, 1, 0, DOMID_SELF]), version, version])
    assert _traced(calls) == [(1, True), (2, False)]
    assert machine.results(3)[0] == 0 and machine.results(3)[1] == machine.results(3)[2] > 0


def test_unrelated_page_table_writes_leave_the_batch_in_one_trap(machine: Machine) -> None:
    # lazy MMU mode's batches: PTE writes that no copied buffer was translated through, interleaved with reads
    machine.put(TEXT, b"ok\n")
    entries = []
    for i in range(8):
        machine.put(REQS + 16 * i, _requests((_pte_at(BASE + 0x380000 + i * PAGE_SIZE), (SCRATCH + i) << 12 | PTE)))
        entries += [_mmu(REQS + 16 * i, 1), _write(TEXT, 3)]
    calls = machine.multicall(entries)
    assert _traced(calls) == [(16, False)] and machine.dom.console == ["ok"] * 8


def test_the_same_multicall_takes_the_same_traps_every_time() -> None:
    # deterministic: the traps a multicall takes depend only on guest memory and the call
    def run() -> list[tuple[Any, ...]]:
        hv = core()
        m = Machine(hv, hv.create_domain(hv.spec.domains[0]))
        m.put(REQS, _requests((_pte_at(WINDOW), FRESH << 12 | PTE)))
        calls = m.multicall([_mmu(REQS, 1), _write(WINDOW, 6), _mmu(REQS, 1), _write(WINDOW, 6)])
        return [(c.args, c.continuation, c.mem.writes, c.effects, c.work_ns) for c in calls]

    assert run() == run()


# -- the view ---------------------------------------------------------------------------------------------------


def test_the_view_overlays_writes_on_every_copy_and_stale_copies_are_not_read() -> None:
    view = GuestView([
        Region(0x1000, 8, bytes(8), True, [0x5000, 0x6004], [0x40]),
        Region(0x1004, 8, bytes(8), False, [0x5000, 0x6004], [0x40]),
        Region(0x9000, 4, bytes(4), False, [0x5024, 0x7000], [0x40]),  # the same frame, another address
        Region(0x2000, 0, b"", False, [0x5000, 0x6008]),  # update_va_mapping's translation only
    ])
    view.write(0x1004, b"abcd")
    assert view.read(0x1004, 4) == b"abcd" and view.read(0x1008, 4) == bytes(4)
    assert view.read(0x9000, 4) == b"\x00\x00\x00\x00"  # frame 0x40 offset 0, not 4
    view.write(0x1000, b"wxyz")
    assert view.read(0x9000, 4) == b"wxyz"
    assert [(w.addr, w.data) for w in view.writes] == [(0x1004, b"abcd"), (0x1000, b"wxyz")]  # only the writes
    assert view.holds(0x2000, 0) and not view.holds(0x2004, 0)
    view.observe([WriteMachine(addr=0x6004, data=bytes(4))], vcpu=0, shared_info_frame=0x400)
    with pytest.raises(NotCopied):
        view.read(0x1004, 4)
    assert not view.holds(0x1000, 8) and view.read(0x9000, 4) == b"wxyz"
    view.write(0x1000, b"late")  # the call that made it stale may still write there
    assert view.writes[-1].data == b"late"
    # update_va_mapping's L1 entry, known from its translation: 0x6008, which no copy went through
    view.observe([SetVaPte(vcpu=0, va=0x2000, value=0)], vcpu=0, shared_info_frame=0x400)
    assert view.holds(0x9000, 4)
    view.observe([SetPending(vcpu=0, port=3)], vcpu=0, shared_info_frame=0x40)  # event bits in that frame
    assert not view.holds(0x9000, 4)


def test_a_region_without_translation_is_never_stale() -> None:
    view = GuestView([Region(0x1000, 4, bytes(4), True)])
    view.observe([WriteMachine(addr=0x1000, data=bytes(4))], vcpu=0, shared_info_frame=0x400)
    view.invalidate_all()
    assert view.read(0x1000, 4) == bytes(4)


def test_an_entry_runs_only_with_all_its_buffers() -> None:
    # entry 1's requests came with the trap (entry 0 named them too) but its done count did not: it must not run
    # here, or its done count would be lost; it runs in the continuation, which copies in both
    hv = core()
    dom = hv.create_domain(hv.spec.domains[0])
    dom.work_left = hv.work_budget
    raw = _mmu(0x5000, 1) + _mmu(0x5000, 1, 0x6000)
    reqs = Region(0x5000, 16, _requests((0x101000, SCRATCH << 12 | PTE)), False)
    call = make_call(hv, dom, Hypercall.multicall, [0x1000, 2, 0, 0, 0], [Region(0x1000, 64, raw, True), reqs])
    assert run_handler(hypercalls.dispatch, call) == 0
    assert call.continuation == [0x1020, 1] and len(call.effects) == 1
    assert [(w.addr, w.data) for w in call.mem.writes] == [(0x1004, bytes(4))]  # entry 0's result only
    call = make_call(hv, dom, Hypercall.multicall, [0x1000, 1, 0, 0, 0], [Region(0x1000, 32, raw[:32], True)])
    assert as_signed(run_handler(hypercalls.dispatch, call)) == -Errno.EFAULT  # the first entry's are missing


# -- a C guest built against Xen's headers ----------------------------------------------------------------------

GUEST_C = r"""
/* A PV guest built against Xen's public headers that issues one multicall whose entries depend on each other. */
#define __XEN_INTERFACE_VERSION__ 0x00030205
#include <stdint.h>
#include <xen/xen.h>
#include <xen/sched.h>
#include <xen/event_channel.h>
#include <xen/elfnote.h>

""" + C_ELFNOTE + c_xen_notes("mc-c") + c_entry() + C_HYPERCALLS + r"""
#define PAGE_FLAGS 0x63UL /* present, writable, accessed, dirty */

/* Xen's hypercall page is a page of .text, filled by the domain builder. */
extern char hypercall_page[4096];

/* WINDOW is remapped by the multicall: first to FRESH's frame, then back. */
static char window[4096] __attribute__((aligned(4096))) = "stale\n";
static char fresh[4096] __attribute__((aligned(4096))) = "fresh\n";
static multicall_entry_t calls[6];
static mmu_update_t req;
static unsigned int done = 0xdead;
static struct evtchn_alloc_unbound alloc;
static char line[128];
static unsigned int len;

""" + C_PUT + r"""
static void entry(int i, unsigned long op, unsigned long a0, unsigned long a1, unsigned long a2,
                  unsigned long a3)
{
    calls[i].op = op;
    calls[i].result = 0xa5a5a5a5;
    calls[i].args[0] = a0; calls[i].args[1] = a1; calls[i].args[2] = a2; calls[i].args[3] = a3;
}

/* This platform's p2m is the identity; a builder that fills mfn_list says so itself. */
static unsigned long mfn_of(start_info_t *si, const void *va)
{
    unsigned long pfn = ((unsigned long)va - 0xC0000000UL) >> 12;
    return si->mfn_list ? ((unsigned long *)si->mfn_list)[pfn] : pfn;
}

void start_kernel(start_info_t *si)
{
    unsigned long *l2 = (unsigned long *)si->pt_base;
    unsigned long va = (unsigned long)window;
    unsigned long pte_ma = (l2[va >> 22] & ~0xfffUL) + ((va >> 12) & 1023) * 4;
    unsigned long restore = (mfn_of(si, window) << 12) | PAGE_FLAGS;
    struct sched_shutdown sd;
    int i, rc, bad = 0;

    req.ptr = pte_ma | MMU_NORMAL_PT_UPDATE;
    req.val = ((uint64_t)mfn_of(si, fresh) << 12) | PAGE_FLAGS;
    alloc.dom = DOMID_SELF;
    alloc.remote_dom = DOMID_SELF;
    alloc.port = 0;
    /* 0: point WINDOW at FRESH's frame; 1: print WINDOW (needs entry 0's PTE); 2: point it back;
     * 3: allocate a port; 4 and 5: send on it and close it (each reads the port entry 3 wrote) */
    entry(0, __HYPERVISOR_mmu_update, (unsigned long)&req, 1, (unsigned long)&done, DOMID_SELF);
    entry(1, __HYPERVISOR_console_io, CONSOLEIO_write, 6, va, 0);
    entry(2, __HYPERVISOR_update_va_mapping, va, restore, 0, UVMF_INVLPG | UVMF_LOCAL);
    entry(3, __HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, (unsigned long)&alloc, 0, 0);
    entry(4, __HYPERVISOR_event_channel_op, EVTCHNOP_send, (unsigned long)&alloc.port, 0, 0);
    entry(5, __HYPERVISOR_event_channel_op, EVTCHNOP_close, (unsigned long)&alloc.port, 0, 0);
    rc = _hypercall2(int, multicall, calls, 6);

    put_str("mc-c: rc ");
    put_dec(rc);
    put_str(" results");
    for (i = 0; i < 6; i++) {
        put_str(" ");
        put_dec((long)calls[i].result);
        bad |= calls[i].result != 0;
    }
    put_str(" done ");
    put_dec(done);
    put_str(" port ");
    put_dec(alloc.port);
    bad |= rc != 0 || done != 1 || alloc.port == 0 || window[0] != 's';
    put_str(bad ? " FAIL\n" : " ok\n");
    (void)_hypercall3(int, console_io, CONSOLEIO_write, len, line);

    sd.reason = SHUTDOWN_poweroff;
    (void)_hypercall2(int, sched_op, SCHEDOP_shutdown, &sd);
    for (;;)
        ;
}
"""

@pytest.mark.slow
@pytest.mark.timeout(180)
def test_c_guest_multicall_entries_see_the_entries_before_them(run_dir: Path) -> None:
    work = run_dir / "cguest"
    work.mkdir()
    kernel = build_guest(work, GUEST_C)
    spec = parse_spec(f"""
[cluster]
name = "mc-c"
[[domain]]
name = "mcc"
vcpus = 1
memory_mib = 4
kernel = "{kernel}"
""")
    with Cluster.start(spec, run_dir=run_dir / "run") as cluster:
        (dom,) = cluster.wait(timeout_s=120)["domains"]
        console = cluster.client.call("console", dom=dom["domid"])
    assert (dom["state"], dom["shutdown_reason"], dom["crash"]) == ("dead", "poweroff", ""), dom
    assert console[0] == "fresh", console  # entry 1 read WINDOW through the PTE entry 0 wrote
    assert console[1].startswith("mc-c: rc 0 results 0 0 0 0 0 0 done 1 port "), console
    assert console[1].endswith(" ok"), console
    events = [e for e in read_events(run_dir / "run" / "trace" / "hypervisor.jsonl")
              if e["event"] == "multicall" and e.get("dom") == dom["domid"]]
    # entry 1's buffer was remapped by entry 0: the multicall continued from it, and ran the rest in one more trap
    assert [(e["entries"], e["run"], e["continued"]) for e in events] == [(6, 1, True), (5, 5, False)]
