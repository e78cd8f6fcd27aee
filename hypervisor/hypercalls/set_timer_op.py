"""set_timer_op (15): arm or cancel the calling vCPU's singleshot timer, in virtual time.

x86-32 arguments: the absolute system time of the deadline in ns, low word then high word; 0 cancels. At the
deadline the port bound to VIRQ_TIMER for that vCPU (if any) becomes pending (``hypervisor/timers.py``). A deadline
already past fires at the next window, as Xen fires a timer set in the past at once.
"""

from __future__ import annotations

from hypervisor import timers
from hypervisor.guestmem import Span
from hypervisor.hypercalls.base import Call, Reader
from pvcluster.abi.xen import Hypercall

NR = Hypercall.set_timer_op


def copy_in(args: list[int], read: Reader) -> list[Span]:
    return []


def handle(call: Call) -> int:
    deadline = call.arg(0) | call.arg(1) << 32
    timers.set_singleshot(call.dom.domid, call.vcpu, deadline or None)
    call.trace("timer.set", kind="singleshot", deadline_ns=deadline)
    return 0
