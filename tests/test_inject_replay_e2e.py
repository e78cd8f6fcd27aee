"""Faults from the CLI and the Python API against a running cluster, replay of a faulted run (interactive injections
included), `pvcluster check` and `pvcluster diff`, and the failure semantics that need real processes: a dead
hypervisor takes no domain process with it into orphanhood, and `pvcluster down` always finishes (issue 9)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from helpers import alive, run_cli, wait_until

from pvcluster.check import check_run
from pvcluster.cluster import Cluster
from pvcluster.control import read_hypervisor_info
from pvcluster.rundiff import first_divergence
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

SPINNERS = """
[cluster]
name = "spin"
[[domain]]
name = "spinner"
vcpus = 2
cmdline = "workload=forever"
[[domain]]
name = "other"
vcpus = 1
cmdline = "workload=forever"
"""

SHOOTDOWNS = """
[cluster]
name = "replayed"
seed = 11
[hypervisor]
pcpus = 2
[[domain]]
name = "alpha"
vcpus = 2
backend = "native"
cmdline = "workload=shootdown shutdown=poweroff"
[[domain]]
name = "beta"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown shutdown=poweroff"
[faults]
random = { rate = 3.0, kinds = ["preempt", "delay", "drop", "dup", "reorder", "slow", "pin"], until_ns = 2000000 }
"""

SKIP_FLUSH = """
[cluster]
name = "skipflush"
[[domain]]
name = "sd"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown shutdown=poweroff"
faults = ["skip-flush"]
"""





def _domain_pids(rd: Path) -> list[int]:
    return [int(p) for p in re.findall(r"created, process (\d+)", run_cli("dmesg", "--run-dir", str(rd)).stdout)]


def _up_detached(run_dir: Path, spec: str) -> Path:
    path = run_dir / "spec.toml"
    path.write_text(spec)
    rd = run_dir / "c"
    up = run_cli("up", str(path), "--run-dir", str(rd), "--detach")
    assert up.returncode == 0, up.stderr
    wait_until(lambda: "spinning forever" in run_cli("console", "spinner", "--run-dir", str(rd)).stdout)
    return rd


def test_inject_from_the_cli_then_list_the_faults_and_their_outcomes(run_dir: Path) -> None:
    rd = _up_detached(run_dir, SPINNERS)
    try:
        done = run_cli("inject", "preempt", "spinner.1", "duration_ns=30000", "--run-dir", str(rd))
        assert done.returncode == 0, done.stderr
        assert re.search(r"fault 1: preempt spinner\.1 .* at vt [\d.]+ us \(step \d+\): vcpu 1 held until", done.stdout)
        rec = json.loads(run_cli("inject", "drop", "other", "count=2", "--json", "--run-dir", str(rd)).stdout)
        assert (rec["fid"], rec["kind"], rec["origin"], rec["outcome"]) == (2, "drop", "interactive",
                                                                            "drop on the link: next 2 messages")
        # refused before anything acts: a bad kind, parameter, target or vCPU says what is wrong
        for args, msg in ((("explode", "other"), "unknown fault kind 'explode'"),
                          (("slow", "other.0", "factor=1", "duration_ns=5"), "factor must be an integer between 2"),
                          (("preempt", "other", "duration_ns=5"), "target must be a vCPU"),
                          (("preempt", "other.3", "duration_ns=5"), "no vCPU 3"),
                          (("pause", "nosuch"), "no domain 'nosuch'")):
            bad = run_cli("inject", *args, "--run-dir", str(rd))
            assert bad.returncode != 0 and msg in bad.stderr, (args, bad.stderr)
        killed = json.loads(run_cli("inject", "kill", "other", "--json", "--run-dir", str(rd)).stdout)
        assert killed["outcome"] == "killed" and killed["point"] == "close"
        wait_until(lambda: json.loads(run_cli("list", "--json", "--run-dir", str(rd)).stdout)[1]["state"] == "crashed")
        listed = json.loads(run_cli("faults", "--json", "--run-dir", str(rd)).stdout)
        assert [(r["fid"], r["kind"]) for r in listed["done"]] == [(1, "preempt"), (2, "drop"), (3, "kill")]
        table = run_cli("faults", "--run-dir", str(rd)).stdout
        assert "preempt" in table and "killed" in table
        records = [json.loads(line) for line in (rd / "faults.jsonl").read_text().splitlines()]
        assert [r["fid"] for r in records] == [1, 2, 3]
        # the spinner runs on, untouched by the other domain's death
        assert json.loads(run_cli("list", "--json", "--run-dir", str(rd)).stdout)[0]["state"] == "running"
    finally:
        assert run_cli("down", "--run-dir", str(rd)).returncode == 0


def test_down_finishes_with_a_stopped_process_and_a_paused_domain(run_dir: Path) -> None:
    rd = _up_detached(run_dir, SPINNERS)
    pids = _domain_pids(rd)
    hv = read_hypervisor_info(rd)
    assert hv is not None and len(pids) == 2
    stopped = json.loads(run_cli("inject", "stop", "other", "wall_ms=600000", "--json", "--run-dir", str(rd)).stdout)
    assert stopped["outcome"].startswith("process stopped")
    assert Path(f"/proc/{pids[1]}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "T"
    start = time.monotonic()
    assert run_cli("down", "--run-dir", str(rd), timeout=90).returncode == 0
    assert time.monotonic() - start < 60
    wait_until(lambda: not any(alive(p) for p in [hv["pid"], *pids]))


def test_a_dead_hypervisor_leaves_no_domain_process_behind(run_dir: Path) -> None:
    rd = _up_detached(run_dir, SPINNERS)
    pids = _domain_pids(rd)
    hv = read_hypervisor_info(rd)
    assert hv is not None and all(alive(p) for p in pids)
    os.kill(hv["pid"], signal.SIGKILL)
    start = time.monotonic()
    wait_until(lambda: not any(alive(p) for p in pids), timeout=15)
    assert time.monotonic() - start < 15
    for log in sorted((rd / "logs").glob("dom*.log")):
        assert "the hypervisor (pid" in log.read_text() and "is gone; trace flushed, exiting" in log.read_text()
    for trace in sorted((rd / "trace").glob("dom*.jsonl")):
        assert list(read_events(trace))[-1]["event"] == "domain.hypervisor_gone"


def test_replay_of_a_faulted_run_with_interactive_injections_reproduces_its_trace(run_dir: Path) -> None:
    a = run_dir / "a"
    with Cluster.start(parse_spec(SHOOTDOWNS), run_dir=a) as cluster:
        cluster.wait_for("shootdown", dom="beta")  # under way
        first = cluster.inject("preempt", "beta.1", duration_ns=40_000)
        cluster.wait_for("fault.end", fid=first["fid"])
        cluster.inject("slow", "alpha.0", factor=3, duration_ns=100_000)
        cluster.inject("kill", "alpha")
        cluster.wait(timeout_s=120)
    faults = [json.loads(line) for line in (a / "faults.jsonl").read_text().splitlines()]
    assert sum(f["origin"] == "interactive" for f in faults) == 3
    assert sum(f["origin"] == "random" for f in faults) >= 3
    replayed = run_cli("up", "--replay", str(a), "--quiet")
    assert replayed.returncode == 1  # alpha was killed: not every domain is dead, as in the recorded run
    b = run_dir / "a-replay-1"
    assert f"into {b}" in replayed.stderr, replayed.stderr
    again = [json.loads(line) for line in (b / "faults.jsonl").read_text().splitlines()]
    key = ("fid", "kind", "target", "params", "step", "point", "vt_ns", "outcome")
    assert [{k: f[k] for k in key} for f in again] == [{k: f[k] for k in key} for f in faults]
    assert first_divergence(a, b, upto_shortest=True) is None
    diff = run_cli("diff", str(a), str(b))
    assert diff.returncode == 0, diff.stdout
    # a replay of the replay names the next free directory
    assert json.loads((b / "run.json").read_text())["replayed_from"] == str(a)


def test_a_run_recorded_under_another_timing_model_is_refused(run_dir: Path) -> None:
    a = run_dir / "q"
    spec = SKIP_FLUSH.replace('faults = ["skip-flush"]', "").replace("workload=shootdown ", "")
    with Cluster.start(parse_spec(spec), run_dir=a) as cluster:
        cluster.wait(timeout_s=60)
    record = json.loads((a / "run.json").read_text())
    record["model_version"] = -1
    (a / "run.json").write_text(json.dumps(record))
    refused = run_cli("up", "--replay", str(a))
    assert refused.returncode == 1
    assert "recorded under timing model version -1" in refused.stderr and "cannot be reproduced" in refused.stderr
    assert not (run_dir / "q-replay-1").exists()


def test_check_passes_a_clean_run_and_names_the_stale_reads_of_a_skip_flush_run(run_dir: Path) -> None:
    clean, bad = run_dir / "clean", run_dir / "bad"
    for rd, spec in ((clean, SKIP_FLUSH.replace('faults = ["skip-flush"]', "")), (bad, SKIP_FLUSH)):
        with Cluster.start(parse_spec(spec), run_dir=rd) as cluster:
            cluster.wait(timeout_s=120)
    ok = run_cli("check", "--run-dir", str(clean))
    assert ok.returncode == 0 and "check: OK: no violations" in ok.stdout, ok.stdout
    failed = run_cli("check", "--run-dir", str(bad))
    assert failed.returncode == 1 and "stale-tlb-read" in failed.stdout, failed.stdout
    assert re.search(r"stale-tlb-read\s+sd-d1-r\d+\s+stale TLB read", failed.stdout)
    report = check_run(bad)
    assert report.stats["stale_reads"] > 0 and not report.ok
    diff = run_cli("diff", str(clean), str(bad))
    assert diff.returncode == 1 and "diverge" in diff.stdout.lower(), diff.stdout
