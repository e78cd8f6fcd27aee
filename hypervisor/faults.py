"""Fault injection: every fault the hypervisor can inject, at named points of the simulation core.

A fault is a deliberate deviation (a process killed, a vCPU preempted, a link that drops messages, a hypervisor
bug) that shows how guests and protocols behave under failure, or proves a checker catches what it must. The kinds
and their parameters are the shared catalog's (``pvcluster/faults.py``); this module carries them out, and hands a
kind one of the hypervisor's extensions adds (``Registry.fault_kind``) to ``hypervisor/extensions.py``. Faults come
from the spec (a domain's permanent ``faults``, the ``[[fault]]`` schedule, ``[faults] random``), from the
toolstack (``pvcluster inject``, ``Cluster.inject``) and from a replayed run's record.

When a fault acts is part of the deterministic timeline, so it is decided by the clock, never by the host:

* a scheduled fault (``at_ns``) acts when its domain's partition opens the first window starting at or after
  ``at_ns``;
* an interactive one acts at the next step; the ones that end a domain (``kill``, ``crash``, ``destroy``) act at
  once, before the open window closes (the domain's report for it is not used);
* a replayed one acts at exactly the step it acted at in the recorded run (``Point`` and step index).

Faults with a duration undo themselves the same way, at the first window starting at or after their end. Every
injection is a ``fault.inject`` event (its parameters, origin, the step and virtual time it acted), what it changed
a ``fault.outcome`` event, and its end a ``fault.end`` event. The injection points inside the core:

* ``Point.OPEN`` / ``Point.CLOSE``: when a window opens or is about to close (``FaultPlan.at_open`` / ``at_close``);
* ``Point.BUILD``: the Build message a domain is sent (``ident=``: a start_info ident no backend recognises);
* ``Point.HYPERCALL``: a hypercall's outcome (``skip-flush``, ``delay-flush``, ``corrupt-result``);
* ``Point.EVENT``: an event-channel notification being sent to a domain (``lose-event``, ``dup-event``);
* ``Point.LINK``: every message on a domain's link (``hypervisor/link.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from hypervisor.domain import DomainState
from hypervisor.extensions import ExtensionFailed, apply_fault
from hypervisor.tracing import DomainTrace
from hypervisor.vcpu import HELD_FOREVER, RunState
from pvcluster.abi.xen import ShutdownReason
from pvcluster.bus.effects import FlushTlb, Invlpg, SetClockSkew, SetSpeed
from pvcluster.bus.messages import Build
from pvcluster.faults import ENDING, NO_SUCH_DOMAIN, FaultRequest

if TYPE_CHECKING:
    from hypervisor.core import Hypervisor
    from hypervisor.domain import Domain
    from hypervisor.hypercalls.base import Call

FOREVER = -1  # a bug fault's count when it is a domain's permanent spec fault


class Point(enum.Enum):
    OPEN = "open"
    CLOSE = "close"
    BUILD = "build"
    HYPERCALL = "hypercall"
    EVENT = "event"
    LINK = "link"


@attrs.frozen
class Fault:
    """A domain's permanent fault from its spec ``faults`` list."""

    kind: str
    point: Point
    value: int | None = None


# A domain's permanent spec faults and where they act. The spec validates names against the same list.
KINDS: dict[str, Point] = {"skip-flush": Point.HYPERCALL, "ident": Point.BUILD}


def parse(items: Iterable[str]) -> tuple[Fault, ...]:
    """The permanent faults a domain's spec names (already validated): ``"skip-flush"``, ``"ident=0x..."``."""
    out = []
    for item in items:
        kind, _, value = item.partition("=")
        if kind in KINDS:
            out.append(Fault(kind, KINDS[kind], int(value, 16) if value else None))
    return tuple(out)


