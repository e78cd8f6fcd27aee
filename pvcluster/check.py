"""A Jepsen-style checker: the invariants a run must keep, verified from its traces alone.

The hypervisor trace says what the hypervisor decided (events sent, hypercall results and their effects, when
each domain ended, which bugs were injected); each domain-process trace says what its guest observed (events
delivered, answers received, stale TLB reads). The checker holds one against the other:

1. ``stale-tlb-read``: no guest read through a stale translation (``guest.mark`` SHOOTDOWN_STALE).
2. ``event-delivered-once``: every ``event.sent`` is ``event.delivered`` exactly once, unless its loss is
   explained (below); nothing is delivered twice, nor delivered without having been sent.
3. ``hypercall-answered-once``: every ``hypercall`` gets exactly one ``hypercall.done`` in its domain's trace,
   unless it ended its domain (``sched_op`` at the vt of the domain's ``domain.shutdown``) or its loss is
   explained; no answer for a hypercall never made; no ``domain.bad_result``.
4. ``effects-applied``: an answer applied as many effects as the hypervisor decided, is complete exactly when the
   hypercall was not deferred, and a complete one carries the hypervisor's result (as unsigned 32 bits).
5. ``fault-traced``: every fault in ``faults.jsonl`` reached the hypervisor (``fault.inject``), or was refused
   because its domain was not live, or was due (``at_ns``) after the hypervisor trace's last virtual time.

A loss (an event not delivered, a hypercall not answered) is explained when its domain could no longer have seen
it: with ``deadline = arrival_vt_ns + 2 * window_ns``, the hypervisor trace ends the domain (crash, shutdown,
destroy, process exit) at or before the deadline, or the domain's process trace stops before the deadline without
a clean ``domain.stop`` (the process was killed, or the run is still going), or there is no process trace at all.
An injected bug (``fault.lose_event``, ``fault.dup_event``, ``fault.corrupt_result``, ``fault.skip_flush``,
``fault.delay_flush``) never explains anything: it is what the checker exists to catch, and it is named in the
violation only as a hint. Link faults are not violations: the link protocol retransmits and de-duplicates, and a
violation they caused would show up as one of the above.

The traces are streamed: one pass over the hypervisor trace keeps a small record per event sent and per hypercall,
one pass over each domain trace matches against them, and a last pass over the records finds what never arrived.
Time and memory are linear in the trace; a torn last line (a killed process) is ignored (``pvcluster.jsonl``).
"""

from __future__ import annotations

import bisect
import enum
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from pvcluster.abi.platform import Mark
from pvcluster.faults import NO_SUCH_DOMAIN
from pvcluster.jsonl import JsonLines

U32 = 0xFFFFFFFF
# A domain process's own record that the hypervisor stopped it: after it, the trace ending is not a kill.
CLEAN_STOP = "domain.stop"
# The hypervisor's record of a domain ending, and how a report words it.
DOMAIN_ENDS = {"domain.crash": "crashed", "domain.shutdown": "shut down", "domain.destroy": "was destroyed",
               "domain.process_exit": "process exited"}
LINK_FAULTS = frozenset({"link.drop", "link.dup", "link.delay", "link.reorder", "link.partitioned"})
FLUSH_BUGS = ("fault.skip_flush", "fault.delay_flush")
# Every stats key, in the order format_report prints them.
STATS = (
    "domains", "events_sent", "events_delivered", "events_lost_explained", "hypercalls", "hypercalls_answered",
    "hypercalls_ended_domain", "hypercalls_unanswered_explained", "pv_shootdowns", "stale_reads", "faults",
    "faults_injected", "faults_refused", "faults_not_due", "bug_lose_event", "bug_dup_event", "bug_corrupt_result",
    "bug_skip_flush", "bug_delay_flush", "link_faults", "link_dups_dropped", "torn_lines", "violations",
)


class Invariant(enum.StrEnum):
    STALE_TLB = "stale-tlb-read"
    EVENT_ONCE = "event-delivered-once"
    HYPERCALL_ONCE = "hypercall-answered-once"
    EFFECTS = "effects-applied"
    FAULT_TRACED = "fault-traced"


