"""Every fault kind through real processes and a real ZeroMQ bus (issue 9): what it does shows in the trace, and
the failure semantics hold (nothing hangs, a dead domain is reclaimed, the others run on with intact traces).

Three clusters carry the scheduled faults ([[fault]] in the spec, so their virtual times are exact): ``benign``
(faults a run survives), ``bugs`` (hypervisor bugs the checker must catch) and ``ending`` (faults that end
domains). Each holds two TLB-shootdown domains sharing pCPUs 0-1 and an event-channel ping-pong pair on pCPUs 2-3.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvcluster.abi.platform import Mark
from pvcluster.check import Report, check_run
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

# Enough shootdown rounds that both shootdown domains outlive the last scheduled fault (2.05 ms).
SD_ROUNDS = 300
BASE = """
[cluster]
name = "{name}"
seed = 3
[hypervisor]
pcpus = 4
[[domain]]
name = "sdx"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown sdrounds={sd_rounds} shutdown=poweroff"
cpus = [0, 1]
[[domain]]
name = "{second}"
vcpus = 2
backend = "{second_backend}"
cmdline = "workload=shootdown sdrounds={sd_rounds} shutdown=poweroff"
cpus = [0, 1]
[[domain]]
name = "srv"
vcpus = 1
backend = "xen"
cmdline = "workload=pingserver peer=4 rounds={rounds} shutdown=poweroff"
cpus = [2, 3]
[[domain]]
name = "cli"
vcpus = 1
backend = "xen"
cmdline = "workload=pingclient peer=3 port=4 rounds={rounds} shutdown=poweroff"
cpus = [2, 3]
""".replace("{sd_rounds}", str(SD_ROUNDS))


def _faults(*faults: dict[str, Any]) -> str:
    out = []
    for f in faults:
        out.append("[[fault]]")
        out += [f"{k} = {json.dumps(v)}" for k, v in f.items()]
    return "\n".join(out) + "\n"


BENIGN = _faults(
    {"kind": "skew", "target": "sdx", "at_ns": 200_000, "offset_ns": 7000, "ppm": 500},
    {"kind": "preempt", "target": "sdx.1", "at_ns": 400_000, "duration_ns": 60_000},
    {"kind": "slow", "target": "sdx.0", "at_ns": 900_000, "factor": 5, "duration_ns": 100_000},
    {"kind": "offline", "target": "sdx.1", "at_ns": 1_300_000},
    {"kind": "online", "target": "sdx.1", "at_ns": 1_400_000},
    {"kind": "pause", "target": "sdn", "at_ns": 500_000, "duration_ns": 80_000},
    {"kind": "pin", "target": "sdn.1", "at_ns": 1_000_000, "pcpu": 0, "duration_ns": 200_000},
    # on the xen domain: its hypercall answers cross the link every round (the native one's IPIs mostly do not)
    {"kind": "partition", "target": "sdx", "at_ns": 1_500_000, "duration_ns": 100_000},
    {"kind": "pause", "target": "sdn", "at_ns": 2_000_000},
    {"kind": "unpause", "target": "sdn", "at_ns": 2_050_000},
    {"kind": "delay", "target": "cli", "at_ns": 300_000, "delay_ns": 20_000, "jitter_ns": 5000, "duration_ns": 200_000},
    {"kind": "drop", "target": "srv", "at_ns": 600_000, "count": 3},
    {"kind": "dup", "target": "cli", "at_ns": 700_000, "count": 3},
    {"kind": "reorder", "target": "srv", "at_ns": 800_000, "count": 2},
    {"kind": "stop", "target": "srv", "at_ns": 1_000_000, "wall_ms": 400},
)
BUGS = _faults(
    {"kind": "skip-flush", "target": "sdx", "at_ns": 500_000, "count": 5},
    {"kind": "delay-flush", "target": "sdy", "at_ns": 500_000, "count": 5, "delay_ns": 30_000},
    {"kind": "corrupt-result", "target": "sdy", "at_ns": 1_500_000},
    {"kind": "lose-event", "target": "cli", "at_ns": 600_000},
    {"kind": "dup-event", "target": "srv", "at_ns": 900_000},
)
ENDING = _faults(
    {"kind": "kill", "target": "srv", "at_ns": 300_000},
    {"kind": "crash", "target": "sdx", "at_ns": 400_000},
    {"kind": "destroy", "target": "sdn", "at_ns": 500_000},
)
# A partition longer than the limit, in a cluster of its own (with a small limit, so the run stays short).
UNREACHABLE = """
[cluster]
name = "unreachable"
seed = 3
[hypervisor]
pcpus = 2
partition_limit_ns = 1000000
[[domain]]
name = "sdp"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown shutdown=poweroff"
[[domain]]
name = "sdq"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown shutdown=poweroff"
cpus = [1]
""" + _faults({"kind": "partition", "target": "sdp", "at_ns": 300_000, "duration_ns": 50_000_000})


class Run:
    """A finished run: final states, consoles, traces by domain name, the fault log and the checker's report."""

    def __init__(self, run_dir: Path, final: dict[str, Any], consoles: dict[str, list[str]]) -> None:
        self.run_dir = run_dir
        self.final = {d["name"]: d for d in final["domains"]}
        self.consoles = consoles
        self.ids = {name: d["domid"] for name, d in self.final.items()}
        self.hv = list(read_events(run_dir / "trace" / "hypervisor.jsonl"))
        self.faults = [json.loads(line) for line in (run_dir / "faults.jsonl").read_text().splitlines()]
        self.report: Report = check_run(run_dir)

    def dom_events(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        path = self.run_dir / "trace" / f"dom{self.ids[name]}-{name}.jsonl"
        return [e for e in read_events(path) if event is None or e["event"] == event]

    def hv_events(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.hv if e.get("dom") == self.ids[name] and (event is None or e["event"] == event)]

    def fault(self, kind: str, target: str) -> dict[str, Any]:
        return next(f for f in self.faults if f["kind"] == kind and f["target"] == target)

    def violations(self, name: str, invariant: str) -> list[Any]:
        return [v for v in self.report.violations if v.dom == self.ids[name] and v.invariant == invariant]


def _run(spec_text: str) -> Iterator[Run]:
    with tempfile.TemporaryDirectory(prefix="pvc-faults-") as d:
        run_dir = Path(d)
        with Cluster.start(parse_spec(spec_text), run_dir=run_dir) as cluster:
            final = cluster.wait(timeout_s=240)
            consoles = {x["name"]: cluster.client.call("console", dom=x["domid"]) for x in final["domains"]}
        yield Run(run_dir, final, consoles)


@pytest.fixture(scope="module")
def benign() -> Iterator[Run]:
    spec = BASE.format(name="benign", second="sdn", second_backend="native", rounds=200) + BENIGN
    yield from _run(spec)


@pytest.fixture(scope="module")
def bugs() -> Iterator[Run]:
    yield from _run(BASE.format(name="bugs", second="sdy", second_backend="xen", rounds=200) + BUGS)


@pytest.fixture(scope="module")
def ending() -> Iterator[Run]:
    yield from _run(BASE.format(name="ending", second="sdn", second_backend="native", rounds=3000) + ENDING)


@pytest.fixture(scope="module")
def unreachable() -> Iterator[Run]:
    yield from _run(UNREACHABLE)


def _runstates(run: Run, name: str, vcpu: int) -> list[dict[str, Any]]:
    return [e for e in run.hv_events(name, "vcpu.runstate") if e["vcpu"] == vcpu]


def _running_between(run: Run, name: str, vcpu: int, start: int, end: int) -> list[dict[str, Any]]:
    return [e for e in _runstates(run, name, vcpu) if e["state"] == "running" and start <= e["vt_ns"] < end]


# -- faults a run survives: every domain still finishes cleanly and the checker finds nothing ---------------------


def test_a_run_under_benign_faults_finishes_clean(benign: Run) -> None:
    for name, d in benign.final.items():
        assert (d["state"], d["shutdown_reason"]) == ("dead", "poweroff"), (name, d, benign.consoles[name][-5:])
    assert benign.report.ok, benign.report.violations
    assert len(benign.faults) == 15 and all(f["origin"] == "spec" for f in benign.faults)
    # every injection is traced with its parameters, and what it did with its outcome
    injected = {e["fid"]: e for e in benign.hv if e["event"] == "fault.inject"}
    outcomes = {e["fid"]: e["outcome"] for e in benign.hv if e["event"] == "fault.outcome"}
    for f in benign.faults:
        assert injected[f["fid"]]["params"] == f["params"] and injected[f["fid"]]["vt_ns"] == f["vt_ns"]
        assert outcomes[f["fid"]] == f["outcome"]
    assert all(f["vt_ns"] >= f["at_ns"] for f in benign.faults)  # a scheduled fault never acts early


def test_preempt_keeps_the_vcpu_off_every_pcpu_for_its_duration(benign: Run) -> None:
    f = benign.fault("preempt", "sdx.1")
    assert f["outcome"] == "vcpu 1 held until 460000"
    assert _running_between(benign, "sdx", 1, f["vt_ns"], 460_000) == []
    # the vCPU stops at its own clock, which may be a little past the instant the fault acted (within one window)
    first = next(e for e in _runstates(benign, "sdx", 1) if e["vt_ns"] >= f["vt_ns"])
    assert (first["why"], first["state"]) == ("preempt (fault)", "runnable")
    assert first["vt_ns"] < f["vt_ns"] + 10_000
    ends = [e for e in benign.hv_events("sdx", "fault.end") if e["fid"] == f["fid"]]
    assert [(e["vt_ns"], e["outcome"]) for e in ends] == [(460_000, "vcpu 1 released")]


def test_offline_holds_the_vcpu_until_online(benign: Run) -> None:
    off, on = benign.fault("offline", "sdx.1"), benign.fault("online", "sdx.1")
    assert off["outcome"] == "vcpu 1 held until brought online" and on["outcome"] == "vcpu 1 released"
    assert _running_between(benign, "sdx", 1, off["vt_ns"], on["vt_ns"]) == []


def test_slow_makes_each_instruction_cost_factor_times_as_much_for_its_duration(benign: Run) -> None:
    f = benign.fault("slow", "sdx.0")
    speeds = [(e["vt_ns"], e["ps_per_instr"]) for e in benign.dom_events("sdx", "vcpu.speed") if e["vcpu"] == 0]
    assert speeds == [(f["vt_ns"], 5000), (1_000_000, 1000)]


def test_pin_keeps_the_vcpu_on_its_pcpu_for_its_duration(benign: Run) -> None:
    f = benign.fault("pin", "sdn.1")
    during = [e["pcpu"] for e in _running_between(benign, "sdn", 1, f["vt_ns"], 1_200_000)]
    assert during and set(during) == {0}
    ends = [e["outcome"] for e in benign.hv_events("sdn", "fault.end") if e["fid"] == f["fid"]]
    assert ends == ["vcpu 1 back on pCPUs [0, 1]"]


def test_pause_with_a_duration_pauses_then_unpauses_and_the_shootdowns_complete(benign: Run) -> None:
    f = benign.fault("pause", "sdn")
    assert f["outcome"] == "paused"
    assert _running_between(benign, "sdn", 0, f["vt_ns"], 580_000) == []
    assert _running_between(benign, "sdn", 1, f["vt_ns"], 580_000) == []
    ends = [(e["vt_ns"], e["outcome"]) for e in benign.hv_events("sdn", "fault.end") if e["fid"] == f["fid"]]
    assert ends == [(580_000, "unpaused")]
    marks = benign.dom_events("sdn", "shootdown.span")
    assert len(marks) == SD_ROUNDS  # every shootdown completed despite the pause and the pin


def test_unpause_ends_a_pause_without_a_duration_even_with_nothing_else_to_run(benign: Run) -> None:
    paused = [f for f in benign.faults if f["kind"] == "pause" and f["params"]["duration_ns"] == 0][0]
    unpause = benign.fault("unpause", "sdn")
    # a paused domain takes part in no window: its unpause acts in a step of its own, on time
    assert (unpause["outcome"], unpause["vt_ns"]) == ("unpaused", 2_050_000)
    assert _running_between(benign, "sdn", 0, paused["vt_ns"], 2_050_000) == []


def test_delay_adds_its_delay_and_jitter_to_every_message_while_it_lasts(benign: Run) -> None:
    delays = benign.hv_events("cli", "link.delay")
    assert delays and all(300_000 <= e["vt_ns"] < 500_000 and 20_000 <= e["delay_ns"] <= 25_000 for e in delays)
    late = [e for e in benign.hv_events("cli", "hypercall") if 300_000 <= e["done_vt_ns"] < 500_000]
    assert late and all(e["arrival_vt_ns"] - e["done_vt_ns"] >= 20_000 for e in late)


def test_drop_retransmits_after_the_timeout_and_the_message_takes_effect_once(benign: Run) -> None:
    drops = benign.hv_events("srv", "link.drop")
    assert len(drops) == 3 and all(e["retransmit_vt_ns"] == e["vt_ns"] + 40_000 for e in drops)
    assert benign.report.stats["events_sent"] == benign.report.stats["events_delivered"]


def test_dup_delivers_twice_and_the_receiver_drops_the_copy(benign: Run) -> None:
    dups = [e["seq"] for e in benign.hv_events("cli", "link.dup")]
    dropped = [e["seq"] for e in benign.dom_events("cli", "link.dup_dropped")]
    assert len(dups) == 3 and sorted(dropped) == sorted(dups)


def test_reorder_holds_a_message_back_and_the_receiver_restores_the_order(benign: Run) -> None:
    reordered = benign.hv_events("srv", "link.reorder")
    assert len(reordered) == 2
    arrivals = [e["arrival_vt_ns"] for e in benign.hv_events("srv", "hypercall") if e["arrival_vt_ns"] is not None]
    assert arrivals == sorted(arrivals)  # nothing overtakes a held message: the sending order is kept


def test_a_partition_within_the_limit_delays_everything_until_it_heals(benign: Run) -> None:
    f = benign.fault("partition", "sdx")
    assert f["outcome"] == "link cut until 1600000"
    cut = benign.hv_events("sdx", "link.partitioned")
    assert cut and all(e["arrival_vt_ns"] >= 1_600_000 for e in cut)
    assert benign.final["sdx"]["state"] == "dead"


def test_stop_suspends_the_process_for_wall_time_without_moving_virtual_time(benign: Run) -> None:
    f = benign.fault("stop", "srv")
    assert f["outcome"] == "process stopped for 400 ms of wall time"
    assert benign.final["srv"]["shutdown_reason"] == "poweroff"
    assert "pingserver: echoed 200 events, lost 0" in benign.consoles["srv"]


def test_skew_moves_only_the_system_time_the_domain_reads(benign: Run) -> None:
    assert [(e["offset_ns"], e["ppm"]) for e in benign.dom_events("sdx", "clock.skew")] == [(7000, 500)]


# -- hypervisor bugs: each is caught by the checker ----------------------------------------------------------------


def test_skip_flush_is_caught_as_stale_reads_and_unapplied_flushes(bugs: Run) -> None:
    assert bugs.report.stats["bug_skip_flush"] == 5
    assert bugs.violations("sdx", "stale-tlb-read")
    unapplied = [v for v in bugs.violations("sdx", "effects-applied") if "never applied" in v.detail]
    assert len(unapplied) == 5 and all(v.span.startswith("hc-") for v in unapplied)


def test_delay_flush_is_caught_as_flushes_applied_after_the_answer(bugs: Run) -> None:
    late = [v for v in bugs.violations("sdy", "effects-applied") if "applied only at" in v.detail]
    assert len(late) == 5


def test_corrupt_result_is_caught_as_a_result_the_guest_got_wrong(bugs: Run) -> None:
    [v] = [v for v in bugs.violations("sdy", "effects-applied") if "corrupted" in v.detail]
    [e] = bugs.hv_events("sdy", "fault.corrupt_result")
    assert v.span == e["span"] and e["delivered"] == e["decided"] ^ 0xFFFFFFFF


def test_lose_event_is_caught_as_an_event_never_delivered(bugs: Run) -> None:
    [e] = bugs.hv_events("cli", "fault.lose_event")
    [v] = bugs.violations("cli", "event-delivered-once")
    assert v.eid == e["eid"] and "never delivered" in v.detail


def test_dup_event_is_caught_as_an_event_delivered_twice(bugs: Run) -> None:
    [e] = bugs.hv_events("srv", "fault.dup_event")
    [v] = bugs.violations("srv", "event-delivered-once")
    assert v.eid == e["eid"] and "delivered 2 times" in v.detail


# -- faults that end a domain: the others run on, nothing hangs, the dead one is reclaimed -----------------------


def test_kill_ends_the_domain_and_its_peer_blocked_on_the_port_is_woken_with_it_closed(ending: Run) -> None:
    srv = ending.final["srv"]
    assert srv["state"] == "crashed" and "killed by fault" in srv["crash"]
    [exit_] = ending.hv_events("srv", "domain.process_exit")
    assert exit_["returncode"] == -9
    # the client, polling for an echo, is woken by the server's end closing and sees its port unbound
    # (its port 4: 1 and 2 are its xenstore and console rings', 3 its IPI port)
    assert [e["port"] for e in ending.hv_events("cli", "evtchn.peer_closed")] == [4]
    assert any("peer closed: port 4 status 1" in line for line in ending.consoles["cli"]), ending.consoles["cli"]
    assert ending.final["cli"]["state"] == "dead"
    # what the dead domain held is reclaimed
    assert (srv["ports_open"], srv["frames_pinned"]) == (0, 0)


def test_crash_ends_the_domain_as_a_guest_crash_would(ending: Run) -> None:
    sdx = ending.final["sdx"]
    assert (sdx["state"], sdx["shutdown_reason"]) == ("crashed", "crash")
    assert ending.fault("crash", "sdx")["outcome"] == "crashed (SHUTDOWN_crash)"
    assert (sdx["ports_open"], sdx["frames_pinned"]) == (0, 0)


def test_destroy_ends_the_domain_and_the_other_domains_run_to_the_end(ending: Run) -> None:
    assert ending.final["sdn"]["state"] == "dead"
    assert ending.hv_events("sdn", "domain.destroy")
    assert ending.report.ok, ending.report.violations
    # the survivors' traces are intact to the last line: each ends with the domain's own stop
    assert ending.dom_events("cli")[-1]["event"] == "domain.stop"


def test_a_partition_longer_than_the_limit_ends_the_domain_as_unreachable(unreachable: Run) -> None:
    f = unreachable.fault("partition", "sdp")
    assert "longer than partition_limit_ns (1000000)" in f["outcome"]
    sdp = unreachable.final["sdp"]
    assert sdp["state"] == "crashed" and "unreachable" in sdp["crash"]
    assert sdp["ended_vt_ns"] == 1_300_000
    # its shootdown in flight never completes, and nothing waits for it: the other domain finished
    assert unreachable.final["sdq"]["state"] == "dead"
    assert unreachable.report.ok, unreachable.report.violations


# -- causality under link faults ------------------------------------------------------------------------------------

JITTERY = """
[cluster]
name = "jittery"
seed = {seed}
[hypervisor]
pcpus = 2
[[domain]]
name = "srv"
backend = "xen"
cmdline = "workload=pingserver peer=2 rounds=60 shutdown=poweroff"
[[domain]]
name = "cli"
backend = "xen"
cmdline = "workload=pingclient peer=1 port=4 rounds=60 shutdown=poweroff"
""" + _faults({"kind": "delay", "target": "srv", "at_ns": 100_000, "delay_ns": 10_000, "jitter_ns": 12_000,
               "duration_ns": 2_000_000})


@pytest.mark.parametrize("seed", [3, 11])
def test_no_echo_beats_two_link_crossings_under_a_jittery_link(seed: int) -> None:
    """The server's hypercall results and its events cross a delayed, jittery link: it often runs when the next ping
    arrives, so it must not see that ping before its arrival (seed 11 did when a delivery was applied at the window's
    start; seed 3 when a vCPU resumed, in a later sub-step, at a time before a delivery already applied)."""
    for run in _run(JITTERY.format(seed=seed)):
        link_ns = 10_000  # hypervisor.cost.link_ns: a ping and its echo each cross from one domain to the other
        sent: dict[int, int] = {}
        rtts = []
        for e in run.dom_events("cli", "guest.mark"):
            if e["code"] == Mark.PING_SENT:
                sent[e["round"]] = e["vt_ns"]
            elif e["code"] == Mark.PING_ECHO:
                rtts.append(e["vt_ns"] - sent[e["round"]])
        assert len(rtts) == 60 and min(rtts) >= 2 * link_ns, sorted(rtts)[:3]
        assert run.report.ok, run.report.violations
