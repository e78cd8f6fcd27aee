"""multicall (13): unit tests of the handler and its two-level copy-in, and an E2E run of lazy MMU mode.

The unit tests run ``multicall.handle`` on a real Domain of an in-process hypervisor core (alpha: 4 MiB = 1024
frames, 2 vCPUs) with hand-made guest regions, in the style of tests/test_mmu_hypercalls.py; preemption and
continuations are tested in tests/test_continuations.py. The E2E test boots two xen domains doing 64 page-table
updates each, one in lazy-MMU batches of 16 (four multicalls) and one a hypercall per update.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import call_events, core, make_call, run_handler

from hypervisor import hypercalls
from hypervisor.domain import Domain
from hypervisor.hypercalls import multicall
from hypervisor.hypercalls.base import Call
from pvcluster.abi import copyin
from pvcluster.abi.copyin import Span, copy_in
from pvcluster.abi.errno import Errno, neg
from pvcluster.abi.xen import DOMID_SELF, Hypercall
from pvcluster.bus.effects import Block, FlushTlb, WriteMachine
from pvcluster.bus.messages import Region
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

ENT, REQS, OPS, MASK, SHUT = 0x10000, 0x20000, 0x30000, 0x40000, 0x50000
PT, DATA, UNOWNED = 0x100, 0x200, 5000
P, RW = 0x1, 0x2
XENVER_VERSION = 0
MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_INVLPG_MULTI = 6, 9
SCHEDOP_BLOCK, SCHEDOP_SHUTDOWN = 1, 2
UNTOUCHED = 0xA5A5A5A5  # what the test puts in every result field before the call

_HV: weakref.WeakKeyDictionary[Domain, Any] = weakref.WeakKeyDictionary()


@pytest.fixture
def dom() -> Domain:
    hv = core()
    d = hv.create_domain(hv.spec.domains[0])
    d.work_left = hv.work_budget  # as the clock sets it when a window opens
    _HV[d] = hv
    return d


Entry = tuple[int, list[int]]


def _entries(entries: Sequence[Entry]) -> bytes:
    return b"".join(struct.pack("<8I", op, UNTOUCHED, *(args + [0] * (6 - len(args)))) for op, args in entries)


def _mmu_reqs(reqs: list[tuple[int, int]], addr: int = REQS) -> Region:
    data = b"".join(struct.pack("<QQ", p, v) for p, v in reqs)
    return Region(addr, len(data), data, False)


def _mmu_entry(addr: int = REQS, count: int = 1) -> Entry:
    return Hypercall.mmu_update, [addr, count, 0, DOMID_SELF]


def _mmuext_entry(addr: int = OPS) -> Entry:
    return Hypercall.mmuext_op, [addr, 1, 0, DOMID_SELF]


def _call(dom: Domain, nr: int, args: list[int], regions: list[Region]) -> Call:
    return make_call(_HV[dom], dom, nr, args, regions, vcpu=1)


def _run(dom: Domain, entries: Sequence[Entry], extra: list[Region], *, count: int | None = None,
         writable: bool = True) -> tuple[int, Call]:
    raw = _entries(entries)
    regions = [Region(ENT, len(raw), raw, writable), *extra]
    n = len(entries) if count is None else count
    call = _call(dom, Hypercall.multicall, [ENT, n, 0, 0, 0], regions)
    return run_handler(multicall, call), call


def _results(call: Call) -> dict[int, int]:
    """Index of each entry whose result field was written -> the u32 written."""
    out = {}
    for w in call.mem.writes:
        if ENT <= w.addr < ENT + 0x10000 and (w.addr - ENT) % 32 == 4:
            out[(w.addr - ENT) // 32] = struct.unpack("<I", w.data)[0]
    return out


def _traced(call: Call) -> list[dict[str, Any]]:
    return [kw for ev, kw in call_events(call) if ev == "multicall"]


def test_entries_run_in_order_and_results_are_written_back(dom: Domain) -> None:
    pte = (PT << 12) + 8
    ops = Region(OPS, 12, struct.pack("<3I", MMUEXT_TLB_FLUSH_LOCAL, 0, 0), False)
    entries = [(Hypercall.xen_version, [XENVER_VERSION, 0]), _mmu_entry(), _mmuext_entry()]
    rc, call = _run(dom, entries, [_mmu_reqs([(pte, (DATA << 12) | P | RW)]), ops])
    assert rc == 0
    version = hypercalls.dispatch(_call(dom, Hypercall.xen_version, [0, 0, 0, 0, 0], []))
    assert _results(call) == {0: version, 1: 0, 2: 0}
    assert [w.addr for w in call.mem.writes] == [ENT + 4, ENT + 36, ENT + 68]  # in entry order
    # the entries' effects, in order; the flush is the calling vCPU's
    assert call.effects == [
        WriteMachine(addr=pte, data=struct.pack("<I", (DATA << 12) | P | RW)),
        FlushTlb(vcpu=1),
    ]
    assert call.continuation is None and not call.deferred
    (event,) = _traced(call)
    assert (event["entries"], event["results"], event["run"], event["dom"], event["vcpu"]) == (
        3, [version, 0, 0], 3, dom.domid, 1)


def test_a_failing_entry_does_not_stop_later_ones(dom: Domain) -> None:
    good, bad = (PT << 12) + 4, UNOWNED << 12
    entries = [_mmu_entry(REQS), (99, []), _mmu_entry(REQS + 16)]
    rc, call = _run(dom, entries, [_mmu_reqs([(bad, (DATA << 12) | P), (good, (DATA << 12) | P)])])
    assert rc == 0  # the multicall itself succeeded
    assert _results(call) == {0: neg(Errno.EPERM), 1: neg(Errno.ENOSYS), 2: 0}
    assert call.effects == [WriteMachine(addr=good, data=struct.pack("<I", (DATA << 12) | P))]
    assert _traced(call)[0]["results"] == [-Errno.EPERM, -Errno.ENOSYS, 0]


def test_a_nested_multicall_entry_is_einval(dom: Domain) -> None:
    entries = [(Hypercall.multicall, [ENT, 1]), (Hypercall.xen_version, [XENVER_VERSION, 0])]
    rc, call = _run(dom, entries, [])
    assert rc == 0
    results = _results(call)
    assert results[0] == neg(Errno.EINVAL) and results[1] > 0


def test_a_long_batch_is_not_refused_it_runs_whole_when_copied_in_and_the_budget_allows(dom: Domain) -> None:
    # There is no E2BIG cap any more (Xen has none): 513 entries, past the old 512-entry limit, all run.
    n = 513
    dom.work_left = 2 * n  # each entry costs a unit of the window's work budget, and so does each request it runs
    rc, call = _run(dom, [_mmu_entry()] * n, [_mmu_reqs([((PT << 12), (DATA << 12) | P)])])
    assert rc == 0 and call.continuation is None and dom.work_left == 0
    assert _results(call) == dict.fromkeys(range(n), 0)
    assert call.effects == [WriteMachine(addr=PT << 12, data=struct.pack("<I", (DATA << 12) | P))] * n
    # as the domain process copies it in, a long batch carries a prefix of entries; the multicall continues at the
    # first entry that did not come with this trap (tests/test_continuations.py has the details)
    entries = _entries([(Hypercall.xen_version, [XENVER_VERSION, 0])] * n)
    (span,) = copy_in(Hypercall.multicall, [ENT, n, 0, 0, 0], lambda a, length: entries[a - ENT:a - ENT + length])
    assert span == Span(ENT, copyin.MAX_MULTICALL_COPY * 32, writable=True)
    dom.work_left = _HV[dom].work_budget  # a new window
    call = _call(dom, Hypercall.multicall, [ENT, n, 0, 0, 0], [Region(ENT, span.length, entries[:span.length], True)])
    assert multicall.handle(call) == 0
    assert len(_results(call)) == copyin.MAX_MULTICALL_COPY
    assert call.continuation == [ENT + copyin.MAX_MULTICALL_COPY * 32, n - copyin.MAX_MULTICALL_COPY]


def test_an_unmapped_or_read_only_entry_array_is_efault(dom: Domain) -> None:
    entries = [_mmu_entry()]
    reqs = [_mmu_reqs([((PT << 12), (DATA << 12) | P)])]
    write = [WriteMachine(addr=PT << 12, data=struct.pack("<I", (DATA << 12) | P))]
    # the array runs into an unmapped entry: -EFAULT for the multicall there; the entries before it ran
    rc, call = _run(dom, entries, [Region(ENT + 32, 32, None, True), *reqs], count=2)
    assert rc == -Errno.EFAULT and call.effects == write and _results(call) == {0: 0}
    assert call.continuation is None and _traced(call)[0]["run"] == 1
    # an unmapped first entry: nothing runs
    call = _call(dom, Hypercall.multicall, [ENT, 1, 0, 0, 0], [Region(ENT, 32, None, True), *reqs])
    assert multicall.handle(call) == -Errno.EFAULT and call.effects == [] and call.mem.writes == []
    # the array runs past what the domain process copied in (it used to be -EFAULT): the entries that came run
    # and the multicall continues at the first one that did not
    rc, call = _run(dom, entries, reqs, count=2)
    assert rc == 0 and call.effects == write and _results(call) == {0: 0}
    assert call.continuation == [ENT + 32, 1]
    rc, call = _run(dom, entries, reqs, writable=False)  # results cannot be written back
    assert rc == -Errno.EFAULT and call.effects == [] and call.mem.writes == []


def test_zero_entries_is_a_no_op(dom: Domain) -> None:
    rc, call = _run(dom, [], [])
    assert rc == 0 and call.effects == [] and call.mem.writes == [] and call.continuation is None


def test_an_entry_that_blocks_ends_the_batch(dom: Domain) -> None:
    entries = [(Hypercall.sched_op, [SCHEDOP_BLOCK, 0]), (Hypercall.xen_version, [XENVER_VERSION, 0])]
    rc, call = _run(dom, entries, [])
    assert rc == 0 and call.deferred and call.shutdown is None
    assert _results(call) == {0: 0}  # the entry after the block is not run; its result field is untouched
    assert call.effects == [Block(vcpu=1)]


def test_an_entry_that_shuts_down_ends_the_batch(dom: Domain) -> None:
    entries = [(Hypercall.sched_op, [SCHEDOP_SHUTDOWN, SHUT]), _mmu_entry()]
    reason = Region(SHUT, 4, struct.pack("<I", 3), False)
    rc, call = _run(dom, entries, [reason, _mmu_reqs([((PT << 12), (DATA << 12) | P)])])
    assert rc == 0 and call.deferred and call.shutdown == 3
    assert call.effects == [] and _results(call) == {0: 0}


# -- copy-in -------------------------------------------------------------------------------------------------


def _reader(mem: dict[int, bytes]) -> Any:
    def read(addr: int, length: int) -> bytes | None:
        for base, data in mem.items():
            if base <= addr and addr + length <= base + len(data):
                return data[addr - base : addr - base + length]
        return None

    return read


def test_copy_in_names_the_array_then_each_entrys_own_buffers() -> None:
    entries = [
        _mmu_entry(REQS, 2),
        (Hypercall.xen_version, [XENVER_VERSION, 0]),
        _mmuext_entry(OPS),
        (Hypercall.multicall, [ENT, 3]),  # nested: its buffers are not copied in (it is refused anyway)
        (99, [REQS]),  # no such hypercall: nothing to copy in
        _mmu_entry(REQS, 2),  # the same buffer twice travels once
    ]
    raw = _entries(entries)
    ops = struct.pack("<3I", MMUEXT_INVLPG_MULTI, 0x1000, MASK)
    spans = copy_in(Hypercall.multicall, [ENT, len(entries), 0, 0, 0], _reader({ENT: raw, OPS: ops}))
    # the array (writable), the mmu_update requests, the mmuext op and, read through it, the vCPU bitmap
    assert spans == [Span(ENT, 32 * len(entries), writable=True), Span(REQS, 32), Span(OPS, 12), Span(MASK, 4)]


def test_copy_in_of_an_unreadable_array_or_bad_count_names_only_the_array() -> None:
    read = _reader({})
    assert copy_in(Hypercall.multicall, [ENT, 2, 0, 0, 0], read) == [Span(ENT, 64, writable=True)]
    assert copy_in(Hypercall.multicall, [ENT, 0, 0, 0, 0], read) == []
    # a count past the old 512-entry limit copies a prefix of the array (it used to copy nothing)
    prefix = [Span(ENT, copyin.MAX_MULTICALL_COPY * 32, writable=True)]
    assert copy_in(Hypercall.multicall, [ENT, 513, 0, 0, 0], read) == prefix
    assert copy_in(Hypercall.multicall, [ENT, 0xFFFFFFFF, 0, 0, 0], read) == prefix


def test_copy_in_is_capped_in_total_by_whole_entries() -> None:
    # 128 mmu_update entries of 512 requests each would name 1 MiB: the descriptor stops at the first entry whose
    # buffers would not fit (so no entry runs with part of its buffers), and the multicall continues there
    entries = [_mmu_entry(REQS + i * 0x2000, copyin.MAX_BATCH_COPY) for i in range(copyin.MAX_MULTICALL_COPY)]
    raw = _entries(entries)
    spans = copy_in(Hypercall.multicall, [ENT, len(entries), 0, 0, 0], _reader({ENT: raw}))
    assert spans[0] == Span(ENT, len(raw), writable=True)
    assert sum(s.length for s in spans) <= copyin.MAX_TOTAL
    assert 1 < len(spans) < len(entries) + 1
    assert spans == copyin.describe(Hypercall.multicall, [ENT, len(entries), 0, 0, 0], _reader({ENT: raw}))
    assert [s.addr for s in spans[1:]] == [REQS + i * 0x2000 for i in range(len(spans) - 1)]


# -- end to end ----------------------------------------------------------------------------------------------

SPEC = """
[cluster]
name = "multicall"
[hypervisor]
pcpus = 2
[[domain]]
name = "batched"
backend = "xen"
cmdline = "workload=mcbench mcbatch=16 shutdown=poweroff"
[[domain]]
name = "single"
backend = "xen"
cmdline = "workload=mcbench mcbatch=1 shutdown=poweroff"
"""


@pytest.mark.timeout(180)
def test_lazy_mmu_mode_sends_batches_as_multicalls(run_dir: Path) -> None:
    with Cluster.start(parse_spec(SPEC), run_dir=run_dir) as cluster:
        final = {d["name"]: d for d in cluster.wait(timeout_s=150)["domains"]}
        consoles = {n: cluster.client.call("console", dom=n) for n in final}
    for name, batch in (("batched", 16), ("single", 1)):
        assert (final[name]["state"], final[name]["shutdown_reason"]) == ("dead", "poweroff"), final[name]
        assert f"pvkern: mcbench updates 64, batch {batch}" in consoles[name]
        assert "pvkern: mcbench check failures: 0" in consoles[name], consoles[name]
    events = list(read_events(run_dir / "trace" / "hypervisor.jsonl"))
    batched, single = final["batched"]["domid"], final["single"]["domid"]
    mcs = [e for e in events if e["event"] == "multicall"]
    assert [e["entries"] for e in mcs if e["dom"] == batched] == [16] * 4
    assert all(e["results"] == [0] * 16 for e in mcs if e["dom"] == batched)
    assert [e for e in mcs if e["dom"] == single] == []
    updates = {d: sum(1 for e in events if e["event"] == "hypercall" and e["dom"] == d and e["name"] == "mmu_update")
               for d in (batched, single)}
    assert updates == {batched: 1, single: 65}  # + the one that puts the original PTE back
    assert final["single"]["hypercalls"] - final["batched"]["hypercalls"] == 64 - 4
