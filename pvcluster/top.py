"""``pvcluster top``: a live view of a running cluster, redrawn every ``--interval`` seconds (rich ``Live``).

Where each part of a frame comes from:

* domains (id, name, state, vCPUs, hypercalls so far), virtual time and windows: the control socket's ``status``
  (what ``pvcluster list`` shows, plus the clock);
* each vCPU's run state: the hypervisor trace's ``vcpu.runstate`` events (the state, since when, on which pCPU);
* hypercall rates: the hypervisor trace's ``hypercall`` events whose ``wall_ns`` falls in the last
  ``RATE_WINDOW_NS`` of wall time, per wall second and per virtual ms of the virtual time that wall window covered;
* shootdowns in flight: each domain's guest marks, ``Mark.SHOOTDOWN_REQUEST`` rounds without their
  ``Mark.SHOOTDOWN_DONE`` yet (and the completed and stale-read counts);
* recent faults: ``fault.inject`` / ``fault.outcome`` / ``fault.end``, merged per fault id, the last ``RECENT_FAULTS``.

The traces are followed with a ``TraceCursor``: each refresh reads only the lines written since the previous one (the
first reads the run so far), and only lines naming an event top uses are decoded, so a refresh costs what the cluster
wrote meanwhile, not the length of the run.

Decisions:

* With no cluster running at the run directory (none started, or it has ended) but traces there, top shows the last
  state the traces hold and says the cluster is not running: domain states then come from the trace
  (``domain.built``, ``domain.shutdown`` / ``crash`` / ``destroy`` / ``process_exit``), hypercall counts are the
  traced ones, the virtual time is the latest traced, windows are unknown (only the hypervisor counts them; shown as
  "?", null in JSON; a live view keeps the count of the cluster's last answer) and the rates are over the last
  ``RATE_WINDOW_NS`` of the run. ``--once`` prints that frame; the live view prints it with a last line saying the
  cluster is not running. Both exit 0. With neither a cluster nor traces, it is an error (exit 1), as for every verb
  that needs a cluster.
* The live view ends with code 0, its last frame left on screen and a last line saying why, when the cluster ends
  (the hypervisor process that owned the run directory when top started is gone, or another has taken the directory
  over) and on Ctrl-C (or SIGTERM).
* A status request that times out while the hypervisor process lives (stopped, or very busy) keeps the last answer
  and says so in the header; top carries on.
"""

from __future__ import annotations

import json
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pvcluster.abi.platform import Mark
from pvcluster.control import ControlClient, ControlError, read_hypervisor_info
from pvcluster.trace.reader import trace_domain
from pvcluster.trace.records import DomainEnd, Fault, GuestMark, Hypercall, Other, RunState, to_record
from pvcluster.tracequery import TraceCursor

RATE_WINDOW_NS = 2_000_000_000  # wall time the hypercall rates are averaged over
RECENT_FAULTS = 5
_KEPT_FAULTS = 64  # faults remembered, so a late fault.end still finds its row; older ones are dropped
# A status answer takes milliseconds (the hypervisor answers between steps); waiting longer only delays noticing a
# hypervisor that exited after the liveness check, and a slow answer is just skipped (the next refresh asks again).
CONTROL_TIMEOUT_S = 1.0

# Only lines that name one of these events are decoded; the rest of each file is skipped unparsed.
HV_EVENTS = ("trace.start", "vcpu.runstate", "hypercall", "fault.inject", "fault.outcome", "fault.end",
             "domain.shutdown", "domain.crash", "domain.destroy", "domain.process_exit")
DOM_EVENTS = ("domain.built", "guest.mark")

