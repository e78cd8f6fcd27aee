"""Xen errno values (xen/errno.h); hypercalls return them negated in EAX."""

from __future__ import annotations

import enum


class Errno(enum.IntEnum):
    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    E2BIG = 7
    EAGAIN = 11
    ENOMEM = 12
    EACCES = 13
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    EINVAL = 22
    ENOSPC = 28
    ENOSYS = 38
    ETIME = 62
    EOPNOTSUPP = 95
    EADDRNOTAVAIL = 99


def neg(e: Errno) -> int:
    """The value a hypercall leaves in EAX for error ``e``, as an unsigned 32-bit register value."""
    return (-int(e)) & 0xFFFFFFFF


def as_signed(eax: int) -> int:
    eax &= 0xFFFFFFFF
    return eax - (1 << 32) if eax & 0x80000000 else eax
