"""The virtual clock conductor: lock-step windows and hypercalls applied in (virtual time, domain, vCPU, seq) order.

Window k covers virtual time up to ``end_ns``. Every participating domain runs its vCPUs until each reaches
``end_ns`` or traps, then reports. The conductor applies all trapped hypercalls in a total order that depends only
on virtual time and ids, so the same spec and seed replay the same way whatever the host's timing. The next window
starts at the earliest clock any vCPU will run from, which never goes backwards, and lasts ``window_ns``: no
longer than the smallest link latency, so nothing sent in one window can land in a domain's past.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs

from hypervisor import timers
from hypervisor.domain import Domain, DomainState
from hypervisor.guestmem import GuestView
from hypervisor.hypercalls import Call, dispatch
from pvcluster.abi.errno import as_signed
from pvcluster.abi.xen import Hypercall, ShutdownReason
from pvcluster.bus.messages import HypercallReq, HypercallResult, VcpuAction, WindowDone


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
    # the virtual time each vCPU will next run from, by (domid, vcpu); None while it cannot run
    times: dict[tuple[int, int], int | None] = attrs.Factory(dict)
    hypercalls: int = 0
    # whether a vCPU holds a pCPU right now (the scheduler's view), for shootdown traces
    is_running: Callable[[tuple[int, int]], bool] = lambda _key: True
    # modelled bus latency: an event one domain raises in another lands this long after it was raised
    link_ns: int = 0
    # events for a domain's vCPUs decided elsewhere (interdomain sends, peers closing, timers), by domid; each
    # action's regs carry its arrival time as "vt_ns"; a window carries those due by its end
    events: dict[int, list[VcpuAction]] = attrs.Factory(dict)
    domain_alive: Callable[[int], bool] | None = None

    def __attrs_post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # -- window bookkeeping -------------------------------------------------------------------------------

    def join(self, dom: Domain) -> None:
        """``dom`` was built: its vCPU 0 starts at the current conductor time."""
        dom.started_vt = self.end_ns
        dom.joined_window = self.index + 1
        self.times[(dom.domid, 0)] = self.end_ns

    def leave(self, dom: Domain) -> None:
        for key in [k for k in self.times if k[0] == dom.domid]:
            del self.times[key]
        self.results.pop(dom.domid, None)
        self.reports.pop(dom.domid, None)
        self.events.pop(dom.domid, None)

    def post(self, domid: int, action: VcpuAction, vt_ns: int) -> None:
        """Queue ``action`` for ``domid``, to arrive at ``vt_ns``."""
        self.events.setdefault(domid, []).append(VcpuAction(action.kind, action.vcpu, {**action.regs, "vt_ns": vt_ns}))

    def take_events(self, domid: int) -> list[VcpuAction]:
        """The events for ``domid`` due by the end of the open window, in arrival order."""
        queue = self.events.get(domid, [])
        due = sorted((a for a in queue if a.regs["vt_ns"] <= self.end_ns), key=lambda a: a.regs["vt_ns"])
        if due:
            self.events[domid] = [a for a in queue if a.regs["vt_ns"] > self.end_ns]
        return due

    def wake(self, key: tuple[int, int], vt_ns: int) -> None:
        """An interrupt or event makes a waiting vCPU runnable from ``vt_ns`` on."""
        current = self.times.get(key)
        self.times[key] = vt_ns if current is None else max(current, vt_ns)

    def next_end(self, runs: dict[int, list[int]]) -> int | None:
        """End of the next window: one window past the earliest clock among the vCPUs that hold a pCPU in it
        (a vCPU that waits for a pCPU does not hold time back: its clock moves on while it waits). None when no
        scheduled vCPU can run: the cluster is idle."""
        times = [t for domid, vids in runs.items() for v in vids if (t := self.times.get((domid, v))) is not None]
        if not times:
            return None
        return min(times) + self.window_ns

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
                continue
            for v in done.vcpus:
                self.times[(domid, v.vcpu)] = v.clock_ns if v.state == "running" else None
            for r in self.results.get(domid, []):
                # a deferred result (the vCPU blocked, or took itself down) still has actions the domain must
                # apply in a window before its vCPU can be seen as blocked
                self.wake((domid, r.vcpu), r.vt_ns)
                for a in r.actions:
                    if a.kind == "up":
                        self.wake((domid, a.vcpu), r.vt_ns)
        return shutdowns

    def _skip_flushes(self, dom: Domain, req: HypercallReq, call: Call) -> None:
        """Fault injection: the hypervisor "forgets" to flush the other vCPUs a hypercall names."""
        dropped = [a.vcpu for a in call.actions if a.kind in _FLUSHES and a.vcpu != call.vcpu]
        if dropped:
            call.actions = [a for a in call.actions if not (a.kind in _FLUSHES and a.vcpu != call.vcpu)]
            self.log.info("fault.skip_flush", vt_ns=req.vt_ns, dom=dom.domid, vcpu=req.vcpu, targets=dropped)

    def _trace_pv_shootdown(self, dom: Domain, req: HypercallReq, call: Call, done_vt: int, value: int) -> None:
        """A flush of other vCPUs in one hypercall is a paravirtual shootdown: it completes when the hypercall
        does, because targets without a pCPU are flushed before they next run."""
        flushing = (Hypercall.mmuext_op, Hypercall.update_va_mapping, Hypercall.multicall)
        if req.nr not in flushing or as_signed(value) < 0:
            return
        targets, pages = _flush_targets(call)
        if not targets:
            return
        preempted = [v for v in targets if not self.is_running((dom.domid, v))]
        self.log.info(
            "shootdown",
            vt_ns=req.vt_ns,
            dom=dom.domid,
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

    def _apply(self, dom: Domain, req: HypercallReq) -> tuple[HypercallResult | None, Shutdown | None]:
        mem = GuestView(req_regions(req))
        call = Call(dom=dom, vcpu=req.vcpu, vt_ns=req.vt_ns, nr=req.nr, args=list(req.args), mem=mem, log=self.log,
                    domain_alive=self.domain_alive)
        timers.end_poll(dom.domid, req.vcpu)  # a vCPU that traps again is no longer in an earlier poll
        value = dispatch(call)
        for domid, action in call.remote:
            self.post(domid, action, req.vt_ns + self.link_ns)
        if "skip-flush" in getattr(dom.spec, "faults", ()):
            self._skip_flushes(dom, req, call)
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
        self._trace_pv_shootdown(dom, req, call, done_vt, value)
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


_FLUSHES = ("flush_tlb", "invlpg")


def _flush_targets(call: Call) -> tuple[list[int], int]:
    targets = sorted({a.vcpu for a in call.actions if a.kind in _FLUSHES and a.vcpu != call.vcpu})
    pages = sum(1 for a in call.actions if a.kind == "invlpg")
    return targets, pages


def req_regions(req: HypercallReq) -> list[Any]:
    return list(req.regions)
