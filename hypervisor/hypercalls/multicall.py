"""multicall (13): a batch of hypercalls in one trap, each entry's result written back into the entry.

An entry is 32 bytes on x86-32: u32 op @0, u32 result @4, six u32 args @8 (the hypercalls take five; the sixth
is ignored, as a 32-bit hypercall has only five argument registers). ``copy_in`` names the entry array and,
reading it, every entry's own buffers (through that family's ``copy_in``), so the whole batch crosses the bus
as one message.

Entries run in order, each as a hypercall of its own on the same vCPU at the same virtual time; the multicall
itself returns 0 and an entry's failure does not stop the ones after it (as in Xen). Differences from Xen, all
forced by the simulator having no hypercall continuations and one bus message per trap:

* ``count > MAX_ENTRIES`` (512): -E2BIG for the whole call, nothing run. Xen has no cap (it preempts a long
  batch with a continuation); here the batch must fit one message, and E2BIG is what mmu_update and mmuext_op
  answer for an oversized batch (``mm.MAX_BATCH``, the same 512) in this hypervisor.
* An entry that defers its vCPU (SCHEDOP_block, SCHEDOP_shutdown) ends the batch: its own result is written
  back, the entries after it are not run and their result fields are left untouched. (Xen would continue them
  after the block through a continuation.)
* An unreadable or read-only entry array is -EFAULT for the whole call (Xen faults on the first entry it cannot
  copy); a result that cannot be written back ends the batch with -EFAULT, as in Xen.
* A nested multicall entry gets -EINVAL (Xen refuses re-entry via MCSF_in_multicall).

Reads by a later entry see guest memory as it was at the trap: writes by earlier entries in the same batch
(done counts, results) are not visible to them.
"""

from __future__ import annotations

import struct

import attrs

from hypervisor.guestmem import GuestFault, Span
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.errno import Errno, as_signed
from pvcluster.abi.xen import Hypercall

NR = Hypercall.multicall

ENTRY_SIZE = 32  # struct multicall_entry on x86-32: u32 op, u32 result, u32 args[6]
ENTRY_ARGS = 5  # the arguments an entry's hypercall gets (the sixth slot is unused on x86-32)
MAX_ENTRIES = 512  # see the module docstring: -E2BIG beyond this


def unpack_entries(raw: bytes) -> list[tuple[int, list[int]]]:
    """(op, first five args) of each 32-byte entry in ``raw``."""
    out = []
    for fields in struct.iter_unpack("<8I", raw):
        out.append((fields[0], list(fields[2 : 2 + ENTRY_ARGS])))
    return out


def copy_in(args: list[int], read: Reader) -> list[Span]:
    from hypervisor.hypercalls import FAMILIES  # lazily: the registry imports this module

    entries, count = (a & 0xFFFFFFFF for a in args[:2])
    if not 0 < count <= MAX_ENTRIES:
        return []
    spans = [Span(entries, count * ENTRY_SIZE, writable=True)]  # results are written back into the entries
    raw = read(entries, count * ENTRY_SIZE)
    if raw is None:
        return spans
    seen = set(spans)
    for op, entry_args in unpack_entries(raw):
        family = FAMILIES.get(op)
        if family is None or op == NR:
            continue
        for span in family.copy_in(entry_args, read):
            if span not in seen:
                seen.add(span)
                spans.append(span)
    return spans


def handle(call: Call) -> int:
    from hypervisor.hypercalls import dispatch  # lazily: the registry imports this module

    entries, count = call.arg(0), call.arg(1)
    if count > MAX_ENTRIES:
        call.trace("multicall", entries=count, results=[], error="too-many-entries")
        return -Errno.E2BIG
    if count == 0:
        call.trace("multicall", entries=0, results=[], run=0, deferred=False)
        return 0
    try:
        raw = call.mem.read(entries, count * ENTRY_SIZE)
        call.mem.check(entries, count * ENTRY_SIZE, writable=True)  # the results are written back into it
    except GuestFault:
        call.trace("multicall", entries=count, results=[], error="entries-unmapped")
        return -Errno.EFAULT
    results: list[int] = []
    rc = 0
    for i, (op, entry_args) in enumerate(unpack_entries(raw)):
        sub = attrs.evolve(call, nr=op, args=entry_args, actions=[], deferred=False, shutdown=None)
        value = -Errno.EINVAL if op == NR else dispatch(sub)
        call.actions.extend(sub.actions)
        results.append(as_signed(value))
        try:
            call.mem.write_u32(entries + i * ENTRY_SIZE + 4, value)
        except GuestFault:
            rc = -Errno.EFAULT
            break
        if sub.deferred:
            call.deferred, call.shutdown = True, sub.shutdown
            break
    call.trace("multicall", entries=count, results=results, run=len(results), deferred=call.deferred)
    return rc