DESCRIPTION = """\
A live view of a running cluster: its domains, each vCPU's run state, hypercall rates, TLB shootdowns in flight and
the recent faults, from the control socket and the traces (each refresh reads only what was written since the last).
It exits (code 0) when the cluster ends and on Ctrl-C. With no cluster running at the run directory, it shows the
last state its traces hold and says the cluster is not running."""
COLUMNS = """\
header: the run directory, whether the cluster runs, virtual time, windows run (the hypervisor's steps; "?" when
  the cluster is not running), hypercalls in total and per wall second / per virtual ms (averaged over the last
  2 wall seconds of traced hypercalls).

domain columns:
  ID, Name     the domain's id and name
  State        building, running, paused, shutting_down, crashed or dead, and the shutdown or crash reason
               (the hypervisor's view; from the trace when the cluster is not running)
  vCPUs        how many vCPUs it has
  Hcalls       hypercalls so far (the hypervisor's count; the traced ones when the cluster is not running)
  Hc/s         its hypercalls per wall second, over the last 2 wall seconds
  Hc/vms       its hypercalls per virtual ms, over the virtual time those 2 wall seconds covered
  SD done      TLB shootdowns completed (guest mark 1 then 2 of the same round); "+N stale" counts stale reads
               (mark 3)
  SD flight    shootdowns requested (mark 1) and not done yet (no mark 2), and how long the oldest has waited
               (virtual time)
  vCPU states  per vCPU "N:state@pP(age)": running (holds pCPU P), runnable (wants a pCPU), blocked (waits for
               an event), offline (not up); age is the virtual time it has been in that state

fault columns (the last 5 faults): FID, the virtual time it acted, kind, target, what it did (and what its end
  did), and when it ended (virtual us; "-" while it lasts, or for one that has no end).

--once --json prints the same frame as one JSON document: run_dir, running, note, vt_ns, window, hypercalls
{total, per_wall_s, per_virtual_ms, window_s}, domains [{domid, name, state, reason, vcpus, hypercalls,
per_wall_s, per_virtual_ms, shootdowns_done, stale_reads, shootdowns_in_flight, oldest_in_flight_vt_ns,
vcpu_states [{vcpu, state, pcpu, since_vt_ns}]}], faults [{fid, kind, target, vt_ns, outcome, end_vt_ns}].
"""

_STATE_STYLE = {"running": "green", "runnable": "yellow", "blocked": "cyan", "offline": "dim",
                "paused": "yellow", "shutting_down": "yellow", "crashed": "red", "dead": "dim"}


# -- what the traces say --------------------------------------------------------------------------------------------


@attrs.define
class VcpuRun:
    state: str = "offline"
    since_vt_ns: int | None = None
    pcpu: int | None = None


@attrs.define
class DomainTrace:
    """One domain as its own trace and the hypervisor's tell it."""

    domid: int
    name: str = "?"
    vcpus: int = 0
    state: str = "building"
    reason: str | None = None
    runstates: dict[int, VcpuRun] = attrs.Factory(dict)
    hypercalls: int = 0
    in_flight: dict[int, int] = attrs.Factory(dict)  # shootdown round -> vt_ns of its request mark
    shootdowns_done: int = 0
    stale_reads: int = 0


@attrs.define
class FaultRow:
    fid: int
    kind: str
    target: str | None = None
    vt_ns: int | None = None
    outcome: str | None = None
    end_vt_ns: int | None = None


