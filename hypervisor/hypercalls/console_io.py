"""console_io (18): CONSOLEIO_write appends to the domain's console and the hypervisor log; read is dom0's."""

from __future__ import annotations

from hypervisor.guestmem import GuestFault
from hypervisor.hypercalls.base import Call
from pvcluster.abi.copyin import MAX_CONSOLE_WRITE
from pvcluster.abi.errno import Errno
from pvcluster.abi.xen import ConsoleIO, Hypercall

NR = Hypercall.console_io


def handle(call: Call) -> int:
    cmd, count, buf = call.arg(0), call.arg(1), call.arg(2)
    if cmd == ConsoleIO.write:
        if count == 0:
            return 0
        try:
            data = call.mem.read(buf, min(count, MAX_CONSOLE_WRITE))
        except GuestFault:
            return -Errno.EFAULT
        if count > MAX_CONSOLE_WRITE:
            call.trace("console.truncated", requested=count, kept=MAX_CONSOLE_WRITE)
        text = data.decode("utf-8", errors="replace")
        for line in call.dom.console_write(text):
            call.trace("console", text=line)
        return 0
    if cmd == ConsoleIO.read:
        return -Errno.EPERM  # only the control domain reads the hypervisor console
    return -Errno.ENOSYS
