"""The virtual clock: lock-step windows on a fixed grid, the only place virtual time advances and the only place
wake-ups are decided.

Virtual time is cut into windows ``[k*W, (k+1)*W)`` of ``window_ns`` (W), never longer than the smallest link
latency, so nothing sent in one window can land in a domain's past. Within a window every vCPU runs from its own
clock up to the window's end or its next trap; a vCPU whose hypercall result lands inside the window it trapped in
runs on in the same window again (a sub-step), so no vCPU ever waits for the grid. The transport shell drives one
function, ``Clock.step``: it closes the open window with the reports the domains sent for it (reports in) and opens
the next one (windows out). Closing applies every trapped hypercall in one total order, (virtual time, domain, vCPU,
sequence), which depends on nothing but virtual time and ids, so the same spec and seed replay the same way whatever
the host's timing.

Which window comes next is decided per *partition* (the domains that share pCPUs, ``scheduler.partitions``): each
partition's next window is the grid window holding the earliest thing that can happen in it (a vCPU able to run, a
delivery or IPI arriving, a timer), never one before the last it had. The step opens the earliest such window and
only the partitions whose next window it is take part; the others are not sent anything. So the windows a domain
sees, and the scheduler decisions for its pCPUs, depend only on its own partition: a domain's virtual timeline does
not change when an unrelated domain, pinned to pCPUs of its own, is added or behaves differently. Grid windows are
opened in increasing order, and a partition's n-th sub-step of a window always shares its step with the n-th
sub-step of every other partition in that window, so how two partitions' hypercalls interleave never depends on a
third. Cross-domain effects (interdomain events) arrive ``link_ns`` >= W after they were sent: always in a later
window.

Wake-up rules (``_wake``, ``_result_ready``), applied here and nowhere else:

* a hypercall result makes its vCPU ready no earlier than the result's time;
* an event-channel effect or VCPUOP_up on a vCPU of the caller's own domain wakes it at the result's time;
* a delivery (interdomain event, peer closing, timer) or an IPI wakes its target at its arrival, when the window
  that holds the arrival opens; a delivery that sets a port pending also wakes the domain's pollers;
* a vCPU that can already run keeps its own clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from hypervisor import timers, trap
from hypervisor.domain import Domain, DomainState
from hypervisor.errors import ReportError
from hypervisor.evtchn import Virq
from hypervisor.extensions import ExtensionFailed
from hypervisor.scheduler import Partition, partitions
from hypervisor.timers import END_OF_TIME
from hypervisor.vcpu import RunState, Vcpu
from pvcluster.abi.xen import ShutdownReason
from pvcluster.bus.effects import PollTimeout, SetPending, Unmask, VcpuUp, kind
from pvcluster.bus.messages import HypercallReq, HypercallResult, Ipi, Window, WindowDone

if TYPE_CHECKING:
    from hypervisor.core import Hypervisor

_WAKING_EFFECTS = (SetPending, Unmask, VcpuUp)
# The shortest lockstep a domain's running vCPUs take turns in (Window.step_ns): IPIs cheaper than this (ipi_ns
# < 100) still land within 100 ns of their time, and a window is never cut into more than window_ns / 100 turns.
MIN_STEP_NS = 100
# Deliveries that wake their vCPU (a delayed flush, a speed or clock change do not)
_WAKING_DELIVERIES = (SetPending, Unmask, VcpuUp, PollTimeout)


@attrs.define
class OpenWindow:
    index: int  # the step counter: reports name it
    grid: int  # k: the window covers [k*W, (k+1)*W)
    start_ns: int
    end_ns: int
    participants: dict[int, Domain]
    runs: dict[int, list[int]]
    reports: dict[int, WindowDone] = attrs.Factory(dict)


class Clock:
    def __init__(self, hv: Hypervisor, window_ns: int) -> None:
        self.hv = hv
        self.window_ns = window_ns
        self.index = 0
        self.now_ns = 0  # the end of the latest window opened: the hypervisor's notion of "now"
        self.open: OpenWindow | None = None

    # -- reports ---------------------------------------------------------------------------------------------

    @property
    def awaiting(self) -> set[int]:
        """Domains that take part in the open window and have not reported yet."""
        if self.open is None:
            return set()
        return {d for d, dom in self.open.participants.items() if d not in self.open.reports and dom.running}

    def accept(self, dom: Domain, done: WindowDone) -> None:
        """Record ``dom``'s report for the open window, after checking it against what we know."""
        w = self.open
        if w is None or dom.domid not in w.participants:
            raise ReportError(f"report for window {done.index}, but no window is open for this domain")
        if done.index != w.index:
            raise ReportError(f"report for window {done.index}, but window {w.index} is open")
        if dom.domid in w.reports:
            raise ReportError(f"second report for window {w.index}")
        _check_report(dom, done)
        w.reports[dom.domid] = done

    # -- the step --------------------------------------------------------------------------------------------

    def step(self) -> dict[int, Window]:
        """Close the open window (every participant has reported or left) and open the next. Returns the windows
        to send, by domid; empty when nothing can happen (the cluster is idle) or a domain is still being built."""
        if self.open is not None and self.awaiting:
            raise ReportError(f"window {self.open.index} still waits for domains {sorted(self.awaiting)}")
        self.hv.faults.at_close(self.index, self.now_ns)  # replayed faults that acted while this step was open
        if self.open is not None:
            self._close(self.open)
            self.open = None
        return self._open_next()

    # -- opening ---------------------------------------------------------------------------------------------

    def _open_next(self) -> dict[int, Window]:
        hv = self.hv
        if any(d.state is DomainState.BUILDING for d in hv.domains):
            # Building takes no virtual time: domains created together start together, whatever the order in which
            # their processes happened to finish building.
            return {}
        while True:
            nexts = [(*choice, part) for part in partitions([d for d in hv.domains if d.running])
                     if (choice := self._next_window(part)) is not None]
            first = min((k for k, _, _ in nexts), default=None)
            orphan = hv.faults.orphan_time()
            if orphan is not None and (first is None or orphan // self.window_ns < first):
                # a fault due for a domain that takes part in no window (paused): a step of its own, no window
                self.index += 1
                self.now_ns = max(self.now_ns, (orphan // self.window_ns + 1) * self.window_ns)
                hv.faults.at_open(self.index, orphan, [])
                continue
            if first is None:
                return {}
            windows = self._open(first, [(t, part) for k, t, part in nexts if k == first])
            if windows:
                return windows
            self.open = None  # a fault at the open ended or paused every participant: the next window, then

    def _open(self, grid: int, active: list[tuple[int, Partition]]) -> dict[int, Window]:
        """Open grid window ``grid`` for the ``active`` partitions (each with the activity it was chosen for)."""
        hv = self.hv
        for t, part in active:
            for d in part.domains:
                d.last_activity = t
        start, end = grid * self.window_ns, (grid + 1) * self.window_ns
        self.index += 1
        self.now_ns = max(self.now_ns, end)
        participants = {d.domid: d for _, part in active for d in part.domains}
        hv.faults.at_open(self.index, start, list(participants.values()))
        participants = {domid: dom for domid, dom in participants.items() if dom.running}
        for dom in participants.values():
            self._guarded(dom, "its timers", self._fire_timers, dom, end)
            self._guarded(dom, "its events", self._wake_arrivals, dom, end)
        runs: dict[int, list[int]] = {}
        for _, part in active:
            try:
                runs.update(hv.scheduler.pick(part, start))
            except Exception as exc:  # a scheduler bug ends the domains it was placing, not the hypervisor
                for dom in part.domains:
                    hv.crash(dom, f"hypervisor error scheduling its vCPUs: {exc!r}", exc=exc)
        participants = {domid: dom for domid, dom in participants.items() if dom.running}
        self.open = OpenWindow(self.index, grid, start, end, participants, runs)
        return {domid: self._window(dom, runs.get(domid, []), end) for domid, dom in participants.items()}

    def _next_window(self, part: Partition) -> tuple[int, int] | None:
        """The grid window holding the partition's earliest activity, never one before the last it had. The same
        window again when a vCPU is still behind its end (its hypercall result, or an event, landed inside it):
        the vCPU then runs on from its own clock, exactly as if the window had not been cut. A vCPU that waits
        for a pCPU and finds none free cannot act before the next window (pCPUs change hands only there), and a
        sub-step that would find the partition exactly as the last one did is not repeated. Returns the window
        and the activity time it was chosen for."""
        boundary = (part.last_window + 1) * self.window_ns
        free = set(part.pcpus) - {v.pcpu for d in part.domains for v in d.vcpus if v.running}
        times = [t for d in part.domains if (t := next_activity(d, free, boundary)) is not None]
        times += [t for d in part.domains if (t := self.hv.faults.activity(d)) is not None]
        if not times or min(times) >= END_OF_TIME - 2 * self.window_ns:
            return None  # nothing will ever happen (every time the core admits is far below the end of time)
        t = min(times)
        grid = max(part.last_window, t // self.window_ns)
        if grid == part.last_window and t == part.last_activity:
            grid += 1  # nothing moved since the last sub-step: it would only repeat itself
        return grid, t

    def _window(self, dom: Domain, run: list[int], end: int) -> Window:
        dom.work_left = self.hv.work_budget
        dom.last_window = self.open.grid if self.open is not None else dom.last_window
        ran = set(run)
        irqs = [i for i in dom.ipis if i.dest in ran]
        dom.ipis = [i for i in dom.ipis if i.dest not in ran]
        results, dom.results = dom.results, []
        arrived = [r for r in dom.held_results if r.vt_ns < end]
        if arrived:  # results the link held back, arriving in this window, in sending order
            dom.held_results = [r for r in dom.held_results if r.vt_ns >= end]
            results += sorted(arrived, key=lambda r: r.link_seq)
        # two running vCPUs take turns in steps no longer than an IPI between them takes (the conservative lookahead)
        step = min(max(self.hv.cost.ipi_ns, MIN_STEP_NS), self.window_ns) if len(run) > 1 else 0
        return Window(index=self.index, end_ns=end, start_ns=end - self.window_ns, results=results, run=run, irqs=irqs,
                      events=dom.take_deliveries(end), step_ns=step, ipi_ns=self.hv.cost.ipi_ns)

    def _fire_timers(self, dom: Domain, end: int) -> None:
        """Timers due by the end of the window just opened become deliveries for their domains."""
        for exp in timers.due(dom.vcpus, end):
            if exp.kind == "poll":  # the poll's own end: decided inside the hypervisor, it crosses no link
                self.hv.deliver(dom, PollTimeout(vcpu=exp.vcpu, trap_vt=exp.seq), exp.vt_ns)
                dom.trace.event("timer.expired", vt_ns=exp.vt_ns, vcpu=exp.vcpu, kind=exp.kind, port=None)
                continue
            port = dom.evtchn.virq_port(exp.vcpu, Virq.TIMER)
            p = dom.evtchn.lookup(port) if port is not None else None
            dom.trace.event("timer.expired", vt_ns=exp.vt_ns, vcpu=exp.vcpu, kind=exp.kind,
                            port=p.number if p is not None else None)
            if p is not None:
                self.hv.deliver(dom, SetPending(vcpu=p.notify_vcpu, port=p.number), exp.vt_ns)

    def _wake_arrivals(self, dom: Domain, end: int) -> None:
        """Deliveries and IPIs arriving in the window just opened wake their targets at their arrival."""
        for d in sorted(dom.deliveries, key=lambda d: d.vt_ns):
            if d.vt_ns > end or not isinstance(d.effect, _WAKING_DELIVERIES):
                continue
            target = getattr(d.effect, "vcpu", None)
            if isinstance(target, int) and 0 <= target < len(dom.vcpus):
                self._wake(dom, dom.vcpus[target], d.vt_ns, kind(d.effect))
            if isinstance(d.effect, SetPending):  # a vCPU polling the port may not be the one it notifies
                for v in dom.vcpus:
                    if v.timers.polling:
                        self._wake(dom, v, d.vt_ns, "poll")
        for ipi in dom.ipis:
            if ipi.vt_ns <= end:
                self._wake(dom, dom.vcpus[ipi.dest], ipi.vt_ns, "ipi")

    # -- closing ---------------------------------------------------------------------------------------------

    def _close(self, w: OpenWindow) -> None:
        hv = self.hv
        reports = {domid: w.reports[domid] for domid in sorted(w.reports) if w.participants[domid].running}
        for domid, done in reports.items():
            self._guarded(w.participants[domid], "its report", self._fold_report, w.participants[domid], done,
                          set(w.runs.get(domid, [])))
        shutdowns, stopped, fresh = self._apply_hypercalls(w, reports)
        for domid, done in reports.items():
            dom = w.participants[domid]
            if domid not in stopped and dom.running:
                self._guarded(dom, "its report", self._ready_from_report, dom, done, set(w.runs.get(domid, [])))
                self._guarded(dom, "its results", self._results_ready, dom, fresh.get(domid, []))
        for dom, reason, vt in shutdowns:
            self._guarded(dom, "its shutdown", hv.shutdown, dom, reason, vt)
        for domid, done in reports.items():
            dom = w.participants[domid]
            for f in done.faults:
                if dom.alive:
                    hv.crash(dom, f"vcpu {f.vcpu} {f.kind}: {f.detail} at eip {f.eip:#x} ({f.disasm})", vt_ns=f.vt_ns)

    def _results_ready(self, dom: Domain, results: list[HypercallResult]) -> None:
        for r in results:
            self._result_ready(dom, dom.vcpus[r.vcpu], r.vt_ns)
            for e in r.effects:
                if isinstance(e, _WAKING_EFFECTS) and 0 <= e.vcpu < len(dom.vcpus):
                    self._wake(dom, dom.vcpus[e.vcpu], r.vt_ns, kind(e))

    def _guarded(self, dom: Domain, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run one domain's part of a step; an exception (a hypervisor bug) ends that domain, not the others."""
        try:
            fn(*args)
        except Exception as exc:
            self.hv.crash(dom, f"hypervisor error handling {what}: {exc!r}", exc=exc)

    def _fold_report(self, dom: Domain, done: WindowDone, ran: set[int]) -> None:
        """A domain's report: its vCPUs' clocks and states go to the scheduler; the IPIs they sent are queued."""
        for r in done.vcpus:
            v = dom.vcpus[r.vcpu]
            v.clock_ns, v.instructions = r.clock_ns, r.instructions
            self.hv.scheduler.report(dom, v, r.state, r.clock_ns, r.vcpu in ran)
        for ipi in done.ipis:
            if not 0 <= ipi.dest < len(dom.vcpus):  # the guest wrote an APIC id it does not have
                dom.trace.warning("ipi.dropped", vt_ns=ipi.vt_ns, vcpu=ipi.src, dest=ipi.dest, vector=ipi.vector,
                                  why="no such vCPU")
                continue
            if ipi.local and ipi.dest not in ran:  # only a target that held a pCPU can have been delivered to
                raise ReportError(f"an IPI delivered locally to vCPU {ipi.dest}, which held no pCPU")
            if not ipi.local:
                self.hv.send_ipi(dom, Ipi(ipi.src, ipi.dest, ipi.vector, ipi.vt_ns + self.hv.cost.ipi_ns))
            # a local one's target held a pCPU when it arrived (the report's state is the window's end)
            dom.trace.event("ipi", vt_ns=ipi.vt_ns, vcpu=ipi.src, dest=ipi.dest, vector=ipi.vector,
                            target_running=ipi.local or dom.vcpus[ipi.dest].running)

    def _apply_hypercalls(
        self, w: OpenWindow, reports: dict[int, WindowDone]
    ) -> tuple[list[tuple[Domain, ShutdownReason, int]], set[int], dict[int, list[HypercallResult]]]:
        """Every trapped hypercall of the window, in (virtual time, domain, vCPU, seq) order. Returns the shutdowns,
        the domains stopped, and each domain's new results (as they arrive over its link)."""
        hv = self.hv
        queue: list[tuple[int, int, int, int, HypercallReq]] = []
        for domid, done in reports.items():
            queue.extend((h.vt_ns, domid, h.vcpu, h.seq, h) for h in done.hypercalls)
        queue.sort(key=lambda q: q[:4])
        shutdowns: list[tuple[Domain, ShutdownReason, int]] = []
        stopped: set[int] = set()
        fresh: dict[int, list[HypercallResult]] = {}
        for vt, domid, _, _, req in queue:
            dom = w.participants[domid]
            if domid in stopped or not dom.running:
                continue  # a vCPU's later trap in the same window as its domain's shutdown is never answered
            try:
                out = trap.apply(hv, dom, req)
            except ExtensionFailed as exc:  # the spec's extension's bug: it ends this domain too, named as such
                hv.crash(dom, f"vcpu {req.vcpu}: {exc}", vt_ns=vt, exc=exc)
                stopped.add(domid)
                continue
            except Exception as exc:  # a hypervisor bug: it ends this domain, never the hypervisor
                hv.crash(dom, f"hypervisor error in hypercall {req.nr} of vcpu {req.vcpu}: {exc!r}", vt_ns=vt,
                         exc=exc)
                stopped.add(domid)
                continue
            for target, effect in out.remote:
                peer = hv.domains.get(target)
                if peer is not None:
                    hv.deliver(peer, effect, vt + hv.cost.link_ns)
            if out.shutdown is not None:
                shutdowns.append((dom, out.shutdown, vt))
                stopped.add(domid)
            elif out.result is not None:
                fresh.setdefault(domid, []).append(out.result)
        return shutdowns, stopped, fresh

    def _ready_from_report(self, dom: Domain, done: WindowDone, ran: set[int]) -> None:
        """A vCPU the domain reports able to run is ready from its clock. One that held a pCPU and stopped (trapped,
        blocked) cannot run by itself; one that held none cannot have changed on its own, so a wake-up the
        hypervisor decided for it stands."""
        for r in done.vcpus:
            v = dom.vcpus[r.vcpu]
            if r.state == "running":
                if v.runstate not in (RunState.RUNNING, RunState.RUNNABLE):
                    self.hv.scheduler.wake(dom, v, r.clock_ns, "woke")
                v.ready_ns = r.clock_ns
            elif r.vcpu in ran and v.runstate in (RunState.RUNNING, RunState.RUNNABLE):
                v.ready_ns = None  # trapped: it runs again when its result is decided

    # -- the wake-up rules -----------------------------------------------------------------------------------

    def _wake(self, dom: Domain, v: Vcpu, vt_ns: int, why: str) -> None:
        """An event or interrupt for ``v`` at ``vt_ns``: a vCPU that cannot run becomes runnable from then on; one
        that can keeps its own clock."""
        if v.ready_ns is not None:
            return
        self.hv.scheduler.wake(dom, v, vt_ns, why)
        if v.runstate in (RunState.RUNNING, RunState.RUNNABLE):
            v.ready_ns = vt_ns

    def _result_ready(self, dom: Domain, v: Vcpu, vt_ns: int) -> None:
        """``v``'s hypercall result lands at ``vt_ns``: it cannot run before that."""
        if v.runstate not in (RunState.RUNNING, RunState.RUNNABLE):
            self.hv.scheduler.wake(dom, v, vt_ns, "result")
        v.ready_ns = vt_ns if v.ready_ns is None else max(v.ready_ns, vt_ns)


def next_activity(dom: Domain, free_pcpus: set[int] | None = None, boundary: int = 0) -> int | None:
    """The earliest virtual time anything can happen in ``dom``: a vCPU able to run, a delivery or IPI arriving,
    a timer expiring. With ``free_pcpus`` (the partition's pCPUs nobody holds) and ``boundary`` (the start of the
    next window), a vCPU that waits for a pCPU and has none free in its affinity counts from the boundary."""
    times = []
    for v in dom.vcpus:
        if v.ready_ns is None or v.held_until is not None:
            continue  # a vCPU a fault holds off every pCPU waits for the fault's end, which has its own activity
        waits = free_pcpus is not None and v.runstate is RunState.RUNNABLE and not free_pcpus & set(v.affinity)
        times.append(max(v.ready_ns, boundary) if waits else v.ready_ns)
    times += [d.vt_ns for d in dom.deliveries]
    times += [r.vt_ns for r in dom.held_results]
    # an IPI whose target is awake already waits only for that target to hold a pCPU: its clock says when
    times += [i.vt_ns for i in dom.ipis if dom.vcpus[i.dest].ready_ns is None]
    deadline = timers.next_deadline(dom.vcpus)
    if deadline is not None:
        times.append(deadline)
    return min(times) if times else None


def _check_report(dom: Domain, done: WindowDone) -> None:
    """A report is the domain process's word: every id must name something the domain has, and every time must be
    a time this simulation can reach, before anything is acted on."""
    seen: set[int] = set()
    n = len(dom.vcpus)
    for v in done.vcpus:
        if not 0 <= v.vcpu < n or v.vcpu in seen:
            raise ReportError(f"report names vCPU {v.vcpu} (domain has {n}) or repeats it")
        seen.add(v.vcpu)
        _check_time(v.clock_ns, f"vCPU {v.vcpu} clock")
        if not 0 <= v.instructions < 1 << 63:
            raise ReportError(f"vCPU {v.vcpu} instruction count {v.instructions} out of range")
    for h in done.hypercalls:
        if not 0 <= h.vcpu < n or len(h.args) != 5 or not all(0 <= a < 1 << 32 for a in h.args):
            raise ReportError(f"malformed hypercall record for vCPU {h.vcpu}")
        if not 0 <= h.nr < 1 << 32 or not 0 <= h.seq < 1 << 63:
            raise ReportError(f"hypercall number {h.nr} or sequence {h.seq} out of range")
        _check_time(h.vt_ns, "hypercall time")
    for i in done.ipis:  # the destination is the guest's choice, checked where the IPI is routed
        if not (0 <= i.src < n and 0 <= i.vector < 256 and -1 <= i.dest < 1 << 32):
            raise ReportError(f"IPI from vCPU {i.src} vector {i.vector}: no such vCPU or vector")
        _check_time(i.vt_ns, "IPI time")
    for f in done.faults:
        if not 0 <= f.vcpu < n:
            raise ReportError(f"fault of vCPU {f.vcpu}: no such vCPU")
        _check_time(f.vt_ns, "fault time")


def _check_time(vt: int, what: str) -> None:
    if not 0 <= vt < END_OF_TIME:
        raise ReportError(f"{what} {vt} is out of range")
