"""An example hypercall extension: a batched remote TLB flush with a completion event.

    long HYPERVISOR_batched_flush(struct pvc_flush_req *reqs, unsigned int count, evtchn_port_t done_port);
    struct pvc_flush_req { uint32_t vcpumask; uint32_t va; };   /* va 0xFFFFFFFF: the whole TLB */

Number 50, Xen's ``__HYPERVISOR_arch_2``, which x86 Xen leaves unused (``pvcluster/abi/platform.py`` lists the free
numbers). The guest learns it from this registration: ``pvcluster sdk --cflags --spec spec.toml`` defines
``__HYPERVISOR_batched_flush=50``.

The idea it tries, against Xen's multicast flush (``mmuext_op`` with ``MMUEXT_TLB_FLUSH_MULTI`` /
``MMUEXT_INVLPG_MULTI``, one op per page, the caller held until every target acknowledged):

* one call names any number of (vCPU set, page) requests, up to ``MAX_REQS``; the hypervisor merges them per
  target vCPU (a target with more than ``FULL_FLUSH_OVER`` pages gets one full flush instead) and sends one IPI
  round for the whole batch, not one per page;
* with ``done_port`` (a port the caller bound with ``EVTCHNOP_bind_ipi``) the call returns as soon as its own part
  is done, and the hypervisor raises ``done_port`` when the remote flushes have completed: the guest's completion
  callback (here: ``SCHEDOP_poll`` on the port, or its upcall). ``done_port`` 0 makes it synchronous, as Xen's.

What it models, in virtual time: the trap as every hypercall, ``flush_page_ns`` per distinct page flushed (or
``flush_local_ns`` for a full flush) as the caller's own work, and ``flush_remote_ns`` once for the IPI round
when any target other than the caller holds a pCPU; that is the caller's wait when synchronous, the completion
event's delay when not. The flushes themselves travel with the answer (a target is never flushed later than its
completion says; one without a pCPU is flushed before it next runs, as every paravirtual flush here).

Errors, each with a ``batched_flush.denied`` trace event: ``count`` 0 or over ``MAX_REQS``, a request naming no
vCPU or one the domain lacks, or a ``done_port`` that is not an IPI port of the caller's: -EINVAL; an unmapped
request array: -EFAULT. Nothing is flushed when any request is refused.

A fault kind, ``batched-flush-lose`` (``count``, default 1): the next ``count`` batched flushes of the domain that
go through lose their remote part, a hypervisor bug the guest's own check must catch. The caller's own flushes are
done and the completion event is still raised (so the guest does not wait forever), but no target other than the
caller is flushed: each such call is a ``batched_flush.lost`` trace event, and the targets read the old frames
("no stale read on the targets FAIL"). Schedule it in the spec::

    [[fault]]
    kind = "batched-flush-lose"
    target = "batched"
    at_ns = 0
    count = 3

or inject it into a running cluster: ``pvcluster inject batched-flush-lose batched count=3``. What it arms lives
in ``dom.ext["batched_flush"]``, the domain's state for this extension, which the handler reads.

Traced: ``batched_flush`` (one per call: requests, targets, pages, full flushes, the completion's virtual time) and
a ``shootdown`` event as the built-in paravirtual flush has, so ``pvcluster trace`` puts a domain that uses it
(``design=batched`` on its command line) beside the native and pv designs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from hypervisor import mm
from hypervisor.evtchn import PortState
from hypervisor.guestmem import GuestFault
from pvcluster.abi.errno import Errno
from pvcluster.abi.extcopy import ArgSpan
from pvcluster.bus.effects import FlushTlb, Invlpg, SetPending
from pvcluster.faults import Param

NR = 50
NAME = "batched_flush"
REQ = struct.Struct("<II")  # vcpumask, va
FLUSH_ALL = 0xFFFFFFFF
MAX_REQS = 64
FULL_FLUSH_OVER = 8  # more distinct pages than this for one vCPU: one full flush costs less


def register(reg: Any) -> None:
    reg.hypercall(NR, NAME, handle,
                  copyin=[ArgSpan(addr_arg=0, size=REQ.size, count_arg=1, max_count=MAX_REQS)])
    reg.trace_table("batched flushes (extension batched_flush)", events=(NAME,), build=table)
    reg.fault_kind("batched-flush-lose", "the next COUNT batched flushes skip every target but the caller, though "
                   "their completion is still raised", lose, params={"count": Param("how many calls", 1, 1, 1 << 20)})


def lose(hv: Any, dom: Any, params: dict[str, int], vt_ns: int) -> str:
    """``batched-flush-lose``: arm the domain's next ``count`` batched flushes to lose their remote part."""
    state = dom.ext.setdefault(NAME, {})
    state["lose"] = state.get("lose", 0) + params["count"]
    return f"the next {state['lose']} batched flushes lose their remote targets"


