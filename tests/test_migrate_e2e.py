"""Migration through real processes (issue 15): a domain moved to a new process at a window boundary, several times
and back, has the virtual-time trace of a run without migration (its peers' too: nothing was lost or seen); with
``--to HOST`` the new process is one started on that host by `pvcluster join`, here a network namespace of its own
(tests/netns.py), and it is checked to run there.

The namespace test is skipped, with the reason, where this process cannot create network namespaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli
from netns import NETNS_DIR, netns_lab, netns_unavailable

from pvcluster.rundiff import first_divergence

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN_TIMEOUT_S = 240
DOMAINS = (
    ("alpha", "native", "workload=shootdown sdrounds=1000 shutdown=poweroff"),
    ("beta", "xen", "workload=shootdown sdrounds=1000 shutdown=poweroff"),
)


def spec_text(run_dir: Path, *, transport: str = "ipc", host: str = "127.0.0.1", port: int = 0,
              keys: Path | None = None, join_timeout_s: int = 30) -> str:
    out = [f"""
[cluster]
name = "migrating"
seed = 5
run_dir = "{run_dir}"
[hypervisor]
pcpus = 2
join_timeout_s = {join_timeout_s}
[bus]
transport = "{transport}"
host = "{host}"
port = {port}
""" + (f'keys = "{keys}"\n' if keys else "")]
    for name, backend, cmdline in DOMAINS:
        out.append(f"""
[[domain]]
name = "{name}"
vcpus = 2
backend = "{backend}"
cmdline = "{cmdline}"
""")
    return "".join(out)


def pvcluster(*args: str) -> list[str]:
    return [sys.executable, "-m", "pvcluster.cli", *args]


def wait_states(run_dir: Path, want: set[str], cli: Any = run_cli) -> list[dict[str, Any]]:
    """Poll `list` until every domain is in one of ``want``."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        listed = cli("list", "--run-dir", str(run_dir), "--json")
        if listed.returncode == 0:
            doms: list[dict[str, Any]] = json.loads(listed.stdout)
            if doms and all(d["state"] in want for d in doms):
                return doms
        assert time.monotonic() < deadline, listed.stdout or listed.stderr
        time.sleep(0.2)


