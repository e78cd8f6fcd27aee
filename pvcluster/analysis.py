"""Trace analysis: TLB-shootdown latency by design, from the guest's marks and the hypervisor's events.

The shootdown workload marks each shootdown on MARK_PORT (the domain traces them as ``guest.mark``; the codes are
``pvcluster.abi.platform.Mark``): SHOOTDOWN_REQUEST (1) when the initiator asks the other vCPUs to flush,
SHOOTDOWN_DONE (2) when that call returned (every target flushed, or for the paravirtual design, will be before it
next runs), SHOOTDOWN_STALE (3) for a stale read. Latency is virtual time from REQUEST to DONE.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from pvcluster.abi.platform import CR3_VECTOR, FLUSH_VECTOR, Mark
from pvcluster.designs import mode_of
from pvcluster.trace import read_events

# The vectors of the IPIs a shootdown sends: the native flush_tlb_others' and the cr3 design's.
_SHOOTDOWN_VECTORS = (FLUSH_VECTOR, CR3_VECTOR)


@attrs.frozen
class Shootdown:
    dom: int
    mode: str
    round: int
    start_ns: int
    end_ns: int
    messages: int
    preempted: int

    @property
    def latency_ns(self) -> int:
        return self.end_ns - self.start_ns


def _events(run_dir: Path) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]], dict[int, str]]:
    hv = list(read_events(run_dir / "trace" / "hypervisor.jsonl"))
    doms: dict[int, list[dict[str, Any]]] = {}
    names: dict[int, str] = {}
    for f in sorted((run_dir / "trace").glob("dom*-*.jsonl")):
        domid_text, _, name = f.stem.removeprefix("dom").partition("-")
        if not domid_text.isdigit():
            continue
        names[int(domid_text)] = name
        doms[int(domid_text)] = [e for e in read_events(f) if "dom" in e]
    return hv, doms, names


def _is_mark(event: dict[str, Any], code: Mark) -> bool:
    return bool(event["event"] == "guest.mark" and event["code"] == code)


def _marks(events: list[dict[str, Any]], code: Mark) -> dict[int, int]:
    """round -> virtual time of the guest marks with ``code``."""
    return {e["round"]: e["vt_ns"] for e in events if _is_mark(e, code)}


def shootdowns(run_dir: Path) -> list[Shootdown]:
    spec = json.loads((run_dir / "spec.json").read_text())
    names = {d["name"]: d for d in spec["domain"]}
    hv, doms, dom_names = _events(run_dir)
    out: list[Shootdown] = []
    for domid, events in sorted(doms.items()):
        mode = mode_of(names.get(dom_names.get(domid, ""), {}))
        out += _domain_shootdowns(domid, mode, events, [e for e in hv if e.get("dom") == domid])
    return out


def _domain_shootdowns(domid: int, mode: str, events: list[dict[str, Any]],
                       hv: list[dict[str, Any]]) -> list[Shootdown]:
    """One domain's shootdowns: each round from its request mark to its done mark, with what crossed the bus."""
    starts = _marks(events, Mark.SHOOTDOWN_REQUEST)
    ends = _marks(events, Mark.SHOOTDOWN_DONE)
    ipis = [e for e in hv if e["event"] == "ipi" and e["vector"] in _SHOOTDOWN_VECTORS]
    pv = [e for e in hv if e["event"] == "shootdown"]
    hcalls = [e for e in hv if e["event"] == "hypercall" and e["vcpu"] == 0]

    def within(evs: list[dict[str, Any]], start: int, end: int) -> list[dict[str, Any]]:
        return [e for e in evs if start <= e["vt_ns"] <= end]

    out = []
    for rnd, start in sorted(starts.items()):
        end = ends.get(rnd)
        if end is None:
            continue
        sent, calls = within(ipis, start, end), within(pv, start, end)
        # a hypercall is one request on the bus; an APIC IPI crosses it twice (sender -> hypervisor -> target);
        # acknowledgements are writes to shared memory and cost no message
        messages = len(within(hcalls, start, end)) + 2 * len(sent)
        preempted = sum(e["preempted"] for e in calls) + sum(1 for e in sent if not e["target_running"])
        out.append(Shootdown(domid, mode, rnd, start, end, messages, preempted))
    return out


def stale_reads(run_dir: Path) -> int:
    _, doms, _ = _events(run_dir)
    return sum(1 for evs in doms.values() for e in evs if _is_mark(e, Mark.SHOOTDOWN_STALE))


def percentile(sorted_values: list[int], p: float) -> int:
    if not sorted_values:
        return 0
    rank = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


def latency_table(items: Iterable[Shootdown]) -> list[dict[str, Any]]:
    by_mode: dict[str, list[Shootdown]] = {}
    for s in items:
        by_mode.setdefault(s.mode, []).append(s)
    rows = []
    for mode, group in sorted(by_mode.items()):
        lat = sorted(s.latency_ns for s in group)
        rows.append({
            "mode": mode,
            "shootdowns": len(group),
            "p50_us": percentile(lat, 50) / 1000,
            "p90_us": percentile(lat, 90) / 1000,
            "p99_us": percentile(lat, 99) / 1000,
            "max_us": lat[-1] / 1000,
            "messages_per_shootdown": sum(s.messages for s in group) / len(group),
            "preempted_targets": sum(s.preempted for s in group) / len(group),
        })
    return rows
