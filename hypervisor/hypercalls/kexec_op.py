"""kexec_op (37): a guest loads a kernel image it placed in its own memory, and kexecs into it through the control
plane, as the 2006 thread proposes for a paravirtual machine ("kexec proper is best done by putting the image in
memory and then having the control plane build a new domain using this image").

The ABI is Xen's public one (xen/include/public/kexec.h; the checks follow xen/common/kexec.c and kimage.c), the
subset a 32-bit PV guest can use on itself:

* ``KEXEC_CMD_kexec_load`` (4, the v2 load, Xen >= 4.4): ``xen_kexec_load_t`` {u8 type, u16 arch, u32
  nr_segments, handle segments, u64 entry_maddr} naming ``xen_kexec_segment_t`` {buf, buf_size, dest_maddr,
  dest_size}. Each segment's ``buf`` is a guest-virtual buffer of the caller's (read through the trapping vCPU's
  page tables, ``pvcluster/abi/copyin.py``); ``dest_maddr`` is where its bytes go in the image, a pseudo-physical
  address of the domain (its "machine" addresses: the domain has an identity p2m). The image is the segments laid
  out from the lowest ``dest_maddr``, the tail of each past ``buf_size`` zeroed (as Xen zeroes it): here it must be
  an ELF kernel, which the toolstack builds the next domain from as it builds any kernel (so its entry is the ELF's;
  ``entry_maddr`` must lie inside a segment, as Xen checks for crash images, and is traced). Refusals, as Xen's:
  an unknown type or another machine's image (``arch`` not EM_386), no segments or ``KEXEC_SEGMENT_MAX`` or more,
  ``buf_size`` > ``dest_size``, overlapping segments, or an image that is not an ELF: -EINVAL; a destination not
  page-aligned, outside the domain's memory, or an entry outside the image: -EADDRNOTAVAIL; more than the domain's
  memory or ``KEXEC_MAX_IMAGE_BYTES`` in all: -ENOMEM; a buffer or struct not mapped, or a handle past 4 GiB:
  -EFAULT. A new load of a type replaces the one loaded (Xen swaps the slot).
* ``KEXEC_CMD_kexec_unload`` (5) and ``KEXEC_CMD_kexec_status`` (6): ``{u8 type}``; status answers 1 when an image of
  that type is loaded, else 0.
* ``KEXEC_CMD_kexec`` (0): ``{int type}``. With a loaded ``KEXEC_TYPE_DEFAULT`` image the domain ends now (the vCPU
  gets no answer, as from SCHEDOP_shutdown) with shutdown reason "kexec" in the trace (held as SHUTDOWN_soft_reset,
  Xen's nearest: the guest asks its toolstack to rebuild it), and the toolstack builds a new domain with the same
  DomainSpec and name, a new domid, from the image (``Hypervisor.shutdown``). ``KEXEC_TYPE_CRASH`` through this
  command crashes the domain, as Xen's kexec_crash(CRASHREASON_KEXECCMD) does; a loaded crash image then boots
  (kdump: ``Hypervisor.crash``, after the toolstack's core dump, hypervisor/coredumps.py). No image of the
  type: -ENOENT (Xen's kexec_exec).
  A command while the domain's kexec is already under way: -EBUSY (Xen's KEXEC_FLAG_IN_PROGRESS).
* The v1 load/unload (1, 2) and ``kexec_get_range`` (3: machine ranges of the host, which a domain has no business
  with) are -EOPNOTSUPP, as newer Xen answers an unknown command.

Unlike Xen, no privilege is asked: each domain may kexec only itself, which is what the control plane builds on.
"""

from __future__ import annotations

import struct

from hypervisor.domain import KexecImage
from hypervisor.guestmem import GuestFault, NotCopied
from hypervisor.hypercalls.base import Call
from pvcluster.abi import layouts
from pvcluster.abi.copyin import MAX_SPAN
from pvcluster.abi.errno import Errno
from pvcluster.abi.platform import KEXEC_MAX_IMAGE_BYTES
from pvcluster.abi.xen import EM_386, KEXEC_SEGMENT_MAX, PAGE_SIZE, Hypercall, KexecCmd, KexecType, ShutdownReason

NR = Hypercall.kexec_op

_ELF_MAGIC = b"\x7fELF"
_TYPES = frozenset(int(t) for t in KexecType)


def _u64(raw: bytes, lay: layouts.Layout, member: str) -> int:
    return int(struct.unpack_from("<Q", raw, lay.offset(member))[0])


def _read(call: Call, addr: int, size: int) -> bytes:
    """``size`` bytes at ``addr``, in the MAX_SPAN pieces the copy-in descriptor named them in."""
    return b"".join(call.mem.read(addr + off, min(MAX_SPAN, size - off)) for off in range(0, size, MAX_SPAN))


