"""What every hypercall handler receives, and what it may decide besides its result."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from hypervisor.guestmem import GuestView, Span
from pvcluster.bus.messages import VcpuAction

if TYPE_CHECKING:
    from hypervisor.domain import Domain

Reader = Callable[[int, int], bytes | None]


class Family(Protocol):
    """A hypercall family module: ``hypervisor/hypercalls/<name>.py`` defines ``NR``, ``copy_in`` and ``handle``."""

    NR: int

    def copy_in(self, args: list[int], read: Reader) -> list[Span]: ...

    def handle(self, call: Call) -> int: ...


@attrs.define
class Call:
    """One hypercall being executed on behalf of ``dom``'s vCPU ``vcpu`` at virtual time ``vt_ns``."""

    dom: Domain
    vcpu: int
    vt_ns: int
    nr: int
    args: list[int]
    mem: GuestView
    log: Any
    actions: list[VcpuAction] = attrs.Factory(list)
    # When set, the vCPU gets no result now: it blocked, or its domain is going away.
    deferred: bool = False
    shutdown: int | None = None
    # Actions for another domain's vCPUs (an interdomain event): (domid, action). The conductor delivers them in
    # that domain's next window, ``link_ns`` after the call.
    remote: list[tuple[int, VcpuAction]] = attrs.Factory(list)
    # Whether a domid names a live domain; None: any domain with event-channel state counts (unit tests).
    domain_alive: Callable[[int], bool] | None = None

    def arg(self, i: int) -> int:
        return self.args[i] & 0xFFFFFFFF

    def trace(self, event: str, **fields: Any) -> None:
        self.log.info(event, vt_ns=self.vt_ns, dom=self.dom.domid, vcpu=self.vcpu, **fields)
