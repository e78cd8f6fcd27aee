"""grant_table_op (20): GNTTABOP_setup_table, query_size and set_version, as Xen 4.17 answers a 32-bit PV guest.

A 32-bit guest reaches Xen through the compat layer (common/compat/grant_table.c ``compat_grant_table_op``), which
hands query_size and set_version to ``do_grant_table_op`` unchanged and translates setup_table's frame list from
32-bit entries. The logic follows common/grant_table.c: ``do_grant_table_op``, ``gnttab_setup_table``,
``gnttab_query_size``, ``gnttab_set_version``. A refused operation comes back in the struct's ``status``
(GNTST_*) with the hypercall returning 0; only a bad command, count or guest pointer is an errno (a struct the
guest's pointer does not reach: -EFAULT, whatever was decided before). Mapping grants (map_grant_ref, copy,
transfer, ...) is not implemented: -ENOSYS, as for an unknown command.

An unprivileged domain may name only itself (DOMID_SELF or its own id): another live domain is
GNTST_permission_denied (the XSM_TARGET check), a domain that does not exist GNTST_bad_domain, so a domain never
learns another's grant frames.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from hypervisor import gnttab
from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.layouts import GNTTAB_QUERY_SIZE, GNTTAB_SET_VERSION, GNTTAB_SETUP_TABLE
from pvcluster.abi.xen import DOMID_SELF, GNTTABOP_CMD_MASK, Gntst, GnttabOp, Hypercall

NR = Hypercall.grant_table_op
_ADDR_LIMIT = 1 << 32


def handle(call: Call) -> int:
    cmd, uop, count = call.arg(0), call.arg(1), call.arg(2)
    if count & 0x80000000:  # do_grant_table_op: (int)count < 0
        return _deny(call, Errno.EINVAL, "negative-count", cmd=cmd, count=count)
    if cmd & ~GNTTABOP_CMD_MASK:  # continuation bits, which only cache_flush (not implemented) may carry
        return _deny(call, Errno.EINVAL, "continuation-bits", cmd=cmd)
    op = _OPS.get(cmd)
    if op is None:
        return _deny(call, Errno.ENOSYS, "unsupported-cmd", cmd=cmd)
    try:
        return op(call, uop, count)
    except GuestFault as exc:  # copy_from_guest / __copy_to_guest of the op's struct
        return _deny(call, Errno.EFAULT, "struct-unmapped", op=GnttabOp(cmd).name, addr=exc.addr)


def _deny(call: Call, err: Errno, reason: str, **fields: Any) -> int:
    call.trace("gnttab.denied", reason=reason, errno=err.name, **fields)
    return -err


def _target(call: Call, domid: int) -> Gntst:
    """rcu_lock_domain_by_any_id, then xsm_grant_setup / xsm_grant_query_size (XSM_TARGET), for ``domid``."""
    if domid in (DOMID_SELF, call.dom.domid):
        return Gntst.okay
    return Gntst.permission_denied if call.hv.alive(domid) else Gntst.bad_domain


def _u32(raw: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", raw, offset)[0])


def _with_status(raw: bytes, offset: int, status: Gntst) -> bytes:
    out = bytearray(raw)
    struct.pack_into("<h", out, offset, status)
    return bytes(out)


def _setup_table(call: Call, uop: int, count: int) -> int:
    """gnttab_setup_table, through compat_grant_table_op: count 0 does nothing, more than 1 is -EINVAL."""
    if count == 0:
        return 0
    if count > 1:
        return _deny(call, Errno.EINVAL, "count-not-one", op="setup_table", count=count)
    lay = GNTTAB_SETUP_TABLE
    raw = call.mem.read(uop, lay.size)
    (dom,) = struct.unpack_from("<H", raw, lay.offset("dom"))
    nr, frame_list = _u32(raw, lay.offset("nr_frames")), _u32(raw, lay.offset("frame_list"))
    if frame_list + 4 * nr > _ADDR_LIMIT:  # compat_handle_okay(frame_list, nr_frames)
        return _deny(call, Errno.EFAULT, "frame-list-out-of-range", op="setup_table", addr=frame_list, nr=nr)
    status = _target(call, dom)
    gt = call.dom.grant
    if status is Gntst.okay and nr > gt.max_frames:
        status = Gntst.general_error
    frames: list[int] = []
    if status is Gntst.okay:
        gt.grow(nr)  # gnttab_grow_table when nr_frames > nr_grant_frames
        frames = [gnttab.frame_mfn(call.dom.nr_pages, i) for i in range(nr)]
        _write_frames(call, frame_list, frames)
    call.trace("gnttab.setup_table", target_dom=dom, nr_frames=nr, status=status.name, frames=frames)
    call.mem.write(uop, _with_status(raw, lay.offset("status"), status))
    return 0


def _write_frames(call: Call, frame_list: int, frames: list[int]) -> None:
    """The compat layer copies each frame out with its failure ignored (``(void)__copy_to_compat_offset``), so
    the status stays okay; traced, so a guest's bad list shows."""
    for i, mfn in enumerate(frames):
        try:
            call.mem.write_u32(frame_list + 4 * i, mfn)
        except GuestFault:
            call.trace("gnttab.frame_list_fault", addr=frame_list + 4 * i, index=i)


def _query_size(call: Call, uop: int, count: int) -> int:
    """gnttab_query_size: the struct goes back whole, whatever the status."""
    if count != 1:
        return _deny(call, Errno.EINVAL, "count-not-one", op="query_size", count=count)
    lay = GNTTAB_QUERY_SIZE
    raw = call.mem.read(uop, lay.size)
    (dom,) = struct.unpack_from("<H", raw, lay.offset("dom"))
    status = _target(call, dom)
    out = bytearray(_with_status(raw, lay.offset("status"), status))
    if status is Gntst.okay:
        gt = call.dom.grant
        struct.pack_into("<I", out, lay.offset("nr_frames"), gt.nr_frames)
        struct.pack_into("<I", out, lay.offset("max_nr_frames"), gt.max_frames)
    call.trace("gnttab.query_size", target_dom=dom, status=status.name)
    call.mem.write(uop, bytes(out))
    return 0


def _set_version(call: Call, uop: int, count: int) -> int:
    """gnttab_set_version (it never looks at count). Version 2 is refused with -ENOSYS, what Xen answers when a
    domain's grant tables are limited to v1 (gnttab=max-ver:1, or the domain's max_grant_version). The version
    in force is written back either way."""
    lay = GNTTAB_SET_VERSION
    version = _u32(call.mem.read(uop, lay.size), lay.offset("version"))
    rc = 0
    if version not in (1, 2):
        rc = _deny(call, Errno.EINVAL, "bad-version", version=version)
    elif version == 2:
        rc = _deny(call, Errno.ENOSYS, "v2-unsupported", version=version)
    call.trace("gnttab.set_version", version=version, result=rc)
    call.mem.write_u32(uop + lay.offset("version"), call.dom.grant.version)
    return rc


_OPS: dict[int, Callable[[Call, int, int], int]] = {
    GnttabOp.setup_table: _setup_table,
    GnttabOp.query_size: _query_size,
    GnttabOp.set_version: _set_version,
}
