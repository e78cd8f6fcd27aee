"""What the suite measures, one function per section; each returns a ``Section`` with its table, data and targets.

Cluster runs go through `pvcluster up --json` in a subprocess (bench/clusterrun.py), as a user starts them, so the
memory of every process of the cluster can be sampled and the wall time is that of the windows alone (``wall_run_s``:
process start-up and domain building excluded).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from bench import clusterrun
from bench.suite import Options, Section, Target
from pvcluster.trace import read_events

Say = Callable[[str], None]
MIB = 1024  # KiB per MiB
GIB_KIB = 1024 * 1024

# The goals.
MIPS_FLOORS = {"mem32": ("32-instruction loop", 0.5), "tight": ("tight loop", 0.25)}  # vCPU MIPS / bare MIPS
RTT_CEILING = 2.0  # hypercall round trip / raw pyzmq ping-pong
PING_GOAL_ROUNDS, PING_GOAL_S = 10_000, 3.0
SLOWDOWN_CEILING = 100.0  # wall seconds per virtual second, default cluster
SCALE_GOAL = (16, 4)  # domains x vCPUs that must fit in ...
SCALE_RSS_CEILING_KIB = GIB_KIB  # ... less than this, summed over every process


def _call_measure(measure: Callable[..., Any], quick: bool) -> Any:
    """``measure()``, with ``quick=`` when the module's function takes it (the modules are written separately)."""
    if "quick" in inspect.signature(measure).parameters:
        return measure(quick=quick)
    return measure()


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.3f}" if abs(x) < 100 else f"{x:,.1f}"


# -- (a) guest MIPS ------------------------------------------------------------------------------------------------

MIPS_TITLE = "guest MIPS: a pvcluster vCPU against bare Unicorn"


def mips(opts: Options, say: Say) -> Section:
    try:
        guest_mips = importlib.import_module("bench.guest_mips")  # written separately: may not be here yet
    except ModuleNotFoundError as exc:
        if exc.name != "bench.guest_mips":
            raise
        return Section("mips", MIPS_TITLE, status="not available", note="bench/guest_mips.py is not in this tree",
                       targets=[Target(f"guest MIPS, {what}, vs bare", None, "x", ">=", floor, "not available")
                                for what, floor in MIPS_FLOORS.values()])
    results: dict[str, dict[str, Any]] = _call_measure(guest_mips.measure, opts.quick)
    section = Section("mips", MIPS_TITLE, data=results,
                      headers=["loop", "instructions", "vCPU MIPS", "bare MIPS", "ratio"])
    for loop, r in results.items():
        section.rows.append([loop, _fmt(r.get("instructions", "-")), _fmt(r.get("vcpu_mips", "-")),
                             _fmt(r.get("bare_mips", "-")), f"{r['ratio']:.3g}x" if "ratio" in r else "-"])
    for loop, (what, floor) in MIPS_FLOORS.items():
        ratio = results.get(loop, {}).get("ratio")
        section.targets.append(Target(f"guest MIPS, {what}, vs bare", ratio, "x", ">=", floor,
                                      "" if ratio is not None else f"no {loop!r} loop in guest_mips.measure()"))
    return section


# -- (b) hypercall round trip ---------------------------------------------------------------------------------------

RTT_TITLE = "hypercall round trip against a raw pyzmq ping-pong"


def rtt(opts: Options, say: Say) -> Section:
    from bench import hypercall_rtt

    measure = getattr(hypercall_rtt, "measure", None)
    if measure is None:
        return Section("rtt", RTT_TITLE, status="skipped",
                       note="bench/hypercall_rtt.py has no measure() in this tree; "
                       "`python -m bench.hypercall_rtt` prints its own figures",
                       targets=[Target("hypercall RTT vs raw pyzmq", None, "x", "<=", RTT_CEILING, "skipped")])
    results: dict[str, Any] = _call_measure(measure, opts.quick)
    rows = [[k, _fmt(v)] for k, v in results.items() if not isinstance(v, dict | list)]
    ratio = results.get("ratio")
    return Section("rtt", RTT_TITLE, data=results, headers=["measure", "value"], rows=rows,
                   targets=[Target("hypercall RTT vs raw pyzmq", ratio, "x", "<=", RTT_CEILING,
                                   "" if ratio is not None else "no 'ratio' in hypercall_rtt.measure()")])


# -- (c) ping-pong ---------------------------------------------------------------------------------------------------