def on_build(faults: Iterable[Fault], build: Build, trace: DomainTrace) -> Build:
    """Point.BUILD: the Build message about to be sent."""
    for f in faults:
        if f.kind == "ident" and f.value is not None:
            build = attrs.evolve(build, start_info_ident=f.value & 0xFFFFFFFF)
            trace.event("fault.ident", vt_ns=0, ident=f.value & 0xFFFFFFFF)
    return build


@attrs.define
class Pending:
    fid: int
    request: FaultRequest
    origin: str  # "spec", "random", "interactive", or "end" (a fault with a duration undoing itself)
    at_ns: int  # acts at the first window of its domain starting at or after this
    step: int | None = None  # replay: acts at exactly this step, at ``point``
    point: Point = Point.OPEN
    undo: Callable[[int], str] | None = None  # for origin "end": undoes the fault at the virtual time given
    after: int = 0  # the step after which it was planned: a replayed fault asks for windows only from then on


class FaultPlan:
    """The faults still to come, and the log of those that acted (for `pvcluster faults` and replay).

    Each record in ``log`` says what acted, where (``step``, ``point``, ``vt_ns``), why (``origin``) and with
    what ``outcome``; ``on_record`` (the shell's) writes it to the run directory's ``faults.jsonl`` at once, so a
    run that ends badly still says which faults it saw. Replaying the interactive ones at the same step and point
    reproduces the run (``replay``)."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.pending: list[Pending] = []
        self.log: list[dict[str, Any]] = []
        self.on_record: Callable[[dict[str, Any]], None] | None = None
        self._fid = 0

    # -- scheduling ------------------------------------------------------------------------------------------

    def schedule(self, req: FaultRequest, origin: str) -> int:
        """Plan ``req``; one without ``at_ns`` acts at the next step its domain takes part in. Returns its id."""
        self._fid += 1
        at = req.at_ns if req.at_ns is not None else self.hv.clock.now_ns
        self.pending.append(Pending(self._fid, req, origin, at, after=self.hv.clock.index))
        return self._fid

    def replay(self, record: dict[str, Any]) -> None:
        """Plan a fault recorded in another run (an interactive one) at exactly the step and point it acted at,
        under the id it had."""
        fid = int(record["fid"])
        self._fid = max(self._fid, fid)
        req = FaultRequest(record["kind"], record["target"], record["at_ns"], record["params"])
        # it keeps its origin: the replayed trace must be the recorded one
        self.pending.append(Pending(fid, req, str(record["origin"]), int(record["planned_vt_ns"]),
                                    int(record["step"]), Point(record["point"]), after=int(record["after"])))

    def activity(self, dom: Domain) -> int | None:
        """When the earliest fault planned for ``dom`` needs a window: the grid window that starts at or after it."""
        w, index = self.hv.clock.window_ns, self.hv.clock.index
        times = [-(-p.at_ns // w) * w for p in self.pending
                 if p.point is Point.OPEN and p.after <= index and self._domain(p) is dom]
        return min(times) if times else None

    def _domain(self, p: Pending) -> Domain | None:
        return self.hv.domains.get(p.request.domain)

    def _outside(self, p: Pending) -> bool:
        """A fault whose domain takes part in no window (paused or ended): it cannot wait for one. (A spec fault's
        domain that is not created yet, or still building, can: it waits.)"""
        dom = self._domain(p)
        return dom is not None and dom.joined and not dom.running

    def orphan_time(self) -> int | None:
        """The earliest virtual time a fault of a paused domain is due: the clock gives it a step of its own."""
        index = self.hv.clock.index
        times = [p.at_ns for p in self.pending
                 if p.point is Point.OPEN and p.after <= index and self._outside(p) and _alive(self._domain(p))]
        return min(times) if times else None

    # -- the injection points of the clock -------------------------------------------------------------------

    def at_open(self, index: int, start: int, participants: list[Domain]) -> None:
        """Point.OPEN: the faults due when step ``index`` opens a window at ``start`` for ``participants`` (none: a
        step of its own, for a fault of a paused domain)."""
        def due(p: Pending) -> bool:
            if p.point is not Point.OPEN:
                return False
            if p.step is not None:
                return p.step == index
            if not participants:
                return self._outside(p) and p.at_ns <= start
            return p.at_ns <= start and self._domain(p) in participants
        self._run([p for p in self.pending if due(p)], index, start)

    def at_close(self, index: int, vt: int) -> None:
        """Point.CLOSE, at the start of the step after step ``index``, before its window (if any) closes: in a
        replay, first the faults that acted at once in the recorded run (they end a domain) while step ``index`` was
        the latest; then the faults of domains outside every window that are due (those of ended domains: at
        once), exactly where they came in the recorded run."""
        self._run([p for p in self.pending if p.point is Point.CLOSE and p.step == index], index, vt)
        now = [p for p in self.pending if p.step is None and p.point is Point.OPEN and self._outside(p) and (
            p.at_ns <= vt or not _alive(self._domain(p)))]
        for p in now:
            p.point = Point.CLOSE  # the record says where it acted, which is where a replay must act
        self._run(now, index, vt)

    def now(self, req: FaultRequest, origin: str) -> dict[str, Any]:
        """A fault that ends a domain, from the toolstack: it acts at once, before the open window (if any) closes."""
        self._fid += 1
        clock = self.hv.clock
        p = Pending(self._fid, req, origin, clock.now_ns, clock.index, Point.CLOSE, after=clock.index)
        return self._apply(p, clock.index, clock.now_ns)

    def _run(self, due: list[Pending], step: int, vt: int) -> None:
        for p in sorted(due, key=lambda p: p.fid):
            self.pending.remove(p)
            self._apply(p, step, vt)

    def _apply(self, p: Pending, step: int, vt: int) -> dict[str, Any]:
        req = p.request
        dom = self._domain(p)
        record = {"fid": p.fid, **req.to_dict(), "origin": p.origin, "step": step, "point": p.point.value,
                  "vt_ns": vt, "planned_vt_ns": p.at_ns, "after": p.after, "replayed": p.step is not None}
        if p.undo is not None:
            if dom is None or not dom.alive:
                return {**record, "outcome": "the domain ended first"}
            outcome = p.undo(vt)
            dom.trace.event("fault.end", vt_ns=vt, fid=p.fid, kind=req.kind, target=req.target, outcome=outcome)
            return {**record, "outcome": outcome}
        if dom is None or not dom.alive:
            outcome = NO_SUCH_DOMAIN
        elif dom.state is DomainState.SHUTTING_DOWN and req.kind not in ENDING:
            # Once it has shut down a domain runs no more guest code, so only what ends its process still applies
            # (as `xl destroy` does to a domain stuck in shutdown).
            outcome = f"{NO_SUCH_DOMAIN} (it shut down at {dom.ended_vt} ns)"
        else:
            ext = self.hv.extensions.fault_kinds.get(req.kind) if req.kind not in _KINDS else None
            more = {"extension": ext.extension} if ext is not None else {}
            dom.trace.event("fault.inject", vt_ns=vt, fid=p.fid, kind=req.kind, target=req.target,
                            params=dict(req.params), origin=p.origin, step=step, at_ns=req.at_ns, **more)
            try:
                if ext is not None:
                    outcome = apply_fault(ext, self.hv, dom, req, vt)
                elif req.kind in _KINDS:
                    outcome = _KINDS[req.kind](self, dom, req, vt, p.fid)
                else:  # a replayed record naming a kind this hypervisor's extensions do not add
                    outcome = f"refused: no fault kind {req.kind} in this cluster (its extensions add none such)"
            except ExtensionFailed as exc:  # the extension's bug: the domain it targets ends, nothing else
                self.hv.crash(dom, str(exc), vt_ns=vt, exc=exc)
                outcome = f"error: {exc}"
            except Exception as exc:  # a bug in a fault must not take the hypervisor down
                self.hv.crash(dom, f"hypervisor error injecting {req.kind}: {exc!r}", exc=exc)
                outcome = f"error: {exc!r}"
            dom.trace.event("fault.outcome", vt_ns=vt, fid=p.fid, kind=req.kind, outcome=outcome)
        record["outcome"] = outcome
        self.log.append(record)
        if self.on_record is not None:
            self.on_record(record)
        return record

    def until(self, fid: int, req: FaultRequest, end_ns: int, undo: Callable[[int], str]) -> None:
        """Undo fault ``fid`` at the first window of its domain starting at or after ``end_ns``."""
        self.pending.append(Pending(fid, req, "end", end_ns, undo=undo, after=self.hv.clock.index))


def _alive(dom: Domain | None) -> bool:
    return dom is not None and dom.alive


# -- what each kind does (returns its outcome) ----------------------------------------------------------------


def _kill(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    plan.hv.crash(dom, "killed by fault (SIGKILL)", vt_ns=vt, signal="kill")
    return "killed"


def _crash(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    plan.hv.shutdown(dom, ShutdownReason.crash, vt)
    dom.crash_detail = f"crashed by fault {fid} (SHUTDOWN_crash, as if the guest had asked)"
    return "crashed (SHUTDOWN_crash)"


def _destroy(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    plan.hv.destroy(dom)
    return "destroyed"


def _shutdown(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    """The toolstack's shutdown: Xen's domain_shutdown(d, reason), which dom0 reaches with SCHEDOP_remote_shutdown
    (xen/common/sched/core.c); the guest gets no say, as with a guest's own SCHEDOP_shutdown."""
    if not dom.joined or dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
        return f"refused: the domain is {dom.state.value}, not running"
    reason = ShutdownReason(req.params["reason"])
    plan.hv.shutdown(dom, reason, vt)
    return f"shut down ({reason.name})"


