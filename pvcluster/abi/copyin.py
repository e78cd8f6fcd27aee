"""What each hypercall copies in from guest memory: the guest buffers it reads or writes, named from its arguments.

Guest RAM lives in the domain process and the hypervisor never touches it, so the domain process copies in, at
the trap, every span the hypercall's descriptor here names (read through the trapping vCPU's page tables) and
ships them with the request; the hypervisor's handler then reads and writes only those (``GuestView``). This is
ABI knowledge (the layouts of the argument structs), so it lives here, shared by both processes.

A descriptor is ``(args, read) -> list[Span]``: ``args`` are the five argument registers, ``read(addr, length)``
reads guest memory (None where it is not mapped), for structs that point at further buffers (a multicall's
entries, a sched_poll's port array). Descriptors must not trust what they read: lengths are capped, and the
total a trap may carry is capped in ``copy_in`` so a hostile guest cannot balloon a bus message.

Long batches (mmu_update, mmuext_op, multicall) copy a bounded prefix; the hypervisor continues the rest through a
hypercall continuation, as Xen preempts long batches, so a batch of any length works.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

import attrs

from pvcluster.abi import layouts, structs
from pvcluster.abi.platform import KEXEC_MAX_IMAGE_BYTES, MAX_GRANT_FRAMES
from pvcluster.abi.x86 import PTE_PRESENT
from pvcluster.abi.xen import (
    FIRST_RESERVED_GDT_ENTRY,
    GDT_ENTRIES_PER_FRAME,
    KEXEC_SEGMENT_MAX,
    MMU_UPDATE_PREEMPTED,
    PAGE_SHIFT,
    PAGE_SIZE,
    TRAP_INFO_SIZE,
    ConsoleIO,
    EvtchnOp,
    GnttabOp,
    Hypercall,
    KexecCmd,
    MemoryOp,
    MmuCmd,
    MmuextCmd,
    SchedOp,
    VcpuOp,
)

Reader = Callable[[int, int], bytes | None]
_U32 = 0xFFFFFFFF

# Caps on what one trap carries. Each span at MAX_SPAN, all spans of one trap at MAX_TOTAL (spans past the total are
# dropped in order, so the first ones, a batch's array, stay); a batch copies at most MAX_BATCH_COPY requests or ops
# and a multicall at most MAX_MULTICALL_COPY entries per trap.
MAX_SPAN = 64 * 1024
MAX_TOTAL = 256 * 1024
MAX_BATCH_COPY = 512
MAX_MULTICALL_COPY = 128
_TRAP_TABLE_MAX = 256  # entries: one per vector (hypervisor/hypercalls/set_trap_table.py stops there too)
# Xen copies a console write in chunks and has no upper bound; one trap here carries at most this much, the rest
# is dropped and traced.
MAX_CONSOLE_WRITE = 16 * 1024
# Whole frames copied by machine address for page-table validation, per trap (follow expansions included): they
# are not counted in MAX_TOTAL, and a request that needs a frame past this many continues in a later trap.
MAX_TABLE_FRAMES = 128


@attrs.frozen
class Span:
    """A guest buffer a hypercall may touch: ``addr`` and ``length`` as the guest gave them. A zero length names
    no bytes, only the translation of ``addr`` (update_va_mapping writes the L1 entry that maps it)."""

    addr: int
    length: int
    writable: bool = False
    # A machine address (``addr``) instead of a virtual one: a whole frame the hypervisor must see to validate it
    # as a page table (pinning it, making it a base, pointing an L2 entry at it). ``follow``: the frame is to
    # become an L2, so the L1 frames its guest slots name come too (``pagetables.l2_targets``).
    machine: bool = False
    follow: bool = False


Descriptor = Callable[[list[int], Reader], list[Span]]


def _none(args: list[int], read: Reader) -> list[Span]:
    return []


def _console_io(args: list[int], read: Reader) -> list[Span]:
    if args[0] == ConsoleIO.write and args[1] > 0:
        return [Span(args[2], min(args[1], MAX_CONSOLE_WRITE))]
    return []


def _xen_version(args: list[int], read: Reader) -> list[Span]:
    size = structs.XENVER_OUT_SIZE.get(args[0])
    return [Span(args[1], size, writable=True)] if size else []


def _sched_op(args: list[int], read: Reader) -> list[Span]:
    if args[0] == SchedOp.shutdown:
        return [Span(args[1], layouts.SCHED_SHUTDOWN.size)]
    if args[0] == SchedOp.poll:
        spans = [Span(args[1], layouts.SCHED_POLL.size)]
        raw = read(args[1], layouts.SCHED_POLL.size)
        if raw is not None:
            ports, nr = struct.unpack_from("<II", raw)
            if 0 < nr <= structs.SCHED_POLL_MAX_PORTS:
                spans.append(Span(ports, 4 * nr))
        return spans
    return []


def _vcpu_op(args: list[int], read: Reader) -> list[Span]:
    if args[0] == VcpuOp.initialise:
        return [Span(args[2], layouts.VCPU_GUEST_CONTEXT.size)]
    size = structs.VCPU_TIMER_STRUCT_SIZE.get(args[0])
    return [Span(args[2], size)] if size is not None else []


def _batch(args: list[int], size: int) -> tuple[list[Span], int]:
    """The request array prefix and the done counter of an mmu_update / mmuext_op: (spans, requests copied)."""
    base, count, done = args[0], args[1] & ~MMU_UPDATE_PREEMPTED & _U32, args[2]
    # the done counter is read back (a continuation accumulates into it) and written
    spans = [Span(done, 4, writable=True)] if done else []
    n = min(count, MAX_BATCH_COPY)
    if n:
        spans.insert(0, Span(base, n * size))
    return spans, n


def _table(mfn: int, *, follow: bool = False) -> Span:
    """A frame to validate as a page table, by machine address (``follow``: as an L2, with the L1s it names)."""
    return Span((mfn & 0xFFFFF) << PAGE_SHIFT, PAGE_SIZE, machine=True, follow=follow)


_PAE_ADDR = 0x000FFFFFFFFFF000


def _mmu_update(args: list[int], read: Reader) -> list[Span]:
    spans, n = _batch(args, layouts.MMU_UPDATE.size)
    raw = read(args[0], n * layouts.MMU_UPDATE.size) if n else None
    if raw is None:
        return spans
    # A present entry written into an L2 makes the frame it names an L1, which the hypervisor validates: which
    # frames are L2s only the hypervisor knows, so every present request's frame comes (a set_pte's data page
    # too; it is one frame). Machine addresses past 4 GiB name nothing.
    # (A PAE entry's frame is bits 12..51.)
    tables = dict.fromkeys(_table((val & _PAE_ADDR) >> PAGE_SHIFT) for ptr, val in struct.iter_unpack("<QQ", raw)
                           if ptr & 3 in (MmuCmd.NORMAL_PT_UPDATE, MmuCmd.PT_UPDATE_PRESERVE_AD)
                           and val & PTE_PRESENT and not (val & _PAE_ADDR) >> 32)
    return spans + list(tables)


def _mmuext_op(args: list[int], read: Reader) -> list[Span]:
    spans, n = _batch(args, layouts.MMUEXT_OP.size)
    raw = read(args[0], n * layouts.MMUEXT_OP.size) if n else None
    if raw is None:
        return spans
    # The MULTI ops point at a vCPU bitmap, which can be named only once the op array itself has been read; a pin
    # or a new base names the frame the hypervisor validates (an L2 with the L1s it names; PAE: an L3 with its L2s
    # and their L1s, ``domains/tablecopy.py``).
    for cmd, arg1, mask_ptr in struct.iter_unpack("<3I", raw):
        if cmd in structs.MMUEXT_MULTI_CMDS:
            more = Span(mask_ptr, 4)
        elif cmd in (MmuextCmd.PIN_L1_TABLE, MmuextCmd.PIN_L2_TABLE, MmuextCmd.PIN_L3_TABLE, MmuextCmd.NEW_BASEPTR):
            more = _table(arg1, follow=cmd != MmuextCmd.PIN_L1_TABLE)
        else:
            continue
        if more not in spans:
            spans.append(more)
    return spans


def _update_va_mapping(args: list[int], read: Reader) -> list[Span]:
    # Which L1 entry maps va: the hypervisor needs it to know what a later multicall entry's buffers still mean.
    ptr = structs.uvmf_bitmap_ptr(args[3])
    return [Span(args[0], 0)] + ([] if ptr is None else [Span(ptr, 4)])


def _event_channel_op(args: list[int], read: Reader) -> list[Span]:
    size = structs.EVTCHNOP_SIZE.get(args[0])
    if size is None:
        return []
    return [Span(args[1], size, writable=args[0] in structs.EVTCHNOP_WITH_OUT)]


def _callback_op(args: list[int], read: Reader) -> list[Span]:
    size = structs.CALLBACKOP_SIZE.get(args[0])
    return [Span(args[1], size)] if size else []


def _member(raw: bytes, lay: layouts.Layout, member: str) -> int:
    """A u32 member of a struct as read from guest memory."""
    return int(struct.unpack_from("<I", raw, lay.offset(member))[0])


def _grant_table_op(args: list[int], read: Reader) -> list[Span]:
    size = structs.GNTTABOP_SIZE.get(args[0])
    if size is None:
        return []
    spans = [Span(args[1], size, writable=True)]  # every command handled writes its status or version back
    raw = read(args[1], size) if args[0] == GnttabOp.setup_table else None
    if raw is not None:
        nr = _member(raw, layouts.GNTTAB_SETUP_TABLE, "nr_frames")
        # More frames than the table may have is refused before the list is touched.
        if 0 < nr <= MAX_GRANT_FRAMES:
            spans.append(Span(_member(raw, layouts.GNTTAB_SETUP_TABLE, "frame_list"), 4 * nr, writable=True))
    return spans


_RESERVATION_OPS = frozenset({MemoryOp.current_reservation, MemoryOp.maximum_reservation})
_MACHPHYS_OPS = frozenset({MemoryOp.machphys_mfn_list, MemoryOp.machphys_compat_mfn_list})


def _memory_op(args: list[int], read: Reader) -> list[Span]:
    if args[0] in _RESERVATION_OPS:
        return [Span(args[1], layouts.XEN_MEMORY_DOMAIN.size)]
    if args[0] not in _MACHPHYS_OPS:
        return []
    lay = layouts.XEN_MACHPHYS_MFN_LIST
    spans = [Span(args[1], lay.size, writable=True)]
    raw = read(args[1], lay.size)
    if raw is not None:
        n = min(_member(raw, lay, "max_extents"), structs.MACHPHYS_MAX_EXTENTS)
        if n:
            spans.append(Span(_member(raw, lay, "extent_start"), 4 * n, writable=True))
    return spans


def _set_gdt(args: list[int], read: Reader) -> list[Span]:
    """The frame list: one 32-bit frame number per 512 entries; nothing when the count is refused before the copy."""
    entries = args[1]
    nr = -(-entries // GDT_ENTRIES_PER_FRAME)
    return [Span(args[0], 4 * nr)] if 0 < entries <= FIRST_RESERVED_GDT_ENTRY else []


def _set_trap_table(args: list[int], read: Reader) -> list[Span]:
    """The trap_info array up to and including its terminating entry (address 0), at most one entry per vector. The
    span ends where the guest's memory stops being readable: the handler then fails with -EFAULT there."""
    base = args[0]
    if base == 0:
        return []
    size = 0
    while size < _TRAP_TABLE_MAX * TRAP_INFO_SIZE:
        raw = read(base + size, TRAP_INFO_SIZE)
        if raw is None:
            break
        size += TRAP_INFO_SIZE
        if struct.unpack_from("<I", raw, 4)[0] == 0:
            break
    return [Span(base, size)] if size else []