@attrs.define
class TraceState:
    """Everything top keeps from the traces, fed one event at a time (in each file's order), in memory that does not
    grow with the run: per-domain counters, the latest run state per vCPU, and the last few seconds of hypercalls."""

    domains: dict[int, DomainTrace] = attrs.Factory(dict)
    faults: dict[int, FaultRow] = attrs.Factory(dict)
    vt_ns: int = 0  # the latest virtual time traced
    first_wall_ns: int | None = None  # the hypervisor's first traced wall time
    last_wall_ns: int = 0  # ... and its latest
    calls: deque[tuple[int, int]] = attrs.Factory(deque)  # (wall_ns, domid) of recent hypercalls
    progress: deque[tuple[int, int]] = attrs.Factory(deque)  # (wall_ns, vt_ns) of recent hypervisor events

    def domain(self, domid: int) -> DomainTrace:
        dom = self.domains.get(domid)
        if dom is None:
            dom = self.domains[domid] = DomainTrace(domid)
        return dom

    def feed(self, e: dict[str, Any]) -> None:
        """Take in one decoded trace event (of any process)."""
        rec = to_record(e)
        self.vt_ns = max(self.vt_ns, rec.vt_ns)
        wall = e.get("wall_ns")
        if rec.proc == "hypervisor" and isinstance(wall, int):
            if self.first_wall_ns is None:
                self.first_wall_ns = wall
            self.last_wall_ns = max(self.last_wall_ns, wall)
            if "vt_ns" in e:
                self.progress.append((wall, rec.vt_ns))
            self._forget_before(wall - RATE_WINDOW_NS)  # the first read of a long run stays small too
        dom = self.domain(rec.dom) if isinstance(rec.dom, int) else None
        match rec:
            case RunState() if dom is not None and rec.vcpu is not None:
                dom.runstates[rec.vcpu] = VcpuRun(rec.state, rec.vt_ns, rec.pcpu)
                dom.vcpus = max(dom.vcpus, rec.vcpu + 1)
            case Hypercall() if dom is not None:
                dom.hypercalls += 1
                if isinstance(wall, int):
                    self.calls.append((wall, dom.domid))
            case GuestMark() if dom is not None:
                self._mark(dom, rec)
            case Fault():
                self._fault(rec)
            case DomainEnd() if dom is not None:
                dom.state = "crashed" if rec.event == "domain.crash" else "shutting_down"
                dom.reason = rec.reason
                dom.in_flight.clear()  # a shootdown in a domain that ends ends with it
            case Other(event="domain.destroy") if dom is not None and dom.state not in ("crashed", "dead"):
                dom.state, dom.reason = "shutting_down", "destroyed"
                dom.in_flight.clear()
            case Other(event="domain.process_exit") if dom is not None and dom.state == "shutting_down":
                dom.state = "dead"
            case Other(event="domain.built") if dom is not None:
                vcpus = rec.fields.get("vcpus")
                dom.vcpus = max(dom.vcpus, vcpus if isinstance(vcpus, int) else 0)
                if dom.state == "building":
                    dom.state = "running"

    def _mark(self, dom: DomainTrace, rec: GuestMark) -> None:
        if rec.code == Mark.SHOOTDOWN_REQUEST:
            dom.in_flight[rec.detail] = rec.vt_ns
        elif rec.code == Mark.SHOOTDOWN_DONE and dom.in_flight.pop(rec.detail, None) is not None:
            dom.shootdowns_done += 1
        elif rec.code == Mark.SHOOTDOWN_STALE:
            dom.stale_reads += 1

    def _fault(self, rec: Fault) -> None:
        row = self.faults.get(rec.fid)
        if row is None:
            if rec.phase != "inject":
                return  # a fault dropped as old: its row is gone
            row = self.faults[rec.fid] = FaultRow(rec.fid, rec.kind)
            while len(self.faults) > _KEPT_FAULTS:
                del self.faults[next(iter(self.faults))]
        if rec.phase == "inject":
            row.vt_ns, row.target = rec.vt_ns, rec.target
        elif rec.phase == "outcome":
            row.outcome = rec.outcome
        elif rec.phase == "end":
            row.end_vt_ns = rec.vt_ns
            row.outcome = row.outcome if rec.outcome is None else f"{row.outcome}; {rec.outcome}"

    def _forget_before(self, wall_ns: int) -> None:
        # each file's wall times only grow, so what is older than the window sits at the left end
        for q in (self.calls, self.progress):
            while q and q[0][0] < wall_ns:
                q.popleft()

    def sample(self, wall_ns: int, vt_ns: int) -> None:
        """The cluster's virtual time at a wall time (the control socket's answer): virtual time passes with no
        event traced while every vCPU just runs on its pCPU."""
        self.vt_ns = max(self.vt_ns, vt_ns)
        self.progress.append((wall_ns, vt_ns))

    def rates(self, now_wall_ns: int) -> tuple[float, float | None, dict[int, tuple[float, float | None]]]:
        """Hypercalls per wall second and per virtual ms over the ``RATE_WINDOW_NS`` of wall time up to
        ``now_wall_ns``, in total and per domain. The virtual time is what passed between the first and the last
        progress sample (hypervisor event or status answer) inside that window; per virtual ms is None only when
        there were hypercalls but no virtual time to divide by."""
        start = now_wall_ns - RATE_WINDOW_NS
        self._forget_before(start)
        first = self.first_wall_ns if self.first_wall_ns is not None else now_wall_ns
        wall_s = (now_wall_ns - max(start, first)) / 1e9
        vt_span = max(vt for _, vt in self.progress) - min(vt for _, vt in self.progress) if self.progress else 0
        per_dom: dict[int, int] = {}
        for _, domid in self.calls:
            per_dom[domid] = per_dom.get(domid, 0) + 1

        def rate(n: int) -> tuple[float, float | None]:
            per_vms = n / (vt_span / 1e6) if vt_span > 0 else (0.0 if n == 0 else None)
            return (n / wall_s if wall_s > 0 else 0.0), per_vms

        total = rate(len(self.calls))
        return total[0], total[1], {d: rate(n) for d, n in per_dom.items()}