PING_TITLE = "interdomain event-channel ping-pong (two 1-vCPU xen domains, 2 pCPUs)"
# As tests/test_evtchn_e2e.py's: the server binds port 2, the client's peer port.
PING_SPEC = """
[cluster]
name = "benchping"
seed = 5
[hypervisor]
pcpus = 2
[[domain]]
name = "srv"
vcpus = 1
backend = "xen"
cmdline = "workload=pingserver peer=2 rounds={rounds} shutdown=poweroff"
[[domain]]
name = "cli"
vcpus = 1
backend = "xen"
cmdline = "workload=pingclient peer=1 port=4 rounds={rounds} shutdown=poweroff"
"""


def _check_ping(rounds: int) -> Callable[[Path, dict[str, Any]], None]:
    """The guests' own verdicts, from their console lines in the hypervisor trace: every round trip made, none
    lost or duplicated (a fast run that dropped events would be no measurement)."""
    want = {f"pingclient: {rounds} round trips, 0 duplicated", "pingclient: lost 0",
            f"pingserver: echoed {rounds} events, lost 0"}

    def check(run_dir: Path, doc: dict[str, Any]) -> None:
        texts = {e.get("text") for e in read_events(run_dir / "trace" / "hypervisor.jsonl") if e["event"] == "console"}
        if missing := want - texts:
            raise clusterrun.RunFailed(f"the ping-pong did not complete cleanly; no console lines {sorted(missing)}")

    return check


def ping(opts: Options, say: Say) -> Section:
    n = opts.ping_rounds
    say(f"ping: {n} round trips")
    run = clusterrun.up(PING_SPEC.format(rounds=n), timeout_s=opts.timeout_s, check=_check_ping(n))
    per_s = n / run.wall_run_s
    goal_s = run.wall_run_s * PING_GOAL_ROUNDS / n
    data = {"rounds": n, "wall_run_s": run.wall_run_s, "round_trips_per_s": per_s, "vt_ns": run.vt_ns,
            "windows": run.windows, "wall_s": run.wall_s}
    rows = [[f"{n:,}", f"{run.wall_run_s:.2f}", f"{per_s:,.0f}", f"{run.wall_run_s / n * 1e6:,.0f}",
             f"{run.vt_ns / n:,.0f}", f"{run.windows:,}"]]
    note = "" if n == PING_GOAL_ROUNDS else f"extrapolated from {n:,} round trips"
    return Section("ping", PING_TITLE, data=data, rows=rows,
                   headers=["round trips", "wall s", "round trips/s", "wall us each", "virtual ns each", "windows"],
                   targets=[Target(f"{PING_GOAL_ROUNDS:,} ping-pongs, wall", goal_s, "s", "<=", PING_GOAL_S, note)])


# -- (d) slowdown and (e) scaling -------------------------------------------------------------------------------------

SLOWDOWN_TITLE = "slowdown of the default cluster (wall seconds per virtual second)"
_RUN_HEADERS = ["wall run s", "wall s", "virtual ms", "windows", "slowdown", "cluster RSS MiB", "RSS sum MiB",
                "PSS sum MiB", "largest domain MiB", "hypervisor MiB"]


def _run_cells(run: clusterrun.UpRun) -> list[str]:
    by_role = run.memory.peak_by_role()
    return [f"{run.wall_run_s:.2f}", f"{run.wall_s:.1f}", f"{run.vt_ns / 1e6:.3f}", f"{run.windows:,}",
            f"{run.slowdown:,.0f}x", f"{run.memory.cluster_rss_kib / MIB:.0f}", f"{run.memory.rss_kib / MIB:.0f}",
            f"{run.memory.pss_kib / MIB:.0f}",
            f"{by_role.get('domain', 0) / MIB:.0f}", f"{by_role.get('hypervisor', 0) / MIB:.0f}"]


def _run_data(run: clusterrun.UpRun) -> dict[str, Any]:
    return {"wall_run_s": run.wall_run_s, "wall_s": run.wall_s, "vt_ns": run.vt_ns, "windows": run.windows,
            "slowdown": run.slowdown, "memory": {**attrs.asdict(run.memory, filter=lambda a, _: a.name !=
                                                                 "per_process_kib"),
                                                 "peak_by_role_kib": run.memory.peak_by_role()}}


def slowdown(opts: Options, say: Say) -> Section:
    run = clusterrun.up(None, timeout_s=opts.timeout_s)
    return Section("slowdown", SLOWDOWN_TITLE, data=_run_data(run), headers=["cluster", *_RUN_HEADERS],
                   rows=[["default (2 domains x 2 vCPUs, 2 pCPUs)", *_run_cells(run)]],
                   targets=[Target("default cluster slowdown", run.slowdown, "x", "<=", SLOWDOWN_CEILING)])