def _multicall(args: list[int], read: Reader, extra: Mapping[int, Descriptor] | None = None) -> list[Span]:
    """The entry array and each entry's buffers (``extra``: the extensions' descriptors, for entries that call an
    extension's hypercall)."""
    entries, count = args[0], args[1]
    n = min(count, MAX_MULTICALL_COPY)
    if not n:
        return []
    size = layouts.MULTICALL_ENTRY.size
    spans = [Span(entries, n * size, writable=True)]  # results are written back into the entries
    raw = read(entries, n * size)
    if raw is None:
        return spans
    seen, total = set(spans), n * size
    for fields in struct.iter_unpack("<8I", raw):
        op, entry_args = fields[0], list(fields[2 : 2 + structs.MULTICALL_ENTRY_ARGS])
        if op in (Hypercall.multicall, Hypercall.kexec_op):
            continue  # refused in a batch (hypervisor/hypercalls/multicall.py: REFUSED), so it copies nothing
        new = [s for s in dict.fromkeys(describe(op, entry_args, read, extra)) if s not in seen]
        size = sum(s.length for s in new if not s.machine)  # table frames have their own cap (MAX_TABLE_FRAMES)
        # An entry's buffers come whole or not at all: the multicall continues at the first entry left out, so a
        # batch entry never runs with its ops but without its done counter.
        if total + size > MAX_TOTAL or any(not 0 <= s.length <= MAX_SPAN for s in new):
            break
        seen.update(new)
        spans += new
        total += size
    return spans