@attrs.define
class TraceFollower:
    """Reads what each trace file gained since the last ``poll`` into a ``TraceState``."""

    run_dir: Path
    state: TraceState = attrs.Factory(TraceState)
    cursor: TraceCursor = attrs.Factory(TraceCursor)

    def poll(self) -> None:
        trace = self.run_dir / "trace"
        self._read(trace / "hypervisor.jsonl", HV_EVENTS)
        for path in sorted(trace.glob("dom*-*.jsonl")):
            dom = trace_domain(path)
            if dom is not None:  # the file's name is the one place a finished run keeps a domain's name
                self.state.domain(dom[0]).name = dom[1]
            self._read(path, DOM_EVENTS)

    def _read(self, path: Path, events: tuple[str, ...]) -> None:
        needles = tuple(f'"{name}"' for name in events)
        for line in self.cursor.new_lines(path):
            if not any(n in line for n in needles):
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(e, dict) and e.get("event") in events:
                try:
                    self.state.feed(e)
                except (TypeError, ValueError):  # a field of the wrong type: skip the event, as a reader should
                    continue


# -- the control socket ------------------------------------------------------------------------------------------


class Control:
    """The hypervisor that owned the run directory when top started: whether it still runs, and its last status."""

    def __init__(self, run_dir: Path, timeout_s: float = CONTROL_TIMEOUT_S) -> None:
        self.run_dir = run_dir
        info = read_hypervisor_info(run_dir)
        self.pid: int | None = info["pid"] if info is not None else None
        self.client = ControlClient(info["control"], timeout_s) if info is not None else None
        self.running = self.client is not None
        self.last: dict[str, Any] | None = None  # its last answer to "status"
        self.note: str | None = None  # why that answer is not from this refresh

    def alive(self) -> bool:
        if self.client is None:
            return False
        info = read_hypervisor_info(self.run_dir)
        return info is not None and info["pid"] == self.pid

    def refresh(self) -> dict[str, Any] | None:
        """Ask for the hypervisor's status and update ``running``: the fresh answer, or None when it has gone or did
        not answer in time (``note`` says so; ``last`` keeps the answer before)."""
        self.running = self.client is not None and self.alive()
        if self.client is None or not self.running:
            return None
        try:
            self.last, self.note = self.client.call("status"), None
        except ControlError as exc:
            self.running = self.alive()
            self.note = f"{exc}; its figures are from its last answer" if self.running else None
            return None
        return self.last

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


# -- a frame ------------------------------------------------------------------------------------------------------


