"""What dom0's daemons do for a domain in Xen, done by the hypervisor here: the console backend (xenconsoled) and
the xenstore ring's event channel (xenstored, which does not answer requests yet).

Start of day, as libxl and Xen's domain builder do it. Before the build the toolstack allocates two unbound ports
in the new domain for the backends' domain (libxl__build_pre: ``xc_evtchn_alloc_unbound(domid, store_domid)``, then
the console's), so a guest finds them in start_info as ports 1 and 2 (``prepare``); the builder gives each ring a
zeroed page of the guest's own and reports them (start_info.store_mfn, console.domU.mfn). Once the domain is built
each backend binds its port (xenconsoled's domain_create_ring, xenstored on XS_INTRODUCE: ``connect``), so both are
interdomain ports whose far end is dom0 (``BACKEND_DOMID``), which no guest is.

The console: when the guest notifies its console port (EVTCHNOP_send), the domain process copies the ring's out[]
and indices with the trap (``HypercallReq.rings``) and ``console_notified`` drains it as xenconsoled's
buffer_append does (tools/console/daemon/io.c): the bytes from out_cons to out_prod, each at its index masked by
the ring's size (MASK_XENCONS_IDX), nothing at all if the ring claims more than it holds; then out_cons = out_prod
(a write into the guest's page, as any validated write reaches guest memory) and a notification back. The bytes go
to the same console ``console_io`` feeds: ``pvcluster console`` and the trace's ``console`` events.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hypervisor import evtchn
from pvcluster.abi.layouts import XENCONS_INTERFACE, XENCONS_OUT_SIZE
from pvcluster.abi.platform import BACKEND_DOMID
from pvcluster.abi.xen import PAGE_SHIFT
from pvcluster.bus.effects import SetPending, WriteMachine
from pvcluster.bus.messages import BuildResult, Region

if TYPE_CHECKING:
    from hypervisor.domain import Domain
    from hypervisor.hypercalls.base import Call

_OUT = XENCONS_INTERFACE.offset("out")  # where the copy the domain process sends starts
_OUT_CONS = XENCONS_INTERFACE.offset("out_cons") - _OUT
_OUT_PROD = XENCONS_INTERFACE.offset("out_prod") - _OUT
_RING_LEN = XENCONS_INTERFACE.size - _OUT


def prepare(dom: Domain) -> tuple[int, int]:
    """The xenstore and console ports, allocated unbound for dom0's backends before the build (0 for one that could
    not be: the table is fresh, so that does not happen)."""
    ports = []
    for _ in ("store", "console"):
        p = dom.evtchn.alloc_unbound(BACKEND_DOMID)
        ports.append(p.number if isinstance(p, evtchn.Port) else 0)
    dom.store_port, dom.console_port = ports
    return dom.store_port, dom.console_port


def connect(dom: Domain, res: BuildResult) -> None:
    """The domain is built: each backend binds its port, and the console backend learns its ring's page. A page
    outside the domain is ignored (the backend then has no ring to read)."""
    for port in (dom.store_port, dom.console_port):
        p = dom.evtchn.lookup(port) if port else None
        if p is not None and p.state is evtchn.PortState.UNBOUND and p.remote_dom == BACKEND_DOMID:
            # the backend's end has no table of its own here: it is named by the guest port it serves
            p.transition(evtchn.PortState.INTERDOMAIN, remote_dom=BACKEND_DOMID, remote_port=port)
    dom.store_mfn = res.store_mfn if 0 < res.store_mfn < dom.nr_pages else 0
    dom.console_mfn = res.console_mfn if 0 < res.console_mfn < dom.nr_pages else 0


def is_backend_port(p: evtchn.Port) -> bool:
    return p.state is evtchn.PortState.INTERDOMAIN and p.remote_dom == BACKEND_DOMID


def notified(call: Call, p: evtchn.Port) -> None:
    """The guest sent on a port whose far end is one of the backends."""
    if p.number == call.dom.console_port:
        console_notified(call, p)
    else:  # the xenstore ring: nobody answers yet (a responding xenstore is still to come)
        call.trace("xenstore.notify", port=p.number)


def _ring(call: Call) -> bytes | None:
    """The copy of the console ring's out[] and indices the domain process sent with this trap, if it did."""
    want = (call.dom.console_mfn << PAGE_SHIFT) + _OUT
    region: Region | None = next((r for r in call.rings if r.addr == want and r.length == _RING_LEN), None)
    if region is None or region.data is None or len(region.data) != _RING_LEN:
        return None
    return region.data


def drain(ring: bytes, cons: int) -> tuple[bytes, int] | None:
    """buffer_append's reading: the bytes from ``cons`` to the ring's out_prod and the new out_cons; None when the
    ring claims more than out[] holds (a broken ring: xenconsoled reads nothing)."""
    (prod,) = struct.unpack_from("<I", ring, _OUT_PROD)
    size = (prod - cons) & 0xFFFFFFFF
    if size > XENCONS_OUT_SIZE:
        return None
    return bytes(ring[(cons + i) & (XENCONS_OUT_SIZE - 1)] for i in range(size)), prod


def console_notified(call: Call, p: evtchn.Port) -> None:
    """Drain the console ring into the domain's console. The backend is the only writer of out_cons, so it keeps
    the value it last wrote rather than trust the copy (two notifications in one window both copy the old one)."""
    dom = call.dom
    ring = _ring(call) if dom.console_mfn else None
    if ring is None:
        call.trace("console.ring_not_copied", port=p.number)
        return
    got = drain(ring, dom.console_cons)
    if got is None:
        call.trace("console.ring_broken", out_cons=dom.console_cons,
                   out_prod=struct.unpack_from("<I", ring, _OUT_PROD)[0])
        return
    data, prod = got
    if not data:  # a notification with nothing new: xenconsoled neither moves out_cons nor notifies back
        return
    for line in dom.console_write(data.decode("utf-8", errors="replace")):
        call.trace("console", text=line, via="ring")
    dom.console_cons = prod
    call.effects.append(WriteMachine(addr=(dom.console_mfn << PAGE_SHIFT) + _OUT + _OUT_CONS,
                                     data=struct.pack("<I", prod)))
    call.effects.append(SetPending(vcpu=p.notify_vcpu, port=p.number))