def _u64_ptr(raw: bytes, lay: layouts.Layout, member: str) -> int | None:
    """A 64-bit guest handle or address as a 32-bit guest pointer; None when its high half is set (no such address
    in a 32-bit guest: the handler answers -EFAULT)."""
    value = int(struct.unpack_from("<Q", raw, lay.offset(member))[0])
    return None if value >> 32 else value


def _kexec_op(args: list[int], read: Reader) -> list[Span]:
    """kexec_op (37, xen/include/public/kexec.h): the exec/unload/status struct; for KEXEC_CMD_kexec_load the
    xen_kexec_load_t, its segment array (at most KEXEC_SEGMENT_MAX - 1 entries, as Xen's kexec_load accepts) and
    each segment's buffer, in MAX_SPAN pieces, KEXEC_MAX_IMAGE_BYTES in all (the cap ``copy_in`` gives this call).
    A segment past that is not copied: the handler refuses the image as too large before it reads one."""
    cmd, arg = args[0], args[1]
    if cmd == KexecCmd.kexec:
        return [Span(arg, layouts.KEXEC_EXEC.size)]
    if cmd in (KexecCmd.kexec_unload, KexecCmd.kexec_status):
        return [Span(arg, layouts.KEXEC_UNLOAD.size)]
    if cmd != KexecCmd.kexec_load:
        return []
    lay, seg = layouts.KEXEC_LOAD, layouts.KEXEC_SEGMENT
    spans = [Span(arg, lay.size)]
    raw = read(arg, lay.size)
    if raw is None:
        return spans
    nr, segs = _member(raw, lay, "nr_segments"), _u64_ptr(raw, lay, "segments")
    if segs is None or not 0 < nr < KEXEC_SEGMENT_MAX:
        return spans
    spans.append(Span(segs, nr * seg.size))
    table = read(segs, nr * seg.size)
    if table is None:
        return spans
    total = 0
    for i in range(nr):
        entry = table[i * seg.size : (i + 1) * seg.size]
        buf, size = _u64_ptr(entry, seg, "buf"), int(struct.unpack_from("<Q", entry, seg.offset("buf_size"))[0])
        if buf is None or total + size > KEXEC_MAX_IMAGE_BYTES:
            break
        spans += [Span(buf + off, min(MAX_SPAN, size - off)) for off in range(0, size, MAX_SPAN)]
        total += size
    return spans


