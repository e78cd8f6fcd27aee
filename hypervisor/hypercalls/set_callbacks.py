"""set_callbacks (4): the legacy x86-32 way to register the event and failsafe callbacks in one call.

Args: event selector, event address, failsafe selector, failsafe address. As Xen's compat_set_callbacks, it
registers both (see callback_op) and always returns 0.
"""

from __future__ import annotations

from hypervisor.hypercalls import callback_op
from hypervisor.hypercalls.base import Call
from pvcluster.abi.xen import Hypercall

NR = Hypercall.set_callbacks


def handle(call: Call) -> int:
    event_cs, event_eip, failsafe_cs, failsafe_eip = (call.arg(i) for i in range(4))
    callback_op.register(call, callback_op.CallbackType.event, 0, event_cs, event_eip)
    callback_op.register(call, callback_op.CallbackType.failsafe, 0, failsafe_cs, failsafe_eip)
    return 0
