"""The simulation core in-process: no processes, no sockets. The scheduler, the clock's windows and sub-steps, the
wake-up rules, per-domain random streams, determinism, and independence from unrelated domains, driven through
``tests/fakes.py`` (scripted vCPUs that trap with real hypercalls)."""

from __future__ import annotations

import struct
from typing import Any

import attrs
from fakes import Cluster, Op, block_op, shutdown_op, version_op
from helpers import RecordingLog

from hypervisor import faults
from hypervisor.core import Hypervisor
from hypervisor.vcpu import RunState
from pvcluster.abi.xen import Hypercall, VcpuOp
from pvcluster.bus.messages import Build, Hello, Region
from pvcluster.spec import DOMAIN_FAULTS, IDENT_FAULT, ClusterSpec, parse_spec

CTX = 0x2000
EVT = 0x3000
# The port _bind_ipi gets: the first free one, 1 and 2 being the xenstore and console rings' (allocated before the
# build: hypervisor/backends.py).
IPI_PORT = 3


def _spec(seed: int = 7, pcpus: int = 2, extra: str = "", slice_ns: int = 30000) -> ClusterSpec:
    return parse_spec(f"""
[cluster]
name = "core"
seed = {seed}
[hypervisor]
pcpus = {pcpus}
slice_ns = {slice_ns}
[[domain]]
name = "alpha"
vcpus = 2
[[domain]]
name = "beta"
vcpus = 2
{extra}
""")


def _up(vid: int) -> list[Op]:
    return [("hc", Hypercall.vcpu_op, [VcpuOp.initialise, vid, CTX, 0, 0], [Region(CTX, 2800, bytes(2800), False)]),
            ("hc", Hypercall.vcpu_op, [VcpuOp.up, vid, 0, 0, 0], [])]


def _bind_ipi(vcpu: int) -> Op:
    return ("hc", Hypercall.event_channel_op, [7, EVT, 0, 0, 0], [Region(EVT, 8, struct.pack("<II", vcpu, 0), True)])


def _send(port: int) -> Op:
    return ("hc", Hypercall.event_channel_op, [4, EVT, 0, 0, 0], [Region(EVT, 4, struct.pack("<I", port), False)])


def _ping_programs(rounds: int, compute: int) -> list[list[Op]]:
    """vCPU 0 wakes vCPU 1 with an event-channel IPI each round; vCPU 1 blocks between rounds."""
    boss: list[Op] = [("compute", 2000), *_up(1), _bind_ipi(1)]
    for r in range(rounds):
        boss += [("compute", compute + 37 * r), _send(IPI_PORT), version_op()]
    boss += [("compute", 20_000), shutdown_op()]
    worker: list[Op] = []
    for _ in range(rounds + 1):
        worker += [("compute", 1500), version_op(), block_op()]
    return [boss, worker]


def _run(spec: ClusterSpec, rounds: int = 30, extra: dict[str, list[list[Op]]] | None = None) -> RecordingLog:
    log = RecordingLog()
    programs = {"alpha": _ping_programs(rounds, 3000), "beta": _ping_programs(rounds, 4100), **(extra or {})}
    Cluster(spec, programs, log).run()
    return log


