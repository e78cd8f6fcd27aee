"""What the hypervisor knows about a domain's memory: which frames it owns and which it has pinned as page tables.

The p2m is the identity (mfn == pfn) and a domain owns machine frames ``0 .. nr_pages-1``; the frame just after
them holds ``shared_info``, which the hypervisor owns but, as in Xen (``share_xen_page_with_guest``), lets the
guest map. Guest RAM itself lives in the domain process, so the hypervisor cannot read a page table: pinning here
records the guest's promise (frame F is an L1/L2 table) and is what the mapping checks are made against.

Pinned frames are kept per domid (``Domain`` carries no memory state); ``forget`` must be called when a domain is
destroyed. Domids come from one ``DomainTable``, which never reuses them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from hypervisor.guestmem import GuestFault
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import DOMID_SELF, MAX_LEGACY_VCPUS, PAGE_SHIFT
from pvcluster.bus.messages import VcpuAction

if TYPE_CHECKING:
    from hypervisor.domain import Domain

# x86-32 non-PAE page-table entry bits.
PTE_PRESENT = 0x001
PTE_RW = 0x002
PTE_PSE = 0x080  # in an L2 entry: a 4 MiB superpage, which Xen refuses to PV guests

# Batched hypercalls are capped so one call's request array stays well inside a bus message (Xen instead
# preempts long batches with a continuation, which this hypervisor does not model).
MAX_BATCH = 512

_pinned: dict[int, dict[int, int]] = {}  # domid -> {mfn: level (1 = L1, 2 = L2)}


def owned(dom: Domain, mfn: int) -> bool:
    return 0 <= mfn < dom.nr_pages


def mappable(dom: Domain, mfn: int) -> bool:
    """A frame a present PTE of ``dom`` may name: its own RAM, or its shared_info frame."""
    return owned(dom, mfn) or mfn == dom.nr_pages


def pin(dom: Domain, mfn: int, level: int) -> bool:
    """Pin ``mfn`` as a level-``level`` table; False if it is already pinned (at any level)."""
    tables = _pinned.setdefault(dom.domid, {})
    if mfn in tables:
        return False
    tables[mfn] = level
    return True


def unpin(dom: Domain, mfn: int) -> bool:
    """False if ``mfn`` was not pinned."""
    return _pinned.get(dom.domid, {}).pop(mfn, None) is not None


def pinned_level(dom: Domain, mfn: int) -> int | None:
    return _pinned.get(dom.domid, {}).get(mfn)


def is_pinned(dom: Domain, mfn: int) -> bool:
    return pinned_level(dom, mfn) is not None


def forget(domid: int) -> None:
    _pinned.pop(domid, None)


def is_self(dom: Domain, foreigndom: int) -> bool:
    """An unprivileged domain may name only itself as the foreign domain of a batch (FD, and no PFD)."""
    return foreigndom in (DOMID_SELF, dom.domid)


class _Traces(Protocol):
    def trace(self, event: str, **fields: Any) -> None: ...


def deny(call: _Traces, err: Errno, reason: str, **fields: Any) -> int:
    """Trace why a memory-management request was refused and return the negated errno for EAX."""
    call.trace("mmu.denied", reason=reason, errno=err.name, **fields)
    return -err


def pte_frame(pte: int) -> int:
    return (pte & 0xFFFFFFFF) >> PAGE_SHIFT


def vcpus_in_mask(dom: Domain, mask: int) -> list[int] | None:
    """The vCPUs a guest vCPU bitmap (one u32: at most 32 vCPUs) names; None if it names one ``dom`` lacks.

    Xen silently ignores bits past the domain's last vCPU; refusing them catches guest bugs instead."""
    ids = [v for v in range(MAX_LEGACY_VCPUS) if mask >> v & 1]
    if any(v >= len(dom.vcpus) for v in ids):
        return None
    return ids


def flush_actions(targets: list[int], va: int | None) -> list[VcpuAction]:
    """Whole-TLB flushes (``va`` None) or single-page invalidations of ``va`` on each target vCPU."""
    if va is None:
        return [VcpuAction(kind="flush_tlb", vcpu=v, regs={}) for v in targets]
    return [VcpuAction(kind="invlpg", vcpu=v, regs={"va": va & 0xFFFFFFFF}) for v in targets]


def run_batch(
    call: Any, fmt: str, unmapped: str, one: Callable[[Any, int, tuple[int, ...]], int], what: str = "request"
) -> int:
    """The batch protocol mmu_update and mmuext_op share: (array, count, done pointer, foreign domid). Entries run
    in order and stop at the first failure; the done pointer gets how many succeeded, as Xen reports it."""
    base, count, done_ptr, foreigndom = (call.arg(i) for i in range(4))
    size = struct.calcsize(fmt)
    rc, done = 0, 0
    if not is_self(call.dom, foreigndom):
        rc = deny(call, Errno.EPERM, "foreign-domid", foreigndom=foreigndom)
    elif count > MAX_BATCH:
        rc = deny(call, Errno.E2BIG, "batch-too-large", count=count)
    else:
        for i in range(count):
            try:
                fields = struct.unpack(fmt, call.mem.read(base + i * size, size))
            except GuestFault:
                rc = deny(call, Errno.EFAULT, unmapped, index=i)
                break
            rc = one(call, i, fields)
            if rc:
                break
            done = i + 1
    if done_ptr:
        try:
            call.mem.write_u32(done_ptr, done)
        except GuestFault:
            # Xen ignores a failed copy of the done count: the updates already happened, so the result stands.
            call.trace("mmu.done_fault", addr=done_ptr, what=what)
    return rc
