"""xen_version (17): version numbers, extraversion, features, page size and the other informational queries."""

from __future__ import annotations

import struct

from hypervisor.guestmem import GuestFault, Span
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import (
    FEATURES_SUBMAP0,
    PAGE_SIZE,
    XEN_EXTRAVERSION,
    XEN_EXTRAVERSION_LEN,
    XEN_VERSION_MAJOR,
    XEN_VERSION_MINOR,
    Hypercall,
    XenVer,
)

NR = Hypercall.xen_version
HYPERVISOR_VIRT_START = 0xFC000000  # x86_32 non-PAE
XENFEAT_NR_SUBMAPS = 1

# Output buffer sizes from xen/version.h: xen_compile_info_t is 64+16+32+32 bytes, capabilities 1024,
# changeset 64, platform_parameters one unsigned long, feature_info two uint32.
_OUT_SIZE = {
    XenVer.extraversion: XEN_EXTRAVERSION_LEN,
    XenVer.compile_info: 144,
    XenVer.capabilities: 1024,
    XenVer.changeset: 64,
    XenVer.platform_parameters: 4,
    XenVer.get_features: 8,
}


def copy_in(args: list[int], read: Reader) -> list[Span]:
    size = _OUT_SIZE.get(args[0])  # type: ignore[call-overload]
    return [Span(args[1], size, writable=True)] if size else []


def _fixed(text: bytes, size: int) -> bytes:
    return text[: size - 1].ljust(size, b"\0")


def handle(call: Call) -> int:
    cmd, arg = call.arg(0), call.arg(1)
    try:
        if cmd == XenVer.version:
            return (XEN_VERSION_MAJOR << 16) | XEN_VERSION_MINOR
        if cmd == XenVer.pagesize:
            return PAGE_SIZE
        if cmd == XenVer.extraversion:
            call.mem.write(arg, _fixed(XEN_EXTRAVERSION, XEN_EXTRAVERSION_LEN))
            return 0
        if cmd == XenVer.compile_info:
            info = _fixed(b"python", 64) + _fixed(b"pvcluster", 16) + _fixed(b"localdomain", 32)
            call.mem.write(arg, info + _fixed(b"Wed Nov 25 2026", 32))
            return 0
        if cmd == XenVer.capabilities:
            call.mem.write(arg, _fixed(b"xen-3.0-x86_32", 1024))
            return 0
        if cmd == XenVer.changeset:
            call.mem.write(arg, _fixed(b"pvcluster", 64))
            return 0
        if cmd == XenVer.platform_parameters:
            call.mem.write_u32(arg, HYPERVISOR_VIRT_START)
            return 0
        if cmd == XenVer.get_features:
            submap_idx = call.mem.u32(arg)
            if submap_idx >= XENFEAT_NR_SUBMAPS:
                return -Errno.EINVAL
            call.mem.write(arg, struct.pack("<II", submap_idx, FEATURES_SUBMAP0))
            return 0
    except GuestFault:
        return -Errno.EFAULT
    return -Errno.ENOSYS