def _virtual(log: RecordingLog, doms: set[int] | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [(e, kw) for e, kw in log.events if doms is None or kw.get("dom") in doms]


# -- determinism ------------------------------------------------------------------------------------------------


def test_same_seed_same_trace() -> None:
    """Two runs of the whole core in-process (about 60 ms for both here): event for event the same."""
    a, b = _run(_spec(seed=7)), _run(_spec(seed=7))
    assert len(a.events) > 250
    assert a.events == b.events
    assert sum(1 for e, _ in a.events if e == "hypercall") > 150


def test_another_seed_changes_timings_not_what_each_vcpu_asked() -> None:
    a, c = _run(_spec(seed=7)), _run(_spec(seed=8))
    hc_a = [kw for e, kw in a.events if e == "hypercall"]
    hc_c = [kw for e, kw in c.events if e == "hypercall"]
    assert [h["done_vt_ns"] for h in hc_a] != [h["done_vt_ns"] for h in hc_c]
    per_vcpu = lambda hcs: sorted((h["dom"], h["vcpu"], h["span"], h["name"], h["args"]) for h in hcs)  # noqa: E731
    assert per_vcpu(hc_a) == per_vcpu(hc_c)


def test_each_domain_draws_from_its_own_random_stream() -> None:
    """The jitter a domain's hypercalls get depends on the seed and the domain's name only."""
    hv1 = Hypervisor(_spec(seed=3), RecordingLog())
    hv2 = Hypervisor(_spec(seed=3), RecordingLog())
    a1 = hv1.create_domain(_spec().domains[0])
    hv2.create_domain(attrs.evolve(_spec().domains[0], name="zeta"))
    a2 = hv2.create_domain(_spec().domains[0])
    assert a1.domid != a2.domid
    assert [a1.rng.random() for _ in range(5)] == [a2.rng.random() for _ in range(5)]


# -- the scheduler ---------------------------------------------------------------------------------------------


def test_round_robin_gives_every_vcpu_its_turn_and_traces_each_change() -> None:
    spec = _spec(pcpus=1, slice_ns=30_000)
    busy: list[Op] = [("compute", 400_000), shutdown_op()]
    log = RecordingLog()
    programs = {"alpha": [busy, [("compute", 1)]], "beta": [busy, [("compute", 1)]]}
    Cluster(spec, programs, log).run()
    runs = [(kw["dom"], kw["vcpu"], kw["vt_ns"]) for e, kw in log.events
            if e == "vcpu.runstate" and kw["state"] == "running"]
    # one pCPU: alpha and beta's vCPU 0 alternate, a slice each, in a fixed order
    assert [d for d, _, _ in runs[:6]] == [1, 2, 1, 2, 1, 2]
    assert all(b[2] - a[2] == 30_000 for a, b in zip(runs[1:6], runs[2:7], strict=False))
    changes = [kw for e, kw in log.events if e == "vcpu.runstate"]
    assert all(kw["duration_ns"] >= 0 and kw["why"] for kw in changes)
    assert any(kw["why"] == "slice used up" for kw in changes)


def test_a_vcpu_only_runs_on_its_domains_pcpus() -> None:
    spec = _spec(pcpus=3)
    spec = attrs.evolve(spec, domains=(attrs.evolve(spec.domains[0], cpus=(2,)), spec.domains[1]))
    log = _run(spec, rounds=5)
    alpha = {kw["pcpu"] for e, kw in log.events if e == "vcpu.runstate" and kw["dom"] == 1
             and kw["state"] == "running"}
    beta = {kw["pcpu"] for e, kw in log.events if e == "vcpu.runstate" and kw["dom"] == 2
            and kw["state"] == "running"}
    assert alpha == {2} and beta <= {0, 1, 2}


# -- the clock ---------------------------------------------------------------------------------------------------


def test_a_result_that_lands_inside_the_window_runs_on_in_the_same_window() -> None:
    """A vCPU making hypercalls back to back loses no virtual time to window boundaries: between two traps lie
    exactly the compute time and the hypercall's cost."""
    spec = parse_spec("""
[cluster]
name = "substep"
[hypervisor.cost]
hypercall_jitter_ns = 0
[[domain]]
name = "alpha"
""")
    prog: list[Op] = []
    for _ in range(50):
        prog += [("compute", 100), version_op()]
    prog.append(shutdown_op())
    log = RecordingLog()
    windows = Cluster(spec, {"alpha": [prog]}, log).run()
    traps = [kw["vt_ns"] for e, kw in log.events if e == "hypercall" and kw["name"] == "xen_version"]
    gaps = {b - a for a, b in zip(traps, traps[1:], strict=False)}
    assert gaps == {100 + spec.hypervisor.cost.hypercall_ns}
    assert windows >= 50  # one sub-step per hypercall: the guest still waits for each result


def test_a_blocked_vcpu_wakes_at_the_event_not_at_the_window() -> None:
    log = RecordingLog()
    Cluster(_spec(pcpus=4), {"alpha": _ping_programs(10, 20_000), "beta": _ping_programs(10, 20_000)}, log).run()
    sends = [kw for e, kw in log.events if e == "hypercall" and kw["dom"] == 1 and kw["name"] == "event_channel_op"
             and kw["args"][0] == 4]
    wakes = [kw for e, kw in log.events if e == "vcpu.runstate" and kw["dom"] == 1 and kw["vcpu"] == 1
             and kw["previous"] == "blocked" and kw["state"] == "runnable"]
    assert len(sends) == 10 and len(wakes) == 10
    done_times = [s["done_vt_ns"] for s in sends]
    for w in wakes:
        assert w["vt_ns"] in done_times  # woken when the send that woke it completed, not at a window boundary


def test_an_idle_cluster_opens_no_window_and_says_so() -> None:
    spec = _spec()
    log = RecordingLog()
    sleeper: list[Op] = [("compute", 1000), block_op()]
    c = Cluster(spec, {"alpha": [sleeper, []], "beta": [sleeper, []]}, log)
    c.run()
    assert c.hv.idle
    assert any(kw.get("text", "").endswith("the cluster is idle") for e, kw in log.events if e == "dmesg")
    assert all(v.runstate is RunState.BLOCKED for v in c.hv.domains.get(1).vcpus[:1])  # type: ignore[union-attr]


# -- independence ------------------------------------------------------------------------------------------------


def test_a_domains_trace_does_not_change_when_an_unrelated_pinned_domain_is_added() -> None:
    base = _spec(pcpus=3)
    pinned = tuple(attrs.evolve(d, cpus=(0, 1)) for d in base.domains)
    without = attrs.evolve(base, domains=pinned)
    gamma = attrs.evolve(base.domains[0], name="gamma", cpus=(2,))
    with_gamma = attrs.evolve(base, domains=(*pinned, gamma))
    noisy: list[Op] = []
    for r in range(40):
        noisy += [("compute", 777 + 13 * r), version_op(), _send(IPI_PORT)]
    noisy.append(shutdown_op())
    a = _run(without)
    b = _run(with_gamma, extra={"gamma": [noisy, [block_op()]]})
    assert any(kw.get("dom") == 3 for _, kw in b.events)
    assert _virtual(a, {1, 2}) == _virtual(b, {1, 2})


# -- faults ------------------------------------------------------------------------------------------------------


def test_every_fault_the_spec_accepts_has_an_injection_point() -> None:
    assert set(faults.KINDS) == {*DOMAIN_FAULTS, IDENT_FAULT}
    parsed = faults.parse(("skip-flush", "ident=0x0000dead"))
    assert [(f.kind, f.point, f.value) for f in parsed] == [
        ("skip-flush", faults.Point.HYPERCALL, None), ("ident", faults.Point.BUILD, 0xDEAD)]


def test_the_ident_fault_acts_at_the_build_point_and_is_traced() -> None:
    log = RecordingLog()
    spec = _spec()
    spec = attrs.evolve(spec, domains=(attrs.evolve(spec.domains[0], faults=("ident=0x0000dead",)), spec.domains[1]))
    hv = Hypervisor(spec, log)
    doms = [hv.create_domain(d) for d in spec.domains]
    for d in doms:
        hv.receive(d, Hello(pid=0))
    builds = {dom.name: msg for dom, msg in hv.outbox if isinstance(msg, Build)}
    assert builds["alpha"].start_info_ident == 0xDEAD and builds["beta"].start_info_ident is None
    assert [kw for e, kw in log.events if e == "fault.ident"] == [{"dom": 1, "vt_ns": 0, "ident": 0xDEAD}]


def test_no_hypercall_is_stamped_while_its_vcpu_holds_no_pcpu() -> None:
    """A vCPU leaves its pCPU at its own clock, never before it: one preempted in a later sub-step of a window (a
    vCPU it woke needs the pCPU) has already trapped at times after the window's start."""
    log = RecordingLog()
    programs = {"alpha": _ping_programs(20, 15_000), "beta": [[shutdown_op()], [("compute", 1)]]}
    Cluster(_spec(pcpus=1, slice_ns=10_000), programs, log).run()
    states: dict[tuple[int, int], list[tuple[int, str, str]]] = {}
    for e, kw in log.events:
        if e == "vcpu.runstate":
            states.setdefault((kw["dom"], kw["vcpu"]), []).append((kw["vt_ns"], kw["state"], kw["why"]))
    for changes in states.values():
        changes.sort(key=lambda c: c[0])
    bad = []
    for e, kw in log.events:
        if e == "hypercall":
            changes = states[(kw["dom"], kw["vcpu"])]
            # running on [from, to]: a stamp at the instant it got or left its pCPU is fine
            before = [c for c in changes if c[0] < kw["vt_ns"]]
            upto = [c for c in changes if c[0] <= kw["vt_ns"]]
            if before and before[-1][1] != "running" and upto[-1][1] != "running":
                bad.append((kw["dom"], kw["vcpu"], kw["name"], kw["vt_ns"], before[-1]))
    assert bad == [], bad[:3]
    assert sum(1 for c in states[(1, 0)] if c[2] == "slice used up") >= 5