def _load(call: Call) -> int:
    lay, seg = layouts.KEXEC_LOAD, layouts.KEXEC_SEGMENT
    try:
        raw = call.mem.read(call.arg(1), lay.size)
    except GuestFault:
        return -Errno.EFAULT
    ktype, arch = raw[lay.offset("type")], int(struct.unpack_from("<H", raw, lay.offset("arch"))[0])
    nr = int(struct.unpack_from("<I", raw, lay.offset("nr_segments"))[0])
    segs, entry = _u64(raw, lay, "segments"), _u64(raw, lay, "entry_maddr")
    if ktype not in _TYPES or arch != EM_386 or not 0 < nr < KEXEC_SEGMENT_MAX:
        call.trace("kexec.denied", why="type, arch or segment count", type=ktype, arch=arch, nr_segments=nr)
        return -Errno.EINVAL
    if segs >> 32:
        return -Errno.EFAULT
    try:
        table = call.mem.read(segs, nr * seg.size)
    except GuestFault:
        return -Errno.EFAULT
    pieces: list[tuple[int, int, int, int]] = []  # (dest_maddr, dest_size, buf, buf_size)
    for i in range(nr):
        entry_raw = table[i * seg.size : (i + 1) * seg.size]
        buf, size = _u64(entry_raw, seg, "buf"), _u64(entry_raw, seg, "buf_size")
        dest, dsize = _u64(entry_raw, seg, "dest_maddr"), _u64(entry_raw, seg, "dest_size")
        if size > dsize:  # kimage.c's sanity_check_segment_list: a buffer larger than its room
            return -Errno.EINVAL
        if dest % PAGE_SIZE or dsize % PAGE_SIZE or dest + dsize > call.dom.nr_pages * PAGE_SIZE:
            call.trace("kexec.denied", why="destination", dest_maddr=dest, dest_size=dsize)
            return -Errno.EADDRNOTAVAIL
        if size and buf >> 32:
            return -Errno.EFAULT
        pieces.append((dest, dsize, buf, size))
    pieces.sort()
    if any(a[0] + a[1] > b[0] for a, b in zip(pieces, pieces[1:], strict=False)):
        return -Errno.EINVAL  # overlapping destinations (sanity_check_segment_list)
    total = sum(p[1] for p in pieces)
    if total > min(KEXEC_MAX_IMAGE_BYTES, call.dom.nr_pages * PAGE_SIZE):
        call.trace("kexec.denied", why="too large", bytes=total, limit=KEXEC_MAX_IMAGE_BYTES)
        return -Errno.ENOMEM
    if not any(dest <= entry < dest + dsize for dest, dsize, _, _ in pieces):
        return -Errno.EADDRNOTAVAIL
    base = pieces[0][0]
    image = bytearray(pieces[-1][0] + pieces[-1][1] - base)
    try:
        for dest, _, buf, size in pieces:
            if size:
                image[dest - base : dest - base + size] = _read(call, buf, size)
    except (GuestFault, NotCopied):
        return -Errno.EFAULT
    if not image.startswith(_ELF_MAGIC):  # the control plane builds from an ELF kernel (see the module's doc)
        call.trace("kexec.denied", why="not an ELF image")
        return -Errno.EINVAL
    # the zeroed tail past the last buffer is the builder's to make, not the Build's to carry
    end = max(dest - base + size for dest, _, _, size in pieces)
    call.dom.kexec_images[ktype] = KexecImage(data=bytes(image[:end]), entry_maddr=entry, segments=nr)
    call.record("kexec.load", type=ktype, segments=nr, bytes=end, entry_maddr=entry)
    return 0


def _type_arg(call: Call) -> int | None:
    try:
        return call.mem.read(call.arg(1), 1)[0]
    except GuestFault:
        return None


def handle(call: Call) -> int:
    cmd = call.arg(0)
    dom = call.dom
    if cmd not in (KexecCmd.kexec, KexecCmd.kexec_load, KexecCmd.kexec_unload, KexecCmd.kexec_status):
        return -Errno.EOPNOTSUPP
    if dom.kexec_started is not None:
        return -Errno.EBUSY
    if cmd == KexecCmd.kexec_load:
        return _load(call)
    if cmd == KexecCmd.kexec:
        try:
            ktype = int(struct.unpack("<i", call.mem.read(call.arg(1), layouts.KEXEC_EXEC.size))[0])
        except GuestFault:
            return -Errno.EFAULT
        if ktype not in _TYPES:
            return -Errno.EINVAL
        if ktype not in dom.kexec_images:
            return -Errno.ENOENT  # Xen's kexec_exec: only into a loaded image
        call.record("kexec.exec", type=ktype)
        call.deferred = True
        if ktype == KexecType.CRASH:
            call.shutdown = ShutdownReason.crash  # kexec_crash(CRASHREASON_KEXECCMD): the crash image takes over
        else:
            dom.kexec_started = ktype
            call.shutdown = ShutdownReason.soft_reset
        return 0
    ktype_or_none = _type_arg(call)
    if ktype_or_none is None:
        return -Errno.EFAULT
    if ktype_or_none not in _TYPES:
        return -Errno.EINVAL
    if cmd == KexecCmd.kexec_status:
        return int(ktype_or_none in dom.kexec_images)
    dropped = dom.kexec_images.pop(ktype_or_none, None)
    call.record("kexec.unload", type=ktype_or_none, loaded=dropped is not None)
    return 0
