"""What every hypercall handler receives, and what it may decide besides its result.

A handler reads its arguments and the guest buffers that were copied in (``call.mem``), changes hypervisor state
hanging off the calling domain (``call.dom``) or, through ``call.hv``, a peer domain the ABI lets it touch (an
event-channel peer), and returns the value the guest sees in EAX. Everything it wants done to a vCPU goes into
``call.effects`` (this domain) or ``call.remote`` (another domain, delivered ``link_ns`` later); a handler never
talks to a domain process itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from hypervisor import mm
from hypervisor.guestmem import GuestView
from pvcluster.bus.effects import Effect
from pvcluster.bus.messages import Region

if TYPE_CHECKING:
    from hypervisor.core import Hypervisor
    from hypervisor.domain import Domain


@attrs.define(eq=False)
class Call:
    """One hypercall being executed on behalf of ``dom``'s vCPU ``vcpu`` at virtual time ``vt_ns``."""

    hv: Hypervisor
    dom: Domain
    vcpu: int
    vt_ns: int
    nr: int
    args: list[int]
    mem: GuestView
    effects: list[Effect] = attrs.Factory(list)
    # When set, the vCPU gets no result now: it blocked, or its domain is going away.
    deferred: bool = False
    shutdown: int | None = None
    # Effects for another domain's vCPUs (an interdomain event): (domid, effect). The clock delivers them in that
    # domain's next window, ``link_ns`` after the call.
    remote: list[tuple[int, Effect]] = attrs.Factory(list)
    # A continuation: the argument registers the vCPU re-executes this hypercall with (Xen's
    # hypercall_create_continuation), set when the call yielded part way through its work.
    continuation: list[int] | None = None
    # Virtual ns the work itself takes beyond the trap and return (hypercall_ns): flushes, multicall entries.
    work_ns: int = 0
    # How many of ``effects`` the guest-memory view has been told about (``settle``).
    settled: int = 0
    # Shared rings the domain process copied with the trap, by machine address: the console ring, when the call
    # notifies its backend (hypervisor/backends.py).
    rings: list[Region] = attrs.Factory(list)
    # The domain process's emulation of a guest's write to one of its page tables (HypercallReq.emulated).
    emulated: bool = False

    def arg(self, i: int) -> int:
        return self.args[i] & 0xFFFFFFFF if i < len(self.args) else 0

    def trace(self, event: str, **fields: Any) -> None:
        """A detail event (denials, per-op records, console lines): rate-limited per domain."""
        self.dom.trace.detail(event, vt_ns=self.vt_ns, vcpu=self.vcpu, **fields)

    def record(self, event: str, **fields: Any) -> None:
        """An event analysis depends on, one per hypercall at most (a multicall's summary): never dropped."""
        self.dom.trace.event(event, vt_ns=self.vt_ns, vcpu=self.vcpu, **fields)

    # -- Xen's hypercall_preempt_check, on a per-window work budget ------------------------------------------

    def preempt_check(self) -> bool:
        """Whether the domain has used up its work budget for this window: a batch must yield now."""
        return self.dom.work_left <= 0

    def spend(self, units: int) -> None:
        self.dom.work_left -= units

    def restart(self, args: list[int]) -> None:
        """End this call with a continuation: the vCPU re-executes it with ``args``."""
        self.continuation = [a & 0xFFFFFFFF for a in args]

    def settle(self) -> None:
        """Tell the guest-memory view what this call's effects so far will do to guest memory, so that a later
        request or multicall entry does not read a copy they made stale (``GuestView.observe``)."""
        self.mem.observe(self.effects[self.settled :], vcpu=self.vcpu, shared_info_frame=mm.shared_info_frame(self.dom))
        self.settled = len(self.effects)

    def sub(self, nr: int, args: list[int]) -> Call:
        """A multicall entry: a hypercall of its own on the same vCPU, at the same virtual time."""
        return Call(hv=self.hv, dom=self.dom, vcpu=self.vcpu, vt_ns=self.vt_ns, nr=nr, args=list(args), mem=self.mem)
