"""memory_op (12): XENMEM_current_reservation, maximum_reservation and machphys_mfn_list, as Xen 4.17 answers a
32-bit PV guest.

The reservations follow common/memory.c ``do_memory_op`` (which compat_memory_op hands them to unchanged): the
argument is a ``domid_t``, DOMID_SELF or the caller's own id names the caller, a domain that does not exist is
-ESRCH and any other is -EPERM (xsm_memory_stat_reservation, XSM_TARGET). The domain's RAM is fixed (no balloon:
increase_reservation is not implemented), so its current and maximum reservations are both ``nr_pages``; the
hypervisor's own frames after it (shared_info, grant frames) are Xen heap pages, which ``tot_pages`` does not count.

machphys_mfn_list (and machphys_compat_mfn_list, which is the same call for a compat guest) follows
arch/x86/x86_64/compat/mm.c ``compat_arch_memory_op`` (as the old x86-32 build's ``subarch_memory_op`` did, extent
i's mfn being its L2 slot's frame): it lists the machine frames of the m2p table in 2 MiB extents, the first mfn of
each (the table is machine-contiguous within an extent), at most ``max_extents`` and at most as many as the table
has, and returns 0 with ``nr_extents`` = the number written. The table is the domain's m2p frames after its grant
frames (pvcluster.abi.platform ``m2p_frames``, contiguous): one extent for a domain of up to 512 Ki pages, with as
many of its frames backed as the domain's RAM needs entries. Every other sub-op is -ENOSYS.
"""

from __future__ import annotations

import struct
from typing import Any

from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.layouts import XEN_MACHPHYS_MFN_LIST, XEN_MEMORY_DOMAIN
from pvcluster.abi.platform import M2P_FRAME_BASE, m2p_frames
from pvcluster.abi.structs import MACHPHYS_MAX_EXTENTS
from pvcluster.abi.xen import (
    DOMID_SELF,
    MACHPHYS_EXTENT_SHIFT,
    MEMOP_CMD_MASK,
    MEMOP_EXTENT_SHIFT,
    PAGE_SHIFT,
    Hypercall,
    MemoryOp,
)

NR = Hypercall.memory_op
EXTENT_FRAMES = 1 << (MACHPHYS_EXTENT_SHIFT - PAGE_SHIFT)


def m2p_extent_mfns(nr_pages: int) -> tuple[int, ...]:
    """The machine frame that starts each 2 MiB extent of the m2p table of a domain with ``nr_pages`` of RAM."""
    first, frames = nr_pages + M2P_FRAME_BASE, m2p_frames(nr_pages)
    return tuple(first + i for i in range(0, frames, EXTENT_FRAMES))[:MACHPHYS_MAX_EXTENTS]


def handle(call: Call) -> int:
    cmd, arg = call.arg(0), call.arg(1)
    op, start_extent = cmd & MEMOP_CMD_MASK, cmd >> MEMOP_EXTENT_SHIFT
    try:
        if op in (MemoryOp.current_reservation, MemoryOp.maximum_reservation):
            if start_extent:
                return _deny(call, Errno.EINVAL, "start-extent", cmd=cmd)
            return _reservation(call, MemoryOp(op), arg)
        # compat_arch_memory_op switches on the whole cmd: start-extent bits make it an unknown sub-op
        if cmd in (MemoryOp.machphys_mfn_list, MemoryOp.machphys_compat_mfn_list):
            return _machphys_mfn_list(call, arg)
    except GuestFault as exc:
        return _deny(call, Errno.EFAULT, "arg-unmapped", cmd=cmd, addr=exc.addr)
    return _deny(call, Errno.ENOSYS, "unsupported-cmd", cmd=cmd)


def _deny(call: Call, err: Errno, reason: str, **fields: Any) -> int:
    call.trace("memop.denied", reason=reason, errno=err.name, **fields)
    return -err


def _reservation(call: Call, op: MemoryOp, arg: int) -> int:
    (domid,) = struct.unpack_from("<H", call.mem.read(arg, XEN_MEMORY_DOMAIN.size), XEN_MEMORY_DOMAIN.offset("domid"))
    if domid not in (DOMID_SELF, call.dom.domid):
        err = Errno.EPERM if call.hv.alive(domid) else Errno.ESRCH  # rcu_lock_domain_by_any_id, then XSM
        return _deny(call, err, "foreign-domid", op=op.name, target_dom=domid)
    pages = call.dom.nr_pages  # tot_pages and max_pages alike: the domain's RAM neither grows nor shrinks
    call.trace("memop.reservation", op=op.name, target_dom=domid, pages=pages)
    return pages


def _machphys_mfn_list(call: Call, arg: int) -> int:
    lay = XEN_MACHPHYS_MFN_LIST
    raw = call.mem.read(arg, lay.size)
    max_extents, extent_start = (int(struct.unpack_from("<I", raw, lay.offset(m))[0])
                                 for m in ("max_extents", "extent_start"))
    extents = m2p_extent_mfns(call.dom.nr_pages)[:max_extents]
    for i, mfn in enumerate(extents):
        call.mem.write_u32(extent_start + 4 * i, mfn)  # copy_to_compat_offset: a fault is -EFAULT
    out = bytearray(raw)
    struct.pack_into("<I", out, lay.offset("nr_extents"), len(extents))
    call.mem.write(arg, bytes(out))
    call.trace("memop.machphys_mfn_list", max_extents=max_extents, nr_extents=len(extents))
    return 0