def frame(run_dir: Path, state: TraceState, status: dict[str, Any] | None, *, running: bool | None = None,
          note: str | None = None, now_wall_ns: int | None = None, last_window: int | None = None) -> dict[str, Any]:
    """One frame's data (what ``--once --json`` prints): the control socket's ``status`` (None when the cluster has
    gone, or has not answered yet) merged with what the traces say. ``running`` defaults to having a status.
    ``now_wall_ns`` ends the rate window: now while the cluster runs, the last traced wall time otherwise.
    ``last_window``: the windows run at the cluster's last answer, when there is no status (the traces do not count
    them)."""
    running = status is not None if running is None else running
    if now_wall_ns is None:
        now_wall_ns = time.time_ns() if running else state.last_wall_ns
    per_s, per_vms, per_dom = state.rates(now_wall_ns)
    vt_ns = max(state.vt_ns, status["vt_ns"] if status else 0)
    if status is not None:
        listed = [(d["domid"], d["name"], d["state"], d["shutdown_reason"] or d["crash"] or None, d["vcpus"],
                   d["hypercalls"])
                  for d in status["domains"]]
    else:
        listed = [(d.domid, d.name, d.state, d.reason, d.vcpus, d.hypercalls)
                  for _, d in sorted(state.domains.items())]
    domains = []
    for domid, name, dstate, reason, vcpus, hypercalls in listed:
        tr = state.domains.get(domid) or DomainTrace(domid)
        runs = [tr.runstates.get(v, VcpuRun()) for v in range(vcpus)]
        rate = per_dom.get(domid, (0.0, 0.0))
        domains.append({
            "domid": domid, "name": name, "state": dstate, "reason": reason, "vcpus": vcpus,
            "hypercalls": hypercalls, "per_wall_s": rate[0], "per_virtual_ms": rate[1],
            "shootdowns_done": tr.shootdowns_done, "stale_reads": tr.stale_reads,
            "shootdowns_in_flight": len(tr.in_flight),
            "oldest_in_flight_vt_ns": min(tr.in_flight.values()) if tr.in_flight else None,
            "vcpu_states": [{"vcpu": v, "state": r.state, "pcpu": r.pcpu if r.state == "running" else None,
                             "since_vt_ns": r.since_vt_ns}
                            for v, r in enumerate(runs)],
        })
    faults = sorted(state.faults.values(), key=lambda f: (f.vt_ns if f.vt_ns is not None else -1, f.fid))
    return {
        "run_dir": str(run_dir),
        "running": running,
        "note": note,
        "vt_ns": vt_ns,
        "window": status["window"] if status else last_window,
        "hypercalls": {"total": sum(d["hypercalls"] for d in domains), "per_wall_s": per_s,
                       "per_virtual_ms": per_vms, "window_s": RATE_WINDOW_NS / 1e9},
        "domains": domains,
        "faults": [{"fid": f.fid, "kind": f.kind, "target": f.target, "vt_ns": f.vt_ns, "outcome": f.outcome,
                    "end_vt_ns": f.end_vt_ns} for f in faults[-RECENT_FAULTS:]],
    }


def _us(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.1f}"


