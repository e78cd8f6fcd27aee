"""Soak: N seeded random fault schedules over a mixed workload, and counts of everything that went wrong.

    python3 dev.py soak [N] [options]          # in the project's venv
    python -m tools.soak --runs N [options]    # from the repository root, any venv with pvcluster

Not a test (it takes minutes to hours and its findings are for a person to read) and not a benchmark (it measures
no ratio), so it lives here rather than in tests/ or bench/, and neither ``dev.py test`` nor ``dev.py bench`` runs it.

Every run starts one cluster of five domains on ``--pcpus`` physical CPUs (seven vCPUs in all):

* ``sdn``: 2 vCPUs, backend native, ``workload=shootdown`` (IPIs; the hypervisor flushes nothing for it);
* ``sdx``: 2 vCPUs, backend xen, ``workload=shootdown`` (one ``mmuext_op`` flush of the other vCPU per round);
* ``srv`` / ``cli``: 1 vCPU each, backend xen, ``workload=pingserver`` / ``pingclient`` (``--ping-rounds``
  interdomain event-channel round trips; the client binds the server's port 2, the first after the xen backend's
  IPI port);
* ``mc``: 1 vCPU, backend xen, ``workload=mcbench`` (64 page-table updates in multicall batches of 8).

Run i uses cluster seed ``--first-seed + i`` and ``[faults] random = {rate, kinds, until_ns}``, so the hypervisor
draws each domain's fault schedule from that seed; the kinds are ``DEFAULT_RANDOM_KINDS`` (pause, preempt, offline,
pin, slow, delay, drop, dup, reorder, partition, skew), none of which ends a domain or is a hypervisor bug. Every
``--bug-every``-th run (i % k == k - 1) also arms one hypervisor bug with a ``[[fault]]`` entry at a seeded virtual
time inside the workloads (count 1), the kind rotating through skip-flush, lose-event, dup-event, corrupt-result,
delay-flush and the target through the domains where it can strike. By default (``--via control``) that schedule
(the same faults at the same virtual times) is injected through ``Cluster.inject`` right after ``Cluster.start``,
before any window opens, which exercises the interactive path a test script uses; ``--via spec`` leaves it in the
spec for the hypervisor to plan itself:

==============  ===========  ================================================================================
bug             target       "caught" means
==============  ===========  ================================================================================
skip-flush      sdx          a ``stale-tlb-read`` violation in sdx (the skipped flush leaves the other vCPU's
                             stale entry in place; it reads the test page once the round is published), or an
                             ``effects-applied`` one "acknowledged flushing ... never applied" (the checker's
                             acknowledged-flush rule, which needs no stale read)
delay-flush     sdx          the same two ("applied only at T" for the second). Should neither appear, the strike is
                             reported as "struck, not observed" (``bug_verdict`` "unobserved"), with whether a
                             target vCPU held a pCPU in the interval, not as a miss
lose-event      cli, srv     an ``event-delivered-once`` violation "never delivered" for the target
dup-event       cli, srv     an ``event-delivered-once`` violation "delivered N times" for the target
corrupt-result  cli, srv,    an ``effects-applied`` violation "hypercall result corrupted" for the target
                sdx
==============  ===========  ================================================================================

A struck bug may end the domains it hit through their guests' own checks (sdx's stale read, the ping client's
lost or duplicated echo and, in turn, its peer): such crashes are counted as expected, not as process crashes.

Per run: ``Cluster.start`` into ``<dir>/run-<i>``, ``Cluster.wait`` (a wall timeout is a HANG; a cluster that goes
idle with domains still alive is STUCK), the consoles, then ``check_run``. Counted: hangs, stuck runs, hypervisor
deaths, unexpected domain crashes (a domain ending crashed, or shut down other than by poweroff, with no armed bug
nor ending fault to explain it; the crash detail and console tail are kept), stale reads, lost and duplicated events,
checker violations (split benign / bug runs), tracebacks in the process logs, and for bug runs: armed, struck,
caught. Anything unexpected is an anomaly: the run's directory is kept (its path printed, with ``soak-spec.toml`` to
re-run it by ``pvcluster up``) and the others are deleted. Each run is a worker subprocess of its own (``--jobs`` at
once); a progress line is printed as each finishes, then the table; ``--json PATH`` writes every run's record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = "soak-config.json"
SPEC_FILE = "soak-spec.toml"
BUG_KINDS = ("skip-flush", "lose-event", "dup-event", "corrupt-result", "delay-flush")
BUG_TARGETS: dict[str, tuple[str, ...]] = {
    "skip-flush": ("sdx",), "delay-flush": ("sdx",), "lose-event": ("cli", "srv"), "dup-event": ("cli", "srv"),
    "corrupt-result": ("cli", "srv", "sdx"),
}
# The invariants a struck bug violates: a skipped or delayed flush leaves a stale entry a target may read, and the
# shootdown's answer acknowledged a flush that was not applied (or only later) (check.py's acknowledged-flush rule)
BUG_INVARIANT: dict[str, tuple[str, ...]] = {
    "skip-flush": ("stale-tlb-read", "effects-applied"), "delay-flush": ("stale-tlb-read", "effects-applied"),
    "lose-event": ("event-delivered-once",), "dup-event": ("event-delivered-once",),
    "corrupt-result": ("effects-applied",)}
PING_PAIR = ("srv", "cli")
# One vCPU: ports 1 and 2 are the xenstore and console rings' (allocated before the build), the xen backend binds
# port 3 for its IPIs, so the server's alloc_unbound gets port 4.
SERVER_PORT = 4
# When an armed bug starts (seeded, uniform): inside the workload it targets, even when faults make it shorter. The
# shootdowns run from about 45 us to 1.2-2 ms; the ping-pong from about 20 us to 0.45-1.9 ms (it speeds up when
# faults take other domains' vCPUs off the pCPUs).
BUG_WINDOW_NS = {"sdx": (100_000, 700_000), "cli": (40_000, 300_000), "srv": (40_000, 300_000)}
MAX_VIOLATIONS_KEPT = 30
LINK_NS = 10_000  # hypervisor.cost.link_ns (the spec's default)
GUEST_CRASH = "guest requested SCHEDOP_shutdown(crash)"  # a domain's crash detail when its guest asked for it
TAIL = 8
SYSTEMIC_EXAMPLES = 3  # run directories kept per systemic issue (one that shows in most runs)


@attrs.frozen
class Dom:
    name: str
    vcpus: int
    backend: str
    cmdline: str


def domains(ping_rounds: int) -> tuple[Dom, ...]:
    """The mixed workload, in spec order: domain ids 1..5."""
    return (
        Dom("sdn", 2, "native", "workload=shootdown shutdown=poweroff"),
        Dom("sdx", 2, "xen", "workload=shootdown shutdown=poweroff"),
        Dom("srv", 1, "xen", f"workload=pingserver peer=4 rounds={ping_rounds} shutdown=poweroff"),
        Dom("cli", 1, "xen", f"workload=pingclient peer=3 port={SERVER_PORT} rounds={ping_rounds} shutdown=poweroff"),
        Dom("mc", 1, "xen", "workload=mcbench mcbatch=8 mcupdates=64 shutdown=poweroff"),
    )


@attrs.frozen
class Config:
    runs: int = 200
    jobs: int = 2
    first_seed: int = 0
    rate: float = 3.0  # random faults per virtual ms, per domain
    until_ns: int = 2_000_000  # about the workload's virtual length without faults
    kinds: tuple[str, ...] = ()  # () = DEFAULT_RANDOM_KINDS
    bug_every: int = 4  # 0: no bug runs
    timeout_s: float = 150.0  # wall seconds a run may take before it is a hang
    ping_rounds: int = 100
    pcpus: int = 4
    keep_all: bool = False
    via: str = "control"  # how the schedule reaches the hypervisor: "control" (Cluster.inject) or "spec"
    only: tuple[int, ...] = ()  # run just these run indices (to re-run failing ones); () = 0..runs-1

    def indices(self) -> list[int]:
        return list(self.only) if self.only else list(range(self.runs))

    def to_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "kinds": list(self.kinds), "only": list(self.only)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(**{**d, "kinds": tuple(d.get("kinds", ())), "only": tuple(d.get("only", ()))})


@attrs.frozen
class Bug:
    kind: str
    target: str
    at_ns: int
    params: dict[str, int]

    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.params.items() if k != "count")
        return f"{self.kind}@{self.target} at {self.at_ns // 1000} us{extra}"


def bug_plan(cfg: Config, index: int) -> Bug | None:
    """The hypervisor bug run ``index`` arms, if it is a bug run: kinds rotate, then targets rotate per kind."""
    k = cfg.bug_every
    if k <= 0 or index % k != k - 1:
        return None
    n = index // k
    kind = BUG_KINDS[n % len(BUG_KINDS)]
    targets = BUG_TARGETS[kind]
    target = targets[(n // len(BUG_KINDS)) % len(targets)]
    rng = random.Random(f"{cfg.first_seed + index}/soak-bug")
    at_ns = rng.randrange(*BUG_WINDOW_NS[target], 1000)
    params = {"count": 1}
    if kind == "delay-flush":
        params["delay_ns"] = rng.randrange(20_000, 100_001, 1000)
    return Bug(kind, target, at_ns, params)


def spec_text(cfg: Config, index: int) -> str:
    """The run's spec as TOML (kept beside a failing run as ``soak-spec.toml``, to re-run it by ``pvcluster up``)."""
    from pvcluster.faults import DEFAULT_RANDOM_KINDS

    seed = cfg.first_seed + index
    out = [f'[cluster]\nname = "soak-{index}"\nseed = {seed}\n\n[hypervisor]\npcpus = {cfg.pcpus}\n']
    for d in domains(cfg.ping_rounds):
        out.append(f'\n[[domain]]\nname = "{d.name}"\nvcpus = {d.vcpus}\nbackend = "{d.backend}"\n'
                   f'cmdline = "{d.cmdline}"\n')
    bug = bug_plan(cfg, index)
    if bug is not None:
        params = "".join(f"{k} = {v}\n" for k, v in bug.params.items())
        out.append(f'\n[[fault]]\nkind = "{bug.kind}"\ntarget = "{bug.target}"\nat_ns = {bug.at_ns}\n{params}')
    kinds = ", ".join(f'"{k}"' for k in (cfg.kinds or DEFAULT_RANDOM_KINDS))
    out.append(f"\n[faults]\nrandom = {{ rate = {cfg.rate}, kinds = [{kinds}], until_ns = {cfg.until_ns} }}\n")
    return "".join(out)


