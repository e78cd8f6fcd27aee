"""The hypercall page the hypervisor writes into each guest (Xen's hypercall_page_initialise_ring1_kernel)."""

from __future__ import annotations

import struct

from pvcluster.abi.xen import HYPERCALL_STUB_SIZE, HYPERCALL_VECTOR, PAGE_SIZE, Hypercall


def hypercall_page() -> bytes:
    page = bytearray(b"\xcc" * PAGE_SIZE)  # int3 between stubs: a call into the middle of a slot traps
    for nr in range(PAGE_SIZE // HYPERCALL_STUB_SIZE):
        mov_eax = b"\xb8" + struct.pack("<I", nr)
        trap = bytes([0xCD, HYPERCALL_VECTOR])
        # iret must not clobber EAX before the hypervisor saves it, so its stub pushes EAX and never returns.
        stub = b"\x50" + mov_eax + trap if nr == Hypercall.iret else mov_eax + trap + b"\xc3"
        page[nr * HYPERCALL_STUB_SIZE : nr * HYPERCALL_STUB_SIZE + len(stub)] = stub
    return bytes(page)
