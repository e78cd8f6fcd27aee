"""set_trap_table (0): the calling vCPU's virtual IDT, as Xen 4.17's compat_set_trap_table
(xen/arch/x86/x86_64/compat/traps.c).

Arg: a guest array of ``struct trap_info`` {u8 vector, u8 flags, u16 cs, u32 address}, ended by an entry whose
address is 0. The table is incremental: only the vectors listed change. A NULL array clears the whole table. Each
entry's code selector is raised to ring 1 (fixup_guest_code_selector). An array the guest cannot read ends the call
with -EFAULT after the entries before it took effect, as Xen's loop does. The domain process keeps the table on the
vCPU (``SetTrapTable``), since it is the one that bounces exceptions and software interrupts into the guest
(``domains/traps.py``).
"""

from __future__ import annotations

import struct

from hypervisor import mm
from hypervisor.descriptors import fixup_selector
from hypervisor.guestmem import GuestFault, NotCopied
from hypervisor.hypercalls.base import Call
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import TRAP_INFO_SIZE, Hypercall
from pvcluster.bus.effects import SetTrapTable

NR = Hypercall.set_trap_table
# A trap table has one entry per vector; a guest list longer than that repeats vectors (the copy-in stops here too).
MAX_TRAP_ENTRIES = 256


def handle(call: Call) -> int:
    base = call.arg(0)
    if base == 0:
        call.effects.append(SetTrapTable(vcpu=call.vcpu, traps=[], clear=True))
        call.trace("trap.table_cleared")
        return 0
    traps: list[list[int]] = []
    result = 0
    for i in range(MAX_TRAP_ENTRIES):
        try:
            raw = call.mem.read(base + i * TRAP_INFO_SIZE, TRAP_INFO_SIZE)
        except (GuestFault, NotCopied):  # the copy-in stopped where the guest's memory did
            result = mm.deny(call, Errno.EFAULT, "trap-table-unmapped", index=i, addr=base + i * TRAP_INFO_SIZE)
            break
        vector, flags, cs, address = struct.unpack("<BBHI", raw)
        if address == 0:
            break
        traps.append([vector, flags, fixup_selector(cs), address])
    if traps:
        call.effects.append(SetTrapTable(vcpu=call.vcpu, traps=traps))
    call.trace("trap.table_set", entries=len(traps))
    return result