SCALE_TITLE = "scaling: N domains x V vCPUs of workload=shootdown, pCPUs = N*V/2 (the default spec's 2:1)"


def scale_spec(domains: int, vcpus: int) -> str:
    """N domains as the default spec's (alternately native and xen backends, the shootdown workload), with the
    default's overcommit of two vCPUs per pCPU, so each domain's virtual time stays about the same as N grows and
    the wall time shows what the simulation of more of them costs."""
    text = f'[cluster]\nname = "scale"\n[hypervisor]\npcpus = {max(1, domains * vcpus // 2)}\n'
    for i in range(domains):
        text += (f'[[domain]]\nname = "d{i}"\nvcpus = {vcpus}\nbackend = "{("native", "xen")[i % 2]}"\n'
                 f'cmdline = "workload=shootdown shutdown=poweroff"\n')
    return text


def scale(opts: Options, say: Say) -> Section:
    section = Section("scale", SCALE_TITLE, headers=["domains", "vCPUs", "pCPUs", *_RUN_HEADERS])
    goal: clusterrun.UpRun | None = None
    for vcpus in opts.scale_vcpus:
        for domains in opts.scale_domains:
            say(f"scale: {domains} domains x {vcpus} vCPUs")
            key, pcpus = f"{domains}x{vcpus}", str(max(1, domains * vcpus // 2))
            try:
                run = clusterrun.up(scale_spec(domains, vcpus), timeout_s=opts.timeout_s)
            except clusterrun.RunFailed as exc:
                section.rows.append([str(domains), str(vcpus), pcpus, f"failed: {exc}"[:60]])
                section.data[key] = {"error": str(exc)}
                continue
            section.rows.append([str(domains), str(vcpus), pcpus, *_run_cells(run)])
            section.data[key] = _run_data(run)
            goal = run if (domains, vcpus) == SCALE_GOAL else goal
    # The simulated machine is the hypervisor and its domain processes; `pvcluster up` is a client of it (the RSS sum
    # with it is in the table beside).
    measured = goal.memory.cluster_rss_kib / MIB if goal is not None else None
    section.targets.append(Target(f"{SCALE_GOAL[0]} domains x {SCALE_GOAL[1]} vCPUs, cluster RSS", measured, "MiB",
                                  "<", SCALE_RSS_CEILING_KIB / MIB, "" if goal is not None else "not run"))
    return section


# -- the older benchmarks, as extra sections ------------------------------------------------------------------------


def _printed(fn: Callable[[], None]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def pvops(opts: Options, say: Say) -> Section:
    from bench import pvops as mod

    pairs, costs = mod.irq_pairs(), mod.op_costs()
    data = {"irq_pairs": {f"{b}/{'patched' if p else 'unpatched'}": {"instructions": i, "vt_ns": v}
                          for (b, p), (i, v) in pairs.items()},
            "ops": {f"{b}/{op}": {"instructions": i, "vt_ns": v} for (b, op), (i, v) in costs.items()}}
    return Section("pvops", "paravirt op costs and call-site patching (virtual)", data=data,
                   text=_printed(lambda: mod.render(pairs, costs)))


def multicall(opts: Options, say: Say) -> Section:
    from bench import multicall as mod

    costs = mod.run()
    ratio = mod.wall_ratio(costs)
    data = {k: {**attrs.asdict(c), "vt_per_update": c.vt_per_update, "wall_us_per_update": c.wall_us_per_update}
            for k, c in costs.items()}
    return Section("multicall", "page-table updates: one hypercall each against batched multicalls", data=data,
                   text=_printed(lambda: mod.render(costs)),
                   targets=[Target(f"multicall wall saving per update ({mod.HEAD_TO_HEAD} vs 1)", ratio, "x", ">=",
                                   mod.MIN_WALL_RATIO)])


def trace(opts: Options, say: Say) -> Section:
    from bench import trace_analysis

    return trace_analysis.section(opts, say)


def overcommit(opts: Options, say: Say) -> Section:
    from bench import overcommit as mod

    return mod.section(opts, say)


def calibration(opts: Options, say: Say) -> Section:
    from bench import calibration as mod

    return mod.section(opts, say)


# In suite order: `--only` picks from these.
SECTIONS = {"mips": mips, "rtt": rtt, "ping": ping, "slowdown": slowdown, "scale": scale, "pvops": pvops,
            "multicall": multicall, "trace": trace, "overcommit": overcommit, "calibration": calibration}
