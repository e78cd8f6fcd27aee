"""What the hypervisor knows about a domain's memory: which frames it owns and may map; the frame types are in
``hypervisor/pagetypes.py``.

The p2m is the identity (mfn == pfn) and a domain owns machine frames ``0 .. nr_pages-1``; the frames just after
them hold ``shared_info`` and the grant table's frames, which the hypervisor owns but, as in Xen
(``share_xen_page_with_guest``), lets the guest map. Each domain's frame numbers are its own (its process backs
them), so no domain can name another's. Guest RAM itself lives in the domain process, so the hypervisor cannot
read a page table: what it validates comes with the trap, and it keeps a copy of the tables it validated
(``pagetypes.Frames``, on ``Domain.frames``, as Xen keeps page types in the domain's frame table).

Also here: the batch protocol that mmu_update and mmuext_op share, with Xen's preemption. A batch stops when the
domain has spent its work budget for the window (``hypercall_preempt_check``) or when it reaches requests the
domain process did not copy in (it copies a bounded prefix of a long batch); the hypercall then returns through a
continuation, exactly as Xen's: the vCPU re-executes it with the array pointer advanced, the count reduced and
``MMU_UPDATE_PREEMPTED`` set, and the done count accumulates in guest memory across the pieces. It stops the same
way at a request whose copy an earlier request's page-table write made stale (``GuestView.observe``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from hypervisor import gnttab
from hypervisor.guestmem import GuestFault, NotCopied
from pvcluster.abi.errno import Errno
from pvcluster.abi.platform import SHARED_INFO_FRAME
from pvcluster.abi.xen import DOMID_SELF, MAX_LEGACY_VCPUS, MMU_UPDATE_PREEMPTED, PAGE_SHIFT
from pvcluster.bus.effects import Effect, FlushTlb, Invlpg

if TYPE_CHECKING:
    from hypervisor.domain import Domain
    from hypervisor.pagetypes import Refused


def owned(dom: Domain, mfn: int) -> bool:
    return 0 <= mfn < dom.nr_pages


def shared_info_frame(dom: Domain) -> int:
    """The frame after the domain's RAM (the domain process keeps shared_info there too)."""
    return int(dom.nr_pages) + SHARED_INFO_FRAME


def mappable(dom: Domain, mfn: int) -> bool:
    """A frame a present PTE of ``dom`` may name: its own RAM, its shared_info frame, or a frame its grant table
    has grown to. Never a page table's frame, nor one to pin: those must be ``owned``. Nor, writable or read-only,
    the GDT frame or the m2p table's frames: Xen shares the m2p read-only with privileged domains only
    (subarch_init_memory), and an unprivileged guest sees it only where Xen maps it, at MACH2PHYS_VIRT_START."""
    return (owned(dom, mfn) or mfn == shared_info_frame(dom)
            or gnttab.frame_index(dom.nr_pages, dom.grant, mfn) is not None)


def is_self(dom: Domain, foreigndom: int) -> bool:
    """An unprivileged domain may name only itself as the foreign domain of a batch (FD, and no PFD)."""
    return foreigndom in (DOMID_SELF, dom.domid)


class _Traces(Protocol):
    def trace(self, event: str, **fields: Any) -> None: ...


def deny(call: _Traces, err: Errno, reason: str, **fields: Any) -> int:
    """Trace why a memory-management request was refused and return the negated errno for EAX."""
    call.trace("mmu.denied", reason=reason, errno=err.name, **fields)
    return -err


def refused(call: _Traces, r: Refused, **fields: Any) -> int:
    """``deny`` for a type reference the frame types refused (``pagetypes.Refused``)."""
    return deny(call, r.err, r.reason, **{**r.fields, **fields})


def pte_frame(pte: int) -> int:
    return (pte & 0xFFFFFFFF) >> PAGE_SHIFT


def vcpus_in_mask(dom: Domain, mask: int) -> list[int] | None:
    """The vCPUs a guest vCPU bitmap (one u32: at most 32 vCPUs) names; None if it names one ``dom`` lacks.

    Xen silently ignores bits past the domain's last vCPU; refusing them catches guest bugs instead."""
    ids = [v for v in range(MAX_LEGACY_VCPUS) if mask >> v & 1]
    if any(v >= len(dom.vcpus) for v in ids):
        return None
    return ids


def flush_effects(targets: list[int], va: int | None) -> list[Effect]:
    """Whole-TLB flushes (``va`` None) or single-page invalidations of ``va`` on each target vCPU."""
    if va is None:
        return [FlushTlb(vcpu=v) for v in targets]
    return [Invlpg(vcpu=v, va=va & 0xFFFFFFFF) for v in targets]


def run_batch(
    call: Any, fmt: str, unmapped: str, one: Callable[[Any, int, tuple[int, ...]], int], what: str = "request",
    *, done_on_refusal: bool = False,
) -> int:
    """The batch protocol mmu_update and mmuext_op share: (array, count, done pointer, foreign domid). Entries run
    in order and stop at the first failure; the done pointer gets how many succeeded, as Xen reports it. A batch
    that must yield (budget spent, or the rest not copied in) continues through ``call.restart``. A foreign domid
    is refused before anything runs; ``done_on_refusal`` still writes the done count then (do_mmu_update goes to
    its ``out`` label; do_mmuext_op returns at once)."""
    base, count, done_ptr, foreigndom = (call.arg(i) for i in range(4))
    size = struct.calcsize(fmt)
    done_before = 0
    if count & MMU_UPDATE_PREEMPTED:
        count &= ~MMU_UPDATE_PREEMPTED
        done_before = _read_done(call, done_ptr)
    if not is_self(call.dom, foreigndom):
        rc = deny(call, Errno.EPERM, "foreign-domid", foreigndom=foreigndom)
        if done_on_refusal:
            _write_done(call, done_ptr, done_before, what)
        return rc
    rc, done = 0, 0
    for i in range(count):
        if i and call.preempt_check():
            call.restart([base + i * size, (count - i) | MMU_UPDATE_PREEMPTED, done_ptr, foreigndom])
            break
        try:
            fields = struct.unpack(fmt, call.mem.read(base + i * size, size))
            call.spend(1)
            rc = one(call, i, fields)
        except NotCopied:
            # Past the prefix the domain process copied in (an op reads guest memory before it acts, so nothing
            # was done): continue from here in a later trap. Nothing copied at all: the caller decides (a
            # multicall continues at this entry).
            if not i:
                raise
            call.restart([base + i * size, (count - i) | MMU_UPDATE_PREEMPTED, done_ptr, foreigndom])
            break
        except GuestFault:
            rc = deny(call, Errno.EFAULT, unmapped, index=i)
            break
        call.settle()  # the next request is read after this one's page-table write, as Xen reads it
        if rc:
            break
        done = i + 1
    _write_done(call, done_ptr, done_before + done, what)
    return rc


def _read_done(call: Any, done_ptr: int) -> int:
    """The done count a continuation accumulates into (Xen: ``(void)copy_from_guest(&done, pdone, 1)``)."""
    if not done_ptr:
        return 0
    try:
        return int(call.mem.u32(done_ptr))
    except (GuestFault, NotCopied):
        return 0


def _write_done(call: Any, done_ptr: int, done: int, what: str) -> None:
    if not done_ptr:
        return
    try:
        call.mem.write_u32(done_ptr, done)
    except (GuestFault, NotCopied):
        # Xen ignores a failed copy of the done count: the updates already happened, so the result stands.
        call.trace("mmu.done_fault", addr=done_ptr, what=what)