@attrs.frozen
class Violation:
    """One broken invariant, where and when: ``span`` names a hypercall or shootdown, ``eid`` an event."""

    invariant: str
    dom: int | None
    vt_ns: int
    span: str | None
    detail: str
    eid: int | None = None

    def sort_key(self) -> tuple[int, int, str, str, int, str]:
        return (self.vt_ns, -1 if self.dom is None else self.dom, self.invariant, self.span or "",
                -1 if self.eid is None else self.eid, self.detail)


@attrs.frozen
class Report:
    violations: list[Violation]  # sorted by (vt_ns, dom)
    stats: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "stats": dict(self.stats),
                "violations": [attrs.asdict(v) for v in self.violations]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


# -- what the hypervisor trace says ----------------------------------------------------------------------------


@attrs.define
class _Sent:
    vt_ns: int
    arrival_vt_ns: int
    delivered: int = 0


@attrs.define
class _Call:
    vt_ns: int
    name: str
    result: int
    effects: int
    deferred: bool
    arrival_vt_ns: int
    answers: int = 0


@attrs.define
class _Hypervisor:
    """The hypervisor trace, reduced to what the domain traces are checked against."""

    sent: dict[tuple[int, int], _Sent] = attrs.Factory(dict)  # (receiving dom, eid)
    calls: dict[tuple[int, str], _Call] = attrs.Factory(dict)  # (dom, span)
    ends: dict[int, tuple[int, str]] = attrs.Factory(dict)  # dom -> (earliest end vt, end event)
    shutdowns: set[tuple[int, int]] = attrs.Factory(set)  # (dom, vt of domain.shutdown)
    unanswerable: set[tuple[int, str]] = attrs.Factory(set)  # (dom, span) of calls that ended their domain
    lost: dict[tuple[int, int], int] = attrs.Factory(dict)  # (dom, eid) -> vt of fault.lose_event
    duped: set[tuple[int, int]] = attrs.Factory(set)  # (dom, eid) struck by fault.dup_event
    corrupted: dict[str, tuple[Any, Any]] = attrs.Factory(dict)  # span -> (decided, delivered)
    flush_bugs: dict[int, list[tuple[int, str]]] = attrs.Factory(dict)  # dom -> [(vt, event)]
    injected: set[Any] = attrs.Factory(set)  # fids
    outcomes: dict[Any, str] = attrs.Factory(dict)  # fid -> fault.outcome / fault.end outcome
    end_vt_ns: int = -1  # the latest virtual time the trace reached


@attrs.define
class _DomainEnd:
    """How a domain process's trace ends: the latest virtual time it reached, and whether it was told to stop."""

    end_vt_ns: int = -1
    clean: bool = False


