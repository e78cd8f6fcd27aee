"""The default cluster end to end: real hypervisor and domain processes, a real ZeroMQ bus, real guest code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pvcluster.cluster import Cluster
from pvcluster.spec import load_spec, parse_spec
from pvcluster.trace import load, read_events, virtual_view

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def _run(spec: Any, run_dir: Path) -> tuple[dict[str, Any], dict[int, list[str]]]:
    with Cluster.start(spec, run_dir=run_dir) as cluster:
        final = cluster.wait(timeout_s=120)
        consoles = {d["domid"]: cluster.client.call("console", dom=d["domid"]) for d in final["domains"]}
    return final, consoles


def _hypercall_stream(run_dir: Path) -> list[dict[str, Any]]:
    return [virtual_view(e) for e in read_events(run_dir / "trace" / "hypervisor.jsonl") if e["event"] == "hypercall"]


def test_default_cluster_boots_every_vcpu_and_shuts_down_with_the_guest_reason(run_dir: Path) -> None:
    spec = load_spec()
    assert len(spec.domains) >= 2 and all(d.vcpus >= 2 for d in spec.domains)
    final, consoles = _run(spec, run_dir)
    expected_reason = {"alpha": "poweroff", "beta": "reboot"}
    for d in final["domains"]:
        assert d["state"] == "dead", d
        assert d["shutdown_reason"] == expected_reason[d["name"]]
        lines = consoles[d["domid"]]
        for v in range(d["vcpus"]):
            assert f"pvkern: vcpu {v} of {d['vcpus']} online" in lines, lines
        assert lines[-1] == f"pvkern: shutting down, reason {['poweroff', 'reboot'].index(d['shutdown_reason'])}"
    # every trace file parses, and simulated events carry virtual time
    files = sorted((run_dir / "trace").glob("*.jsonl"))
    assert {f.name for f in files} >= {"hypervisor.jsonl", "dom1-alpha.jsonl", "dom2-beta.jsonl"}
    for f in files:
        events = list(read_events(f))
        assert events and all("wall_ns" in e and "proc" in e for e in events)
    hcs = _hypercall_stream(run_dir)
    assert hcs and all({"vt_ns", "dom", "vcpu", "span", "nr", "result"} <= e.keys() for e in hcs)
    # console output went through CONSOLEIO_write from every vCPU
    writers = {(e["dom"], e["vcpu"]) for e in hcs if e["name"] == "console_io"}
    assert writers == {(d["domid"], v) for d in final["domains"] for v in range(d["vcpus"])}
    shutdowns = [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl") if e["event"] == "domain.shutdown"]
    assert sorted(e["reason"] for e in shutdowns) == ["poweroff", "reboot"]


def test_same_seed_same_hypercall_stream_other_seed_differs(run_dir: Path) -> None:
    text = (Path(__file__).parent.parent / "pvcluster" / "default_spec.toml").read_text()
    streams = []
    tables = []
    for i, seed in enumerate((7, 7, 8)):
        spec = parse_spec(text.replace("seed = 1", f"seed = {seed}"))
        _run(spec, run_dir / str(i))
        streams.append(_hypercall_stream(run_dir / str(i)))
        doc = load(run_dir / str(i)).analyse().to_json()
        del doc["trace"]  # what the reader read: it counts control requests, which come as often as the client polls
        tables.append(doc)
    assert streams[0] == streams[1]
    # every table `pvcluster trace` prints: same seed, same numbers
    assert tables[0] == tables[1] and len(tables[0]["shootdowns"]) == 2
    assert len(streams[0]) > 20
    assert streams[0] != streams[2]

    # the other seed changes timing only, not what each vCPU asked for, except how often a vCPU that waits for
    # another yields its pCPU meanwhile (SCHEDOP_yield, which depends on timing by nature); spans number each
    # vCPU's calls, so they are left out with the yields
    def per_vcpu(stream: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        asked = [e for e in stream if not (e["name"] == "sched_op" and e["args"][0] == 0)]
        return sorted(((e["dom"], e["vcpu"], e["name"], e["args"]) for e in asked), key=lambda t: t[:2])

    assert per_vcpu(streams[0]) == per_vcpu(streams[2])


HOSTILE = """
[cluster]
name = "hostile"
[[domain]]
name = "evil"
vcpus = 2
cmdline = "workload=hostile shutdown=poweroff"
[[domain]]
name = "bystander"
vcpus = 1
cmdline = "shutdown=reboot"
"""


def test_hostile_guest_gets_xen_errnos_and_the_cluster_carries_on(run_dir: Path) -> None:
    final, consoles = _run(parse_spec(HOSTILE), run_dir)
    evil = next(d for d in final["domains"] if d["name"] == "evil")
    bystander = next(d for d in final["domains"] if d["name"] == "bystander")
    lines = consoles[evil["domid"]]
    assert "pvkern: hostile checks failed: 0" in lines, lines
    assert evil["state"] == "dead" and evil["shutdown_reason"] == "poweroff"
    assert bystander["state"] == "dead" and bystander["shutdown_reason"] == "reboot"
    results = {
        (e["name"], e["args"][0]): e["result"]
        for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
        if e["event"] == "hypercall" and e["dom"] == evil["domid"] and e["result"] < 0
    }
    assert results[("unknown_99", 0)] == -38  # ENOSYS
    assert results[("console_io", 0)] == -14  # EFAULT
    assert results[("vcpu_op", 3)] == -2  # ENOENT
    assert results[("vcpu_op", 0)] == -17  # EEXIST


def test_cli_up_runs_default_and_prints_summary(run_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pvcluster.cli", "up", "--run-dir", str(run_dir / "cli"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pvcluster run summary" in proc.stderr  # --json: stdout holds the JSON document alone
    final = json.loads(proc.stdout)
    assert [d["state"] for d in final["domains"]] == ["dead", "dead"]
    assert (
        not (run_dir / "cli" / "hypervisor.json").exists() or "pid" in (run_dir / "cli" / "hypervisor.json").read_text()
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('[[domain]]\nname = "a"\nvcpu = 2\n', "domain[0].vcpu: unknown key (did you mean 'vcpus'?)"),
        ('[[domain]]\nname = "a"\nvcpus = -1\n', "domain[0].vcpus"),
        ('[[domain]]\nname = "a"\nkernel = "/nonexistent/guest.elf"\n', "/nonexistent/guest.elf"),
    ],
)
def test_cli_rejects_bad_spec_naming_the_problem(run_dir: Path, body: str, needle: str) -> None:
    spec = run_dir / "bad.toml"
    spec.write_text(body)
    proc = subprocess.run(
        [sys.executable, "-m", "pvcluster.cli", "up", str(spec), "--run-dir", str(run_dir / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr.replace("\n", " ").replace("  ", " ") or needle in proc.stderr
    assert not (run_dir / "x" / "hypervisor.json").exists()  # nothing started


def test_tcp_transport_runs_the_same_workload(run_dir: Path) -> None:
    text = (Path(__file__).parent.parent / "pvcluster" / "default_spec.toml").read_text()
    spec = parse_spec(text.replace('transport = "ipc"', 'transport = "tcp"'))
    assert spec.bus.transport == "tcp"
    final, consoles = _run(spec, run_dir)
    assert [(d["state"], d["shutdown_reason"]) for d in final["domains"]] == [("dead", "poweroff"), ("dead", "reboot")]
    info_events = [
        e for e in read_events(run_dir / "trace" / "hypervisor.jsonl") if e["event"] == "hypervisor.listening"
    ]
    assert info_events[0]["bus"].startswith("tcp://127.0.0.1:")


def test_down_right_after_start_is_prompt_and_clean(run_dir: Path) -> None:
    # Domains destroyed before their processes connect must still get their Stop (on Hello), not a kill after the
    # grace period (which would show as returncode -9): no wall-clock assertion needed to tell them apart.
    cluster = Cluster.start(load_spec(), run_dir=run_dir)
    cluster.down()
    exits = [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl") if e["event"] == "domain.process_exit"]
    assert len(exits) == 2 and all(e["returncode"] == 0 for e in exits), exits
