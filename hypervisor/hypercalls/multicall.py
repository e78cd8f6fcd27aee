"""multicall (13): a batch of hypercalls in one trap, each entry's result written back into the entry.

An entry is 32 bytes on x86-32: u32 op @0, u32 result @4, six u32 args @8 (the hypercalls take five; the sixth
is ignored, as a 32-bit hypercall has only five argument registers). The copy-in descriptor names the entry array
and, reading it, every entry's own buffers, so a batch crosses the bus as one message.

Entries run in order, each as a hypercall of its own on the same vCPU at the same virtual time; the multicall
itself returns 0 and an entry's failure does not stop the ones after it (as in Xen's do_multicall,
xen/common/multicall.c). As there, each entry runs against guest memory as the entries before it left it: the
entry itself, and every buffer it reads, are read after the earlier entries' writes (a done count, an event
channel's out port, an earlier result; ``GuestView`` overlays them on what was copied in) and after their
page-table writes. Those happen in the domain process, after the trap, so an entry whose buffers an earlier
entry's effects made stale (a PTE or PDE their translation went through, a new CR3; ``GuestView.observe``), or
which names buffers that were not copied in (an earlier entry rewrote its arguments), does not run in this trap:
the multicall returns through a continuation from that entry, and the re-executed trap copies in through the
tables as they now are. That is Xen's own preemption (hypercall_create_continuation), so it is deterministic and
the guest cannot tell, except that it costs another trap.

As Xen, a long batch is preempted: before every entry but the first the domain's work budget for the window is
checked (``hypercall_preempt_check``), and when it is spent, or the entries left were not copied in with this
trap, the multicall returns through a continuation that re-executes it from the next entry. An entry that was
itself preempted (a long mmuext_op) has its continuation arguments written back into its entry, and the multicall
continues from that entry. Differences from Xen:

* An entry that defers its vCPU (SCHEDOP_block, SCHEDOP_shutdown) ends the batch: its own result is written
  back, the entries after it are not run and their result fields are left untouched.
* An unreadable or read-only entry is -EFAULT for the multicall, stopping there (Xen faults on the first entry
  it cannot copy); a result that cannot be written back ends the batch with -EFAULT, as in Xen.
* A nested multicall entry gets -EINVAL (Xen refuses re-entry via MCSF_in_multicall); so does a kexec_op entry (its
  image may not fit one trap's copy-in: ``REFUSED``).
* Only the result field is written back (a release build of Xen; a debug build first fills the whole entry with
  0xAA, so a guest must not read anything else of a finished entry).
* An entry's own writes after its own page-table writes (an mmu_update's done count, its result field) go
  through the translation their page had at the trap, as a TLB entry not flushed yet lets Xen's do.
"""

from __future__ import annotations

import struct

from hypervisor.guestmem import GuestFault, NotCopied
from hypervisor.hypercalls.base import Call
from pvcluster.abi.copyin import describe
from pvcluster.abi.errno import Errno, as_signed
from pvcluster.abi.layouts import MULTICALL_ENTRY
from pvcluster.abi.structs import MULTICALL_ENTRY_ARGS
from pvcluster.abi.xen import Hypercall

NR = Hypercall.multicall
# Entries refused with -EINVAL without running: a nested multicall (Xen's MCSF_in_multicall), and kexec_op, whose
# image may be larger than a whole batch's copy-in (pvcluster/abi/copyin.py: MAX_TOTAL), so such an entry could never
# run in any trap (Xen's kexec_op is dom0's, which no batch carries in practice).
REFUSED = frozenset({NR, Hypercall.kexec_op})
ENTRY = struct.Struct("<8I")
MULTICALL_ENTRY_SIZE = MULTICALL_ENTRY.size
MULTICALL_ENTRY_RESULT = MULTICALL_ENTRY.offset("result")


class _Stop(Exception):
    """Ends the batch: ``rc`` is the multicall's own result."""

    def __init__(self, rc: int) -> None:
        self.rc = rc


def handle(call: Call) -> int:
    entries, count = call.arg(0), call.arg(1)
    results: list[int] = []
    rc = 0
    try:
        for i in range(count):
            here = entries + i * MULTICALL_ENTRY_SIZE
            if i and call.preempt_check():
                call.restart([here, count - i])
                break
            call.work_ns += call.hv.cost.multicall_entry_ns  # decoding and dispatching the entry
            if not _run_entry(call, i, here, results):
                break
    except _Stop as stop:
        rc = stop.rc
    call.record("multicall", entries=count, results=results, run=len(results), deferred=call.deferred,
                continued=call.continuation is not None)
    return rc


def _run_entry(call: Call, i: int, here: int, results: list[int]) -> bool:
    """Run entry ``i`` at ``here``; False when the batch ends (deferred, or continued later)."""
    from hypervisor.hypercalls import dispatch  # lazily: the registry imports this module

    try:
        fields = ENTRY.unpack(call.mem.read(here, MULTICALL_ENTRY_SIZE))
        call.mem.check(here, MULTICALL_ENTRY_SIZE, writable=True)  # the result is written back into it
    except NotCopied:
        return _continue_at(call, i, here)
    except GuestFault:
        raise _Stop(-Errno.EFAULT) from None
    op, args = fields[0], list(fields[2 : 2 + MULTICALL_ENTRY_ARGS])
    if op not in REFUSED and not _buffers_here(call, op, args):
        return _continue_at(call, i, here)
    call.spend(1)
    sub = call.sub(op, args)
    try:
        value = -Errno.EINVAL if op in REFUSED else dispatch(sub)
    except NotCopied:
        return _continue_at(call, i, here)
    sub.settle()  # the entries after this one see what its effects will do to guest memory
    call.effects.extend(sub.effects)
    call.settled = len(call.effects)
    call.remote.extend(sub.remote)
    call.work_ns += sub.work_ns
    results.append(as_signed(value))
    try:
        if sub.continuation is not None:
            # Xen: the result field, then the whole entry with the sub-call's continuation arguments
            entry = ENTRY.pack(op, value & 0xFFFFFFFF, *sub.continuation, *[0] * (6 - len(sub.continuation)))
            call.mem.write(here, entry)
        else:
            call.mem.write_u32(here + MULTICALL_ENTRY_RESULT, value)
    except GuestFault:
        raise _Stop(-Errno.EFAULT) from None
    if sub.continuation is not None:
        call.restart([here, call.arg(1) - i])
        return False
    if sub.deferred:
        call.deferred, call.shutdown = True, sub.shutdown
        return False
    return True


def _buffers_here(call: Call, op: int, args: list[int]) -> bool:
    """Whether every buffer the entry names, read from guest memory as the earlier entries left it, came with this
    trap and is not stale. Only then does it run here: an entry never runs with part of its buffers (a batch
    without its done count), and never reads a copy made before an earlier entry changed what it holds."""
    spans = describe(op, args, call.mem.peek, call.hv.extensions.descriptors)
    # A table frame to validate is not a buffer: one left out makes the entry continue where it needs it.
    return all(call.mem.holds(s.addr, s.length, writable=s.writable) for s in spans if not s.machine)


def _continue_at(call: Call, i: int, here: int) -> bool:
    """Entry ``i`` (or what it reads) was not copied in with this trap, or an earlier entry made the copy stale:
    continue from it in the next one. The first entry's buffers always are there and fresh, so a batch always
    makes progress; if not, it was not mapped."""
    if not i:
        raise _Stop(-Errno.EFAULT)
    call.restart([here, call.arg(1) - i])
    return False