def _pause(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    if not dom.joined or dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
        return f"refused: the domain is {dom.state.value}, not running"
    try:
        count = plan.hv.pause(dom, vt)
    except ValueError as exc:
        return f"refused: {exc}"
    if req.params["duration_ns"]:
        end = vt + req.params["duration_ns"]
        plan.until(fid, req, end, lambda at: _undo_pause(plan.hv, dom, at))
    return "paused" if count == 1 else f"paused again (pause count {count})"


def _undo_pause(hv: Hypervisor, dom: Domain, vt: int) -> str:
    if dom.state is not DomainState.PAUSED:
        return f"not paused ({dom.state.value})"
    count = hv.unpause(dom, vt)
    return "unpaused" if count == 0 else f"still paused (pause count {count})"


def _unpause(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    return _undo_pause(plan.hv, dom, vt)


def _stop(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    plan.hv.signals.append((dom, "stop", req.params["wall_ms"]))
    return f"process stopped for {req.params['wall_ms']} ms of wall time"


def _vcpu(dom: Domain, req: FaultRequest) -> Any:
    vid = req.vcpu
    if vid is None or not 0 <= vid < len(dom.vcpus):
        raise ValueError(f"domain {dom.name} has no vCPU {vid}")
    return dom.vcpus[vid]


def _hold(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    """preempt and offline: the vCPU leaves its pCPU and may not have one until the hold ends."""
    v = _vcpu(dom, req)
    until = vt + req.params["duration_ns"] if req.params["duration_ns"] else None
    v.held_until = until if until is not None else HELD_FOREVER
    if v.runstate is RunState.RUNNING:  # it leaves its pCPU where its own clock is (Scheduler.move)
        plan.hv.scheduler.move(dom, v, RunState.RUNNABLE, vt, f"{req.kind} (fault)")
    if until is not None:
        plan.until(fid, req, until, lambda at: _release(v))
    return f"vcpu {v.vid} held until {until if until is not None else 'brought online'}"


def _release(v: Any) -> str:
    v.held_until = None
    return f"vcpu {v.vid} released"


def _online(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    return _release(_vcpu(dom, req))


def _pin(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    v = _vcpu(dom, req)
    pcpu = req.params["pcpu"]
    if pcpu >= plan.hv.scheduler.pcpus:
        return f"refused: there is no pCPU {pcpu}"
    base = v.affinity
    plan.hv.scheduler.pin(dom, v, (pcpu,), vt)
    if req.params["duration_ns"]:
        plan.until(fid, req, vt + req.params["duration_ns"],
                   lambda at: _unpin(plan.hv, dom, v, base, at))
    return f"vcpu {v.vid} pinned to pCPU {pcpu}"


def _unpin(hv: Hypervisor, dom: Domain, v: Any, base: tuple[int, ...], vt: int) -> str:
    hv.scheduler.pin(dom, v, base, vt)
    return f"vcpu {v.vid} back on pCPUs {list(base)}"


def _slow(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    v = _vcpu(dom, req)
    base = plan.hv.cost.ps_per_instr
    plan.hv.deliver(dom, SetSpeed(vcpu=v.vid, ps_per_instr=base * req.params["factor"]), vt)
    end = vt + req.params["duration_ns"]
    plan.until(fid, req, end, lambda at: _speed(plan.hv, dom, v.vid, base, at))
    return f"vcpu {v.vid} runs {req.params['factor']}x slower"


def _speed(hv: Hypervisor, dom: Domain, vid: int, ps: int, vt: int) -> str:
    hv.deliver(dom, SetSpeed(vcpu=vid, ps_per_instr=ps), vt)
    return f"vcpu {vid} back to {ps} ps per instruction"


def _skew(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    plan.hv.deliver(dom, SetClockSkew(offset_ns=req.params["offset_ns"], ppm=req.params["ppm"]), vt)
    return f"system time skewed by {req.params['offset_ns']} ns and {req.params['ppm']} ppm"


def _link(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    link, p = dom.link, req.params
    if req.kind == "delay":
        link.delay_ns, link.jitter_ns, link.delay_until = p["delay_ns"], p["jitter_ns"], vt + p["duration_ns"]
        return f"delay on the link: +{p['delay_ns']} ns (jitter {p['jitter_ns']}) until {link.delay_until}"
    if req.kind == "partition":
        return _partition(plan, dom, req, vt, fid)
    if req.kind == "drop":
        link.drops += p["count"]
    elif req.kind == "dup":
        link.dups += p["count"]
    else:
        link.reorders += p["count"]
    return f"{req.kind} on the link: next {p['count']} messages"


def _partition(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    limit = plan.hv.partition_limit_ns
    dom.link.partition_from, dom.link.partition_until = vt, vt + req.params["duration_ns"]
    if req.params["duration_ns"] <= limit:
        return f"link cut until {vt + req.params['duration_ns']}"
    end = FaultRequest("crash", req.target)
    plan.pending.append(Pending(fid, end, "end", vt + limit, undo=lambda at: _unreachable(plan.hv, dom, limit, at)))
    return f"link cut for longer than partition_limit_ns ({limit}): the domain ends at {vt + limit}"


def _unreachable(hv: Hypervisor, dom: Domain, limit: int, vt: int) -> str:
    if not dom.alive:
        return f"already {dom.state.value}"
    hv.crash(dom, f"unreachable: its link was cut for more than {limit} ns", vt_ns=vt)
    return "ended as unreachable"


def _sched(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    """`pvcluster sched --slice`: the scheduler's slice, for every domain from this window boundary on (a slice
    shorter than a window could not end inside one: refused)."""
    slice_ns, window_ns = req.params["slice_ns"], plan.hv.clock.window_ns
    if slice_ns < window_ns:
        return f"refused: a slice of {slice_ns} ns is shorter than a window ({window_ns} ns)"
    old = plan.hv.scheduler.slice_ns
    plan.hv.scheduler.slice_ns = slice_ns
    plan.hv.printk(f"scheduler: slice {old} ns -> {slice_ns} ns", vt_ns=vt, slice_ns=slice_ns, previous=old)
    return f"slice {old} ns -> {slice_ns} ns"


def _bug(plan: FaultPlan, dom: Domain, req: FaultRequest, vt: int, fid: int) -> str:
    dom.bugs[req.kind] = dom.bugs.get(req.kind, 0) + req.params["count"]
    if req.kind == "corrupt-result":
        dom.bug_params["xor"] = req.params["xor"]
    if req.kind == "delay-flush":
        dom.bug_params["delay_ns"] = req.params["delay_ns"]
    return f"{req.kind} armed for {req.params['count']}"


_KINDS: dict[str, Callable[[FaultPlan, Domain, FaultRequest, int, int], str]] = {
    "kill": _kill, "crash": _crash, "destroy": _destroy, "shutdown": _shutdown, "pause": _pause,
    "unpause": _unpause, "stop": _stop,
    "preempt": _hold, "offline": _hold, "online": _online, "pin": _pin, "slow": _slow,
    "delay": _link, "drop": _link, "dup": _link, "reorder": _link, "partition": _link,
    "skip-flush": _bug, "lose-event": _bug, "dup-event": _bug, "corrupt-result": _bug, "delay-flush": _bug,
    "skew": _skew, "sched": _sched,
}


# -- Point.HYPERCALL and Point.EVENT --------------------------------------------------------------------------


def strikes(dom: Domain, kind: str) -> bool:
    """Whether the bug ``kind`` armed on ``dom`` strikes now (and uses one of its count)."""
    left = dom.bugs.get(kind, 0)
    if left == 0:
        return False
    if left != FOREVER:
        dom.bugs[kind] = left - 1
    return True


def foreign_flushes(call: Call) -> list[FlushTlb | Invlpg]:
    """The TLB flushes a hypercall asks of vCPUs other than its caller's: what a shootdown acknowledges."""
    return [e for e in call.effects if isinstance(e, FlushTlb | Invlpg) and e.vcpu != call.vcpu]


def on_hypercall(call: Call) -> list[tuple[int, FlushTlb | Invlpg]]:
    """Point.HYPERCALL: skip-flush and delay-flush act on the flushes a hypercall asks of other vCPUs; returns
    the flushes delay-flush holds back, as (virtual time, effect) to deliver later."""
    dom, later = call.dom, []
    flushes = foreign_flushes(call)
    if not flushes:
        return []
    if strikes(dom, "skip-flush"):
        call.effects = [e for e in call.effects if e not in flushes]
        dom.trace.event("fault.skip_flush", vt_ns=call.vt_ns, vcpu=call.vcpu, targets=sorted({e.vcpu for e in flushes}))
    elif strikes(dom, "delay-flush"):
        call.effects = [e for e in call.effects if e not in flushes]
        at = call.vt_ns + dom.bug_params.get("delay_ns", 0)
        later = [(at, e) for e in flushes]
        dom.trace.event("fault.delay_flush", vt_ns=call.vt_ns, vcpu=call.vcpu, until_vt_ns=at,
                        targets=sorted({e.vcpu for e in flushes}))
    return later


def corrupt(dom: Domain, value: int, span: str, vt: int) -> int:
    """Point.HYPERCALL: corrupt-result flips bits of the value the guest sees."""
    if not strikes(dom, "corrupt-result"):
        return value
    bad = (value ^ dom.bug_params.get("xor", 0xFFFFFFFF)) & 0xFFFFFFFF
    dom.trace.event("fault.corrupt_result", vt_ns=vt, span=span, decided=value & 0xFFFFFFFF, delivered=bad)
    return bad


def event_copies(dom: Domain, eid: int, vt: int) -> int:
    """Point.EVENT: how many times a notification reaches the domain: 0 (lose-event), 2 (dup-event) or 1."""
    if strikes(dom, "lose-event"):
        dom.trace.event("fault.lose_event", vt_ns=vt, eid=eid)
        return 0
    if strikes(dom, "dup-event"):
        dom.trace.event("fault.dup_event", vt_ns=vt, eid=eid)
        return 2
    return 1
