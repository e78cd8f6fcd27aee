"""`pvcluster trace`'s text output: each section of ``Analysis.to_json()`` as a rich table.

Every table is drawn from the JSON document, never from the analysis objects, so what a user reads and what a
script parses cannot disagree.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pvcluster.trace.shootdowns import COMPONENTS

_PCT = ("p50_us", "p90_us", "p99_us", "p99_9_us", "max_us")
_PCT_HEAD = ("p50", "p90", "p99", "p99.9", "max")


def _table(title: str, columns: list[str], left: int = 1) -> Table:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < left else "right")
    return t


def _us(v: float) -> str:
    return f"{v:.3f}"


def shootdown_table(rows: list[dict[str, Any]]) -> Table:
    t = _table("TLB shootdown latency (virtual µs, from request to the last target's flush)",
               ["design", "shootdowns", *_PCT_HEAD, "messages", "hypercalls", "preempted targets", "per virtual ms"])
    for r in rows:
        t.add_row(r["mode"], str(r["shootdowns"]), *(_us(r[k]) for k in _PCT),
                  f"{r['messages_per_shootdown']:.2f}", f"{r['hypercalls_per_shootdown']:.2f}",
                  f"{r['preempted_targets']:.2f}", f"{r['per_vms']:.2f}")
    return t


def _by(title: str, key: str, rows: list[dict[str, Any]]) -> Table:
    t = _table(title, ["design", key, "shootdowns", *_PCT_HEAD], left=1)
    for r in rows:
        t.add_row(r["mode"], str(r[key]), str(r["count"]), *(_us(r[k]) for k in _PCT))
    return t


def breakdown_table(rows: list[dict[str, Any]]) -> Table:
    t = _table("Where the latency went (mean virtual µs per shootdown; share of the total)",
               ["design", "mean", *COMPONENTS])
    for r in rows:
        t.add_row(r["mode"], _us(r["mean_us"]),
                  *(f"{r['components_us'][c]:.3f} {r['share'][c] * 100:.0f}%" for c in COMPONENTS))
    for column in t.columns:
        column.overflow = "fold"
    return t


def _states(s: dict[str, Any]) -> str:
    lines = []
    for v in s["vcpu_states"]:
        changes = ", ".join(f"{state} {(vt - s['start_vt_ns']) / 1000:+.1f}" for vt, state in v["changes"])
        lines.append(f"v{v['vcpu']} {v['at_start']}" + (f" → {changes}" if changes else ""))
    return "\n".join(lines)


def _where(breakdown: dict[str, float], latency: float) -> str:
    """The components that matter (>= 1% of the latency), largest first."""
    parts = sorted(((v, c) for c, v in breakdown.items() if latency and v >= latency / 100), reverse=True)
    return "\n".join(f"{c} {v:.3f}" for v, c in parts)


def slowest_table(rows: list[dict[str, Any]]) -> Table:
    t = _table("Slowest shootdowns (virtual µs; vCPU run states at the request, then each change at µs after it)",
               ["domain", "design", "round", "start", "latency", "targets", "where it went", "vCPUs"], left=2)
    t.show_lines = True
    for s in rows:
        critical = "" if s["critical_target"] is None else f" (v{s['critical_target']} last)"
        t.add_row(escape(s["name"]), s["mode"], str(s["round"]), _us(s["start_vt_ns"] / 1000), _us(s["latency_us"]),
                  ",".join(map(str, s["targets"])) + critical, _where(s["breakdown_us"], s["latency_us"]), _states(s))
    t.columns[-2].justify = t.columns[-1].justify = "left"
    return t


def hypercall_table(rows: list[dict[str, Any]]) -> Table:
    t = _table("Hypercalls by number (virtual cost from trap to result)",
               ["nr", "name", "count", "total µs", "mean ns", "p50 ns", "p99 ns", "max ns"], left=2)
    for r in rows:
        t.add_row(str(r["nr"]), r["name"], str(r["count"]), _us(r["cost_total_us"]), f"{r['cost_mean_ns']:.0f}",
                  str(r["cost_p50_ns"]), str(r["cost_p99_ns"]), str(r["cost_max_ns"]))
    return t


def runstate_table(rows: list[dict[str, Any]]) -> Table:
    t = _table("vCPU run states (virtual µs)", ["domain", "vcpu", "running", "runnable", "blocked", "offline"])
    for r in rows:
        t.add_row(escape(r["name"]), str(r["vcpu"]),
                  *(_us(r[f"{s}_us"]) for s in ("running", "runnable", "blocked", "offline")))
    return t


def fault_table(rows: list[dict[str, Any]]) -> Table:
    t = _table("Faults injected", ["fid", "kind", "target", "at µs", "outcome", "ended µs", "end"], left=3)
    for f in rows:
        at = "-" if f["vt_ns"] is None else _us(f["vt_ns"] / 1000)
        end = "-" if f["end_vt_ns"] is None else _us(f["end_vt_ns"] / 1000)
        t.add_row(str(f["fid"]), str(f["kind"]), escape(str(f["target"])), at, escape(str(f["outcome"] or "-")), end,
                  escape(str(f["end_outcome"] or "-")))
    return t


def render(doc: dict[str, Any], out: Console) -> None:
    """Every non-empty section of a ``trace --json`` document."""
    if doc["shootdowns"]:
        out.print(shootdown_table(doc["shootdowns"]))
        out.print(breakdown_table(doc["breakdown"]))
        out.print(_by("By number of targets (virtual µs)", "targets", doc["by_targets"]))
        out.print(_by("By number of preempted targets (virtual µs)", "preempted", doc["by_preempted"]))
        if doc["slowest"]:
            out.print(slowest_table(doc["slowest"]))
    else:
        out.print("no shootdowns in this run")
    if doc["hypercalls_by_nr"]:
        out.print(hypercall_table(doc["hypercalls_by_nr"]))
    if doc["multicall_batches"]:
        out.print("multicall batch sizes: " + ", ".join(f"{k}: {v}" for k, v in doc["multicall_batches"].items()))
    ev = doc["evtchn"]
    if ev["sent"]:
        d, rt = ev["delivery"], ev["ping_round_trips"]
        out.print(f"event channels: {ev['sent']} sent, {ev['delivered']} delivered ({ev['undelivered']} not); "
                  f"delivery p50 {d['p50_us']:.3f} µs, p99 {d['p99_us']:.3f} µs")
        if rt["count"]:
            out.print(f"ping round trips: {rt['count']}, p50 {rt['p50_us']:.3f} µs, p99 {rt['p99_us']:.3f} µs, "
                      f"max {rt['max_us']:.3f} µs")
    if doc["faults"]:
        out.print(fault_table(doc["faults"]))
    if doc["runstates"]:
        out.print(runstate_table(doc["runstates"]))
    by_dom = ", ".join(f"{escape(k)} {v}" for k, v in doc["stale_reads_by_domain"].items())
    out.print(f"stale TLB reads detected: {doc['stale_reads']}" + (f" ({by_dom})" if by_dom else ""))
    _read_report(doc, out)


def _read_report(doc: dict[str, Any], out: Console) -> None:
    tr = doc["trace"]
    line = f"read {tr['events']} events from {len(tr['files'])} files, to virtual {doc['end_vt_ns'] / 1000:.3f} µs"
    if doc["incomplete_shootdowns"]:
        line += f"; {doc['incomplete_shootdowns']} shootdowns never completed"
    out.print(line)
    for name, n in tr["corrupt_lines"].items():
        out.print(f"[yellow]{escape(name)}: {n} lines that are not trace events were skipped[/yellow]")
    for name in tr["torn_files"]:
        out.print(f"[yellow]{escape(name)}: its last line was cut short (the process was killed?); skipped[/yellow]")
