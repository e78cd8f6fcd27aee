"""set_timer_op (15): arm or cancel the calling vCPU's singleshot timer, in virtual time.

x86-32 arguments: the absolute system time of the deadline in ns, low word then high word; 0 cancels. At the
deadline the port bound to VIRQ_TIMER for that vCPU (if any) becomes pending (``hypervisor/timers.py``). As Xen's
do_set_timer_op, a deadline already past fires at once, and a negative one or one more than 2^50 ns ahead (Linux's
jiffies wrapping) fires 100 ms from now: so no guest value can push virtual time out of range.
"""

from __future__ import annotations

from hypervisor import timers
from hypervisor.hypercalls.base import Call
from pvcluster.abi.xen import Hypercall

NR = Hypercall.set_timer_op


def handle(call: Call) -> int:
    raw = call.arg(0) | call.arg(1) << 32
    deadline = timers.set_timer_op_deadline(raw, call.vt_ns)
    call.dom.vcpus[call.vcpu].timers.singleshot = deadline
    if raw and deadline is not None and deadline != raw:
        call.trace("timer.huge", kind="singleshot", requested=raw, deadline_ns=deadline)
    call.trace("timer.set", kind="singleshot", deadline_ns=deadline if deadline is not None else 0)
    return 0
