"""`pvcluster top`: the frame it builds from the traces (hand-made runs), its incremental reading, `--once` on a run
with no cluster, and end to end on real clusters: one frame, one JSON frame, and the live view ending by itself when
the cluster ends and on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli, wait_until
from runfiles import SyntheticRun

from pvcluster import cli
from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.top import RATE_WINDOW_NS, TraceFollower, TraceState, frame

RUN_STATES = {"running", "runnable", "blocked", "offline"}


def _runstate(run: SyntheticRun, dom: int, vcpu: int, vt_ns: int, state: str, pcpu: int | None) -> None:
    run.hyp("vcpu.runstate", vt_ns, dom=dom, vcpu=vcpu, state=state, previous="?", duration_ns=0, why="test",
            pcpu=pcpu)


def _finished_run(root: Path) -> SyntheticRun:
    """alpha: two shootdowns done, a third requested and never done, a stale read, still running at the end of the
    trace; beta: shut down. One preempt fault that ended, one that did not."""
    run = SyntheticRun(root)
    run.start()
    _runstate(run, 1, 0, 1_000, "running", 0)
    _runstate(run, 1, 1, 1_000, "running", 1)
    _runstate(run, 2, 0, 1_000, "runnable", None)
    run.shootdown(1, 1, 10_000)
    run.shootdown(1, 2, 20_000, stale=True)
    run.dom(1, "guest.mark", 30_000, vcpu=1, code=1, round=3, span="sd-d1-r3")
    _runstate(run, 1, 1, 31_000, "blocked", 1)  # pcpu here is the one it left
    run.hypercall(1, 1, 32_000)
    run.hypercall(2, 1, 33_000)
    run.fault(1, "preempt", "alpha", 35_000, outcome="vcpu 1 held until 45000")
    run.hyp("fault.end", 45_000, dom=1, fid=1, kind="preempt", target="alpha.1", outcome="vcpu 1 released")
    run.fault(2, "partition", "beta", 50_000, outcome="link cut")
    run.shutdown(2, 2, 60_000)
    _runstate(run, 2, 0, 60_000, "offline", 0)
    return run


def test_a_frame_from_the_traces_alone(tmp_path: Path) -> None:
    run = _finished_run(tmp_path)
    run.write()
    follower = TraceFollower(tmp_path)
    follower.poll()
    f = frame(tmp_path, follower.state, None)
    assert not f["running"] and f["window"] is None and f["vt_ns"] == 60_000
    alpha, beta = f["domains"]
    assert (alpha["domid"], alpha["name"], alpha["state"], alpha["vcpus"]) == (1, "alpha", "running", 2)
    assert (beta["name"], beta["state"], beta["reason"]) == ("beta", "dead", "poweroff")
    assert alpha["vcpu_states"] == [
        {"vcpu": 0, "state": "running", "pcpu": 0, "since_vt_ns": 1_000},
        {"vcpu": 1, "state": "blocked", "pcpu": None, "since_vt_ns": 31_000},
    ]
    assert [v["state"] for v in beta["vcpu_states"]] == ["offline", "offline"]
    assert (alpha["shootdowns_done"], alpha["stale_reads"], alpha["shootdowns_in_flight"]) == (2, 1, 1)
    assert alpha["oldest_in_flight_vt_ns"] == 30_000
    assert (alpha["hypercalls"], beta["hypercalls"], f["hypercalls"]["total"]) == (1, 2, 3)
    assert f["hypercalls"]["per_wall_s"] > 0 and f["hypercalls"]["per_virtual_ms"] > 0
    assert f["faults"] == [
        {"fid": 1, "kind": "preempt", "target": "alpha", "vt_ns": 35_000,
         "outcome": "vcpu 1 held until 45000; vcpu 1 released", "end_vt_ns": 45_000},
        {"fid": 2, "kind": "partition", "target": "beta", "vt_ns": 50_000, "outcome": "link cut", "end_vt_ns": None},
    ]


def test_a_frame_of_a_running_cluster_takes_its_domains_from_the_status(tmp_path: Path) -> None:
    run = _finished_run(tmp_path)
    run.write()
    follower = TraceFollower(tmp_path)
    follower.poll()
    summary = {"shutdown_reason": None, "crash": "", "hypercalls": 7}
    status = {"vt_ns": 70_000, "window": 7, "domains": [
        {"domid": 1, "name": "alpha", "state": "paused", "vcpus": 2, **summary},
        {"domid": 3, "name": "gamma", "state": "building", "vcpus": 1, **summary},  # nothing traced yet
    ]}
    f = frame(tmp_path, follower.state, status)
    assert f["running"] and (f["vt_ns"], f["window"]) == (70_000, 7)
    alpha, gamma = f["domains"]
    assert (alpha["state"], alpha["reason"], alpha["hypercalls"]) == ("paused", None, 7)
    assert alpha["shootdowns_in_flight"] == 1
    assert gamma["vcpu_states"] == [{"vcpu": 0, "state": "offline", "pcpu": None, "since_vt_ns": None}]
    assert f["hypercalls"]["total"] == 14
    # running, but no answer yet: the domains as the traces have them
    f = frame(tmp_path, follower.state, None, running=True)
    assert f["running"] and [d["name"] for d in f["domains"]] == ["alpha", "beta"]


def test_a_domain_that_ends_has_no_shootdown_in_flight() -> None:
    state = TraceState()
    state.feed({"event": "guest.mark", "proc": "dom1", "dom": 1, "vcpu": 0, "vt_ns": 5, "code": 1, "round": 7})
    state.feed({"event": "domain.crash", "proc": "hypervisor", "dom": 1, "vt_ns": 9, "detail": "stale read"})
    dom = state.domains[1]
    assert (dom.state, dom.reason, dom.in_flight) == ("crashed", "stale read", {})


def test_rates_count_the_last_wall_window_only() -> None:
    state = TraceState()
    second = 1_000_000_000
    for i in range(10):  # one hypercall every 0.5 wall s and every 1000 virtual ns; the first 6 fall out
        state.feed({"event": "hypercall", "proc": "hypervisor", "dom": 1 + i % 2, "vcpu": 0, "vt_ns": i * 1000,
                    "nr": 29, "name": "sched_op", "result": 0, "done_vt_ns": i * 1000, "wall_ns": i * second // 2})
    per_s, per_vms, per_dom = state.rates(now_wall_ns=9 * second // 2)
    in_window = RATE_WINDOW_NS // (second // 2) + 1  # the window's both ends are in it
    assert per_s == pytest.approx(in_window / 2.0)
    assert per_vms == pytest.approx(in_window / ((in_window - 1) * 1000 / 1e6))
    assert sum(n for n, _ in per_dom.values()) == pytest.approx(per_s)
    state.sample(8 * second, 10_000)  # nothing traced for a while: no hypercall left in the window
    assert state.rates(now_wall_ns=8 * second)[:2] == (0.0, 0.0)


def test_each_poll_reads_only_what_was_written_since(tmp_path: Path) -> None:
    run = _finished_run(tmp_path)
    run.write()
    follower = TraceFollower(tmp_path)
    follower.poll()
    follower.poll()  # nothing new: nothing counted twice
    assert follower.state.domains[1].shootdowns_done == 2
    dom_file = run.dom_path(1)
    extra = {"proc": "dom1", "dom": 1, "vt_ns": 70_000, "vcpu": 1, "code": 2, "round": 3, "event": "guest.mark",
             "level": "info", "wall_ns": 1}
    line = json.dumps(extra, separators=(",", ":"))
    with open(dom_file, "a") as fh:
        fh.write(line[:20])  # a line still being written is left for the next poll
    follower.poll()
    assert follower.state.domains[1].in_flight == {3: 30_000}
    with open(dom_file, "a") as fh:
        fh.write(line[20:] + "\n")
    follower.poll()
    assert follower.state.domains[1].in_flight == {}
    assert follower.state.domains[1].shootdowns_done == 3


def test_once_on_a_run_without_a_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _finished_run(tmp_path).write()
    assert cli.main(["top", "--once", "--json", "--run-dir", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert not data["running"] and [d["name"] for d in data["domains"]] == ["alpha", "beta"]
    assert cli.main(["top", "--once", "--run-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "not running" in text and "alpha" in text and "preempt" in text
    # the live view shows the same frame and says so, without waiting for anything
    assert cli.main(["top", "--run-dir", str(tmp_path)]) == 0
    assert "no cluster is running" in capsys.readouterr().out


def test_top_needs_a_cluster_or_its_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["top", "--once", "--run-dir", str(tmp_path)]) == 1
    assert "no cluster is running" in capsys.readouterr().err
    assert cli.main(["top", "--json", "--run-dir", str(tmp_path)]) == 2
    assert cli.main(["top", "--interval", "0", "--run-dir", str(tmp_path)]) == 2


def test_help_explains_each_column() -> None:
    text = run_cli("top", "--help").stdout
    for column in ("ID, Name", "State", "vCPUs", "Hcalls", "Hc/s", "Hc/vms", "SD done", "SD flight", "vCPU states",
                   "--interval", "--once", "--json"):
        assert column in text, column


# -- real clusters ---------------------------------------------------------------------------------------------------

SHOOT_THEN_SPIN = "workload=shootdown workload=forever"  # 40 shootdown rounds, then vCPU 0 spins for good
SPEC = f"""
[cluster]
name = "top"
[hypervisor]
pcpus = 6
[[domain]]
name = "spin"
vcpus = 2
cmdline = "workload=forever"
[[domain]]
name = "nat"
vcpus = 2
backend = "native"
cmdline = "{SHOOT_THEN_SPIN}"
[[domain]]
name = "pv"
vcpus = 2
backend = "xen"
cmdline = "{SHOOT_THEN_SPIN}"
"""


def _spinning(cluster: Cluster, name: str) -> bool:
    return any("spinning forever" in line for line in cluster.client.call("console", dom=name))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_once_shows_a_running_cluster(run_dir: Path) -> None:
    with Cluster.start(parse_spec(SPEC), run_dir=run_dir / "c") as cluster:
        wait_until(lambda: all(_spinning(cluster, n) for n in ("spin", "nat", "pv")), timeout=120)
        fault = cluster.inject("preempt", "spin.1", duration_ns=50_000)
        cluster.wait_for("fault.end", fid=fault["fid"])
        rd = str(cluster.run_dir)

        shown = run_cli("top", "--once", "--run-dir", rd)
        assert shown.returncode == 0, shown.stderr
        for text in ("running", "spin", "nat", "pv", "SD done", "preempt", "spin.1"):
            assert text in shown.stdout, (text, shown.stdout)

        got = run_cli("top", "--once", "--json", "--run-dir", rd)
        assert got.returncode == 0, got.stderr
        data: dict[str, Any] = json.loads(got.stdout)
    assert data["running"] and data["window"] > 0 and data["vt_ns"] > 0
    doms = {d["name"]: d for d in data["domains"]}
    assert list(doms) == ["spin", "nat", "pv"]
    assert all(d["state"] == "running" and d["vcpus"] == 2 for d in doms.values())
    states = [v for d in doms.values() for v in d["vcpu_states"]]
    assert len(states) == 6 and {v["state"] for v in states} <= RUN_STATES
    assert any(v["state"] == "running" and v["pcpu"] in (0, 1) for v in states)
    for name in ("nat", "pv"):
        assert (doms[name]["shootdowns_done"], doms[name]["shootdowns_in_flight"]) == (40, 0)
        assert doms[name]["hypercalls"] > 0 and doms[name]["stale_reads"] == 0
    assert data["hypercalls"]["total"] == sum(d["hypercalls"] for d in doms.values()) > 0
    assert data["hypercalls"]["per_wall_s"] >= 0 and data["hypercalls"]["per_virtual_ms"] is not None
    assert [(f["fid"], f["kind"], f["target"]) for f in data["faults"]] == [(fault["fid"], "preempt", "spin.1")]
    assert data["faults"][0]["end_vt_ns"] > data["faults"][0]["vt_ns"]


LIVE_SPEC = """
[cluster]
name = "toplive"
[[domain]]
name = "spin"
vcpus = 2
cmdline = "workload=forever"
"""


def _top(rd: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pvcluster.cli", "top", "--interval", "0.1", "--run-dir", rd],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal: a suite started in the background passes SIGINT on ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - before exec only
    )


def _status_requests(cluster: Cluster) -> int:
    return len(cluster.events("control.request", cmd="status"))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_live_view_ends_with_the_cluster_and_on_ctrl_c(run_dir: Path) -> None:
    spec = parse_spec(LIVE_SPEC)
    cluster = Cluster.start(spec, run_dir=run_dir / "c")
    tops: list[subprocess.Popen[str]] = []
    try:
        rd = str(cluster.run_dir)
        seen = _status_requests(cluster)
        tops.append(_top(rd))
        wait_until(lambda: _status_requests(cluster) > seen + 1, timeout=60)  # its first frame is up, it refreshes
        tops[0].send_signal(signal.SIGINT)
        out, err = tops[0].communicate(timeout=60)
        assert tops[0].returncode == 0, err
        assert "top interrupted" in out and "spin" in out

        seen = _status_requests(cluster)
        tops.append(_top(rd))
        wait_until(lambda: _status_requests(cluster) > seen, timeout=60)
        cluster.down()
        out, err = tops[1].communicate(timeout=60)
        assert tops[1].returncode == 0, err
        assert f"the cluster in {rd} ended" in out
    finally:
        cluster.down()
        for p in tops:
            if p.poll() is None:
                p.kill()
                p.communicate()