def _deny(call: Any, err: Errno, reason: str, **fields: Any) -> int:
    call.trace("batched_flush.denied", reason=reason, errno=err.name, **fields)
    return -err


def handle(call: Any) -> int:
    base, count, port = call.arg(0), call.arg(1), call.arg(2)
    if not 1 <= count <= MAX_REQS:
        return _deny(call, Errno.EINVAL, "bad-count", count=count)
    try:
        raw = call.mem.read(base, count * REQ.size)
    except GuestFault:
        return _deny(call, Errno.EFAULT, "requests-unmapped", addr=base)
    notify = None
    if port:
        p = call.dom.evtchn.lookup(port)
        if p is None or p.state is not PortState.IPI:
            return _deny(call, Errno.EINVAL, "done-port-not-ipi", port=port)
        notify = p.notify_vcpu
    # Merge: each target's pages, or None for a full flush.
    pages: dict[int, set[int] | None] = {}
    for i, (mask, va) in enumerate(REQ.iter_unpack(raw)):
        targets = mm.vcpus_in_mask(call.dom, mask)
        if not targets:
            return _deny(call, Errno.EINVAL, "bad-vcpumask", index=i, mask=mask)
        for t in targets:
            have = pages.setdefault(t, set())
            if va == FLUSH_ALL:
                pages[t] = None
            elif have is not None:
                have.add(va & ~0xFFF)
    full = sorted(t for t, ps in pages.items() if ps is None or len(ps) > FULL_FLUSH_OVER)
    flushed = 0
    state = call.dom.ext.get(NAME, {})
    lost = []  # batched-flush-lose (the fault kind): the targets this call does not flush
    if state.get("lose", 0) > 0:
        state["lose"] -= 1
        lost = [t for t in sorted(pages) if t != call.vcpu]
        call.trace("batched_flush.lost", targets=lost, left=state["lose"])
    for t, ps in sorted(pages.items()):
        if t in lost:
            continue
        if t in full:
            call.effects.append(FlushTlb(vcpu=t))
        else:
            assert ps is not None
            call.effects.extend(Invlpg(vcpu=t, va=va) for va in sorted(ps))
            flushed += len(ps)
    cost = call.hv.cost
    mine = pages.get(call.vcpu, set())
    call.work_ns += cost.flush_local_ns if call.vcpu in full else cost.flush_page_ns * len(mine or ())
    remote = any(t != call.vcpu and call.dom.vcpus[t].running for t in pages)
    remote_ns = cost.flush_remote_ns if remote else 0
    if notify is None:
        call.work_ns += remote_ns  # synchronous: the caller waits for the IPI round, as Xen's flush does
    # The answer arrives hypercall_ns + jitter + work_ns after the trap: the completion no earlier than that.
    done_vt = call.vt_ns + cost.hypercall_ns + cost.hypercall_jitter_ns + call.work_ns + (
        remote_ns if notify is not None else 0)
    if notify is not None:
        call.hv.deliver(call.dom, SetPending(vcpu=notify, port=port), done_vt)
    targets = sorted(pages)
    call.record(NAME, requests=count, targets=targets, pages=flushed, full=full, port=port,
                asynchronous=notify is not None, done_vt_ns=done_vt)
    call.record("shootdown", span=f"bf-d{call.dom.domid}v{call.vcpu}-{call.vt_ns}", mode="batched",
                targets=targets, preempted=sum(1 for t in targets if not call.dom.vcpus[t].running),
                pages=flushed if not full else "all", end_vt_ns=done_vt, latency_ns=done_vt - call.vt_ns,
                messages=1)
    return 0


def table(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per domain: calls, requests per call, pages and full flushes, and the completion's delay after the trap."""
    by_dom: dict[int, dict[str, Any]] = {}
    for e in events:
        row = by_dom.setdefault(e["dom"], {"dom": e["dom"], "calls": 0, "requests": 0, "pages": 0,
                                           "full_flushes": 0, "asynchronous": 0, "completion_us": 0.0})
        row["calls"] += 1
        row["requests"] += e["requests"]
        row["pages"] += e["pages"]
        row["full_flushes"] += len(e["full"])
        row["asynchronous"] += bool(e["asynchronous"])
        row["completion_us"] += (e["done_vt_ns"] - e["vt_ns"]) / 1000
    rows = []
    for dom, row in sorted(by_dom.items()):
        n = row["calls"]
        rows.append({**row, "requests_per_call": row["requests"] / n, "completion_us": row["completion_us"] / n,
                     "dom": dom})
    return rows