DESCRIPTORS: dict[int, Descriptor] = {
    Hypercall.console_io: _console_io,
    Hypercall.xen_version: _xen_version,
    Hypercall.sched_op: _sched_op,
    Hypercall.vcpu_op: _vcpu_op,
    Hypercall.mmu_update: _mmu_update,
    Hypercall.update_va_mapping: _update_va_mapping,
    Hypercall.mmuext_op: _mmuext_op,
    Hypercall.multicall: _multicall,
    Hypercall.event_channel_op: _event_channel_op,
    Hypercall.callback_op: _callback_op,
    Hypercall.grant_table_op: _grant_table_op,
    Hypercall.memory_op: _memory_op,
    Hypercall.set_callbacks: _none,
    Hypercall.set_timer_op: _none,
    Hypercall.set_gdt: _set_gdt,
    Hypercall.stack_switch: _none,
    Hypercall.set_trap_table: _set_trap_table,
    Hypercall.fpu_taskswitch: _none,
    Hypercall.update_descriptor: _none,
    Hypercall.vm_assist: _none,
    Hypercall.kexec_op: _kexec_op,
}
# What one trap may carry in all, where a hypercall needs more than MAX_TOTAL: kexec_load's image (one trap, as
# Xen's kexec_load copies every segment in one call), plus its structs.
TOTAL_CAPS: dict[int, int] = {Hypercall.kexec_op: KEXEC_MAX_IMAGE_BYTES + PAGE_SIZE}