class _Checker:
    """One check of one run directory: the three passes, accumulating violations and stats."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        spec = json.loads((run_dir / "spec.json").read_text(encoding="utf-8"))
        try:
            self.window_ns = int(spec["hypervisor"]["window_ns"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{run_dir / 'spec.json'}: no integer hypervisor.window_ns") from None
        self.hv = _Hypervisor()
        self.domains: dict[int, _DomainEnd] = {}
        self.names: dict[str, int] = {}  # domain name -> id, from the trace file names
        self.violations: list[Violation] = []
        self.stats = dict.fromkeys(STATS, 0)
        # (dom, hypercall span) -> the vCPUs a paravirtual shootdown's answer acknowledged flushing and not yet seen
        # flushed, and when the answer was due; (dom, vcpu) -> times of flushes no answer carried
        self.pending_flushes: dict[tuple[int, str], tuple[list[int], int]] = {}
        self.late_flushes: dict[tuple[int, int], list[int]] = {}

    def violate(self, invariant: Invariant, dom: int | None, vt_ns: int, detail: str, *, span: str | None = None,
                eid: int | None = None) -> None:
        self.violations.append(Violation(invariant.value, dom, vt_ns, span, detail, eid))

    def count_torn(self, lines: JsonLines) -> None:
        self.stats["torn_lines"] += lines.torn_tail

    # -- pass 1: the hypervisor ------------------------------------------------------------------------------

    def scan_hypervisor(self, path: Path) -> None:
        lines = JsonLines(path)
        handlers: dict[str, Callable[[int, dict[str, Any]], None]] = {
            "event.sent": self._sent, "hypercall": self._hypercall, "fault.lose_event": self._lose_event,
            "fault.dup_event": self._dup_event, "fault.corrupt_result": self._corrupt_result,
            "fault.skip_flush": self._flush_bug, "fault.delay_flush": self._flush_bug,
            "fault.inject": self._inject, "fault.outcome": self._fault_outcome, "fault.end": self._fault_outcome,
            "shootdown": self._shootdown,
        }
        for n, e in lines:
            name = e["event"]
            self.hv.end_vt_ns = max(self.hv.end_vt_ns, _vt(e))
            if name in LINK_FAULTS:
                self.stats["link_faults"] += 1
                continue
            dom = e.get("dom")
            try:
                if name in DOMAIN_ENDS and isinstance(dom, int):
                    self._domain_end(dom, e)
                elif (handler := handlers.get(name)) is not None:
                    handler(dom if isinstance(dom, int) else -1, e)
            except (KeyError, TypeError, ValueError) as exc:
                raise _malformed(path, n, name, exc) from None
        self.count_torn(lines)

    def _domain_end(self, dom: int, e: dict[str, Any]) -> None:
        vt = _vt(e)
        if dom not in self.hv.ends or vt < self.hv.ends[dom][0]:
            self.hv.ends[dom] = (vt, e["event"])
        if e["event"] == "domain.shutdown":
            self.hv.shutdowns.add((dom, vt))

    def _sent(self, dom: int, e: dict[str, Any]) -> None:
        self.stats["events_sent"] += 1
        vt, eid = _vt(e), e["eid"]
        if (dom, eid) in self.hv.sent:  # eids are unique per receiving domain: one delivery could not tell them apart
            self.violate(Invariant.EVENT_ONCE, dom, vt, "the hypervisor sent this eid twice", eid=eid)
            return
        self.hv.sent[(dom, eid)] = _Sent(vt, int(e.get("arrival_vt_ns", vt)))

    def _hypercall(self, dom: int, e: dict[str, Any]) -> None:
        self.stats["hypercalls"] += 1
        vt, span = _vt(e), str(e["span"])
        if (dom, span) in self.hv.calls:  # the link de-duplicates requests: one executed twice is a bug
            self.violate(Invariant.HYPERCALL_ONCE, dom, vt, "the hypervisor executed this hypercall twice", span=span)
            return
        if "arrival_vt_ns" in e and e["arrival_vt_ns"] is None:
            self.hv.unanswerable.add((dom, span))  # it ended its domain (SCHEDOP_shutdown): no answer is due
            self.stats["hypercalls_ended_domain"] += 1
            return
        done = int(e.get("done_vt_ns", vt))
        # names repeat across hundreds of thousands of calls: keep one copy of each
        name = sys.intern(str(e.get("name", "")))
        self.hv.calls[(dom, span)] = _Call(vt, name, int(e["result"]), int(e.get("effects", 0)),
                                           bool(e.get("deferred", False)), int(e.get("arrival_vt_ns", done)))

    def _shootdown(self, dom: int, e: dict[str, Any]) -> None:
        """A paravirtual shootdown (sd-dDvV-SEQ) is answered by hypercall hc-dDvV-SEQ: that answer must carry the
        flush of every target."""
        if e.get("mode") != "pv":
            return
        self.stats["pv_shootdowns"] += 1
        span = "hc-" + str(e["span"]).removeprefix("sd-")
        self.pending_flushes[(dom, span)] = (sorted(int(t) for t in e["targets"]), int(e.get("end_vt_ns", _vt(e))))

    def _lose_event(self, dom: int, e: dict[str, Any]) -> None:
        self.stats["bug_lose_event"] += 1
        self.hv.lost[(dom, e["eid"])] = _vt(e)

    def _dup_event(self, dom: int, e: dict[str, Any]) -> None:
        self.stats["bug_dup_event"] += 1
        self.hv.duped.add((dom, e["eid"]))

    def _corrupt_result(self, dom: int, e: dict[str, Any]) -> None:
        self.stats["bug_corrupt_result"] += 1
        self.hv.corrupted[str(e["span"])] = (e.get("decided"), e.get("delivered"))

    def _flush_bug(self, dom: int, e: dict[str, Any]) -> None:
        self.stats["bug_" + e["event"].removeprefix("fault.")] += 1
        self.hv.flush_bugs.setdefault(dom, []).append((_vt(e), e["event"]))

    def _inject(self, dom: int, e: dict[str, Any]) -> None:
        self.stats["faults_injected"] += 1
        self.hv.injected.add(_hashable(e.get("fid")))

    def _fault_outcome(self, dom: int, e: dict[str, Any]) -> None:
        self.hv.outcomes[_hashable(e.get("fid"))] = str(e.get("outcome", ""))

    # -- pass 2: each domain process -------------------------------------------------------------------------

    def scan_domain(self, path: Path, domid: int) -> None:
        end = self.domains.setdefault(domid, _DomainEnd())
        lines = JsonLines(path)
        for n, e in lines:
            vt, name = _vt(e), e["event"]
            end.end_vt_ns = max(end.end_vt_ns, vt)
            dom = e["dom"] if isinstance(e.get("dom"), int) else domid
            try:
                self._domain_event(dom, vt, name, e, end)
            except (KeyError, TypeError, ValueError) as exc:
                raise _malformed(path, n, name, exc) from None
        self.count_torn(lines)

    def _domain_event(self, dom: int, vt: int, name: str, e: dict[str, Any], end: _DomainEnd) -> None:
        if name == "event.delivered":
            self._delivered(dom, vt, e)
        elif name == "hypercall.done":
            self._done(dom, vt, e)
        elif name == "guest.mark" and e.get("code") == Mark.SHOOTDOWN_STALE:
            self._stale(dom, vt, e)
        elif name == "domain.bad_result":
            self.violate(Invariant.HYPERCALL_ONCE, dom, vt,
                         f"vcpu {e.get('vcpu')} got a result for no pending hypercall (seq {e.get('seq')}): "
                         f"{e.get('detail')}")
        elif name == "tlb.flush":
            self._flushed(dom, vt, e)
        elif name == "link.dup_dropped":
            self.stats["link_dups_dropped"] += 1
        elif name == CLEAN_STOP:
            end.clean = True

    def _delivered(self, dom: int, vt: int, e: dict[str, Any]) -> None:
        self.stats["events_delivered"] += 1
        eid = e["eid"]
        sent = self.hv.sent.get((dom, eid))
        if sent is None:
            self.violate(Invariant.EVENT_ONCE, dom, vt, f"event delivered on port {e.get('port')} but never sent",
                         eid=eid)
            return
        sent.delivered += 1
        if sent.delivered > 1:
            hint = " (fault.dup_event struck it)" if (dom, eid) in self.hv.duped else ""
            self.violate(Invariant.EVENT_ONCE, dom, vt,
                         f"event delivered {sent.delivered} times on port {e.get('port')}{hint}", eid=eid)

    def _done(self, dom: int, vt: int, e: dict[str, Any]) -> None:
        span = str(e["span"])
        call = self.hv.calls.get((dom, span))
        if call is None:
            self.violate(Invariant.HYPERCALL_ONCE, dom, vt, "answer for a hypercall the hypervisor never made",
                         span=span)
            return
        call.answers += 1
        if call.answers > 1:
            self.violate(Invariant.HYPERCALL_ONCE, dom, vt, f"{call.name} answered {call.answers} times", span=span)
            return
        self.stats["hypercalls_answered"] += 1
        effects, complete = int(e.get("effects", 0)), bool(e.get("complete", True))
        if effects != call.effects:
            self.violate(Invariant.EFFECTS, dom, vt,
                         f"{call.name}: the hypervisor decided {call.effects} effects, the domain applied {effects}",
                         span=span)
        if complete == call.deferred:
            what = "deferred but answered as complete" if call.deferred else "not deferred but answered incomplete"
            self.violate(Invariant.EFFECTS, dom, vt, f"{call.name}: {what}", span=span)
        elif complete and int(e["value"]) & U32 != call.result & U32:
            hint = ""
            if span in self.hv.corrupted:
                decided, delivered = self.hv.corrupted[span]
                hint = f" (fault.corrupt_result: decided {decided}, delivered {delivered})"
            self.violate(Invariant.EFFECTS, dom, vt,
                         f"hypercall result corrupted: {call.name} returned {call.result} "
                         f"({call.result & U32:#x}), the guest got {int(e['value']) & U32:#x}{hint}", span=span)

    def _flushed(self, dom: int, vt: int, e: dict[str, Any]) -> None:
        span = e.get("span")
        key = (dom, str(span))
        if span is not None and key in self.pending_flushes:
            targets, due = self.pending_flushes[key]
            if e["vcpu"] in targets:
                targets.remove(e["vcpu"])
        elif span is None:
            self.late_flushes.setdefault((dom, int(e["vcpu"])), []).append(vt)

    def _stale(self, dom: int, vt: int, e: dict[str, Any]) -> None:
        self.stats["stale_reads"] += 1
        span = e.get("span") or f"sd-d{dom}-r{e.get('round')}"
        self.violate(Invariant.STALE_TLB, dom, vt,
                     f"stale TLB read on vcpu {e.get('vcpu')}, shootdown round {e.get('round')}"
                     f"{self._flush_hint(dom, vt)}", span=str(span))

    def _flush_hint(self, dom: int, vt: int) -> str:
        bugs = sorted(self.hv.flush_bugs.get(dom, []))
        at = bisect.bisect_right(bugs, (vt, "\uffff"))
        if not at:
            return ""
        bug_vt, bug = bugs[at - 1]
        return f" (last TLB-flush bug before it: {bug} at {bug_vt} ns)"

    # -- pass 3: what never arrived --------------------------------------------------------------------------

    def explained(self, dom: int, arrival_vt_ns: int) -> str | None:
        """Why ``dom`` could not have seen something arriving at ``arrival_vt_ns``, or None if it should have."""
        deadline = arrival_vt_ns + 2 * self.window_ns
        end = self.hv.ends.get(dom)
        if end is not None and end[0] <= deadline:
            return f"d{dom} {DOMAIN_ENDS[end[1]]} at {end[0]} ns"
        trace = self.domains.get(dom)
        if trace is None:
            return f"d{dom} has no domain-process trace"
        if not trace.clean and trace.end_vt_ns < deadline:
            return f"d{dom}'s process trace stops at {trace.end_vt_ns} ns without {CLEAN_STOP}"
        return None

    def settle(self) -> None:
        for (dom, eid), sent in self.hv.sent.items():
            if sent.delivered:
                continue
            if self.explained(dom, sent.arrival_vt_ns) is not None:
                self.stats["events_lost_explained"] += 1
                continue
            hint = " (fault.lose_event struck it)" if (dom, eid) in self.hv.lost else ""
            self.violate(Invariant.EVENT_ONCE, dom, sent.arrival_vt_ns,
                         f"event sent at {sent.vt_ns} ns, due at {sent.arrival_vt_ns} ns, never delivered{hint}",
                         eid=eid)
        for (dom, eid), vt in self.hv.lost.items():
            # a lost event the hypervisor did not even trace as sent: the strike itself is the evidence
            if (dom, eid) not in self.hv.sent and self.explained(dom, vt) is None:
                self.violate(Invariant.EVENT_ONCE, dom, vt,
                             "fault.lose_event struck an event never traced as sent; never delivered", eid=eid)
        for (dom, span), (targets, due) in self.pending_flushes.items():
            call = self.hv.calls.get((dom, span))
            if not targets or call is None or not call.answers:
                continue  # all flushed with the answer, or never answered (reported above, or explained)
            for t in targets:
                late = [vt for vt in self.late_flushes.get((dom, t), []) if vt > due]
                what = f"applied only at {late[0]} ns" if late else "never applied"
                self.violate(Invariant.EFFECTS, dom, due,
                             f"the answer acknowledged flushing vcpu {t}'s TLB, but that flush was {what}"
                             f"{self._flush_hint(dom, due + 1)}", span=span)
        for (dom, span), call in self.hv.calls.items():
            if call.answers:
                continue
            if call.name == "sched_op" and (dom, call.vt_ns) in self.hv.shutdowns:
                self.stats["hypercalls_ended_domain"] += 1
            elif self.explained(dom, call.arrival_vt_ns) is not None:
                self.stats["hypercalls_unanswered_explained"] += 1
            else:
                self.violate(Invariant.HYPERCALL_ONCE, dom, call.arrival_vt_ns,
                             f"{call.name} made at {call.vt_ns} ns, due back at {call.arrival_vt_ns} ns, "
                             "never answered", span=span)

    def check_faults(self, path: Path) -> None:
        if not path.exists():
            return
        lines = JsonLines(path, require_event=False)
        for _, f in lines:
            self.stats["faults"] += 1
            fid = _hashable(f.get("fid"))
            if fid in self.hv.injected:
                continue
            if NO_SUCH_DOMAIN in str(f.get("outcome", "")) or NO_SUCH_DOMAIN in self.hv.outcomes.get(fid, ""):
                self.stats["faults_refused"] += 1
                continue
            at = f.get("at_ns")
            if isinstance(at, int) and at > self.hv.end_vt_ns:  # the run ended (or was killed) before it was due
                self.stats["faults_not_due"] += 1
                continue
            vt = f.get("vt_ns") if isinstance(f.get("vt_ns"), int) else at
            self.violate(Invariant.FAULT_TRACED, self._domid(f.get("target")), vt if isinstance(vt, int) else 0,
                         f"fault {f.get('fid')} ({f.get('kind')} on {f.get('target')}) has no fault.inject in the "
                         f"hypervisor trace (outcome {f.get('outcome')!r})")
        self.count_torn(lines)

    def _domid(self, target: Any) -> int | None:
        if isinstance(target, int):
            return target
        if isinstance(target, str):
            return int(target) if target.isdigit() else self.names.get(target)
        return None

    def run(self) -> Report:
        trace = self.run_dir / "trace"
        self.scan_hypervisor(trace / "hypervisor.jsonl")
        for path in sorted(trace.glob("dom*-*.jsonl")):
            domid_text, _, name = path.stem.removeprefix("dom").partition("-")
            if domid_text.isdigit():
                self.names[name] = int(domid_text)
                self.stats["domains"] += 1
                self.scan_domain(path, int(domid_text))
        self.settle()
        self.check_faults(self.run_dir / "faults.jsonl")
        self.violations.sort(key=Violation.sort_key)
        self.stats["violations"] = len(self.violations)
        return Report(self.violations, self.stats)


def _malformed(path: Path, n: int, name: str, exc: Exception) -> ValueError:
    """An event of the contract's vocabulary without the fields the contract gives it is a corrupt trace, reported
    as read_events reports one (a ValueError naming the line), not as a KeyError from deep inside the checker."""
    return ValueError(f"{path}:{n}: malformed {name} event ({type(exc).__name__}: {exc})")


def _vt(event: dict[str, Any]) -> int:
    vt = event.get("vt_ns")
    return vt if isinstance(vt, int) else 0


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (int, str, type(None))) else json.dumps(value, sort_keys=True)


def check_run(run_dir: Path) -> Report:
    """Check every invariant over ``run_dir``'s traces. Raises OSError for a missing spec.json or hypervisor trace,
    ValueError for a spec.json without window_ns or a corrupt trace line (a torn last line is not corrupt)."""
    return _Checker(run_dir).run()


def format_report(report: Report) -> str:
    s = report.stats
    head = "OK: no violations" if report.ok else f"FAIL: {len(report.violations)} violations"
    lines = [
        f"check: {head}",
        f"  events:     {s['events_sent']} sent, {s['events_delivered']} deliveries, "
        f"{s['events_lost_explained']} undelivered because the receiver ended",
        f"  hypercalls: {s['hypercalls']} made, {s['hypercalls_answered']} answered, "
        f"{s['hypercalls_ended_domain']} ended their domain, "
        f"{s['hypercalls_unanswered_explained']} unanswered because the domain ended",
        f"  paravirtual shootdowns: {s['pv_shootdowns']}; stale TLB reads: {s['stale_reads']}",
        f"  faults:     {s['faults']} in faults.jsonl, {s['faults_injected']} injected, "
        f"{s['faults_refused']} refused (no such live domain), {s['faults_not_due']} due after the trace ends",
        "  bugs struck: " + ", ".join(f"{k.removeprefix('bug_').replace('_', '-')} {s[k]}"
                                      for k in STATS if k.startswith("bug_")),
        f"  link faults: {s['link_faults']} (recovered by the link protocol), "
        f"{s['link_dups_dropped']} duplicates dropped by receivers",
        f"  domains: {s['domains']}, torn last lines ignored: {s['torn_lines']}",
    ]
    if report.violations:
        lines.append("violations (vt_ns, domain, invariant, span/eid, detail):")
        for v in report.violations:
            where = v.span if v.span is not None else f"eid {v.eid}" if v.eid is not None else "-"
            dom = f"d{v.dom}" if v.dom is not None else "-"
            lines.append(f"  {v.vt_ns:>14}  {dom:<4} {v.invariant:<24} {where:<20} {v.detail}")
    return "\n".join(lines)
