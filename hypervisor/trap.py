"""One hypercall trap, from the request a domain process reported to the result its vCPU will see.

``apply`` runs the handler for hypercall N (``hypervisor/hypercalls/``) on the buffers the domain copied in, lets
the faults module act on what it decided, prices it in virtual time (the modelled cost plus the domain's own seeded
jitter), traces it, and returns what the clock must do with it: a result for the vCPU, a shutdown of the domain,
and effects for other domains. It raises nothing for anything a guest can put in a request; an exception out of
here is a bug in the hypervisor, and the clock ends the one domain it happened for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor import faults
from hypervisor.guestmem import GuestView, NotCopied
from hypervisor.hypercalls import Call, dispatch
from pvcluster.abi.errno import Errno, as_signed
from pvcluster.abi.xen import Hypercall, ShutdownReason
from pvcluster.bus.effects import Effect, FlushTlb, Invlpg, RestartHypercall
from pvcluster.bus.messages import HypercallReq, HypercallResult

if TYPE_CHECKING:
    from hypervisor.core import Hypervisor
    from hypervisor.domain import Domain

_FLUSHING = (Hypercall.mmuext_op, Hypercall.update_va_mapping, Hypercall.multicall)


@attrs.frozen
class Outcome:
    result: HypercallResult | None  # None: the domain is shutting down and the vCPU gets no answer
    shutdown: ShutdownReason | None
    remote: list[tuple[int, Effect]]  # (domid, effect) to deliver link_ns after the call


def apply(hv: Hypervisor, dom: Domain, req: HypercallReq) -> Outcome:
    vcpu = dom.vcpus[req.vcpu]
    vcpu.timers.end_poll()  # a vCPU that traps again is no longer in an earlier poll
    call = Call(hv=hv, dom=dom, vcpu=req.vcpu, vt_ns=req.vt_ns, nr=req.nr, args=list(req.args),
                mem=GuestView(list(req.regions)), rings=list(req.rings), emulated=req.emulated)
    try:
        value = dispatch(call)
    except NotCopied as exc:  # the handler read past what its copy-in descriptor names: treat it as unmapped
        call.trace("guestmem.not_copied", addr=exc.addr, length=exc.length)
        value = -Errno.EFAULT
    asked = sorted({e.vcpu for e in faults.foreign_flushes(call)})  # before a flush bug can hide them
    for at, flush in faults.on_hypercall(call):  # delay-flush: the flushes arrive later, as deliveries
        hv.deliver(dom, flush, at)
    call.effects = hv.notifications(dom, collapse_flushes(call.effects), req.vt_ns)
    if call.continuation is not None:
        value = call.nr  # as Xen: EAX holds the hypercall number again when the vCPU re-executes the trap
        call.effects.append(RestartHypercall(vcpu=req.vcpu, nr=call.nr, args=call.continuation))
    done_vt = req.vt_ns + hv.cost.hypercall_ns + call.work_ns + _jitter(hv, dom)
    hv.hypercalls += 1
    dom.hypercalls += 1
    vcpu.hypercalls += 1
    span = f"hc-d{dom.domid}v{req.vcpu}-{req.seq}"
    if call.shutdown is not None:
        _trace(dom, req, call, span, value, done_vt, None)
        return Outcome(None, ShutdownReason(call.shutdown), call.remote)
    seen = faults.corrupt(dom, value & 0xFFFFFFFF, span, done_vt)
    result = HypercallResult(vcpu=req.vcpu, seq=req.seq, vt_ns=done_vt, value=seen,
                             writes=call.mem.writes, effects=call.effects, complete=not call.deferred)
    result = hv.send_result(dom, result)
    _trace(dom, req, call, span, value, done_vt, result.vt_ns)
    _trace_pv_shootdown(dom, req, asked, call, done_vt, value)
    return Outcome(result, None, call.remote)


def collapse_flushes(effects: list[Effect]) -> list[Effect]:
    """Adjacent identical TLB flushes of one vCPU do nothing the first did not (a 512-op batch of TLB_FLUSH_LOCAL is
    one flush): keep one, so a guest's flood of them cannot flood its domain process with effects."""
    out: list[Effect] = []
    for e in effects:
        if isinstance(e, (FlushTlb, Invlpg)) and out and out[-1] == e:
            continue
        out.append(e)
    return out


def _jitter(hv: Hypervisor, dom: Domain) -> int:
    """Seeded per domain, so a domain's timings do not depend on what any other domain does."""
    jitter = hv.cost.hypercall_jitter_ns
    return dom.rng.randint(0, jitter) if jitter else 0


def _trace(dom: Domain, req: HypercallReq, call: Call, span: str, value: int, done_vt: int,
           arrival: int | None) -> None:
    """``result`` is what the hypervisor decided; ``arrival_vt_ns`` when the answer reaches the domain over its
    link (None: the call ended the domain and is never answered); ``effects`` how many effects it carries."""
    ext = call.hv.extensions.families.get(req.nr)  # an extension names its own (pvcluster/extensions.py)
    name = ext.name if ext is not None else (
        Hypercall(req.nr).name if req.nr in Hypercall._value2member_map_ else f"unknown_{req.nr}")
    dom.trace.event(
        "hypercall",
        vt_ns=req.vt_ns,
        vcpu=req.vcpu,
        span=span,
        nr=req.nr,
        name=name,
        args=[a & 0xFFFFFFFF for a in req.args],
        result=as_signed(value),
        done_vt_ns=done_vt,
        arrival_vt_ns=arrival,
        effects=len(call.effects),
        deferred=call.deferred,
        continued=call.continuation is not None,
        emulated=req.emulated,
    )


def _trace_pv_shootdown(dom: Domain, req: HypercallReq, targets: list[int], call: Call, done_vt: int,
                        value: int) -> None:
    """A flush of other vCPUs in one hypercall is a paravirtual shootdown: it completes when the hypercall
    does, because targets without a pCPU are flushed before they next run. ``targets`` are the vCPUs the guest
    asked to flush: the answer acknowledges them, and the checker holds the domain's flushes to it."""
    if req.nr not in _FLUSHING or as_signed(value) < 0 or not targets:
        return
    pages = sum(1 for e in call.effects if isinstance(e, Invlpg))
    preempted = [v for v in targets if not dom.vcpus[v].running]
    dom.trace.event(
        "shootdown",
        vt_ns=req.vt_ns,
        vcpu=req.vcpu,
        span=f"sd-d{dom.domid}v{req.vcpu}-{req.seq}",
        mode="pv",
        targets=targets,
        preempted=len(preempted),
        pages=pages if pages else "all",
        end_vt_ns=done_vt,
        latency_ns=done_vt - req.vt_ns,
        messages=1,
    )