def _age(ns: int) -> str:
    """A virtual duration, short: what a narrow column can hold."""
    for unit, scale in (("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)):
        if ns >= scale:
            return f"{ns / scale:.3g}{unit}"
    return f"{ns}ns"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _vcpus(d: dict[str, Any], vt_ns: int) -> Text:
    # no space inside one vCPU's entry: a narrow column wraps between vCPUs, never inside one
    text = Text()
    for v in d["vcpu_states"]:
        if v["vcpu"]:
            text.append(" ")
        where = f"@p{v['pcpu']}" if v["pcpu"] is not None else ""
        text.append(f"{v['vcpu']}:")
        text.append(f"{v['state']}{where}", style=_STATE_STYLE.get(v["state"], ""))
        if v["since_vt_ns"] is not None:
            text.append(f"({_age(max(0, vt_ns - v['since_vt_ns']))})", style="dim")
    return text


def render(f: dict[str, Any], interval: float | None = None) -> RenderableType:
    """A frame as rich renderables: a header line, the domain table, the recent faults."""
    hc = f["hypercalls"]
    alive = "[green]running[/]" if f["running"] else "[yellow]not running[/] (the last state in its traces)"
    window = "?" if f["window"] is None else str(f["window"])
    head = [
        f"[bold]pvcluster top[/]  {escape(f['run_dir'])}  {alive}",
        f"virtual time {f['vt_ns'] / 1e6:.3f} ms   windows {window}   hypercalls {hc['total']}: "
        f"{_rate(hc['per_wall_s'])}/s wall, {_rate(hc['per_virtual_ms'])}/virtual ms",
    ]
    if f["note"]:
        head.append(f"[yellow]{escape(f['note'])}[/]")

    doms = Table(box=None, header_style="bold", pad_edge=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("ID", "right"), ("Name", "left"), ("State", "left"), ("vCPUs", "right"), ("Hcalls", "right"),
        ("Hc/s", "right"), ("Hc/vms", "right"), ("SD done", "right"), ("SD flight", "right"), ("vCPU states", "left"))
    for name, justify in columns:
        doms.add_column(name, justify=justify)
    for d in f["domains"]:
        state = Text(d["state"], style=_STATE_STYLE.get(d["state"], ""))
        if d["reason"]:
            state.append(f" ({d['reason']})", style="dim")
        done = Text(str(d["shootdowns_done"]))
        if d["stale_reads"]:
            done.append(f" +{d['stale_reads']} stale", style="red")
        oldest = d["oldest_in_flight_vt_ns"]
        flight = f"{d['shootdowns_in_flight']} ({_age(max(0, f['vt_ns'] - oldest))})" if oldest is not None else "0"
        doms.add_row(str(d["domid"]), Text(d["name"]), state, str(d["vcpus"]), str(d["hypercalls"]),
                     _rate(d["per_wall_s"]), _rate(d["per_virtual_ms"]), done, flight, _vcpus(d, f["vt_ns"]))
    parts: list[RenderableType] = [Text.from_markup("\n".join(head)), doms]

    if f["faults"]:
        faults = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
        for name in ("FID", "VT (us)", "Kind", "Target", "Outcome", "Ended (us)"):
            faults.add_column(name, justify="right" if name in ("FID", "VT (us)", "Ended (us)") else "left")
        for r in f["faults"]:
            faults.add_row(str(r["fid"]), _us(r["vt_ns"]), Text(r["kind"]), Text(r["target"] or ""),
                           Text(r["outcome"] or ""), _us(r["end_vt_ns"]))
        parts += [Text("recent faults", style="bold"), faults]
    else:
        parts.append(Text("no faults", style="dim"))
    if interval is not None:
        parts.append(Text(f"every {interval:g} s; Ctrl-C to quit", style="dim"))
    return Group(*parts)


# -- the command ---------------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(run_dir: Path, *, interval: float = 0.5, once: bool = False, as_json: bool = False,
        console: Console | None = None) -> int:
    """``pvcluster top``; the return value is the exit code. ControlError when there is neither a cluster nor a
    trace at ``run_dir``."""
    console = console or Console(highlight=False)
    control = Control(run_dir, max(CONTROL_TIMEOUT_S, interval))
    follower = TraceFollower(run_dir)
    if control.client is None and not (run_dir / "trace" / "hypervisor.jsonl").exists():
        raise ControlError(f"no cluster is running in {run_dir} and it holds no traces")

    def snapshot() -> dict[str, Any]:
        fresh = control.refresh()  # before the traces: what they add is at least as new
        follower.poll()
        if fresh is not None:
            follower.state.sample(time.time_ns(), fresh["vt_ns"])
        status = control.last if control.running else None  # a dead cluster's domains are as its traces end
        last_window = control.last["window"] if control.last is not None else None
        return frame(run_dir, follower.state, status, running=control.running, note=control.note,
                     last_window=last_window)

    try:
        if once:
            current = snapshot()
            if as_json:
                print(json.dumps(current))
            else:
                console.print(render(current))
            return 0
        # SIGTERM ends the live view as Ctrl-C does: the terminal gets its cursor back and the last frame stays
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return _live(run_dir, snapshot, interval, console)
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        control.close()


def _live(run_dir: Path, snapshot: Callable[[], dict[str, Any]], interval: float, console: Console) -> int:
    """Redraw a frame every ``interval`` seconds until the cluster ends or Ctrl-C (at any point: exit 0 either way)."""
    current: dict[str, Any] | None = None
    live: Live | None = None
    why = "ended"
    try:
        current = snapshot()
        if not current["running"]:
            console.print(render(current))
            console.print(f"pvcluster top: no cluster is running in {run_dir}", markup=False, soft_wrap=True)
            return 0
        live = Live(render(current, interval), console=console, auto_refresh=False)
        live.start(refresh=True)
        while current["running"]:
            time.sleep(interval)
            current = snapshot()
            live.update(render(current, interval), refresh=True)
    except KeyboardInterrupt:
        why = "is still running (top interrupted)"
    finally:
        if live is not None and current is not None:
            live.update(render(current))  # the last frame stays on screen, without the "Ctrl-C to quit" line
            live.stop()
            if not console.is_terminal:
                console.line()  # rich ends the last frame with a newline only on a terminal
    at = f" at virtual time {current['vt_ns'] / 1e6:.3f} ms" if current is not None else ""
    console.print(f"pvcluster top: the cluster in {run_dir} {why}{at}", markup=False, soft_wrap=True)
    return 0
