"""Batch hypercalls preempted and continued, as Xen's (xen/arch/x86/pv/mm-hypercalls.c, xen/common/multicall.c).

Before every element but the first, a batch checks the domain's work budget for the window (``dom.work_left``,
Xen's hypercall_preempt_check); when it is spent, or when the next element was not copied in with the trap, the
hypercall ends with a continuation: the vCPU re-executes it with the arguments that describe the work left.
mmu_update and mmuext_op continue as ``[base + i*size, (count - i) | MMU_UPDATE_PREEMPTED, done, foreigndom]`` and
accumulate the done count in guest memory; multicall continues as ``[entries + i*32, count - i]``, and an entry that
was itself preempted is written back with its continuation arguments and run again.

The tests drive the handlers over a flat fake guest memory the way the domain process does: the regions of each
trap are what ``pvcluster/abi/copyin.py`` names, read from that memory, and the writes of one trap land in it
before the next.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import keystone
import pytest
from helpers import RecordingLog, core, make_call

from domains.memory import GuestRam
from domains.paging import build_initial_tables, initial_mappings
from domains.runtime import DomainProcess
from domains.vcpu import InsnCounter, Vcpu, VcpuState, flat_gdt
from hypervisor import trap
from hypervisor.domain import Domain
from hypervisor.hypercalls import mmu_update, mmuext_op, multicall
from hypervisor.hypercalls.base import Call
from pvcluster.abi.copyin import MAX_BATCH_COPY, MAX_CONSOLE_WRITE, MAX_TOTAL, copy_in
from pvcluster.abi.errno import Errno, as_signed
from pvcluster.bus.effects import FlushTlb, Invlpg, RestartHypercall, WriteMachine
from pvcluster.bus.messages import HypercallReq, HypercallResult, Region

REQS, DONE, OPS, ENT = 0x10000, 0x20000, 0x30000, 0x40000
MEM = 0x800000
CON = 0x400000  # console text the filler entries write
PREEMPTED = 0x80000000  # MMU_UPDATE_PREEMPTED (xen.h)
DOMID_SELF = 0x7FF0
MMU_UPDATE, XEN_VERSION, MULTICALL, MMUEXT_OP, CONSOLE_IO = 1, 17, 13, 26, 18
PIN_L1_TABLE = 0
TLB_FLUSH_LOCAL, INVLPG_LOCAL = 6, 7
PT, DATA, P = 0x100, 0x200, 0x1
REQ_SIZE, OP_SIZE, ENTRY_SIZE = 16, 12, 32
UNTOUCHED = 0xA5A5A5A5


class Guest:
    """Guest memory as the domain process sees it, flat from 0: what a trap copies in, and where its writes go."""

    def __init__(self) -> None:
        self.ram = bytearray(MEM)

    def put(self, addr: int, data: bytes) -> None:
        self.ram[addr : addr + len(data)] = data

    def u32(self, addr: int) -> int:
        return int(struct.unpack_from("<I", self.ram, addr)[0])

    def read(self, addr: int, length: int) -> bytes | None:
        return bytes(self.ram[addr : addr + length]) if 0 <= addr and addr + length <= MEM else None

    def regions(self, nr: int, args: list[int]) -> list[Region]:
        # a frame to validate as a page table comes by machine address: an empty table here
        return [Region(s.addr, s.length, bytes(s.length), False, machine=True) if s.machine else
                Region(s.addr, s.length, self.read(s.addr, s.length), s.writable) for s in copy_in(nr, args, self.read)]

    def trap(self, dom: Domain, nr: int, args: list[int], *, regions: list[Region] | None = None) -> tuple[int, Call]:
        """One trap of hypercall ``nr``: copy in, run the handler, write back."""
        hv = _HV[id(dom)]
        call = make_call(hv, dom, nr, args, self.regions(nr, args) if regions is None else regions)
        rc = {MMU_UPDATE: mmu_update, MMUEXT_OP: mmuext_op, MULTICALL: multicall}[nr].handle(call)
        for w in call.mem.writes:
            self.put(w.addr, w.data)
        return rc, call


_HV: dict[int, Any] = {}


@pytest.fixture
def dom() -> Domain:
    hv = core()
    d = hv.create_domain(hv.spec.domains[0])
    _HV[id(d)] = hv
    return d


def _flushes(n: int) -> bytes:
    return b"".join(struct.pack("<3I", TLB_FLUSH_LOCAL, 0, 0) for _ in range(n))


def _updates(n: int) -> list[tuple[int, int]]:
    return [((PT << 12) + 4 * i, (DATA << 12) | P) for i in range(n)]


def _writes(reqs: Sequence[tuple[int, int]]) -> list[WriteMachine]:
    return [WriteMachine(addr=ptr, data=struct.pack("<I", val)) for ptr, val in reqs]


# -- mmuext_op ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [3, 1, 0])
def test_mmuext_op_runs_its_budget_then_continues_and_accumulates_done(dom: Domain, budget: int) -> None:
    n, g = 10, Guest()
    g.put(OPS, _flushes(n))
    g.put(DONE, struct.pack("<I", UNTOUCHED))
    dom.work_left = budget
    rc, call = g.trap(dom, MMUEXT_OP, [OPS, n, DONE, DOMID_SELF])
    ran = max(budget, 1)  # the first op always runs, even with nothing left of the budget
    assert rc == 0 and call.effects == [FlushTlb(vcpu=0)] * ran
    assert call.continuation == [OPS + ran * OP_SIZE, (n - ran) | PREEMPTED, DONE, DOMID_SELF]
    assert g.u32(DONE) == ran  # not read back on the first call: written from 0
    # the re-executed trap, in a later window: done is read back and accumulates
    dom.work_left = 100
    rc, call = g.trap(dom, MMUEXT_OP, call.continuation)
    assert rc == 0 and call.continuation is None and call.effects == [FlushTlb(vcpu=0)] * (n - ran)
    assert g.u32(DONE) == n


def test_mmuext_op_continued_three_times(dom: Domain) -> None:
    n, g = 10, Guest()
    g.put(OPS, _flushes(n))
    args: list[int] | None = [OPS, n, DONE, DOMID_SELF]
    traps, flushed = 0, 0
    while args is not None:
        dom.work_left = 4
        rc, call = g.trap(dom, MMUEXT_OP, args)
        assert rc == 0
        traps, flushed, args = traps + 1, flushed + len(call.effects), call.continuation
    assert (traps, flushed, g.u32(DONE)) == (3, n, n)


def test_a_continuation_stops_at_a_failing_op_and_done_counts_what_succeeded(dom: Domain) -> None:
    g = Guest()
    g.put(OPS, _flushes(3) + struct.pack("<3I", 4, PT, 0) + _flushes(2))  # op 3 unpins a frame never pinned
    dom.work_left = 2
    rc, call = g.trap(dom, MMUEXT_OP, [OPS, 6, DONE, DOMID_SELF])
    assert rc == 0 and call.continuation == [OPS + 2 * OP_SIZE, 4 | PREEMPTED, DONE, DOMID_SELF]
    dom.work_left = 100
    rc, call = g.trap(dom, MMUEXT_OP, call.continuation)
    assert as_signed(rc) == -Errno.EINVAL and call.continuation is None  # -EINVAL, and the batch is over
    assert g.u32(DONE) == 3


def test_a_continuation_whose_done_count_cannot_be_read_counts_from_zero(dom: Domain) -> None:
    g = Guest()
    g.put(OPS, _flushes(2))
    regions = [Region(OPS, 2 * OP_SIZE, _flushes(2), False), Region(DONE, 4, None, True)]
    dom.work_left = 100
    rc, call = g.trap(dom, MMUEXT_OP, [OPS, 2 | PREEMPTED, DONE, DOMID_SELF], regions=regions)
    # Xen: (void)copy_from_guest(&done, ...) and the failed copy back are both ignored; the ops stand
    assert rc == 0 and len(call.effects) == 2 and call.mem.writes == []


# -- mmu_update -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [3, 0])
def test_mmu_update_runs_its_budget_then_continues_and_accumulates_done(dom: Domain, budget: int) -> None:
    n, g = 8, Guest()
    reqs = _updates(n)
    g.put(REQS, b"".join(struct.pack("<QQ", *r) for r in reqs))
    dom.work_left = budget
    rc, call = g.trap(dom, MMU_UPDATE, [REQS, n, DONE, DOMID_SELF])
    ran = max(budget, 1)
    assert rc == 0 and call.effects == _writes(reqs[:ran])
    assert call.continuation == [REQS + ran * REQ_SIZE, (n - ran) | PREEMPTED, DONE, DOMID_SELF]
    assert g.u32(DONE) == ran
    dom.work_left = 100
    rc, call = g.trap(dom, MMU_UPDATE, call.continuation)
    assert rc == 0 and call.continuation is None and call.effects == _writes(reqs[ran:])
    assert g.u32(DONE) == n


def test_mmu_update_without_a_done_pointer_continues_too(dom: Domain) -> None:
    g = Guest()
    g.put(REQS, b"".join(struct.pack("<QQ", *r) for r in _updates(3)))
    dom.work_left = 1
    rc, call = g.trap(dom, MMU_UPDATE, [REQS, 3, 0, DOMID_SELF])
    assert rc == 0 and call.continuation == [REQS + REQ_SIZE, 2 | PREEMPTED, 0, DOMID_SELF]
    assert call.mem.writes == []


# -- what was copied in ---------------------------------------------------------------------------------------------


def test_an_op_array_longer_than_what_was_copied_in_continues_at_the_first_uncopied_op(dom: Domain) -> None:
    g = Guest()
    g.put(OPS, _flushes(5))
    dom.work_left = 100
    prefix = [Region(OPS, 2 * OP_SIZE, _flushes(2), False), Region(DONE, 4, bytes(4), True)]
    rc, call = g.trap(dom, MMUEXT_OP, [OPS, 5, DONE, DOMID_SELF], regions=prefix)
    assert rc == 0 and call.effects == [FlushTlb(vcpu=0)] * 2
    assert call.continuation == [OPS + 2 * OP_SIZE, 3 | PREEMPTED, DONE, DOMID_SELF]
    assert g.u32(DONE) == 2 and dom.work_left == 98  # an op that was not there cost nothing
    rc, call = g.trap(dom, MMUEXT_OP, call.continuation)
    assert rc == 0 and call.continuation is None and g.u32(DONE) == 5


def test_a_batch_past_the_copy_in_cap_continues_where_the_copied_prefix_ends(dom: Domain) -> None:
    n, g = MAX_BATCH_COPY + 88, Guest()
    reqs = [((PT << 12) + 4 * (i % 1024), (DATA << 12) | P) for i in range(n)]
    g.put(REQS, b"".join(struct.pack("<QQ", *r) for r in reqs))
    dom.work_left = 10_000
    rc, call = g.trap(dom, MMU_UPDATE, [REQS, n, DONE, DOMID_SELF])
    assert rc == 0 and len(call.effects) == MAX_BATCH_COPY
    assert call.continuation == [REQS + MAX_BATCH_COPY * REQ_SIZE, 88 | PREEMPTED, DONE, DOMID_SELF]
    rc, call = g.trap(dom, MMU_UPDATE, call.continuation)
    assert rc == 0 and call.continuation is None and call.effects == _writes(reqs[MAX_BATCH_COPY:])
    assert g.u32(DONE) == n


# -- multicall ------------------------------------------------------------------------------------------------------


def _entry(op: int, args: Sequence[int]) -> bytes:
    return struct.pack("<8I", op, UNTOUCHED, *args, *[0] * (6 - len(args)))


def _result(g: Guest, i: int) -> int:
    return g.u32(ENT + i * ENTRY_SIZE + 4)


def test_multicall_with_its_budget_spent_restarts_at_the_next_entry(dom: Domain) -> None:
    g = Guest()
    g.put(ENT, b"".join(_entry(XEN_VERSION, [0, 0]) for _ in range(5)))
    dom.work_left = 2
    rc, call = g.trap(dom, MULTICALL, [ENT, 5])
    assert rc == 0 and call.continuation == [ENT + 2 * ENTRY_SIZE, 3]
    version = _result(g, 0)
    assert version != UNTOUCHED and [_result(g, i) for i in range(5)] == [version] * 2 + [UNTOUCHED] * 3
    dom.work_left = 100
    rc, call = g.trap(dom, MULTICALL, call.continuation)
    assert rc == 0 and call.continuation is None
    assert [_result(g, i) for i in range(5)] == [version] * 5


def test_multicall_whose_entry_is_preempted_writes_the_entry_back_and_restarts_at_it(dom: Domain) -> None:
    n, g = 10, Guest()
    g.put(OPS, _flushes(n))
    g.put(ENT, _entry(XEN_VERSION, [0, 0]) + _entry(MMUEXT_OP, [OPS, n, DONE, DOMID_SELF])
          + _entry(XEN_VERSION, [0, 0]))
    # entry 0 costs 1, entry 1 costs 1, and its mmuext_op runs the 3 ops left of a budget of 5
    dom.work_left = 5
    rc, call = g.trap(dom, MULTICALL, [ENT, 3])
    assert rc == 0 and call.effects == [FlushTlb(vcpu=0)] * 3
    assert call.continuation == [ENT + ENTRY_SIZE, 2]
    # the preempted entry is written back whole: its op, its result, and the mmuext_op continuation's arguments
    (entry,) = [w.data for w in call.mem.writes if w.addr == ENT + ENTRY_SIZE]
    assert entry == struct.pack("<8I", MMUEXT_OP, 0, OPS + 3 * OP_SIZE, (n - 3) | PREEMPTED, DONE, DOMID_SELF, 0, 0)
    assert len(entry) == 32
    assert g.u32(DONE) == 3 and _result(g, 2) == UNTOUCHED
    # the multicall again, from that entry: the mmuext_op continues where it stopped
    dom.work_left = 100
    rc, call = g.trap(dom, MULTICALL, call.continuation)
    assert rc == 0 and call.continuation is None and call.effects == [FlushTlb(vcpu=0)] * (n - 3)
    assert g.u32(DONE) == n and _result(g, 1) == 0 and _result(g, 2) == _result(g, 0) != UNTOUCHED


def _fillers(g: Guest, room: int, later: int) -> list[bytes]:
    """console_io write entries whose buffers, with the entry array of ``len(fillers) + later`` entries, leave
    exactly ``room`` bytes of what one trap may copy in (``copyin.MAX_TOTAL``) for the entries after them."""
    count = 1
    while True:
        total = MAX_TOTAL - (count + later) * ENTRY_SIZE - room
        sizes = [MAX_CONSOLE_WRITE] * (total // MAX_CONSOLE_WRITE) + [total % MAX_CONSOLE_WRITE]
        if len(sizes) == count:
            break
        count = len(sizes)
    entries, addr = [], CON
    for size in sizes:
        g.put(addr, b"x" * size)
        entries.append(_entry(CONSOLE_IO, [0, size, addr]))
        addr += size
    return entries


def test_a_multicall_batch_entry_whose_done_count_was_not_copied_in_is_not_applied_twice(dom: Domain) -> None:
    g = Guest()
    ops = struct.pack("<3I", PIN_L1_TABLE, PT, 0) + struct.pack("<3I", PIN_L1_TABLE, PT + 1, 0)
    g.put(OPS, ops)
    fillers = _fillers(g, room=len(ops) + 2, later=1)  # the ops fit; the 4-byte done count does not
    g.put(ENT, b"".join(fillers) + _entry(MMUEXT_OP, [OPS, 2, DONE, DOMID_SELF]))
    n = len(fillers) + 1
    args: list[int] | None = [ENT, n]
    assert (DONE, 4) not in [(r.addr, r.length) for r in g.regions(MULTICALL, [ENT, n])]
    while args is not None:  # the multicall and its continuations, each in a window of its own
        dom.work_left = _HV[id(dom)].work_budget
        rc, call = g.trap(dom, MULTICALL, args)
        assert rc == 0
        args = call.continuation
    assert dom.frames.level(PT) == dom.frames.level(PT + 1) == 1
    assert _result(g, n - 1) == 0 and g.u32(DONE) == 2  # the guest is told its pins succeeded


def test_a_multicall_batch_entry_whose_ops_were_not_copied_in_is_continued_not_failed(dom: Domain) -> None:
    g = Guest()
    g.put(OPS, _flushes(2))
    fillers = _fillers(g, room=2 * OP_SIZE - 1, later=1)  # the op array does not fit
    g.put(ENT, b"".join(fillers) + _entry(MMUEXT_OP, [OPS, 2, DONE, DOMID_SELF]))
    n = len(fillers) + 1
    dom.work_left = _HV[id(dom)].work_budget
    rc, call = g.trap(dom, MULTICALL, [ENT, n])
    assert rc == 0
    assert as_signed(_result(g, n - 1)) != -Errno.EFAULT
    assert call.continuation == [ENT + (n - 1) * ENTRY_SIZE, 1]


# -- the trap -------------------------------------------------------------------------------------------------------


def _invlpgs(vas: Sequence[int]) -> bytes:
    return b"".join(struct.pack("<3I", INVLPG_LOCAL, va, 0) for va in vas)


def test_trap_apply_turns_a_continuation_into_restart_hypercall(dom: Domain) -> None:
    g = Guest()
    g.put(OPS, _invlpgs([0xC0001000, 0xC0002000, 0xC0003000, 0xC0004000]))
    dom.work_left = 2
    args = [OPS, 4, DONE, DOMID_SELF, 0]
    req = HypercallReq(vcpu=1, seq=7, vt_ns=5000, nr=MMUEXT_OP, args=args, regions=g.regions(MMUEXT_OP, args))
    out = trap.apply(_HV[id(dom)], dom, req)
    assert out.shutdown is None and out.remote == [] and out.result is not None
    result = out.result
    # EAX holds the hypercall number again; the vCPU gets its result now (complete) and re-executes the trap
    assert (result.value, result.complete, result.vcpu, result.seq) == (MMUEXT_OP, True, 1, 7)
    assert result.effects == [Invlpg(vcpu=1, va=0xC0001000), Invlpg(vcpu=1, va=0xC0002000),
                              RestartHypercall(vcpu=1, nr=MMUEXT_OP,
                                               args=[OPS + 2 * OP_SIZE, 2 | PREEMPTED, DONE, DOMID_SELF])]
    assert [(w.addr, w.data) for w in result.writes] == [(DONE, struct.pack("<I", 2))]
    (event,) = [kw for ev, kw in _HV[id(dom)].log.events if ev == "hypercall"]
    assert (event["continued"], event["result"], event["name"]) == (True, MMUEXT_OP, "mmuext_op")


def test_trap_apply_of_a_batch_that_finishes_has_no_restart(dom: Domain) -> None:
    g = Guest()
    g.put(OPS, _flushes(4))
    dom.work_left = 100
    args = [OPS, 4, DONE, DOMID_SELF, 0]
    req = HypercallReq(vcpu=0, seq=1, vt_ns=0, nr=MMUEXT_OP, args=args, regions=g.regions(MMUEXT_OP, args))
    out = trap.apply(_HV[id(dom)], dom, req)
    assert out.result is not None and out.result.value == 0
    assert not any(isinstance(e, RestartHypercall) for e in out.result.effects)


_TRAPPER = "mov eax, 26\n mov ebx, 0x30000\n mov ecx, 10\n mov edx, 0x20000\n mov esi, 0x7ff0\n int 0x82\n hlt"


def test_the_domain_re_executes_a_restarted_hypercall_with_the_new_arguments() -> None:
    """The domain side of RestartHypercall: back over the `int 0x82`, arguments in EBX.., EAX = nr on completion."""
    base = 0xC0000000
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    ram = GuestRam(1 << 20, base)
    ram.write_pa(0, bytes(ks.asm(_TRAPPER, base)[0]))
    ram.write_pa(ram.gdt_paddr, flat_gdt())
    tables = build_initial_tables(ram, 0xF0000, initial_mappings(base, ram.size), tables_read_only=True)
    vcpu = Vcpu(0, ram, InsnCounter(), 1000, tables.l2)
    vcpu.set_regs({"eip": base, "esp": base + 0x80000, "eflags": 0x2})
    vcpu.state = VcpuState.RUNNING
    proc = DomainProcess(None, 1, "alpha", RecordingLog())  # type: ignore[arg-type]
    proc.ram, proc.vcpus = ram, [vcpu]
    vcpu.run(50_000)
    first = vcpu.trap
    assert vcpu.state is VcpuState.HYPERCALL and first is not None
    assert first.nr == MMUEXT_OP and first.args[:4] == [OPS, 10, DONE, DOMID_SELF]
    int_at = vcpu.reg("eip") - 2
    restart = RestartHypercall(vcpu=0, nr=MMUEXT_OP, args=[OPS + 36, 7 | PREEMPTED, DONE, DOMID_SELF])
    proc._apply(HypercallResult(vcpu=0, seq=first.seq, vt_ns=first.vt_ns + 400, value=MMUEXT_OP, writes=[],
                                effects=[restart], complete=True))
    assert vcpu.trap is None and vcpu.reg("eip") == int_at and vcpu.reg("eax") == MMUEXT_OP
    vcpu.run(100_000)
    again = vcpu.trap
    assert again is not None and again.seq != first.seq and again.nr == MMUEXT_OP
    assert again.args[:4] == [OPS + 36, 7 | PREEMPTED, DONE, DOMID_SELF]
