"""console_io (18): CONSOLEIO_write appends to the domain's console and the hypervisor log; read is dom0's."""

from __future__ import annotations

from hypervisor.guestmem import GuestFault, Span
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import ConsoleIO, Hypercall

NR = Hypercall.console_io
# Xen copies a write in chunks and has no upper bound; one call here is capped so a hostile count cannot make
# a domain process ship megabytes in one message. The rest is dropped and traced.
MAX_WRITE = 16 * 1024


def copy_in(args: list[int], read: Reader) -> list[Span]:
    if args[0] == ConsoleIO.write and args[1] > 0:
        return [Span(args[2], min(args[1], MAX_WRITE))]
    return []


def handle(call: Call) -> int:
    cmd, count, buf = call.arg(0), call.arg(1), call.arg(2)
    if cmd == ConsoleIO.write:
        if count == 0:
            return 0
        try:
            data = call.mem.read(buf, min(count, MAX_WRITE))
        except GuestFault:
            return -Errno.EFAULT
        if count > MAX_WRITE:
            call.trace("console.truncated", requested=count, kept=MAX_WRITE)
        text = data.decode("utf-8", errors="replace")
        for line in call.dom.console_write(text):
            call.trace("console", text=line)
        return 0
    if cmd == ConsoleIO.read:
        return -Errno.EPERM  # only the control domain reads the hypervisor console
    return -Errno.ENOSYS
