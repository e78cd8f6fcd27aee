"""Joining, end to end on one host over ipc: a "remote" domain is started by someone other than the hypervisor (here
the test, through `pvcluster join`), a claim the hypervisor cannot grant is refused with its reason, and a declared
domain that nobody joins as is ended after hypervisor.join_timeout_s, traced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = pytest.mark.slow

SPEC = """
[cluster]
name = "join"
[hypervisor]
join_timeout_s = {timeout}
[[domain]]
name = "here"
backend = "xen"
cmdline = "workload=shootdown sdrounds=20 shutdown=poweroff"
[[domain]]
name = "away"
backend = "xen"
cmdline = "workload=shootdown sdrounds=20 shutdown=poweroff"
placement = "remote"
"""


def join(run_dir: Path, name: str, wait_s: float = 20) -> subprocess.CompletedProcess[str]:
    info = json.loads((run_dir / "hypervisor.json").read_text())
    return subprocess.run([sys.executable, "-m", "pvcluster.cli", "join", name, "--endpoint", info["bus"],
                           "--trace-dir", str(run_dir / "trace"), "--join-wait", str(wait_s)],
                          capture_output=True, text=True, timeout=120)


def events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl") if e["event"] == event]


def test_a_remote_domain_runs_once_its_process_joins_and_a_second_claim_is_refused(run_dir: Path) -> None:
    with Cluster.start(parse_spec(SPEC.format(timeout=120)), run_dir=run_dir / "c") as cluster:
        rd = cluster.run_dir
        # virtual time waits for the declared domain: nothing has run yet, however long it takes to join
        assert cluster.status()["vt_ns"] == 0
        # a name nobody declared: asked again and again until the process's wait is over
        impostor = join(rd, "nosuch", wait_s=1.5)
        assert impostor.returncode == 6
        assert "answers, but within 1.5 s: no domain named 'nosuch' was declared" in impostor.stderr
        joined = join(rd, "away")  # runs the domain to its end
        assert joined.returncode == 0, joined.stderr
        final = cluster.wait(timeout_s=120)
        assert [(d["name"], d["state"]) for d in final["domains"]] == [("here", "dead"), ("away", "dead")]
        assert [e["placement"] for e in events(rd, "domain.joined")] == ["local", "remote"]
        exits = {e["dom"]: e["returncode"] for e in events(rd, "domain.process_exit")}
        assert exits == {1: 0, 2: 0}  # the remote one's code came in its goodbye
        again = join(rd, "away", wait_s=1.5)  # a finished domain cannot be claimed again
        assert again.returncode == 6 and "no domain named 'away'" in again.stderr, again.stderr
        assert (rd / "trace" / "dom2-away.jsonl").exists()


def test_a_declared_domain_nobody_joins_as_is_ended_after_the_join_timeout(run_dir: Path) -> None:
    # long enough for the local domain's process to start on a loaded machine, short for the test
    with Cluster.start(parse_spec(SPEC.format(timeout=8)), run_dir=run_dir / "c") as cluster:
        wait_until(lambda: cluster.status()["domains"][1]["state"] == "crashed", timeout=60)
        final = cluster.wait(timeout_s=120)
        away = final["domains"][1]
        assert away["crash"] == "no process joined as it within 8 s (hypervisor.join_timeout_s)"
        assert final["domains"][0]["state"] == "dead"  # the other one ran once the wait was over
        timeouts = events(cluster.run_dir, "domain.join_timeout")
        assert [(e["dom"], e["timeout_s"], e["placement"]) for e in timeouts] == [(2, 8, "remote")]
