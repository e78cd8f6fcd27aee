"""Every table `pvcluster trace` prints, from one streaming pass over a run's merged trace.

The pass keeps, per domain, only what is still open (a shootdown between its marks, an event sent but not yet
delivered, a ping not yet echoed) and each vCPU's recent run-state changes; everything else is folded into counters
and compact arrays of latencies as it goes by, so memory grows with the number of shootdowns and hypercalls (8 bytes
each), not with the number of events.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections.abc import Iterable
from typing import Any

import attrs

from pvcluster.abi.platform import CR3_VECTOR, FLUSH_VECTOR, Mark
from pvcluster.trace.reader import ReadStats
from pvcluster.trace.shootdowns import COMPONENTS, OpenShootdown, RunStates, Shootdown, close, with_states

_SHOOTDOWN_VECTORS = frozenset({FLUSH_VECTOR, CR3_VECTOR})
RUN_STATES = ("running", "runnable", "blocked", "offline")
# multicall batch sizes are reported in power-of-two buckets: 1, 2, 3-4, 5-8, ...
_MAX_BUCKET = 1 << 20


def percentile(sorted_values: Any, p: float) -> int:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    n = len(sorted_values)
    if not n:
        return 0
    rank = max(0, min(n - 1, int(round(p / 100 * n + 0.5)) - 1))
    return int(sorted_values[rank])


def latency_row(values: Iterable[int]) -> dict[str, Any]:
    """Count and p50/p90/p99/p99.9/max in virtual µs."""
    lat = sorted(values)
    return {
        "count": len(lat),
        "p50_us": percentile(lat, 50) / 1000,
        "p90_us": percentile(lat, 90) / 1000,
        "p99_us": percentile(lat, 99) / 1000,
        "p99_9_us": percentile(lat, 99.9) / 1000,
        "max_us": (lat[-1] if lat else 0) / 1000,
    }


def _bucket(n: int) -> str:
    if n <= 2:
        return str(max(n, 0))
    hi = 1 << (n - 1).bit_length()
    return f"{hi // 2 + 1}-{hi}"


@attrs.define
class _Domain:
    """One domain as the pass sees it."""

    domid: int
    name: str
    mode: str
    runstates: dict[int, RunStates] = attrs.Factory(dict)
    current: dict[int, tuple[str, int]] = attrs.Factory(dict)  # vcpu -> (state, since)
    open: OpenShootdown | None = None
    ended_ns: int | None = None
    pings: dict[int, int] = attrs.Factory(dict)  # round -> PING_SENT vt


@attrs.define
class _ModeStats:
    latencies: array = attrs.Factory(lambda: array("q"))
    messages: int = 0
    hypercalls: int = 0
    preempted: int = 0
    first_ns: int | None = None
    last_ns: int = 0
    breakdown: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(COMPONENTS, 0))


@attrs.define
class Analysis:
    """The result of one pass: raw series (for plots and notebooks) and ``to_json`` (the tables)."""

    stats: ReadStats
    shootdowns: list[Shootdown] = attrs.Factory(list)
    slowest: list[Shootdown] = attrs.Factory(list)
    modes: dict[str, _ModeStats] = attrs.Factory(dict)
    by_targets: dict[tuple[str, int], array] = attrs.Factory(dict)
    by_preempted: dict[tuple[str, int], array] = attrs.Factory(dict)
    hypercalls: dict[int, tuple[str, array]] = attrs.Factory(dict)
    multicall_sizes: dict[str, int] = attrs.Factory(dict)
    event_delivery: array = attrs.Factory(lambda: array("q"))
    events_sent: int = 0
    events_lost: int = 0
    ping_rtts: array = attrs.Factory(lambda: array("q"))
    stale: dict[str, int] = attrs.Factory(dict)
    faults: dict[int, dict[str, Any]] = attrs.Factory(dict)
    runstates: dict[tuple[int, int], dict[str, int]] = attrs.Factory(dict)
    domain_names: dict[int, str] = attrs.Factory(dict)
    incomplete: int = 0
    end_vt_ns: int = 0

    @property
    def latencies(self) -> dict[str, list[int]]:
        return {mode: list(m.latencies) for mode, m in sorted(self.modes.items())}

    @property
    def breakdown_ns(self) -> dict[str, dict[str, int]]:
        return {mode: dict(m.breakdown) for mode, m in sorted(self.modes.items())}

    def shootdown_rows(self) -> list[dict[str, Any]]:
        """``trace --json``'s ``shootdowns``: the latency table by design (the shape it always had, plus new keys)."""
        rows = []
        for mode, m in sorted(self.modes.items()):
            n = len(m.latencies)
            row = latency_row(m.latencies)
            span_ms = (m.last_ns - (m.first_ns or 0)) / 1e6
            rows.append({
                "mode": mode, "shootdowns": n,
                **{k: v for k, v in row.items() if k != "count"},
                "messages_per_shootdown": m.messages / n,
                "hypercalls_per_shootdown": m.hypercalls / n,
                "preempted_targets": m.preempted / n,
                "per_vms": n / span_ms if span_ms > 0 else 0.0,
            })
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "shootdowns": self.shootdown_rows(),
            "by_targets": [{"mode": mode, "targets": n, **latency_row(v)}
                           for (mode, n), v in sorted(self.by_targets.items())],
            "by_preempted": [{"mode": mode, "preempted": n, **latency_row(v)}
                             for (mode, n), v in sorted(self.by_preempted.items())],
            "breakdown": self.breakdown_rows(),
            "slowest": [s.to_json() for s in self.slowest],
            "hypercalls": self.hypercall_summary(),
            "hypercalls_by_nr": self.hypercall_rows(),
            "multicall_batches": dict(sorted(self.multicall_sizes.items(), key=lambda kv: int(kv[0].split("-")[0]))),
            "evtchn": {
                "sent": self.events_sent, "delivered": len(self.event_delivery), "undelivered": self.events_lost,
                "delivery": latency_row(self.event_delivery),
                "ping_round_trips": latency_row(self.ping_rtts),
            },
            "stale_reads": sum(self.stale.values()),
            "stale_reads_by_domain": dict(sorted(self.stale.items())),
            "faults": [self.faults[fid] for fid in sorted(self.faults)],
            "runstates": [{"dom": d, "name": self.domain_names.get(d, "?"), "vcpu": v,
                           **{f"{s}_us": t.get(s, 0) / 1000 for s in RUN_STATES}}
                          for (d, v), t in sorted(self.runstates.items())],
            "incomplete_shootdowns": self.incomplete,
            "end_vt_ns": self.end_vt_ns,
            "trace": self.stats.to_json(),
        }

    def breakdown_rows(self) -> list[dict[str, Any]]:
        """Per design: the mean µs of each component per shootdown, and its share of the total latency."""
        rows = []
        for mode, m in sorted(self.modes.items()):
            n, total = len(m.latencies), sum(m.breakdown.values())
            rows.append({
                "mode": mode, "shootdowns": n, "mean_us": total / n / 1000,
                "components_us": {c: m.breakdown[c] / n / 1000 for c in COMPONENTS},
                "share": {c: (m.breakdown[c] / total if total else 0.0) for c in COMPONENTS},
            })
        return rows

    def hypercall_summary(self) -> dict[str, Any]:
        """``trace --json``'s ``hypercalls`` as it always was: counts by name and the virtual cost's p50/p99."""
        by_name: dict[str, int] = {}
        costs: list[int] = []
        for name, values in self.hypercalls.values():
            by_name[name] = by_name.get(name, 0) + len(values)
            costs += values
        costs.sort()
        def pct(p: float) -> int:
            return costs[min(len(costs) - 1, int(p * len(costs)))] if costs else 0
        return {"by_name": dict(sorted(by_name.items())), "count": len(costs), "p50_ns": pct(0.5), "p99_ns": pct(0.99)}

    def hypercall_rows(self) -> list[dict[str, Any]]:
        rows = []
        for nr, (name, costs) in sorted(self.hypercalls.items()):
            ordered = sorted(costs)
            total = sum(ordered)
            rows.append({"nr": nr, "name": name, "count": len(ordered), "cost_total_us": total / 1000,
                         "cost_mean_ns": total / len(ordered), "cost_p50_ns": percentile(ordered, 50),
                         "cost_p99_ns": percentile(ordered, 99), "cost_max_ns": ordered[-1]})
        return rows


