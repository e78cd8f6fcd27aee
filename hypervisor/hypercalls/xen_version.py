"""xen_version (17): version numbers, extraversion, features, page size and the other informational queries.

As common/kernel.c ``do_xen_version``: strings are copied out whole, NUL-padded to their array's size; the
capabilities are what ``arch_get_xen_caps`` lists for the guest type the caller runs as ("xen-3.0-x86_32", or for a
PAE guest "xen-3.0-x86_32p", as a PAE x86-32 build listed it), platform_parameters the hole's start in the caller's
mode (xen-x86_32.h: 0xFC000000 non-PAE, 0xF5800000 PAE), and get_features
submap 0 advertises only what is implemented (``FEATURES_SUBMAP0``, pvcluster/abi/xen.py); another submap is -EINVAL.
"""

from __future__ import annotations

import struct

from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import (
    FEATURES_SUBMAP0,
    HYPERVISOR_VIRT_START_NONPAE,
    HYPERVISOR_VIRT_START_PAE,
    PAGE_SIZE,
    XEN_CAPABILITIES,
    XEN_CAPABILITIES_LEN,
    XEN_CAPABILITIES_PAE,
    XEN_EXTRAVERSION,
    XEN_EXTRAVERSION_LEN,
    XEN_VERSION_MAJOR,
    XEN_VERSION_MINOR,
    XENFEAT_NR_SUBMAPS,
    Hypercall,
    XenVer,
)

NR = Hypercall.xen_version

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
            caps = XEN_CAPABILITIES_PAE if call.dom.pae else XEN_CAPABILITIES
            call.mem.write(arg, _fixed(caps, XEN_CAPABILITIES_LEN))
            return 0
        if cmd == XenVer.changeset:
            call.mem.write(arg, _fixed(b"pvcluster", 64))
            return 0
        if cmd == XenVer.platform_parameters:
            call.mem.write_u32(arg, HYPERVISOR_VIRT_START_PAE if call.dom.pae else HYPERVISOR_VIRT_START_NONPAE)
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
