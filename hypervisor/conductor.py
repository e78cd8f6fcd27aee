"""The virtual clock conductor: lock-step windows and hypercalls applied in (virtual time, domain, vCPU, seq) order.

Window k covers virtual time up to ``end_ns``. Every participating domain runs its vCPUs until each reaches
``end_ns`` or traps, then reports. The conductor applies all trapped hypercalls in a total order that depends only
on virtual time and ids, so the same spec and seed replay the same way whatever the host's timing. The next window
starts at the earliest clock any vCPU will run from, which never goes backwards, and lasts ``window_ns``: no
longer than the smallest link latency, so nothing sent in one window can land in a domain's past.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from hypervisor.domain import Domain, DomainState
from hypervisor.guestmem import GuestView
from hypervisor.hypercalls import Call, dispatch
from pvcluster.abi.errno import as_signed
from pvcluster.abi.xen import Hypercall, ShutdownReason
from pvcluster.bus.messages import HypercallReq, HypercallResult, WindowDone


class ReportError(Exception):
    """A window report that contradicts what the hypervisor knows; the sender is answered with an Error."""


@attrs.define
class Shutdown:
    dom: Domain
    reason: ShutdownReason
    vt_ns: int


@attrs.define
class Conductor:
    window_ns: int
    hypercall_ns: int
    jitter_ns: int
    seed: int
    log: Any
    rng: random.Random = attrs.field(init=False)
    index: int = 0
    end_ns: int = 0
    results: dict[int, list[HypercallResult]] = attrs.Factory(dict)
    reports: dict[int, WindowDone] = attrs.Factory(dict)
    # earliest virtual time each participating domain will next run from, by domid
    horizon: dict[int, int | None] = attrs.Factory(dict)
    hypercalls: int = 0

    def __attrs_post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # -- window bookkeeping -------------------------------------------------------------------------------

    def join(self, dom: Domain) -> None:
        """``dom`` was built: its vCPU 0 starts at the current conductor time."""
        dom.started_vt = self.end_ns
        dom.joined_window = self.index + 1
        self.horizon[dom.domid] = self.end_ns

    def leave(self, dom: Domain) -> None:
        self.horizon.pop(dom.domid, None)
        self.results.pop(dom.domid, None)
        self.reports.pop(dom.domid, None)

    def next_end(self, participants: list[Domain]) -> int | None:
        """End of the next window, or None when no participating vCPU can run (the cluster is idle)."""
        times = [t for d in participants if (t := self.horizon.get(d.domid)) is not None]
        if not times:
            return None
        start = max(min(times), self.end_ns - self.window_ns)
        return start + self.window_ns

    def open(self, end_ns: int) -> None:
        self.index += 1
        self.end_ns = max(self.end_ns, end_ns)
        self.reports.clear()

    def take_results(self, domid: int) -> list[HypercallResult]:
        return self.results.pop(domid, [])

    def report(self, dom: Domain, done: WindowDone) -> None:
        """Record one domain's report for the open window, after checking it against what we know."""
        if done.index != self.index:
            raise ReportError(f"report for window {done.index}, but window {self.index} is open")
        if dom.domid in self.reports:
            raise ReportError(f"second report for window {self.index}")
        seen: set[int] = set()
        for v in done.vcpus:
            if not 0 <= v.vcpu < len(dom.vcpus) or v.vcpu in seen:
                raise ReportError(f"report names vCPU {v.vcpu} (domain has {len(dom.vcpus)}) or repeats it")
            seen.add(v.vcpu)
        for h in done.hypercalls:
            if not 0 <= h.vcpu < len(dom.vcpus) or len(h.args) != 5:
                raise ReportError(f"malformed hypercall record for vCPU {h.vcpu}")
        for v in done.vcpus:
            info = dom.vcpus[v.vcpu]
            info.state, info.clock_ns, info.instructions = v.state, v.clock_ns, v.instructions
        self.reports[dom.domid] = done

    # -- closing a window ------------------------------------------------------------------------------------

    def close(self, domains: dict[int, Domain]) -> list[Shutdown]:
        """Apply every hypercall trapped in this window, in virtual-time order; compute each domain's horizon."""
        queue: list[tuple[int, int, int, int, HypercallReq]] = []
        for domid, done in self.reports.items():
            queue.extend((h.vt_ns, domid, h.vcpu, h.seq, h) for h in done.hypercalls)
        queue.sort(key=lambda q: q[:4])
        shutdowns: list[Shutdown] = []
        stopped: set[int] = set()
        for _, domid, _, _, req in queue:
            dom = domains[domid]
            if domid in stopped or dom.state is not DomainState.RUNNING:
                continue  # a vCPU's later trap in the same window as its domain's shutdown is never answered
            result, shutdown = self._apply(dom, req)
            if shutdown is not None:
                shutdowns.append(shutdown)
                stopped.add(domid)
            elif result is not None:
                self.results.setdefault(domid, []).append(result)
        for domid, done in self.reports.items():
            if domid in stopped:
                self.horizon[domid] = None
                continue
            times = [v.clock_ns for v in done.vcpus if v.state == "running"]
            times += [r.vt_ns for r in self.results.get(domid, []) if r.complete]
            times += [
                r.vt_ns for r in self.results.get(domid, []) for a in r.actions if a.kind in ("up", "set_context")
            ]
            self.horizon[domid] = min(times) if times else None
        return shutdowns

    def _apply(self, dom: Domain, req: HypercallReq) -> tuple[HypercallResult | None, Shutdown | None]:
        mem = GuestView(req_regions(req))
        call = Call(dom=dom, vcpu=req.vcpu, vt_ns=req.vt_ns, nr=req.nr, args=list(req.args), mem=mem, log=self.log)
        value = dispatch(call)
        done_vt = req.vt_ns + self.hypercall_ns + (self.rng.randint(0, self.jitter_ns) if self.jitter_ns else 0)
        self.hypercalls += 1
        dom.hypercalls += 1
        dom.vcpus[req.vcpu].hypercalls += 1
        name = Hypercall(req.nr).name if req.nr in Hypercall._value2member_map_ else f"unknown_{req.nr}"
        self.log.info(
            "hypercall",
            vt_ns=req.vt_ns,
            dom=dom.domid,
            vcpu=req.vcpu,
            span=f"hc-d{dom.domid}v{req.vcpu}-{req.seq}",
            nr=req.nr,
            name=name,
            args=[a & 0xFFFFFFFF for a in req.args],
            result=as_signed(value),
            done_vt_ns=done_vt,
            deferred=call.deferred,
        )
        if call.shutdown is not None:
            return None, Shutdown(dom, ShutdownReason(call.shutdown), req.vt_ns)
        result = HypercallResult(
            vcpu=req.vcpu,
            seq=req.seq,
            vt_ns=done_vt,
            value=value & 0xFFFFFFFF,
            writes=mem.writes,
            actions=call.actions,
            complete=not call.deferred,
        )
        return result, None


def req_regions(req: HypercallReq) -> list[Any]:
    return list(req.regions)