class Analyser:
    """The pass itself: ``feed`` every event of the merged trace, then ``finish``."""

    def __init__(self, designs: dict[int, tuple[str, str]], stats: ReadStats, *, slowest: int = 10,
                 keep_shootdowns: bool = False) -> None:
        self.designs = designs  # domid -> (name, mode)
        self.doms: dict[int, _Domain] = {}
        self.result = Analysis(stats)
        self.slowest_n = slowest
        self.keep = keep_shootdowns
        self._heap: list[tuple[int, int, Shootdown]] = []
        self._seq = itertools.count()
        self._sent: dict[tuple[int, int], int] = {}  # (dom, eid) -> sent vt
        self._handlers = {
            "vcpu.runstate": self._runstate, "hypercall": self._hypercall, "multicall": self._multicall,
            "ipi": self._ipi, "event.sent": self._event_sent, "event.delivered": self._event_delivered,
            "shootdown": self._pv, "tlb.flush": self._tlb_flush, "irq.enter": self._irq, "guest.mark": self._mark,
            "fault.inject": self._fault, "fault.outcome": self._fault, "fault.end": self._fault,
            "domain.shutdown": self._domain_end, "domain.crash": self._domain_end,
        }

    @property
    def events(self) -> frozenset[str]:
        """The event names the pass reads (the reader leaves every other line unparsed)."""
        return frozenset(self._handlers)

    def run(self, batches: Iterable[list[dict[str, Any]]]) -> Analysis:
        """Feed every event (in virtual-time order, a batch at a time), then finish."""
        handlers = self._handlers
        for batch in batches:
            for e in batch:
                handler = handlers.get(e["event"])
                if handler is not None:
                    try:
                        handler(e)
                    except (KeyError, TypeError, ValueError, AttributeError):
                        # a line that parsed but lacks a field its event needs: counted, never fatal
                        corrupt = self.result.stats.corrupt
                        corrupt["(fields)"] = corrupt.get("(fields)", 0) + 1
        return self.finish(self.result.stats.end_ns)

    def _dom(self, domid: int) -> _Domain:
        d = self.doms.get(domid)
        if d is None:
            name, mode = self.designs.get(domid, (f"dom{domid}", "?"))
            d = self.doms[domid] = _Domain(domid, name, mode)
            self.result.domain_names[domid] = name
        return d

    # --- run states -------------------------------------------------------------------------------------------
    def _runstate(self, e: dict[str, Any]) -> None:
        d, v, vt = self._dom(e["dom"]), e["vcpu"], e["vt_ns"]
        totals = self.result.runstates.setdefault((d.domid, v), {})
        prev = e["previous"]
        totals[prev] = totals.get(prev, 0) + e["duration_ns"]
        d.current[v] = (e["state"], vt)
        hist = d.runstates.get(v)
        if hist is None:
            hist = d.runstates[v] = RunStates()
        hist.change(vt, e["state"])

    # --- hypercalls -------------------------------------------------------------------------------------------
    def _hypercall(self, e: dict[str, Any]) -> None:
        nr, vt = e["nr"], e["vt_ns"]
        entry = self.result.hypercalls.get(nr)
        if entry is None:
            entry = self.result.hypercalls[nr] = (e["name"], array("q"))
        entry[1].append(e["done_vt_ns"] - vt)
        d = self.doms.get(e.get("dom", -1))
        o = d.open if d is not None else None
        if o is not None and e["vcpu"] == o.initiator:
            o.hypercalls += 1
            arrival = e.get("arrival_vt_ns")
            o.calls.append((vt, arrival if type(arrival) is int else e["done_vt_ns"]))

    def _multicall(self, e: dict[str, Any]) -> None:
        key = _bucket(min(int(e["entries"]), _MAX_BUCKET))
        self.result.multicall_sizes[key] = self.result.multicall_sizes.get(key, 0) + 1

    # --- what a shootdown sends ---------------------------------------------------------------------------------
    def _open_for(self, e: dict[str, Any]) -> OpenShootdown | None:
        d = self.doms.get(e.get("dom", -1))
        return d.open if d is not None else None

    def _ipi(self, e: dict[str, Any]) -> None:
        o = self._open_for(e)
        if o is not None and e["vcpu"] == o.initiator and e["vector"] in _SHOOTDOWN_VECTORS:
            o.ipis += 1
            o.sends.setdefault(e["dest"], e["vt_ns"])
            o.preempted += not e.get("target_running", True)

    def _event_sent(self, e: dict[str, Any]) -> None:
        self.result.events_sent += 1
        self._sent[(e["dom"], e["eid"])] = e["vt_ns"]
        o = self._open_for(e)
        if o is not None and e["vcpu"] != o.initiator and e["vt_ns"] >= o.start_ns:
            o.sends.setdefault(e["vcpu"], e["vt_ns"])

    def _event_delivered(self, e: dict[str, Any]) -> None:
        sent = self._sent.pop((e["dom"], e["eid"]), None)
        if sent is not None:
            self.result.event_delivery.append(e["vt_ns"] - sent)

    def _pv(self, e: dict[str, Any]) -> None:
        o = self._open_for(e)
        if o is not None and e["vcpu"] == o.initiator:
            o.pv.append((e["vt_ns"], e["end_vt_ns"], tuple(e["targets"])))
            o.preempted += int(e.get("preempted", 0))

    def _tlb_flush(self, e: dict[str, Any]) -> None:
        o = self._open_for(e)
        if o is not None and e["by"] == o.initiator:
            o.flushed.setdefault(e["vcpu"], e["vt_ns"])

    def _irq(self, e: dict[str, Any]) -> None:
        o = self._open_for(e)
        v = e["vcpu"]
        if o is not None and v in o.sends and v not in o.entered and e["vt_ns"] >= o.sends[v]:
            o.entered[v] = e["vt_ns"]

    # --- guest marks --------------------------------------------------------------------------------------------
    def _mark(self, e: dict[str, Any]) -> None:
        code, d, vt = e["code"], self._dom(e["dom"]), e["vt_ns"]
        if code == Mark.SHOOTDOWN_REQUEST:
            if d.open is not None:
                self.result.incomplete += 1
            d.open = OpenShootdown(round=e["round"], initiator=e["vcpu"], start_ns=vt)
        elif code == Mark.SHOOTDOWN_DONE:
            if d.open is not None and d.open.round == e["round"]:
                self._close(d, vt)
        elif code == Mark.FLUSH_ACK:
            o, v = d.open, e["vcpu"]
            if o is not None and v in o.sends and v not in o.acks:
                o.acks[v] = vt
        elif code == Mark.SHOOTDOWN_STALE:
            self.result.stale[d.name] = self.result.stale.get(d.name, 0) + 1
        elif code == Mark.PING_SENT:
            d.pings[e["round"]] = vt
        elif code == Mark.PING_ECHO:
            sent = d.pings.pop(e["round"], None)
            if sent is not None:
                self.result.ping_rtts.append(vt - sent)

    def _close(self, d: _Domain, end_ns: int) -> None:
        assert d.open is not None
        sd = close(d.open, end_ns, d.domid, d.name, d.mode, d.runstates)
        d.open = None
        r = self.result
        m = r.modes.get(sd.mode)
        if m is None:
            m = r.modes[sd.mode] = _ModeStats()
        lat = sd.latency_ns
        m.latencies.append(lat)
        m.messages += sd.messages
        m.hypercalls += sd.hypercalls
        m.preempted += sd.preempted
        m.first_ns = sd.start_ns if m.first_ns is None else min(m.first_ns, sd.start_ns)
        m.last_ns = max(m.last_ns, end_ns)
        for c, ns in sd.breakdown.items():
            m.breakdown[c] += ns
        r.by_targets.setdefault((sd.mode, len(sd.targets)), array("q")).append(lat)
        r.by_preempted.setdefault((sd.mode, sd.preempted), array("q")).append(lat)
        if self.keep:
            r.shootdowns.append(sd)
        if self.slowest_n > 0 and (len(self._heap) < self.slowest_n or lat > self._heap[0][0]):
            item = (lat, -next(self._seq), with_states(sd, d.runstates))
            if len(self._heap) < self.slowest_n:
                heapq.heappush(self._heap, item)
            else:
                heapq.heapreplace(self._heap, item)

    # --- faults and domain ends ---------------------------------------------------------------------------------
    def _fault(self, e: dict[str, Any]) -> None:
        fid, phase = e["fid"], e["event"].partition(".")[2]
        rec = self.result.faults.setdefault(fid, {"fid": fid, "kind": e.get("kind"), "target": e.get("target"),
                                                  "dom": e.get("dom"), "vt_ns": None, "outcome": None,
                                                  "end_vt_ns": None, "end_outcome": None})
        if phase == "inject":
            rec["vt_ns"], rec["target"] = e["vt_ns"], e.get("target", rec["target"])
        elif phase == "outcome":
            rec["outcome"] = e.get("outcome")
        else:
            rec["end_vt_ns"], rec["end_outcome"] = e["vt_ns"], e.get("outcome")

    def _domain_end(self, e: dict[str, Any]) -> None:
        d = self._dom(e["dom"])
        d.ended_ns = e["vt_ns"] if d.ended_ns is None else d.ended_ns
        if d.open is not None:
            self.result.incomplete += 1
            d.open = None

    def finish(self, end_ns: int) -> Analysis:
        r = self.result
        r.end_vt_ns = end_ns
        for d in self.doms.values():
            if d.open is not None:
                r.incomplete += 1
            for v, (state, since) in d.current.items():  # each vCPU's last state, to its domain's end
                until = max(since, d.ended_ns if d.ended_ns is not None else end_ns)
                totals = r.runstates.setdefault((d.domid, v), {})
                totals[state] = totals.get(state, 0) + until - since
        r.events_lost = len(self._sent)
        r.slowest = [sd for _, _, sd in sorted(self._heap, key=lambda item: (-item[0], -item[1]))]
        return r