def reference_run(tmp: Path) -> Path:
    """The same cluster, unmigrated, over ipc."""
    run_dir = tmp / "ref"
    spec = tmp / "ref.toml"
    spec.write_text(spec_text(run_dir))
    done = run_cli("up", str(spec), "--json", "--quiet", timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_a_domain_migrated_back_and_forth_keeps_its_trace_and_its_peers(run_dir: Path) -> None:
    run_a = run_dir / "a"
    spec = run_dir / "a.toml"
    spec.write_text(spec_text(run_a))
    assert run_cli("up", str(spec), "--detach", "--quiet").returncode == 0
    moves = []
    try:
        wait_states(run_a, {"running"})
        for dom in ("beta", "alpha", "beta"):
            moved = run_cli("migrate", dom, "--run-dir", str(run_a), "--json", timeout=RUN_TIMEOUT_S)
            assert moved.returncode == 0, moved.stderr
            moves.append(json.loads(moved.stdout))
        doms = wait_states(run_a, {"dead", "crashed"})
        assert [(d["state"], d["shutdown_reason"]) for d in doms] == [("dead", "poweroff")] * 2, doms
    finally:
        run_cli("down", "--run-dir", str(run_a))
    assert [m["name"] for m in moves] == ["beta", "alpha", "beta"]
    assert moves[0]["pid"] != moves[2]["pid"] and moves[0]["vt_ns"] < moves[2]["vt_ns"]
    assert all(m["bytes"] > 4 << 20 for m in moves)  # its memory went along
    divergence = first_divergence(reference_run(run_dir), run_a)
    assert divergence is None, divergence
    # each new process continued its domain's trace file; the hypervisor saw no process exit but the last ones
    exits = [json.loads(line) for line in (run_a / "trace" / "hypervisor.jsonl").read_text().splitlines()
             if '"domain.process_exit"' in line]
    assert sorted(e["dom"] for e in exits) == [1, 2]


def test_a_bad_migration_is_refused_and_leaves_the_domain_where_it_was(run_dir: Path) -> None:
    run_a = run_dir / "a"
    spec = run_dir / "a.toml"
    spec.write_text(spec_text(run_a, join_timeout_s=5))
    assert run_cli("up", str(spec), "--detach", "--quiet").returncode == 0
    try:
        wait_states(run_a, {"running"})
        nobody = run_cli("migrate", "nosuch", "--run-dir", str(run_a))
        assert nobody.returncode == 1 and "no domain 'nosuch'" in nobody.stderr
        # nobody joins from that host: the migration gives up after join_timeout_s; alpha runs on where it was
        far = run_cli("migrate", "alpha", "--to", "far-away-host", "--run-dir", str(run_a), "--timeout", "60",
                      timeout=90)
        assert far.returncode == 1 and "no process joined as alpha from far-away-host" in far.stderr, far.stderr
        doms = wait_states(run_a, {"dead", "crashed"})
        assert [(d["state"], d["shutdown_reason"]) for d in doms] == [("dead", "poweroff")] * 2, doms
    finally:
        run_cli("down", "--run-dir", str(run_a))


def _net_ns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))
def test_a_domain_migrates_to_another_host_and_runs_there_with_an_unchanged_trace(tmp_path: Path) -> None:
    port = 7300
    with netns_lab(3) as lab:
        tmp = tmp_path / "net"
        tmp.mkdir()
        run_a, keys = tmp / "run", tmp / "keys"
        spec = tmp / "spec.toml"
        spec.write_text(spec_text(run_a, transport="tcp", host=lab.hosts[0].addr, port=port, keys=keys))
        made = run_cli("keys", "create", "--spec", str(spec))
        assert made.returncode == 0, made.stderr

        def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
            return lab.run(0, pvcluster(*args), capture_output=True, text=True, timeout=timeout)

        up = cli("up", str(spec), "--detach", "--quiet")
        assert up.returncode == 0, up.stderr
        try:
            wait_states(run_a, {"running"}, cli)
            target = lab.hosts[2]
            migrate = lab.popen(0, pvcluster("migrate", "beta", "--to", target.addr, "--run-dir", str(run_a),
                                             "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            hv_trace = run_a / "trace" / "hypervisor.jsonl"
            deadline = time.monotonic() + 60
            while "waiting for a process on" not in hv_trace.read_text():
                assert time.monotonic() < deadline and migrate.poll() is None, migrate.communicate()
                time.sleep(0.1)
            # a process from another host is not taken
            dest = tmp / "beta-keys"
            dest.mkdir(mode=0o700)
            for file in ("cluster.key", "domain-beta.key", "domain-beta.key_secret"):
                shutil.copy2(keys / file, dest / file)
            endpoint = f"tcp://{lab.hosts[0].addr}:{port}"
            join_argv = pvcluster("join", "beta", "--endpoint", endpoint, "--keys", str(dest), "--trace-dir",
                                  str(run_a / "trace"))
            wrong = lab.run(1, join_argv, capture_output=True, text=True, timeout=60)
            assert wrong.returncode != 0 and "refused" in wrong.stderr, wrong.stderr
            joined = lab.popen(2, join_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = migrate.communicate(timeout=RUN_TIMEOUT_S)
            assert migrate.returncode == 0, err
            moved = json.loads(out)
            # the domain's process now runs in the target host's network namespace
            assert _net_ns(moved["pid"]) == os.stat(NETNS_DIR / target.name).st_ino
            assert _net_ns(moved["pid"]) != _net_ns(os.getpid())
            doms = wait_states(run_a, {"dead", "crashed"}, cli)
            assert [(d["state"], d["shutdown_reason"]) for d in doms] == [("dead", "poweroff")] * 2, doms
            joined.wait(timeout=60)
            assert joined.returncode == 0, joined.stderr.read() if joined.stderr else ""
        finally:
            cli("down", "--run-dir", str(run_a))
    divergence = first_divergence(reference_run(tmp_path), run_a)
    assert divergence is None, divergence
