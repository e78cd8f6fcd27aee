"""update_descriptor (10): write one validated segment descriptor at a machine address, as Xen 4.17's
compat_update_descriptor / do_update_descriptor (xen/arch/x86/pv/descriptor-tables.c).

Args (x86-32: each 64-bit value in two registers): the machine address, low and high, then the descriptor, low
and high. The address must be 8-byte aligned in a frame the domain owns, the descriptor must pass check_descriptor
(``hypervisor/descriptors.py``, which may raise its DPL), and the frame must be a descriptor table or typable as
writable (not a page table). Every refusal is -EINVAL. The write itself is a ``WriteMachine`` of the checked
descriptor: the domain process holds guest RAM, and that is the only way a GDT frame changes once in use.
"""

from __future__ import annotations

import struct

from hypervisor import mm
from hypervisor.descriptors import check_descriptor
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import PAGE_SHIFT, Hypercall
from pvcluster.bus.effects import WriteMachine

NR = Hypercall.update_descriptor
DESC_SIZE = 8


def handle(call: Call) -> int:
    pa = call.arg(0) | call.arg(1) << 32
    desc = call.arg(2) | call.arg(3) << 32
    mfn = pa >> PAGE_SHIFT
    if pa % DESC_SIZE:
        return mm.deny(call, Errno.EINVAL, "desc-misaligned", pa=pa)
    if not mm.owned(call.dom, mfn):
        return mm.deny(call, Errno.EINVAL, "desc-frame-not-owned", pa=pa)
    checked = check_descriptor(desc)
    if checked is None:
        return mm.deny(call, Errno.EINVAL, "desc-refused", pa=pa, desc=desc)
    if call.dom.frames.level(mfn):  # get_page_type(PGT_writable_page) fails on a page table
        return mm.deny(call, Errno.EINVAL, "desc-frame-is-pagetable", pa=pa)
    call.effects.append(WriteMachine(addr=pa, data=struct.pack("<Q", checked)))
    call.trace("desc.update", pa=pa, desc=desc, written=checked, gdt=call.dom.frames.is_seg_desc(mfn))
    return 0
