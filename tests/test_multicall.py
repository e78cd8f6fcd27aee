"""multicall (13): unit tests of the handler and its two-level copy-in, and an E2E run of lazy MMU mode.

The unit tests run ``multicall.handle`` on a real Domain (alpha: 4 MiB = 1024 frames, 2 vCPUs) with hand-made
guest regions, in the style of tests/test_mmu_hypercalls.py. The E2E test boots two xen domains doing 64
page-table updates each, one in lazy-MMU batches of 16 (four multicalls) and one a hypercall per update.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import RecordingLog

from hypervisor import hypercalls, mm
from hypervisor.domain import Domain, DomainTable
from hypervisor.guestmem import GuestView, Span
from hypervisor.hypercalls import multicall
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno, neg
from pvcluster.abi.xen import DOMID_SELF, Hypercall
from pvcluster.bus.messages import Region, VcpuAction
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


_Log = RecordingLog


@pytest.fixture
def dom() -> Iterator[Domain]:
    from pvcluster.spec import load_spec

    d = DomainTable().create(load_spec().domains[0])
    mm.forget(d.domid)
    yield d
    mm.forget(d.domid)


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


def _run(dom: Domain, entries: Sequence[Entry], extra: list[Region], *, count: int | None = None,
         writable: bool = True) -> tuple[int, Call]:
    raw = _entries(entries)
    regions = [Region(ENT, len(raw), raw, writable), *extra]
    n = len(entries) if count is None else count
    call = Call(dom=dom, vcpu=1, vt_ns=0, nr=Hypercall.multicall, args=[ENT, n, 0, 0, 0], mem=GuestView(regions),
                log=_Log())
    return multicall.handle(call), call


def _results(call: Call) -> dict[int, int]:
    """Index of each entry whose result field was written -> the u32 written."""
    out = {}
    for w in call.mem.writes:
        if ENT <= w.addr < ENT + multicall.MAX_ENTRIES * 32 and (w.addr - ENT) % 32 == 4:
            out[(w.addr - ENT) // 32] = struct.unpack("<I", w.data)[0]
    return out


def _traced(call: Call) -> list[dict[str, Any]]:
    return [kw for ev, kw in call.log.events if ev == "multicall"]


def test_entries_run_in_order_and_results_are_written_back(dom: Domain) -> None:
    pte = (PT << 12) + 8
    ops = Region(OPS, 12, struct.pack("<3I", MMUEXT_TLB_FLUSH_LOCAL, 0, 0), False)
    entries = [(Hypercall.xen_version, [XENVER_VERSION, 0]), _mmu_entry(), _mmuext_entry()]
    rc, call = _run(dom, entries, [_mmu_reqs([(pte, (DATA << 12) | P | RW)]), ops])
    assert rc == 0
    version = hypercalls.dispatch(Call(dom=dom, vcpu=1, vt_ns=0, nr=Hypercall.xen_version, args=[0, 0, 0, 0, 0],
                                       mem=GuestView([]), log=_Log()))
    assert _results(call) == {0: version, 1: 0, 2: 0}
    assert [w.addr for w in call.mem.writes] == [ENT + 4, ENT + 36, ENT + 68]  # in entry order
    # the entries' actions, in order, on the calling vCPU
    assert call.actions == [
        VcpuAction(kind="write_pa", vcpu=1, regs={"addr": pte, "value": (DATA << 12) | P | RW}),
        VcpuAction(kind="flush_tlb", vcpu=1, regs={}),
    ]
    (event,) = _traced(call)
    assert (event["entries"], event["results"], event["run"], event["dom"], event["vcpu"]) == (
        3, [version, 0, 0], 3, dom.domid, 1)


def test_a_failing_entry_does_not_stop_later_ones(dom: Domain) -> None:
    good, bad = (PT << 12) + 4, UNOWNED << 12
    entries = [_mmu_entry(REQS), (99, []), _mmu_entry(REQS + 16)]
    rc, call = _run(dom, entries, [_mmu_reqs([(bad, (DATA << 12) | P), (good, (DATA << 12) | P)])])
    assert rc == 0  # the multicall itself succeeded
    assert _results(call) == {0: neg(Errno.EPERM), 1: neg(Errno.ENOSYS), 2: 0}
    assert call.actions == [VcpuAction(kind="write_pa", vcpu=1, regs={"addr": good, "value": (DATA << 12) | P})]
    assert _traced(call)[0]["results"] == [-Errno.EPERM, -Errno.ENOSYS, 0]


def test_a_nested_multicall_entry_is_einval(dom: Domain) -> None:
    entries = [(Hypercall.multicall, [ENT, 1]), (Hypercall.xen_version, [XENVER_VERSION, 0])]
    rc, call = _run(dom, entries, [])
    assert rc == 0
    results = _results(call)
    assert results[0] == neg(Errno.EINVAL) and results[1] > 0


def test_too_many_entries_is_e2big_and_runs_nothing(dom: Domain) -> None:
    n = multicall.MAX_ENTRIES + 1
    rc, call = _run(dom, [_mmu_entry()] * n, [_mmu_reqs([((PT << 12), (DATA << 12) | P)])])
    assert rc == -Errno.E2BIG
    assert call.actions == [] and call.mem.writes == []
    # the largest batch allowed runs
    rc, call = _run(dom, [(Hypercall.xen_version, [XENVER_VERSION, 0])] * multicall.MAX_ENTRIES, [])
    assert rc == 0 and len(_results(call)) == multicall.MAX_ENTRIES


def test_an_unmapped_or_read_only_entry_array_is_efault(dom: Domain) -> None:
    entries = [_mmu_entry()]
    reqs = [_mmu_reqs([((PT << 12), (DATA << 12) | P)])]
    rc, call = _run(dom, entries, reqs, count=2)  # the array runs past the mapped region
    assert rc == -Errno.EFAULT and call.actions == [] and call.mem.writes == []
    rc, call = _run(dom, entries, reqs, writable=False)  # results cannot be written back
    assert rc == -Errno.EFAULT and call.actions == [] and call.mem.writes == []


def test_zero_entries_is_a_no_op(dom: Domain) -> None:
    rc, call = _run(dom, [], [])
    assert rc == 0 and call.actions == [] and call.mem.writes == []


def test_an_entry_that_blocks_ends_the_batch(dom: Domain) -> None:
    entries = [(Hypercall.sched_op, [SCHEDOP_BLOCK, 0]), (Hypercall.xen_version, [XENVER_VERSION, 0])]
    rc, call = _run(dom, entries, [])
    assert rc == 0 and call.deferred and call.shutdown is None
    assert _results(call) == {0: 0}  # the entry after the block is not run; its result field is untouched
    assert call.actions == [VcpuAction(kind="block", vcpu=1, regs={})]


def test_an_entry_that_shuts_down_ends_the_batch(dom: Domain) -> None:
    entries = [(Hypercall.sched_op, [SCHEDOP_SHUTDOWN, SHUT]), _mmu_entry()]
    reason = Region(SHUT, 4, struct.pack("<I", 3), False)
    rc, call = _run(dom, entries, [reason, _mmu_reqs([((PT << 12), (DATA << 12) | P)])])
    assert rc == 0 and call.deferred and call.shutdown == 3
    assert call.actions == []


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
    spans = hypercalls.copy_in(Hypercall.multicall, [ENT, len(entries), 0, 0, 0], _reader({ENT: raw, OPS: ops}))
    # the array (writable), the mmu_update requests, the mmuext op and, read through it, the vCPU bitmap
    assert spans == [Span(ENT, 32 * len(entries), writable=True), Span(REQS, 32), Span(OPS, 12), Span(MASK, 4)]


def test_copy_in_of_an_unreadable_array_or_bad_count_names_only_the_array() -> None:
    read = _reader({})
    assert hypercalls.copy_in(Hypercall.multicall, [ENT, 2, 0, 0, 0], read) == [Span(ENT, 64, writable=True)]
    assert hypercalls.copy_in(Hypercall.multicall, [ENT, 0, 0, 0, 0], read) == []
    assert hypercalls.copy_in(Hypercall.multicall, [ENT, multicall.MAX_ENTRIES + 1, 0, 0, 0], read) == []


def test_copy_in_is_capped_in_total() -> None:
    # 512 mmu_update entries of 512 requests each would name 4 MiB: spans past the total cap are dropped
    entries = [_mmu_entry(REQS + i * 0x2000, mm.MAX_BATCH) for i in range(multicall.MAX_ENTRIES)]
    raw = _entries(entries)
    spans = hypercalls.copy_in(Hypercall.multicall, [ENT, len(entries), 0, 0, 0], _reader({ENT: raw}))
    assert spans[0] == Span(ENT, len(raw), writable=True)
    assert sum(s.length for s in spans) <= hypercalls.MAX_COPY_IN_TOTAL
    assert 1 < len(spans) < len(entries) + 1


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