# -- one run (in a worker process of its own) -----------------------------------------------------------------


def _tail(lines: Iterable[str], n: int = TAIL) -> list[str]:
    return list(lines)[-n:]


def _file_tail(path: Path, n: int = TAIL) -> list[str]:
    try:
        return _tail(path.read_text(errors="replace").splitlines(), n)
    except OSError:
        return []


def _safe(what: str, fn: Any, evidence: dict[str, Any]) -> Any:
    """Call ``fn()``; a failure (a dead or hung hypervisor) is noted in ``evidence`` instead of raised."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - evidence gathering must not lose the run
        evidence.setdefault("gather_errors", []).append(f"{what}: {type(exc).__name__}: {exc}")
        return None


def run_one(cfg: Config, index: int, run_dir: Path) -> dict[str, Any]:
    """Start, wait for, bring down and check one cluster; return its record (see ``classify``)."""
    from pvcluster.check import check_run
    from pvcluster.cluster import Cluster, ClusterError
    from pvcluster.control import ControlError
    from pvcluster.spec import parse_spec

    text = spec_text(cfg, index)
    spec = parse_spec(text)
    bug = bug_plan(cfg, index)
    planned = planned_faults(spec)
    if cfg.via == "control":  # the same schedule, injected through the control socket once the domains exist
        spec = attrs.evolve(spec, faults=(), random_faults=None)
    res: dict[str, Any] = {
        "index": index, "seed": cfg.first_seed + index, "bug": attrs.asdict(bug) if bug else None,
        "run_dir": str(run_dir), "end": "finished", "evidence": {}, "anomalies": [],
    }
    ev = res["evidence"]
    t0 = time.monotonic()
    try:
        cluster = Cluster.start(spec, run_dir=run_dir)
    except ClusterError as exc:
        res["end"] = "start-failed"
        ev["error"] = str(exc)
        res["wall_s"] = time.monotonic() - t0
        return classify(res, None, cfg)
    (run_dir / SPEC_FILE).write_text(text)
    final: dict[str, Any] | None = None
    try:
        if cfg.via == "control":
            inject_all(cluster, planned, ev)
        try:
            final = cluster.wait(timeout_s=cfg.timeout_s, poll_s=0.2)
            if any(d["state"] not in ("dead", "crashed") for d in final["domains"]):
                res["end"] = "stuck"
        except ClusterError as exc:
            res["end"] = "hv-died" if "exited" in str(exc) else "hang"
            ev["error"] = str(exc)
        except ControlError as exc:
            res["end"] = "hang"
            ev["error"] = f"control socket: {exc}"
        res["wall_s"] = time.monotonic() - t0
        if res["end"] != "hv-died":
            st = _safe("status", cluster.status, ev)
            final = st if st is not None else final
            if final is not None:
                res["consoles"] = {d["name"]: _safe(f"console {d['name']}", lambda d=d: cluster.client.call(
                    "console", dom=str(d["domid"])), ev) or [] for d in final["domains"]}
            if res["end"] != "finished":
                ev["dmesg_tail"] = _tail(_safe("dmesg", lambda: cluster.client.call("dmesg"), ev) or [], 15)
                flt = _safe("faults", cluster.faults, ev)
                if flt is not None:
                    ev["faults_pending"] = flt.get("pending", [])[:10]
                    ev["faults_vt_ns"] = flt.get("vt_ns")
                ev["hypervisor_trace_tail"] = _file_tail(run_dir / "trace" / "hypervisor.jsonl", 12)
    finally:
        _safe("down", cluster.down, ev)
    res["status"] = final
    report = None
    try:
        report = check_run(run_dir)
    except (OSError, ValueError) as exc:
        ev["check_error"] = f"{type(exc).__name__}: {exc}"
    return classify(res, report, cfg)


def planned_faults(spec: Any) -> list[Any]:
    """The faults the spec plans, as the hypervisor plans them: the ``[[fault]]`` schedule, then ``[faults]
    random`` drawn from the cluster seed (``random_schedule``)."""
    from pvcluster.faults import random_schedule

    out = list(spec.faults)
    if spec.random_faults is not None:
        doms = [(d.name, d.vcpus) for d in spec.domains]
        out += random_schedule(spec.random_faults, spec.cluster.seed, doms, spec.hypervisor.pcpus)
    return out


def inject_all(cluster: Any, planned: list[Any], ev: dict[str, Any]) -> None:
    """``--via control``: plan every fault through ``Cluster.inject`` (not waiting for it to act), right after
    ``Cluster.start``, while the domains are still being built (no window opens then, so virtual time is still 0
    and every fault acts at its ``at_ns``, as one from the spec would). The virtual time before and after is noted."""
    before = _safe("status", cluster.status, ev)
    for req in planned:
        try:
            cluster.inject(req.kind, req.target, at_ns=req.at_ns, wait_s=0, **dict(req.params))
        except Exception as exc:  # noqa: BLE001 - a refused injection is evidence, not the end of the run
            ev.setdefault("inject_errors", []).append(f"{req.kind} {req.target} at {req.at_ns}: {exc}")
    after = _safe("status", cluster.status, ev)
    ev["inject_vt_ns"] = [s.get("vt_ns") if s else None for s in (before, after)]


def _faults_log(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    try:
        for line in (run_dir / "faults.jsonl").read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    except OSError:
        pass
    return out


def _event_kind(v: dict[str, Any]) -> str | None:
    """An event-delivered-once violation: "lost", "dup" or "other"; None for other invariants."""
    if v["invariant"] != "event-delivered-once":
        return None
    if "never delivered" in v["detail"]:
        return "lost"
    if "times on port" in v["detail"] or "sent this eid twice" in v["detail"]:
        return "dup"
    return "other"


def _matches_bug(bug: Bug, v: dict[str, Any], target_dom: int | None) -> bool:
    if v["invariant"] not in BUG_INVARIANT[bug.kind] or v["dom"] != target_dom:
        return False
    if bug.kind in ("skip-flush", "delay-flush") and v["invariant"] == "effects-applied":
        return "acknowledged flushing" in v["detail"]
    if bug.kind == "lose-event":
        return _event_kind(v) == "lost"
    if bug.kind == "dup-event":
        return _event_kind(v) == "dup"
    if bug.kind == "corrupt-result":
        return "corrupted" in v["detail"]
    return True


def _target_ran(run_dir: Path, domid: int, since: int, until: int, initiator: int) -> bool | None:
    """Whether a vCPU of ``domid`` other than ``initiator`` was running at some time in [since, until] (from the
    hypervisor's ``vcpu.runstate`` events); None when the trace says nothing about it."""
    from pvcluster.jsonl import JsonLines

    state: dict[int, str] = {}
    seen = False
    try:
        for _, e in JsonLines(run_dir / "trace" / "hypervisor.jsonl"):
            if e.get("event") != "vcpu.runstate" or e.get("dom") != domid or e.get("vcpu") == initiator:
                continue
            seen = True
            vt = e.get("vt_ns", 0)
            v = int(e.get("vcpu", -1))
            if vt > until:
                break
            if vt >= since and (state.get(v) == "running" or e.get("state") == "running"):
                return True
            state[v] = str(e.get("state"))
    except (OSError, ValueError):
        return None
    if any(s == "running" for s in state.values()):
        return True
    return False if seen else None


def trace_checks(run_dir: Path, link_ns: int) -> dict[str, Any]:
    """What the checker does not look at, from the traces:

    * ``short_rtts``: ping round trips (the client's PING_SENT to PING_ECHO marks) shorter than two link latencies,
      which no echo can beat: the echo was stamped before the ping it answers arrived (virtual time went backwards);
    * ``descheduled``: hypercalls and guest marks stamped at a virtual time when the hypervisor's own run-state
      record (``vcpu.runstate``, ordered by virtual time) says the vCPU held no pCPU (runnable, blocked, offline);
    * ``faults_after_shutdown``: faults that acted on a domain after its ``domain.shutdown``.
    """
    import bisect

    from pvcluster.abi.platform import Mark
    from pvcluster.jsonl import JsonLines

    trace = run_dir / "trace"
    runstates: dict[tuple[int, int], list[tuple[int, str]]] = {}
    stamps: list[tuple[int, int, int, str]] = []  # (dom, vcpu, vt, what)
    shutdown: dict[int, int] = {}
    injected: list[tuple[int, int, str]] = []
    out: dict[str, Any] = {"short_rtts": 0, "descheduled": 0, "faults_after_shutdown": 0}
    try:
        for _, e in JsonLines(trace / "hypervisor.jsonl"):
            name, dom = e.get("event"), e.get("dom")
            if not isinstance(dom, int):
                continue
            if name == "vcpu.runstate":
                runstates.setdefault((dom, int(e["vcpu"])), []).append((int(e["vt_ns"]), str(e["state"])))
            elif name == "hypercall":
                stamps.append((dom, int(e["vcpu"]), int(e["vt_ns"]), f"hypercall {e.get('name')} {e.get('span')}"))
            elif name == "domain.shutdown":
                shutdown.setdefault(dom, int(e["vt_ns"]))
            elif name == "fault.inject":
                injected.append((dom, int(e["vt_ns"]), f"{e.get('kind')} {e.get('target')} fid {e.get('fid')}"))
        sent: dict[int, int] = {}
        rtts: list[tuple[int, int, int]] = []
        for path in sorted(trace.glob("dom*-*.jsonl")):
            client = path.stem.endswith("-cli")
            for _, e in JsonLines(path):
                if e.get("event") != "guest.mark" or not isinstance(e.get("vcpu"), int):
                    continue
                vt = int(e["vt_ns"])
                stamps.append((int(e["dom"]), int(e["vcpu"]), vt, f"guest.mark {e.get('code'):#x} {e.get('span')}"))
                if client and e.get("code") == Mark.PING_SENT:
                    sent[int(e["round"])] = vt
                elif client and e.get("code") == Mark.PING_ECHO and int(e["round"]) in sent:
                    rtts.append((int(e["round"]), sent[int(e["round"])], vt))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    short = [r for r in rtts if r[2] - r[1] < 2 * link_ns]
    out["short_rtts"], out["rtts"] = len(short), len(rtts)
    if short:
        rnd, t0, t1 = short[0]
        out["short_rtt_first"] = f"round {rnd}: ping sent at {t0} ns, echo seen at {t1} ns ({t1 - t0} ns)"
    times: dict[tuple[int, int], tuple[list[int], list[str]]] = {}
    for k, v in runstates.items():
        v.sort(key=lambda x: x[0])
        times[k] = ([t for t, _ in v], [s for _, s in v])
    bad = []
    for dom, vcpu, vt, what in stamps:
        if (dom, vcpu) not in times:
            continue
        ts, states = times[(dom, vcpu)]
        i = bisect.bisect_left(ts, vt)  # the state just before vt
        j = bisect.bisect_right(ts, vt)  # and the state at vt: a stamp at the instant it got its pCPU is fine
        if i and states[i - 1] != "running" and states[j - 1] != "running":
            bad.append(f"d{dom}v{vcpu} {what} at {vt} ns while {states[i - 1]} since {ts[i - 1]} ns")
    out["descheduled"] = len(bad)
    if bad:
        out["descheduled_first"] = bad[0]
    late = [f"{what} at {vt} ns, d{dom} shut down at {shutdown[dom]} ns" for dom, vt, what in injected
            if dom in shutdown and vt > shutdown[dom]]
    out["faults_after_shutdown"] = len(late)
    if late:
        out["faults_after_shutdown_first"] = late[0]
    return out


def classify(res: dict[str, Any], report: Any, cfg: Config) -> dict[str, Any]:
    """Fill in the run's counts, bug verdict and anomalies (each a line of text a person can act on)."""
    from pvcluster.faults import ENDING

    run_dir = Path(res["run_dir"])
    ev, anomalies = res["evidence"], res["anomalies"]
    bug = Bug(**res["bug"]) if res["bug"] else None
    flog = _faults_log(run_dir)
    res["faults"] = len(flog)
    res["fault_kinds"] = dict(Counter(f.get("kind", "?") for f in flog))
    res["fault_outcomes_odd"] = [f for f in flog if str(f.get("outcome", "")).startswith(("error", "refused"))][:10]
    res["faults_injected"] = sum(1 for f in flog if f.get("outcome") != "no such live domain")
    limit = 5_000_000
    ending = {f.get("target", "").split(".")[0] for f in flog if f.get("kind") in ENDING or (
        f.get("kind") == "partition" and f.get("params", {}).get("duration_ns", 0) > limit)}
    status = res.get("status") or {}
    doms = {d["name"]: d for d in status.get("domains", [])}
    ids = {name: d["domid"] for name, d in doms.items()}
    res["vt_ns"] = status.get("vt_ns")

    end = res["end"]
    if end == "start-failed":
        anomalies.append(f"the cluster did not start: {ev.get('error')}")
    elif end == "hang":
        states = {n: (d["state"], d["vcpu_states"]) for n, d in doms.items()}
        anomalies.append(f"HANG: not finished within {cfg.timeout_s:g} s wall (vt {status.get('vt_ns')} ns); "
                         f"states {states}")
    elif end == "stuck":
        live = {n: (d["state"], d["vcpu_states"]) for n, d in doms.items() if d["state"] not in ("dead", "crashed")}
        anomalies.append(f"STUCK: the cluster went idle at vt {status.get('vt_ns')} ns with live domains {live}")
    elif end == "hv-died":
        anomalies.append(f"the hypervisor process died: {ev.get('error')}")

    # bug: struck, caught, which domains it may end
    stats: dict[str, int] = dict(report.stats) if report is not None else {}
    violations: list[dict[str, Any]] = [attrs.asdict(v) for v in report.violations] if report is not None else []
    struck = stats.get(f"bug_{bug.kind.replace('-', '_')}", 0) if bug else 0
    affected: set[str] = set()
    attributed: list[dict[str, Any]] = []
    if bug is not None:
        target_dom = ids.get(bug.target)
        attributed = [v for v in violations if _matches_bug(bug, v, target_dom)]
        caught = bool(attributed)
        if struck:
            affected.add(bug.target)
            if bug.target in PING_PAIR and bug.kind != "skip-flush":
                affected.update(PING_PAIR)
        if not struck:
            verdict = "not struck"
            if report is not None and end == "finished":
                anomalies.append(f"bug {bug.label()} armed but never struck")
        elif caught:
            verdict = "caught"
        elif bug.kind == "delay-flush" and target_dom is not None:
            strike = _strike(run_dir, "fault.delay_flush")
            ran = None
            if strike is not None:
                ran = _target_ran(run_dir, target_dom, strike["vt_ns"], strike["until_vt_ns"], strike["vcpu"])
            res["delay_flush_target_ran"] = ran
            verdict = "unobserved"
            if ran:
                anomalies.append(f"bug {bug.label()} struck ({strike}) while a target vCPU held a pCPU, but no "
                                 f"stale read was seen or flagged")
        else:
            verdict = "missed"
            if report is not None:
                anomalies.append(f"bug {bug.label()} struck {struck}x but the checker flagged nothing for it "
                                 f"(expected a {' or '.join(BUG_INVARIANT[bug.kind])} violation in d{target_dom})")
        res["bug_struck"] = struck
        res["bug_verdict"] = verdict

    # crashes and odd shutdowns
    crashes, expected = [], []
    for name, d in doms.items():
        crashed = d["state"] == "crashed" or d.get("shutdown_reason") == "crash"
        odd = d["state"] == "dead" and d.get("shutdown_reason") not in ("poweroff", "crash")
        if not crashed and not odd:
            continue
        rec = {"dom": name, "domid": d["domid"], "state": d["state"], "reason": d.get("shutdown_reason"),
               "crash": d.get("crash"), "ended_vt_ns": d.get("ended_vt_ns"),
               "console": _tail(res.get("consoles", {}).get(name, []))}
        by_guest = d.get("crash") == GUEST_CRASH  # the guest's own checks ended it (SCHEDOP_shutdown(crash))
        if (name in affected and by_guest) or name in ending:
            expected.append(rec)
            continue
        crashes.append(rec)
        what = "crashed" if crashed else f"ended with shutdown reason {d.get('shutdown_reason')!r}"
        anomalies.append(f"domain {name} (d{d['domid']}) {what} at vt {d.get('ended_vt_ns')}: {d.get('crash')!r}; "
                         f"console: {' | '.join(rec['console'][-4:])}")
    res["crashes"], res["expected_crashes"] = crashes, expected

    # the checker
    if report is None and "check_error" in ev:
        anomalies.append(f"check_run failed: {ev['check_error']}")
    kinds = Counter(_event_kind(v) for v in violations)
    res["stats"] = stats
    res["violations"] = len(violations)
    res["violation_list"] = violations[:MAX_VIOLATIONS_KEPT]
    res["stale_reads"] = stats.get("stale_reads", 0)
    res["lost_events"], res["dup_events"] = kinds.get("lost", 0), kinds.get("dup", 0)
    res["other_event_violations"] = kinds.get("other", 0)
    unexplained = [v for v in violations if v not in attributed]
    res["unexplained_violations"] = len(unexplained)
    if unexplained:
        by = Counter(f"{v['invariant']} d{v['dom']}" for v in unexplained)
        first = unexplained[0]
        anomalies.append(f"{len(unexplained)} checker violation(s) {'not from the armed bug' if bug else ''} "
                         f"{dict(by)}; first: vt {first['vt_ns']} d{first['dom']} {first['invariant']} "
                         f"{first['span'] or first['eid']}: {first['detail']}")

    # what the checker does not look at
    tc = trace_checks(run_dir, LINK_NS)
    res["trace_checks"] = tc
    systemic = res.setdefault("systemic", {})
    if tc.get("short_rtts"):
        systemic["short-rtt"] = (f"{tc['short_rtts']} of {tc['rtts']} ping round trips shorter than two link "
                                 f"latencies ({2 * LINK_NS} ns); first {tc['short_rtt_first']}")
    if tc.get("descheduled"):
        systemic["descheduled"] = (f"{tc['descheduled']} hypercalls/marks stamped while the vCPU held no pCPU; "
                                   f"first {tc['descheduled_first']}")
    if tc.get("faults_after_shutdown"):
        systemic["fault-after-shutdown"] = (f"{tc['faults_after_shutdown']} faults acted after their domain's "
                                            f"shutdown; first {tc['faults_after_shutdown_first']}")
    if tc.get("error"):
        anomalies.append(f"trace checks failed: {tc['error']}")

    # tracebacks in any process's log
    for log in sorted((run_dir / "logs").glob("*.log")):
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        if "Traceback" in text:
            tb = text[text.index("Traceback"):].splitlines()
            anomalies.append(f"traceback in logs/{log.name}: {' | '.join(tb[-3:])}")
    if res["fault_outcomes_odd"]:
        ev["odd_fault_outcomes"] = res["fault_outcomes_odd"]
        anomalies.append(f"{len(res['fault_outcomes_odd'])} fault(s) failed or were refused; first: "
                         f"{res['fault_outcomes_odd'][0]}")
    # a fault refused as "no such live domain" while its domain was alive (it ended later, or never)
    refused = [f for f in flog if f.get("outcome") == "no such live domain" and (
        (d := doms.get(str(f.get("target", "")).split(".")[0])) is not None
        and (d.get("ended_vt_ns") is None or d["ended_vt_ns"] > f.get("vt_ns", 0)))]
    res["faults_refused_live"] = len(refused)
    if refused:
        f = refused[0]
        anomalies.append(f"{len(refused)} of {len(flog)} faults refused as 'no such live domain' although the domain "
                         f"lived on; first: fid {f.get('fid')} {f.get('kind')} {f.get('target')} at_ns "
                         f"{f.get('at_ns')} origin {f.get('origin')} acted at step {f.get('step')} point "
                         f"{f.get('point')} vt {f.get('vt_ns')}")
    if ev.get("inject_errors"):
        anomalies.append(f"{len(ev['inject_errors'])} injection(s) refused; first: {ev['inject_errors'][0]}")
    return res


def _strike(run_dir: Path, event: str) -> dict[str, Any] | None:
    from pvcluster.jsonl import JsonLines

    try:
        for _, e in JsonLines(run_dir / "trace" / "hypervisor.jsonl"):
            if e.get("event") == event:
                return e
    except (OSError, ValueError):
        return None
    return None


def worker_main(base: Path, index: int) -> int:
    """``--worker``: one run, its record written to ``<base>/run-<index>.json``."""
    cfg = Config.from_dict(json.loads((base / CONFIG_FILE).read_text()))
    res = run_one(cfg, index, base / f"run-{index}")
    out = base / f"run-{index}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(out)
    return 0


# -- the soak: workers, progress, table ------------------------------------------------------------------------


def run_worker(cfg: Config, base: Path, index: int) -> dict[str, Any]:
    """One run in a subprocess (so each cluster is started by a single-threaded process); its record."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log = base / f"run-{index}.log"
    out = base / f"run-{index}.json"
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        try:
            proc = subprocess.run([sys.executable, "-m", "tools.soak", "--worker", str(index), "--dir", str(base)],
                                  cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=cfg.timeout_s + 120, check=False)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    if out.exists():
        res: dict[str, Any] = json.loads(out.read_text())
        out.unlink()
        if rc == 0:
            log.unlink(missing_ok=True)
        return res
    why = "timed out" if rc is None else f"exited with code {rc}"
    bug = bug_plan(cfg, index)
    return {"index": index, "seed": cfg.first_seed + index, "bug": attrs.asdict(bug) if bug else None,
            "run_dir": str(base / f"run-{index}"), "end": "soak-error", "wall_s": time.monotonic() - t0,
            "evidence": {"worker_log": _file_tail(log, 20)}, "faults": 0, "fault_kinds": {},
            "anomalies": [f"the soak worker {why} without a record (see {log})"], "crashes": [],
            "expected_crashes": [], "violations": 0, "unexplained_violations": 0, "stale_reads": 0,
            "lost_events": 0, "dup_events": 0, "stats": {}}


def progress_line(res: dict[str, Any], done: int, total: int) -> str:
    bug = Bug(**res["bug"]).label() if res.get("bug") else "benign"
    if res.get("bug"):
        bug += f" [{res.get('bug_verdict', '?')}]"
    vt = res.get("vt_ns")
    vt_text = f"vt {vt / 1e6:5.2f} ms" if isinstance(vt, int) else "vt   ?     "
    if res["anomalies"]:
        outcome = "ANOMALY: " + " || ".join(a[:240] for a in res["anomalies"])
    else:
        outcome = "ok"
        if res.get("expected_crashes"):
            outcome += " (expected crash of " + ", ".join(c["dom"] for c in res["expected_crashes"]) + ")"
    tc = res.get("trace_checks", {})
    if res.get("systemic"):
        outcome += (f" [systemic: {tc.get('short_rtts', 0)} short RTTs, {tc.get('descheduled', 0)} stamps while "
                    f"descheduled, {tc.get('faults_after_shutdown', 0)} faults after shutdown]")
    return (f"[{done:>4}/{total}] seed {res['seed']:>4} {res['end']:<8} faults {res.get('faults_injected', 0):>3} "
            f"{vt_text} wall {res.get('wall_s', 0):5.1f} s | {bug} | {outcome}")


ROWS = (
    ("runs", lambda r: 1),
    ("hangs (wall timeout)", lambda r: r["end"] == "hang"),
    ("stuck (idle, domains alive)", lambda r: r["end"] == "stuck"),
    ("hypervisor died", lambda r: r["end"] == "hv-died"),
    ("start failed / soak error", lambda r: r["end"] in ("start-failed", "soak-error")),
    ("unexpected domain crashes", lambda r: len(r.get("crashes", []))),
    ("  by a fault-layer error", lambda r: sum(1 for c in r.get("crashes", [])
                                               if "hypervisor error" in str(c.get("crash")))),
    ("expected crashes (armed bug)", lambda r: len(r.get("expected_crashes", []))),
    ("stale reads", lambda r: r.get("stale_reads", 0)),
    ("lost events", lambda r: r.get("lost_events", 0)),
    ("duplicated events", lambda r: r.get("dup_events", 0)),
    ("checker violations", lambda r: r.get("violations", 0)),
    ("  not from an armed bug", lambda r: r.get("unexplained_violations", 0)),
    ("short ping round trips (< 2 link)", lambda r: r.get("trace_checks", {}).get("short_rtts", 0)),
    ("  runs with short round trips", lambda r: bool(r.get("trace_checks", {}).get("short_rtts", 0))),
    ("ran while descheduled (stamps)", lambda r: r.get("trace_checks", {}).get("descheduled", 0)),
    ("  runs with such stamps", lambda r: bool(r.get("trace_checks", {}).get("descheduled", 0))),
    ("faults acting after shutdown", lambda r: r.get("trace_checks", {}).get("faults_after_shutdown", 0)),
    ("domain build failures", lambda r: sum(1 for c in r.get("crashes", []) if "build failed" in str(c.get("crash")))),
    ("runs with anomalies", lambda r: bool(r["anomalies"])),
    ("faults injected", lambda r: r.get("faults_injected", 0)),
    ("faults refused, domain alive", lambda r: r.get("faults_refused_live", 0)),
)


def summarize(results: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    benign = [r for r in results if not r.get("bug")]
    bugged = [r for r in results if r.get("bug")]
    table = {name: {"benign": sum(int(f(r)) for r in benign), "bug": sum(int(f(r)) for r in bugged),
                    "all": sum(int(f(r)) for r in results)} for name, f in ROWS}
    per_bug: dict[str, dict[str, int]] = {}
    for r in bugged:
        b = per_bug.setdefault(r["bug"]["kind"], Counter())  # type: ignore[arg-type]
        b["armed"] += 1
        b["struck"] += bool(r.get("bug_struck"))
        b[r.get("bug_verdict", "?")] += 1
    walls = [r.get("wall_s", 0.0) for r in results]
    return {"table": table, "bugs": {k: dict(v) for k, v in per_bug.items()}, "wall_s": wall_s,
            "run_wall_s": {"mean": sum(walls) / max(1, len(walls)), "max": max(walls, default=0.0)}}


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'':<32} {'benign':>8} {'bug':>8} {'all':>8}"]
    for name, row in summary["table"].items():
        lines.append(f"{name:<32} {row['benign']:>8} {row['bug']:>8} {row['all']:>8}")
    lines.append("")
    lines.append(f"{'bug':<16} {'armed':>6} {'struck':>7} {'caught':>7} {'missed':>7} {'unobserved':>11} "
                 f"{'not struck':>11}")
    tot: Counter[str] = Counter()
    for kind in BUG_KINDS:
        b = summary["bugs"].get(kind, {})
        tot.update(b)
        lines.append(f"{kind:<16} {b.get('armed', 0):>6} {b.get('struck', 0):>7} {b.get('caught', 0):>7} "
                     f"{b.get('missed', 0):>7} {b.get('unobserved', 0):>11} {b.get('not struck', 0):>11}")
    lines.append(f"{'all':<16} {tot['armed']:>6} {tot['struck']:>7} {tot['caught']:>7} {tot['missed']:>7} "
                 f"{tot['unobserved']:>11} {tot['not struck']:>11}")
    w = summary["run_wall_s"]
    lines.append(f"\nwall: {summary['wall_s']:.0f} s in all, {w['mean']:.1f} s per run on average, {w['max']:.1f} s "
                 "at most")
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    groups: list[list[int]] = []
    for x in sorted(xs):
        if groups and groups[-1][-1] == x - 1:
            groups[-1].append(x)
        else:
            groups.append([x])
    return ", ".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def soak(cfg: Config, base: Path, json_path: Path | None) -> int:
    (base / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
    idx = cfg.indices()
    seeds = (f"seeds {cfg.first_seed}..{cfg.first_seed + cfg.runs - 1}" if not cfg.only
             else f"runs {', '.join(map(str, idx))} (seeds {', '.join(str(cfg.first_seed + i) for i in idx)})")
    print(f"soak: {len(idx)} runs, {cfg.jobs} at a time, {seeds}, "
          f"random faults {cfg.rate}/ms per domain until {cfg.until_ns} ns, a bug every {cfg.bug_every} runs; "
          f"run directories in {base}", flush=True)
    results: list[dict[str, Any]] = []
    systemic_kept: Counter[str] = Counter()  # run directories kept as examples of each systemic issue
    lock = threading.Lock()
    t0 = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=cfg.jobs)
    try:
        futures = [pool.submit(run_worker, cfg, base, i) for i in cfg.indices()]
        for fut in as_completed(futures):
            res = fut.result()
            with lock:
                results.append(res)
                print(progress_line(res, len(results), len(futures)), flush=True)
            run_dir = Path(res["run_dir"])
            examples = [k for k in res.get("systemic", {}) if systemic_kept[k] < SYSTEMIC_EXAMPLES]
            systemic_kept.update(examples)
            if res["anomalies"] or examples or cfg.keep_all:
                why = "" if res["anomalies"] or cfg.keep_all else f" (an example of: {', '.join(examples)})"
                print(f"         kept {run_dir}{why}", flush=True)
                res["kept"] = True
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
    except KeyboardInterrupt:
        print("soak: interrupted; summarising the runs that finished", flush=True)
        pool.shutdown(wait=False, cancel_futures=True)
    else:
        pool.shutdown()
    wall = time.monotonic() - t0
    results.sort(key=lambda r: r["index"])
    summary = summarize(results, wall)
    print()
    print(format_table(summary))
    systemic: dict[str, list[int]] = {}
    for r in results:
        for k in r.get("systemic", {}):
            systemic.setdefault(k, []).append(r["seed"])
    if systemic:
        print("\nsystemic issues (counted above; run directories kept for the first few):")
        for k, hit in systemic.items():
            first = next(r for r in results if k in r.get("systemic", {}))
            print(f"  {k}: {len(hit)} runs, seeds {_ranges(hit)}")
            print(f"      e.g. seed {first['seed']}: {first['systemic'][k]}")
    failing = [r for r in results if r["anomalies"]]
    if failing:
        print(f"\n{len(failing)} runs with anomalies (directories kept):")
        for r in failing:
            print(f"  seed {r['seed']} {r['run_dir']}")
            for a in r["anomalies"]:
                print(f"      {a}")
    if json_path is not None:
        json_path.write_text(json.dumps({"config": cfg.to_dict(), "dir": str(base), "summary": summary,
                                         "runs": results}, indent=1, default=str))
        print(f"\nwrote {json_path}")
    return 1 if failing else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_pos", nargs="?", type=int, metavar="N", help="runs (same as --runs)")
    p.add_argument("--runs", type=int, default=None, help="runs (default 200)")
    p.add_argument("--jobs", type=int, default=2, help="clusters at once (default 2)")
    p.add_argument("--first-seed", type=int, default=0, help="cluster seed of run 0 (default 0)")
    p.add_argument("--rate", type=float, default=3.0, help="random faults per virtual ms per domain (default 3)")
    p.add_argument("--until-ns", type=int, default=2_000_000, help="no random fault after this (default 2 ms)")
    p.add_argument("--kinds", default="", help="comma-separated random fault kinds (default DEFAULT_RANDOM_KINDS)")
    p.add_argument("--bug-every", type=int, default=4, help="every k-th run arms a hypervisor bug; 0: never")
    p.add_argument("--timeout", type=float, default=150.0, help="wall seconds before a run is a hang (default 150)")
    p.add_argument("--ping-rounds", type=int, default=100, help="event-channel round trips (default 100)")
    p.add_argument("--pcpus", type=int, default=4, help="hypervisor.pcpus (default 4)")
    p.add_argument("--dir", type=Path, default=None, help="where the run directories go (default: a new temp dir)")
    p.add_argument("--keep-all", action="store_true", help="keep every run directory, not only failing ones")
    p.add_argument("--json", type=Path, default=None, help="write every run's record and the summary here")
    p.add_argument("--via", choices=("control", "spec"), default="control",
                   help="how the fault schedule reaches the hypervisor: the spec's [[fault]] and [faults] random, "
                        "or the same schedule through Cluster.inject after start (default)")
    p.add_argument("--only", default="", help="comma-separated run indices to run (re-running failing runs)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        return worker_main(a.dir, a.worker)
    runs = a.runs if a.runs is not None else a.runs_pos if a.runs_pos is not None else 200
    cfg = Config(runs=runs, jobs=max(1, a.jobs), first_seed=a.first_seed, rate=a.rate, until_ns=a.until_ns,
                 kinds=tuple(k for k in a.kinds.split(",") if k), bug_every=a.bug_every, timeout_s=a.timeout,
                 ping_rounds=a.ping_rounds, pcpus=a.pcpus, keep_all=a.keep_all, via=a.via,
                 only=tuple(int(i) for i in a.only.split(",") if i.strip()))
    from pvcluster.spec import SpecError, parse_spec

    try:
        for i in cfg.indices()[: max(cfg.bug_every, 1) * len(BUG_KINDS)]:  # every kind of spec, checked once
            parse_spec(spec_text(cfg, i))
    except SpecError as exc:
        p.error(f"the soak spec is invalid: {exc}")
    base = a.dir or Path(tempfile.mkdtemp(prefix="pvsoak-"))
    base.mkdir(parents=True, exist_ok=True)
    return soak(cfg, base.absolute(), a.json)


if __name__ == "__main__":
    sys.exit(main())