def notified_port(nr: int, args: list[int], read: Reader) -> int | None:
    """The port an ``EVTCHNOP_send`` trap notifies (None for any other trap, or an unreadable struct): the domain
    process copies a backend's ring with the trap that notifies it. A send inside a multicall is not looked at."""
    if nr != Hypercall.event_channel_op or (args[0] if args else -1) != EvtchnOp.send or len(args) < 2:
        return None
    raw = read(args[1] & _U32, layouts.EVTCHN_SEND.size)
    return None if raw is None else int(struct.unpack_from("<I", raw)[0])


def describe(nr: int, args: list[int], read: Reader, extra: Mapping[int, Descriptor] | None = None) -> list[Span]:
    """The spans hypercall ``nr`` names, uncapped (``copy_in`` applies the caps). ``extra``: the descriptors of the
    extensions the spec loads (``pvcluster/abi/extcopy.py``), consulted first (an extension allowed to override a
    built-in number declares its own copy-in too)."""
    descriptor = extra.get(nr) if extra else None
    if descriptor is None:
        descriptor = DESCRIPTORS.get(nr)
    if descriptor is None:
        return []
    regs = [a & _U32 for a in args[:5]] + [0] * (5 - len(args[:5]))
    if descriptor is _multicall:  # the one descriptor that describes other hypercalls: it needs the extensions too
        return _multicall(regs, read, extra)
    return descriptor(regs, read)


def copy_in(nr: int, args: list[int], read: Reader, extra: Mapping[int, Descriptor] | None = None) -> list[Span]:
    """The spans to copy in for a trap, capped per span and in total, first ones first. Table frames (``machine``)
    are not counted in the total: the domain process caps them at MAX_TABLE_FRAMES as it expands them."""
    kept: list[Span] = []
    total, cap = 0, TOTAL_CAPS.get(nr, MAX_TOTAL)
    for s in describe(nr, args, read, extra):
        if s.machine:
            kept.append(s)
        elif 0 <= s.length <= MAX_SPAN and total + s.length <= cap:
            kept.append(s)
            total += s.length
    return kept
